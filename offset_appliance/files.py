"""Identity and relay ticket files (PROTOCOL.md section 9), byte-compatible with the original."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import SigningKey

from .errors import CantCreateError, DataError, NoInputError, UsageError

KEY_LEN = 32
MAX_ADDRESS_LEN = 256
# An identity or ticket is a few dozen bytes; refuse to read anything absurd.
_MAX_FILE_SIZE = 64 * 1024
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class InsecureFileError(DataError):
    """A private key file that group or others may read or write."""


def b64url_encode(data: bytes) -> str:
    """Base64url without padding, as the original writes keys."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, what: str) -> bytes:
    """Base64url with or without padding; a :class:`DataError` naming ``what`` otherwise."""
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


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(_MAX_FILE_SIZE + 1)
    except FileNotFoundError:
        raise NoInputError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise NoInputError(f"{what} {path} is a directory") from None
    except OSError as exc:
        raise NoInputError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(raw) > _MAX_FILE_SIZE:
        raise DataError(f"{what} {path} is too large to be one")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{what} {path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise DataError(f"{what} {path} is not a JSON object")
    return doc


def _key_field(doc: dict, name: str, path: Path, what: str) -> bytes:
    if name not in doc:
        raise DataError(f'{what} {path} has no "{name}"')
    key = b64url_decode(doc[name], f'"{name}" in {path}')
    if len(key) != KEY_LEN:
        raise DataError(f'"{name}" in {path} must be {KEY_LEN} bytes, not {len(key)}')
    return key


# -- identity ---------------------------------------------------------------------------------


def identity_text(identity: SigningKey) -> str:
    """The identity file's content, pretty-printed JSON as the original writes it."""
    return json.dumps({"privateKey": b64url_encode(bytes(identity))}, indent=2) + "\n"


def generate_identity(path: Path) -> SigningKey:
    """Write a new identity to ``path`` (mode 0600, never overwriting) and return it."""
    identity = SigningKey.generate()
    _write_new(Path(path), identity_text(identity), 0o600)
    return identity


def load_identity(path: Path, *, check_permissions: bool = True) -> SigningKey:
    """Read an identity file; with ``check_permissions``, refuse one that others may read."""
    path = Path(path)
    if check_permissions:
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise NoInputError(f"identity file {path} does not exist") from None
        except OSError as exc:
            raise NoInputError(f"cannot read identity file {path}: {exc.strerror}") from None
        if stat.S_ISREG(mode) and mode & 0o077:
            raise InsecureFileError(
                f"identity file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
            )
    doc = _read_json(path, "identity file")
    return SigningKey(_key_field(doc, "privateKey", path, "identity file"))


# -- ticket -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ticket:
    """A relay's public key and the address nodes dial to reach it."""

    public_key: bytes
    address: str


def split_host_port(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (IPv6 in brackets) into a host without brackets and a port."""
    if not isinstance(address, str) or not address:
        raise UsageError("address is empty; expected HOST:PORT")
    if len(address) > MAX_ADDRESS_LEN:
        raise UsageError(f"address is longer than {MAX_ADDRESS_LEN} characters")
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
        if not sep or not host:
            raise UsageError(f"invalid address {address!r}; expected HOST:PORT")
        if ":" in host:
            raise UsageError(f"invalid address {address!r}; put an IPv6 address in brackets")
        if not _valid_host(host):
            raise UsageError(f"invalid host {host!r} in {address!r}")
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise UsageError(f"invalid port {port_text!r} in {address!r}; expected 1-65535")
    return host, int(port_text)


def _valid_host(host: str) -> bool:
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    name = host[:-1] if host.endswith(".") else host
    return bool(name) and len(name) <= 253 and all(_LABEL.match(p) for p in name.split("."))


def validate_address(address: str) -> str:
    """Return ``address`` if nodes can dial it as given, else raise :class:`UsageError`."""
    split_host_port(address)
    return address


def ticket_text(ticket: Ticket) -> str:
    """The ticket file's content, with the exact key names the Offset app imports."""
    doc = {"publicKey": b64url_encode(ticket.public_key), "address": ticket.address}
    return json.dumps(doc, indent=2) + "\n"


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
