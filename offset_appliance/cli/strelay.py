"""``strelay``: run an Offset relay."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..config import LOG_LEVELS, Config, dump_config, load_config
from ..errors import ConfigError, OffsetError, UsageError
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
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--check-config",
        action="store_true",
        help="check the configuration (the file, its drop-ins, the options above and the "
        "identity file) and exit: 0 if the relay would start with it, 78 if not",
    )
    mode.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration, every setting spelled out, as TOML",
    )
    parser.add_argument(
        "--drop-in",
        action="append",
        metavar="NAME=FILE",
        help="with --check-config or --print-config: read FILE in place of the drop-in NAME "
        "(to check a candidate before installing it)",
    )
    return parser


def _drop_ins(args: argparse.Namespace) -> dict[str, Path]:
    replace: dict[str, Path] = {}
    for text in args.drop_in or ():
        name, sep, file = text.partition("=")
        if not sep or not file or not name.endswith(".toml") or "/" in name:
            raise UsageError(f"--drop-in {text}: expected NAME.toml=FILE")
        if args.config is None:
            raise UsageError("--drop-in needs --config")
        replace[name] = Path(file)
    if replace and not (args.check_config or args.print_config):
        raise UsageError("--drop-in goes with --check-config or --print-config")
    return replace


def _load(args: argparse.Namespace) -> Config:
    return load_config(
        args.config,
        identity_file=args.idfile,
        listen=args.laddr,
        log_level=args.log_level,
        replace_drop_ins=_drop_ins(args),
    )


def _identity(config: Config):
    try:
        return load_identity(config.identity_file)
    except OffsetError as exc:
        # A relay without a usable identity is a configuration problem (sysexits 78), so
        # systemd's RestartPreventExitStatus stops a restart loop.
        raise ConfigError(str(exc)) from None


def _check(args: argparse.Namespace) -> int:
    config = _load(args)
    _identity(config)
    where = str(args.config) if args.config is not None else "the command line"
    print(f"strelay: configuration from {where} is valid")
    return 0


def _serve(args: argparse.Namespace) -> int:
    if args.check_config:
        return _check(args)
    if args.print_config:
        sys.stdout.write(dump_config(_load(args)))
        return 0
    config = _load(args)
    setup_logging(config.log_level)
    identity = _identity(config)
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
