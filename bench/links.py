"""Many client connections in one process: a non-blocking selectors loop over ``wire.Connection``.

Load-generating client processes use this instead of the blocking ``RelayClient`` so that one
process can drive thousands of connections. It mirrors the relay's own IO shell: read, feed
the sans-IO stack, collect output, write once per loop turn.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from typing import Protocol

from nacl.signing import SigningKey

from offset_appliance.errors import ProtocolError
from offset_appliance.wire.connection import Connection, State

from .relay import BenchError

RECV_SIZE = 256 * 1024
IOV_MAX = 1024
SWEEP_INTERVAL = 0.5  # how often connection timers (keepalives) are checked
# Linux: bind a source address without taking a port until connect (which then picks one per
# destination), so one source address is not limited to one ephemeral range in all.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class Handler(Protocol):
    """What a link reports to its owner."""

    def on_open(self, link: Link) -> None:
        """The secure channel is up: relay messages may be sent."""

    def on_message(self, link: Link, message: bytes) -> None:
        """One relay message arrived."""

    def on_close(self, link: Link, reason: str) -> None:
        """The connection ended (the relay closed it, or a protocol error)."""


class Link:
    """One client connection to the relay."""

    __slots__ = (
        "sock",
        "wire",
        "handler",
        "out",
        "dirty",
        "writing",
        "open",
        "closed",
        "close_when_flushed",
        "rx_open_bytes",
        "user",
    )

    def __init__(self, sock: socket.socket, wire: Connection, handler: Handler) -> None:
        self.sock = sock
        self.wire = wire
        self.handler = handler
        self.out: list = []
        self.dirty = False
        self.writing = False  # registered for EVENT_WRITE (connecting, or output backed up)
        self.open = False
        self.closed = False
        self.close_when_flushed = False
        self.rx_open_bytes = 0  # bytes received after the channel opened (data, keepalives)
        self.user: object = None  # the owner's per-link state


class Loop:
    """A selectors loop over links to one relay (expected to prove ``relay_key``)."""

    def __init__(
        self, address: tuple[str, int], relay_key: bytes, sources: tuple[str, ...] = ()
    ) -> None:
        self.address = address
        self.relay_key = relay_key
        # Loopback source addresses to connect from, in turn (one address has about 28,000
        # ephemeral ports towards one relay port); none: the kernel's choice.
        self.sources = sources
        self._opened = 0
        self.selector = selectors.DefaultSelector()
        self.links: set[Link] = set()
        self._dirty: list[Link] = []
        self._next_sweep = time.monotonic() + SWEEP_INTERVAL
        self.now = time.monotonic()
        self.timer_frames = 0  # flushes caused by timers (keepalives this side sent)
        self.rx_bytes = 0  # bytes received on open links (the relay's data and keepalives)
        # One receive buffer for all links: ``recv(256 KiB)`` would allocate, mremap and
        # unmap a fresh 256 KiB buffer on every call (three system calls each time).
        self._buffer = bytearray(RECV_SIZE)
        self._view = memoryview(self._buffer)

    # ---- connections -------------------------------------------------------------------

    def open(self, identity: SigningKey, handler: Handler) -> Link:
        """Start a connection; ``handler.on_open`` runs once its handshake completes."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.sources:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.sources[self._opened % len(self.sources)], 0))
        self._opened += 1
        code = sock.connect_ex(self.address)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            raise BenchError(f"cannot connect to the relay: {errno.errorcode.get(code, code)}")
        wire = Connection(identity, time.monotonic(), expected_peer=self.relay_key)
        link = Link(sock, wire, handler)
        link.out.extend(wire.data_to_send())
        # Writable once the connection is established; the version and nonce go out then.
        link.writing = True
        self.selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, link)
        self.links.add(link)
        return link

    def send(self, link: Link, message: bytes) -> None:
        """Queue one relay message; it is written at the end of this loop turn."""
        link.wire.send_message(message, self.now)
        if not link.dirty:
            link.dirty = True
            self._dirty.append(link)

    def close(self, link: Link, reason: str, *, notify: bool = True) -> None:
        """Close a link now."""
        if link.closed:
            return
        link.closed = True
        self.links.discard(link)
        try:
            self.selector.unregister(link.sock)
        except (KeyError, ValueError):
            pass
        link.sock.close()
        if notify:
            link.handler.on_close(link, reason)

    def close_after_flush(self, link: Link) -> None:
        """Close a link once everything queued on it has been written."""
        link.close_when_flushed = True
        if not link.dirty:
            link.dirty = True
            self._dirty.append(link)

    @property
    def output_pending(self) -> bool:
        """Whether some link has output queued that this loop turn has not written yet."""
        return bool(self._dirty)

    def watch(self, fileobj, callback) -> None:
        """Also wait for ``fileobj`` to be readable (a pipe from the controlling process)."""
        self.selector.register(fileobj, selectors.EVENT_READ, callback)

    # ---- the loop ----------------------------------------------------------------------

    def run_once(self, timeout: float) -> None:
        """Wait up to ``timeout`` for events, handle them, write output, run due timers."""
        for key, mask in self.selector.select(timeout):
            link = key.data
            if not isinstance(link, Link):
                link()  # a watched file: its callback
                continue
            if mask & selectors.EVENT_WRITE:
                self._write(link)
            if mask & selectors.EVENT_READ and not link.closed:
                self._read(link)
        self.flush()
        now = self.now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL
            self._sweep(now)

    def run_until(self, done, timeout: float, what: str) -> None:
        """Run until ``done()`` is true; BenchError naming ``what`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
            self.run_once(0.05)

    def flush(self) -> None:
        """Write what every link has queued."""
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = []
        for link in dirty:
            link.dirty = False
            if link.closed:
                continue
            chunks = link.wire.data_to_send()
            if chunks:
                link.out.extend(chunks)
            if not link.writing:
                self._write(link)
            elif link.close_when_flushed and not link.out:
                self.close(link, "closed by us", notify=False)

    def _read(self, link: Link) -> None:
        try:
            size = link.sock.recv_into(self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(link, f"receive failed: {exc.strerror}")
            return
        if not size:
            self.close(link, "the relay closed the connection")
            return
        data = bytes(self._view[:size])
        now = self.now = time.monotonic()
        wire = link.wire
        if link.open:
            link.rx_open_bytes += len(data)
            self.rx_bytes += len(data)
        try:
            messages = wire.receive_data(data, now)
        except ProtocolError as exc:
            self.close(link, f"protocol error: {exc}")
            return
        if wire.pending_output and not link.dirty:
            link.dirty = True
            self._dirty.append(link)
        if not link.open and wire.state is State.OPEN:
            link.open = True
            link.handler.on_open(link)
        if messages:
            on_message = link.handler.on_message
            for message in messages:
                on_message(link, message)

    def _write(self, link: Link) -> None:
        out = link.out
        if out:
            try:
                sent = link.sock.sendmsg(out[:IOV_MAX] if len(out) > IOV_MAX else out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.close(link, f"send failed: {exc.strerror}")
                return
            if sent:
                index = 0
                for chunk in out:
                    size = len(chunk)
                    if sent < size:
                        break
                    sent -= size
                    index += 1
                del out[:index]
                if sent:
                    out[0] = memoryview(out[0])[sent:]
        if out:
            if not link.writing:
                link.writing = True
                self.selector.modify(link.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, link)
            return
        if link.writing:
            link.writing = False
            self.selector.modify(link.sock, selectors.EVENT_READ, link)
        if link.close_when_flushed:
            self.close(link, "closed by us", notify=False)

    def _sweep(self, now: float) -> None:
        """Fire due connection timers: keepalives, and set-up and idle timeouts."""
        for link in list(self.links):
            wire = link.wire
            if wire.next_deadline() > now:
                continue
            try:
                wire.handle_timer(now)
            except ProtocolError as exc:
                self.close(link, f"protocol error: {exc}")
                continue
            if wire.pending_output:
                self.timer_frames += 1
                if not link.dirty:
                    link.dirty = True
                    self._dirty.append(link)
        self.flush()

    def shutdown(self) -> None:
        """Close every link without notifying the handlers."""
        for link in list(self.links):
            self.close(link, "shutdown", notify=False)
        self.selector.close()
