"""Hand-over across a restart: the state of wire.Connection and RelayCore as plain data, its
container and memfd, and two relays in this process passing live connections through a
service manager's descriptor store (a small one, in a thread, speaking sd_notify)."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket
import threading
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from offset_appliance.config import carried_config, config_from_carried, load_config
from offset_appliance.errors import CloseReason, ConfigError
from offset_appliance.files import b64url_encode
from offset_appliance.relay import handover
from offset_appliance.relay.clients import PAUSED_BY_MEMORY, PAUSED_BY_PEER
from offset_appliance.relay.core import CoreLimits, RelayCore, Role, Send
from offset_appliance.relay.server import RelayServer, start_config
from offset_appliance.relay.state import RelayState
from offset_appliance.wire.connection import Connection, State
from offset_appliance.wire.messages import (
    Accept,
    Connect,
    IncomingConnection,
    Listen,
    encode_init_connection,
)

from .server_rig import FakeClock, Rig


def _pump(a: Connection, b: Connection, now: float) -> tuple[list[bytes], list[bytes]]:
    """Move bytes both ways until neither side has output; the messages each received."""
    got_a: list[bytes] = []
    got_b: list[bytes] = []
    while a.pending_output or b.pending_output:
        got_b += b.receive_data(b"".join(a.data_to_send()), now)
        got_a += a.receive_data(b"".join(b.data_to_send()), now)
    return got_a, got_b


def _through(conn: Connection, identity: SigningKey, now: float, **kwargs) -> Connection:
    """``conn`` exported, packed, unpacked and restored: what the next process gets."""
    document = handover.unpack_state(handover.pack_state(conn.export_state(now)))
    assert isinstance(document, dict)
    return Connection.restore_state(document, identity, now, **kwargs)


RELAY = SigningKey.generate()
NODE = SigningKey.generate()


def _pair(now: float = 0.0) -> tuple[Connection, Connection]:
    relay = Connection(RELAY, now, timer_spread=0.0)
    node = Connection(NODE, now, expected_peer=bytes(RELAY.verify_key), timer_spread=0.0)
    return relay, node


def _talks(relay: Connection, node: Connection, now: float) -> None:
    """Both directions carry messages, and a rekey from either side completes."""
    node.send_message(b"to relay", now)
    relay.send_message(b"to node", now)
    got_relay, got_node = _pump(relay, node, now)
    assert got_relay == [b"to relay"] and got_node == [b"to node"]
    rekeys = relay.rekeys
    relay.start_rekey(now)
    _pump(relay, node, now)
    node.start_rekey(now)
    node.send_message(b"after rekeys", now)
    got_relay, _ = _pump(relay, node, now)
    assert got_relay == [b"after rekeys"] and relay.rekeys == rekeys + 2


# ---- wire.Connection -------------------------------------------------------------------


@pytest.mark.parametrize("step", ["version", "await_nonce", "await_dh"])
def test_connection_restored_in_set_up_finishes_its_handshake(step):
    relay, node = _pair()
    hello = b"".join(node.data_to_send())
    if step != "version":
        # The version frame reached the relay, or also the node's nonce (then the relay
        # has sent its DH and waits for the node's).
        relay.receive_data(hello[:12] if step == "await_nonce" else hello, 0.0)
        assert relay.state is State.HANDSHAKE
        hello = b"" if step == "await_dh" else hello[12:]
    relay = _through(relay, RELAY, 0.0)
    relay.receive_data(hello, 0.0)
    _pump(relay, node, 0.0)
    assert relay.state is node.state is State.OPEN
    assert relay.peer_public_key == bytes(NODE.verify_key)
    _talks(relay, node, 0.0)


def test_open_connection_round_trip_every_channel_state():
    relay, node = _pair()
    _pump(relay, node, 0.0)
    _talks(_through(relay, RELAY, 0.0), node, 0.0)
    # A rekey of ours awaiting its answer (its DH private key travels in the state).
    relay, node = _pair()
    _pump(relay, node, 0.0)
    relay.start_rekey(0.0)
    relay = _through(relay, RELAY, 0.0)
    _pump(relay, node, 0.0)
    assert relay.rekeys == node.rekeys == 1
    _talks(relay, node, 0.0)
    # Just after a switch: the old receive key still opens frames in flight.
    relay, node = _pair()
    _pump(relay, node, 0.0)
    node.start_rekey(0.0)
    rekey = b"".join(node.data_to_send())
    node.send_message(b"under the old key", 0.0)  # sent before the answer arrives
    in_flight = b"".join(node.data_to_send())
    relay.receive_data(rekey, 0.0)
    assert relay.rekeys == 1 and relay._channel._old_recv is not None
    relay = _through(relay, RELAY, 0.0)
    assert relay.receive_data(in_flight, 0.0) == [b"under the old key"]
    _pump(relay, node, 0.0)
    _talks(relay, node, 0.0)


def test_partial_frame_and_untaken_output_travel_byte_exact():
    relay, node = _pair()
    _pump(relay, node, 0.0)
    node.send_message(b"x" * 5000, 0.0)
    wire = b"".join(node.data_to_send())
    assert relay.receive_data(wire[:1234], 0.0) == []
    relay.send_message(b"queued before the restart", 0.0)
    relay = _through(relay, RELAY, 0.0)
    assert relay.receive_data(wire[1234:], 0.0) == [b"x" * 5000]
    _, got_node = _pump(relay, node, 0.0)
    assert got_node == [b"queued before the restart"]


def test_deadlines_travel_as_durations_and_downtime_counts_against_ours_only():
    relay, node = _pair(now=100.0)
    _pump(relay, node, 100.0)
    keepalive = relay._keepalive
    assert keepalive is not None
    interval = keepalive.interval
    # 10 s into the connection, restored in a process whose clock reads 5000, after 3 s
    # with no process serving it.
    restored = _through(relay, RELAY, 110.0)
    assert restored.next_deadline() == pytest.approx(110.0 + interval / 2 - 10)
    restored = Connection.restore_state(relay.export_state(110.0), RELAY, 5000.0, downtime=3.0)
    ka = restored._keepalive
    assert ka is not None
    assert ka.send_deadline() == pytest.approx(5000.0 + interval / 2 - 10 - 3)
    assert ka.recv_deadline() == pytest.approx(5000.0 + interval - 10)  # not the peer's fault
    # A restore past our own keepalive deadline sends one at once.
    late = Connection.restore_state(relay.export_state(110.0), RELAY, 0.0, downtime=interval)
    late.handle_timer(0.0)
    assert node.receive_data(b"".join(late.data_to_send()), 0.0) == []
    assert late.state is State.OPEN


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s.update(v=2),
        lambda s: s.update(state="FLYING"),
        lambda s: s.pop("channel"),
        lambda s: s["channel"].update(send=[b"short", 0]),
        lambda s: s["channel"].update(recv=[bytes(32), -1]),
        lambda s: s["keepalive"].update(since_recv=-5),
        lambda s: s["decoder"].update(partial=b"\0" * 8, need=1 << 40),
        lambda s: s.update(out="text"),
        lambda s: s.update(handshake={"state": "AWAIT_DH"}),
    ],
)
def test_damaged_connection_state_is_refused_not_guessed(damage):
    relay, node = _pair()
    _pump(relay, node, 0.0)
    state = relay.export_state(0.0)
    damage(state)
    with pytest.raises(ValueError):
        Connection.restore_state(state, RELAY, 0.0)


def test_handshake_of_another_identity_is_refused():
    relay, node = _pair()
    relay.receive_data(b"".join(node.data_to_send()), 0.0)
    with pytest.raises(ValueError):
        Connection.restore_state(relay.export_state(0.0), SigningKey.generate(), 0.0)


# ---- RelayCore -------------------------------------------------------------------------


def _core_with_everything() -> RelayCore:
    core = RelayCore(CoreLimits(half_tunnel_buffer=10))
    keys = [bytes([n]) * 32 for n in range(8)]
    core.opened(1, keys[1], 0.0)  # listener
    core.message(1, encode_init_connection(Listen()), 0.0)
    core.opened(2, keys[2], 0.0)  # half-tunnel to it, with early data, paused
    core.message(2, encode_init_connection(Connect(keys[1])), 0.0)
    core.message(2, b"early data", 0.0)
    core.opened(3, keys[3], 0.0)  # a tunnel: 3 connects, 4 accepts
    core.message(3, encode_init_connection(Connect(keys[1])), 0.0)
    core.opened(4, keys[1], 0.0)
    core.message(4, encode_init_connection(Accept(keys[3])), 0.0)
    core.opened(5, keys[5], 0.0)  # waiting for its first message
    core.discard_actions()
    return core


def _taken(core: RelayCore) -> list:
    actions = []
    while (action := core.next_action()) is not None:
        actions.append(action)
    return actions


def test_core_round_trip_keeps_listeners_half_tunnels_and_pairings():
    core = _core_with_everything()
    document = handover.unpack_state(handover.pack_state(core.export_state(4.0)))
    assert isinstance(document, dict)
    new = RelayCore(CoreLimits(half_tunnel_buffer=10))
    assert sorted(new.restore_state(document, 1000.0, {1, 2, 3, 4, 5})) == [1, 2, 3, 4, 5]
    assert not new.has_actions()
    assert new.listener_of(bytes([1]) * 32) == 1 and new.tunnels == 1
    assert new.role(2) is Role.HALF_TUNNEL and new.role(5) is Role.PENDING
    # What each asked, which a reload's access lists judge it by (a tunnel's two sides).
    assert new.request_of(3) == (bytes([3]) * 32, "connect")
    assert new.request_of(4) == (bytes([1]) * 32, "accept")
    assert new.request_of(1) == (bytes([1]) * 32, "listen") and new.request_of(5) is None
    new.message(3, b"through", 1000.0)
    assert new.next_action() == Send(4, b"through")
    # The half-tunnel's early data is delivered on accept, and its reading resumed.
    new.opened(6, bytes([1]) * 32, 1000.0)
    new.message(6, encode_init_connection(Accept(bytes([2]) * 32)), 1000.0)
    actions = _taken(new)
    assert Send(6, b"early data") in actions and new.tunnels == 2
    # Deadlines kept as durations: the pending first message is due 1000 + (timeout - 4).
    limits = CoreLimits()
    assert new.next_deadline() == pytest.approx(1000.0 + limits.relay_conn_timeout - 4.0)


def test_core_restore_closes_what_did_not_come_back():
    core = _core_with_everything()
    new = RelayCore()
    new.restore_state(core.export_state(0.0), 0.0, {1, 2, 4, 5})  # 3 lost its socket
    assert new.role(3) is None and new.role(4) is None and new.tunnels == 0
    closes = [a for a in _taken(new) if type(a).__name__ == "Close"]
    assert [c.conn_id for c in closes] == [4]


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s["conns"][0].update(role="GHOST"),
        lambda s: s["listeners"].append([b"\7" * 32, 99]),
        lambda s: s["conns"].append(dict(s["conns"][0])),
        lambda s: s["half_tunnels"][0].update(conn=4),
        lambda s: s.pop("conns"),
    ],
)
def test_damaged_core_state_is_refused_and_leaves_an_empty_core(damage):
    state = _core_with_everything().export_state(0.0)
    damage(state)
    new = RelayCore()
    with pytest.raises(ValueError):
        new.restore_state(state, 0.0, {1, 2, 3, 4, 5})
    assert new.listener_count == 0 and new.half_tunnel_count == 0 and new.tunnels == 0


# ---- container and memfd ---------------------------------------------------------------


def test_container_round_trip_and_damage():
    document = {"a": [b"\0\1", {"b": b""}, 1.5, None, True], "c": "text"}
    packed = handover.pack_state(document)
    assert handover.unpack_state(packed) == document
    for damaged in (
        b"",
        b"NOTRELAY" + packed[8:],
        packed[:8] + (3).to_bytes(4, "big") + packed[12:],  # a version from the future
        packed[:30],
        packed[:-1],  # a blob cut short
        packed[:20] + b"]" + packed[21:],  # the document unreadable
    ):
        with pytest.raises(handover.StateError):
            handover.unpack_state(damaged)


def test_memfd_is_sealed_and_an_unsealed_one_refused():
    fd = handover.sealed_memfd(b"secret state")
    try:
        assert handover.read_sealed(fd) == b"secret state"
        with pytest.raises(OSError) as info:
            os.pwrite(fd, b"X", 0)
        assert info.value.errno == errno.EPERM
    finally:
        os.close(fd)
    fd = os.memfd_create("unsealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, handover.pack_state({}))
        with pytest.raises(handover.StateError):
            handover.read_sealed(fd)
    finally:
        os.close(fd)


# ---- two relays and a store ------------------------------------------------------------


class FakeStore:
    """The part of systemd's notify socket a hand-over uses: FDSTORE, FDSTOREREMOVE and
    BARRIER, in a thread. What it keeps it gives back as ``Inherited`` would take it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.fds: list[tuple[str, int]] = []
        self.messages: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 65536, 300)
            except OSError:
                return
            if data == b"quit":
                return
            message = data.decode()
            self.messages.append(message)
            fields = dict(line.split("=", 1) for line in message.splitlines())
            if "BARRIER" in fields:
                for fd in fds:
                    os.close(fd)
            elif "FDSTOREREMOVE" in fields:
                for name, fd in [e for e in self.fds if e[0] == fields["FDNAME"]]:
                    os.close(fd)
                    self.fds.remove((name, fd))
            elif "FDSTORE" in fields:
                for fd in fds:
                    # As systemd, a descriptor it holds already is not stored twice.
                    stat = os.fstat(fd)
                    if any(os.path.samestat(stat, os.fstat(kept)) for _, kept in self.fds):
                        os.close(fd)
                    else:
                        self.fds.append((fields.get("FDNAME", "stored"), fd))

    def inherit(self) -> handover.Inherited:
        """The descriptors a new start gets: copies, the store keeps its own."""
        inherited = handover.Inherited()
        for name, fd in self.fds:
            inherited.take(os.dup(fd), name)
        return inherited

    def close(self) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"quit", self.path)
        self._thread.join()
        self.sock.close()
        for _, fd in self.fds:
            os.close(fd)


@pytest.fixture
def store(tmp_path):
    made = FakeStore(tmp_path / "notify")
    yield made
    made.close()


def _restart(rig: Rig, store: FakeStore, *, damage=None) -> None:
    """Stop ``rig``'s relay as systemd would with a hand-over, and start a new one."""
    old = rig.server
    old.handover = handover.Handover(handover.ServiceManager(store.path))
    if damage is not None:
        packed = handover.pack_state

        def pack_damaged(document: object, version: int = handover.FORMAT_VERSION) -> bytes:
            return damage(packed(document, version))

        handover.pack_state, saved = pack_damaged, handover.pack_state
        try:
            assert old.handover.hand_over(old.relay, old.clock())
        finally:
            handover.pack_state = saved
    else:
        assert old.handover.hand_over(old.relay, old.clock())
    old.selector.close()
    rig.clock = FakeClock(50_000.0)  # another process: another clock reading
    # The new process reads the port the old one was given, as a configured one.
    rig.config = dataclasses.replace(rig.config, listen=(rig.address,))
    new = RelayServer(rig.config, old.identity, clock=rig.clock)
    inherited = store.inherit()
    assert new.bind(inherited) == [rig.address]
    new.handover = handover.Handover(handover.ServiceManager(store.path))
    new.handover.started(new.relay, inherited, new.clock())
    rig.server = new


def test_relay_hands_every_connection_over_and_a_peer_sees_a_pause(store):
    rig = Rig()
    try:
        _, connector, acceptor = rig.tunnel()
        idle = rig.listener()
        half = rig.node()
        half.send(encode_init_connection(Connect(idle.public_key)))
        half.send(b"early")
        rig.settle()
        assert idle.inbox.pop() == IncomingConnection(half.public_key).encode()
        # Bytes in flight both ways, some still queued in the old relay.
        connector.send(b"c" * 100_000)
        acceptor.send(b"a" * 100_000)
        for node in (connector, acceptor):
            node.pump()
        rig.server.step(0.01)
        _restart(rig, store)
        assert len(rig.server.clients) == 5 and rig.server.core.tunnels == 1
        assert [name for name, _ in store.fds] == ["listen"]  # conns and state taken back
        rig.settle()
        assert acceptor.inbox == [b"c" * 100_000] and connector.inbox == [b"a" * 100_000]
        # The half-tunnel is accepted after the restart and gets its early data.
        accepting = rig.node(idle.identity)
        accepting.send(encode_init_connection(Accept(half.public_key)))
        rig.settle()
        assert accepting.inbox == [b"early"]
        half.send(b"later")
        rig.settle()
        assert accepting.inbox == [b"early", b"later"]
        assert all(node.is_open for node in rig.nodes)
        # And the relay can be handed over again.
        _restart(rig, store)
        connector.send(b"again")
        rig.settle()
        assert acceptor.inbox[-1] == b"again" and all(node.is_open for node in rig.nodes)
    finally:
        rig.close()


_PACK_STATE = handover.pack_state


def _as_version_1(packed: bytes) -> bytes:
    """The same relay state as a relay before the Loop / Relay / Policy split wrote it:
    format version 1, no connection records a source."""
    version, document = handover.unpack_versioned(packed)
    assert version == handover.FORMAT_VERSION == 2
    assert isinstance(document, dict)
    for record in document["clients"]:
        del record["source"]
    return _PACK_STATE(document, 1)  # not the stand-in _restart puts in its place


def test_a_state_of_the_previous_version_is_restored_with_its_sources(store, caplog):
    caplog.set_level(logging.INFO, logger="strelay")
    rig = Rig(limits={"ipv4_prefix": 24})
    try:
        _, connector, acceptor = rig.tunnel()
        idle = rig.listener()
        _restart(rig, store, damage=_as_version_1)
        assert "hand-over: 4 connections restored" in caplog.text
        assert rig.server.core.tunnels == 1 and rig.server.core.listener_count == 2
        # The sources, which version 1 did not carry, are worked out from the addresses.
        assert rig.server.policy.per_source == {"127.0.0.0/24": 4}
        assert {c.source for c in rig.server.clients.values()} == {"127.0.0.0/24"}
        connector.send(b"after the upgrade")
        rig.settle()
        assert acceptor.inbox[-1] == b"after the upgrade"
        assert all(node.is_open for node in (connector, acceptor, idle))
    finally:
        rig.close()


def test_damaged_state_closes_connections_cleanly_and_the_relay_serves(store, caplog):
    rig = Rig()
    try:
        _, connector, acceptor = rig.tunnel()
        _restart(rig, store, damage=lambda packed: packed[:8] + b"\0\0\0\x63" + packed[12:])
        assert not rig.server.clients
        assert sum("hand-over state unusable" in r.getMessage() for r in caplog.records) == 1
        rig.settle()
        assert connector.eof and acceptor.eof  # a close, not a hang
        assert [name for name, _ in store.fds] == ["listen"]
        listener, connector, acceptor = rig.tunnel()  # the relay runs
        connector.send(b"fresh")
        rig.settle()
        assert acceptor.inbox == [b"fresh"]
    finally:
        rig.close()


def MESSAGE(n: int) -> bytes:  # noqa: N802
    return b"%04d" % n + b"x" * 60000


def _stalled_tunnel(rig: Rig, count: int = 40):
    """A tunnel whose acceptor stopped reading: its queue in the relay fills up."""
    listener, connector, acceptor = rig.tunnel()
    acceptor.reading = False
    client = rig.client_of(acceptor)
    # Buffers small enough to fill, large enough (over twice loopback's 64 KiB segment)
    # that the window reopens as soon as the acceptor reads.
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 17)
    acceptor.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 17)
    for n in range(count):
        connector.send(MESSAGE(n))
    rig.settle()
    assert client.out_size > 0
    return listener, connector, acceptor


def test_back_pressure_travels_and_lets_go_after_the_hand_over(store):
    rig = Rig(limits={"buffer_high_water": 65536, "buffer_low_water": 16384})
    try:
        _, connector, acceptor = _stalled_tunnel(rig)
        assert rig.client_of(connector).paused & PAUSED_BY_PEER
        _restart(rig, store)
        assert rig.client_of(connector).paused & PAUSED_BY_PEER  # still held back
        assert rig.client_of(acceptor).out_size >= 16384  # above the low water mark
        acceptor.reading = True
        rig.settle()
        assert acceptor.inbox == [MESSAGE(n) for n in range(40)]
        assert rig.client_of(connector).paused == 0
        connector.send(b"after")
        rig.settle()
        assert acceptor.inbox[-1] == b"after"
    finally:
        rig.close()


def test_a_closing_connection_finishes_its_flush_after_the_hand_over(store):
    rig = Rig(timeouts={"keepalive": 30.0})
    try:
        # Below the high water mark: the relay keeps reading the connector, sees it close.
        _, connector, acceptor = _stalled_tunnel(rig, 12)
        connector.close()
        rig.settle()
        assert rig.client_of(acceptor).closing
        _restart(rig, store)
        restored = rig.client_of(acceptor)
        assert restored.closing and restored.close_reason is CloseReason.TUNNEL_PEER_CLOSED
        acceptor.reading = True
        rig.settle()
        assert acceptor.inbox == [MESSAGE(n) for n in range(12)]
        assert acceptor.eof
        assert rig.server.stats.closed["tunnel_peer_closed"] == 1
    finally:
        rig.close()


def test_a_feeder_paused_for_memory_reads_again_after_the_hand_over(store):
    rig = Rig(limits={"max_memory": 1 << 40, "ipv4_prefix": 24})
    try:
        _, connector, acceptor = _stalled_tunnel(rig)
        feeder = rig.client_of(connector)
        rig.server.policy.memory.rss = lambda: 1 << 41  # over the ceiling
        rig.clock.advance(1.0)
        rig.settle()
        assert feeder.paused & PAUSED_BY_MEMORY
        _restart(rig, store)  # the new process has a ceiling it is below
        assert rig.client_of(connector).paused & PAUSED_BY_MEMORY  # as it was handed over
        assert rig.client_of(connector).source == "127.0.0.0/24"
        assert rig.server.policy.per_source == {"127.0.0.0/24": 3}  # the tunnel's three
        acceptor.reading = True
        rig.settle()
        assert not rig.client_of(connector).paused
        assert acceptor.inbox == [MESSAGE(n) for n in range(40)]
    finally:
        rig.close()


# ---- a restart whose configuration files do not load -----------------------------------


def _relay_toml(path: Path, deny_file: Path, max_connections: object) -> None:
    """A configuration file of the rig's relay; ``max_connections`` as TOML text."""
    path.write_text(
        f'identity_file = "/nonexistent"\nlisten = ["127.0.0.1:1"]\n'
        f"[limits]\nmax_connections = {max_connections}\n"
        f'[access]\nlisten_deny = ["{deny_file}"]\n'
    )


def _stop_handing_over(rig: Rig, store: FakeStore) -> None:
    """Stop ``rig``'s relay as systemd would with a hand-over (its running config too)."""
    old = rig.server
    old.handover = handover.Handover(handover.ServiceManager(store.path))
    assert old.handover.hand_over(old.relay, old.clock(), old.config)
    old.selector.close()


def test_a_restart_whose_files_do_not_load_serves_on_with_the_handed_over_config(
    store, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="strelay")
    config_file, deny_file = tmp_path / "relay.toml", tmp_path / "deny.keys"
    denied = SigningKey.generate().verify_key
    deny_file.write_text(b64url_encode(bytes(denied)) + "\n")
    _relay_toml(config_file, deny_file, 300)
    rig = Rig()
    try:
        # The running relay: the file's settings, on the port it was given.
        running = dataclasses.replace(load_config(config_file), listen=(rig.address,))
        rig.server.relay.apply(running, rig.clock())
        rig.server.config = running
        listener, connector, acceptor = rig.tunnel()
        # A typo in the file, the key file gone, and a restart.
        _relay_toml(config_file, deny_file, '"many"')
        deny_file.unlink()
        _stop_handing_over(rig, store)
        inherited = store.inherit()
        config, error = start_config(lambda: load_config(config_file), inherited)
        assert error == (f"{config_file}: limits.max_connections: expected a number, got 'many'")
        assert config == running  # every setting, and the key file's keys as they were
        assert config.access.listen_deny.keys == {bytes(denied)}
        rig.clock = FakeClock(50_000.0)
        new = RelayServer(
            config,
            rig.server.identity,
            clock=rig.clock,
            reload_config=lambda: load_config(config_file),
        )
        sent: list[str] = []
        new.notifier.notify = sent.append
        assert new.bind(inherited) == [rig.address]
        new.handover = handover.Handover(handover.ServiceManager(store.path))
        new.handover.started(new.relay, inherited, new.clock())
        caplog.clear()
        new.kept_handover_config(error)  # as ``run`` does
        rig.server = new
        # Every connection carries on.
        assert len(new.clients) == 3 and new.core.tunnels == 1
        connector.send(b"after the restart")
        rig.settle()
        assert acceptor.inbox[-1] == b"after the restart"
        assert all(node.is_open for node in (listener, connector, acceptor))
        # Said loudly: one error line naming the file and the key, STATUS=, the metric.
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [
            f"configuration not loaded: {config_file}: limits.max_connections: expected a "
            "number, got 'many'; serving with the configuration of the previous process "
            "(the hand-over's) until a reload or restart reads good files"
        ]
        assert sent[-1].startswith(
            "STATUS=configuration not loaded, serving the hand-over's: "
            f"{config_file}: limits.max_connections: expected a number, got 'many'; "
        )
        assert "offset_relay_config_last_reload_successful 0" in new.metrics_text()
        # A good file, and a reload: applied, and the verdict back at 1.
        deny_file.write_text("")
        _relay_toml(config_file, deny_file, 77)
        new.request_reload()
        rig.settle()
        assert new.config.limits.max_connections == 77
        assert new.config.access.listen_deny.keys == frozenset()
        assert new.config.listen == (rig.address,)  # listen takes a restart
        assert new.reload_error == "" and not new.config_from_handover
        assert "offset_relay_config_last_reload_successful 1" in new.metrics_text()
        assert sent[-1].startswith("STATUS=") and "not loaded" not in sent[-1]
        assert all(node.is_open for node in (listener, connector, acceptor))
    finally:
        rig.close()


def test_a_start_whose_files_do_not_load_fails_without_a_handed_over_config(store, tmp_path):
    config_file = tmp_path / "relay.toml"
    config_file.write_text('identity_file = "/nonexistent"\nlisten = "nowhere"\n')
    # No hand-over at all.
    with pytest.raises(ConfigError, match="relay.toml: listen"):
        start_config(lambda: load_config(config_file), store.inherit())
    # A hand-over from a relay that carried no configuration (as before this release).
    rig = Rig()
    try:
        rig.tunnel()
        old = rig.server
        old.handover = handover.Handover(handover.ServiceManager(store.path))
        assert old.handover.hand_over(old.relay, old.clock())
        old.selector.close()
        inherited = store.inherit()
        assert len(inherited.state_fds) == 1 and inherited.carried_config() is None
        with pytest.raises(ConfigError, match="relay.toml: listen"):
            start_config(lambda: load_config(config_file), inherited)
        inherited.close_rest()
    finally:
        rig.close()


def test_the_carried_config_travels_in_a_state_a_relay_before_it_still_reads(store):
    """The configuration is one more field of the version 2 document: a relay of this
    version without it (and one of version 1) reads the rest as before."""
    rig = Rig()
    try:
        rig.tunnel()
        state = rig.server.relay.export_state(rig.clock())
        carried = dataclasses.replace(state, config=carried_config(rig.server.config))
        document = handover.unpack_state(handover.pack_state(carried.to_document()))
        assert isinstance(document, dict)
        back, failed = RelayState.from_document(document, 2)
        assert not failed and back == carried
        assert config_from_carried(back.config) == rig.server.config
        del document["config"]
        assert RelayState.from_document(document, 2)[0] == state
        assert "config" not in state.to_document()
    finally:
        rig.close()
