"""``stmgr``: make identities and relay tickets, and probe a relay through its ticket."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UsageError
from ..files import Ticket, generate_identity, load_identity, validate_address, write_ticket
from .common import ArgumentParser, add_version, run_main


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="stmgr", description="Offset relay management.")
    add_version(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    commands.required = True

    gen = commands.add_parser("gen-ident", help="generate a new identity (private key) file")
    gen.add_argument("--output", required=True, type=Path, help="identity file to create")

    ticket = commands.add_parser("relay-ticket", help="make a relay ticket from an identity")
    ticket.add_argument("--address", required=True, help="public HOST:PORT nodes will dial")
    ticket.add_argument("--idfile", required=True, type=Path, help="the relay's identity file")
    ticket.add_argument("--output", required=True, type=Path, help="ticket file to create")

    probe = commands.add_parser(
        "probe", help="check a relay end to end through its ticket (exit 0 ok, 1 bad, 2 down)"
    )
    probe.add_argument("ticket", type=Path, help="the relay's ticket file")
    probe.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    probe.add_argument("--format", choices=("text", "prometheus"), default="text")
    return parser


def _gen_ident(args: argparse.Namespace) -> int:
    generate_identity(args.output)
    return 0


def _relay_ticket(args: argparse.Namespace) -> int:
    address = validate_address(args.address)
    # The permission check protects the relay; making a ticket only needs the public half.
    identity = load_identity(args.idfile, check_permissions=False)
    write_ticket(args.output, Ticket(bytes(identity.verify_key), address))
    return 0


def _probe(args: argparse.Namespace) -> int:
    from ..probe import run_probe

    if not 0 < args.timeout <= 3600:
        raise UsageError("--timeout must be between 0 and 3600 seconds")
    return run_probe(args.ticket, args.timeout, args.format)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"gen-ident": _gen_ident, "relay-ticket": _relay_ticket, "probe": _probe}
    return run_main("stmgr", lambda: handler[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
