"""The relay: the client table, the tunnel path and the one place where actions are applied.

Bytes read from a connection go through its protocol stack (``wire.Connection``); a
tunnel's messages go straight to its other end, anything else to the core
(``relay.core.RelayCore``). What the core and the policy (``relay.policy.Policy``) decide
comes back as typed actions (relay/actions.py), applied by ``_apply`` and nowhere else. The
loop (relay/loop.py) decides when each connection is served; ``export_state`` and
``restore`` carry the whole relay across a restart (relay/handover.py moves the bytes).
"""

from __future__ import annotations

import logging
import selectors
import socket
import time
from collections.abc import Callable

from nacl.signing import SigningKey

from ..config import Config
from ..errors import CloseReason, ProtocolError
from ..files import b64url_encode
from ..wire.connection import Connection, State
from .accounting import CloseAccounting
from .actions import PAUSED_BY_CLOSE, Action, Close, Pause, Send
from .clients import RECV_MAX, RECV_MIN, Client
from .core import CoreLimits, RelayCore, Role
from .linger import Linger, discard_input
from .listening import Listeners
from .memory import read_rss
from .metrics import Stats
from .output import Output
from .policy import NOT_OFFSET, Policy
from .state import ConnectionState, RelayState, StateError
from .timers import Timers

log = logging.getLogger("strelay")

# One connection gets at most this many frames a turn (the rest of what it sent waits, in
# order, for its next turn).
FRAME_BUDGET = 64
_ROLE_NAMES = {
    Role.PENDING: "pending",
    Role.LISTENER: "listener",
    Role.HALF_TUNNEL: "connector",
    Role.TUNNEL: "tunnel",
}

Sockets = dict[tuple[tuple[str, int], tuple[str, int]], socket.socket]


def core_limits(config: Config) -> CoreLimits:
    """The relay-layer limits and timeouts of ``config``."""
    limits, timeouts = config.limits, config.timeouts
    return CoreLimits(
        relay_conn_timeout=timeouts.relay_conn_timeout,
        half_tunnel_timeout=timeouts.half_tunnel,
        max_half_tunnels_per_listener=limits.max_half_tunnels_per_listener,
        max_half_tunnels_per_listener_per_ip=limits.max_half_tunnels_per_listener_per_ip,
        half_tunnel_buffer=limits.half_tunnel_buffer,
        max_orphaned_bytes=limits.max_orphaned_bytes,
    )


class Relay:
    """Every connection of one relay identity, and what happens to each."""

    def __init__(
        self,
        config: Config,
        identity: SigningKey,
        selector: selectors.BaseSelector,
        stats: Stats,
        now: float,
        *,
        rss: Callable[[], int] | None = None,
    ) -> None:
        self.identity = identity
        self.public_key = bytes(identity.verify_key)
        self.stats = stats
        self.limits = config.limits
        self.timeouts = config.timeouts
        self.clients: dict[int, Client] = {}
        self.backlog: dict[int, Client] = {}  # clients holding frames beyond their budget
        self._next_id = 1
        # The core consults the access lists (the policy's) on each first message.
        self.core = RelayCore(core_limits(config), refuse_request=self._refuse_request)
        self.policy = Policy(
            config,
            stats,
            self.clients,
            peer_of=self.core.peer_of,
            orphans_from=self.core.orphans_from,
            request_of=self.core.request_of,
            now=now,
            rss=rss if rss is not None else read_rss,
        )
        self._core_waiting = self.core.has_actions
        self.timers = Timers(self.clients)
        self.output = Output(selector, self.clients, self.core, config.limits, self.timers)
        self.listeners = Listeners(selector, stats)
        self.linger = Linger(selector)
        self.accounting = CloseAccounting(stats)

    def _refuse_request(self, kind: str, key: bytes) -> CloseReason | None:
        return self.policy.refuse_request(kind, key)

    def apply(self, config: Config, now: float) -> list[str]:
        """A checked configuration in force: limits and timeouts apply to what happens from
        now on (new connections, new half-tunnels, timers set from now); open connections
        the new access lists refuse are closed. Returns what the reload is to say it did."""
        self.limits = self.output.limits = config.limits
        self.timeouts = config.timeouts
        self.core.limits = core_limits(config)
        done = self.policy.apply(config, now)
        self._take_policy_actions(now)
        return done

    # ---- for the loop ------------------------------------------------------------------

    def has_work(self) -> bool:
        """Whether a turn should not wait: output to write, actions to apply, frames held."""
        if self.output.dirty or self.core.has_actions():
            return True
        return any(not client.paused for client in self.backlog.values())

    def next_deadline(self) -> float:
        """The earliest deadline of the connections, the core, the policy, the listeners."""
        return min(
            self.timers.next_deadline(),
            self.core.next_deadline(),
            self.policy.next_deadline(),
            self.listeners.next_deadline(),
        )

    def serve(self, client: Client, mask: int, now: float) -> None:
        """The loop's turn for ``client``: write, then read, what its events say."""
        if mask & selectors.EVENT_WRITE:
            self._write(client, now)
        if mask & selectors.EVENT_READ and not client.paused and client.id in self.clients:
            self.read(client, now)
        if self._core_waiting():
            self.drain(now)

    def may_accept(self, deferred: bool) -> bool:
        """Whether to accept this turn. A new connection at the handshake limit evicts the
        oldest handshake, which must not be one whose frames wait unread because the loop
        was busy (its peer may already count it open): while the turn left some unserved, a
        full handshake table accepts nothing (the kernel's backlog holds the connects until
        the loop catches up)."""
        return not (deferred and self.policy.handshakes_full())

    def accept(self, lsock: socket.socket, now: float) -> None:
        """Serve the connections waiting on a listening socket, as the policy allows."""
        for sock, ip, port in self.listeners.accept(lsock, now):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # reset before we got to it
                sock.close()
                continue
            self.add_connection(sock, (ip, port), now)
        if self.core.has_actions():
            self.drain(now)

    def tick(self, now: float) -> None:
        """What is due at ``now``: connection timers, the core's, the policy's and the
        listeners'; then every queue that got output is written."""
        self._run_timers(now)
        self.policy.tick(now)
        self._take_policy_actions(now)
        self.listeners.handle_timer(now)
        self.flush(now)
        if self.linger:
            self.linger.expire(now)

    def flush(self, now: float) -> None:
        """Write every connection that got output since the last flush."""
        clients = self.clients
        for client in self.output.take_dirty():
            if client.id in clients:
                self._write(client, now)
        if self.core.has_actions():  # a failed write ended a tunnel
            self.drain(now)

    # ---- connections -------------------------------------------------------------------

    def add_connection(
        self, sock: socket.socket, addr: tuple[str, int], now: float
    ) -> Client | None:
        """Serve an accepted socket, if the policy admits it; returns its client, or None."""
        decision = self.policy.admit(addr[0], len(self.clients), now)
        if decision.refused is not None:
            sock.close()
            return None
        if decision.evict is not None:
            self.close(decision.evict, CloseReason.EVICTED, now=now)
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
        client = Client(self._next_id, sock, addr[0], addr[1], wire)
        self._next_id += 1
        client.source = decision.source
        client.started = now
        self.clients[client.id] = client
        self.policy.admitted(client)
        self.output.set_events(client, selectors.EVENT_READ)
        self.timers.schedule(client, wire.next_deadline())
        self.output.take(client)
        return client

    def read(self, client: Client, now: float) -> None:
        """Read what ``client`` sent (or serve the frames it holds) and act on it."""
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
                self.close(client, CloseReason.RESET, f"receive failed: {exc.strerror}", now=now)
                return
            if not data:
                self.close(client, CloseReason.PEER_CLOSED, now=now)
                return
            if len(data) == client.recv_size:
                if client.recv_size < RECV_MAX:
                    client.recv_size *= 2
            elif client.recv_size > RECV_MIN and len(data) < client.recv_size // 4:
                client.recv_size //= 2
            policy = self.policy
            if policy.metering:
                policy.read(client, len(data), now)
                if policy.has_actions():
                    self._take_policy_actions(now)
        was_open = wire.state is State.OPEN
        core = self.core
        cid = client.id
        # The direct path: a tunnel's messages go straight to its other end, packed as they
        # came, one queue move for the batch. Anything else (and a tunnel while actions wait,
        # so that they keep their order) goes through the core.
        peer = None if self._core_waiting() else core.tunnel_peer(cid)
        target = self.clients.get(peer) if peer is not None else None
        forward = target is not None and not target.closing
        try:
            if forward:
                forwarded = wire.receive_forward(data, now, FRAME_BUDGET)
            else:
                messages = wire.receive_data(data, now, FRAME_BUDGET)
        except ProtocolError as exc:
            detail = str(exc)
            stranger = _stranger(data) if not was_open else None
            if stranger:
                detail = f"{detail}; {NOT_OFFSET}{stranger}"
            self.close(client, exc.reason, detail, now=now)
            return
        if wire.backlog:
            self.backlog[cid] = client
        else:
            self.backlog.pop(cid, None)
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
                self._relayed(target, len(forwarded), size)
        elif messages:
            message = core.message
            for payload in messages:
                client.bytes_in += len(payload)
                message(cid, payload, now)

    def _opened(self, client: Client, peer_key: bytes, now: float) -> None:
        """The client's handshake finished: it is the core's from now on, if the policy
        lets it go on."""
        if not self.policy.opened(client, now):
            # Over a budget whose action is "refuse": the end of its handshake goes out
            # first, so the client sees a close, not a failure.
            self.output.take(client)
            self.close(client, CloseReason.BUDGET, flush=True, now=now)
            return
        self.core.opened(client.id, peer_key, now, client.source)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s: open, key %s, after %.3f s",
                client.label,
                b64url_encode(peer_key)[:8],
                now - client.started,
            )
        self.timers.schedule(client, client.wire.next_deadline())

    def _write(self, client: Client, now: float) -> None:
        ended = self.output.write(client, now)
        if ended is not None:
            self.close(client, ended[0], ended[1], now=now)

    # ---- actions -----------------------------------------------------------------------

    def drain(self, now: float) -> None:
        """Apply the core's actions, oldest first. Closes made here queue theirs behind,
        taken by this same loop, so nothing is applied twice and a batch costs time linear
        in its size."""
        next_action = self.core.next_action
        apply = self._apply
        while (action := next_action()) is not None:
            apply(action, now)

    def _relayed(self, target: Client, messages: int, size: int) -> None:
        """``messages`` of ``size`` payload bytes in all were queued for ``target``: the one
        place relayed traffic is counted, whichever path carried it."""
        target.bytes_out += size
        stats = self.stats
        stats.messages_relayed += messages
        stats.bytes_relayed += size
        self.output.take(target)

    def _take_policy_actions(self, now: float) -> None:
        next_action = self.policy.next_action
        while (action := next_action()) is not None:
            self._apply(action, now)
        if self.core.has_actions():
            self.drain(now)

    def _apply(self, action: Action, now: float) -> None:
        """Do what one action says (the core's or the policy's)."""
        target = self.clients.get(action.conn_id)
        if target is None:
            return
        if isinstance(action, Send):  # the usual one
            if not target.closing:
                target.wire.send_message(action.payload, now)
                self._relayed(target, 1, len(action.payload))
        elif isinstance(action, Close):
            self.close(target, action.reason, flush=action.flush, now=now)
        elif isinstance(action, Pause):
            self.output.pause(target, action.why)
        else:
            self.output.resume(target, action.why, now)

    # ---- timers ------------------------------------------------------------------------

    def _run_timers(self, now: float) -> None:
        clients = self.clients
        timers = self.timers
        while (client := timers.pop_due(now)) is not None:
            if now >= client.close_by:
                self.close(client, CloseReason.FLUSH_TIMEOUT, now=now)
                continue
            wire = client.wire
            if not client.paused and wire.timer_would_close(now):
                # Before closing for silence or an unfinished set-up, read what the peer has
                # sent: a loop that was busy must not take its own delay for the peer's.
                self.read(client, now)
                if clients.get(client.id) is not client:
                    continue
            try:
                wire.handle_timer(now)
            except ProtocolError as exc:
                self.close(client, exc.reason, str(exc), now=now)
                continue
            if wire.pending_output:
                self.output.take(client)
            timers.schedule(client, min(wire.next_deadline(), client.close_by))
        core = self.core
        if core.next_deadline() <= now:
            # As above: a first message waiting unread is read before its deadline closes.
            for cid in core.due_first_messages(now):
                due = clients.get(cid)
                if due is not None and not due.paused:
                    self.read(due, now)
            core.handle_timer(now)
        if core.has_actions():
            self.drain(now)

    # ---- closing -----------------------------------------------------------------------

    def close(
        self,
        client: Client,
        reason: CloseReason,
        detail: str = "",
        *,
        flush: bool = False,
        now: float,
    ) -> None:
        """Close ``client`` for ``reason``, or with ``flush`` first send what it has queued.

        Never applies the core's actions: what the close causes is queued for ``drain``.
        """
        cid = client.id
        if self.clients.get(cid) is not client:
            return
        policy = self.policy
        handshaking = policy.is_handshaking(client)
        if not client.role:
            role = self.core.role(cid)
            if role is not None:
                client.role = _ROLE_NAMES[role]
            elif handshaking:
                client.role = "handshake"
            elif reason is CloseReason.TUNNEL_PEER_CLOSED:
                client.role = "tunnel"  # the core let go of the tunnel with its other end
        policy.closing(client, reason, handshaking, now, detail)
        if flush and not client.closing and client.out:
            client.closing = True
            client.close_reason = reason
            self.output.pause(client, PAUSED_BY_CLOSE)
            self.core.closed(cid, reason)
            self.output.want_write(client, True)
            # A peer that never reads must not keep a closing connection forever.
            client.close_by = now + self.timeouts.keepalive
            self.timers.schedule(client, client.close_by)
            return
        del self.clients[cid]
        self.backlog.pop(cid, None)
        self.accounting.closed(client, reason, handshaking=handshaking, detail=detail, now=now)
        policy.closed(client, now)
        self.output.forget(client)
        if reason in _PEER_GONE:
            client.sock.close()
        elif reason is CloseReason.SHUTDOWN:  # no loop left to linger in: a FIN if it can
            discard_input(client.sock)
            client.sock.close()
        else:
            self.linger.close(client.sock, now)
        self.core.closed(cid, reason)

    def shutdown(self, now: float) -> None:
        """Stop listening and close every connection."""
        self.listeners.close()
        self.linger.close_all()
        for client in list(self.clients.values()):
            self.close(client, CloseReason.SHUTDOWN, now=now)
        self.core.discard_actions()  # every connection is closed already
        self.policy.stop(now)

    # ---- hand-over ---------------------------------------------------------------------

    def handed_over(self) -> list[Client]:
        """The connections a hand-over gives the next process (every one not closed)."""
        return [c for c in self.clients.values() if c.wire.state is not State.CLOSED]

    def export_state(self, now: float) -> RelayState:
        """The whole relay as typed data (secret: it holds every channel's keys)."""
        records = []
        for client in self.handed_over():
            local, remote = socket_address(client.sock, False), socket_address(client.sock, True)
            if local is None or remote is None:
                continue  # already reset: nothing to hand over
            out = b"".join([*client.out, *client.wire.data_to_send()])
            records.append(
                ConnectionState(
                    id=client.id,
                    local=local,
                    remote=remote,
                    wire=client.wire.export_state(now),
                    out=out,
                    paused=client.paused,
                    closing=client.close_reason.value if client.close_reason else None,
                    close_in=None if client.close_by == float("inf") else client.close_by - now,
                    recv_size=client.recv_size,
                    source=client.source,
                )
            )
        return RelayState(
            relay=self.public_key,
            boot_id=boot_id(),
            monotonic=time.monotonic(),
            core=self.core.export_state(now),
            connections=tuple(records),
            usage=self.policy.usage_document(now),
        )

    def release(self) -> None:
        """Let go of every socket without telling any peer (their copies are in the store)."""
        self.listeners.release()
        self.linger.close_all()  # closed already as far as their peers know
        for client in self.clients.values():
            if client.events:
                self.output.selector.unregister(client.sock)
                client.events = 0
            client.sock.close()
        self.clients.clear()
        self.backlog.clear()
        self.core.discard_actions()

    def restore(self, state: RelayState, sockets: Sockets, now: float) -> tuple[int, list[str]]:
        """Serve the connections of ``state`` on their inherited ``sockets`` (the ones used
        are taken out). Returns how many came back and why each of the others was closed.
        A state that does not hold together raises ``StateError`` and closes them all."""
        if state.relay != self.public_key:
            raise StateError("hand-over state of another relay identity")
        downtime = 0.0
        if state.boot_id and state.boot_id == boot_id():
            # CLOCK_MONOTONIC is one clock for the whole system until the next boot.
            downtime = max(0.0, time.monotonic() - state.monotonic)
        restored: dict[int, Client] = {}
        failed: list[str] = []
        for record in state.connections:
            sock = sockets.pop((record.local, record.remote), None)
            if sock is None:
                continue  # reset while stored, or never stored
            try:
                client = self._restore_client(record, sock, now, downtime)
            except (KeyError, TypeError, ValueError) as exc:
                close_quietly(sock)
                failed.append(str(exc))
                continue
            if client.id in restored:
                close_quietly(sock)
                failed.append("connection id missing or taken")
                continue
            restored[client.id] = client
        opened = {
            cid for cid, c in restored.items() if not c.closing and c.wire.state is State.OPEN
        }
        try:
            self.core.restore_state(state.core, now, opened)
        except ValueError as exc:
            for client in restored.values():
                close_quietly(client.sock)
            raise StateError(f"relay state unusable: {exc}") from None
        policy = self.policy
        for client in restored.values():
            self.clients[client.id] = client
        for client in list(restored.values()):
            policy.adopt(client, now)
            in_core = self.core.role(client.id) is not None
            if client.wire.state is State.OPEN and not client.closing and not in_core:
                failed.append(f"connection {client.id} not in the relay state")
                self.close(client, CloseReason.SHUTDOWN, now=now)
                continue
            self._watch(client)
        policy.take_usage(state.usage)
        self.stats.accepted += len(self.clients)
        self._next_id = max(restored, default=0) + 1
        self._take_policy_actions(now)
        self.drain(now)
        return len(self.clients), failed

    def _restore_client(
        self, record: ConnectionState, sock: socket.socket, now: float, downtime: float
    ) -> Client:
        wire = Connection.restore_state(
            record.wire,
            self.identity,
            now,
            downtime=downtime,
            max_frame_length=self.limits.max_frame_length,
        )
        if record.id in self.clients:
            raise ValueError("connection id missing or taken")
        sock.setblocking(False)
        ip, port = record.remote
        client = Client(record.id, sock, ip, port, wire)
        # As it counted before the restart; a state of version 1 did not say.
        client.source = record.source if record.source is not None else self.policy.source_of(ip)
        client.started = now  # its debug close line counts from the hand-over
        if record.out:
            client.out.append(record.out)
            client.out_size = len(record.out)
        client.paused = record.paused
        if record.closing is not None:
            client.closing = True
            client.close_reason = CloseReason(record.closing)
            client.close_by = now + float(record.close_in or 0.0)
        client.recv_size = record.recv_size
        return client

    def _watch(self, client: Client) -> None:
        output = self.output
        events = 0 if client.paused else selectors.EVENT_READ
        if client.out:
            events |= selectors.EVENT_WRITE
            output.dirty.add(client)
            if client.out_size >= self.limits.buffer_high_water:
                client.congested = True
                self.core.set_congested(client.id, True)
        output.set_events(client, events)
        self.timers.schedule(client, min(client.wire.next_deadline(), client.close_by))
        if client.wire.backlog:
            # Frames received beyond its budget before the hand-over: served in the next turn.
            self.backlog[client.id] = client

    # ---- counts ------------------------------------------------------------------------

    def connection_counts(self) -> dict[str, int]:
        """Open connections by what they are doing (walks them: scrape time only)."""
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
        is_handshaking = self.policy.is_handshaking
        for cid, client in self.clients.items():
            if client.closing:
                counts["closing"] += 1
            elif is_handshaking(client):
                counts["handshaking"] += 1
            else:
                found = role(cid)
                counts[names[found] if found is not None else "waiting"] += 1
        return counts


def boot_id() -> str:
    """This boot's id (the monotonic clock's epoch is the boot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            return file.read().strip()
    except OSError:
        return ""


def socket_address(sock: socket.socket, peer: bool) -> tuple[str, int] | None:
    """The socket's own (or its peer's) address and port; None once it is reset."""
    try:
        address = sock.getpeername() if peer else sock.getsockname()
    except OSError:
        return None
    return (address[0], address[1])


# What a connection that is not an Offset client sends first: its protocol.
_STRANGERS = (
    (
        (b"GET ", b"POST", b"HEAD", b"PUT ", b"DELE", b"OPTI", b"CONN", b"PATC", b"PRI "),
        "HTTP request",
    ),
    ((b"\x16\x03",), "TLS handshake"),
    ((b"SSH-",), "SSH"),
)


def _stranger(data: bytes) -> str | None:
    """The protocol a failed handshake's bytes look like, if it is a known one."""
    for starts, name in _STRANGERS:
        if data.startswith(starts):
            return name
    return None


# Closes the peer began (its FIN or reset is in): nothing of its input is left to discard,
# and no FIN of the relay's can go out after them.
_PEER_GONE = frozenset({CloseReason.PEER_CLOSED, CloseReason.RESET})


def close_quietly(sock: socket.socket, limit: int = 1 << 22) -> None:
    """Close a connection with a FIN: the kernel answers a close with unread bytes waiting
    with a reset, so read (and drop) up to ``limit`` bytes first."""
    try:
        sock.setblocking(False)
        while limit > 0:
            data = sock.recv(min(limit, 1 << 16))
            if not data:
                break
            limit -= len(data)
    except OSError:
        pass
    sock.close()
