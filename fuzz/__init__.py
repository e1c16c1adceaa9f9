"""Fuzz targets for the wire layers and the relay core (see targets.py and run.py)."""
