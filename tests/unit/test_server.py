"""The IO shell in this process, over real loopback sockets, under a clock the test moves:
bursts of closes, batches of actions, keepalives, flush timeouts and reload."""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import socket

import pytest

from offset_appliance.config import LIMIT_MAXIMUM, Config
from offset_appliance.errors import ConfigError
from offset_appliance.relay.linger import LINGER_SECONDS, MAX_LINGERING
from offset_appliance.wire import capnp
from offset_appliance.wire.connection import VERSION_FRAME, State
from offset_appliance.wire.frames import FrameDecoder, encode_frame
from offset_appliance.wire.messages import (
    Accept,
    Connect,
    ExchangeRandNonce,
    _put_buffer,
    encode_init_connection,
)

from .server_rig import Node, Rig


def _half_tunnel(rig: Rig, sock: socket.socket, number: int, connect: bytes) -> int:
    """A connection that has finished its handshake and sent ``connect`` (a Connect).

    The handshake is skipped (the server is told it finished, as its read path does), so
    that thousands of half-tunnels cost milliseconds, not thousands of key exchanges.
    """
    server = rig.server
    now = rig.clock()
    address = (f"10.{number >> 16 & 255}.{number >> 8 & 255}.{number & 255}", 40000)
    client = server.relay.add_connection(sock, address, now)
    assert client is not None
    # As the read path does when a handshake finishes.
    assert server.policy.opened(client, now)
    server.core.opened(client.id, number.to_bytes(32, "big"), now, client.source)
    server.core.message(client.id, connect, now)
    return client.id


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if max(soft, hard) < needed:
        pytest.skip(f"needs {needed} file descriptors, the hard limit is {hard}")


# ---- bursts of closes ---------------------------------------------------------------------


def test_ten_thousand_half_tunnels_expire_in_one_timer_pass(rigs):
    listeners, per_listener = 10, 1000
    _raise_fd_limit(listeners * per_listener + 200)
    rig = rigs(
        limits={
            "max_connections": 20000,
            "max_connections_per_ip": 20000,
            "max_half_tunnels_per_listener": per_listener,
        },
        timeouts={"half_tunnel": 5.0, "keepalive": 60.0, "conn_timeout": 60.0},
    )
    nodes = [rig.listener() for _ in range(listeners)]
    # Datagram sockets stand in for the connecting sides: one descriptor each, writable
    # (into a sink nobody reads), never readable, closed by the server like any other.
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    socks = []
    for index, node in enumerate(nodes):
        connect = encode_init_connection(Connect(node.public_key))
        for n in range(per_listener):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect(sink.getsockname())
            socks.append(sock)
            _half_tunnel(rig, sock, index * per_listener + n, connect)
    rig.server.relay.drain(rig.clock())
    rig.settle()
    assert len(rig.server.clients) == listeners + 10_000
    assert rig.server.core.half_tunnel_count == 10_000
    assert all(len(node.inbox) == per_listener for node in nodes)

    rig.clock.advance(5.0)
    rig.server.step(0)  # one pass of the timers: every half-tunnel is due in it

    stats = rig.server.stats
    assert stats.closed["half_tunnel_expired"] == 10_000
    assert rig.server.core.half_tunnel_count == 0
    # Closed with a FIN: a descriptor lingers until its peer closes too, or its time; past
    # MAX_LINGERING at once, the rest are closed at once.
    assert len(rig.server.relay.linger) == MAX_LINGERING
    rig.clock.advance(LINGER_SECONDS)
    rig.server.step(0)
    assert len(rig.server.relay.linger) == 0
    assert all(sock.fileno() == -1 for sock in socks)
    assert len(rig.server.clients) == listeners
    rig.settle()
    assert all(node.is_open for node in nodes)
    sink.close()


def test_closing_a_listener_with_the_most_pending_connects_the_config_allows(rigs):
    most = LIMIT_MAXIMUM["max_half_tunnels_per_listener"]
    _raise_fd_limit(2 * most + 200)
    rig = rigs(limits={"max_connections_per_ip": 20000, "max_half_tunnels_per_listener": most})
    listener = rig.listener()
    connect = encode_init_connection(Connect(listener.public_key))
    far_ends = []
    for n in range(most):
        near, far = socket.socketpair()
        far.setblocking(False)
        far_ends.append(far)
        _half_tunnel(rig, near, n, connect)
    rig.server.relay.drain(rig.clock())
    # One more is refused: the bound holds.
    near, far = socket.socketpair()
    _half_tunnel(rig, near, most, connect)
    rig.server.relay.drain(rig.clock())
    assert rig.server.stats.closed["half_tunnel_limit"] == 1
    rig.settle()
    assert len(listener.inbox) == most

    listener.close()
    rig.settle()

    stats = rig.server.stats
    assert stats.closed["listener_closed"] == most
    assert stats.closed["peer_closed"] == 1
    assert rig.server.clients == {}
    for end in far_ends:
        while end.recv(65536):  # the relay's hello, then the end of the stream
            pass
        end.close()
    far.close()
    assert rig.node().is_open  # still serving


# ---- one batch, each message once ---------------------------------------------------------


def test_a_batch_with_sends_and_a_close_delivers_each_message_exactly_once(rigs):
    rig = rigs()
    _listener, connector, acceptor = rig.tunnel()
    bystander = rig.node()
    a_id = rig.client_of(acceptor).id
    x_id = rig.client_of(connector).id
    b_id = rig.client_of(bystander).id
    core = rig.server.core
    now = rig.clock()
    # What the core queues when two messages go one way and a connection's request is
    # refused, then more goes the other way and the tunnel's other end is lost (its end
    # here closes with a flush), in one batch the relay has not applied yet.
    core.message(x_id, b"one", now)
    core.message(x_id, b"two", now)
    core.message(b_id, encode_init_connection(Accept(bytes(32))), now)
    core.message(a_id, b"three", now)
    core.message(x_id, b"four", now)
    core.closed(x_id)
    assert core.has_actions()
    rig.settle()
    assert acceptor.inbox == [b"one", b"two", b"four"]
    assert acceptor.eof
    assert connector.inbox == [b"three"]
    assert bystander.eof
    stats = rig.server.stats
    assert stats.messages_relayed == 1 + 4  # the tunnel's IncomingConnection, then the batch
    assert stats.closed["relay_refused"] == 1


def test_early_data_reaches_an_accept_after_the_connector_left_exactly_once(rigs):
    rig = rigs()
    listener = rig.listener()
    connector = rig.node()
    connector.send(encode_init_connection(Connect(listener.public_key)))
    for n in range(5):
        connector.send(b"early %d" % n)
    rig.settle()
    connector.close()
    rig.settle()
    acceptor = rig.node(listener.identity)
    acceptor.send(encode_init_connection(Accept(connector.public_key)))
    rig.settle()
    assert acceptor.inbox == [b"early %d" % n for n in range(5)]
    assert acceptor.eof
    stats = rig.server.stats
    assert stats.closed["tunnel_peer_closed"] == 1
    assert stats.closed["peer_closed"] == 1


# ---- each close counted once, for its reason ----------------------------------------------


def test_a_flush_that_times_out_is_counted_once_as_flush_timeout(rigs):
    rig = rigs(timeouts={"keepalive": 30.0})
    listener, connector, acceptor = rig.tunnel()
    acceptor.reading = False
    client = rig.client_of(acceptor)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    acceptor.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for _ in range(40):
        connector.send(b"x" * 16384)
    rig.settle()
    assert client.out_size > 0, "the acceptor's queue should hold what it does not read"
    connector.close()
    rig.settle()
    assert client.closing
    rig.clock.advance(30.0)
    rig.settle()
    stats = rig.server.stats
    assert stats.closed["flush_timeout"] == 1
    assert stats.closed["tunnel_peer_closed"] == 0
    assert stats.closed["peer_closed"] == 1
    assert client.id not in rig.server.clients


def test_a_handshake_without_a_signature_is_malformed_not_a_bad_signature(rigs):
    rig = rigs()
    sock = socket.create_connection(rig.address)
    hello = ExchangeRandNonce(bytes(16), bytes(32), None).encode()
    sock.sendall(VERSION_FRAME + encode_frame(hello))
    decoder, frames = FrameDecoder(), []
    while len(frames) < 2:
        rig.server.step(0)
        sock.settimeout(0.5)
        try:
            frames += decoder.feed(sock.recv(65536))
        except TimeoutError:
            pass
    relay_nonce = ExchangeRandNonce.decode(frames[1]).rand_nonce
    # An ExchangeDh with every field but the signature.
    builder = capnp.MessageBuilder()
    root = builder.set_struct(0, 0, 4)
    _put_buffer(builder, root, bytes(range(32)))
    _put_buffer(builder, root + 1, relay_nonce)
    _put_buffer(builder, root + 2, bytes(32))
    sock.sendall(encode_frame(builder.finish()))
    for _ in range(50):
        rig.server.step(0)
        if not rig.server.clients:
            break
    failed = rig.server.stats.handshakes_failed
    assert failed["malformed"] == 1
    assert failed["bad_signature"] == 0
    sock.close()


# ---- time, moved by the test --------------------------------------------------------------


def test_keepalives_go_out_and_a_silent_peer_times_out(rigs):
    rig = rigs(timeouts={"keepalive": 40.0})
    node = rig.listener()
    before = node.received
    rig.clock.advance(20.0)
    rig.settle()
    assert node.received > before  # a keepalive, at half the interval
    assert node.is_open
    rig.clock.advance(20.0)
    rig.settle()
    assert node.eof
    assert rig.server.stats.closed["keepalive_timeout"] == 1


def test_an_unfinished_handshake_times_out_on_the_clock(rigs):
    rig = rigs(timeouts={"conn_timeout": 8.0})
    sock = socket.create_connection(rig.address)
    rig.server.step(0)
    assert len(rig.server.policy.handshaking) == 1
    rig.clock.advance(7.9)
    rig.server.step(0)
    assert len(rig.server.policy.handshaking) == 1
    rig.clock.advance(0.1)
    rig.server.step(0)
    assert rig.server.clients == {}
    assert rig.server.stats.handshakes_failed["timeout"] == 1
    sock.close()


def test_a_half_tunnel_expires_on_the_clock(rigs):
    rig = rigs(timeouts={"half_tunnel": 32.0, "keepalive": 100.0})
    listener = rig.listener()
    connector = rig.node()
    connector.send(encode_init_connection(Connect(listener.public_key)))
    rig.settle()
    rig.clock.advance(31.9)
    rig.settle()
    assert not connector.eof
    rig.clock.advance(0.1)
    rig.settle()
    assert connector.eof
    assert rig.server.stats.closed["half_tunnel_expired"] == 1


def test_out_of_descriptors_sheds_and_pauses_accepting_until_the_clock_moves(rigs):
    rig = rigs()
    server = rig.server
    server.relay.listeners.start()  # the reserve descriptor, as serve_forever takes it
    waiting = [socket.create_connection(rig.address) for _ in range(10)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # No descriptor left: the limit just above the highest one in use, every hole filled.
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(map(int, os.listdir("/proc/self/fd"))), hard))
    fillers = []
    try:
        while True:
            try:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        server.step(0)
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # Each waiting connection was accepted on the reserve descriptor and closed at once.
    assert server.stats.refused["file_descriptors"] == len(waiting)
    assert server.clients == {}
    for sock in waiting:
        sock.settimeout(5)
        assert sock.recv(1) == b""
        sock.close()
    # The listening socket is left alone for 0.1 s of the relay's clock, not of ours.
    late = socket.create_connection(rig.address)
    for _ in range(5):
        server.step(0)
    assert server.clients == {}
    rig.clock.advance(0.1)
    for _ in range(50):
        server.step(0.01)
        if server.clients:
            break
    assert len(server.clients) == 1
    assert server.relay.listeners.paused_until == 0.0
    late.close()


# ---- reload -------------------------------------------------------------------------------


def test_reload_says_every_time_what_takes_a_restart_and_keeps_the_running_values(rigs, caplog):
    changed: list[Config] = []
    rig = rigs(reload_config=lambda: changed[0])
    running = rig.server.config
    changed.append(
        Config(
            identity_file=running.identity_file.with_name("other.ident"),
            listen=(("127.0.0.1", 1),),
            limits=running.limits.__class__(max_handshakes=7),
            timeouts=running.timeouts,
        )
    )
    for _ in range(2):
        rig.server.request_reload()
        with caplog.at_level(logging.INFO, logger="strelay"):
            rig.server.step(0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all("listen, identity_file" in w and "restart" in w for w in warnings)
    assert rig.server.config.listen == running.listen
    assert rig.server.config.identity_file == running.identity_file
    assert rig.server.config.limits.max_handshakes == 7  # what can change did
    assert rig.server.policy.limits.max_handshakes == 7
    logging.getLogger().setLevel(logging.WARNING)


def test_a_refused_reload_changes_nothing_and_says_so_until_one_succeeds(rigs, caplog):
    """The framework of the checked reload, with the loop turned by hand: a reload whose
    configuration does not load keeps every running value, and is one log line, the first
    part of STATUS= and the metric at 0; the next good one applies all of it at once."""
    outcome: list = [ConfigError("/etc/relay.d/60-x.toml: limits.max_connections: bad\nvalue")]

    def reload_config() -> Config:
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        return outcome[0]

    rig = rigs(reload_config=reload_config)
    server = rig.server
    listener, connector, acceptor = rig.tunnel()
    running = server.config
    started = server.stats.reload_success_time
    sent: list[str] = []
    server.notifier.notify = sent.append
    with caplog.at_level(logging.INFO, logger="strelay"):
        server.request_reload()
        server.step(0)
    errors = [r.getMessage() for r in caplog.records if "reload" in r.getMessage()]
    assert errors == [
        "reload failed, keeping the running configuration: "
        "/etc/relay.d/60-x.toml: limits.max_connections: bad value"
    ]
    assert server.config is running
    assert sent and sent[-1].startswith(
        "STATUS=reload failed: /etc/relay.d/60-x.toml: limits.max_connections: bad value; "
    )
    assert server.status_text().startswith("reload failed: ")
    assert "reload failed" not in server.status_line()  # the log's periodic summary
    assert "offset_relay_config_last_reload_successful 0" in server.metrics_text()
    assert server.stats.reload_success_time == started

    caplog.clear()
    outcome[0] = dataclasses.replace(
        running,
        limits=dataclasses.replace(running.limits, max_connections=100, max_handshakes=100),
        timeouts=dataclasses.replace(running.timeouts, half_tunnel=20.0),
    )
    with caplog.at_level(logging.INFO, logger="strelay"):
        server.request_reload()
        server.step(0)
    lines = [r.getMessage() for r in caplog.records]
    assert [line for line in lines if " -> " in line] == [
        "reload: limits.max_connections 20000 -> 100",
        "reload: limits.max_handshakes 512 -> 100",
        "reload: timeouts.half_tunnel 32.0 -> 20.0",
    ]
    assert "configuration reloaded: 3 settings changed" in lines
    assert server.policy.limits.max_connections == 100
    assert server.core.limits.half_tunnel_timeout == 20.0
    assert not sent[-1].startswith("STATUS=reload failed")
    assert "offset_relay_config_last_reload_successful 1" in server.metrics_text()
    assert server.stats.reload_success_time >= started
    # The tunnel carried on through both.
    connector.send(b"still here")
    rig.settle()
    assert acceptor.inbox[-1] == b"still here"
    logging.getLogger().setLevel(logging.WARNING)


def test_node_end_of_the_rig_is_a_real_client(rigs):
    rig = rigs()
    node = Node(rig)
    rig.settle()
    assert node.wire.state is State.OPEN


# ---- the direct tunnel path ---------------------------------------------------------------


def test_a_tunnels_messages_go_to_its_other_end_without_the_core(rigs, monkeypatch):
    rig = rigs()
    _listener, connector, acceptor = rig.tunnel()
    rig.settle()
    server = rig.server
    through_core: list[int] = []
    real_message = server.core.message

    def counting(conn_id, data, now):
        through_core.append(conn_id)
        real_message(conn_id, data, now)

    monkeypatch.setattr(server.core, "message", counting)
    before = server.stats.messages_relayed, server.stats.bytes_relayed
    sender, receiver = rig.client_of(connector), rig.client_of(acceptor)
    counted = sender.bytes_in, receiver.bytes_out
    burst = [b"m%03d" % index for index in range(50)]
    for message in burst:
        connector.send(message)
    acceptor.send(b"back")
    rig.settle()
    assert acceptor.inbox[-50:] == burst
    assert connector.inbox[-1:] == [b"back"]
    assert through_core == []
    assert server.stats.messages_relayed - before[0] == 51
    assert server.stats.bytes_relayed - before[1] == 50 * 4 + 4
    assert (sender.bytes_in - counted[0], receiver.bytes_out - counted[1]) == (200, 200)


def test_a_tunnel_message_waits_behind_actions_already_queued(rigs):
    rig = rigs()
    _listener, connector, acceptor = rig.tunnel()
    rig.settle()
    # The connector's first message reaches the core and waits there, unapplied.
    rig.server.core.message(rig.client_of(connector).id, b"queued first", rig.clock())
    connector.send(b"read second")
    rig.settle()
    assert acceptor.inbox[-2:] == [b"queued first", b"read second"]
