"""Identity and relay ticket files (docs/protocol.md 9), byte-compatible with the original."""

from __future__ import annotations

import base64
import binascii
import errno
import ipaddress
import json
import os
import re
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from nacl.signing import SigningKey

from .errors import CantCreateError, DataError, NoInputError, UsageError

KEY_LEN = 32
MAX_ADDRESS_LEN = 256
# An identity or ticket is a few dozen bytes; refuse to read anything absurd.
_MAX_FILE_SIZE = 64 * 1024


class InsecureFileError(DataError):
    """A private key file that group or others may read or write."""


class IdentityDocument(TypedDict):
    """An identity file's JSON object, as the original writes it."""

    privateKey: str


class TicketDocument(TypedDict):
    """A relay ticket file's JSON object, as the original writes it (keys in this order)."""

    publicKey: str
    address: str


def b64url_encode(data: bytes) -> str:
    """Base64url without padding, as the original writes keys."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: object, what: str) -> bytes:
    """Base64url with or without padding; a :class:`DataError` naming ``what`` otherwise
    (also for a value that is not a string: ``text`` may come straight from a JSON file)."""
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]*={0,2}", text):
        raise DataError(f"{what} is not base64url text")
    stripped = text.rstrip("=")
    try:
        return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError) as exc:
        raise DataError(f"{what} is not valid base64url: {exc}") from None


def _write_new(path: Path, text: str, mode: int) -> None:
    """Create ``path`` with ``mode``; never overwrite; the content is complete or absent."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise CantCreateError(f"{path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise CantCreateError(f"cannot create {path}: {exc.strerror}") from None
    try:
        # O_CREAT applies the umask; the mode must hold regardless of it.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            fd = -1
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        path.unlink(missing_ok=True)
        raise CantCreateError(f"cannot write {path}: {exc.strerror}") from None


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    doc: dict[str, object] = {}
    for key, value in pairs:
        if key in doc:
            raise DataError(f'key "{key}" appears more than once')
        doc[key] = value
    return doc


def _read_file(path: Path, what: str, *, private: bool) -> bytes:
    """The bytes of a regular file, read through one descriptor.

    Opened without following a final symbolic link and without blocking (a FIFO would
    otherwise hang the open), then checked on that descriptor's ``fstat``: a regular file,
    and with ``private``, readable and writable by its owner only.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    if private:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise NoInputError(f"{what} {path} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP and private:
            raise DataError(f"{what} {path} is a symbolic link; give the file itself") from None
        raise NoInputError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise NoInputError(f"{what} {path} is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"{what} {path} is not a regular file")
        if private and info.st_mode & 0o077:
            raise InsecureFileError(
                f"{what} {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {path}"
            )
        chunks = []
        size = 0
        while size <= _MAX_FILE_SIZE:
            chunk = os.read(fd, _MAX_FILE_SIZE + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise NoInputError(f"cannot read {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if size > _MAX_FILE_SIZE:
        raise DataError(f"{what} {path} is too large to be one")
    return b"".join(chunks)


def _read_json(path: Path, what: str, *, private: bool = False) -> dict[str, object]:
    raw = _read_file(path, what, private=private)
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{what} {path} is not valid JSON: {exc}") from None
    except DataError as exc:
        # Two values for one key: a reader keeping the last and one keeping the first
        # would disagree (an Ansible check against the loader, say); take neither.
        raise DataError(f"{what} {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise DataError(f"{what} {path} is not a JSON object")
    return doc


def _key_field(doc: Mapping[str, object], name: str, path: Path, what: str) -> bytes:
    if name not in doc:
        raise DataError(f'{what} {path} has no "{name}"')
    key = b64url_decode(doc[name], f'"{name}" in {path}')
    if len(key) != KEY_LEN:
        raise DataError(f'"{name}" in {path} must be {KEY_LEN} bytes, not {len(key)}')
    return key


# -- identity ---------------------------------------------------------------------------------


def _pretty(doc: IdentityDocument | TicketDocument) -> str:
    """JSON exactly as the original writes its files (serde_json's ``to_string_pretty``):
    two-space indent, fields in declaration order, UTF-8 unescaped, no final newline."""
    return json.dumps(doc, indent=2, ensure_ascii=False)


def identity_text(identity: SigningKey) -> str:
    """The identity file's content, byte for byte as the original's ``stmgr gen-ident``."""
    doc: IdentityDocument = {"privateKey": b64url_encode(bytes(identity))}
    return _pretty(doc)


def generate_identity(path: Path) -> SigningKey:
    """Write a new identity to ``path`` (mode 0600, never overwriting) and return it."""
    identity = SigningKey.generate()
    _write_new(Path(path), identity_text(identity), 0o600)
    return identity


def load_identity(path: Path, *, check_permissions: bool = True) -> SigningKey:
    """Read an identity file; with ``check_permissions``, refuse one that others may read
    and one reached through a symbolic link (checked on the opened file itself)."""
    path = Path(path)
    try:
        doc = _read_json(path, "identity file", private=check_permissions)
    except InsecureFileError:
        _refuse_ticket_as_identity(path)
        raise
    if "privateKey" not in doc and "publicKey" in doc:
        _refuse_ticket_as_identity(path)
    return SigningKey(_key_field(doc, "privateKey", path, "identity file"))


def _refuse_ticket_as_identity(path: Path) -> None:
    """A relay ticket given where the identity belongs gets an error that says so."""
    try:
        doc = _read_json(path, "identity file")
    except (DataError, NoInputError):
        return
    if "privateKey" not in doc and "publicKey" in doc and "address" in doc:
        raise DataError(
            f"{path} is a relay ticket (public key and address), not an identity; "
            "give the identity file (the one made by stmgr gen-ident, e.g. relay.ident)"
        )


# -- ticket -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ticket:
    """A relay's public key and the address nodes dial to reach it."""

    public_key: bytes
    address: str


def split_host_port(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` into a host (IPv6 without brackets) and a port.

    The rules are the original node's (Rust's ``ToSocketAddrs`` for a string): an IP socket
    address, or else everything before the last colon is a host name for the resolver, so a
    name such as ``relay_1.lan`` or an unbracketed IPv6 address works. What is refused here
    is what no node can dial; each error says why.
    """
    if not isinstance(address, str) or not address:
        raise UsageError("address is empty; expected HOST:PORT")
    size = len(address.encode("utf-8"))
    if size > MAX_ADDRESS_LEN:
        raise UsageError(
            f"address is {size} bytes; an Offset address holds at most {MAX_ADDRESS_LEN}"
        )
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/]*)", address)
    if scheme:
        raise UsageError(
            f"invalid address {address!r}: nodes dial HOST:PORT, not a URL; "
            f"drop {scheme.group(1)}:// and any path (HOST:PORT, IPv6 as [2001:db8::1]:4567)"
        )
    bad = next((c for c in address if c.isspace() or not c.isprintable()), None)
    if bad is not None:
        raise UsageError(f"invalid address {address!r}: it contains {bad!r}")
    if address.startswith("["):
        end = address.find("]")
        if end < 0 or address[end + 1 : end + 2] != ":":
            raise UsageError(f"invalid address {address!r}; expected [IPV6]:PORT")
        host, port_text = address[1:end], address[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UsageError(f"invalid IPv6 address {host!r} in {address!r}") from None
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep:
            raise UsageError(f"invalid address {address!r}: no port; expected HOST:PORT")
        if not host:
            raise UsageError(f"invalid address {address!r}: no host; expected HOST:PORT")
        if ":" in host:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise UsageError(
                    f"invalid address {address!r}; put an IPv6 address in brackets: "
                    "[2001:db8::1]:4567"
                ) from None
        elif re.fullmatch(r"[0-9.]+", host) and not _inet_aton(host):
            raise UsageError(f"invalid address {address!r}: {host!r} is not an IPv4 address")
    # Rust's u16 parser, which the original uses, also takes a leading "+".
    digits = port_text[1:] if port_text.startswith("+") else port_text
    if not digits.isascii() or not digits.isdigit() or not 1 <= int(digits) <= 65535:
        raise UsageError(f"invalid port {port_text!r} in {address!r}; expected 1-65535")
    return host, int(digits)


def _inet_aton(host: str) -> bytes | None:
    """The IPv4 address the resolver reads in ``host`` (also ``10.1`` forms), if any."""
    try:
        return socket.inet_aton(host)
    except OSError:
        return None


def _host_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address a host stands for without asking DNS, if it is one."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    packed = _inet_aton(host) if re.fullmatch(r"[0-9A-Fa-fXx.]+", host) else None
    return ipaddress.IPv4Address(packed) if packed is not None else None


def validate_address(address: str) -> str:
    """Return ``address`` if nodes can dial it as given, else raise :class:`UsageError`."""
    host, _port = split_host_port(address)
    ip = _host_address(host)
    if ip is not None and ip.is_unspecified:
        raise UsageError(
            f"invalid address {address!r}: {host} means 'every local address' to a listening "
            "socket; no node can dial it. Give the relay's public name or address"
        )
    return address


def address_warnings(address: str) -> list[str]:
    """Why nodes elsewhere may be unable to dial a valid ``address`` (no DNS is asked)."""
    host, _port = split_host_port(address)
    name = host.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return [f"{host} is this machine: only nodes on this machine can dial {address}"]
    ip = _host_address(host)
    if ip is None:
        return []
    if ip.is_loopback:
        return [f"{host} is a loopback address: only nodes on this machine can dial {address}"]
    if not ip.is_global:
        return [
            f"{host} is a private or reserved address: nodes on the Internet cannot dial "
            f"{address}; give the relay's public name or address"
        ]
    return []


def ticket_text(ticket: Ticket) -> str:
    """The ticket file's content, with the exact key names the Offset app imports."""
    doc: TicketDocument = {
        "publicKey": b64url_encode(ticket.public_key),
        "address": ticket.address,
    }
    return _pretty(doc)


def write_ticket(path: Path, ticket: Ticket) -> None:
    """Write a ticket (mode 0644: it is public), never overwriting."""
    _write_new(Path(path), ticket_text(ticket), 0o644)


def load_ticket(path: Path) -> Ticket:
    """Read and check a ticket file."""
    path = Path(path)
    doc = _read_json(path, "ticket")
    key = _key_field(doc, "publicKey", path, "ticket")
    address = doc.get("address")
    if not isinstance(address, str):
        raise DataError(f'ticket {path} has no "address" string')
    try:
        validate_address(address)
    except UsageError as exc:
        raise DataError(f"ticket {path}: {exc}") from None
    return Ticket(key, address)
