"""The policy: the one front for every operator control (access lists, bans, admission
limits, bandwidth and budgets, the memory ceiling) and for what the log says of refusals.

The relay asks it at a few decision points and does what it says:

- ``admit(ip, connections, now)``: a new connection is refused (naming the limit), admitted,
  or admitted after evicting the oldest unfinished handshake;
- ``admitted`` / ``opened`` / ``read`` / ``closing`` / ``closed``: a connection's life; ``opened``
  says whether an open connection may go on (budgets with ``action = "refuse"``);
- ``tick(now)`` and ``next_deadline()``: its timers (bandwidth refills, memory samples);
  ``housekeeping(now)`` every few seconds (refusal windows, bans, budget periods);
- ``apply(config, now)``: new settings, at start and on reload.

It never touches a socket: what it decides for open connections (pause one, resume one) comes
out as the same typed actions the core emits (relay/actions.py), taken with
``next_action()``. Every strike towards a ban and every refusal line is recorded here. With
every control off a read costs the relay one test (``metering``).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from ..config import Config
from ..errors import CloseReason
from ..files import b64url_encode
from ..wire.connection import State
from .access import AccessControl
from .actions import PAUSED_BY_MEMORY, Action, Close, Pause, Resume
from .bandwidth import BandwidthControl
from .bans import BanTable
from .clients import Client
from .events import RefusalLog
from .memory import PAUSE_BATCH, MemoryGuard, read_rss
from .metrics import Stats
from .ratelimit import Prefixes, RateLimiter

log = logging.getLogger("strelay")

# Refusals at accept() that are the source's own doing, and so strikes towards a ban (the
# relay being full or short of memory or descriptors is nobody's in particular).
STRIKES = frozenset({"connection_rate", "max_connections_per_ip", "ip_denied"})
# Close reasons that are a limit refusing a connect: (limit, the setting that holds it).
CONNECT_LIMITS = {
    CloseReason.HALF_TUNNEL_LIMIT: "max_half_tunnels_per_listener",
    CloseReason.LISTENER_FULL: "buffer_high_water",
}
# Close reasons that refuse a client's request (listen, connect or accept): each is counted
# in connections_refused_total under the reason's value, logged as the limits are, and is
# a strike towards a ban of the client's source.
REFUSED_REQUESTS = frozenset({CloseReason.LISTEN_DENIED, CloseReason.CONNECT_DENIED})
# Handshakes that end for these are not the peer's failure (no strike towards a ban).
NOT_STRIKES = (CloseReason.SHUTDOWN, CloseReason.EVICTED, CloseReason.DENIED)
# What the connections a reload's access lists closed were, in the order its line says them
# (singular, plural).
_CLOSED_AS = {
    "listen": ("listener", "listeners"),
    "tunnel": ("tunnel end", "tunnel ends"),
    "connect": ("connector", "connectors"),
    None: ("handshake or waiting connection", "handshakes or waiting connections"),
}


# How the relay's close detail says that a connection spoke another protocol.
NOT_OFFSET = "not an Offset client: "


def _who(client: Client) -> str:
    """The client as refusal lines name it: its address, and its key's first characters
    once its handshake told it."""
    key = client.wire.peer_public_key
    return f"{client.ip} key {b64url_encode(key)[:8]}" if key else client.ip


class Decision(NamedTuple):
    """What to do with a new connection: refuse it (naming the limit), or admit it, first
    evicting ``evict`` (the oldest unfinished handshake) if that is set. ``source`` is the
    prefix the connection counts under."""

    refused: str | None
    evict: Client | None
    source: str = ""


class Policy:
    """Every operator control of one relay, behind a few decision points."""

    def __init__(
        self,
        config: Config,
        stats: Stats,
        clients: Mapping[int, Client],
        *,
        peer_of: Callable[[int], int | None],
        orphans_from: Callable[[str], int],
        request_of: Callable[[int], tuple[bytes, str] | None],
        now: float,
        rss: Callable[[], int] = read_rss,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        self.stats = stats
        self.clients = clients  # the relay's table, read only
        # The core's answers: the tunnel end feeding a connection, and the half-tunnels a
        # source left behind (they still count as its connections until they go).
        self._peer_of = peer_of
        self._orphans_from = orphans_from
        # The core's answer to what an open connection is: its key and what it asked
        # ("listen", "connect", "accept"), None before its first message.
        self._request_of = request_of
        self._actions: deque[Action] = deque()
        # Whether a pause or resume waits to be taken (how many).
        self.has_actions: Callable[[], int] = self._actions.__len__
        self.limits = config.limits
        self.access = AccessControl()
        self.bans = BanTable()
        self.memory = MemoryGuard(self.limits, rss=rss)
        self.keepalive = config.timeouts.keepalive
        self.refusals = RefusalLog()
        self.prefixes = Prefixes(self.limits.ipv4_prefix, self.limits.ipv6_prefix)
        self.rate = RateLimiter(
            self.limits.new_connections_per_ip_per_second,
            self.limits.new_connections_per_ip_burst,
        )
        self.per_source: dict[str, int] = {}  # open connections per source (prefix)
        # Clients whose handshake is under way, oldest first.
        self.handshaking: OrderedDict[int, Client] = OrderedDict()
        self.memory_full = False  # over the memory ceiling: refuse new connections
        self._memory_swept = False  # connections paused for memory were all resumed
        # Over the ceiling: the largest output queues watched for progress, by connection
        # id: (its queued bytes, since when its receiver has taken none).
        self._stalls: dict[int, tuple[int, float]] = {}
        self.access.apply_config(config.access)
        self.bans.apply_config(config.bans)
        self.bandwidth = BandwidthControl(config, clients, self._actions, stats, now, wallclock)
        # Read by the relay on every read: with bandwidth limits and budgets off, False.
        self.metering = self.bandwidth.enabled

    # ---- settings ----------------------------------------------------------------------

    def apply(self, config: Config, now: float) -> list[str]:
        """Put the controls of ``config`` in force (at start and on reload): they apply to
        what happens from now on; open connections count where they counted. The open
        connections the new access lists refuse and the old ones admitted are closed (Close
        actions). Returns what the reload is to say it did (a line for those closes)."""
        done = []
        limits = self.limits = config.limits
        self.prefixes = Prefixes(limits.ipv4_prefix, limits.ipv6_prefix)
        self.rate.rate = float(limits.new_connections_per_ip_per_second)
        self.rate.burst = float(limits.new_connections_per_ip_burst)
        old_access = self.access.access
        self.access.apply_config(config.access)
        if config.access != old_access:
            closed = self._close_denied(AccessControl(old_access))
            if closed:
                done.append(closed)
        self.bans.apply_config(config.bans)
        self.keepalive = config.timeouts.keepalive
        if self.memory.apply_config(limits):
            log.info("%s", self.memory.describe())
        self.bandwidth.apply_config(config, now)
        self.metering = self.bandwidth.enabled
        return done

    def _close_denied(self, old: AccessControl) -> str:
        """Close every open connection that the new access lists refuse and ``old`` admitted:
        its address (a handshake's too), or its key for what it asked (a tunnel end's for
        its side: the accepting side's by the listen lists, the connecting side's by the
        connect lists). A connection waiting for its first message is checked when it comes,
        as always; a tunnel's other end closes as the protocol says, after its output."""
        new = self.access
        closed: dict[int, str | None] = {}  # connection id: what it was
        for client in self.clients.values():
            if client.closing:
                continue
            request = None if client.id in self.handshaking else self._request_of(client.id)
            refused = not new.ip_allowed(client.ip) and old.ip_allowed(client.ip)
            if not refused and request is not None:
                key, kind = request
                refused = (
                    new.refuse_request(kind, key) is not None
                    and old.refuse_request(kind, key) is None
                )
            if refused:
                what = None if request is None else request[1]
                if what is not None and what != "listen" and self._peer_of(client.id) is not None:
                    what = "tunnel"
                closed[client.id] = what
        if not closed:
            return ""
        counts = dict.fromkeys(_CLOSED_AS, 0)
        others = 0  # tunnel ends that close with their other end, not refused themselves
        for cid, what in closed.items():
            counts[what] += 1
            self._actions.append(Close(cid, CloseReason.DENIED))
            if what == "tunnel" and self._peer_of(cid) not in closed:
                others += 1
        said = ", ".join(f"{n} {_CLOSED_AS[what][n != 1]}" for what, n in counts.items() if n)
        if others:
            said += (
                "; the other end of 1 tunnel closes after its output"
                if others == 1
                else f"; the other ends of {others} tunnels close after their output"
            )
        plural = "" if len(closed) == 1 else "s"
        return f"closed {len(closed)} connection{plural} the new access lists refuse ({said})"

    def refuse_request(self, kind: str, key: bytes) -> CloseReason | None:
        """Why ``key`` may not ``kind`` ("listen", "accept", "connect"), or None: the access
        lists' pure verdict, which the core consults."""
        return self.access.refuse_request(kind, key)

    # ---- actions -----------------------------------------------------------------------

    def next_action(self) -> Action | None:
        """The oldest pause or resume not yet taken, or None."""
        actions = self._actions
        return actions.popleft() if actions else None

    # ---- a connection's life -----------------------------------------------------------

    def admit(self, ip: str, connections: int, now: float) -> Decision:
        """Admit or refuse a connection from ``ip`` while ``connections`` are open."""
        source = self.prefixes(ip)
        refusal = self._refusal(ip, source, connections, now)
        if refusal is not None:
            self.stats.refused[refusal] += 1
            if refusal in STRIKES:
                self.bans.strike(source, now)
            if refusal != "banned":  # a ban is said once, when it starts
                self.refusals.refused(refusal, self._limit_value(refusal), ip, now)
            return Decision(refusal, None, source)
        limits = self.limits
        if len(self.handshaking) >= limits.max_handshakes:
            # Evict the oldest unfinished handshake: honest peers finish in milliseconds, so
            # the oldest is the likeliest to be a stalled or hostile one.
            self.stats.refused["max_handshakes"] += 1
            evicted = next(iter(self.handshaking.values()))
            self.refusals.refused(
                "max_handshakes", limits.max_handshakes, evicted.ip, now, verb="evicting"
            )
            return Decision(None, evicted, source)
        return Decision(None, None, source)

    def _refusal(self, ip: str, source: str, connections: int, now: float) -> str | None:
        """The limit that refuses a connection from ``ip`` (``source``), if any: the
        cheapest checks first, a refusal by rate costing the relay nothing but the accept."""
        if self.bans.is_banned(source, now):
            return "banned"
        if not self.access.ip_allowed(ip):
            return "ip_denied"
        if self.memory_full:
            return "memory"
        limits = self.limits
        if not self.rate.allow(source, now):
            return "connection_rate"
        if connections >= limits.max_connections:
            return "max_connections"
        if (
            self.per_source.get(source, 0) + self._orphans_from(source)
            >= limits.max_connections_per_ip
        ):
            return "max_connections_per_ip"
        return None

    def _limit_value(self, limit: str) -> int | None:
        """The setting behind a refusal by ``limit``, for the log line (None: a list)."""
        limits = self.limits
        if limit == "connection_rate":
            return limits.new_connections_per_ip_per_second
        if limit == "memory":
            return self.memory.max_memory
        value = getattr(limits, limit, None)
        return value if isinstance(value, int) else None

    def handshakes_full(self) -> bool:
        """Whether the next admitted connection would evict a handshake."""
        return len(self.handshaking) >= self.limits.max_handshakes

    def admitted(self, client: Client) -> None:
        """A connection was admitted; its handshake starts."""
        self.handshaking[client.id] = client
        self.per_source[client.source] = self.per_source.get(client.source, 0) + 1
        self.stats.accepted += 1

    def adopt(self, client: Client, now: float) -> None:
        """A connection handed over by the previous process: it counts as it did."""
        self.per_source[client.source] = self.per_source.get(client.source, 0) + 1
        if client.wire.state is not State.OPEN:
            self.handshaking[client.id] = client
        self.bandwidth.adopt(client, now)

    def is_handshaking(self, client: Client) -> bool:
        """Whether its handshake is still under way."""
        return client.id in self.handshaking

    def opened(self, client: Client, now: float) -> bool:
        """Its handshake finished; whether it may go on (False: it is over a budget whose
        ``action`` is "refuse", and is to be closed, flushed, for ``BUDGET``)."""
        del self.handshaking[client.id]
        self.stats.handshakes_completed += 1
        if not self.bandwidth.enabled:
            return True
        over = self.bandwidth.opened(client)
        if over is None:
            return True
        # Counted, logged and a strike towards a ban of its source, as a request refused by
        # the access lists is.
        self.stats.refused["budget"] += 1
        self.refusals.refused("budget", over[1], f"{client.ip} ({over[0]})", now)
        self.bans.strike(client.source, now)
        return False

    def read(self, client: Client, size: int, now: float) -> None:
        """``size`` bytes were read from ``client`` (only called while ``metering``)."""
        self.bandwidth.charge(client, size, now)

    def closing(
        self, client: Client, reason: CloseReason, handshaking: bool, now: float, detail: str = ""
    ) -> None:
        """``client`` is being closed for ``reason``: the refusal lines and strikes it earns.
        Lines name the client's key where it is known."""
        if reason in CONNECT_LIMITS:
            limit = CONNECT_LIMITS[reason]
            self.refusals.refused(limit, getattr(self.limits, limit), _who(client), now)
        elif reason in REFUSED_REQUESTS:
            self.stats.refused[reason.value] += 1
            self.refusals.refused(reason.value, None, _who(client), now)
            self.bans.strike(client.source, now)
        elif handshaking and reason not in NOT_STRIKES:
            self.bans.strike(client.source, now)
            _, _, stranger = detail.partition(NOT_OFFSET)
            what = f"not an Offset client: {stranger}" if stranger else reason.value
            self.refusals.refused(f"failed handshake ({what})", None, client.ip, now, "dropping")

    def closed(self, client: Client, now: float) -> None:
        """It is gone; it no longer counts against any limit."""
        self.handshaking.pop(client.id, None)
        source = client.source
        count = self.per_source.get(source, 1) - 1
        if count:
            self.per_source[source] = count
        else:
            self.per_source.pop(source, None)
        if client.meter is not None:
            self.bandwidth.closed(client, now)

    # ---- time --------------------------------------------------------------------------

    def next_deadline(self) -> float:
        """When ``tick`` next has work."""
        deadline = self.bandwidth.next_deadline()
        memory = self.memory
        if memory.max_memory or memory.active:
            deadline = min(deadline, memory.next_sample)
        return deadline

    def tick(self, now: float) -> None:
        """Run what is due: buckets that refilled, the memory sample."""
        bandwidth = self.bandwidth
        if bandwidth.next_deadline() <= now:
            bandwidth.handle_timer(now)
        if now >= self.memory.next_sample:
            self._check_memory(now)

    def housekeeping(self, now: float) -> None:
        """Every few seconds: refusal windows that ended, bans that ran out, budget periods
        and saves."""
        self.refusals.flush(now)
        self.bans.expire(now)
        self.bandwidth.tick(now)

    def usage_document(self, now: float) -> dict[str, Any] | None:
        """The transfer counts (budgets), for the hand-over to the next process."""
        return self.bandwidth.usage_document(now)

    def take_usage(self, document: object) -> None:
        """The counts handed over by the previous process (newer than the state file)."""
        self.bandwidth.take_usage(document)

    def source_of(self, ip: str) -> str:
        """The prefix connections from ``ip`` count under."""
        return self.prefixes(ip)

    def stop(self, now: float) -> None:
        """The relay stops (or hands over): save what is kept across starts."""
        self.bandwidth.stop(now)

    def _check_memory(self, now: float) -> None:
        """Sample the resident size; over the ceiling, refuse new connections and pause the
        feeders of the largest output queues, more at each sample while it lasts, and close
        those of them whose receiver took no byte for a keepalive timeout (a peer that does
        not read holds the relay's memory as one that says nothing holds a connection);
        below the low mark, resume them all."""
        memory = self.memory
        memory.sample(now)
        self.memory_full = memory.active
        clients = self.clients
        actions = self._actions
        if memory.active:
            queues = [c for c in clients.values() if c.out_size and not c.closing]
            # Every queue past the low water mark at once (they grow fastest), and the
            # largest others, more at each sample while it lasts.
            least = self.limits.buffer_low_water
            large = [c for c in queues if c.out_size >= least]
            if len(large) < PAUSE_BATCH:
                large = heapq.nlargest(PAUSE_BATCH, queues, key=lambda c: c.out_size)
            for target in large:
                feeder = self._peer_of(target.id)
                other = clients.get(feeder) if feeder is not None else None
                if other is not None and not other.paused & PAUSED_BY_MEMORY:
                    actions.append(Pause(other.id, PAUSED_BY_MEMORY))
                    self._memory_swept = False
            self._close_stalled(queues, now)
            return
        self._stalls.clear()
        if not self._memory_swept:
            # Below the low mark (or the first look after a hand-over, which keeps pauses).
            self._memory_swept = True
            for client in clients.values():
                if client.paused & PAUSED_BY_MEMORY:
                    actions.append(Resume(client.id, PAUSED_BY_MEMORY))

    def _close_stalled(self, queues: list[Client], now: float) -> None:
        """Close the receivers of large queues (past the low water mark) that took no byte
        for a keepalive timeout while the relay is over its ceiling."""
        stalls = self._stalls
        watched: dict[int, tuple[int, float]] = {}
        least = self.limits.buffer_low_water
        for target in queues:
            size = target.out_size
            if size < least:
                continue
            # Its queue shrinking is the receiver taking bytes; growing (the relay's
            # keepalives) is not.
            seen = stalls.get(target.id)
            if seen is None or size < seen[0]:
                watched[target.id] = (size, now)
            elif now - seen[1] < self.keepalive:
                watched[target.id] = (max(size, seen[0]), seen[1])
            else:
                self._actions.append(Close(target.id, CloseReason.STALLED))
        self._stalls = watched

    # ---- for /metrics ------------------------------------------------------------------

    def gauges(self, now: float) -> dict[str, object]:
        """The controls' gauges for a scrape."""
        memory = self.memory
        return {
            "memory_rss": read_rss(),
            "memory_ceiling_active": int(memory.active),
            "memory_ceiling_seconds": memory.seconds(now),
            "bans_active": self.bans.active(now),
            "bans_total": self.bans.total,
            **self.bandwidth.gauges(),
            "throttled_seconds": self.bandwidth.throttled_seconds(now),
        }
