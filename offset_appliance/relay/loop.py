"""The loop: one selectors loop, in one thread. It waits, serves ready connections fairly
within a turn's budget, triggers the relay's timers, handles signals and feeds systemd's
watchdog. It decides nothing: what to do with a connection, a listening socket or a due
timer is the relay's (``Served``); what to do at the end of a turn (status, expiries) and on
reload is the service's (``on_turn_end``, ``on_reload``).
"""

from __future__ import annotations

import math
import select
import selectors
import signal
import socket
import time
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any, Protocol

from .clients import Client

# The work of one turn of the loop: connections are served, the longest-waiting first, until
# this much time has gone; the rest (still readable) go first in the next turn, after the
# timers have run and the output has been written. One connection gets at most one read and
# the relay's frame budget a turn (the rest of what it sent waits, in order, for its next
# turn). So whatever anyone sends, a connection that becomes readable is served within about
# two turns.
TURN_BUDGET = 0.02
# A turn that starts with connections left over from the last one asks the selector for at
# most twice as many events as the last turn served, and at least this many.
EVENTS_BEHIND = 256
# The serving queue drops its served head once that is this long and half of it.
QUEUE_COMPACT = 4096

Clock = Callable[[], float]


class Served(Protocol):
    """What the loop serves: the relay."""

    @property
    def clients(self) -> Mapping[int, Client]: ...

    @property
    def backlog(self) -> Mapping[int, Client]: ...

    def has_work(self) -> bool: ...

    def next_deadline(self) -> float: ...

    def serve(self, client: Client, mask: int, now: float) -> None: ...

    def may_accept(self, deferred: bool) -> bool: ...

    def accept(self, lsock: socket.socket, now: float) -> None: ...

    def tick(self, now: float) -> None: ...


class Handled(Protocol):
    """Another socket the loop watches (the metrics endpoint and its exchanges)."""

    def handle(self, mask: int, now: float) -> None: ...


class Loop:
    """Turns of the loop over one ``Served`` relay, until stopped."""

    def __init__(
        self,
        selector: LoopSelector,
        relay: Served,
        clock: Clock,
        *,
        on_turn_end: Callable[[float], None],
        on_reload: Callable[[], None],
        notify: Callable[[str], None],
    ) -> None:
        self.selector = selector
        self.relay = relay
        self.clock = clock
        self._on_turn_end = on_turn_end
        self._on_reload = on_reload
        self._notify = notify
        self.stopping = False
        self._reload_requested = False
        self._wakeup_r: socket.socket | None = None
        self._wakeup_w: socket.socket | None = None
        self.watchdog = 0.0  # systemd's watchdog interval, 0 when there is none
        self._next_watchdog = 0.0
        # Real elapsed time for the turn's budget (``clock`` may be a test's fake one).
        self._work_clock = time.perf_counter
        self._turn = 0  # turns so far; each client remembers the last one it was served in
        # Connections to serve, in order, from ``_queue_at`` on: what a turn's budget left
        # unserved stays there for the next turn (each client once: ``Client.ready``).
        self._queue: list[tuple[int, int, Client]] = []
        self._queue_at = 0
        self._served = 0  # connections the last turn served

    # ---- signals -----------------------------------------------------------------------

    def install_signals(self) -> None:
        """SIGTERM and SIGINT stop the loop, SIGHUP reloads; a wake-up socket ends a wait."""
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._wakeup_r.setblocking(False)
        self._wakeup_w.setblocking(False)
        signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
        self.selector.register(self._wakeup_r, selectors.EVENT_READ, self._wakeup_r)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_reload_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def _on_reload_signal(self, signum: int, frame: FrameType | None) -> None:
        self._reload_requested = True

    def stop(self) -> None:
        """Ask the loop to end (from a signal handler or another thread)."""
        self.stopping = True
        if self._wakeup_w is not None:
            try:
                self._wakeup_w.send(b"\0")
            except OSError:
                pass

    def request_reload(self) -> None:
        """Reload at the end of the current turn (as SIGHUP does)."""
        self._reload_requested = True

    def _drain_wakeup(self, sock: socket.socket) -> None:
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass

    # ---- turns -------------------------------------------------------------------------

    @property
    def behind(self) -> bool:
        """Whether connections the last turn's budget left unserved wait for the next."""
        return self._queue_at < len(self._queue)

    def run(self) -> None:
        """Turn until stopped."""
        while not self.stopping:
            self.step()

    def step(self, timeout: float = 1.0) -> int:
        """One turn: wait for events (until the relay's next deadline, at most ``timeout``
        seconds), serve them within the turn's budget, accept, run what is due. Returns the
        number of sockets that had events."""
        relay = self.relay
        clients = relay.clients
        queue = self._queue
        behind = self._queue_at < len(queue)
        now = self.clock()
        if behind or relay.has_work():
            wait = 0.0
        else:
            wait = max(0.0, min(relay.next_deadline(), now + timeout) - now)
        # Behind (connections left over from the last turn), look at a bounded number of new
        # events: a loop that asked for every ready socket at every turn would spend more
        # on the asking than on the serving once most of its connections are waiting.
        cap = max(EVENTS_BEHIND, 2 * self._served) if behind else 0
        events = self.selector.ready(wait, cap)
        # A capped call that came back full may have left ready sockets in epoll, unseen.
        unseen = bool(cap) and len(events) >= cap
        self._turn += 1
        now = self.clock()  # the serving phase's time
        # The wake-up socket and /metrics first, then the connections: those left over from
        # the last turn first, then the new ones, those that waited longest first, then the
        # listening sockets (each bounded on its own).
        fresh: list[tuple[int, int, Client]] = []
        acceptable: list[socket.socket] = []
        for obj, mask in events:
            if type(obj) is Client:
                if not obj.ready:
                    fresh.append((obj.served_in, obj.id, obj))
                obj.ready |= mask
            elif obj is self._wakeup_r:
                self._drain_wakeup(self._wakeup_r)
            elif isinstance(obj, socket.socket):
                acceptable.append(obj)
            else:
                obj.handle(mask, now)
        backlog = relay.backlog
        if backlog:
            for cid, client in backlog.items():
                if not client.ready and not client.paused:
                    fresh.append((client.served_in, cid, client))
                    client.ready = selectors.EVENT_READ
        if fresh:
            if len(fresh) > 1:
                fresh.sort()
            queue.extend(fresh)
        work_clock = self._work_clock
        budget_end = work_clock() + TURN_BUDGET
        turn = self._turn
        serve = relay.serve
        at = self._queue_at
        end = len(queue)
        served = 0
        while at < end:
            if served and work_clock() >= budget_end:
                # The rest are still readable (or hold a backlog): they come first next turn.
                self._feed_watchdog(now)
                break
            client = queue[at][2]
            at += 1
            mask = client.ready
            client.ready = 0
            if clients.get(client.id) is not client:
                continue  # closed since it was queued
            served += 1
            client.served_in = turn
            serve(client, mask, now)
        if at >= end:
            queue.clear()
            at = 0
        elif at >= QUEUE_COMPACT and 2 * at >= end:
            del queue[:at]
            at = 0
        self._queue_at = at
        self._served = served
        if acceptable:
            # Connections left unserved, or not even seen: either way not all were served.
            deferred = bool(queue) or unseen
            if relay.may_accept(deferred):
                now = self.clock()  # the accepting phase's time
                for lsock in acceptable:
                    relay.accept(lsock, now)
        now = self.clock()  # the timers' phase
        relay.tick(now)
        if self._reload_requested:
            self._reload_requested = False
            self._on_reload()
        self._feed_watchdog(now)
        self._on_turn_end(now)
        return len(events)

    def _feed_watchdog(self, now: float) -> None:
        """Tell systemd the loop is alive, when it is due (also from within long passes)."""
        if self.watchdog and now >= self._next_watchdog:
            self._notify("WATCHDOG=1")
            self._next_watchdog = now + self.watchdog

    def close(self) -> None:
        """Let go of the wake-up socket."""
        if self._wakeup_w is not None:
            try:
                signal.set_wakeup_fd(-1)
            except ValueError:  # not the main thread: it was never set from here
                pass
        for sock in (self._wakeup_r, self._wakeup_w):
            if sock is not None:
                sock.close()
        self._wakeup_r = self._wakeup_w = None


class LoopSelector(selectors.EpollSelector):
    """The epoll selector, with ``ready`` for the loop: at most ``max_events`` events, as
    (data, events) pairs, without the general ``select``'s method call per event.

    A bounded call still reaches every ready socket in turn: epoll hands level-triggered
    events out from the front of its ready list and puts those it returned at the back.
    """

    def ready(self, timeout: float, max_events: int = 0) -> list[tuple[Any, int]]:
        """The ready sockets' data and events, waiting at most ``timeout`` seconds (at most
        ``max_events`` of them; 0: all)."""
        # As ``select``: whole milliseconds, rounded up, so the wait is not cut short.
        timeout = 0.0 if timeout <= 0 else math.ceil(timeout * 1e3) * 1e-3
        # The selector's own map and epoll object (CPython's EpollSelector, 3.4 on; the
        # type stubs leave them out).
        fd_to_key: dict[int, selectors.SelectorKey] = self._fd_to_key  # type: ignore[attr-defined]
        epoll: select.epoll = self._selector  # type: ignore[attr-defined]
        try:
            polled = epoll.poll(timeout, max_events or max(len(fd_to_key), 1))
        except InterruptedError:
            return []
        found: list[tuple[Any, int]] = []
        append = found.append
        get = fd_to_key.get
        for fd, event in polled:
            key = get(fd)
            if key is not None:
                mask = (_WRITE if event & _NOT_IN else 0) | (_READ if event & _NOT_OUT else 0)
                append((key.data, mask & key.events))
        return found


_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
_NOT_IN = ~select.EPOLLIN
_NOT_OUT = ~select.EPOLLOUT
