"""``strelay``: run an Offset relay."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import pwd
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from nacl.signing import SigningKey

from ..config import LOG_LEVELS, Config, config_sources, dump_config, listen_set_by, load_config
from ..errors import ConfigError, OffsetError, UnavailableError, UsageError
from ..files import b64url_encode, load_identity, load_ticket
from ..logs import setup_logging
from .common import ArgumentParser, add_version, run_main

if TYPE_CHECKING:
    from ..relay.server import BindError

log = logging.getLogger("strelay")

_EXAMPLES = """examples:
  strelay --idfile relay/relay.ident --laddr 0.0.0.0:4567
  strelay -i relay/relay.ident -l 0.0.0.0:4567 -l [::]:4567
  strelay --config /etc/offset-relay/relay.toml   # and /etc/offset-relay/relay.d/*.toml
  strelay --config /etc/offset-relay/relay.toml --check-config"""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="strelay",
        description="Offset relay server.\n\nSettings come from --config, then the *.toml "
        "files of the directory <config stem>.d/\nbeside it (relay.d/ for relay.toml); "
        "--idfile, --laddr and --log-level override them,\nand work without a config.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(parser)
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument("-i", "--idfile", type=Path, help="the relay's identity file")
    parser.add_argument(
        "-l",
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
        "--reload",
        type=int,
        metavar="PID",
        help="check the configuration as --check-config does, then signal the relay running "
        "as PID to reload it (SIGHUP; the relay checks it again, and logs and reports its "
        "verdict); exit 0 if it is valid, 78 if not (the relay keeps its running one); "
        "the unit's ExecReload=",
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


def _log_sources(args: argparse.Namespace, when: str) -> None:
    """Which files were read, in order; a drop-in that replaces ``listen`` is worth a warning."""
    if args.config is None:
        return
    files, _origin = config_sources(args.config)
    log.info("%s: configuration read from %s", when, ", ".join(str(f) for f in files))
    setters = listen_set_by(args.config)
    if len(setters) > 1 and not args.laddr:
        log.warning(
            "listen of %s replaces the listen of %s (a list is replaced, not extended)",
            setters[-1],
            ", ".join(str(f) for f in setters[:-1]),
        )


# The package's service user and state directory (systemd/offset-relay.service, and the
# instances of offset-relay@.service below it).
SERVICE_USER = "offset-relay"
SERVICE_STATE = Path("/var/lib/offset-relay")


def _process_user() -> str | None:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return None


def no_ticket_hint(identity_file: Path, ticket_path: Path, user: str | None) -> str:
    """The command that makes the missing ticket. Under the package (the relay runs as its
    service user, or its identity is in the package's state directory, which only that user
    can enter) the operator's shell must run it as that user: ``runuser -u offset-relay --``."""
    command = (
        f"stmgr relay-ticket --address HOST:PORT --idfile {identity_file} --output {ticket_path}"
    )
    if user == SERVICE_USER or identity_file.is_relative_to(SERVICE_STATE):
        command = f"runuser -u {SERVICE_USER} -- {command}"
    return f"no ticket at {ticket_path} yet; make it: {command}"


def _announce_ticket(config: Config, public_key: bytes) -> None:
    """Say where the ticket nodes need is, and whether it matches this relay's key."""
    ticket_path = config.identity_file.with_suffix(".relay")
    key = b64url_encode(public_key)
    if not ticket_path.exists():
        log.info("%s", no_ticket_hint(config.identity_file, ticket_path, _process_user()))
        return
    try:
        ticket = load_ticket(ticket_path)
    except OffsetError as exc:
        log.warning("ticket %s is unusable: %s", ticket_path, exc)
        return
    if ticket.public_key != public_key:
        log.warning(
            "ticket %s carries public key %s, not this relay's %s; nodes using it will "
            "refuse the relay: remake it",
            ticket_path,
            b64url_encode(ticket.public_key),
            key,
        )
    else:
        log.info("ticket %s: address %s, public key %s", ticket_path, ticket.address, key)


def _where(args: argparse.Namespace, kind: str) -> str:
    """Which argument or file set the address of the ``relay`` or ``metrics`` socket."""
    if kind == "relay" and args.laddr:
        return "set by --laddr"
    if args.config is None:
        return "the default"
    _files, origin = config_sources(args.config)
    key = "listen" if kind == "relay" else "metrics.listen"
    if key in origin:
        return f"set by {key} in {origin[key]}"
    return "the default of metrics.listen"


def _bind_error(exc: BindError, args: argparse.Namespace) -> UnavailableError:
    where = _where(args, exc.kind)
    message = f"cannot open the {exc.kind} socket: {exc} ({where})"
    if exc.errno == errno.EADDRINUSE:
        message += f"; another strelay? see: ss -ltnp 'sport = :{exc.port}'"
    elif exc.errno == errno.EACCES and exc.port < 1024:
        message += (
            "; ports below 1024 need CAP_NET_BIND_SERVICE "
            "(AmbientCapabilities=CAP_NET_BIND_SERVICE in the unit), or use a port above 1023"
        )
    elif exc.errno == errno.EADDRNOTAVAIL:
        message += "; that address is not on this machine (0.0.0.0 or [::] means all)"
    return UnavailableError(message)


# prctl(2) option: whether the process may dump core and be ptraced by its own user.
PR_SET_DUMPABLE = 4


def forbid_core_dumps() -> None:
    """Make this process not dumpable before the identity is read: no core file (a watchdog
    SIGABRT would otherwise write the Ed25519 seed wherever systemd-coredump keeps cores)
    and no ptrace or /proc/PID/mem by other processes of the same user. The unit sets
    LimitCORE=0 as well; this holds without the unit too.

    A plain call of an existing libc function through ctypes: no ffi callback, so it works
    under MemoryDenyWriteExecute=yes.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0
        reason = os.strerror(ctypes.get_errno()) if failed else ""
    except (OSError, AttributeError) as exc:
        failed, reason = True, str(exc)
    if failed:
        logging.getLogger("strelay").warning(
            "could not forbid core dumps (prctl PR_SET_DUMPABLE): %s", reason
        )


def _identity(config: Config) -> SigningKey:
    forbid_core_dumps()
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


def _signal_reload(args: argparse.Namespace) -> int:
    """Check, then have the running relay reload whatever the verdict: a bad file fails
    ``systemctl reload`` here and is also refused, logged and reported by the relay itself
    (its log line, STATUS= and offset_relay_config_last_reload_successful)."""
    pid = args.reload
    if pid <= 0:
        raise UsageError(f"--reload {pid}: expected the relay's process id")
    problem: OffsetError | None = None
    try:
        _identity(_load(args))
    except OffsetError as exc:
        problem = exc
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise UnavailableError(f"--reload {pid}: no such process") from None
    except PermissionError:
        raise UnavailableError(f"--reload {pid}: not allowed to signal that process") from None
    if problem is not None:
        raise problem
    where = str(args.config) if args.config is not None else "the command line"
    print(f"strelay: configuration from {where} is valid; process {pid} reloads it")
    return 0


def _serve(args: argparse.Namespace) -> int:
    if args.check_config:
        return _check(args)
    if args.reload is not None:
        return _signal_reload(args)
    if args.print_config:
        sys.stdout.write(dump_config(_load(args)))
        return 0
    from ..relay.handover import Inherited
    from ..relay.server import BindError, run, start_config

    # What a restart handed over: if the files do not load, the configuration it carries
    # (the previous process's) keeps the relay and its connections up.
    inherited = Inherited.from_environment()
    config, config_error = start_config(lambda: _load(args), inherited)
    setup_logging(config.log_level)
    identity = _identity(config)
    from ..allocator import tune

    tune()
    from ..relay import descriptors

    short = descriptors.fit(config.limits.max_connections)

    def reload_config() -> Config:
        config = _load(args)
        _log_sources(args, "reload")
        problem = descriptors.fit(config.limits.max_connections)
        if problem:
            log.warning("%s", problem)
        return config

    def announce() -> None:
        # Once the sockets are open: a relay that cannot start says one line only.
        if not config_error:  # files that do not load have been named already
            _log_sources(args, "start")
        log.debug("identity loaded from %s", config.identity_file)
        if short:
            log.warning("%s", short)
        _announce_ticket(config, bytes(identity.verify_key))

    try:
        return run(
            config,
            identity,
            reload_config=reload_config if args.config else None,
            announce=announce,
            inherited=inherited,
            config_error=config_error,
        )
    except BindError as exc:
        raise _bind_error(exc, args) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main("strelay", lambda: _serve(args))


if __name__ == "__main__":
    sys.exit(main())
