"""What the relay logs about its clients, in this process under a clock the test moves: one
warning a minute per limit and source, the status summary every few minutes, and debug
lines that tell the operator who opened and closed what."""

from __future__ import annotations

import logging
import socket

import pytest
from nacl.signing import SigningKey

from offset_appliance.files import b64url_encode
from offset_appliance.relay.events import RefusalLog
from offset_appliance.relay.server import STATUS_LOG_INTERVAL
from offset_appliance.wire.messages import Connect, encode_init_connection

from .server_rig import Rig


@pytest.fixture
def rig():
    # Long keepalives: the test's nodes do not send them, and must stay open for minutes.
    made = Rig(limits={"max_connections_per_ip": 2}, timeouts={"keepalive": 3600.0})
    yield made
    made.close()
    logging.getLogger().setLevel(logging.WARNING)


def _lines(caplog, level=logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def test_refusals_are_two_lines_a_minute_per_limit_and_source_with_true_counts(rig, caplog):
    caplog.set_level(logging.INFO, logger="strelay")
    rig.listener()
    rig.listener()
    refused = []
    for _ in range(5):
        refused.append(socket.create_connection(rig.address))
        rig.settle()
    assert rig.server.stats.refused["max_connections_per_ip"] == 5
    assert _lines(caplog) == []  # the spell's first line comes a second after it began
    rig.clock.advance(1.0)
    rig.settle()
    assert _lines(caplog) == [
        "refusing 127.0.0.1: max_connections_per_ip (2); 5 refused in the last 1 s"
    ]
    refused.append(socket.create_connection(rig.address))
    rig.settle()
    rig.clock.advance(59.0)
    rig.settle()
    assert _lines(caplog)[1:] == [
        "refusing 127.0.0.1: max_connections_per_ip (2); 1 refused in the last 59 s"
    ]
    # A quiet minute ends the window without a line; the next refusal starts a new one.
    rig.clock.advance(60.0)
    rig.settle()
    assert len(_lines(caplog)) == 2
    refused.append(socket.create_connection(rig.address))
    rig.settle()
    rig.clock.advance(1.0)
    rig.settle()
    assert _lines(caplog)[2:] == [
        "refusing 127.0.0.1: max_connections_per_ip (2); 1 refused in the last 1 s"
    ]
    for sock in refused:
        sock.close()


def test_a_flood_from_many_sources_keeps_a_bounded_memory(caplog):
    caplog.set_level(logging.WARNING, logger="strelay")
    log = RefusalLog(max_sources=3)
    for number in range(100):
        log.refused("max_connections", 20000, f"10.0.0.{number}", 0.0)
    log.say_new(1.0)
    lines = _lines(caplog)
    assert len(lines) == 4 and lines[-1] == (
        "refusing other sources: max_connections (20000); 97 refused in the last 1 s"
    )
    log.refused("max_connections", 20000, "10.0.0.200", 30.0)
    log.flush(60.0)
    assert _lines(caplog)[-1] == (
        "refusing other sources: max_connections (20000); 1 refused in the last 59 s"
    )


def test_junk_on_the_relay_port_is_said_at_info_with_what_it_looks_like(rig, caplog):
    caplog.set_level(logging.INFO, logger="strelay")
    for _ in range(3):
        with socket.create_connection(rig.address) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
            rig.settle()
    rig.clock.advance(1.0)
    rig.settle()
    assert _lines(caplog) == [
        "dropping 127.0.0.1: failed handshake (not an Offset client: HTTP request); "
        "3 dropped in the last 1 s"
    ]


def test_a_denied_key_is_named_in_its_refusal_line(caplog):
    from offset_appliance.config import Access, KeyList
    from offset_appliance.files import b64url_encode
    from offset_appliance.wire.messages import Listen, encode_init_connection

    from .server_rig import Node

    denied = SigningKey.generate()
    key = b64url_encode(bytes(denied.verify_key))
    made = Rig(access=Access(listen_deny=KeyList((key,), frozenset({bytes(denied.verify_key)}))))
    try:
        caplog.set_level(logging.INFO, logger="strelay")
        node = Node(made, denied)
        made.settle()
        node.send(encode_init_connection(Listen()))
        made.settle()
        made.clock.advance(1.0)
        made.settle()
        assert _lines(caplog) == [
            f"refusing 127.0.0.1 key {key[:8]}: listen_denied; 1 refused in the last 1 s"
        ]
    finally:
        made.close()


def test_status_summary_at_info_every_few_minutes(rig, caplog):
    caplog.set_level(logging.INFO, logger="strelay")
    rig.server.step(0)
    rig.listener()
    status = [line for line in _lines(caplog, logging.INFO) if line.startswith("status: ")]
    assert status == [f"status: {_status_at_start(status)}"]
    rig.clock.advance(STATUS_LOG_INTERVAL - 1)
    rig.settle()
    assert sum(line.startswith("status: ") for line in _lines(caplog, logging.INFO)) == 1
    rig.clock.advance(1.0)
    rig.settle()
    status = [line for line in _lines(caplog, logging.INFO) if line.startswith("status: ")]
    assert len(status) == 2 and status[1].startswith("status: 1 connections")


def _status_at_start(lines: list[str]) -> str:
    assert lines and lines[0].startswith("status: 0 connections")
    return lines[0].removeprefix("status: ")


def test_debug_lines_name_address_key_role_duration_bytes_and_reason(caplog):
    caplog.set_level(logging.DEBUG, logger="strelay")
    rig = Rig()
    try:
        _debug_lines(rig, caplog)
    finally:
        rig.close()
        logging.getLogger().setLevel(logging.WARNING)


def _debug_lines(rig: Rig, caplog) -> None:
    listener, connector, acceptor = rig.tunnel()
    init = len(encode_init_connection(Connect(listener.public_key)))
    connector.send(b"x" * 1000)
    rig.settle()
    rig.clock.advance(2.5)
    connector.close()
    rig.settle()
    debug = _lines(caplog, logging.DEBUG)
    key = b64url_encode(connector.public_key)[:8]
    opened = [line for line in debug if f"open, key {key}" in line]
    assert len(opened) == 1 and opened[0].startswith("127.0.0.1:")
    closed = [line for line in debug if f"close, key {key}" in line]
    assert len(closed) == 1
    # Relayed payload: its Connect, then the tunnel's 1000 bytes.
    assert f", tunnel, after 2.5 s, {init + 1000} B in, 0 B out: peer_closed" in closed[0]
    accepted = [line for line in debug if "close, key" in line and "1000 B out" in line]
    assert len(accepted) == 1 and "tunnel_peer_closed" in accepted[0]
    assert b64url_encode(acceptor.public_key)[:8] in accepted[0]
