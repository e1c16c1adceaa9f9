"""A load for restarts: tunnels streaming checksummed data both ways and idle listeners that
keep the original node's keepalive rule, all through one relay, in one selectors thread.

Every tunnel end sends numbered messages whose content is derived from (tunnel, direction,
number); the other end checks each arrives once, in order, intact. Each peer notes the
longest silence it saw (the pause), per phase, and whether anything closed. The idle
listeners hear only keepalives: as the original node, they count only KaMessages (not
Rekey frames) and would close after ``KEEPALIVE`` seconds without one.
"""

from __future__ import annotations

import hashlib
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

from nacl.signing import SigningKey

from offset_appliance.wire.connection import KEEPALIVE_INTERVAL, Connection, State
from offset_appliance.wire.messages import (
    Accept,
    Connect,
    IncomingConnection,
    Listen,
    encode_init_connection,
)

KEEPALIVE = 32.0  # the original's: no KaMessage for this long closes the connection
MESSAGE_SIZE = 1024
SEND_INTERVAL = 0.1  # each tunnel end sends one message this often
BULK_WINDOW = 1 << 16  # a bulk end keeps this many bytes waiting for its socket
BULK_BURST = 64  # and sends at most this many messages a turn


def payload(tunnel: int, direction: int, number: int) -> bytes:
    """Message ``number`` of a direction of a tunnel: the number, then derived bytes."""
    seed = hashlib.sha256(f"{tunnel}/{direction}/{number}".encode()).digest()
    return number.to_bytes(8, "big") + (seed * (MESSAGE_SIZE // 32 + 1))[: MESSAGE_SIZE - 8]


class _Counting:
    """Wraps a secure channel to see which frames carried a KaMessage (not a Rekey)."""

    def __init__(self, channel, peer: Peer) -> None:
        self._channel = channel
        self._peer = peer

    def open(self, frame: bytes):
        user = self._channel.open(frame)
        if user is not None:
            self._peer.last_ka = time.monotonic()
        return user

    def __getattr__(self, name: str):
        return getattr(self._channel, name)


@dataclass(eq=False)
class Peer:
    """One connection to the relay."""

    name: str
    identity: SigningKey
    sock: socket.socket
    wire: Connection
    tunnel: int = -1
    direction: int = 0
    sent: int = 0
    expected: int = 0
    bad: list[str] = field(default_factory=list)
    inbox: list[bytes] = field(default_factory=list)
    closed: str | None = None
    closed_at: float = 0.0  # when it saw the close (monotonic)
    last_heard: float = 0.0
    last_ka: float = 0.0
    longest_ka_gap: float = 0.0
    pauses: dict[str, float] = field(default_factory=dict)
    pending: bytes = b""
    counting: bool = False
    bulk: bool = False


class Load:
    """Tunnels and idle listeners against a relay at ``address`` with ``relay_key``; the
    peers send a keepalive after half of ``keepalive`` seconds without a message."""

    def __init__(
        self, address: tuple[str, int], relay_key: bytes, keepalive: float = KEEPALIVE_INTERVAL
    ) -> None:
        self.address = address
        self.relay_key = relay_key
        self.keepalive = keepalive
        self.selector = selectors.DefaultSelector()
        self.peers: list[Peer] = []
        self.ends: list[tuple[Peer, Peer]] = []
        self.idle: list[Peer] = []
        self.bulk: list[Peer] = []
        self.phase = "setup"
        self.sending = False
        self._stop = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ---- set-up (before the thread runs) ---------------------------------------------

    def _connect(self, name: str, identity: SigningKey) -> Peer:
        sock = socket.create_connection(self.address, timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        now = time.monotonic()
        wire = Connection(identity, now, expected_peer=self.relay_key, keepalive=self.keepalive)
        peer = Peer(name, identity, sock, wire, last_heard=now, last_ka=now)
        self.peers.append(peer)
        self.selector.register(sock, selectors.EVENT_READ, peer)
        return peer

    def _settle(self, until, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                raise AssertionError("the load's set-up did not finish")
            self._turn(0.05)
        for peer in self.peers:
            if peer.closed:
                raise AssertionError(f"{peer.name} closed during set-up: {peer.closed}")

    def _open(self, peers: list[Peer]) -> None:
        self._settle(lambda: all(p.wire.state is State.OPEN or p.closed for p in peers))
        for peer in peers:
            if not peer.counting and peer.wire._channel is not None:
                peer.wire._channel = _Counting(peer.wire._channel, peer)  # type: ignore
                peer.counting = True

    def set_up(self, tunnels: int, idle: int, batch: int = 25) -> None:
        """Open ``idle`` idle listeners and ``tunnels`` tunnels (listen, connect, accept)."""
        for start in range(0, idle, batch):
            made = [
                self._connect(f"idle{n}", SigningKey.generate())
                for n in range(start, min(idle, start + batch))
            ]
            self._open(made)
            for peer in made:
                self._send(peer, encode_init_connection(Listen()))
            self.idle += made
        for start in range(0, tunnels, batch):
            numbers = range(start, min(tunnels, start + batch))
            owners = {n: SigningKey.generate() for n in numbers}
            listeners = {n: self._connect(f"listen{n}", owners[n]) for n in numbers}
            self._open(list(listeners.values()))
            for peer in listeners.values():
                self._send(peer, encode_init_connection(Listen()))
            self._turn(0.05)
            connectors = {n: self._connect(f"connect{n}", SigningKey.generate()) for n in numbers}
            self._open(list(connectors.values()))
            for n, peer in connectors.items():
                self._send(peer, encode_init_connection(Connect(bytes(owners[n].verify_key))))
            waiting = list(listeners.values())
            self._settle(lambda waiting=waiting: all(p.inbox for p in waiting))
            acceptors = {n: self._connect(f"accept{n}", owners[n]) for n in numbers}
            self._open(list(acceptors.values()))
            for n, peer in acceptors.items():
                key = bytes(connectors[n].identity.verify_key)
                assert listeners[n].inbox.pop() == IncomingConnection(key).encode()
                self._send(peer, encode_init_connection(Accept(key)))
                connectors[n].tunnel = acceptors[n].tunnel = n
                connectors[n].direction, acceptors[n].direction = 0, 1
                self.ends.append((connectors[n], acceptors[n]))
            self.idle += listeners.values()
        self._turn(0.2)

    def open_peer(self, name: str, identity: SigningKey, first: bytes) -> Peer:
        """One connection as ``identity`` that sends ``first`` (an encoded InitConnection)
        once its channel is open (before ``start``)."""
        peer = self._connect(name, identity)
        self._open([peer])
        self._send(peer, first)
        return peer

    def settle(self, until, timeout: float = 60.0) -> None:
        """Serve the peers until ``until()`` (before ``start``); fail if one closes."""
        self._settle(until, timeout)

    def add_bulk_end(self, peer: Peer, tunnel: int, direction: int) -> None:
        """Make ``peer`` end ``direction`` of tunnel ``tunnel``, whose other end may be in
        another process: it sends numbered messages as fast as its socket takes them."""
        peer.tunnel, peer.direction, peer.bulk = tunnel, direction, True
        self.bulk.append(peer)

    # ---- running ---------------------------------------------------------------------

    def start(self) -> None:
        """Start streaming, in a thread of its own."""
        now = time.monotonic()
        for peer in self.peers:
            peer.last_heard = now
        self.sending = True
        self._thread = threading.Thread(target=self._run, name="restart-load", daemon=True)
        self._thread.start()

    def mark(self, phase: str) -> None:
        """Pauses seen from now on count under ``phase``."""
        with self._lock:
            self.phase = phase

    def finish(self, timeout: float = 60.0) -> None:
        """Stop sending, wait for every message sent to arrive, stop the thread."""
        self.sending = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(a.sent == b.expected and b.sent == a.expected for a, b in self.ends) or any(
                p.closed for p in self.peers
            ):
                break
            time.sleep(0.1)
        self._stop = True
        if self._thread is not None:
            self._thread.join(10)

    def close(self) -> None:
        self._stop = True  # its thread, if still running, stops before the selector goes
        if self._thread is not None:
            self._thread.join(10)
        for peer in self.peers:
            peer.sock.close()
        self.selector.close()

    def _run(self) -> None:
        next_send = time.monotonic()
        while not self._stop:
            now = time.monotonic()
            if self.sending and now >= next_send:
                for a, b in self.ends:
                    for peer in (a, b):
                        if not peer.closed:
                            self._send(peer, payload(peer.tunnel, peer.direction, peer.sent))
                            peer.sent += 1
                next_send = now + SEND_INTERVAL
            bulk = self.sending and self.bulk
            if bulk:
                # A burst a turn: a socket that takes all must not starve the other peers'
                # keepalives.
                for peer in self.bulk:
                    for _ in range(BULK_BURST):
                        if peer.closed or len(peer.pending) >= BULK_WINDOW:
                            break
                        self._send(peer, payload(peer.tunnel, peer.direction, peer.sent))
                        peer.sent += 1
            wait = 0.002 if bulk else max(0.0, min(0.05, next_send - time.monotonic()))
            self._turn(wait)

    def _turn(self, wait: float) -> None:
        for key, _ in self.selector.select(wait):
            self._read(key.data)
        now = time.monotonic()
        for peer in self.peers:
            if peer.closed:
                continue
            if peer.counting and now - peer.last_ka > peer.longest_ka_gap:
                peer.longest_ka_gap = now - peer.last_ka
                if peer.longest_ka_gap > KEEPALIVE:
                    self._lost(peer, "no KaMessage for the original's keepalive time")
                    continue
            try:
                peer.wire.handle_timer(now)
            except Exception as exc:  # a timeout of ours is a failure of the relay's
                self._lost(peer, f"timer: {exc}")
                continue
            self._write(peer)

    def _send(self, peer: Peer, message: bytes) -> None:
        peer.wire.send_message(message, time.monotonic())
        self._write(peer)

    def _write(self, peer: Peer) -> None:
        peer.pending += b"".join(peer.wire.data_to_send())
        if not peer.pending:
            return
        try:
            sent = peer.sock.send(peer.pending)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._lost(peer, f"send: {exc}")
            return
        peer.pending = peer.pending[sent:]

    def _read(self, peer: Peer) -> None:
        try:
            data = peer.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(peer, f"receive: {exc}")
            return
        if not data:
            self._lost(peer, "closed by the relay")
            return
        now = time.monotonic()
        gap = now - peer.last_heard
        with self._lock:
            phase = self.phase
        if gap > peer.pauses.get(phase, 0.0):
            peer.pauses[phase] = gap
        peer.last_heard = now
        try:
            messages = peer.wire.receive_data(data, now)
        except Exception as exc:
            self._lost(peer, f"protocol: {exc}")
            return
        for message in messages:
            if peer.tunnel < 0:
                peer.inbox.append(message)
                continue
            expected = payload(peer.tunnel, 1 - peer.direction, peer.expected)
            if message != expected:
                number = int.from_bytes(message[:8], "big")
                peer.bad.append(f"got message {number}, expected {peer.expected}")
            peer.expected += 1

    def _lost(self, peer: Peer, why: str) -> None:
        if peer.closed is None:
            peer.closed = why
            peer.closed_at = time.monotonic()
            try:
                self.selector.unregister(peer.sock)
            except (KeyError, ValueError):
                pass

    # ---- results ---------------------------------------------------------------------

    def pauses(self, phase: str) -> list[float]:
        """The longest silence each tunnel end saw in ``phase``, sorted."""
        return sorted(p.pauses.get(phase, 0.0) for a, b in self.ends for p in (a, b))


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p99 and max of sorted ``values``."""
    if not values:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0}

    def at(q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))]

    return {"p50": at(0.5), "p99": at(0.99), "max": values[-1]}
