"""The project's exception hierarchy."""

import os


class OffsetError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = 1


class ProtocolError(OffsetError):
    """The peer broke the wire protocol (PROTOCOL.md); the connection must be closed."""


class ConfigError(OffsetError):
    """A configuration file or value is unusable."""

    exit_code = os.EX_CONFIG  # 78


class UsageError(OffsetError):
    """A command-line argument is unusable."""

    exit_code = os.EX_USAGE  # 64


class DataError(OffsetError):
    """An input file (identity, ticket) exists but its content is unusable."""

    exit_code = os.EX_DATAERR  # 65


class NoInputError(OffsetError):
    """An input file does not exist or cannot be opened."""

    exit_code = os.EX_NOINPUT  # 66


class CantCreateError(OffsetError):
    """An output file cannot be created (for example it exists already)."""

    exit_code = os.EX_CANTCREAT  # 73
