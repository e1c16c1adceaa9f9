"""The relay's rules (docs/protocol.md section 6), driven without sockets or clocks."""

from offset_appliance.errors import CloseReason
from offset_appliance.relay.core import Close, CoreLimits, Pause, RelayCore, Resume, Role, Send
from offset_appliance.wire.messages import (
    Accept,
    Connect,
    IncomingConnection,
    Listen,
    RejectConnection,
    encode_init_connection,
)

L, X, Y = b"L" * 32, b"X" * 32, b"Y" * 32
LISTEN = encode_init_connection(Listen())


def connect(key):
    return encode_init_connection(Connect(key))


def accept(key):
    return encode_init_connection(Accept(key))


def take(core):
    actions = []
    while (action := core.next_action()) is not None:
        actions.append(action)
    return actions


def closed_ids(actions):
    return [a.conn_id for a in actions if isinstance(a, Close)]


def setup_listener(core, conn_id=1, key=L):
    core.opened(conn_id, key, 0.0)
    core.message(conn_id, LISTEN, 0.0)
    assert take(core) == []  # listen has no reply
    assert core.role(conn_id) is Role.LISTENER


def test_connect_notifies_the_listener():
    core = RelayCore()
    setup_listener(core)
    core.opened(2, X, 0.0)
    core.message(2, connect(L), 0.0)
    assert take(core) == [Send(1, IncomingConnection(X).encode())]
    assert core.role(2) is Role.HALF_TUNNEL


def test_connect_to_a_key_not_listening_is_closed():
    core = RelayCore()
    core.opened(2, X, 0.0)
    core.message(2, connect(L), 0.0)
    assert closed_ids(take(core)) == [2]


def test_duplicate_pending_connect_is_closed_but_the_first_stays():
    core = RelayCore()
    setup_listener(core)
    core.opened(2, X, 0.0)
    core.message(2, connect(L), 0.0)
    core.opened(3, X, 0.0)
    core.message(3, connect(L), 0.0)
    assert closed_ids(take(core)) == [3]
    assert core.role(2) is Role.HALF_TUNNEL


def test_accept_splices_and_delivers_early_data_in_order():
    core = RelayCore()
    setup_listener(core)
    core.opened(2, X, 0.0)
    core.message(2, connect(L), 0.0)
    core.message(2, b"early-1", 0.0)
    core.message(2, b"early-2", 0.0)
    take(core)
    core.opened(3, L, 0.0)
    core.message(3, accept(X), 0.0)
    assert take(core) == [Send(3, b"early-1"), Send(3, b"early-2")]
    core.message(2, b"x->l", 0.0)
    core.message(3, b"l->x", 0.0)
    assert take(core) == [Send(3, b"x->l"), Send(2, b"l->x")]
    assert core.tunnels == 1


def test_accept_without_pending_connect_is_closed():
    core = RelayCore()
    setup_listener(core)
    core.opened(3, L, 0.0)
    core.message(3, accept(X), 0.0)
    assert closed_ids(take(core)) == [3]


def test_accept_needs_the_key_to_be_listening():
    core = RelayCore()
    setup_listener(core)
    core.opened(2, X, 0.0)
    core.message(2, connect(L), 0.0)
    core.closed(1)  # the listener leaves: its half-tunnels go with it
    assert closed_ids(take(core)) == [2]
    core.opened(3, L, 0.0)
    core.message(3, accept(X), 0.0)
    assert closed_ids(take(core)) == [3]


def test_reject_closes_the_half_tunnel_and_unknown_keys_are_ignored():
    core = RelayCore()
    setup_listener(core)
    core.opened(2, X, 0.0)
    core.message(2, connect(L), 0.0)
    take(core)
    core.message(1, RejectConnection(Y).encode(), 0.0)
    assert take(core) == []
    core.message(1, RejectConnection(X).encode(), 0.0)
    assert closed_ids(take(core)) == [2]
    assert core.role(1) is Role.LISTENER


def test_undecodable_reject_closes_the_listener():
    core = RelayCore()
    setup_listener(core)
    core.message(1, b"\x00garbage", 0.0)
    assert closed_ids(take(core)) == [1]
    assert core.listener_of(L) is None


def test_undecodable_first_message_closes():
    core = RelayCore()
    core.opened(1, X, 0.0)
    core.message(1, b"\x01\x02\x03", 0.0)
    assert closed_ids(take(core)) == [1]


def test_first_message_deadline():
    core = RelayCore(CoreLimits(relay_conn_timeout=4.0))
    core.opened(1, X, 0.0)
    assert core.next_deadline() == 4.0
    core.handle_timer(3.9)
    assert take(core) == []
    core.handle_timer(4.0)
    assert closed_ids(take(core)) == [1]


def test_half_tunnel_expires():
    core = RelayCore(CoreLimits(half_tunnel_timeout=32.0))
    setup_listener(core)
    core.opened(2, X, 10.0)
    core.message(2, connect(L), 10.0)
    take(core)
    core.handle_timer(41.9)
    assert take(core) == []
    core.handle_timer(42.0)
    assert closed_ids(take(core)) == [2]
    core.opened(3, L, 43.0)
    core.message(3, accept(X), 43.0)
    assert closed_ids(take(core)) == [3]


def test_a_second_listen_from_a_listening_key_is_closed_and_the_first_kept():
    core = RelayCore()
    setup_listener(core, 1)
    core.opened(2, X, 0.0)
    core.message(2, connect(L), 0.0)
    core.opened(3, L, 0.0)
    core.message(3, accept(X), 0.0)  # an established tunnel 2<->3
    core.opened(4, Y, 0.0)
    core.message(4, connect(L), 0.0)  # a pending half-tunnel Y->L
    take(core)
    core.opened(5, L, 0.0)
    core.message(5, LISTEN, 0.0)
    assert take(core) == [Close(5, CloseReason.DUPLICATE_LISTEN, False)]
    assert core.listener_of(L) == 1 and core.half_tunnel_count == 1
    core.message(2, b"still", 0.0)
    assert take(core) == [Send(3, b"still")]
    core.message(1, RejectConnection(Y).encode(), 0.0)  # the first listen still works
    assert closed_ids(take(core)) == [4]


def test_two_listens_of_one_key_never_replace_each_other():
    # A node that lists the relay under two addresses keeps one listen per address and
    # reconnects the one that was closed, again and again: the first must stay put.
    core = RelayCore()
    setup_listener(core, 1)
    for conn_id in range(2, 12):
        core.opened(conn_id, L, float(conn_id))
        core.message(conn_id, LISTEN, float(conn_id))
        assert closed_ids(take(core)) == [conn_id]
        assert core.listener_of(L) == 1
    core.closed(1)  # once the first goes, the next listen takes the key
    core.opened(20, L, 30.0)
    core.message(20, LISTEN, 30.0)
    assert take(core) == [] and core.listener_of(L) == 20


def test_tunnel_close_flushes_then_closes_the_other_side():
    core = RelayCore()
    setup_listener(core)
    core.opened(2, X, 0.0)
    core.message(2, connect(L), 0.0)
    core.opened(3, L, 0.0)
    core.message(3, accept(X), 0.0)
    take(core)
    core.closed(2)
    assert take(core) == [Close(3, CloseReason.TUNNEL_PEER_CLOSED, True)]
    assert core.tunnels == 0
    core.closed(3)  # already forgotten: nothing more happens
    assert take(core) == []


def test_listener_close_keeps_established_tunnels():
    core = RelayCore()
    setup_listener(core)
    core.opened(2, X, 0.0)
    core.message(2, connect(L), 0.0)
    core.opened(3, L, 0.0)
    core.message(3, accept(X), 0.0)
    take(core)
    core.closed(1)
    assert take(core) == []
    core.message(3, b"go on", 0.0)
    assert take(core) == [Send(2, b"go on")]


def test_connecting_side_gone_before_accept_delivers_data_then_closes():
    core = RelayCore()
    setup_listener(core)
    core.opened(2, X, 0.0)
    core.message(2, connect(L), 0.0)
    core.message(2, b"last words", 0.0)
    core.closed(2)
    take(core)
    assert core.half_tunnel_count == 1
    core.opened(3, L, 1.0)
    core.message(3, accept(X), 1.0)
    assert take(core) == [
        Send(3, b"last words"),
        Close(3, CloseReason.TUNNEL_PEER_CLOSED, True),
    ]


def test_several_tunnels_between_the_same_pair_are_allowed():
    core = RelayCore()
    setup_listener(core)
    for n in range(3):
        x_id, l_id = 10 + 2 * n, 11 + 2 * n
        core.opened(x_id, X, 0.0)
        core.message(x_id, connect(L), 0.0)
        core.opened(l_id, L, 0.0)
        core.message(l_id, accept(X), 0.0)
    take(core)
    assert core.tunnels == 3


def test_half_tunnel_buffer_pauses_and_accept_resumes():
    core = RelayCore(CoreLimits(half_tunnel_buffer=100))
    setup_listener(core)
    core.opened(2, X, 0.0)
    core.message(2, connect(L), 0.0)
    take(core)
    core.message(2, b"a" * 60, 0.0)
    assert take(core) == []
    core.message(2, b"b" * 60, 0.0)
    assert take(core) == [Pause(2)]
    core.opened(3, L, 0.0)
    core.message(3, accept(X), 0.0)
    assert take(core) == [Send(3, b"a" * 60), Send(3, b"b" * 60), Resume(2)]


def test_half_tunnels_per_listener_are_capped():
    core = RelayCore(CoreLimits(max_half_tunnels_per_listener=2))
    setup_listener(core)
    for n in range(3):
        core.opened(10 + n, bytes([n]) * 32, 0.0)
        core.message(10 + n, connect(L), 0.0)
    assert closed_ids(take(core)) == [12]


def test_notification_that_cannot_be_queued_closes_the_connect():
    core = RelayCore()
    core.set_congested(1, True)
    setup_listener(core)
    core.opened(2, X, 0.0)
    core.message(2, connect(L), 0.0)
    assert closed_ids(take(core)) == [2]
    assert core.half_tunnel_count == 0


def _key(number: int) -> bytes:
    return number.to_bytes(32, "big")


def test_one_address_cannot_take_all_of_a_listeners_pending_connects():
    core = RelayCore(
        CoreLimits(max_half_tunnels_per_listener=8, max_half_tunnels_per_listener_per_ip=3)
    )
    setup_listener(core)
    for n in range(3):
        core.opened(10 + n, _key(n), 0.0, source="192.0.2.1")
        core.message(10 + n, connect(L), 0.0)
    assert not closed_ids(take(core))
    core.opened(20, _key(99), 0.0, source="192.0.2.1")
    core.message(20, connect(L), 0.0)
    actions = take(core)
    assert Close(20, CloseReason.HALF_TUNNEL_LIMIT) in actions
    # Another address still gets through; and a slot comes back when a connect goes.
    core.opened(21, _key(98), 0.0, source="198.51.100.1")
    core.message(21, connect(L), 0.0)
    assert not closed_ids(take(core))
    core.message(1, RejectConnection(_key(0)).encode(), 0.0)
    take(core)
    core.opened(22, _key(97), 0.0, source="192.0.2.1")
    core.message(22, connect(L), 0.0)
    assert not closed_ids(take(core))


def test_orphaned_bytes_are_bounded_and_counted_against_their_source():
    core = RelayCore(
        CoreLimits(
            half_tunnel_buffer=10_000, max_orphaned_bytes=25_000, max_half_tunnels_per_listener=64
        )
    )
    setup_listener(core)
    for n in range(4):
        conn_id = 10 + n
        core.opened(conn_id, _key(n), 0.0, source=f"192.0.2.{n % 2}")
        core.message(conn_id, connect(L), 0.0)
        core.message(conn_id, b"d" * 9_000, 0.0)
        take(core)
        # The connecting side hangs up: its half-tunnel stays, for an accept to deliver.
        core.closed(conn_id)
    # 4 x 9,000 bytes orphaned, 25,000 allowed: the oldest went, the newest three stay.
    assert core.orphaned_bytes == 18_000
    assert core.half_tunnel_count == 2
    assert core.orphans_from("192.0.2.0") == 1 and core.orphans_from("192.0.2.1") == 1
    # Accepting one delivers its data and releases its bytes and its source's count.
    core.opened(30, L, 0.0)
    core.message(30, accept(_key(3)), 0.0)
    actions = take(core)
    assert Send(30, b"d" * 9_000) in actions
    assert core.orphaned_bytes == 9_000
    assert core.orphans_from("192.0.2.1") == 0
    # Expiry releases the rest.
    core.handle_timer(1000.0)
    assert core.orphaned_bytes == 0 and core.half_tunnel_count == 0
    assert core.orphans_from("192.0.2.0") == 0
