"""``strelay``: run an Offset relay."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..config import LOG_LEVELS, Config, load_config
from ..errors import ConfigError, OffsetError
from ..files import load_identity
from ..logs import setup_logging
from .common import ArgumentParser, add_version, run_main


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="strelay",
        description="Offset relay server. Settings come from --config (and its .d directory); "
        "--idfile, --laddr and --log-level override them, and work without a config.",
    )
    add_version(parser)
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument("--idfile", type=Path, help="the relay's identity file")
    parser.add_argument(
        "--laddr",
        action="append",
        metavar="HOST:PORT",
        help="address to listen on (repeatable; IPv6 as [::]:4567)",
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS)
    return parser


def _load(args: argparse.Namespace) -> Config:
    return load_config(
        args.config, identity_file=args.idfile, listen=args.laddr, log_level=args.log_level
    )


def _serve(args: argparse.Namespace) -> int:
    config = _load(args)
    setup_logging(config.log_level)
    try:
        identity = load_identity(config.identity_file)
    except OffsetError as exc:
        # A relay without a usable identity is a configuration problem (sysexits 78), so
        # systemd's RestartPreventExitStatus stops a restart loop.
        raise ConfigError(str(exc)) from None
    from ..relay.server import run

    def reload_config() -> Config:
        return _load(args)

    logging.getLogger("strelay").debug("identity loaded from %s", config.identity_file)
    return run(config, identity, reload_config=reload_config if args.config else None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main("strelay", lambda: _serve(args))


if __name__ == "__main__":
    sys.exit(main())
