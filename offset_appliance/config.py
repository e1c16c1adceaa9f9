"""The relay's TOML configuration: a file plus its drop-in directory, into frozen dataclasses.

``relay.toml`` is read first, then every ``<stem>.d/*.toml`` beside it (``relay.d/`` for
``relay.toml``) in name order (the way ``sshd_config.d`` works), so that packages own the
main file and local changes or Ansible live in drop-ins. Later files override single keys;
tables merge key by key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import stat
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from .errors import ConfigError, DataError, UsageError
from .files import b64url_decode, split_host_port
from .wire.connection import CONN_TIMEOUT, KEEPALIVE_INTERVAL, REKEY_INTERVAL
from .wire.frames import MAX_FRAME_LENGTH

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class Limits:
    """Bounds on what strangers can make the relay hold (docs/protocol.md sections 6.4 and 7)."""

    max_connections: int = 20000
    max_connections_per_ip: int = 256
    max_handshakes: int = 512
    max_frame_length: int = MAX_FRAME_LENGTH
    max_half_tunnels_per_listener: int = 128
    max_half_tunnels_per_listener_per_ip: int = 16
    half_tunnel_buffer: int = 1048576
    max_orphaned_bytes: int = 67108864
    buffer_high_water: int = 1048576
    buffer_low_water: int = 262144
    new_connections_per_ip_per_second: int = 100
    new_connections_per_ip_burst: int = 500
    # Every per-IP count is kept per prefix of this length (an IPv6 host commonly owns a
    # /64); IPv4-mapped IPv6 addresses count as IPv4.
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64
    # Resident memory (bytes) past which new connections are refused and the feeders of
    # the largest output queues paused, until it is below the low mark (0: 90 % of it).
    # "auto": 80 % of the memory limit of the relay's control group, or of the machine's
    # memory (relay/memory.py); 0: no ceiling.
    max_memory: int | str = "auto"
    memory_low_mark: int = 0


@dataclass(frozen=True)
class KeyList:
    """A list of public keys as the configuration gives it (keys, and absolute paths of
    files of keys), with the keys it names (the files' as read when it was loaded)."""

    entries: tuple[str, ...] = ()
    keys: frozenset[bytes] = frozenset()
    # The keys each file among the entries gave, (path, keys) in the order of the entries:
    # what a reload compares to say that a file changed while the entries did not.
    files: tuple[tuple[str, frozenset[bytes]], ...] = ()

    def __str__(self) -> str:
        return "[" + ", ".join(self.entries) + "]"


@dataclass(frozen=True)
class Access:
    """Who may use the relay: keys that may listen (and accept) or connect, and source
    addresses that may connect at all. Deny wins over allow; an empty allow list admits
    everyone, a non-empty one only what it lists."""

    listen_allow: KeyList = field(default_factory=KeyList)
    listen_deny: KeyList = field(default_factory=KeyList)
    connect_allow: KeyList = field(default_factory=KeyList)
    connect_deny: KeyList = field(default_factory=KeyList)
    ip_allow: tuple[str, ...] = ()  # networks, normalised ("198.18.0.0/15", "::1/128")
    ip_deny: tuple[str, ...] = ()


@dataclass(frozen=True)
class Bans:
    """Automatic bans of sources (IP prefixes) refused too often."""

    enabled: bool = False
    threshold: int = 50
    window: float = 60.0
    ban_time: float = 60.0
    multiplier: float = 2.0
    max_ban_time: float = 86400.0
    forget_after: float = 86400.0
    table_size: int = 65536


@dataclass(frozen=True)
class Timeouts:
    """Protocol timers in seconds; the defaults are the original's constants."""

    conn_timeout: float = CONN_TIMEOUT
    relay_conn_timeout: float = 4.0
    keepalive: float = KEEPALIVE_INTERVAL
    half_tunnel: float = 32.0
    rekey_interval: float = REKEY_INTERVAL


@dataclass(frozen=True)
class Metrics:
    """The Prometheus endpoint: off unless enabled; loopback unless told otherwise."""

    enabled: bool = False
    listen: tuple[str, int] = ("127.0.0.1", 9477)


@dataclass(frozen=True)
class Bandwidth:
    """Token buckets on the bytes read from clients, in bytes per second (0: no limit) and
    burst bytes (0: one second's worth, at least ``MIN_AUTO_BURST``). Enforced by pausing
    reads (back-pressure): nothing is dropped, no tunnel closed."""

    connection_rate: int = 0
    connection_burst: int = 0
    key_rate: int = 0
    key_burst: int = 0
    prefix_rate: int = 0
    prefix_burst: int = 0
    total_rate: int = 0
    total_burst: int = 0


@dataclass(frozen=True)
class Budgets:
    """Bytes read from clients per public key, per IP prefix (per UTC day and month) and for
    the whole relay (per month); 0 is no budget. Past one: throttle to ``floor_rate`` (0: not
    slowed, counted only) or refuse new tunnels. Counts persist in ``state_file``."""

    key_daily: int = 0
    key_monthly: int = 0
    prefix_daily: int = 0
    prefix_monthly: int = 0
    total_monthly: int = 0
    action: str = "throttle"
    floor_rate: int = 65536
    state_file: str = ""
    save_interval: float = 60.0


@dataclass(frozen=True)
class Config:
    """Everything ``strelay`` needs to run."""

    identity_file: Path
    listen: tuple[tuple[str, int], ...]
    log_level: str = "info"
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    metrics: Metrics = field(default_factory=Metrics)
    access: Access = field(default_factory=Access)
    bans: Bans = field(default_factory=Bans)
    bandwidth: Bandwidth = field(default_factory=Bandwidth)
    budgets: Budgets = field(default_factory=Budgets)


# Lower bounds that keep the relay working at all (a 4-byte version frame, a handshake).
LIMIT_MINIMUM = {
    "max_connections": 1,
    "max_connections_per_ip": 1,
    "max_handshakes": 1,
    "max_frame_length": 4096,
    "max_half_tunnels_per_listener": 1,
    "max_half_tunnels_per_listener_per_ip": 1,
    "half_tunnel_buffer": 1,
    "max_orphaned_bytes": 0,
    "buffer_high_water": 1,
    "buffer_low_water": 0,
    "new_connections_per_ip_per_second": 1,
    "new_connections_per_ip_burst": 1,
    "ipv4_prefix": 8,
    "ipv6_prefix": 16,
    "max_memory": 0,
    "memory_low_mark": 0,
}
# Upper bounds on how much work one event can cause: a timer pass that expires every
# connection, a listener whose close drops all its pending connects in one batch, one frame
# decrypted in one piece, one accept delivering a half-tunnel's whole buffer.
LIMIT_MAXIMUM = {
    "max_connections": 1 << 20,
    "max_connections_per_ip": 1 << 20,
    "max_handshakes": 1 << 16,
    "max_frame_length": 16 << 20,
    "max_half_tunnels_per_listener": 1024,
    "max_half_tunnels_per_listener_per_ip": 1024,
    "half_tunnel_buffer": 16 << 20,
    "max_orphaned_bytes": 1 << 30,
    "buffer_high_water": 64 << 20,
    "buffer_low_water": 64 << 20,
    "new_connections_per_ip_per_second": 1 << 20,
    "new_connections_per_ip_burst": 1 << 20,
    "ipv4_prefix": 32,
    "ipv6_prefix": 128,
    "max_memory": 1 << 50,
    "memory_low_mark": 1 << 50,
}
# Timers, in seconds: keepalives go out at half the keepalive timeout, on a one-second tick
# at best; nothing waits longer than a week.
TIMEOUT_MINIMUM = {"keepalive": 2.0}
TIMEOUT_MAXIMUM = 7 * 24 * 3600.0
_TOP_KEYS = (
    "identity_file",
    "listen",
    "log_level",
    "limits",
    "timeouts",
    "metrics",
    "access",
    "bans",
    "bandwidth",
    "budgets",
)
_TABLES = ("limits", "timeouts", "metrics", "access", "bans", "bandwidth", "budgets")
# [bans]: (lowest, highest) of each number; times in seconds.
BANS_BOUNDS: dict[str, tuple[float, float]] = {
    "threshold": (1, 1 << 20),
    "window": (0.1, 7 * 24 * 3600.0),
    "ban_time": (0.1, 365 * 24 * 3600.0),
    "multiplier": (1.0, 1000.0),
    "max_ban_time": (0.1, 365 * 24 * 3600.0),
    "forget_after": (0.1, 365 * 24 * 3600.0),
    "table_size": (16, 1 << 22),
}
KEY_LISTS = ("listen_allow", "listen_deny", "connect_allow", "connect_deny")
IP_LISTS = ("ip_allow", "ip_deny")
# The largest key file read (a list is a set held in memory): about a million keys.
MAX_KEY_FILE_BYTES = 64 << 20
# [bandwidth] and [budgets]: a rate below 1 KiB/s would stall a connection's keepalives;
# 2^40 (1 TiB/s, or bytes) is far beyond any link. Budgets go up to 2^60 bytes.
RATE_MINIMUM = 1024
RATE_MAXIMUM = 1 << 40
BURST_MINIMUM = 4096
BUDGET_MAXIMUM = 1 << 60
BUDGET_ACTIONS = ("throttle", "refuse")
SAVE_INTERVAL_RANGE = (1.0, 86400.0)


def parse_listen_address(text: str) -> tuple[str, int]:
    """``IPV4:PORT`` or ``[IPV6]:PORT`` (port 0 picks a free one) -> (host, port)."""
    if not isinstance(text, str):
        raise UsageError("expected an address string like 0.0.0.0:4567 or [::]:4567")
    probe = text[:-2] + ":1" if text.endswith(":0") else text
    host, port = split_host_port(probe)
    if text.endswith(":0"):
        port = 0
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(
            f"listen address {text!r} must be an IP address (0.0.0.0, [::], ...), not a name"
        ) from None
    return host, port


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets (as ``parse_listen_address`` reads it)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def drop_in_files(path: Path, replace: dict[str, Path] | None = None) -> list[Path]:
    """The drop-ins that belong to ``path``: ``<dir>/<stem>.d/*.toml``, in name order.

    ``replace`` maps drop-in names to files read in their place (or added, if there is no
    such drop-in yet): a candidate is checked where it will go before it is installed.
    """
    return [read for read, _shown in _drop_ins_named(path, replace)]


def _drop_ins_named(path: Path, replace: dict[str, Path] | None = None) -> list[tuple[Path, Path]]:
    """Each drop-in as (the file read, the path its errors name): a candidate read in place
    of a drop-in is named by the drop-in it will become, not by its temporary file."""
    directory = path.parent / (path.stem + ".d")
    found = {}
    if directory.is_dir():
        found = {p.name: (p, p) for p in directory.glob("*.toml") if p.is_file()}
    found.update({name: (Path(file), directory / name) for name, file in (replace or {}).items()})
    return [found[name] for name in sorted(found)]


def _read_toml(path: Path, shown: Path | None = None) -> dict[str, Any]:
    """Read one configuration file, refusing one that someone else could have written.

    Like sshd's StrictModes: the file must be owned by root or by the user running the
    relay, and not writable by group or others (a setting such as ``identity_file`` or
    ``listen`` is as powerful as the identity it names). Checked on the opened file; opened
    without blocking, so a FIFO is refused rather than waited on. Its errors name ``shown``
    when given (the drop-in a candidate file is checked as).
    """
    if shown is not None and shown != path:
        try:
            return _read_toml(path)
        except ConfigError as exc:
            raise ConfigError(
                str(exc).replace(str(path), str(shown)) + f" (checked as {path})"
            ) from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"config file {path} is not a regular file")
        if info.st_uid not in (0, os.geteuid()):
            raise ConfigError(
                f"config file {path} is owned by uid {info.st_uid}, "
                "not by root or the user running the relay"
            )
        if info.st_mode & 0o022:
            raise ConfigError(
                f"config file {path} is writable by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); run: chmod go-w {path}"
            )
        try:
            return tomllib.load(handle)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _merge(files: Sequence[Path | tuple[Path, Path]]) -> tuple[dict[str, Any], dict[str, Path]]:
    """Merge files in order; remember which file set each key, for error messages (a file
    given as (read, shown) is named as ``shown``)."""
    merged: dict[str, Any] = {}
    origin: dict[str, Path] = {}
    for file in files:
        read, path = file if isinstance(file, tuple) else (file, file)
        doc = _read_toml(read, path)
        for key, value in doc.items():
            if key not in _TOP_KEYS:
                raise ConfigError(f"{path}: unknown key {key!r}")
            if key in _TABLES:
                if not isinstance(value, dict):
                    raise ConfigError(f"{path}: {key}: expected a table")
                table = merged.setdefault(key, {})
                for sub, subvalue in value.items():
                    table[sub] = subvalue
                    origin[f"{key}.{sub}"] = path
            else:
                merged[key] = value
                origin[key] = path
    return merged, origin


def _number(where: str, value: Any, *, integer: bool) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if integer and not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return value


def _limits(table: dict[str, Any], origin: dict[str, Path]) -> Limits:
    names = {f.name for f in dataclasses.fields(Limits)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        where = f"{origin[f'limits.{key}']}: limits.{key}"
        if key not in names:
            raise ConfigError(f"{where}: unknown key")
        if key == "max_memory" and isinstance(value, str):
            if value != "auto":
                raise ConfigError(f'{where}: expected a number of bytes or "auto", got {value!r}')
            values[key] = value
            continue
        number = int(_number(where, value, integer=True))
        low, high = LIMIT_MINIMUM[key], LIMIT_MAXIMUM[key]
        if not low <= number <= high:
            raise ConfigError(f"{where}: must be between {low} and {high}, got {number}")
        values[key] = number
    limits = Limits(**values)
    if limits.buffer_low_water >= limits.buffer_high_water:
        key = "buffer_low_water" if "buffer_low_water" in table else "buffer_high_water"
        source = origin.get(f"limits.{key}", "defaults")
        raise ConfigError(
            f"{source}: limits.{key}: buffer_low_water ({limits.buffer_low_water}) must be "
            f"below buffer_high_water ({limits.buffer_high_water})"
        )
    if limits.max_handshakes > limits.max_connections:
        if "max_handshakes" not in table:
            # Unset, it follows a max_connections lowered below its default.
            return dataclasses.replace(limits, max_handshakes=limits.max_connections)
        culprit = origin["limits.max_handshakes"]
        raise ConfigError(
            f"{culprit}: limits.max_handshakes ({limits.max_handshakes}) must not exceed "
            f"max_connections ({limits.max_connections}); lower max_handshakes too"
        )
    if limits.max_memory == "auto":
        if limits.memory_low_mark:
            raise ConfigError(
                f"{origin['limits.memory_low_mark']}: limits.memory_low_mark: needs max_memory "
                'in bytes (with max_memory = "auto" the low mark is 90 % of the ceiling)'
            )
    elif limits.max_memory and limits.memory_low_mark >= int(limits.max_memory):
        key = "memory_low_mark" if "memory_low_mark" in table else "max_memory"
        raise ConfigError(
            f"{origin[f'limits.{key}']}: limits.{key}: memory_low_mark "
            f"({limits.memory_low_mark}) must be below max_memory ({limits.max_memory})"
        )
    return limits


def _timeouts(table: dict[str, Any], origin: dict[str, Path]) -> Timeouts:
    names = {f.name for f in dataclasses.fields(Timeouts)}
    values: dict[str, float] = {}
    for key, value in table.items():
        where = f"{origin[f'timeouts.{key}']}: timeouts.{key}"
        if key not in names:
            raise ConfigError(f"{where}: unknown key")
        number = float(_number(where, value, integer=False))
        low = TIMEOUT_MINIMUM.get(key, 0.1)
        if not low <= number <= TIMEOUT_MAXIMUM:
            raise ConfigError(f"{where}: must be between {low:g} and {TIMEOUT_MAXIMUM:g} seconds")
        values[key] = number
    return Timeouts(**values)


def _metrics(table: dict[str, Any], origin: dict[str, Path]) -> Metrics:
    values: dict[str, Any] = {}
    for key, value in table.items():
        where = f"{origin[f'metrics.{key}']}: metrics.{key}"
        if key == "enabled":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected true or false, got {value!r}")
            values[key] = value
        elif key == "listen":
            try:
                values[key] = parse_listen_address(value)
            except UsageError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        else:
            raise ConfigError(f"{where}: unknown key")
    return Metrics(**values)


def _key(where: str, text: str) -> bytes:
    """A public key as tickets write it: base64url of 32 bytes (43 characters)."""
    try:
        key = b64url_decode(text.strip(), "the key")
    except DataError:
        key = b""
    if len(key) != 32:
        raise ConfigError(
            f"{where}: {text.strip()[:60]!r} is not a public key (43 base64url characters)"
        )
    return key


def _key_file(where: str, path: Path) -> frozenset[bytes]:
    """The keys of a file of one key a line ('#' comments and blank lines allowed).

    Checked as the configuration files are (an allow list that others could write to would
    let them in): a regular file, owned by root or the relay's user, not writable by group
    or others; opened without blocking, so a FIFO is refused rather than waited on.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read key file {path}: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ConfigError(f"{where}: key file {path} is not a regular file")
    with os.fdopen(fd, "rb") as handle:
        if info.st_uid not in (0, os.geteuid()):
            raise ConfigError(
                f"{where}: key file {path} is owned by uid {info.st_uid}, "
                "not by root or the user running the relay"
            )
        if info.st_mode & 0o022:
            raise ConfigError(
                f"{where}: key file {path} is writable by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); run: chmod go-w {path}"
            )
        try:
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read key file {path}: {exc.strerror}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ConfigError(f"{where}: key file {path} is larger than {MAX_KEY_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: key file {path} is not UTF-8 text") from None
    keys = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            keys.add(_key(f"{where}: {path} line {number}", line))
    return frozenset(keys)


def _access(
    table: dict[str, Any],
    origin: dict[str, Path],
    key_files: dict[str, frozenset[bytes]] | None = None,
) -> Access:
    values: dict[str, Any] = {}
    for key, value in table.items():
        where = f"{origin[f'access.{key}']}: access.{key}"
        if key not in KEY_LISTS and key not in IP_LISTS:
            raise ConfigError(f"{where}: unknown key")
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        if key in KEY_LISTS:
            keys: set[bytes] = set()
            files: dict[str, frozenset[bytes]] = {}
            for entry in value:
                if entry.startswith("/") and key_files is not None:
                    if entry not in key_files:
                        raise ConfigError(f"{where}: the keys of {entry} are not carried")
                    files[entry] = key_files[entry]
                    keys |= files[entry]
                elif entry.startswith("/"):
                    files[entry] = _key_file(where, Path(entry))
                    keys |= files[entry]
                else:
                    keys.add(_key(where, entry))
            values[key] = KeyList(tuple(value), frozenset(keys), tuple(files.items()))
        else:
            networks = []
            for entry in value:
                try:
                    network = ipaddress.ip_network(entry.strip(), strict=False)
                except ValueError:
                    raise ConfigError(
                        f"{where}: {entry!r} is not an address or network "
                        '("198.18.0.0/15", "2001:db8::/32")'
                    ) from None
                networks.append(str(network))
            values[key] = tuple(networks)
    return Access(**values)


def _bans(table: dict[str, Any], origin: dict[str, Path]) -> Bans:
    values: dict[str, Any] = {}
    for key, value in table.items():
        where = f"{origin[f'bans.{key}']}: bans.{key}"
        if key == "enabled":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected true or false, got {value!r}")
            values[key] = value
            continue
        if key not in BANS_BOUNDS:
            raise ConfigError(f"{where}: unknown key")
        integer = key in ("threshold", "table_size")
        number = _number(where, value, integer=integer)
        low, high = BANS_BOUNDS[key]
        if not low <= number <= high:
            raise ConfigError(f"{where}: must be between {low:g} and {high:g}, got {number:g}")
        values[key] = int(number) if integer else float(number)
    bans = Bans(**values)
    if bans.max_ban_time < bans.ban_time:
        key = "max_ban_time" if "max_ban_time" in table else "ban_time"
        raise ConfigError(
            f"{origin[f'bans.{key}']}: bans.{key}: max_ban_time ({bans.max_ban_time:g}) "
            f"must not be below ban_time ({bans.ban_time:g})"
        )
    return bans


def _bandwidth(table: dict[str, Any], origin: dict[str, Path]) -> Bandwidth:
    names = {f.name for f in dataclasses.fields(Bandwidth)}
    values: dict[str, int] = {}
    for key, value in table.items():
        where = f"{origin[f'bandwidth.{key}']}: bandwidth.{key}"
        if key not in names:
            raise ConfigError(f"{where}: unknown key")
        number = int(_number(where, value, integer=True))
        low = BURST_MINIMUM if key.endswith("_burst") else RATE_MINIMUM
        if number != 0 and not low <= number <= RATE_MAXIMUM:
            raise ConfigError(
                f"{where}: must be 0 (no limit) or between {low} and {RATE_MAXIMUM}, got {number}"
            )
        values[key] = number
    return Bandwidth(**values)


def _budgets(table: dict[str, Any], origin: dict[str, Path]) -> Budgets:
    names = {f.name for f in dataclasses.fields(Budgets)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        where = f"{origin[f'budgets.{key}']}: budgets.{key}"
        if key not in names:
            raise ConfigError(f"{where}: unknown key")
        if key == "action":
            if value not in BUDGET_ACTIONS:
                choices = ", ".join(BUDGET_ACTIONS)
                raise ConfigError(f"{where}: expected one of {choices}, got {value!r}")
            values[key] = value
        elif key == "state_file":
            if not isinstance(value, str):
                raise ConfigError(f"{where}: expected a path string, got {value!r}")
            if value:
                state = Path(value)
                if not state.is_absolute():
                    raise ConfigError(f"{where}: expected an absolute path, got {value!r}")
                if state.is_dir():
                    raise ConfigError(f"{where}: {value} is a directory")
                if not state.parent.is_dir():
                    raise ConfigError(f"{where}: directory {state.parent} does not exist")
            values[key] = value
        elif key == "save_interval":
            number = float(_number(where, value, integer=False))
            low, high = SAVE_INTERVAL_RANGE
            if not low <= number <= high:
                raise ConfigError(f"{where}: must be between {low:g} and {high:g} seconds")
            values[key] = number
        elif key == "floor_rate":
            number = int(_number(where, value, integer=True))
            if number != 0 and not RATE_MINIMUM <= number <= RATE_MAXIMUM:
                raise ConfigError(
                    f"{where}: must be 0 (not slowed) or between {RATE_MINIMUM} and "
                    f"{RATE_MAXIMUM}, got {number}"
                )
            values[key] = number
        else:
            number = int(_number(where, value, integer=True))
            if not 0 <= number <= BUDGET_MAXIMUM:
                raise ConfigError(
                    f"{where}: must be 0 (no budget) or between 1 and {BUDGET_MAXIMUM}, "
                    f"got {number}"
                )
            values[key] = number
    return Budgets(**values)


def load_config(
    path: Path | None,
    *,
    identity_file: Path | None = None,
    listen: list[str] | None = None,
    log_level: str | None = None,
    replace_drop_ins: dict[str, Path] | None = None,
) -> Config:
    """Read ``path`` and its drop-ins (if a path is given), then apply command-line overrides.

    ``replace_drop_ins`` reads other files in place of some drop-ins (see ``drop_in_files``).
    """
    merged: dict[str, Any] = {}
    origin: dict[str, Path] = {}
    if path is not None:
        path = Path(path)
        merged, origin = _merge([path, *_drop_ins_named(path, replace_drop_ins)])
    return _build(merged, origin, identity_file, listen, log_level)


def _build(
    merged: dict[str, Any],
    origin: dict[str, Path],
    identity_file: Path | None = None,
    listen: list[str] | None = None,
    log_level: str | None = None,
    key_files: dict[str, frozenset[bytes]] | None = None,
) -> Config:
    """The configuration of the merged settings, checked; ``key_files`` gives the keys of
    key files instead of reading them."""
    if identity_file is not None:
        ident = Path(identity_file)
    elif "identity_file" in merged:
        value = merged["identity_file"]
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{origin['identity_file']}: identity_file: expected a path")
        ident = Path(value)
        if not ident.is_absolute():
            # Relative to the file that named it, so a config can sit beside its identity.
            ident = origin["identity_file"].parent / ident
    else:
        raise ConfigError("no identity file: set identity_file in the config or pass --idfile")

    if listen:
        addresses = []
        for text in listen:
            try:
                addresses.append(parse_listen_address(text))
            except UsageError as exc:
                raise UsageError(f"--laddr {text}: {exc}") from None
    elif "listen" in merged:
        value = merged["listen"]
        where = f"{origin['listen']}: listen"
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise ConfigError(f'{where}: expected a list of addresses like ["0.0.0.0:4567"]')
        addresses = []
        for text in value:
            try:
                addresses.append(parse_listen_address(text))
            except UsageError as exc:
                raise ConfigError(f"{where}: {exc}") from None
    else:
        raise ConfigError("no listen address: set listen in the config or pass --laddr")
    if len(set(addresses)) != len(addresses):
        raise ConfigError("listen: the same address is given twice")

    level = log_level if log_level is not None else merged.get("log_level", "info")
    if level not in LOG_LEVELS:
        where = "--log-level" if log_level is not None else f"{origin['log_level']}: log_level"
        raise ConfigError(f"{where}: expected one of {', '.join(LOG_LEVELS)}, got {level!r}")

    return Config(
        identity_file=ident,
        listen=tuple(addresses),
        log_level=level,
        limits=_limits(merged.get("limits", {}), origin),
        timeouts=_timeouts(merged.get("timeouts", {}), origin),
        metrics=_metrics(merged.get("metrics", {}), origin),
        access=_access(merged.get("access", {}), origin, key_files),
        bans=_bans(merged.get("bans", {}), origin),
        bandwidth=_bandwidth(merged.get("bandwidth", {}), origin),
        budgets=_budgets(merged.get("budgets", {}), origin),
    )


def dump_config(config: Config) -> str:
    """``config`` as TOML, every setting spelled out: read back, it gives the same config."""
    doc = {
        "identity_file": str(config.identity_file.absolute()),
        "listen": [format_address(host, port) for host, port in config.listen],
        "log_level": config.log_level,
        "limits": dataclasses.asdict(config.limits),
        "timeouts": dataclasses.asdict(config.timeouts),
        "metrics": {
            "enabled": config.metrics.enabled,
            "listen": format_address(*config.metrics.listen),
        },
        "access": {
            **{name: list(getattr(config.access, name).entries) for name in KEY_LISTS},
            **{name: list(getattr(config.access, name)) for name in IP_LISTS},
        },
        "bans": dataclasses.asdict(config.bans),
        "bandwidth": dataclasses.asdict(config.bandwidth),
        "budgets": dataclasses.asdict(config.budgets),
    }
    return tomli_w.dumps(doc)


# Where the settings of a configuration carried by the hand-over come from, as error
# messages name a file.
CARRIED = Path("(the hand-over's configuration)")


def carried_config(config: Config) -> dict[str, object]:
    """``config`` as a hand-over carries it to the next process: its TOML (``dump_config``)
    and the keys each key file gave, so that it is the same configuration without reading
    any file again."""
    key_files: dict[str, object] = {}
    for name in KEY_LISTS:
        for path, keys in getattr(config.access, name).files:
            key_files[path] = sorted(keys)
    return {"toml": dump_config(config), "key_files": key_files}


def config_from_carried(document: object) -> Config:
    """The configuration ``carried_config`` made; ``ConfigError`` if it is not one."""
    if not isinstance(document, dict):
        raise ConfigError(f"{CARRIED}: not a record")
    text, files = document.get("toml"), document.get("key_files")
    if not isinstance(text, str) or not isinstance(files, dict):
        raise ConfigError(f"{CARRIED}: incomplete")
    key_files: dict[str, frozenset[bytes]] = {}
    for path, keys in files.items():
        if not isinstance(keys, list) or not all(isinstance(k, bytes) for k in keys):
            raise ConfigError(f"{CARRIED}: the keys of {path} are not keys")
        key_files[path] = frozenset(keys)
    try:
        merged = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{CARRIED}: not valid TOML: {exc}") from None
    origin: dict[str, Path] = {}
    for key, value in merged.items():
        if key not in _TOP_KEYS:
            raise ConfigError(f"{CARRIED}: unknown key {key!r}")
        if key in _TABLES:
            if not isinstance(value, dict):
                raise ConfigError(f"{CARRIED}: {key}: expected a table")
            origin.update({f"{key}.{sub}": CARRIED for sub in value})
        else:
            origin[key] = CARRIED
    return _build(merged, origin, key_files=key_files)


def config_values(config: Config) -> dict[str, Any]:
    """Every setting of ``config`` by its dotted name (``"limits.max_connections"``), as
    ``dump_config`` spells it: what a reload compares to say what changed."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, table: dict[str, Any]) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                flat[prefix + key] = value

    walk("", tomllib.loads(dump_config(config)))
    return flat


def config_sources(path: Path) -> tuple[list[Path], dict[str, Path]]:
    """The files ``load_config(path)`` reads, in order, and which file set each key
    (``"listen"``, ``"metrics.listen"``, ...)."""
    files = [Path(path), *drop_in_files(Path(path))]
    return files, _merge(files)[1]


def listen_set_by(path: Path) -> list[Path]:
    """Every file, in order, that gives ``listen`` a new value: more than one means a
    drop-in replaced the address list of a file read before it. A file that repeats the
    list already in force (say, the role's drop-in with the package's addresses) changes
    nothing and is left out."""
    found: list[Path] = []
    current: object = None
    for file in [Path(path), *drop_in_files(Path(path))]:
        try:
            table = _read_toml(file)
        except ConfigError:
            continue
        if "listen" not in table:
            continue
        value = table["listen"]
        value = [value] if isinstance(value, str) else value
        if found and value == current:
            continue
        found.append(file)
        current = value
    return found
