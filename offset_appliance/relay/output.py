"""Output queues and back-pressure: what each connection has to send, when it is written, and
which connections stop being read while the connection they feed cannot keep up.

A connection's output is taken from its protocol stack into its queue and written once per
turn of the loop, with one ``sendmsg`` of many buffers. A queue above the high water mark
pauses reading of the tunnel end that feeds it, and the core is told (``set_congested``); below
the low water mark reading resumes. Pausing and resuming for any reason goes through
``pause`` and ``resume``. It closes nothing: a failed write, or a closing connection's flush
that ended, is returned to the relay, which closes.
"""

from __future__ import annotations

import selectors
from collections.abc import Mapping

from ..config import Limits
from ..errors import CloseReason
from .actions import PAUSED_BY_PEER
from .clients import Client
from .core import RelayCore
from .timers import Timers

IOV_MAX = 1024

# What a write leaves to the relay: close the connection for this reason, with this detail.
Ended = tuple[CloseReason, str]


class Output:
    """The output side of every connection of one relay."""

    def __init__(
        self,
        selector: selectors.BaseSelector,
        clients: Mapping[int, Client],
        core: RelayCore,
        limits: Limits,
        timers: Timers,
    ) -> None:
        self.selector = selector
        self.clients = clients
        self.core = core
        self.limits = limits
        self.timers = timers  # a resumed connection's idle deadline runs again
        self.dirty: set[Client] = set()

    # ---- queueing and writing ----------------------------------------------------------

    def take(self, client: Client) -> None:
        """Move the protocol stack's output to the socket queue; it is written by the
        relay's flush."""
        chunks = client.wire.data_to_send()
        if chunks:
            client.out.extend(chunks)
            client.out_size += sum(map(len, chunks))
            self.dirty.add(client)
            if not client.congested and client.out_size >= self.limits.buffer_high_water:
                client.congested = True
                self.core.set_congested(client.id, True)

    def take_dirty(self) -> set[Client]:
        """The connections that got output since the last call."""
        dirty = self.dirty
        self.dirty = set()
        return dirty

    def forget(self, client: Client) -> None:
        """The connection is closed: stop watching it and drop what it had queued."""
        self.dirty.discard(client)
        if client.events:
            self.selector.unregister(client.sock)
            client.events = 0
        client.out.clear()
        client.out_size = 0

    def write(self, client: Client, now: float) -> Ended | None:
        """Write as much of the queue as the socket takes. Returns why the relay is to
        close the connection now (the write failed, or its closing flush is done), or None."""
        out = client.out
        try:
            sent = client.sock.sendmsg(out[:IOV_MAX] if len(out) > IOV_MAX else out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            return CloseReason.RESET, f"send failed: {exc.strerror}"
        if sent == client.out_size:
            # All of it (the usual case): nothing to walk.
            out.clear()
            client.out_size = 0
        elif sent:
            client.out_size -= sent
            # Drop whole chunks sent, keep the unsent tail of a partly sent one.
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
            self.want_write(client, True)
        else:
            if client.events & selectors.EVENT_WRITE:
                self.want_write(client, False)
            if client.closing:
                assert client.close_reason is not None
                return client.close_reason, "flushed"
        self.balance(client, now)
        return None

    # ---- back-pressure -----------------------------------------------------------------

    def balance(self, client: Client, now: float) -> None:
        """Pause the tunnel peer feeding a full queue; resume it once the queue drained."""
        size = client.out_size
        limits = self.limits
        if client.congested and size < limits.buffer_high_water:
            client.congested = False
            self.core.set_congested(client.id, False)
        if size > limits.buffer_high_water:
            feeder = self.core.peer_of(client.id)
            if feeder is not None:
                other = self.clients.get(feeder)
                if other is not None and not other.paused & PAUSED_BY_PEER:
                    self.pause(other, PAUSED_BY_PEER)
        elif size < limits.buffer_low_water:
            feeder = self.core.peer_of(client.id)
            if feeder is not None:
                other = self.clients.get(feeder)
                if other is not None and other.paused & PAUSED_BY_PEER:
                    self.resume(other, PAUSED_BY_PEER, now)

    def pause(self, client: Client, reason: int) -> None:
        """Stop reading ``client`` for ``reason`` (one of the ``PAUSED_BY_*`` flags)."""
        if not client.paused:
            client.wire.pause_reading()
            self.set_events(client, client.events & ~selectors.EVENT_READ)
        client.paused |= reason

    def resume(self, client: Client, reason: int, now: float) -> None:
        """Drop ``reason`` for not reading ``client``; read it again if none is left."""
        if not client.paused & reason:
            return
        client.paused &= ~reason
        if not client.paused:
            client.wire.resume_reading(now)
            self.set_events(client, client.events | selectors.EVENT_READ)
            self.timers.schedule(client, client.wire.next_deadline())

    # ---- the selector's interest -------------------------------------------------------

    def want_write(self, client: Client, on: bool) -> None:
        """Watch ``client`` for writability (while its queue is not empty) or stop."""
        events = client.events
        new = events | selectors.EVENT_WRITE if on else events & ~selectors.EVENT_WRITE
        self.set_events(client, new)

    def set_events(self, client: Client, events: int) -> None:
        """Register, modify or unregister ``client`` with the selector."""
        if events == client.events:
            return
        if client.events == 0:
            self.selector.register(client.sock, events, client)
        elif events == 0:
            self.selector.unregister(client.sock)
        else:
            self.selector.modify(client.sock, events, client)
        client.events = events
