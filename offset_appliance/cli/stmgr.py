"""``stmgr``: make identities and relay tickets, and probe a relay through its ticket."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nacl.signing import SigningKey

from ..errors import DataError, NoInputError, UsageError
from ..files import (
    Ticket,
    address_warnings,
    b64url_decode,
    generate_identity,
    load_identity,
    ticket_text,
    validate_address,
    write_ticket,
)
from .common import ArgumentParser, add_version, run_main

_GEN_EXAMPLE = """example:
  stmgr gen-ident --output relay/relay.ident"""
_TICKET_EXAMPLE = """examples:
  stmgr relay-ticket --address relay.example.org:4567 \\
      --idfile relay/relay.ident --output relay/relay.relay
  stmgr relay-ticket -a [2001:db8::1]:4567 -i relay/relay.ident -o -   # to standard output"""
_PROBE_EXAMPLE = """examples:
  stmgr probe relay/relay.relay
  stmgr probe relay/relay.relay --address 203.0.113.7:4567   # before DNS points at it
  stmgr probe --address 203.0.113.7:4567 --idfile /var/lib/offset-relay/relay.ident
  stmgr probe relay/relay.relay --format prometheus > relay_probe.prom
  stmgr probe relay/relay.relay --listener-idfile probe.ident   # [access] listen_allow set"""
_USAGE_EXAMPLE = """examples:
  stmgr usage                                  # top 10 keys this month
  stmgr usage --by prefix --period day --top 20
  stmgr usage --state /var/lib/offset-relay/NAME/usage.json   # an instance's"""
DEFAULT_STATE = "/var/lib/offset-relay/usage.json"
_MAIN_EXAMPLE = f"""{_GEN_EXAMPLE}
  stmgr relay-ticket --address relay.example.org:4567 \\
      --idfile relay/relay.ident --output relay/relay.relay
  stmgr probe relay/relay.relay

Run 'stmgr COMMAND --help' for a command's options."""


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = ArgumentParser(
        prog="stmgr",
        description="Offset relay management.",
        epilog=_MAIN_EXAMPLE.replace("example:\n", "examples:\n", 1),
        formatter_class=raw,
    )
    add_version(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    commands.required = True

    gen = commands.add_parser(
        "gen-ident",
        help="generate a new identity (private key) file",
        description="Generate a new identity (private key) file, mode 0600.",
        epilog=_GEN_EXAMPLE,
        formatter_class=raw,
    )
    gen.add_argument("-o", "--output", required=True, type=Path, help="identity file to create")

    ticket = commands.add_parser(
        "relay-ticket",
        help="make a relay ticket from an identity",
        description="Make the ticket (public key and address) that nodes import.",
        epilog=_TICKET_EXAMPLE,
        formatter_class=raw,
    )
    ticket.add_argument("-a", "--address", required=True, help="public HOST:PORT nodes will dial")
    ticket.add_argument(
        "-i", "--idfile", required=True, type=Path, help="the relay's identity file"
    )
    ticket.add_argument(
        "-o", "--output", required=True, help="ticket file to create ('-': standard output)"
    )
    ticket.add_argument(
        "--allow-private",
        action="store_true",
        help="do not warn about a loopback or private address (a relay for a private network)",
    )

    probe = commands.add_parser(
        "probe",
        help="check a relay end to end through its ticket (exit 0 ok, 1 bad, 2 down)",
        description="Prove the relay's key and carry a message both ways through a real "
        "tunnel.\nExit 0 healthy, 1 misbehaving or another key, 2 unreachable.",
        epilog=_PROBE_EXAMPLE,
        formatter_class=raw,
    )
    probe.add_argument("ticket", type=Path, nargs="?", help="the relay's ticket file")
    probe.add_argument("-a", "--address", help="dial HOST:PORT instead of the ticket's address")
    key = probe.add_mutually_exclusive_group()
    key.add_argument("-i", "--idfile", type=Path, help="take the relay's key from its identity")
    key.add_argument("--public-key", help="the relay's public key (base64url, as in tickets)")
    probe.add_argument(
        "--listener-idfile",
        type=Path,
        metavar="IDENTITY",
        help="listen and accept as this identity (one [access] listen_allow admits)",
    )
    probe.add_argument(
        "--connector-idfile",
        type=Path,
        metavar="IDENTITY",
        help="connect as this identity (one [access] connect_allow admits)",
    )
    probe.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    probe.add_argument("--format", choices=("text", "prometheus"), default="text")

    usage = commands.add_parser(
        "usage",
        help="print the top users of the relay's transfer budgets, from its state file",
        description="Print who read the most bytes into the relay this month or today, from "
        "the budgets'\nstate file (written by the relay every budgets.save_interval seconds "
        "and at stop).",
        epilog=_USAGE_EXAMPLE,
        formatter_class=raw,
    )
    usage.add_argument(
        "--state",
        type=Path,
        help="the state file (default: $STATE_DIRECTORY/usage.json, else " + DEFAULT_STATE + ")",
    )
    usage.add_argument("--top", type=int, default=10, help="how many to print (default 10)")
    usage.add_argument("--period", choices=("day", "month"), default="month")
    usage.add_argument("--by", choices=("key", "prefix"), default="key")
    return parser


def _gen_ident(args: argparse.Namespace) -> int:
    generate_identity(args.output)
    return 0


def _relay_ticket(args: argparse.Namespace) -> int:
    address = validate_address(args.address)
    if not args.allow_private:
        for warning in address_warnings(address):
            print(f"stmgr: warning: {warning} (--allow-private to silence)", file=sys.stderr)
    # The permission check protects the relay; making a ticket only needs the public half.
    identity = load_identity(args.idfile, check_permissions=False)
    ticket = Ticket(bytes(identity.verify_key), address)
    if args.output == "-":
        # The file's exact bytes; a final newline only for a person at a terminal.
        sys.stdout.write(ticket_text(ticket) + ("\n" if sys.stdout.isatty() else ""))
        sys.stdout.flush()
    else:
        write_ticket(Path(args.output), ticket)
    return 0


def _probe(args: argparse.Namespace) -> int:
    from ..files import KEY_LEN
    from ..probe import run_probe

    if not 0 < args.timeout <= 3600:
        raise UsageError("--timeout must be between 0 and 3600 seconds")
    if args.ticket is not None and (args.idfile or args.public_key):
        raise UsageError("the ticket gives the relay's key; drop --idfile / --public-key")
    if args.ticket is None:
        if not args.address or not (args.idfile or args.public_key):
            raise UsageError(
                "give the relay's ticket, or --address HOST:PORT with its key "
                "(--idfile IDENTITY or --public-key KEY)"
            )
    public_key = None
    if args.idfile:
        public_key = bytes(load_identity(args.idfile, check_permissions=False).verify_key)
    elif args.public_key:
        try:
            public_key = b64url_decode(args.public_key, "--public-key")
        except Exception as exc:  # noqa: BLE001 - DataError: a bad argument here
            raise UsageError(str(exc)) from None
        if len(public_key) != KEY_LEN:
            raise UsageError(f"--public-key must be {KEY_LEN} bytes, not {len(public_key)}")
    address = validate_address(args.address) if args.address else None
    listener_id = _probe_identity(args.listener_idfile, "--listener-idfile")
    connector_id = _probe_identity(args.connector_idfile, "--connector-idfile")
    return run_probe(
        args.ticket,
        args.timeout,
        args.format,
        address=address,
        public_key=public_key,
        listener_id=listener_id,
        connector_id=connector_id,
    )


def _probe_identity(path: Path | None, option: str) -> SigningKey | None:
    """The probe's own identity from ``option``'s file (a private key: kept private)."""
    if path is None:
        return None
    try:
        return load_identity(path)
    except (DataError, NoInputError) as exc:
        raise type(exc)(f"{option}: {exc}") from None


def _usage(args: argparse.Namespace) -> int:
    from ..relay.usage import UsageFileError, read_usage_file

    if not 1 <= args.top <= 1_000_000:
        raise UsageError("--top must be between 1 and 1000000")
    path = args.state
    if path is None:
        directory = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        path = Path(directory) / "usage.json" if directory else Path(DEFAULT_STATE)
    try:
        doc = read_usage_file(path)
    except FileNotFoundError:
        raise NoInputError(
            f"no usage state file at {path} (the relay writes it when budgets are set)"
        ) from None
    except IsADirectoryError:
        raise NoInputError(f"{path} is a directory, not a usage state file") from None
    except OSError as exc:
        raise NoInputError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UsageFileError as exc:
        raise DataError(f"{path} is not a usable usage state file: {exc}") from None
    column = 0 if args.period == "day" else 1
    when = doc["day"] if args.period == "day" else doc["month"]
    table = doc["keys"] if args.by == "key" else doc["prefixes"]
    total_day, total_month = doc["total"]
    print(f"{path}, saved {doc['saved'] if isinstance(doc.get('saved'), str) else '?'}")
    print(f"relay total: {total_month:,} bytes in {doc['month']}, {total_day:,} on {doc['day']}")
    ranked = sorted(table.items(), key=lambda item: (-item[1][column], item[0]))
    ranked = [item for item in ranked if item[1][column]][: args.top]
    name = "keys" if args.by == "key" else "prefixes"
    if not ranked:
        print(f"no {name} with traffic in {when}")
        return 0
    print(f"top {len(ranked)} {name} by bytes in {when} (of {len(table)} counted):")
    width = max(len(f"{counts[column]:,}") for _, counts in ranked)
    for rank, (who, counts) in enumerate(ranked, 1):
        print(f"{rank:4}  {counts[column]:>{width},}  {who}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {
        "gen-ident": _gen_ident,
        "relay-ticket": _relay_ticket,
        "probe": _probe,
        "usage": _usage,
    }
    return run_main("stmgr", lambda: handler[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
