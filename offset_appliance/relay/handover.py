"""Hand-over across restarts through systemd's file descriptor store.

On stop, a relay run by systemd gives the service manager its listening sockets, the socket
of every live connection and a sealed memfd holding the state of each (``FDSTORE=1``,
``FDNAME=listen|conn|state``); the next start takes them back (``LISTEN_FDS``,
``LISTEN_FDNAMES``) and carries on, so a peer sees a pause, not a close. The listening
sockets are also stored at start-up, so that after a crash connects wait in the backlog.

The state is a versioned container: ``MAGIC``, a 4-byte version, the length of a JSON
document, the document, then a blob area holding every byte string the document refers to
as ``{"$b": [offset, length]}``. It holds channel keys: it only ever lives in memory (a
memfd sealed against every change) and is never logged (docs/SECURITY.md).

What systemd 252 (Debian bookworm) does with the store is in README.md, "Restarts and
upgrades".
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import select
import socket
from collections.abc import Sequence

from ..config import Config, carried_config, config_from_carried
from ..errors import ConfigError
from .relay import Relay, close_quietly, socket_address
from .state import READABLE, VERSION, RelayState, StateError

log = logging.getLogger("strelay")

MAGIC = b"OFFRELAY"
FORMAT_VERSION = VERSION
_HEADER = len(MAGIC) + 4 + 8
# The kernel passes at most SCM_MAX_FD (253) descriptors in one message.
FDS_PER_MESSAGE = 250
SD_LISTEN_FDS_START = 3
BARRIER_TIMEOUT = 5.0
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE

NAME_LISTEN = "listen"
NAME_CONN = "conn"
NAME_STATE = "state"


# ---- the container ---------------------------------------------------------------------


def pack_state(document: object, version: int = FORMAT_VERSION) -> bytes:
    """The versioned container holding ``document`` (JSON types and bytes)."""
    blobs: list[bytes] = []
    offset = 0

    def encode(value: object) -> object:
        nonlocal offset
        if isinstance(value, bytes):
            ref = {"$b": [offset, len(value)]}
            blobs.append(value)
            offset += len(value)
            return ref
        if isinstance(value, dict):
            return {key: encode(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [encode(item) for item in value]
        return value

    text = json.dumps(encode(document), separators=(",", ":"), allow_nan=False).encode()
    header = MAGIC + version.to_bytes(4, "big") + len(text).to_bytes(8, "big")
    return b"".join([header, text, *blobs])


def unpack_state(data: bytes) -> object:
    """The document of a container; ``StateError`` if it is not one this code reads."""
    return unpack_versioned(data)[1]


def unpack_versioned(data: bytes) -> tuple[int, object]:
    """The version and document of a container; ``StateError`` if it is not one this code
    reads (this version's, or the one before)."""
    if len(data) < _HEADER or data[: len(MAGIC)] != MAGIC:
        raise StateError("not a relay hand-over state")
    version = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 4], "big")
    if version not in READABLE:
        shown = " and ".join(map(str, READABLE))
        raise StateError(f"hand-over state version {version}, this relay reads {shown}")
    length = int.from_bytes(data[len(MAGIC) + 4 : _HEADER], "big")
    if length > len(data) - _HEADER:
        raise StateError("hand-over state truncated")
    blob_area = memoryview(data)[_HEADER + length :]
    try:
        document = json.loads(data[_HEADER : _HEADER + length])
    except ValueError:
        raise StateError("hand-over state document unreadable") from None

    def decode(value: object) -> object:
        if isinstance(value, dict):
            if value.keys() == {"$b"}:
                start, size = value["$b"]
                if not (isinstance(start, int) and isinstance(size, int)) or start < 0:
                    raise StateError("hand-over state refers to bytes it does not hold")
                if size < 0 or start + size > len(blob_area):
                    raise StateError("hand-over state refers to bytes it does not hold")
                return bytes(blob_area[start : start + size])
            return {key: decode(item) for key, item in value.items()}
        if isinstance(value, list):
            return [decode(item) for item in value]
        return value

    try:
        return version, decode(document)
    except (TypeError, ValueError) as exc:
        raise StateError(f"hand-over state unreadable: {exc}") from None


# ---- memfd -------------------------------------------------------------------------------


def sealed_memfd(data: bytes) -> int:
    """A memfd holding ``data``, sealed so nobody can change, grow or shrink it."""
    fd = os.memfd_create("offset-relay-state", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_sealed(fd: int) -> bytes:
    """The content of a memfd, refused (``StateError``) unless it is sealed as we seal it."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise StateError("hand-over state is not a sealed memfd") from None
    if seals & SEALS != SEALS:
        raise StateError("hand-over state is not sealed against change")
    size = os.fstat(fd).st_size
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(size - offset, 1 << 24), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


# ---- talking to the service manager ------------------------------------------------------


class ServiceManager:
    """sd_notify with descriptors (``socket.send_fds``), and ``BARRIER=1``."""

    def __init__(self, address: str) -> None:
        if address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address

    @classmethod
    def from_environment(cls) -> ServiceManager | None:
        """The service manager of this process, or None when not run by one."""
        address = os.environ.get("NOTIFY_SOCKET")
        return cls(address) if address else None

    def send(self, message: str, fds: Sequence[int] = ()) -> None:
        """One notification, with up to ``FDS_PER_MESSAGE`` descriptors; raises OSError."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(self.address)
            if fds:
                socket.send_fds(sock, [message.encode()], list(fds))
            else:
                sock.send(message.encode())

    def store(self, name: str, fds: Sequence[int]) -> None:
        """Put ``fds`` in the store under ``name``, in as many messages as it takes."""
        for start in range(0, len(fds), FDS_PER_MESSAGE):
            self.send(f"FDSTORE=1\nFDNAME={name}", fds[start : start + FDS_PER_MESSAGE])

    def remove(self, name: str) -> None:
        """Take every descriptor named ``name`` out of the store (it closes its copies)."""
        self.send(f"FDSTOREREMOVE=1\nFDNAME={name}")

    def barrier(self, timeout: float = BARRIER_TIMEOUT) -> bool:
        """Wait until the service manager has handled every message sent before."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            self.send("BARRIER=1", [write_end])
            os.close(write_end)
            write_end = -1
            poller = select.poll()
            poller.register(read_end, select.POLLHUP)
            return bool(poller.poll(int(timeout * 1000)))
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)


# ---- what a start inherits ---------------------------------------------------------------


class Inherited:
    """The descriptors a start got back from the store, sorted by name."""

    def __init__(self) -> None:
        self.listen: dict[tuple[str, int], socket.socket] = {}
        self.conns: dict[tuple[tuple[str, int], tuple[str, int]], socket.socket] = {}
        self.state_fds: list[int] = []
        self.unknown = 0

    @classmethod
    def from_environment(cls) -> Inherited:
        """Take ``LISTEN_FDS`` meant for this process (and unset them, as sd_listen_fds)."""
        inherited = cls()
        pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
        names = os.environ.get("LISTEN_FDNAMES", "").split(":")
        for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(variable, None)
        if not count or pid != str(os.getpid()):
            return inherited
        try:
            total = int(count)
        except ValueError:
            return inherited
        for index in range(total):
            fd = SD_LISTEN_FDS_START + index
            name = names[index] if index < len(names) else ""
            os.set_inheritable(fd, False)
            inherited.take(fd, name)
        return inherited

    def take(self, fd: int, name: str) -> None:
        """Sort one descriptor by its name (anything unexpected is closed)."""
        if name == NAME_STATE:
            self.state_fds.append(fd)
            return
        if name in (NAME_LISTEN, NAME_CONN):
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
                self.unknown += 1
                return
            local = socket_address(sock, False)
            if name == NAME_LISTEN and local is not None:
                self.listen[local] = sock
                return
            remote = socket_address(sock, True)
            if name == NAME_CONN and local is not None and remote is not None:
                self.conns[(local, remote)] = sock
                return
            sock.close()  # a connection reset while it was stored
            self.unknown += 1
            return
        os.close(fd)
        self.unknown += 1

    def carried_config(self) -> Config | None:
        """The configuration the previous process ran with, if the state handed over
        carries one that holds together (the state itself is read again by ``restore``)."""
        if len(self.state_fds) != 1:
            return None
        try:
            version, document = unpack_versioned(read_sealed(self.state_fds[0]))
            state, _failed = RelayState.from_document(document, version)
            return None if state.config is None else config_from_carried(state.config)
        except (StateError, ConfigError) as exc:
            log.debug("the hand-over carries no usable configuration: %s", exc)
            return None

    def take_listen(self, host: str, port: int) -> socket.socket | None:
        """The inherited listening socket bound to ``host``:``port``, if there is one."""
        if port == 0:
            return None
        sock = self.listen.pop((host, port), None)
        if sock is None and ":" in host:
            sock = self.listen.pop(
                (socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, host)), port),
                None,
            )
        return sock

    def close_rest(self) -> None:
        """Close whatever was not used (a connection after reading what waits in it, so
        that its peer sees a close, not a reset)."""
        for sock in self.conns.values():
            close_quietly(sock)
        for sock in self.listen.values():
            sock.close()
        for fd in self.state_fds:
            os.close(fd)
        self.listen.clear()
        self.conns.clear()
        self.state_fds.clear()


# ---- the relay's side --------------------------------------------------------------------


class Handover:
    """The relay's use of the store: what it stores at start-up, gives on stop and takes
    back on start. The state itself is the relay's (``Relay.export_state``, ``restore``)."""

    def __init__(self, manager: ServiceManager) -> None:
        self.manager = manager

    # ---- start-up ----------------------------------------------------------------------

    def started(self, relay: Relay, inherited: Inherited, now: float) -> None:
        """After binding: restore what was handed over, and keep the listening sockets in
        the store (so a crash restart finds them too)."""
        manager = self.manager
        try:
            # The store keeps a copy of each connection's socket: the copies must go before
            # a connection we do not restore is closed, or its peer would never see it.
            manager.remove(NAME_CONN)
            manager.remove(NAME_STATE)
            if inherited.listen:  # stored sockets no longer configured
                manager.remove(NAME_LISTEN)
            manager.store(NAME_LISTEN, [sock.fileno() for sock in relay.listeners.sockets])
            manager.barrier()
        except OSError as exc:
            log.warning("cannot use the service manager's descriptor store: %s", exc.strerror)
        if inherited.unknown:
            log.warning(
                "%d stored descriptors unusable (unnamed, or reset while stored): closed",
                inherited.unknown,
            )
        self.restore(relay, inherited, now)
        inherited.close_rest()

    def restore(self, relay: Relay, inherited: Inherited, now: float) -> int:
        """Serve again the connections handed over; returns how many came back.

        A connection whose record or socket is missing or does not fit is closed (its
        socket, and its part in the core, as if it had closed); one log line says how many.
        A state that does not hold together closes them all."""
        if not inherited.state_fds:
            if inherited.conns:
                log.warning(
                    "%d connections handed over without a state: closed", len(inherited.conns)
                )
            return 0
        sockets = inherited.conns
        offered = len(sockets)
        try:
            if len(inherited.state_fds) != 1:
                raise StateError(f"{len(inherited.state_fds)} hand-over states, expected one")
            version, document = unpack_versioned(read_sealed(inherited.state_fds[0]))
            state, failed = RelayState.from_document(document, version)
            restored, refused = relay.restore(state, sockets, now)
        except StateError as exc:
            log.warning("hand-over state unusable (%s): %d connections closed", exc, offered)
            return 0
        failed += refused
        for sock in sockets.values():
            close_quietly(sock)
        sockets.clear()
        closed = offered - restored
        if failed or closed:
            log.warning(
                "hand-over: %d connections restored, %d closed (%s)",
                restored,
                max(closed, len(failed)),
                failed[0] if failed else "socket or record missing",
            )
        else:
            log.info("hand-over: %d connections restored", restored)
        return restored

    # ---- stop --------------------------------------------------------------------------

    def hand_over(self, relay: Relay, now: float, config: Config | None = None) -> bool:
        """Give the store every connection and their state (and ``config``, the running
        configuration, for a start whose files do not load), then let go of them without
        closing them. False (nothing given) if the service manager refused."""
        clients = relay.handed_over()
        try:
            state = relay.export_state(now)
            if config is not None:
                state = dataclasses.replace(state, config=carried_config(config))
            state_fd = sealed_memfd(pack_state(state.to_document()))
        except (OSError, ValueError) as exc:
            log.error("cannot hand over (%s): closing every connection", exc)
            return False
        manager = self.manager
        try:
            manager.store(NAME_LISTEN, [sock.fileno() for sock in relay.listeners.sockets])
            manager.store(NAME_CONN, [client.sock.fileno() for client in clients])
            manager.store(NAME_STATE, [state_fd])
            if not manager.barrier():
                raise OSError(0, "the service manager did not answer")
        except OSError as exc:
            log.error("cannot hand over (%s): closing every connection", exc.strerror or exc)
            try:
                manager.remove(NAME_CONN)
                manager.remove(NAME_STATE)
            except OSError:
                pass
            return False
        finally:
            os.close(state_fd)
        relay.release()
        log.info("handed over %d connections to the service manager", len(clients))
        return True
