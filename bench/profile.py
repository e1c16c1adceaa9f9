"""``python -m bench.profile``: run one load against a relay under cProfile; print the top.

    python -m bench.profile small --output /tmp/small.prof
    python -m bench.profile bulk --output /tmp/bulk.prof

The statistics file can be explored further with ``python -m pstats FILE``. cProfile adds a
cost to every Python call, so compare shares of the time, not absolute figures; ``py-spy
record --pid PID`` gives a sampling view without that distortion.
"""

from __future__ import annotations

import argparse
import dataclasses
import pstats
import sys
import tempfile
from pathlib import Path

from . import scenarios
from .relay import BenchError, raise_fd_limit

LOADS = ("bulk", "small", "handshakes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile", description="Profile strelay under one benchmark load."
    )
    parser.add_argument("load", choices=LOADS)
    parser.add_argument("--output", type=Path, required=True, help="cProfile statistics file")
    parser.add_argument("--connections", type=int, default=1000, help="for the small load")
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement window")
    parser.add_argument("--top", type=int, default=30, help="functions to print")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    raise_fd_limit()
    sizes = dataclasses.replace(
        scenarios.FULL, small_seconds=args.seconds, handshake_seconds=args.seconds
    )
    output = args.output.resolve()
    try:
        with tempfile.TemporaryDirectory(prefix="offset-profile-") as workdir:
            if args.load == "bulk":
                result = scenarios.bulk(Path(workdir), sizes, profile=output)
            elif args.load == "small":
                result = scenarios.small(
                    Path(workdir), sizes, args.connections, latency=False, profile=output
                )
            else:
                result = scenarios.handshakes(Path(workdir), sizes, profile=output)
    except BenchError as exc:
        print(f"bench.profile: error: {exc}", file=sys.stderr)
        return 1
    print({key: value for key, value in result.items() if not isinstance(value, dict)})
    stats = pstats.Stats(str(output))
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
