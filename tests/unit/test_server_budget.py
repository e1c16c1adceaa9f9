"""The loop's fairness and admission limits, in this process under a clock the test moves:
a frame budget per connection and a time budget per turn (served longest-waiting first),
idle deadlines that read before they close, and the per-source rate of new connections."""

from __future__ import annotations

import socket

from offset_appliance.relay import loop as loop_module
from offset_appliance.relay import relay as relay_module
from offset_appliance.relay.metrics import render
from offset_appliance.wire.messages import Accept, Connect, Listen, encode_init_connection

from .server_rig import Node


def _wait_readable(sock: socket.socket, timeout: float = 5.0) -> None:
    import select

    select.select([sock], [], [], timeout)


def test_one_read_gives_a_connection_at_most_its_frame_budget_per_turn(rigs):
    rig = rigs()
    listener, connector, acceptor = rig.tunnel()
    server = rig.server
    messages = [b"m%03d" % n for n in range(200)]
    for message in messages:
        connector.send(message)
    connector.pump()  # all 200 frames in the relay's socket buffer at once
    client = rig.client_of(connector)
    _wait_readable(client.sock)
    before = server.stats.messages_relayed
    server.step(0)
    assert server.stats.messages_relayed - before == relay_module.FRAME_BUDGET
    assert client.wire.backlog
    rig.settle()
    assert acceptor.inbox[-200:] == messages  # the rest, in order, in later turns
    assert not client.wire.backlog and client.id not in server.relay.backlog


def test_a_turn_serves_the_longest_waiting_connections_first(rigs, monkeypatch):
    rig = rigs()
    nodes = [rig.listener() for _ in range(6)]
    server = rig.server
    # A budget so small that each turn serves one connection.
    monkeypatch.setattr(loop_module, "TURN_BUDGET", 0.0)
    for node in nodes:
        node.send(b"x" * 10)  # not a valid RejectConnection: the listener is closed for it
        node.pump()
    clients = [rig.client_of(node) for node in nodes]
    for client in clients:
        _wait_readable(client.sock)
    # The last ones waited longest (were served in the earliest turns).
    for age, client in enumerate(reversed(clients)):
        client.served_in = age
    served_order = []
    for turn in range(1, 7):
        server.step(0)
        gone = [c.id for c in clients if c.id not in server.clients and c.id not in served_order]
        assert len(gone) == 1, f"turn {turn} served {len(gone)} connections, not one"
        served_order += gone
    assert served_order == [c.id for c in reversed(clients)]


def test_an_idle_deadline_reads_what_is_waiting_before_it_closes(rigs):
    rig = rigs(timeouts={"keepalive": 31.0})
    listener = rig.listener()
    server = rig.server
    client = rig.client_of(listener)
    # The peer spoke in time (a keepalive of the protocol), but the loop was busy and its
    # bytes wait unread in the socket when the deadline comes.
    rig.clock.advance(30.0)
    listener.wire.handle_timer(rig.clock())  # the node owes a keepalive: it sends one
    listener.pump()
    _wait_readable(client.sock)
    rig.clock.advance(1.5)
    server.relay.tick(rig.clock())
    assert client.id in server.clients, "closed for a silence that was the relay's own"
    assert server.stats.closed["keepalive_timeout"] == 0
    # A peer that really is silent is still closed.
    rig.clock.advance(32.0)
    server.relay.tick(rig.clock())
    assert client.id not in server.clients
    assert server.stats.closed["keepalive_timeout"] == 1


def test_new_connections_from_one_source_are_rate_limited(rigs):
    rig = rigs(limits={"new_connections_per_ip_per_second": 2, "new_connections_per_ip_burst": 3})
    server = rig.server
    socks = [socket.create_connection(rig.address) for _ in range(5)]
    try:
        for _ in range(20):
            server.step(0.01)
        assert len(server.clients) == 3
        assert server.stats.refused["connection_rate"] == 2
        assert 'offset_relay_connections_refused_total{limit="connection_rate"} 2' in render(
            server.stats, server.snapshot()
        )
        # Tokens come back with time: one more after half a second.
        rig.clock.advance(0.5)
        socks.append(socket.create_connection(rig.address))
        socks.append(socket.create_connection(rig.address))
        for _ in range(20):
            server.step(0.01)
        assert len(server.clients) == 4
        assert server.stats.refused["connection_rate"] == 3
        # Another source is not affected by this one's rate.
        other = socket.socket()
        other.bind(("127.0.0.2", 0))
        other.connect(rig.address)
        socks.append(other)
        for _ in range(20):
            server.step(0.01)
        assert len(server.clients) == 5
    finally:
        for sock in socks:
            sock.close()


def test_orphaned_half_tunnels_hold_their_sources_connections(rigs):
    rig = rigs(limits={"max_connections_per_ip": 4, "max_handshakes": 4})
    listener = rig.listener()  # one connection of 127.0.0.1
    server = rig.server
    connectors = []
    for _ in range(2):
        node = rig.node()
        node.send(encode_init_connection(Connect(listener.public_key)))
        node.send(b"early data")
        connectors.append(node)
    rig.settle()
    for node in connectors:
        node.close()  # hang up before any accept: two orphaned half-tunnels
    rig.settle()
    assert server.core.orphans_from("127.0.0.1") == 2
    assert len(server.clients) == 1
    # 1 connection + 2 orphans of 4: one more connection, then refused.
    extra = [socket.create_connection(rig.address) for _ in range(2)]
    try:
        for _ in range(20):
            server.step(0.01)
        assert len(server.clients) == 2
        assert server.stats.refused["max_connections_per_ip"] == 1
    finally:
        for sock in extra:
            sock.close()
    rig.settle()
    # An accept takes an orphan's data and gives its source its connection back.
    acceptor = rig.node(listener.identity)
    acceptor.send(encode_init_connection(Accept(connectors[0].public_key)))
    rig.settle()
    assert acceptor.inbox == [b"early data"]
    assert server.core.orphans_from("127.0.0.1") == 1


def test_a_first_message_waiting_unread_is_read_before_its_deadline_closes(rigs):
    rig = rigs(timeouts={"relay_conn_timeout": 4.0, "keepalive": 100.0})
    node = rig.node()
    server = rig.server
    client = rig.client_of(node)
    # The node sent its listen in time, but the loop was busy and has not read it yet.
    rig.clock.advance(3.0)
    node.send(encode_init_connection(Listen()))
    node.pump()
    _wait_readable(client.sock)
    rig.clock.advance(1.5)
    server.relay.tick(rig.clock())
    assert client.id in server.clients, "closed for a first message the relay had not read"
    assert server.core.listener_of(node.public_key) == client.id
    assert server.stats.closed["first_message_timeout"] == 0


def test_a_full_handshake_table_does_not_evict_a_handshake_whose_frames_wait_unread(rigs):
    # Two handshakes fill the table; both peers have sent everything (version, nonce, their
    # ExchangeDh) before the loop turns again, and a third peer connects meanwhile. Its
    # accept must not evict the oldest handshake, which is only waiting for the loop.
    rig = rigs(limits={"max_handshakes": 2})
    server = rig.server
    first, second = Node(rig), Node(rig)
    for _ in range(50):
        server.step(0.01)
        if len(server.policy.handshaking) == 2:
            break
    assert len(server.policy.handshaking) == 2
    for node in (first, second):
        # Each pump sends what is queued and reads the relay's version and nonce, which
        # queues our ExchangeDh: two pumps send all of it without the loop turning.
        for _ in range(50):
            node.pump()
            if node.pending == b"" and not node.wire.pending_output and node.received:
                break
            _wait_readable(node.sock, 0.1)
        assert node.received
    third = socket.create_connection(rig.address)
    try:
        _wait_readable(rig.client_of(first).sock)
        _wait_readable(rig.client_of(second).sock)
        rig.settle()
        assert server.stats.refused["max_handshakes"] == 0
        assert first.is_open and second.is_open
        assert server.stats.handshakes_completed == 2
        assert len(server.clients) == 3  # the third is admitted, its handshake under way
    finally:
        third.close()


class _CountingPoll:
    """The selector's epoll object, recording how many events each poll returned."""

    def __init__(self, epoll) -> None:
        self._epoll = epoll
        self.returned: list[int] = []

    def poll(self, *args):
        events = self._epoll.poll(*args)
        self.returned.append(len(events))
        return events

    def __getattr__(self, name):
        return getattr(self._epoll, name)


def test_a_turn_left_behind_asks_for_few_events_and_serves_the_leftovers_in_order(
    rigs, monkeypatch
):
    # With most connections waiting, a turn that asked the selector for every ready socket
    # spent more on the asking (and sorting) than on serving; a turn that starts behind
    # takes a bounded number of new events and serves what the last turn left, in order.
    rig = rigs()
    nodes = [rig.listener() for _ in range(8)]
    server = rig.server
    monkeypatch.setattr(loop_module, "TURN_BUDGET", 0.0)  # one connection a turn
    monkeypatch.setattr(loop_module, "EVENTS_BEHIND", 2, raising=False)
    for node in nodes:
        node.send(b"x" * 10)  # not a valid RejectConnection: the listener is closed for it
        node.pump()
    clients = [rig.client_of(node) for node in nodes]
    for client in clients:
        _wait_readable(client.sock)
    for age, client in enumerate(reversed(clients)):
        client.served_in = age
    counting = _CountingPoll(server.selector._selector)
    monkeypatch.setattr(server.selector, "_selector", counting)
    served_order = []
    for _ in range(8):
        server.step(0)
        served_order += [
            c.id for c in clients if c.id not in server.clients and c.id not in served_order
        ]
    assert served_order == [c.id for c in reversed(clients)]
    assert counting.returned[0] == 8
    assert max(counting.returned[1:]) <= 2, counting.returned


def test_a_full_handshake_table_accepts_nothing_while_a_capped_poll_may_have_left_some_unseen(
    rigs, monkeypatch
):
    # A turn that starts behind asks epoll for a bounded number of events. One that came
    # back full may have left ready sockets unseen (epoll hands out the longest-ready
    # first), among them a handshake whose frames wait: at the handshake limit an accept
    # would evict it, so that turn accepts nothing, even with its own queue served.
    rig = rigs(limits={"max_handshakes": 1})
    server = rig.server
    first, second = rig.listener(), rig.listener()
    waiting = Node(rig)  # connected; its version and nonce are queued, not yet sent
    for _ in range(50):
        server.step(0.01)
        if len(server.policy.handshaking) == 1:
            break
    assert len(server.policy.handshaking) == 1
    waiting_client = rig.client_of(waiting)
    monkeypatch.setattr(loop_module, "TURN_BUDGET", 0.0)  # one connection a turn
    monkeypatch.setattr(loop_module, "EVENTS_BEHIND", 1)
    for node in (first, second):
        node.send(b"x" * 10)  # not a valid RejectConnection: the listener is closed for it
        node.pump()
    for node in (first, second):
        _wait_readable(rig.client_of(node).sock)
    server.step(0)  # serves one of the two; the other is left for the next turn
    assert server.loop.behind
    waiting.pump()  # its frames arrive after the others'
    third = socket.create_connection(rig.address)
    try:
        _wait_readable(waiting_client.sock)
        _wait_readable(server.relay.listeners.sockets[0])
        polled = server.selector.ready

        def ready_longest_first(timeout: float, max_events: int = 0):
            events = polled(timeout, 0)
            events.sort(key=lambda event: event[0] is waiting_client)  # ready last
            return events[:max_events] if max_events else events

        monkeypatch.setattr(server.selector, "ready", ready_longest_first)
        server.step(0)
        assert server.clients.get(waiting_client.id) is waiting_client, "evicted"
        assert list(server.clients) == [waiting_client.id]  # the third waits in the backlog
    finally:
        third.close()
