"""The IO shell: one selectors loop that moves bytes between sockets and the sans-IO core.

It owns sockets, the clock, signals, limits, back-pressure and systemd notifications; the
protocol itself lives in ``wire.Connection`` (per connection) and ``relay.core.RelayCore``.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import selectors
import signal
import socket
import time
from collections import OrderedDict

from nacl.signing import SigningKey

from ..config import Config
from ..errors import ProtocolError
from ..wire.connection import Connection, State
from .core import CLOSE, PAUSE, RESUME, SEND, CoreLimits, RelayCore, Role
from .metrics import MetricsEndpoint, Snapshot, Stats, close_reason, handshake_failure, render
from .notify import Notifier

log = logging.getLogger("strelay")

EX_UNAVAILABLE = 69
# Read sizes adapt per connection, as event loops do: a read that fills the request doubles
# the next one (bulk streams), a short one halves it. Small reads keep CPython's bytes
# objects below glibc's mmap threshold, which otherwise costs an mmap, mremap and munmap
# per read (bench/PROFILE.md); large ones keep a bulk stream to few system calls.
RECV_MIN = 64 * 1024
RECV_MAX = 1024 * 1024
ACCEPT_BATCH = 64
IOV_MAX = 1024
STATUS_INTERVAL = 2.0

# Reasons a connection's reading is paused; reading resumes when none is left.
PAUSED_BY_PEER = 1  # the connection it feeds has too much queued output
PAUSED_BY_CORE = 2  # its half-tunnel buffer is full
PAUSED_BY_CLOSE = 4  # it is closing after a flush


class Client:
    """One accepted TCP connection: its socket, its protocol stack and its output queue."""

    __slots__ = (
        "id",
        "sock",
        "ip",
        "label",
        "wire",
        "out",
        "out_size",
        "paused",
        "closing",
        "events",
        "timer_at",
        "close_by",
        "recv_size",
    )

    def __init__(self, conn_id: int, sock: socket.socket, ip: str, port: int, wire: Connection):
        self.id = conn_id
        self.sock = sock
        self.ip = ip
        self.label = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        self.wire = wire
        self.out: list = []
        self.out_size = 0
        self.paused = 0
        self.closing = False
        self.events = 0
        self.timer_at = float("inf")
        self.close_by = float("inf")  # a closing connection's flush must end by then
        self.recv_size = RECV_MIN


class RelayServer:
    """A relay listening on the configured addresses, serving until ``stop`` is called."""

    def __init__(
        self,
        config: Config,
        identity: SigningKey,
        *,
        config_path: os.PathLike | None = None,
        reload_config=None,
    ) -> None:
        self.config = config
        self.identity = identity
        self.public_key = bytes(identity.verify_key)
        self._reload_config = reload_config
        self.selector = selectors.DefaultSelector()
        self.listen_sockets: list[socket.socket] = []
        self.clients: dict[int, Client] = {}
        self.handshaking: OrderedDict[int, Client] = OrderedDict()
        self.per_ip: dict[str, int] = {}
        self.stats = Stats()
        self.notifier = Notifier()
        self._ids = itertools.count(1)
        self._timers: list[tuple[float, int, int]] = []
        self._dirty: set[Client] = set()
        self._stopping = False
        self._reload_requested = False
        self._wakeup_r: socket.socket | None = None
        self._wakeup_w: socket.socket | None = None
        self._reserve_fd: int | None = None
        self._accept_paused_until = 0.0
        self._fd_warning_at = 0.0
        self.metrics: MetricsEndpoint | None = None
        self._apply_limits(config)

    # ---- set-up ------------------------------------------------------------------------

    def _apply_limits(self, config: Config) -> None:
        limits, timeouts = config.limits, config.timeouts
        self.limits = limits
        self.timeouts = timeouts
        core_limits = CoreLimits(
            relay_conn_timeout=timeouts.relay_conn_timeout,
            half_tunnel_timeout=timeouts.half_tunnel,
            max_half_tunnels_per_listener=limits.max_half_tunnels_per_listener,
            half_tunnel_buffer=limits.half_tunnel_buffer,
        )
        if hasattr(self, "core"):
            self.core.limits = core_limits
        else:
            self.core = RelayCore(core_limits, can_queue=self._can_queue)

    def bind(self) -> list[tuple[str, int]]:
        """Open the listening sockets; returns the bound addresses (ports resolved)."""
        bound = []
        for host, port in self.config.listen:
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
                    self.selector, (host, port), self.metrics_text, self.stats
                )
            except OSError as exc:
                raise BindError(host, port, exc) from None
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

    # ---- the loop ----------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Run until stopped; then close every connection."""
        self._install_signals()
        self._reserve_fd = os.open(os.devnull, os.O_RDONLY)
        watchdog = self.notifier.watchdog_interval()
        next_watchdog = next_status = 0.0
        select = self.selector.select
        monotonic = time.monotonic
        while not self._stopping:
            now = monotonic()
            deadline = min(self._next_deadline(), now + 1.0)
            for key, mask in select(max(0.0, deadline - now)):
                obj = key.data
                if isinstance(obj, Client):
                    if mask & selectors.EVENT_WRITE:
                        self._on_writable(obj)
                    if mask & selectors.EVENT_READ and obj.id in self.clients:
                        self._on_readable(obj)
                elif obj is self._wakeup_r:
                    self._drain_wakeup()
                elif isinstance(obj, socket.socket):
                    self._on_acceptable(obj)
                else:
                    obj.handle(mask)
            now = monotonic()
            self._run_timers(now)
            if self._dirty:
                self._flush_dirty()
            if self._reload_requested:
                self._reload()
            if watchdog and now >= next_watchdog:
                self.notifier.notify("WATCHDOG=1")
                next_watchdog = now + watchdog
            if now >= next_status:
                self.notifier.notify("STATUS=" + self.status_line())
                next_status = now + STATUS_INTERVAL
                if self.metrics is not None:
                    self.metrics.expire(now)
        self._shutdown()

    def _next_deadline(self) -> float:
        timers = self._timers
        first = timers[0][0] if timers else float("inf")
        return min(first, self.core.next_deadline(), self._accept_paused_until or float("inf"))

    def _drain_wakeup(self) -> None:
        try:
            while self._wakeup_r.recv(4096):  # type: ignore[union-attr]
                pass
        except OSError:
            pass

    def status_line(self) -> str:
        """The headline counts, as systemd's STATUS= shows them (the same as /metrics)."""
        stats = self.stats
        return (
            f"{len(self.clients)} connections, {len(self.handshaking)} handshaking, "
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
        rekeys = 0
        for cid, client in self.clients.items():
            rekeys += client.wire.rekeys
            if client.closing:
                counts["closing"] += 1
            elif cid in self.handshaking:
                counts["handshaking"] += 1
            else:
                counts[names.get(role(cid), "waiting")] += 1
        return Snapshot(
            connections=counts,
            listeners=self.core.listener_count,
            half_tunnels=self.core.half_tunnel_count,
            tunnels=self.core.tunnels,
            rekeys_live=rekeys,
        )

    def metrics_text(self) -> str:
        """The Prometheus exposition of the relay's counters and gauges."""
        return render(self.stats, self.snapshot())

    # ---- accepting ---------------------------------------------------------------------

    def _on_acceptable(self, lsock: socket.socket) -> None:
        now = time.monotonic()
        if now < self._accept_paused_until:
            return
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._shed_on_fd_exhaustion(lsock, exc, now)
                # ECONNABORTED and the like concern one connection only.
                return
            self._admit(sock, addr, now)

    def _shed_on_fd_exhaustion(self, lsock: socket.socket, exc: OSError, now: float) -> None:
        """Out of descriptors: refuse the waiting connections cleanly, keep serving others."""
        if now >= self._fd_warning_at:
            # One line per minute while it lasts, not one per shed.
            log.warning("out of file descriptors (%s): shedding new connections", exc.strerror)
            self._fd_warning_at = now + 60.0
        if self._reserve_fd is not None:
            # The reserve descriptor lets each waiting connection be accepted and closed at
            # once (a clean refusal) instead of waiting in the backlog until it times out.
            os.close(self._reserve_fd)
            self._reserve_fd = None
            for _ in range(ACCEPT_BATCH):
                try:
                    sock, _ = lsock.accept()
                except OSError:
                    break
                sock.close()
                self.stats.refused["file_descriptors"] += 1
            try:
                self._reserve_fd = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                pass
        else:
            self.stats.refused["file_descriptors"] += 1
        # A listening socket we cannot serve stays readable: stop watching the listening
        # sockets for a moment rather than spin on them, then look again.
        if not self._accept_paused_until:
            for sock in self.listen_sockets:
                self.selector.unregister(sock)
        self._accept_paused_until = now + 0.1

    def _admit(self, sock: socket.socket, addr: tuple, now: float) -> None:
        ip = addr[0]
        limits = self.limits
        if len(self.clients) >= limits.max_connections:
            self.stats.refused["max_connections"] += 1
            sock.close()
            return
        if self.per_ip.get(ip, 0) >= limits.max_connections_per_ip:
            self.stats.refused["max_connections_per_ip"] += 1
            sock.close()
            return
        if len(self.handshaking) >= limits.max_handshakes:
            # Evict the oldest unfinished handshake: honest peers finish in milliseconds, so
            # the oldest is the likeliest to be a stalled or hostile one.
            oldest = next(iter(self.handshaking.values()))
            self.stats.refused["max_handshakes"] += 1
            self._close(oldest, "evicted: too many handshakes in progress")
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        timeouts = self.timeouts
        wire = Connection(
            self.identity,
            now,
            conn_timeout=timeouts.conn_timeout,
            keepalive=timeouts.keepalive,
            rekey_interval=timeouts.rekey_interval,
            max_frame_length=limits.max_frame_length,
        )
        client = Client(next(self._ids), sock, ip, addr[1], wire)
        self.clients[client.id] = client
        self.handshaking[client.id] = client
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        self.stats.accepted += 1
        client.events = selectors.EVENT_READ
        self.selector.register(sock, selectors.EVENT_READ, client)
        self._schedule(client, wire.next_deadline())
        self._take_output(client)

    # ---- reading -----------------------------------------------------------------------

    def _on_readable(self, client: Client) -> None:
        try:
            data = client.sock.recv(client.recv_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(client, f"receive failed: {exc.strerror}")
            return
        if not data:
            self._close(client, "peer closed the connection")
            return
        if len(data) == client.recv_size:
            if client.recv_size < RECV_MAX:
                client.recv_size *= 2
        elif client.recv_size > RECV_MIN and len(data) < client.recv_size // 4:
            client.recv_size //= 2
        now = time.monotonic()
        wire = client.wire
        was_open = wire.state is State.OPEN
        try:
            messages = wire.receive_data(data, now)
        except ProtocolError as exc:
            self._close(client, str(exc))
            return
        core = self.core
        if not was_open and wire.state is State.OPEN:
            self.handshaking.pop(client.id, None)
            self.stats.handshakes_completed += 1
            core.opened(client.id, wire.peer_public_key, now)  # type: ignore[arg-type]
            self._schedule(client, wire.next_deadline())
        if wire.pending_output:
            self._take_output(client)
        if messages:
            message = core.message
            cid = client.id
            for payload in messages:
                message(cid, payload, now)
            if core.actions:
                self._apply(core.actions, now)

    # ---- the core's actions ------------------------------------------------------------

    def _apply(self, actions: list, now: float) -> None:
        clients = self.clients
        stats = self.stats
        for action in actions:
            kind = action[0]
            if kind == SEND:
                target = clients.get(action[1])
                if target is None or target.closing:
                    continue
                payload = action[2]
                target.wire.send_message(payload, now)
                stats.messages_relayed += 1
                stats.bytes_relayed += len(payload)
                self._take_output(target)
            elif kind == CLOSE:
                target = clients.get(action[1])
                if target is not None:
                    self._close(target, action[2], flush=action[3])
            elif kind == PAUSE:
                target = clients.get(action[1])
                if target is not None:
                    self._pause(target, PAUSED_BY_CORE)
            elif kind == RESUME:
                target = clients.get(action[1])
                if target is not None:
                    self._resume(target, PAUSED_BY_CORE, now)
        actions.clear()

    def _can_queue(self, conn_id: int) -> bool:
        client = self.clients.get(conn_id)
        return client is not None and client.out_size < self.limits.buffer_high_water

    # ---- writing and back-pressure -----------------------------------------------------

    def _take_output(self, client: Client) -> None:
        """Move the protocol stack's output to the socket queue; it is written once per loop."""
        chunks = client.wire.data_to_send()
        if chunks:
            client.out.extend(chunks)
            client.out_size += sum(map(len, chunks))
            self._dirty.add(client)

    def _flush_dirty(self) -> None:
        dirty = self._dirty
        self._dirty = set()
        for client in dirty:
            if client.id in self.clients:
                self._write(client)

    def _write(self, client: Client) -> None:
        out = client.out
        try:
            sent = client.sock.sendmsg(out[:IOV_MAX] if len(out) > IOV_MAX else out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._close(client, f"send failed: {exc.strerror}")
            return
        if sent:
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
            self._want_write(client, True)
        else:
            self._want_write(client, False)
            if client.closing:
                self._close(client, "closed after flush")
                return
        self._balance(client)

    def _balance(self, client: Client) -> None:
        """Back-pressure: pause the tunnel peer feeding a full queue, resume it once drained."""
        size = client.out_size
        if size > self.limits.buffer_high_water:
            feeder = self.core.peer_of(client.id)
            if feeder is not None:
                other = self.clients.get(feeder)
                if other is not None and not other.paused & PAUSED_BY_PEER:
                    self._pause(other, PAUSED_BY_PEER)
        elif size < self.limits.buffer_low_water:
            feeder = self.core.peer_of(client.id)
            if feeder is not None:
                other = self.clients.get(feeder)
                if other is not None and other.paused & PAUSED_BY_PEER:
                    self._resume(other, PAUSED_BY_PEER, time.monotonic())

    def _on_writable(self, client: Client) -> None:
        self._write(client)

    def _want_write(self, client: Client, on: bool) -> None:
        events = client.events
        new = events | selectors.EVENT_WRITE if on else events & ~selectors.EVENT_WRITE
        self._set_events(client, new)

    def _set_events(self, client: Client, events: int) -> None:
        if events == client.events:
            return
        if client.events == 0:
            self.selector.register(client.sock, events, client)
        elif events == 0:
            self.selector.unregister(client.sock)
        else:
            self.selector.modify(client.sock, events, client)
        client.events = events

    def _pause(self, client: Client, reason: int) -> None:
        if not client.paused:
            client.wire.pause_reading()
            self._set_events(client, client.events & ~selectors.EVENT_READ)
        client.paused |= reason

    def _resume(self, client: Client, reason: int, now: float) -> None:
        if not client.paused & reason:
            return
        client.paused &= ~reason
        if not client.paused:
            client.wire.resume_reading(now)
            self._set_events(client, client.events | selectors.EVENT_READ)
            self._schedule(client, client.wire.next_deadline())

    # ---- timers ------------------------------------------------------------------------

    def _schedule(self, client: Client, when: float) -> None:
        # One live entry per client; deadlines only ever move later except on state changes,
        # so an entry is pushed only when the new deadline is earlier than the live one.
        if when < client.timer_at:
            client.timer_at = when
            heapq.heappush(self._timers, (when, client.id, 0))

    def _run_timers(self, now: float) -> None:
        timers = self._timers
        clients = self.clients
        while timers and timers[0][0] <= now:
            when, cid, _ = heapq.heappop(timers)
            client = clients.get(cid)
            if client is None or client.timer_at != when:
                continue
            client.timer_at = float("inf")
            if now >= client.close_by:
                self.stats.closed["flush_timeout"] += 1
                self._close(client, "flush before close timed out")
                continue
            wire = client.wire
            try:
                wire.handle_timer(now)
            except ProtocolError as exc:
                self._close(client, str(exc))
                continue
            if wire.pending_output:
                self._take_output(client)
            self._schedule(client, min(wire.next_deadline(), client.close_by))
        if self.core.next_deadline() <= now:
            self.core.handle_timer(now)
            if self.core.actions:
                self._apply(self.core.actions, now)
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            for sock in self.listen_sockets:
                self.selector.register(sock, selectors.EVENT_READ, sock)

    # ---- closing -----------------------------------------------------------------------

    def _count_close(self, client: Client, reason: str) -> None:
        stats = self.stats
        if client.id in self.handshaking:
            if "evicted" in reason:
                label = "evicted"
            elif "peer closed" in reason or "failed:" in reason:
                label = "peer_closed"
            elif "shutting down" in reason:
                stats.closed["shutdown"] += 1
                return
            else:
                label = handshake_failure(reason)
            stats.handshakes_failed[label] += 1
            stats.closed["handshake_failed"] += 1
        else:
            stats.closed[close_reason(reason)] += 1

    def _close(self, client: Client, reason: str, flush: bool = False) -> None:
        if not client.closing:
            if client.id not in self.clients:
                return
            self._count_close(client, reason)
        if flush and client.out and not client.closing:
            client.closing = True
            self._pause(client, PAUSED_BY_CLOSE)
            self.core.closed(client.id)
            self._want_write(client, True)
            # A peer that never reads must not keep a closing connection forever.
            client.close_by = time.monotonic() + self.timeouts.keepalive
            self._schedule(client, client.close_by)
            return
        log.debug("%s: closed: %s", client.label, reason)
        cid = client.id
        if self.clients.pop(cid, None) is None:
            return
        self.handshaking.pop(cid, None)
        self._dirty.discard(client)
        count = self.per_ip.get(client.ip, 1) - 1
        if count:
            self.per_ip[client.ip] = count
        else:
            self.per_ip.pop(client.ip, None)
        if client.events:
            self.selector.unregister(client.sock)
            client.events = 0
        client.sock.close()
        client.out.clear()
        self.stats.rekeys_closed += client.wire.rekeys
        self.core.closed(cid)
        if self.core.actions:
            self._apply(self.core.actions, time.monotonic())

    def _reload(self) -> None:
        self._reload_requested = False
        if self._reload_config is None:
            log.info("reload requested, but the relay runs without a config file")
            return
        try:
            config = self._reload_config()
        except Exception as exc:  # noqa: BLE001 - any failure keeps the running config
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        if (
            config.listen != self.config.listen
            or config.identity_file != self.config.identity_file
            or config.metrics != self.config.metrics
        ):
            log.warning("reload: listen addresses, identity and metrics change only on restart")
        self.config = config
        self._apply_limits(config)
        logging.getLogger().setLevel(config.log_level.upper())
        log.info("configuration reloaded (limits, timeouts for new connections, log level)")

    def _shutdown(self) -> None:
        self.notifier.notify("STOPPING=1")
        for sock in self.listen_sockets:
            if not self._accept_paused_until:  # while shedding they are not registered
                self.selector.unregister(sock)
            sock.close()
        self.listen_sockets.clear()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        for client in list(self.clients.values()):
            self._close(client, "relay shutting down")
        if self._reserve_fd is not None:
            os.close(self._reserve_fd)
            self._reserve_fd = None
        log.info("stopped")


class BindError(OSError):
    """A listening socket could not be opened; names the address."""

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        super().__init__(cause.errno, f"cannot listen on {shown}: {cause.strerror or cause}")

    def __str__(self) -> str:
        return self.strerror


def run(config: Config, identity: SigningKey, *, reload_config=None) -> int:
    """Serve with ``config`` until SIGTERM or SIGINT; returns the process exit code."""
    server = RelayServer(config, identity, reload_config=reload_config)
    try:
        bound = server.bind()
    except BindError as exc:
        log.error("%s", exc)
        return EX_UNAVAILABLE
    for host, port in bound:
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info("listening on %s", shown)
    if server.metrics is not None:
        host, port = server.metrics.address
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info("metrics on http://%s/metrics", shown)
    log.info("relay public key %s", _b64(server.public_key))
    server.notifier.notify("READY=1\nSTATUS=" + server.status_line())
    server.serve_forever()
    return 0


def _b64(key: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(key).rstrip(b"=").decode()
