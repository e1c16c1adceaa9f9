"""Logging set-up: one line per event on stderr, without timestamps under journald."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str = "info", *, name: str = "strelay") -> None:
    """Configure the root logger for a command-line program."""
    if os.environ.get("JOURNAL_STREAM"):
        # journald stamps every line itself; a second timestamp only adds noise.
        fmt = "%(levelname)s %(message)s"
    else:
        fmt = f"%(asctime)s {name} %(levelname)s %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
