"""The relay's rules (docs/protocol.md 5 and 6): listeners, half-tunnels and tunnels, sans-IO.

Connections are named by integer ids chosen by the IO shell. Events come in as method calls
(``opened``, ``message``, ``closed``, ``handle_timer``); what the shell must do comes out in
``next_action()``, small typed objects (relay/actions.py) that the shell takes one at a
time, oldest first, in one place, after each call:

- ``Send(conn_id, payload)``: send one relay message on that connection;
- ``Close(conn_id, reason, flush)``: close it, after flushing its output if ``flush``;
- ``Pause(conn_id)`` / ``Resume(conn_id)``: stop / resume reading it (a half-tunnel's
  buffer is full / the half-tunnel was accepted).

A connection the core closes is forgotten at once; a later ``closed`` for it is ignored.
The shell may call ``closed`` while it drains: the actions that causes are queued behind the
others and taken in turn, so a batch costs time linear in its size and nothing is applied
twice. The core never calls the shell: what it needs to know of the shell's side (which
connections' output queues are full) is a state the shell sets (``set_congested``).
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import Limits, Timeouts
from ..errors import CloseReason, LocalProtocolError, ProtocolError
from ..wire.messages import (
    Accept,
    Connect,
    IncomingConnection,
    Listen,
    RejectConnection,
    decode_init_connection,
)
from .actions import Action, Close, Pause, Resume, Send

__all__ = ["Action", "Close", "CoreLimits", "Pause", "RelayCore", "Resume", "Role", "Send"]


@dataclass(frozen=True, slots=True)
class CoreLimits:
    """The relay-layer limits and timeouts (seconds and bytes); defaults from ``config``."""

    relay_conn_timeout: float = Timeouts.relay_conn_timeout
    half_tunnel_timeout: float = Timeouts.half_tunnel
    max_half_tunnels_per_listener: int = Limits.max_half_tunnels_per_listener
    max_half_tunnels_per_listener_per_ip: int = Limits.max_half_tunnels_per_listener_per_ip
    half_tunnel_buffer: int = Limits.half_tunnel_buffer
    max_orphaned_bytes: int = Limits.max_orphaned_bytes


class Role(enum.Enum):
    """What a connection is for, once open."""

    PENDING = enum.auto()  # open, waiting for its InitConnection
    LISTENER = enum.auto()  # sent listen
    HALF_TUNNEL = enum.auto()  # sent connect, not yet accepted
    TUNNEL = enum.auto()  # one end of a spliced tunnel


class _Conn:
    __slots__ = ("id", "key", "source", "role", "peer", "half", "request")

    def __init__(self, conn_id: int, key: bytes, source: str) -> None:
        self.id = conn_id
        self.key = key
        self.source = source  # the address (IPv6: the /64) it came from
        self.role = Role.PENDING
        self.peer: int | None = None  # the other end, for TUNNEL
        self.half: _HalfTunnel | None = None  # for HALF_TUNNEL
        # What its first message asked: "listen", "connect" or "accept" (None before it, or
        # a tunnel end restored from a state that did not say).
        self.request: str | None = None


class _HalfTunnel:
    """A connect from ``src`` to listener ``dst`` waiting for ``accept(src)``."""

    __slots__ = ("src", "dst", "source", "conn_id", "data", "size", "expires", "paused")

    def __init__(self, src: bytes, dst: bytes, source: str, conn_id: int, expires: float) -> None:
        self.src = src
        self.dst = dst
        self.source = source
        self.conn_id: int | None = conn_id  # None once the connecting side has closed
        self.data: list[bytes] = []
        self.size = 0
        self.expires = expires
        self.paused = False


# What a connection in each role asked, for a state that does not say (a tunnel end's is
# not known from its role alone).
_REQUESTS = {Role.LISTENER: "listen", Role.HALF_TUNNEL: "connect"}


def _nobody_refused(kind: str, key: bytes) -> CloseReason | None:
    return None


class RelayCore:
    """Listeners, half-tunnels and tunnels for every open connection of one relay."""

    def __init__(
        self,
        limits: CoreLimits | None = None,
        refuse_request: Callable[[str, bytes], CloseReason | None] = _nobody_refused,
    ) -> None:
        self.limits = limits if limits is not None else CoreLimits()
        # The access lists' pure verdict on why a key may not "listen", "accept" or
        # "connect" (None: it may); a refused request closes its connection for that reason.
        self._refuse_request = refuse_request
        self._actions: deque[Action] = deque()
        # Whether an action waits to be taken (how many): asked after every read, so the
        # deque's own length, without a Python call. The deque is never replaced.
        self.has_actions: Callable[[], int] = self._actions.__len__
        self._reset()

    def _reset(self) -> None:
        """Empty: no connection, no action, no timer."""
        self._actions.clear()
        # Connections whose output queue is above its high water mark, as the shell last
        # said: an IncomingConnection for a listener among them is refused (LISTENER_FULL).
        self._congested: set[int] = set()
        self._conns: dict[int, _Conn] = {}
        self._listeners: dict[bytes, int] = {}
        self._half_tunnels: dict[tuple[bytes, bytes], _HalfTunnel] = {}
        self._half_by_listener: dict[bytes, set[bytes]] = {}
        # Pending connects per (listener, source address): one address cannot take all of
        # a listener's pending slots.
        self._half_by_source: dict[tuple[bytes, str], int] = {}
        # Half-tunnels whose connecting side has closed (oldest first), and the bytes they
        # hold: bounded in total, and counted against their source address until they go.
        self._orphans: dict[_HalfTunnel, None] = {}
        self.orphaned_bytes = 0
        self._orphans_by_source: dict[str, int] = {}
        # (deadline, sequence, what): a connection id is due its first message, a
        # half-tunnel its accept.
        self._timers: list[tuple[float, int, int | _HalfTunnel]] = []
        self._seq = itertools.count()
        self.tunnels = 0  # established tunnels (pairs)

    # ---- what the shell takes and sets -------------------------------------------------

    def next_action(self) -> Action | None:
        """The oldest action not yet taken, or None."""
        actions = self._actions
        return actions.popleft() if actions else None

    def discard_actions(self) -> None:
        """Drop every waiting action (the shell has closed every connection already)."""
        self._actions.clear()

    def set_congested(self, conn_id: int, congested: bool) -> None:
        """The shell's word that a connection's output queue is above (or back below) its
        high water mark."""
        if congested:
            self._congested.add(conn_id)
        else:
            self._congested.discard(conn_id)

    # ---- queries -----------------------------------------------------------------------

    @property
    def listener_count(self) -> int:
        """Keys currently listening."""
        return len(self._listeners)

    @property
    def half_tunnel_count(self) -> int:
        """Connects waiting for an accept."""
        return len(self._half_tunnels)

    def orphans_from(self, source: str) -> int:
        """Half-tunnels kept for ``source`` after its connecting side closed: each still
        takes one of that address's connections until it is accepted or expires."""
        return self._orphans_by_source.get(source, 0)

    def role(self, conn_id: int) -> Role | None:
        """The role of an open connection, or None if the core does not know it."""
        conn = self._conns.get(conn_id)
        return conn.role if conn is not None else None

    def peer_of(self, conn_id: int) -> int | None:
        """The other end of a tunnel (the connection that feeds this one)."""
        conn = self._conns.get(conn_id)
        return conn.peer if conn is not None else None

    def tunnel_peer(self, conn_id: int) -> int | None:
        """The other end of a connection that is in a tunnel, else None: what the loop
        sends that connection's messages to without making them actions."""
        conn = self._conns.get(conn_id)
        if conn is not None and conn.role is Role.TUNNEL:
            return conn.peer
        return None

    def request_of(self, conn_id: int) -> tuple[bytes, str] | None:
        """The key of an open connection and what its first message asked ("listen",
        "connect" or "accept": the two ends of a tunnel are its connecting and its
        accepting side), or None while it waits for that message (or is not known)."""
        conn = self._conns.get(conn_id)
        if conn is None or conn.request is None:
            return None
        return conn.key, conn.request

    def listener_of(self, key: bytes) -> int | None:
        """The listen connection of a key, if it is listening."""
        return self._listeners.get(key)

    # ---- events ------------------------------------------------------------------------

    def opened(self, conn_id: int, key: bytes, now: float, source: str = "") -> None:
        """A connection from ``source`` finished its handshake as ``key``; its first message
        is now due."""
        self._conns[conn_id] = _Conn(conn_id, key, source)
        self._push(now + self.limits.relay_conn_timeout, conn_id)

    def message(self, conn_id: int, data: bytes, now: float) -> None:
        """A relay message arrived on a connection."""
        conn = self._conns.get(conn_id)
        if conn is None:
            return
        role = conn.role
        if role is Role.TUNNEL:
            self._actions.append(Send(conn.peer, data))  # type: ignore[arg-type]
        elif role is Role.HALF_TUNNEL:
            self._buffer(conn, data)
        elif role is Role.PENDING:
            self._first_message(conn, data, now)
        else:
            self._listener_message(conn, data)

    def closed(self, conn_id: int, reason: CloseReason | None = None) -> None:
        """The IO shell lost or closed a connection (for ``reason``, if it says). A connect
        closed because the access lists now refuse it (``DENIED``) takes its half-tunnel
        with it: no accept gets what it sent."""
        self._congested.discard(conn_id)
        conn = self._conns.pop(conn_id, None)
        if conn is not None:
            if reason is CloseReason.DENIED and conn.half is not None:
                self._unlink(conn.half)
                conn.half.data = []  # the expiry timer may still refer to it
                conn.half = None
            self._forget(conn)

    def next_deadline(self) -> float:
        """When ``handle_timer`` next has work (first-message and half-tunnel deadlines)."""
        return self._timers[0][0] if self._timers else float("inf")

    def due_first_messages(self, now: float) -> list[int]:
        """Connections whose first message is overdue and that ``handle_timer(now)`` would
        close: an IO shell whose loop was busy reads them first, so that its own delay is
        not taken for theirs."""
        timers = self._timers
        popped = []
        due = []
        while timers and timers[0][0] <= now:
            item = heapq.heappop(timers)
            popped.append(item)
            ref = item[2]
            if isinstance(ref, int):
                conn = self._conns.get(ref)
                if conn is not None and conn.role is Role.PENDING:
                    due.append(ref)
        for item in popped:
            heapq.heappush(timers, item)
        return due

    def handle_timer(self, now: float) -> None:
        """Expire overdue first messages and half-tunnels."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, due = heapq.heappop(timers)
            if isinstance(due, int):
                conn = self._conns.get(due)
                if conn is not None and conn.role is Role.PENDING:
                    self._close(conn, CloseReason.FIRST_MESSAGE_TIMEOUT)
            else:
                half = due
                if self._half_tunnels.get((half.src, half.dst)) is half:
                    self._drop_half_tunnel(half, CloseReason.HALF_TUNNEL_EXPIRED)

    # ---- internals ---------------------------------------------------------------------

    def _push(self, when: float, item: int | _HalfTunnel) -> None:
        heapq.heappush(self._timers, (when, next(self._seq), item))

    def _close(self, conn: _Conn, reason: CloseReason, flush: bool = False) -> None:
        del self._conns[conn.id]
        self._actions.append(Close(conn.id, reason, flush))
        self._forget(conn)

    def _forget(self, conn: _Conn) -> None:
        """Undo everything a connection took part in, once it is gone."""
        role = conn.role
        if role is Role.TUNNEL:
            self.tunnels -= 1
            peer = self._conns.get(conn.peer)  # type: ignore[arg-type]
            if peer is not None:
                # The peer gets what was already relayed to it, then closes.
                peer.role = Role.PENDING
                peer.peer = None
                del self._conns[peer.id]
                self._actions.append(Close(peer.id, CloseReason.TUNNEL_PEER_CLOSED, True))
        elif role is Role.LISTENER:
            if self._listeners.get(conn.key) == conn.id:
                del self._listeners[conn.key]
                for src in list(self._half_by_listener.get(conn.key, ())):
                    self._drop_half_tunnel(
                        self._half_tunnels[(src, conn.key)], CloseReason.LISTENER_CLOSED
                    )
        elif role is Role.HALF_TUNNEL:
            # The half-tunnel outlives its connecting side: an accept still gets its data.
            half = conn.half
            if half is not None:
                half.conn_id = None
                self._orphan(half)

    def _orphan(self, half: _HalfTunnel) -> None:
        """Keep a half-tunnel whose connecting side closed, within the bounds on orphans."""
        self._orphans[half] = None
        self.orphaned_bytes += half.size
        by_source = self._orphans_by_source
        by_source[half.source] = by_source.get(half.source, 0) + 1
        # Over the total: the oldest orphans go first (their connect may be retried).
        while self.orphaned_bytes > self.limits.max_orphaned_bytes and self._orphans:
            oldest = next(iter(self._orphans))
            self._drop_half_tunnel(oldest, CloseReason.HALF_TUNNEL_EXPIRED)

    def _unlink(self, half: _HalfTunnel) -> None:
        """Remove a half-tunnel from every index (accepted, rejected or dropped)."""
        del self._half_tunnels[(half.src, half.dst)]
        sources = self._half_by_listener[half.dst]
        sources.discard(half.src)
        if not sources:
            del self._half_by_listener[half.dst]
        key = (half.dst, half.source)
        count = self._half_by_source[key] - 1
        if count:
            self._half_by_source[key] = count
        else:
            del self._half_by_source[key]
        if half in self._orphans:
            del self._orphans[half]
            self.orphaned_bytes -= half.size
            count = self._orphans_by_source[half.source] - 1
            if count:
                self._orphans_by_source[half.source] = count
            else:
                del self._orphans_by_source[half.source]

    def _drop_half_tunnel(self, half: _HalfTunnel, reason: CloseReason) -> None:
        self._unlink(half)
        half.data = []  # the expiry timer may still refer to it
        if half.conn_id is not None:
            conn = self._conns.get(half.conn_id)
            if conn is not None:
                conn.half = None
                self._close(conn, reason)

    def _first_message(self, conn: _Conn, data: bytes, now: float) -> None:
        try:
            init = decode_init_connection(data)
        except ProtocolError as exc:
            self._close(conn, exc.reason)
            return
        if isinstance(init, Listen):
            kind = "listen"
        elif isinstance(init, Connect):
            kind = "connect"
        else:
            kind = "accept"
        refused = self._refuse_request(kind, conn.key)
        if refused is not None:
            # The access lists: as early as the protocol allows (the key is known now).
            self._close(conn, refused)
            return
        conn.request = kind
        if isinstance(init, Listen):
            self._listen(conn)
        elif isinstance(init, Connect):
            self._connect(conn, init.public_key, now)
        elif isinstance(init, Accept):
            self._accept(conn, init.public_key)

    def _listen(self, conn: _Conn) -> None:
        if conn.key in self._listeners:
            # The first listen keeps the key, as in the original: a node that lists one relay
            # under two addresses holds a listen per address, and if the newest won, each
            # would replace the other on every reconnect (docs/protocol.md section 6.1).
            self._close(conn, CloseReason.DUPLICATE_LISTEN)
            return
        conn.role = Role.LISTENER
        self._listeners[conn.key] = conn.id

    def _connect(self, conn: _Conn, dst: bytes, now: float) -> None:
        listener_id = self._listeners.get(dst)
        if listener_id is None:
            self._close(conn, CloseReason.RELAY_REFUSED)
            return
        src = conn.key
        if (src, dst) in self._half_tunnels:
            self._close(conn, CloseReason.RELAY_REFUSED)
            return
        sources = self._half_by_listener.get(dst, ())
        if len(sources) >= self.limits.max_half_tunnels_per_listener:
            self._close(conn, CloseReason.HALF_TUNNEL_LIMIT)
            return
        by_source = (dst, conn.source)
        if (
            self._half_by_source.get(by_source, 0)
            >= self.limits.max_half_tunnels_per_listener_per_ip
        ):
            self._close(conn, CloseReason.HALF_TUNNEL_LIMIT)
            return
        if listener_id in self._congested:
            self._close(conn, CloseReason.LISTENER_FULL)
            return
        half = _HalfTunnel(src, dst, conn.source, conn.id, now + self.limits.half_tunnel_timeout)
        self._half_tunnels[(src, dst)] = half
        self._half_by_listener.setdefault(dst, set()).add(src)
        self._half_by_source[by_source] = self._half_by_source.get(by_source, 0) + 1
        conn.role = Role.HALF_TUNNEL
        conn.half = half
        self._push(half.expires, half)
        self._actions.append(Send(listener_id, IncomingConnection(src).encode()))

    def _accept(self, conn: _Conn, src: bytes) -> None:
        dst = conn.key
        half = self._half_tunnels.get((src, dst))
        if dst not in self._listeners or half is None:
            self._close(conn, CloseReason.RELAY_REFUSED)
            return
        self._unlink(half)
        actions = self._actions
        for data in half.data:
            actions.append(Send(conn.id, data))
        # Its expiry timer refers to the half-tunnel until the deadline: drop the data now,
        # or every accepted connect's early data outlives its delivery by up to 32 s.
        half.data = []
        other = self._conns.get(half.conn_id) if half.conn_id is not None else None
        if other is None:
            # The connecting side left before the accept: deliver what it sent, then close.
            del self._conns[conn.id]
            actions.append(Close(conn.id, CloseReason.TUNNEL_PEER_CLOSED, True))
            return
        other.role = conn.role = Role.TUNNEL
        other.half = None
        other.peer = conn.id
        conn.peer = other.id
        self.tunnels += 1
        if half.paused:
            actions.append(Resume(other.id))

    def _buffer(self, conn: _Conn, data: bytes) -> None:
        half = conn.half
        assert half is not None
        half.data.append(data)
        half.size += len(data)
        if not half.paused and half.size >= self.limits.half_tunnel_buffer:
            half.paused = True
            self._actions.append(Pause(conn.id))

    def _listener_message(self, conn: _Conn, data: bytes) -> None:
        try:
            reject = RejectConnection.decode(data)
        except ProtocolError as exc:
            self._close(conn, exc.reason)
            return
        half = self._half_tunnels.get((reject.public_key, conn.key))
        if half is not None:
            self._drop_half_tunnel(half, CloseReason.REJECTED)

    # ---- hand-over (relay/handover.py) -------------------------------------------------

    def export_state(self, now: float) -> dict[str, Any]:
        """Listeners, half-tunnels (with their early data) and pairings, as plain data;
        deadlines as durations from ``now``. Nothing in it is secret but who talks to whom."""
        first_message_in: dict[int, float] = {}
        for when, _, due in self._timers:
            if isinstance(due, int):
                conn = self._conns.get(due)
                if conn is not None and conn.role is Role.PENDING:
                    first_message_in[due] = when - now
        conns = []
        for conn in self._conns.values():
            record: dict[str, Any] = {
                "id": conn.id,
                "key": conn.key,
                "role": conn.role.name,
                "source": conn.source,
            }
            if conn.request is not None:
                record["request"] = conn.request
            if conn.role is Role.TUNNEL:
                record["peer"] = conn.peer
            elif conn.role is Role.PENDING and conn.id in first_message_in:
                record["first_message_in"] = first_message_in[conn.id]
            conns.append(record)
        halves = [
            {
                "src": half.src,
                "dst": half.dst,
                "conn": half.conn_id,
                "data": list(half.data),
                "expires_in": half.expires - now,
                "paused": half.paused,
                "source": half.source,
            }
            for half in self._half_tunnels.values()
        ]
        listeners = [[key, cid] for key, cid in self._listeners.items()]
        return {"conns": conns, "listeners": listeners, "half_tunnels": halves}

    def restore_state(self, state: dict[str, Any], now: float, alive: set[int]) -> list[int]:
        """Take back what ``export_state`` gave, into an empty core, keeping only the
        connections in ``alive`` (the ones whose socket and stack came back). The others
        are gone: what they took part in ends as if they had closed (actions queued).
        Returns the ids restored. ``ValueError`` if the state does not hold together."""
        if self._conns or self._half_tunnels:
            raise LocalProtocolError("restore into a core that already serves connections")
        try:
            return self._restore(state, now, alive)
        except (KeyError, TypeError, IndexError) as exc:
            self._reset()
            raise ValueError(f"relay state incomplete or of the wrong type: {exc!r}") from None
        except ValueError:
            self._reset()
            raise

    def _restore(self, state: dict[str, Any], now: float, alive: set[int]) -> list[int]:
        conns = self._conns
        for record in state["conns"]:
            cid, key = record["id"], record["key"]
            if not isinstance(cid, int) or not (isinstance(key, bytes) and len(key) == 32):
                raise ValueError("connection record of the wrong type")
            if cid in conns:
                raise ValueError(f"connection {cid} recorded twice")
            source = record.get("source", "")
            if not isinstance(source, str):
                raise ValueError("connection source of the wrong type")
            conn = _Conn(cid, key, source)
            conn.role = Role[record["role"]]
            request = record.get("request", _REQUESTS.get(conn.role))
            if request not in (None, "listen", "connect", "accept"):
                raise ValueError("connection request of the wrong type")
            conn.request = request
            if conn.role is Role.TUNNEL:
                conn.peer = int(record["peer"])
            elif conn.role is Role.PENDING:
                self._push(now + float(record["first_message_in"]), cid)
            conns[cid] = conn
        for key, cid in state["listeners"]:
            listening = conns.get(cid)
            if listening is None or listening.role is not Role.LISTENER or listening.key != key:
                raise ValueError("a listener that is not a listening connection")
            self._listeners[key] = cid
        for conn in conns.values():
            if conn.role is Role.TUNNEL:
                other = conns.get(conn.peer)  # type: ignore[arg-type]
                if other is None or other.role is not Role.TUNNEL or other.peer != conn.id:
                    raise ValueError("a tunnel end without its other end")
            elif conn.role is Role.LISTENER and self._listeners.get(conn.key) != conn.id:
                raise ValueError("a listening connection not among the listeners")
        for record in state["half_tunnels"]:
            src, dst, cid = record["src"], record["dst"], record["conn"]
            if dst not in self._listeners or (src, dst) in self._half_tunnels:
                raise ValueError("a half-tunnel without its listener, or recorded twice")
            data = record["data"]
            if not all(isinstance(chunk, bytes) for chunk in data):
                raise ValueError("half-tunnel data of the wrong type")
            source = record.get("source", "")
            if not isinstance(source, str):
                raise ValueError("half-tunnel source of the wrong type")
            half = _HalfTunnel(src, dst, source, cid, now + float(record["expires_in"]))
            half.data = list(data)
            half.size = sum(map(len, data))
            half.paused = bool(record["paused"])
            if cid is not None:
                side = conns.get(cid)
                if side is None or side.role is not Role.HALF_TUNNEL or side.key != src:
                    raise ValueError("a half-tunnel whose connecting side is not one")
                if side.half is not None:
                    raise ValueError("a connection with two half-tunnels")
                side.half = half
            self._half_tunnels[(src, dst)] = half
            self._half_by_listener.setdefault(dst, set()).add(src)
            by_source = (dst, source)
            self._half_by_source[by_source] = self._half_by_source.get(by_source, 0) + 1
            self._push(half.expires, half)
            if cid is None:
                self._orphan(half)
        for conn in conns.values():
            if conn.role is Role.HALF_TUNNEL and conn.half is None:
                raise ValueError("a connecting side without its half-tunnel")
        self.tunnels = sum(1 for conn in conns.values() if conn.role is Role.TUNNEL) // 2
        # The connections that did not come back end as if they had closed just now.
        for cid in [cid for cid in conns if cid not in alive]:
            self.closed(cid)
        return list(conns)
