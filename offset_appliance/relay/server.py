"""The IO shell: one selectors loop, in one thread, that moves bytes between sockets and the
sans-IO core.

This module holds the loop itself: set-up, reading, the core's actions, timers, reload,
signals and systemd notifications. Its other concerns each have a room of their own:
``admission`` (who may connect), ``output`` (output queues and back-pressure) and
``accounting`` (why connections closed). The protocol lives in ``wire.Connection`` (per
connection) and ``relay.core.RelayCore``. Time comes from ``clock``, which tests replace.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import math
import select
import selectors
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from nacl.signing import SigningKey

from ..config import Config, config_values, format_address
from ..errors import CloseReason, ProtocolError
from ..files import b64url_encode
from ..wire.connection import Connection, State
from .access import AccessControl
from .accounting import CloseAccounting
from .admission import Admission
from .bandwidth import BandwidthControl
from .bans import BanTable
from .clients import (
    PAUSED_BY_CLOSE,
    PAUSED_BY_CORE,
    PAUSED_BY_MEMORY,
    RECV_MAX,
    RECV_MIN,
    Client,
)
from .core import Close, CoreLimits, Pause, RelayCore, Role, Send
from .events import RefusalLog
from .handover import Handover, Inherited, ServiceManager
from .memory import PAUSE_BATCH, MemoryGuard, read_rss
from .metrics import MetricsEndpoint, Snapshot, Stats, render
from .notify import Notifier
from .output import Output

log = logging.getLogger("strelay")

STATUS_INTERVAL = 2.0
# How often the STATUS= summary is also written to the log, at info.
STATUS_LOG_INTERVAL = 300.0
# Close reasons that are a limit refusing a connect: (limit, the setting that holds it).
_CONNECT_LIMITS = {
    CloseReason.HALF_TUNNEL_LIMIT: "max_half_tunnels_per_listener",
    CloseReason.LISTENER_FULL: "buffer_high_water",
}
# Close reasons that refuse a client's request (listen, connect or accept): each is counted
# in connections_refused_total under the reason's value, logged as the limits are, and is
# a strike towards a ban of the client's source.
REFUSED_REQUESTS = frozenset({CloseReason.LISTEN_DENIED, CloseReason.CONNECT_DENIED})
# Handshakes that end for these are not the peer's failure (no strike towards a ban).
_NOT_STRIKES = (CloseReason.SHUTDOWN, CloseReason.EVICTED)
_ROLE_NAMES = {
    Role.PENDING: "pending",
    Role.LISTENER: "listener",
    Role.HALF_TUNNEL: "connector",
    Role.TUNNEL: "tunnel",
}
# The work of one turn of the loop: connections are served, the longest-waiting first, until
# this much time has gone; the rest (still readable) go first in the next turn, after the
# timers have run and the output has been written. One connection gets at most one read and
# FRAME_BUDGET frames a turn (the rest of what it sent waits, in order, for its next turn).
# So whatever anyone sends, a connection that becomes readable is served within about two
# turns.
TURN_BUDGET = 0.02
FRAME_BUDGET = 64
# A turn that starts with connections left over from the last one asks the selector for at
# most twice as many events as the last turn served, and at least this many.
EVENTS_BEHIND = 256
# The serving queue drops its served head once that is this long and half of it.
QUEUE_COMPACT = 4096
# The settings a running relay cannot change: they take a restart.
RESTART_ONLY = ("listen", "identity_file", "metrics")
# A changed value longer than this is shortened in the reload's log line.
CHANGE_SHOWN = 200

Clock = Callable[[], float]


class RelayServer:
    """A relay listening on the configured addresses, serving until ``stop`` is called."""

    def __init__(
        self,
        config: Config,
        identity: SigningKey,
        *,
        reload_config: Callable[[], Config] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.config = config
        self.identity = identity
        self.public_key = bytes(identity.verify_key)
        self.clock = clock
        self._reload_config = reload_config
        self.selector = LoopSelector()
        self.listen_sockets: list[socket.socket] = []
        self.clients: dict[int, Client] = {}
        self.stats = Stats()
        self.notifier = Notifier()
        self.limits = config.limits
        self.timeouts = config.timeouts
        # Who may use the relay: access lists, automatic bans, the memory ceiling.
        self.access = AccessControl()
        self.bans = BanTable()
        self.memory = MemoryGuard(rss=read_rss)
        self._memory_swept = False  # connections restored paused for memory were resumed
        self.core = RelayCore(
            self._core_limits(config),
            can_queue=self._can_queue,
            refuse_request=self.access.refuse_request,
        )
        self.admission = Admission(
            config.limits,
            self.stats,
            self.selector,
            self.listen_sockets,
            orphans_from=self.core.orphans_from,
            access=self.access,
            bans=self.bans,
        )
        self._apply_controls(config)
        self.output = Output(
            self.selector,
            self.clients,
            self.core,
            config.limits,
            clock,
            self._close,
            self._schedule,
        )
        self.accounting = CloseAccounting(self.stats)
        self.bandwidth = BandwidthControl(config, self.clients, self.output, self.stats, clock)
        self.refusals = RefusalLog()
        self._ids = itertools.count(1)
        self._timers: list[tuple[float, int]] = []
        self._stopping = False
        self._reload_requested = False
        self.reload_error = ""  # why the last reload was refused; "" once one succeeds
        self._wakeup_r: socket.socket | None = None
        self._wakeup_w: socket.socket | None = None
        self._watchdog = 0.0
        self._next_watchdog = 0.0
        # Real elapsed time for the turn's budget (``clock`` may be a test's fake one).
        self._work_clock = time.perf_counter
        self._turn = 0  # turns so far; each client remembers the last one it was served in
        self._backlog: dict[int, Client] = {}  # clients holding frames beyond their budget
        # Connections to serve, in order, from ``_queue_at`` on: what a turn's budget left
        # unserved stays there for the next turn (each client once: ``Client.ready``).
        self._queue: list[tuple[int, int, Client]] = []
        self._queue_at = 0
        self._served = 0  # connections the last turn served
        self._deferred = False  # the last turn ran out of budget before serving everyone
        self._next_status = 0.0
        self._next_status_log = 0.0
        self.metrics: MetricsEndpoint | None = None
        # Run by systemd: hand connections over on stop instead of closing them.
        self.handover: Handover | None = None

    # ---- set-up ------------------------------------------------------------------------

    @staticmethod
    def _core_limits(config: Config) -> CoreLimits:
        limits, timeouts = config.limits, config.timeouts
        return CoreLimits(
            relay_conn_timeout=timeouts.relay_conn_timeout,
            half_tunnel_timeout=timeouts.half_tunnel,
            max_half_tunnels_per_listener=limits.max_half_tunnels_per_listener,
            max_half_tunnels_per_listener_per_ip=limits.max_half_tunnels_per_listener_per_ip,
            half_tunnel_buffer=limits.half_tunnel_buffer,
            max_orphaned_bytes=limits.max_orphaned_bytes,
        )

    def _apply_config(self, config: Config) -> None:
        """Put a checked configuration in force, all of it in one turn of the loop.

        Nothing here may fail: ``load_config`` has checked everything. Each component
        takes what concerns it; limits and timeouts apply to what happens from now on
        (new connections, new half-tunnels, timers set from now), log level at once.
        """
        self.config = config
        self._apply_limits(config)
        self._apply_controls(config)
        self.bandwidth.apply_config(config)
        logging.getLogger().setLevel(config.log_level.upper())

    def _apply_limits(self, config: Config) -> None:
        self.limits = self.output.limits = config.limits
        self.admission.set_limits(config.limits)
        self.timeouts = config.timeouts
        self.core.limits = self._core_limits(config)

    def _apply_controls(self, config: Config) -> None:
        """The access lists, bans and memory ceiling of ``config`` (at start and on reload:
        they apply to what happens from now on)."""
        self.access.apply_config(config.access)
        self.bans.apply_config(config.bans)
        self.memory.apply_config(config.limits)

    def bind(self, inherited: Inherited | None = None) -> list[tuple[str, int]]:
        """Open the listening sockets, or take them from ``inherited`` (the service
        manager's store); returns the bound addresses (ports resolved)."""
        bound = []
        for host, port in self.config.listen:
            sock = inherited.take_listen(host, port) if inherited is not None else None
            if sock is not None:
                sock.setblocking(False)
                self.listen_sockets.append(sock)
                self.selector.register(sock, selectors.EVENT_READ, sock)
                bound.append(sock.getsockname()[:2])
                continue
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    # Separate IPv4 and IPv6 sockets can then share one port.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((host, port))
                sock.listen(1024)
            except OSError as exc:
                sock.close()
                raise BindError(host, port, exc) from None
            sock.setblocking(False)
            self.listen_sockets.append(sock)
            self.selector.register(sock, selectors.EVENT_READ, sock)
            bound.append(sock.getsockname()[:2])
        if self.config.metrics.enabled:
            host, port = self.config.metrics.listen
            try:
                self.metrics = MetricsEndpoint(
                    self.selector, (host, port), self.metrics_text, self.stats, clock=self.clock
                )
            except OSError as exc:
                raise BindError(host, port, exc, kind="metrics") from None
            # Out of descriptors, the metrics listener is paused with the relay's own.
            metrics = self.metrics
            self.admission.also_paused.append(metrics)
            metrics.out_of_descriptors = lambda exc: self.admission.shed(
                metrics.sock, exc, self.clock()
            )
        return bound

    def _install_signals(self) -> None:
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._wakeup_r.setblocking(False)
        self._wakeup_w.setblocking(False)
        signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
        self.selector.register(self._wakeup_r, selectors.EVENT_READ, self._wakeup_r)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_reload_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def _on_stop_signal(self, signum, frame) -> None:
        self._stopping = True

    def _on_reload_signal(self, signum, frame) -> None:
        self._reload_requested = True

    def stop(self) -> None:
        """Ask the loop to end (from a signal handler or another thread)."""
        self._stopping = True
        if self._wakeup_w is not None:
            try:
                self._wakeup_w.send(b"\0")
            except OSError:
                pass

    def request_reload(self) -> None:
        """Re-read the configuration at the end of the current turn (as SIGHUP does)."""
        self._reload_requested = True

    # ---- the loop ----------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Run until stopped; then close every connection."""
        self._install_signals()
        self.admission.start()
        self._watchdog = self.notifier.watchdog_interval() or 0.0
        while not self._stopping:
            self.step()
        self.bandwidth.stop(self.clock())
        if self.handover is not None:
            self.notifier.notify("STOPPING=1")
            if self.handover.hand_over(self):
                return
        self.shutdown()

    def step(self, timeout: float = 1.0) -> int:
        """One turn of the loop: wait for events (until the next deadline, at most
        ``timeout`` seconds), serve them within the turn's budget, run the timers that are
        due and write. Returns the number of sockets that had events."""
        actions = self.core.actions
        now = self.clock()
        backlog = self._backlog
        queue = self._queue
        behind = self._queue_at < len(queue)
        if (
            self.output.dirty
            or actions
            or behind
            or any(not client.paused for client in backlog.values())
        ):
            wait = 0.0
        else:
            wait = max(0.0, min(self._next_deadline(), now + timeout) - now)
        clients = self.clients
        # Behind (connections left over from the last turn), look at a bounded number of new
        # events: a loop that asked for every ready socket at every turn would spend more
        # on the asking than on the serving once most of its connections are waiting.
        cap = max(EVENTS_BEHIND, 2 * self._served) if behind else 0
        events = self.selector.ready(wait, cap)
        # A capped call that came back full may have left ready sockets in epoll, unseen.
        unseen = cap and len(events) >= cap
        self._turn += 1
        # The wake-up pipe and /metrics first, then the connections: those left over from
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
                self._drain_wakeup()
            elif isinstance(obj, socket.socket):
                acceptable.append(obj)
            else:
                obj.handle(mask)
            if actions:
                self._drain()
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
        output = self.output
        at = self._queue_at
        end = len(queue)
        served = 0
        while at < end:
            if served and work_clock() >= budget_end:
                # The rest are still readable (or hold a backlog): they come first next turn.
                self._feed_watchdog()
                break
            client = queue[at][2]
            at += 1
            mask = client.ready
            client.ready = 0
            if clients.get(client.id) is not client:
                continue  # closed since it was queued
            served += 1
            client.served_in = turn
            if mask & selectors.EVENT_WRITE:
                output.write(client)
            if mask & selectors.EVENT_READ and not client.paused and client.id in clients:
                self._on_readable(client)
            if actions:
                self._drain()
        if at >= end:
            queue.clear()
            at = 0
        elif at >= QUEUE_COMPACT and 2 * at >= end:
            del queue[:at]
            at = 0
        self._queue_at = at
        # Connections left unserved, or not even seen: either way not all were served.
        self._deferred = bool(queue) or bool(unseen)
        self._served = served
        # Accepting last: at the handshake limit a new connection evicts the oldest handshake,
        # which must not be one whose frames wait unread because the loop was busy (its peer
        # may already count it open). So the handshakes that sent something are served
        # first, and while the turn left some unserved, a full handshake table accepts
        # nothing (the kernel's backlog holds the connects until the loop catches up).
        if acceptable and not (
            self._deferred and len(self.admission.handshaking) >= self.limits.max_handshakes
        ):
            for lsock in acceptable:
                self._on_acceptable(lsock)
            if actions:
                self._drain()
        now = self.clock()
        self._run_timers(now)
        if now >= self.memory.next_sample:
            self._check_memory(now)
        self.output.flush()
        if actions:  # a failed write ended a tunnel
            self._drain()
        if self._reload_requested:
            self._reload()
        self._feed_watchdog()
        if now >= self._next_status:
            self.notifier.notify("STATUS=" + self.status_text())
            self._next_status = now + STATUS_INTERVAL
            if self.metrics is not None:
                self.metrics.expire(now)
            self.refusals.flush(now)
            self.bans.expire(now)
            self.bandwidth.tick(now)
        if now >= self._next_status_log:
            log.info("status: %s", self.status_line())
            self._next_status_log = now + STATUS_LOG_INTERVAL
        return len(events)

    def _feed_watchdog(self) -> None:
        """Tell systemd the loop is alive, when it is due (also from within long passes)."""
        if self._watchdog:
            now = self.clock()
            if now >= self._next_watchdog:
                self.notifier.notify("WATCHDOG=1")
                self._next_watchdog = now + self._watchdog

    def _next_deadline(self) -> float:
        timers = self._timers
        first = timers[0][0] if timers else float("inf")
        deadline = min(
            first,
            self.core.next_deadline(),
            self.admission.next_deadline(),
            self.bandwidth.next_deadline(),
        )
        if self.memory.max_memory or self.memory.active:
            deadline = min(deadline, self.memory.next_sample)
        return deadline

    def _drain_wakeup(self) -> None:
        try:
            while self._wakeup_r.recv(4096):  # type: ignore[union-attr]
                pass
        except OSError:
            pass

    def status_text(self) -> str:
        """systemd's STATUS=: after a refused reload, first the reason (until a reload
        succeeds), then the headline counts."""
        failed = f"reload failed: {self.reload_error}; " if self.reload_error else ""
        return failed + self.status_line()

    def status_line(self) -> str:
        """The headline counts, as systemd's STATUS= shows them (the same as /metrics)."""
        stats = self.stats
        return (
            f"{len(self.clients)} connections, {len(self.admission.handshaking)} handshaking, "
            f"{self.core.listener_count} listening, {self.core.half_tunnel_count} half-tunnels, "
            f"{self.core.tunnels} tunnels, {stats.bytes_relayed / 1e6:.1f} MB relayed, "
            f"{stats.handshakes_failed_total} failed handshakes, "
            f"{sum(stats.refused.values())} refused by limits"
        )

    def snapshot(self) -> Snapshot:
        """Gauges for a scrape; walks the connections, so only at scrape time."""
        counts = dict.fromkeys(
            ("handshaking", "waiting", "listening", "half_tunnel", "tunnel", "closing"), 0
        )
        names = {
            Role.PENDING: "waiting",
            Role.LISTENER: "listening",
            Role.HALF_TUNNEL: "half_tunnel",
            Role.TUNNEL: "tunnel",
        }
        role = self.core.role
        handshaking = self.admission.handshaking
        rekeys = 0
        for cid, client in self.clients.items():
            rekeys += client.wire.rekeys
            if client.closing:
                counts["closing"] += 1
            elif cid in handshaking:
                counts["handshaking"] += 1
            else:
                counts[names.get(role(cid), "waiting")] += 1  # type: ignore[arg-type]
        now = self.clock()
        return Snapshot(
            connections=counts,
            listeners=self.core.listener_count,
            half_tunnels=self.core.half_tunnel_count,
            tunnels=self.core.tunnels,
            rekeys_live=rekeys,
            memory_rss=read_rss(),
            memory_ceiling_active=int(self.memory.active),
            memory_ceiling_seconds=self.memory.seconds(now),
            bans_active=self.bans.active(now),
            bans_total=self.bans.total,
            **self.bandwidth.gauges(),
            throttled_seconds=self.bandwidth.throttled_seconds(now),
        )

    def metrics_text(self) -> str:
        """The Prometheus exposition of the relay's counters and gauges."""
        return render(self.stats, self.snapshot())

    # ---- accepting ---------------------------------------------------------------------

    def _on_acceptable(self, lsock: socket.socket) -> None:
        now = self.clock()
        for sock, addr in self.admission.accept(lsock, now):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # reset before we got to it
                sock.close()
                continue
            self.add_connection(sock, addr, now)

    def add_connection(
        self, sock: socket.socket, addr: tuple, now: float | None = None
    ) -> Client | None:
        """Serve an accepted socket, if admission allows it; returns its client, or None."""
        if now is None:
            now = self.clock()
        decision = self.admission.decide(addr[0], len(self.clients), now)
        if decision.refused is not None:
            sock.close()
            limit = decision.refused
            if limit != "banned":  # a ban is said once, when it starts
                self.refusals.refused(limit, self._limit_value(limit), addr[0], now)
            return None
        if decision.evict is not None:
            evicted = decision.evict.ip
            self.refusals.refused(
                "max_handshakes", self.limits.max_handshakes, evicted, now, verb="evicting"
            )
            self._close(decision.evict, CloseReason.EVICTED)
        sock.setblocking(False)
        timeouts = self.timeouts
        wire = Connection(
            self.identity,
            now,
            conn_timeout=timeouts.conn_timeout,
            keepalive=timeouts.keepalive,
            rekey_interval=timeouts.rekey_interval,
            max_frame_length=self.limits.max_frame_length,
        )
        client = Client(next(self._ids), sock, addr[0], addr[1], wire)
        client.source = decision.source
        client.started = now
        self.clients[client.id] = client
        self.admission.admitted(client)
        self.output.set_events(client, selectors.EVENT_READ)
        self._schedule(client, wire.next_deadline())
        self.output.take(client)
        return client

    # ---- reading -----------------------------------------------------------------------

    def _on_readable(self, client: Client) -> None:
        wire = client.wire
        if wire.backlog:
            # Frames already received wait their turn: read no more until they are served.
            data = b""
        else:
            try:
                data = client.sock.recv(client.recv_size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._close(client, CloseReason.RESET, f"receive failed: {exc.strerror}")
                return
            if not data:
                self._close(client, CloseReason.PEER_CLOSED)
                return
            if len(data) == client.recv_size:
                if client.recv_size < RECV_MAX:
                    client.recv_size *= 2
            elif client.recv_size > RECV_MIN and len(data) < client.recv_size // 4:
                client.recv_size //= 2
        now = self.clock()
        if data and self.bandwidth.enabled:
            self.bandwidth.charge(client, len(data), now)
        was_open = wire.state is State.OPEN
        core = self.core
        cid = client.id
        # The direct path: a tunnel's messages go straight to its other end, packed as they
        # came, one queue move for the batch. Anything else (and a tunnel while actions wait,
        # so that they keep their order) goes through the core.
        peer = None if core.actions else core.tunnel_peer(cid)
        target = self.clients.get(peer) if peer is not None else None
        forward = target is not None and not target.closing
        try:
            if forward:
                forwarded = wire.receive_forward(data, now, FRAME_BUDGET)
            else:
                messages = wire.receive_data(data, now, FRAME_BUDGET)
        except ProtocolError as exc:
            self._close(client, exc.reason, str(exc))
            return
        if wire.backlog:
            self._backlog[client.id] = client
        else:
            self._backlog.pop(client.id, None)
        if not was_open and wire.state is State.OPEN:
            self._opened(client, wire.peer_public_key, now)  # type: ignore[arg-type]
        if wire.pending_output:
            self.output.take(client)
        if forward:
            if forwarded:
                assert target is not None
                target.wire.send_packed(forwarded, now)
                size = wire.forwarded_bytes
                client.bytes_in += size
                target.bytes_out += size
                stats = self.stats
                stats.messages_relayed += len(forwarded)
                stats.bytes_relayed += size
                self.output.take(target)
        elif messages:
            message = core.message
            for payload in messages:
                client.bytes_in += len(payload)
                message(cid, payload, now)

    def _opened(self, client: Client, peer_key: bytes, now: float) -> None:
        """The client's handshake finished: it is the core's from now on."""
        self.admission.opened(client)
        if self.bandwidth.enabled:
            over = self.bandwidth.opened(client)
            if over is not None:
                self._refuse_over_budget(client, over, now)
                return
        self.core.opened(client.id, peer_key, now, client.source)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s: open, key %s, after %.3f s",
                client.label,
                b64url_encode(peer_key)[:8],
                now - client.started,
            )
        self._schedule(client, client.wire.next_deadline())

    def _refuse_over_budget(self, client: Client, over: tuple[str, int], now: float) -> None:
        """``budgets.action = "refuse"``: a client over a budget gets no new tunnel (it is
        closed right after its handshake, before its Listen, Connect or Accept). Counted,
        logged and a strike towards a ban of its source, as a request refused by the access
        lists is (``REFUSED_REQUESTS``); here, since the close flushes and would be seen
        twice there."""
        self.stats.refused["budget"] += 1
        self.refusals.refused("budget", over[1], f"{client.ip} ({over[0]})", now)
        self.bans.strike(client.source, now)
        # The end of its handshake goes out first: the client sees a close, not a failure.
        self.output.take(client)
        self._close(client, CloseReason.BUDGET, flush=True)

    # ---- the core's actions ------------------------------------------------------------

    def _drain(self) -> None:
        """Apply the core's actions, oldest first. The only place they are taken: closes
        made here add theirs to the same deque, taken by this same loop, so nothing is
        applied twice and a batch costs time linear in its size."""
        actions = self.core.actions
        popleft = actions.popleft
        clients = self.clients
        stats = self.stats
        output = self.output
        now = self.clock()
        while actions:
            action = popleft()
            if type(action) is Send:
                target = clients.get(action.conn_id)
                if target is None or target.closing:
                    continue
                payload = action.payload
                target.wire.send_message(payload, now)
                target.bytes_out += len(payload)
                stats.messages_relayed += 1
                stats.bytes_relayed += len(payload)
                output.take(target)
            elif type(action) is Close:
                target = clients.get(action.conn_id)
                if target is not None:
                    self._close(target, action.reason, flush=action.flush)
            elif type(action) is Pause:
                target = clients.get(action.conn_id)
                if target is not None:
                    output.pause(target, PAUSED_BY_CORE)
            else:
                target = clients.get(action.conn_id)
                if target is not None:
                    output.resume(target, PAUSED_BY_CORE, now)

    def _can_queue(self, conn_id: int) -> bool:
        return self.output.can_queue(conn_id)

    def _limit_value(self, limit: str) -> int | None:
        """The setting behind a refusal by ``limit``, for the log line (None: a list)."""
        if limit == "connection_rate":
            return self.limits.new_connections_per_ip_per_second
        if limit == "memory":
            return self.limits.max_memory
        return getattr(self.limits, limit, None)

    # ---- the memory ceiling ------------------------------------------------------------

    def _check_memory(self, now: float) -> None:
        """Sample the resident size; over the ceiling, refuse new connections and pause the
        feeders of the largest output queues, more at each sample while it lasts; below
        the low mark, resume them all."""
        memory = self.memory
        memory.sample(now)
        self.admission.memory_full = memory.active
        output = self.output
        clients = self.clients
        if memory.active:
            queues = [c for c in clients.values() if c.out_size and not c.closing]
            peer_of = self.core.peer_of
            for target in heapq.nlargest(PAUSE_BATCH, queues, key=lambda c: c.out_size):
                feeder = peer_of(target.id)
                other = clients.get(feeder) if feeder is not None else None
                if other is not None and not other.paused & PAUSED_BY_MEMORY:
                    output.pause(other, PAUSED_BY_MEMORY)
                    self._memory_swept = False
        elif not self._memory_swept:
            # Below the low mark (or the first look after a hand-over, which keeps pauses).
            self._memory_swept = True
            for client in list(clients.values()):
                if client.paused & PAUSED_BY_MEMORY:
                    output.resume(client, PAUSED_BY_MEMORY, now)

    # ---- timers ------------------------------------------------------------------------

    def _schedule(self, client: Client, when: float) -> None:
        # One live entry per client; deadlines only ever move later except on state changes,
        # so an entry is pushed only when the new deadline is earlier than the live one.
        if when < client.timer_at:
            client.timer_at = when
            heapq.heappush(self._timers, (when, client.id))

    def _run_timers(self, now: float) -> None:
        timers = self._timers
        clients = self.clients
        while timers and timers[0][0] <= now:
            when, cid = heapq.heappop(timers)
            client = clients.get(cid)
            if client is None or client.timer_at != when:
                continue
            client.timer_at = float("inf")
            if now >= client.close_by:
                self._close(client, CloseReason.FLUSH_TIMEOUT)
                continue
            wire = client.wire
            if not client.paused and wire.timer_would_close(now):
                # Before closing for silence or an unfinished set-up, read what the peer has
                # sent: a loop that was busy must not take its own delay for the peer's.
                self._on_readable(client)
                if clients.get(cid) is not client:
                    continue
            try:
                wire.handle_timer(now)
            except ProtocolError as exc:
                self._close(client, exc.reason, str(exc))
                continue
            if wire.pending_output:
                self.output.take(client)
            self._schedule(client, min(wire.next_deadline(), client.close_by))
        if self.core.next_deadline() <= now:
            # As above: a first message waiting unread is read before its deadline closes.
            for cid in self.core.due_first_messages(now):
                client = clients.get(cid)
                if client is not None and not client.paused:
                    self._on_readable(client)
            self.core.handle_timer(now)
        if self.core.actions:
            self._drain()
        self.admission.handle_timer(now)
        if self.bandwidth.next_deadline() <= now:
            self.bandwidth.handle_timer(now)

    # ---- closing -----------------------------------------------------------------------

    def _close(
        self, client: Client, reason: CloseReason, detail: str = "", *, flush: bool = False
    ) -> None:
        """Close ``client`` for ``reason``, or with ``flush`` first send what it has queued.

        Never applies the core's actions: what the close causes is queued for ``_drain``.
        """
        cid = client.id
        if self.clients.get(cid) is not client:
            return
        if not client.role:
            role = self.core.role(cid)
            if role is not None:
                client.role = _ROLE_NAMES[role]
            elif self.admission.is_handshaking(client):
                client.role = "handshake"
        if reason in _CONNECT_LIMITS:
            limit = _CONNECT_LIMITS[reason]
            self.refusals.refused(limit, getattr(self.limits, limit), client.ip, self.clock())
        elif reason in REFUSED_REQUESTS:
            now = self.clock()
            self.stats.refused[reason.value] += 1
            self.refusals.refused(reason.value, None, client.ip, now)
            self.bans.strike(client.source, now)
        elif reason not in _NOT_STRIKES and self.admission.is_handshaking(client):
            self.bans.strike(client.source, self.clock())
        if flush and not client.closing and client.out:
            client.closing = True
            client.close_reason = reason
            self.output.pause(client, PAUSED_BY_CLOSE)
            self.core.closed(cid)
            self.output.want_write(client, True)
            # A peer that never reads must not keep a closing connection forever.
            client.close_by = self.clock() + self.timeouts.keepalive
            self._schedule(client, client.close_by)
            return
        del self.clients[cid]
        self._backlog.pop(cid, None)
        self.accounting.closed(
            client,
            reason,
            handshaking=self.admission.is_handshaking(client),
            detail=detail,
            now=self.clock(),
        )
        self.admission.left(client)
        if client.meter is not None:
            self.bandwidth.closed(client)
        self.output.forget(client)
        client.sock.close()
        self.core.closed(cid)

    # ---- reload and shutdown -----------------------------------------------------------

    def _reload(self) -> None:
        """Read the configuration again; apply all of it, or none of it if it is bad."""
        self._reload_requested = False
        if self._reload_config is None:
            log.info("reload requested, but the relay runs without a config file")
            return
        try:
            config = self._reload_config()
        except Exception as exc:  # any failure keeps the running config
            self._reload_failed(str(exc) or type(exc).__name__)
            return
        running = self.config
        fixed = [name for name in RESTART_ONLY if getattr(config, name) != getattr(running, name)]
        if fixed:
            # Said on every reload while the file and the running relay differ, and the
            # server's config keeps saying what is running.
            log.warning(
                "reload: %s changed in the configuration; this takes a restart, the relay "
                "keeps running with the old value",
                ", ".join(fixed),
            )
            config = dataclasses.replace(
                config, **{name: getattr(running, name) for name in RESTART_ONLY}
            )
        changes = _changes(running, config)
        root = logging.getLogger()
        old_level = root.level
        self._apply_config(config)
        self.reload_error = ""
        self.stats.reload_successful = True
        self.stats.reload_success_time = time.time()
        # Said once in force, at the more verbose of the old and the new log level: a
        # reload to warning still says what it changed, and so does the reload back.
        new_level = root.level
        root.setLevel(min(old_level, new_level))
        for line in changes:
            log.info("reload: %s", line)
        log.info(
            "configuration reloaded: %s",
            f"{len(changes)} setting{'s' if len(changes) != 1 else ''} changed"
            if changes
            else "nothing changed",
        )
        root.setLevel(new_level)
        self.notifier.notify("STATUS=" + self.status_text())

    def _reload_failed(self, reason: str) -> None:
        """One line in the log, the verdict in STATUS= and the metric; nothing applied."""
        reason = " ".join(reason.split())  # one line, whatever the error held
        log.error("reload failed, keeping the running configuration: %s", reason)
        self.reload_error = reason
        self.stats.reload_successful = False
        self.notifier.notify("STATUS=" + self.status_text())

    def shutdown(self) -> None:
        """Stop listening and close every connection (``serve_forever`` ends with this)."""
        self.notifier.notify("STOPPING=1")
        for sock in self.listen_sockets:
            if not self.admission.paused_until:  # while shedding they are not registered
                self.selector.unregister(sock)
            sock.close()
        self.listen_sockets.clear()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        for client in list(self.clients.values()):
            self._close(client, CloseReason.SHUTDOWN)
        self.core.actions.clear()  # every connection is closed already
        self.admission.stop()
        self.bandwidth.stop(self.clock())
        log.info("stopped")


def _changes(old: Config, new: Config) -> list[str]:
    """``"limits.max_connections 20000 -> 100"`` for every setting that differs."""
    before, after = config_values(old), config_values(new)
    lines = []
    for key in sorted(before.keys() | after.keys()):
        was, now = before.get(key), after.get(key)
        if was != now:
            lines.append(f"{key} {_shown(was)} -> {_shown(now)}")
    return lines


def _shown(value: object) -> str:
    if value is None:
        text = "(unset)"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str) and value and not any(c.isspace() for c in value):
        text = value
    elif isinstance(value, (str, list)):
        text = repr(value)
    else:
        text = str(value)
    return text if len(text) <= CHANGE_SHOWN else text[: CHANGE_SHOWN - 3] + "..."


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


class BindError(OSError):
    """A listening socket could not be opened; names the address."""

    def __init__(self, host: str, port: int, cause: OSError, *, kind: str = "relay") -> None:
        shown = format_address(host, port)
        super().__init__(cause.errno, f"cannot listen on {shown}: {cause.strerror or cause}")
        self.host, self.port, self.kind = host, port, kind

    def __str__(self) -> str:
        return self.strerror or ""


def run(
    config: Config,
    identity: SigningKey,
    *,
    reload_config: Callable[[], Config] | None = None,
    announce: Callable[[], None] | None = None,
) -> int:
    """Serve with ``config`` until SIGTERM or SIGINT; returns the process exit code."""
    server = RelayServer(config, identity, reload_config=reload_config)
    manager = ServiceManager.from_environment()
    inherited = Inherited.from_environment()
    try:
        bound = server.bind(inherited)
    except BindError:
        inherited.close_rest()
        raise  # the caller explains it, in one line
    if manager is not None:
        server.handover = Handover(manager)
        server.handover.started(server, inherited)
    else:
        inherited.close_rest()  # nothing to hand back to without a service manager
    if announce is not None:
        announce()  # more start-up lines, once the sockets are open
    for host, port in bound:
        log.info("listening on %s", format_address(host, port))
    if server.metrics is not None:
        log.info("metrics on http://%s/metrics", format_address(*server.metrics.address))
    log.info("relay public key %s", b64url_encode(server.public_key))
    server.notifier.notify("READY=1\nSTATUS=" + server.status_line())
    server.serve_forever()
    return 0
