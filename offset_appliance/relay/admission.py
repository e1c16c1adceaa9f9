"""Admission: who may connect. Bans, address lists, the memory ceiling, the connection
limits, the per-source counts, eviction of the oldest unfinished handshake, and shedding
when the process runs out of file descriptors.

``Admission.decide`` is the one place that accepts or refuses a new connection; the server
asks it for every socket it accepts and does what it says.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol

from ..config import Limits
from .access import AccessControl
from .bans import BanTable
from .clients import Client
from .metrics import Stats
from .ratelimit import Prefixes, RateLimiter

log = logging.getLogger("strelay")

# Connections accepted from one listening socket per turn of the loop, so that a flood of
# connects cannot keep the loop from serving the connections it already has.
ACCEPT_BATCH = 64
# How long the listening sockets are left alone when no descriptor is left to accept with.
SHED_PAUSE = 0.1
FD_WARNING_INTERVAL = 60.0
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Pausable(Protocol):
    """Another listening socket (the metrics endpoint) paused with the relay's own."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...


class Decision(NamedTuple):
    """What to do with a new connection: refuse it (naming the limit), or admit it, first
    evicting ``evict`` (the oldest unfinished handshake) if that is set. ``source`` is the
    prefix the connection counts under."""

    refused: str | None
    evict: Client | None
    source: str = ""


# Refusals that are the source's own doing, and so strikes towards a ban (the relay being
# full or short of memory or descriptors is nobody's in particular).
STRIKES = frozenset({"connection_rate", "max_connections_per_ip", "ip_denied"})


class Admission:
    """Limits on what strangers can open, and the bookkeeping they need."""

    def __init__(
        self,
        limits: Limits,
        stats: Stats,
        selector: selectors.BaseSelector,
        listen_sockets: list[socket.socket],
        orphans_from: Callable[[str], int] = lambda source: 0,
        *,
        access: AccessControl | None = None,
        bans: BanTable | None = None,
    ) -> None:
        self.limits = limits
        self.prefixes = Prefixes(limits.ipv4_prefix, limits.ipv6_prefix)
        self.access = access if access is not None else AccessControl()
        self.bans = bans if bans is not None else BanTable()
        self.memory_full = False  # over the memory ceiling: refuse new connections
        self.stats = stats
        self.selector = selector
        self.listen_sockets = listen_sockets
        # Half-tunnels an address left behind still count as its connections until they go.
        self.orphans_from = orphans_from
        self.rate = RateLimiter(
            limits.new_connections_per_ip_per_second, limits.new_connections_per_ip_burst
        )
        # Paused and resumed with the listening sockets when out of descriptors.
        self.also_paused: list[Pausable] = []
        self.per_ip: dict[str, int] = {}  # open connections per source (prefix)
        # Clients whose handshake is under way, oldest first.
        self.handshaking: OrderedDict[int, Client] = OrderedDict()
        self.paused_until = 0.0  # while shedding, the listening sockets are not watched
        self._reserve_fd: int | None = None
        self._fd_warning_at = 0.0

    # ---- deciding ----------------------------------------------------------------------

    def set_limits(self, limits: Limits) -> None:
        """New limits (on reload): the rate applies from now on, buckets are kept; new
        prefix lengths apply to new connections (open ones count where they counted)."""
        self.limits = limits
        self.prefixes = Prefixes(limits.ipv4_prefix, limits.ipv6_prefix)
        self.rate.rate = float(limits.new_connections_per_ip_per_second)
        self.rate.burst = float(limits.new_connections_per_ip_burst)

    def decide(self, ip: str, connections: int, now: float = 0.0) -> Decision:
        """Admit or refuse a connection from ``ip`` while ``connections`` are open."""
        source = self.prefixes(ip)
        refusal = self._refusal(ip, source, connections, now)
        if refusal is not None:
            self.stats.refused[refusal] += 1
            if refusal in STRIKES:
                self.bans.strike(source, now)
            return Decision(refusal, None, source)
        if len(self.handshaking) >= self.limits.max_handshakes:
            # Evict the oldest unfinished handshake: honest peers finish in milliseconds, so
            # the oldest is the likeliest to be a stalled or hostile one.
            self.stats.refused["max_handshakes"] += 1
            return Decision(None, next(iter(self.handshaking.values())), source)
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
        if self.per_ip.get(source, 0) + self.orphans_from(source) >= limits.max_connections_per_ip:
            return "max_connections_per_ip"
        return None

    # ---- bookkeeping -------------------------------------------------------------------

    def admitted(self, client: Client) -> None:
        """A connection was admitted; its handshake starts."""
        self.handshaking[client.id] = client
        self.per_ip[client.source] = self.per_ip.get(client.source, 0) + 1
        self.stats.accepted += 1

    def opened(self, client: Client) -> None:
        """Its handshake finished."""
        del self.handshaking[client.id]
        self.stats.handshakes_completed += 1

    def is_handshaking(self, client: Client) -> bool:
        """Whether its handshake is still under way."""
        return client.id in self.handshaking

    def left(self, client: Client) -> None:
        """It is closed; it no longer counts against any limit."""
        self.handshaking.pop(client.id, None)
        count = self.per_ip.get(client.source, 1) - 1
        if count:
            self.per_ip[client.source] = count
        else:
            self.per_ip.pop(client.source, None)

    # ---- accepting and shedding --------------------------------------------------------

    def start(self) -> None:
        """Keep one descriptor in reserve, for refusing connections cleanly when out of them."""
        if self._reserve_fd is None:
            self._reserve_fd = os.open(os.devnull, os.O_RDONLY)

    def stop(self) -> None:
        """Give back the reserve descriptor."""
        if self._reserve_fd is not None:
            os.close(self._reserve_fd)
            self._reserve_fd = None

    def accept(self, lsock: socket.socket, now: float) -> Iterator[tuple[socket.socket, tuple]]:
        """The connections waiting on ``lsock``, at most ``ACCEPT_BATCH`` of them."""
        if now < self.paused_until:
            return
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    self._shed(lsock, exc, now)
                # ECONNABORTED and the like concern one connection only.
                return
            yield sock, addr

    def shed(self, lsock: socket.socket, exc: OSError, now: float) -> None:
        """Out of descriptors on another listening socket (the metrics endpoint)."""
        self._shed(lsock, exc, now)

    def _shed(self, lsock: socket.socket, exc: OSError, now: float) -> None:
        """Out of descriptors: refuse the waiting connections cleanly, keep serving others."""
        if now >= self._fd_warning_at:
            # One line per minute while it lasts, not one per shed.
            log.warning("out of file descriptors (%s): shedding new connections", exc.strerror)
            self._fd_warning_at = now + FD_WARNING_INTERVAL
        refused = self.stats.refused
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
                refused["file_descriptors"] += 1
            try:
                self._reserve_fd = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                pass
        else:
            refused["file_descriptors"] += 1
        # A listening socket we cannot serve stays readable: stop watching the listening
        # sockets for a moment rather than spin on them, then look again.
        if not self.paused_until:
            for sock in self.listen_sockets:
                self.selector.unregister(sock)
            for other in self.also_paused:
                other.pause()
        self.paused_until = now + SHED_PAUSE

    def next_deadline(self) -> float:
        """When the listening sockets are to be watched again (infinity if they are)."""
        return self.paused_until or float("inf")

    def handle_timer(self, now: float) -> None:
        """Watch the listening sockets again once the shedding pause is over."""
        if self.paused_until and now >= self.paused_until:
            self.paused_until = 0.0
            for sock in self.listen_sockets:
                self.selector.register(sock, selectors.EVENT_READ, sock)
            for other in self.also_paused:
                other.resume()
