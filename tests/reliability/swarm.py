"""Many relay clients in one thread: non-blocking sockets, each driven by the sans-IO
``wire.Connection`` (or by raw bytes), multiplexed with ``selectors``.

The blocking ``RelayClient`` needs a thread per connection; the reliability scenarios open
thousands of connections at once, so they use this instead. Nothing here sleeps: callers run
the loop with ``poll`` or ``run_until`` and react in callbacks.
"""

from __future__ import annotations

import errno
import selectors
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from nacl.signing import SigningKey

from offset_appliance.errors import ProtocolError
from offset_appliance.wire.connection import Connection, State

RECV_SIZE = 256 * 1024
IOV_MAX = 1024
TIMER_SCAN = 0.2
# Lets connect() pick the source port, so thousands of sockets bound to one loopback address
# do not exhaust its ports on bind().
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

OutputFilter = Callable[[bytes], bytes]


class Session:
    """One client connection: its socket, its protocol stack (None for a raw session) and
    what happened to it."""

    def __init__(
        self,
        swarm: Swarm,
        sock: socket.socket,
        wire: Connection | None,
        identity: SigningKey | None,
    ) -> None:
        self.swarm = swarm
        self.sock = sock
        self.wire = wire
        self.identity = identity
        self.public_key = bytes(identity.verify_key) if identity is not None else b""
        self.out: list = []
        self.out_size = 0
        self.events = 0
        self.connected = False
        self.closed = False
        self.close_reason = ""
        self.protocol_error: str | None = None  # what our own stack refused from the relay
        self.reading = True
        self.timers = True  # False: never send keepalives or rekeys on our own (go silent)
        self.received_raw = 0  # bytes read from the socket
        self.inbox: list[bytes] = []
        self.on_open: Callable[[Session], None] | None = None
        self.on_message: Callable[[Session, bytes], None] | None = None
        self.on_close: Callable[[Session], None] | None = None
        self.output_filter: OutputFilter | None = None
        self.tag: Any = None  # whatever the scenario wants to remember

    @property
    def is_open(self) -> bool:
        """Whether the secure channel is up and the connection not closed."""
        return not self.closed and self.wire is not None and self.wire.state is State.OPEN

    @property
    def pending(self) -> int:
        """Bytes queued for the relay and not yet written to the socket."""
        return self.out_size + (self.wire.pending_output if self.wire is not None else 0)

    def __repr__(self) -> str:
        state = "closed: " + self.close_reason if self.closed else "open"
        return f"<Session {self.public_key[:4].hex()} {state}>"


class Swarm:
    """A set of sessions to one relay address and the loop that drives them."""

    def __init__(
        self,
        address: tuple[str, int],
        relay_key: bytes | None,
        *,
        keepalive: float = 32.0,
        conn_timeout: float = 300.0,
    ) -> None:
        self.address = address
        self.relay_key = relay_key
        self.keepalive = keepalive
        # The client side never gives up on set-up first: the relay's deadline is under test.
        self.conn_timeout = conn_timeout
        self.selector = selectors.DefaultSelector()
        self.sessions: set[Session] = set()
        self._next_timer_scan = 0.0

    # ---- opening and closing -----------------------------------------------------------

    def open(
        self,
        identity: SigningKey | None = None,
        *,
        source: str | None = None,
        raw: bool = False,
        rcvbuf: int | None = None,
        output_filter: OutputFilter | None = None,
    ) -> Session:
        """Start a connection (the handshake runs in ``poll``); ``raw`` sends only what the
        caller queues with ``send_raw``; ``output_filter`` sees every byte the stack sends,
        from the version frame on."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source is not None:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        wire = None
        if not raw:
            identity = identity or SigningKey.generate()
            wire = Connection(
                identity,
                time.monotonic(),
                expected_peer=self.relay_key,
                conn_timeout=self.conn_timeout,
                keepalive=self.keepalive,
            )
        session = Session(self, sock, wire, identity)
        session.output_filter = output_filter
        self.sessions.add(session)
        err = sock.connect_ex(self.address)
        if err not in (0, errno.EINPROGRESS):
            self._closed(session, f"connect failed: {errno.errorcode.get(err, err)}")
            return session
        self._set_events(session, selectors.EVENT_WRITE)
        if wire is not None:
            self._take(session)
        return session

    def close(self, session: Session, *, reset: bool = False) -> None:
        """Close from our side; ``reset`` aborts with a TCP RST (nothing queued is sent)."""
        if session.closed:
            return
        if reset:
            session.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._closed(session, "closed by us")

    def close_all(self) -> None:
        """Close every session still open."""
        for session in list(self.sessions):
            self.close(session)

    def _closed(self, session: Session, reason: str) -> None:
        if session.closed:
            return
        session.closed = True
        session.close_reason = reason
        if session.events:
            self.selector.unregister(session.sock)
            session.events = 0
        session.sock.close()
        self.sessions.discard(session)
        if session.on_close is not None:
            session.on_close(session)

    # ---- sending -----------------------------------------------------------------------

    def send(self, session: Session, message: bytes) -> None:
        """Queue one relay message on an open session."""
        if session.closed:
            return
        assert session.wire is not None
        session.wire.send_message(message, time.monotonic())
        self._take(session)

    def send_all(self, session: Session, messages: list[bytes]) -> None:
        """Queue several relay messages on an open session, in order."""
        for message in messages:
            self.send(session, message)

    def rekey(self, session: Session) -> None:
        """Start a rekey from our side of an open session."""
        if session.is_open:
            session.wire.start_rekey(time.monotonic())  # type: ignore[union-attr]
            self._take(session)

    def send_raw(self, session: Session, data: bytes) -> None:
        """Queue bytes to write as they are, after anything already queued."""
        if session.closed or not data:
            return
        session.out.append(data)
        session.out_size += len(data)
        if session.connected:
            self._flush(session)

    def _take(self, session: Session) -> None:
        chunks = session.wire.data_to_send()  # type: ignore[union-attr]
        if not chunks:
            return
        if session.output_filter is not None:
            data = session.output_filter(b"".join(chunks))
            chunks = [data] if data else []
        for chunk in chunks:
            session.out.append(chunk)
            session.out_size += len(chunk)
        if session.connected:
            self._flush(session)

    def _flush(self, session: Session) -> None:
        out = session.out
        if not out or session.closed:
            return
        try:
            sent = session.sock.sendmsg(out[:IOV_MAX])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._closed(session, f"send failed: {exc.strerror}")
            return
        session.out_size -= sent
        index = 0
        for chunk in out:
            if sent < len(chunk):
                break
            sent -= len(chunk)
            index += 1
        del out[:index]
        if sent:
            out[0] = memoryview(out[0])[sent:]
        self._update_events(session)

    # ---- reading control ---------------------------------------------------------------

    def stop_reading(self, session: Session) -> None:
        """Never read this session again (its idle deadline is suspended, as a paused
        connection's is, so only the relay's behaviour is under test)."""
        session.reading = False
        if session.wire is not None:
            session.wire.pause_reading()
        self._update_events(session)

    def start_reading(self, session: Session) -> None:
        """Read this session again, after ``stop_reading``."""
        session.reading = True
        if session.wire is not None:
            session.wire.resume_reading(time.monotonic())
        self._update_events(session)

    # ---- the loop ----------------------------------------------------------------------

    def _set_events(self, session: Session, events: int) -> None:
        if events == session.events or session.closed:
            return
        if session.events == 0:
            self.selector.register(session.sock, events, session)
        elif events == 0:
            self.selector.unregister(session.sock)
        else:
            self.selector.modify(session.sock, events, session)
        session.events = events

    def _update_events(self, session: Session) -> None:
        if session.closed:
            return
        if not session.connected:
            events = selectors.EVENT_WRITE
        else:
            events = (selectors.EVENT_READ if session.reading else 0) | (
                selectors.EVENT_WRITE if session.out else 0
            )
        self._set_events(session, events)

    def poll(self, timeout: float = 0.05) -> None:
        """One round: wait up to ``timeout`` for events, handle them, run due timers."""
        if self.sessions:
            ready = self.selector.select(timeout)
        else:
            ready = []
            time.sleep(min(timeout, 0.01))
        for key, mask in ready:
            session: Session = key.data
            if session.closed:
                continue
            if mask & selectors.EVENT_WRITE:
                if not session.connected:
                    self._on_connected(session)
                else:
                    self._flush(session)
            if mask & selectors.EVENT_READ and not session.closed:
                self._on_readable(session)
        now = time.monotonic()
        if now >= self._next_timer_scan:
            self._next_timer_scan = now + TIMER_SCAN
            self._run_timers(now)

    def run_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll until ``done()``; fail the test naming ``what`` if ``timeout`` passes first.

        The timeout is a liveness bound (something must happen eventually), not a speed test.
        """
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            self.poll(0.05)

    def run_for(self, seconds: float) -> None:
        """Keep the sessions going for a while (for scenarios that must let time pass)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.poll(min(0.05, max(0.0, deadline - time.monotonic())))

    def _on_connected(self, session: Session) -> None:
        err = session.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._closed(session, f"connect failed: {errno.errorcode.get(err, err)}")
            return
        session.connected = True
        self._update_events(session)
        self._flush(session)

    def _on_readable(self, session: Session) -> None:
        try:
            data = session.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._closed(session, f"reset: {exc.strerror}")
            return
        if not data:
            self._closed(session, "closed by the relay")
            return
        session.received_raw += len(data)
        wire = session.wire
        if wire is None:
            return
        was_open = wire.state is State.OPEN
        try:
            messages = wire.receive_data(data, time.monotonic())
        except ProtocolError as exc:
            session.protocol_error = str(exc)
            self._closed(session, f"protocol error: {exc}")
            return
        self._take(session)
        if not was_open and wire.state is State.OPEN and session.on_open is not None:
            session.on_open(session)
        for message in messages:
            if session.closed:
                return
            if session.on_message is not None:
                session.on_message(session, message)
            else:
                session.inbox.append(message)

    def _run_timers(self, now: float) -> None:
        for session in list(self.sessions):
            wire = session.wire
            if wire is None or not session.timers or now < wire.next_deadline():
                continue
            try:
                wire.handle_timer(now)
            except ProtocolError as exc:
                session.protocol_error = str(exc)
                self._closed(session, f"timer: {exc}")
                continue
            self._take(session)
