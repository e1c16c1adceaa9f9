"""offset-relay: a relay server for the Offset payment network."""

__version__ = "0.2.0"
