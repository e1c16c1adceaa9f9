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

import fcntl
import itertools
import json
import logging
import os
import select
import selectors
import socket
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from ..errors import CloseReason
from ..wire.connection import Connection, State
from .clients import Client

if TYPE_CHECKING:
    from .server import RelayServer

log = logging.getLogger("strelay")

MAGIC = b"OFFRELAY"
FORMAT_VERSION = 1
_HEADER = len(MAGIC) + 4 + 8
# The kernel passes at most SCM_MAX_FD (253) descriptors in one message.
FDS_PER_MESSAGE = 250
SD_LISTEN_FDS_START = 3
BARRIER_TIMEOUT = 5.0
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE

NAME_LISTEN = "listen"
NAME_CONN = "conn"
NAME_STATE = "state"


class StateError(ValueError):
    """A hand-over state this code cannot read."""


# ---- the container ---------------------------------------------------------------------


def pack_state(document: object) -> bytes:
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
    header = MAGIC + FORMAT_VERSION.to_bytes(4, "big") + len(text).to_bytes(8, "big")
    return b"".join([header, text, *blobs])


def unpack_state(data: bytes) -> object:
    """The document of a container; ``StateError`` if it is not one this code writes."""
    if len(data) < _HEADER or data[: len(MAGIC)] != MAGIC:
        raise StateError("not a relay hand-over state")
    version = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 4], "big")
    if version != FORMAT_VERSION:
        raise StateError(f"hand-over state version {version}, this relay reads {FORMAT_VERSION}")
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
        return decode(document)
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


def close_quietly(sock: socket.socket, limit: int = 1 << 22) -> None:
    """Close a connection with a FIN: the kernel answers a close with unread bytes waiting
    with a reset, so read (and drop) up to ``limit`` bytes first."""
    try:
        sock.setblocking(False)
        while limit > 0:
            data = sock.recv(min(limit, 1 << 16))
            if not data:
                break
            limit -= len(data)
    except OSError:
        pass
    sock.close()


def _address(sock: socket.socket, peer: bool) -> tuple[str, int] | None:
    try:
        address = sock.getpeername() if peer else sock.getsockname()
    except OSError:
        return None
    return (address[0], address[1])


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
            local = _address(sock, False)
            if name == NAME_LISTEN and local is not None:
                self.listen[local] = sock
                return
            remote = _address(sock, True)
            if name == NAME_CONN and local is not None and remote is not None:
                self.conns[(local, remote)] = sock
                return
            sock.close()  # a connection reset while it was stored
            self.unknown += 1
            return
        os.close(fd)
        self.unknown += 1

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


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            return file.read().strip()
    except OSError:
        return ""


class Handover:
    """The relay's use of the store: what it stores at start-up, gives on stop and takes
    back on start."""

    def __init__(self, manager: ServiceManager) -> None:
        self.manager = manager

    # ---- start-up ----------------------------------------------------------------------

    def started(self, server: RelayServer, inherited: Inherited) -> None:
        """After ``bind``: restore what was handed over, and keep the listening sockets in
        the store (so a crash restart finds them too)."""
        manager = self.manager
        try:
            # The store keeps a copy of each connection's socket: the copies must go before
            # a connection we do not restore is closed, or its peer would never see it.
            manager.remove(NAME_CONN)
            manager.remove(NAME_STATE)
            if inherited.listen:  # stored sockets no longer configured
                manager.remove(NAME_LISTEN)
            manager.store(NAME_LISTEN, [sock.fileno() for sock in server.listen_sockets])
            manager.barrier()
        except OSError as exc:
            log.warning("cannot use the service manager's descriptor store: %s", exc.strerror)
        if inherited.unknown:
            log.warning(
                "%d stored descriptors unusable (unnamed, or reset while stored): closed",
                inherited.unknown,
            )
        self.restore(server, inherited)
        inherited.close_rest()

    def restore(self, server: RelayServer, inherited: Inherited) -> int:
        """Serve again the connections handed over; returns how many came back."""
        if not inherited.state_fds:
            if inherited.conns:
                log.warning(
                    "%d connections handed over without a state: closed", len(inherited.conns)
                )
            return 0
        try:
            if len(inherited.state_fds) != 1:
                raise StateError(f"{len(inherited.state_fds)} hand-over states, expected one")
            document = unpack_state(read_sealed(inherited.state_fds[0]))
            return restore_server(server, document, inherited.conns)
        except StateError as exc:
            log.warning(
                "hand-over state unusable (%s): %d connections closed", exc, len(inherited.conns)
            )
            return 0

    # ---- stop --------------------------------------------------------------------------

    def hand_over(self, server: RelayServer) -> bool:
        """Give the store every connection and their state, then let go of them without
        closing them. False (nothing given) if the service manager refused."""
        now = server.clock()
        clients = [c for c in server.clients.values() if c.wire.state is not State.CLOSED]
        try:
            document = export_server(server, clients, now)
            state_fd = sealed_memfd(pack_state(document))
        except (OSError, ValueError) as exc:
            log.error("cannot hand over (%s): closing every connection", exc)
            return False
        manager = self.manager
        try:
            manager.store(NAME_LISTEN, [sock.fileno() for sock in server.listen_sockets])
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
        release(server)
        log.info("handed over %d connections to the service manager", len(clients))
        return True


def release(server: RelayServer) -> None:
    """Let go of every socket without telling any peer (their copies are in the store)."""
    for sock in server.listen_sockets:
        sock.close()
    server.listen_sockets.clear()
    if server.metrics is not None:
        server.metrics.close()
        server.metrics = None
    for client in server.clients.values():
        if client.events:
            server.selector.unregister(client.sock)
            client.events = 0
        client.sock.close()
    server.clients.clear()
    server.core.actions.clear()
    server.admission.stop()


# ---- the server's state ------------------------------------------------------------------


def export_server(server: RelayServer, clients: Iterable[Client], now: float) -> dict:
    """The whole relay as plain data (secret: it holds every channel's keys)."""
    records = []
    for client in clients:
        local, remote = _address(client.sock, False), _address(client.sock, True)
        if local is None or remote is None:
            continue  # already reset: nothing to hand over
        out = b"".join([*client.out, *client.wire.data_to_send()])
        records.append(
            {
                "id": client.id,
                "local": list(local),
                "remote": list(remote),
                "wire": client.wire.export_state(now),
                "out": out,
                "paused": client.paused,
                "closing": client.close_reason.value if client.close_reason else None,
                "close_in": None if client.close_by == float("inf") else client.close_by - now,
                "recv_size": client.recv_size,
            }
        )
    return {
        "relay": server.public_key,
        "boot_id": _boot_id(),
        "monotonic": time.monotonic(),
        "core": server.core.export_state(now),
        "clients": records,
        # Transfer counts (budgets), newer than the state file's last save.
        "usage": server.bandwidth.usage_document(),
    }


def restore_server(
    server: RelayServer,
    document: object,
    sockets: dict[tuple[tuple[str, int], tuple[str, int]], socket.socket],
) -> int:
    """Serve the connections of ``document`` on their inherited ``sockets``.

    A connection whose record or socket is missing or does not fit is closed (its socket,
    and its part in the core, as if it had closed); one log line says how many. A state
    that does not hold together raises ``StateError`` and closes them all.
    """
    if not isinstance(document, dict):
        raise StateError("hand-over state is not a record")
    try:
        if document["relay"] != server.public_key:
            raise StateError("hand-over state of another relay identity")
        downtime = 0.0
        if document["boot_id"] and document["boot_id"] == _boot_id():
            # CLOCK_MONOTONIC is one clock for the whole system until the next boot.
            downtime = max(0.0, time.monotonic() - float(document["monotonic"]))
        records = list(document["clients"])
        core_state = document["core"]
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"hand-over state incomplete: {exc!r}") from None
    now = server.clock()
    restored: dict[int, Client] = {}
    failed: list[str] = []
    for record in records:
        try:
            client = _restore_client(server, record, sockets, now, downtime)
        except (KeyError, TypeError, ValueError) as exc:
            failed.append(str(exc))
            continue
        if client is not None:
            restored[client.id] = client
    opened = {cid for cid, c in restored.items() if not c.closing and c.wire.state is State.OPEN}
    try:
        server.core.restore_state(core_state, now, opened)
    except ValueError as exc:
        for client in restored.values():
            close_quietly(client.sock)
        raise StateError(f"relay state unusable: {exc}") from None
    unused = len(sockets)
    for sock in sockets.values():
        close_quietly(sock)
    sockets.clear()
    # Register what came back; connections the core does not know (and that are neither
    # closing nor in their handshake) cannot be placed: closed.
    for client in restored.values():
        server.clients[client.id] = client
        per_ip = server.admission.per_ip
        per_ip[client.source] = per_ip.get(client.source, 0) + 1
    for client in list(restored.values()):
        in_core = server.core.role(client.id) is not None
        if client.wire.state is not State.OPEN:
            server.admission.handshaking[client.id] = client
        elif not client.closing and not in_core:
            failed.append(f"connection {client.id} not in the relay state")
            server._close(client, CloseReason.SHUTDOWN)
            continue
        _watch(server, client)
        server.bandwidth.adopt(client, now)
    server.bandwidth.take_usage(document.get("usage"))
    server.stats.accepted += len(server.clients)
    server._ids = itertools.count(max(restored, default=0) + 1)
    if server.core.actions:
        server._drain()
    lost = len(records) - len(restored)
    if failed or unused or lost:
        log.warning(
            "hand-over: %d connections restored, %d closed (%s)",
            len(server.clients),
            len(failed) + unused + lost,
            failed[0] if failed else "socket or record missing",
        )
    else:
        log.info("hand-over: %d connections restored", len(server.clients))
    return len(server.clients)


def _restore_client(
    server: RelayServer,
    record: dict,
    sockets: dict[tuple[tuple[str, int], tuple[str, int]], socket.socket],
    now: float,
    downtime: float,
) -> Client | None:
    local, remote = record["local"], record["remote"]
    sock = sockets.pop(((local[0], local[1]), (remote[0], remote[1])), None)
    if sock is None:
        return None  # reset while stored, or never stored
    try:
        wire = Connection.restore_state(
            record["wire"],
            server.identity,
            now,
            downtime=downtime,
            max_frame_length=server.limits.max_frame_length,
        )
        cid = record["id"]
        if not isinstance(cid, int) or cid in server.clients:
            raise ValueError("connection id missing or taken")
        out = record["out"]
        if not isinstance(out, bytes):
            raise ValueError("output of the wrong type")
    except BaseException:
        close_quietly(sock)
        raise
    sock.setblocking(False)
    client = Client(cid, sock, remote[0], remote[1], wire)
    client.source = server.admission.prefixes(remote[0])
    client.started = now  # its debug close line counts from the hand-over
    if out:
        client.out.append(out)
        client.out_size = len(out)
    client.paused = int(record["paused"])
    if record["closing"] is not None:
        client.closing = True
        client.close_reason = CloseReason(record["closing"])
        client.close_by = now + float(record["close_in"])
    client.recv_size = int(record["recv_size"])
    return client


def _watch(server: RelayServer, client: Client) -> None:
    events = 0 if client.paused else selectors.EVENT_READ
    if client.out:
        events |= selectors.EVENT_WRITE
        server.output.dirty.add(client)
    server.output.set_events(client, events)
    server._schedule(client, min(client.wire.next_deadline(), client.close_by))
    if client.wire.backlog:
        # Frames received beyond its budget before the hand-over: served in the next turn.
        server._backlog[client.id] = client
