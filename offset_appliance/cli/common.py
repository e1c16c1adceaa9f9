"""What both commands share: argument parsing that fails in one line, and error exits."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from .. import __version__
from ..errors import OffsetError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with sysexits' EX_USAGE (64) instead of 2 on bad arguments."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(os.EX_USAGE)


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def run_main(prog: str, body: Callable[[], int]) -> int:
    """Run a command body; turn our errors into one line on stderr and their exit code."""
    try:
        return body()
    except OffsetError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
