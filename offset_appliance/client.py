"""A blocking client of the relay protocol, over the same ``wire.Connection`` as the relay.

Used by ``stmgr probe``, the tests and the benchmarks::

    with RelayClient.open(("127.0.0.1", 4567), expected_key=ticket_key) as node:
        node.listen()
        peer = node.next_incoming()
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Sequence
from typing import TypedDict, Unpack

from nacl.signing import SigningKey

from .config import Limits, Timeouts
from .errors import OffsetError, ProtocolError
from .wire.connection import Connection, State
from .wire.messages import (
    Accept,
    Connect,
    IncomingConnection,
    Listen,
    RejectConnection,
    encode_init_connection,
)


class ClientError(OffsetError):
    """The relay could not be used (closed the connection, timed out, misbehaved)."""


class Unreachable(ClientError):
    """No TCP connection could be made to the relay."""


class ConnectionClosed(ClientError):
    """The relay closed the connection."""


class ConnectionSettings(TypedDict, total=False):
    """Settings of a client's ``wire.Connection`` that :meth:`RelayClient.open` passes on."""

    keepalive: float
    max_frame_length: int


class RelayClient:
    """One connection to a relay, driven synchronously; timers run while waiting to receive."""

    def __init__(
        self,
        sock: socket.socket,
        identity: SigningKey,
        *,
        expected_key: bytes | None = None,
        timeout: float = 10.0,
        keepalive: float = Timeouts.keepalive,
        max_frame_length: int = Limits.max_frame_length,
    ) -> None:
        self.sock = sock
        self.identity = identity
        self.timeout = timeout
        self.wire = Connection(
            identity,
            time.monotonic(),
            expected_peer=expected_key,
            keepalive=keepalive,
            conn_timeout=timeout,
            max_frame_length=max_frame_length,
        )
        self._inbox: list[bytes] = []
        self.closed = False
        self.handshake_seconds: float | None = None

    @classmethod
    def open(
        cls,
        address: tuple[str, int],
        identity: SigningKey | None = None,
        *,
        expected_key: bytes | None = None,
        timeout: float = 10.0,
        **kwargs: Unpack[ConnectionSettings],
    ) -> RelayClient:
        """Connect to ``address`` and complete the handshake (a fresh identity if none)."""
        started = time.monotonic()
        try:
            sock = socket.create_connection(address, timeout=timeout)
        except OSError as exc:
            raise Unreachable(f"cannot connect to {address[0]} port {address[1]}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = cls(
            sock,
            identity or SigningKey.generate(),
            expected_key=expected_key,
            timeout=timeout,
            **kwargs,
        )
        try:
            client._handshake(started + timeout)
        except BaseException:
            client.close()
            raise
        client.handshake_seconds = time.monotonic() - started
        return client

    def __enter__(self) -> RelayClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def public_key(self) -> bytes:
        """This client's identity public key."""
        return bytes(self.identity.verify_key)

    # ---- plumbing ----------------------------------------------------------------------

    def _flush(self) -> None:
        chunks = self.wire.data_to_send()
        if chunks:
            try:
                self.sock.sendall(b"".join(chunks))
            except OSError as exc:
                self.closed = True
                raise ConnectionClosed(f"send failed: {exc}") from exc

    def _pump(self, deadline: float) -> None:
        """Wait for input (running timers meanwhile) until something arrives or ``deadline``."""
        self._flush()
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise ClientError("timed out waiting for the relay")
            wake = min(deadline, self.wire.next_deadline())
            self.sock.settimeout(max(0.001, wake - now))
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                try:
                    self.wire.handle_timer(time.monotonic())
                except ProtocolError as exc:
                    self.closed = True
                    raise ClientError(str(exc)) from exc
                self._flush()
                continue
            except OSError as exc:
                self.closed = True
                raise ConnectionClosed(f"connection lost: {exc}") from exc
            if not data:
                self.closed = True
                raise ConnectionClosed("the relay closed the connection")
            now = time.monotonic()
            try:
                self._inbox.extend(self.wire.receive_data(data, now))
                # Timers run while data keeps arriving too: a client that only receives
                # still owes the relay a keepalive every half interval, or it is dropped.
                if now >= self.wire.next_deadline():
                    self.wire.handle_timer(now)
            except ProtocolError as exc:
                self.closed = True
                raise ClientError(f"protocol error: {exc}") from exc
            self._flush()
            return

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        if now < self.wire.next_deadline():
            return
        try:
            self.wire.handle_timer(now)
        except ProtocolError as exc:
            self.closed = True
            raise ClientError(str(exc)) from exc
        self._flush()

    def _handshake(self, deadline: float) -> None:
        while self.wire.state is not State.OPEN:
            self._pump(deadline)

    # ---- relay operations --------------------------------------------------------------

    def send(self, message: bytes) -> None:
        """Send one relay message (an InitConnection, a RejectConnection, or tunnel data)."""
        self.wire.send_message(message, time.monotonic())
        self._flush()

    def send_many(self, messages: list[bytes]) -> None:
        """Send several messages with one write (for throughput measurements)."""
        now = time.monotonic()
        for message in messages:
            self.wire.send_message(message, now)
        self._flush()

    def receive(self, timeout: float | None = None) -> bytes:
        """The next relay message (tunnel data, or a notification on a listen connection)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self._inbox:
            self._pump(deadline)
        return self._inbox.pop(0)

    @staticmethod
    def wait_any(clients: Sequence[RelayClient], timeout: float | None = None) -> RelayClient:
        """Read from all of ``clients`` (timers running) until one has a message waiting;
        returns that one. A client the relay closes raises its ``ConnectionClosed`` (and is
        marked ``closed``); they are read in the order given, so of two that were closed by
        the time of a read, the first given raises."""
        deadline = time.monotonic() + (clients[0].timeout if timeout is None else timeout)
        for client in clients:
            client._flush()
        while True:
            for client in clients:
                if client._inbox:
                    return client
            now = time.monotonic()
            if now >= deadline:
                raise ClientError("timed out waiting for the relay")
            wake = min(deadline, *(client.wire.next_deadline() for client in clients))
            ready, _, _ = select.select(
                [client.sock for client in clients], [], [], max(0.0, wake - now)
            )
            for client in clients:
                if client.sock in ready:
                    client._pump(deadline)  # one read, of what is there already
                else:
                    client._run_due_timers()

    def listen(self) -> None:
        """Become the listener for our key."""
        self.send(encode_init_connection(Listen()))

    def connect(self, listener_key: bytes) -> None:
        """Ask for a tunnel to a listening key; data may be sent right away."""
        self.send(encode_init_connection(Connect(listener_key)))

    def accept(self, connector_key: bytes) -> None:
        """On a new connection with the listener's identity: accept a pending connect."""
        self.send(encode_init_connection(Accept(connector_key)))

    def reject(self, connector_key: bytes) -> None:
        """On the listen connection: refuse a pending connect."""
        self.send(RejectConnection(connector_key).encode())

    def next_incoming(self, timeout: float | None = None) -> bytes:
        """On the listen connection: the key of the next node that wants a tunnel."""
        return IncomingConnection.decode(self.receive(timeout)).public_key

    def wait_closed(self, timeout: float | None = None) -> list[bytes]:
        """Read until the relay closes the connection; returns messages received meanwhile."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        received = []
        try:
            while True:
                self._pump(deadline)
                received.extend(self._inbox)
                self._inbox.clear()
        except ConnectionClosed:
            received.extend(self._inbox)
            self._inbox.clear()
            return received

    def close(self) -> None:
        """Close the TCP connection."""
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass
