"""The relay's counters and a Prometheus endpoint served by the relay's own selectors loop.

Counting costs a few integer additions on the hot path; everything else (gauges, labels,
text rendering) happens only when someone scrapes ``GET /metrics``.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .. import __version__
from ..errors import CloseReason

log = logging.getLogger("strelay")

# The wire protocol's reasons: labelled as such while the handshake runs, counted together
# as protocol_error once the channel is open (a keepalive timeout has its own label).
_PROTOCOL = (
    CloseReason.VERSION,
    CloseReason.BAD_DH_KEY,
    CloseReason.BAD_SIGNATURE,
    CloseReason.WRONG_NONCE,
    CloseReason.WRONG_KEY,
    CloseReason.SETUP_TIMEOUT,
    CloseReason.OVERSIZE_FRAME,
    CloseReason.DECRYPT_FAILED,
    CloseReason.MALFORMED,
)
HANDSHAKE_FAILURES = (*(r.value for r in _PROTOCOL), "peer_closed", "evicted")

_CLOSE_LABEL = {reason: reason.value for reason in CloseReason}
_CLOSE_LABEL.update({reason: "protocol_error" for reason in _PROTOCOL})
_CLOSE_LABEL[CloseReason.EVICTED] = "handshake_evicted"
# Every close is counted once, under one of these.
CLOSE_REASONS = (
    *(label for label in dict.fromkeys(_CLOSE_LABEL.values()) if label != "protocol_error"),
    "handshake_failed",
    "protocol_error",
)
REFUSAL_LIMITS = (
    "max_connections",
    "max_connections_per_ip",
    "max_handshakes",
    "file_descriptors",
    "connection_rate",
    "ip_denied",
    "listen_denied",
    "connect_denied",
    "banned",
    "memory",
    "budget",
)
# Why reading was paused by relay/bandwidth.py: the kind of bucket (the memory ceiling's pauses
# are counted in memory_ceiling_seconds_total).
THROTTLE_KINDS = ("connection", "key", "prefix", "total", "budget")
# accept() errors that mean the process (or system) is out of descriptors or memory.
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def close_label(reason: CloseReason) -> str:
    """The ``connections_closed_total`` label of an open connection closed for ``reason``."""
    return _CLOSE_LABEL[reason]


def handshake_label(reason: CloseReason) -> str:
    """The ``handshakes_failed_total`` label of a handshake that ended for ``reason``."""
    if reason is CloseReason.PEER_CLOSED or reason is CloseReason.RESET:
        return "peer_closed"
    if reason is CloseReason.EVICTED:
        return "evicted"
    return reason.value if reason in _PROTOCOL else "malformed"


@dataclass
class Stats:
    """Counters the relay keeps: plain integers and dicts, bumped on the loop's thread only."""

    start_time: float = field(default_factory=time.time)
    accepted: int = 0
    handshakes_completed: int = 0
    handshakes_failed: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(HANDSHAKE_FAILURES, 0)
    )
    closed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLOSE_REASONS, 0))
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REFUSAL_LIMITS, 0))
    messages_relayed: int = 0
    bytes_relayed: int = 0
    rekeys_closed: int = 0  # rekeys of connections already gone; live ones are summed on scrape
    # Seconds connections spent with reading paused, summed over connections, by kind.
    throttled_seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(THROTTLE_KINDS, 0.0)
    )
    # The last reload's verdict, and when the running configuration was last read in full
    # (the start, or the last reload that succeeded).
    reload_successful: bool = True
    reload_success_time: float = field(default_factory=time.time)

    @property
    def handshakes_failed_total(self) -> int:
        return sum(self.handshakes_failed.values())


@dataclass(frozen=True)
class Snapshot:
    """Gauges read from the server at scrape time."""

    connections: dict[str, int]
    listeners: int
    half_tunnels: int
    tunnels: int
    rekeys_live: int
    memory_rss: int = 0
    memory_ceiling_active: int = 0
    memory_ceiling_seconds: float = 0.0
    bans_active: int = 0
    bans_total: int = 0
    # Transfer budgets (relay/bandwidth.py): bytes counted, and who is over a budget.
    budget_used: dict[str, int] = field(default_factory=dict)
    budget_over: dict[str, int] = field(default_factory=dict)
    # Throttled seconds by kind, pauses still running included (None: those of ``Stats``).
    throttled_seconds: dict[str, float] | None = None


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(stats: Stats, snap: Snapshot) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    out: list[str] = []

    def metric(
        name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], object]]
    ) -> None:
        out.append(f"# HELP offset_relay_{name} {help_text}")
        out.append(f"# TYPE offset_relay_{name} {kind}")
        for labels, value in samples:
            label_text = (
                "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"
                if labels
                else ""
            )
            out.append(f"offset_relay_{name}{label_text} {value}")

    metric("build_info", "gauge", "Version of the running relay.", [({"version": __version__}, 1)])
    metric(
        "start_time_seconds",
        "gauge",
        "Start time of the relay process, seconds since the epoch.",
        [({}, f"{stats.start_time:.3f}")],
    )
    metric(
        "connections",
        "gauge",
        "Open connections by state.",
        [({"state": state}, count) for state, count in snap.connections.items()],
    )
    metric("listeners", "gauge", "Public keys currently listening.", [({}, snap.listeners)])
    metric("half_tunnels", "gauge", "Connects waiting for an accept.", [({}, snap.half_tunnels)])
    metric("tunnels", "gauge", "Established tunnels.", [({}, snap.tunnels)])
    metric(
        "connections_accepted_total",
        "counter",
        "TCP connections admitted.",
        [({}, stats.accepted)],
    )
    metric(
        "connections_refused_total",
        "counter",
        "Connections refused or dropped by a limit.",
        [({"limit": limit}, n) for limit, n in stats.refused.items()],
    )
    metric(
        "connections_closed_total",
        "counter",
        "Connections closed, by reason.",
        [({"reason": reason}, n) for reason, n in stats.closed.items()],
    )
    metric(
        "handshakes_completed_total",
        "counter",
        "Secure channel handshakes completed.",
        [({}, stats.handshakes_completed)],
    )
    metric(
        "handshakes_failed_total",
        "counter",
        "Connections that failed before their secure channel opened, by reason.",
        [({"reason": reason}, n) for reason, n in stats.handshakes_failed.items()],
    )
    metric(
        "relayed_messages_total",
        "counter",
        "Messages forwarded by the relay (tunnel data and notifications).",
        [({}, stats.messages_relayed)],
    )
    metric(
        "relayed_bytes_total",
        "counter",
        "Payload bytes forwarded by the relay.",
        [({}, stats.bytes_relayed)],
    )
    metric(
        "rekeys_total",
        "counter",
        "Secure channel rekeys completed.",
        [({}, stats.rekeys_closed + snap.rekeys_live)],
    )
    metric(
        "keepalive_timeouts_total",
        "counter",
        "Connections closed because nothing arrived within the keepalive timeout.",
        [({}, stats.closed["keepalive_timeout"])],
    )
    metric(
        "memory_rss_bytes",
        "gauge",
        "Resident memory of the relay process.",
        [({}, snap.memory_rss)],
    )
    metric(
        "memory_ceiling_active",
        "gauge",
        "1 while the relay is over limits.max_memory (and not yet below its low mark).",
        [({}, snap.memory_ceiling_active)],
    )
    metric(
        "memory_ceiling_seconds_total",
        "counter",
        "Time spent over the memory ceiling, refusing connections and pausing feeders.",
        [({}, f"{snap.memory_ceiling_seconds:.3f}")],
    )
    metric("bans_active", "gauge", "Sources (IP prefixes) banned now.", [({}, snap.bans_active)])
    metric("bans_total", "counter", "Bans of sources so far.", [({}, snap.bans_total)])
    throttled = (
        stats.throttled_seconds if snap.throttled_seconds is None else snap.throttled_seconds
    )
    metric(
        "throttled_seconds_total",
        "counter",
        "Seconds connections spent with reading paused by a bandwidth limit or a budget's "
        "floor rate, summed over connections (pauses still running included).",
        [({"kind": kind}, f"{seconds:.3f}") for kind, seconds in throttled.items()],
    )
    metric(
        "budget_used_bytes",
        "gauge",
        "Bytes read from clients in the current UTC month (total_month) and day (total_day).",
        [({"scope": scope}, n) for scope, n in snap.budget_used.items()],
    )
    metric(
        "budget_over",
        "gauge",
        "Keys and prefixes over a transfer budget (total: 1 if the relay's monthly one is spent).",
        [({"scope": s}, snap.budget_over.get(s, 0)) for s in ("key", "prefix", "total")],
    )
    metric(
        "config_last_reload_successful",
        "gauge",
        "Whether the last reload of the configuration succeeded (1) or was refused (0).",
        [({}, int(stats.reload_successful))],
    )
    metric(
        "config_last_reload_success_timestamp_seconds",
        "gauge",
        "When the running configuration was last read: the start or the last good reload.",
        [({}, f"{stats.reload_success_time:.3f}")],
    )
    return "\n".join(out) + "\n"


# -- the HTTP endpoint ------------------------------------------------------------------------

MAX_REQUEST = 8192
MAX_CLIENTS = 16
REQUEST_TIMEOUT = 5.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


class _Exchange:
    """One HTTP connection: read one request, write one response, close."""

    __slots__ = ("endpoint", "sock", "inbuf", "outbuf", "deadline", "events")

    def __init__(self, endpoint: MetricsEndpoint, sock: socket.socket, now: float) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.inbuf = b""
        self.outbuf = b""
        self.deadline = now + REQUEST_TIMEOUT
        self.events = selectors.EVENT_READ

    def handle(self, mask: int, now: float) -> None:
        if mask & selectors.EVENT_READ and not self.outbuf:
            self._read()
        elif mask & selectors.EVENT_WRITE:
            self._write()

    def _read(self) -> None:
        try:
            data = self.sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.endpoint.drop(self)
            return
        if not data:
            self.endpoint.drop(self)
            return
        self.inbuf += data
        end = self.inbuf.find(b"\r\n\r\n")
        if end < 0:
            end = self.inbuf.find(b"\n\n")
        if end < 0:
            if len(self.inbuf) > MAX_REQUEST:
                self._respond(400, b"request too large\n")
            return
        self._respond(*self.endpoint.answer(self.inbuf[:end]))

    def _respond(self, status: int, body: bytes, head_only: bool = False) -> None:
        content_type = (
            "text/plain; version=0.0.4; charset=utf-8"
            if status == 200
            else "text/plain; charset=utf-8"
        )
        header = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        self.outbuf = header + (b"" if head_only else body)
        self.events = selectors.EVENT_WRITE
        self.endpoint.selector.modify(self.sock, selectors.EVENT_WRITE, self)
        self._write()

    def _write(self) -> None:
        try:
            sent = self.sock.send(self.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.endpoint.drop(self)
            return
        self.outbuf = self.outbuf[sent:]
        if not self.outbuf:
            self.endpoint.drop(self)


class MetricsEndpoint:
    """``GET /metrics`` on its own listening socket, driven by the relay's selector."""

    def __init__(
        self,
        selector: selectors.BaseSelector,
        address: tuple[str, int],
        render_text: Callable[[], str],
        stats: Stats,
    ) -> None:
        self.selector = selector
        self.render_text = render_text
        self.stats = stats
        self.exchanges: dict[socket.socket, _Exchange] = {}
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
            self.sock.listen(64)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()[:2]
        selector.register(self.sock, selectors.EVENT_READ, self)
        self.paused = False
        # Called when accept fails for lack of descriptors: the relay then stops watching
        # every listening socket for a moment, this one included, instead of spinning on it.
        self.out_of_descriptors: Callable[[OSError, float], None] | None = None

    def pause(self) -> None:
        """Stop watching the listening socket (the relay is out of descriptors)."""
        if not self.paused:
            self.selector.unregister(self.sock)
            self.paused = True

    def resume(self) -> None:
        """Watch the listening socket again."""
        if self.paused:
            self.selector.register(self.sock, selectors.EVENT_READ, self)
            self.paused = False

    def handle(self, mask: int, now: float) -> None:
        for _ in range(MAX_CLIENTS):
            try:
                sock, _ = self.sock.accept()
            except OSError as exc:
                if exc.errno in OUT_OF_DESCRIPTORS:
                    if self.out_of_descriptors is not None:
                        self.out_of_descriptors(exc, now)
                    else:
                        self.pause()
                return
            if len(self.exchanges) >= MAX_CLIENTS:
                sock.close()
                continue
            sock.setblocking(False)
            exchange = _Exchange(self, sock, now)
            self.exchanges[sock] = exchange
            self.selector.register(sock, selectors.EVENT_READ, exchange)

    def answer(self, head: bytes) -> tuple[int, bytes] | tuple[int, bytes, bool]:
        """Status and body for a request head (request line plus headers)."""
        line = head.split(b"\n", 1)[0].rstrip(b"\r")
        parts = line.split(b" ")
        if (
            len(parts) != 3
            or not parts[2].startswith(b"HTTP/1.")
            or not parts[1].startswith(b"/")
            or not parts[0].isalpha()
        ):
            return 400, b"bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, b"only GET is served here\n"
        if target == b"/healthz":
            # Answered by the relay's own loop: an answer means the loop is serving.
            return 200, b"ok\n", method == b"HEAD"
        if target != b"/metrics":
            return 404, b"try /metrics or /healthz\n"
        return 200, self.render_text().encode("utf-8"), method == b"HEAD"

    def drop(self, exchange: _Exchange) -> None:
        if self.exchanges.pop(exchange.sock, None) is not None:
            try:
                self.selector.unregister(exchange.sock)
            except (KeyError, ValueError):
                pass
            exchange.sock.close()

    def expire(self, now: float) -> None:
        """Close requests that did not arrive or drain in time."""
        for exchange in [e for e in self.exchanges.values() if now > e.deadline]:
            self.drop(exchange)

    def close(self) -> None:
        for exchange in list(self.exchanges.values()):
            self.drop(exchange)
        if not self.paused:
            self.selector.unregister(self.sock)
        self.sock.close()
