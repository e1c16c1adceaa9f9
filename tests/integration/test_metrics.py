"""/metrics on a live relay: figures move with known traffic; bad HTTP harms nothing."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request

from offset_appliance import __version__
from offset_appliance.wire.frames import encode_frame
from offset_appliance.wire.messages import IncomingConnection
from tests.helpers import metric_samples

from .conftest import tunnel

METRICS = '[metrics]\nenabled = true\nlisten = "127.0.0.1:0"\n'


def metrics_address(relay) -> tuple[str, int]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        match = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", relay.log_text())
        if match:
            return "127.0.0.1", int(match.group(1))
        time.sleep(0.02)
    raise AssertionError("no metrics address in the log:\n" + relay.log_text())


def scrape_text(address) -> str:
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/metrics", timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return r.read().decode()


def parse(text: str) -> dict[str, float]:
    return metric_samples(text)


def wait_for(address, name: str, expected: float) -> dict[str, float]:
    # The relay counts a close when it notices it, a moment after the client's call returns.
    deadline = time.monotonic() + 5
    while True:
        values = parse(scrape_text(address))
        if values.get(name) == expected or time.monotonic() > deadline:
            return values
        time.sleep(0.05)


def test_metrics_off_by_default(relay):
    assert "metrics on" not in relay.log_text()


def test_figures_follow_known_traffic(relay_factory):
    relay = relay_factory(METRICS)
    address = metrics_address(relay)
    before = parse(scrape_text(address))
    assert before[f'offset_relay_build_info{{version="{__version__}"}}'] == 1
    assert before["offset_relay_start_time_seconds"] <= time.time()
    assert before["offset_relay_tunnels"] == 0

    # One tunnel carrying N bytes each way.
    listener, connector, acceptor = tunnel(relay)
    payload = os.urandom(50_000)
    connector.send(payload)
    assert acceptor.receive(10) == payload
    acceptor.send(payload)
    assert connector.receive(10) == payload
    during = parse(scrape_text(address))
    assert during["offset_relay_tunnels"] == 1
    assert during["offset_relay_listeners"] == 1
    assert during['offset_relay_connections{state="tunnel"}'] == 2
    assert during['offset_relay_connections{state="listening"}'] == 1
    notification = len(IncomingConnection(connector.public_key).encode())
    assert (
        during["offset_relay_relayed_bytes_total"] - before["offset_relay_relayed_bytes_total"]
        == 2 * len(payload) + notification
    )
    assert during["offset_relay_relayed_messages_total"] == 3
    assert during["offset_relay_handshakes_completed_total"] == 3

    # One rejected connection.
    rejected = relay.client()
    rejected.connect(listener.public_key)
    assert listener.next_incoming() == rejected.public_key
    listener.reject(rejected.public_key)
    rejected.wait_closed(10)
    after = wait_for(address, 'offset_relay_connections_closed_total{reason="rejected"}', 1)
    assert after['offset_relay_connections_closed_total{reason="rejected"}'] == 1

    # One failed handshake: a wrong protocol version.
    with socket.create_connection(relay.address) as s:
        s.sendall(encode_frame((7).to_bytes(4, "big")))
        s.settimeout(5)
        while s.recv(4096):
            pass
    key = 'offset_relay_handshakes_failed_total{reason="version"}'
    after = wait_for(address, key, 1)
    assert after[key] == 1
    assert after['offset_relay_connections_closed_total{reason="handshake_failed"}'] == 1

    # Closing one end closes the other and is counted once per connection.
    connector.close()
    acceptor.wait_closed(10)
    key = 'offset_relay_connections_closed_total{reason="tunnel_peer_closed"}'
    after = wait_for(address, key, 1)
    assert after[key] == 1
    assert after["offset_relay_tunnels"] == 0


def test_promtool_accepts_the_exposition(relay_factory, tmp_path):
    assert shutil.which("promtool"), "promtool (Debian package prometheus) is needed"
    relay = relay_factory(METRICS)
    address = metrics_address(relay)
    tunnel(relay)
    text = scrape_text(address)
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def raw_http(address, request: bytes) -> bytes:
    with socket.create_connection(address, timeout=5) as s:
        s.sendall(request)
        chunks: list[bytes] = []
        while True:
            data = s.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def test_malformed_http_is_refused_and_harms_nothing(relay_factory):
    relay = relay_factory(METRICS)
    address = metrics_address(relay)
    listener, connector, acceptor = tunnel(relay)
    assert raw_http(address, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw_http(address, b"\x00\xff\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw_http(address, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert raw_http(address, b"GET /other HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    assert raw_http(address, b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 2000).startswith(
        b"HTTP/1.1 400 "
    )
    head = raw_http(address, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    # Half a request, then gone; and many idle connections at once.
    with socket.create_connection(address) as s:
        s.sendall(b"GET /met")
    idle = [socket.create_connection(address) for _ in range(40)]
    connector.send(b"still working")
    assert acceptor.receive(10) == b"still working"
    for s in idle:
        s.close()
    assert "offset_relay_tunnels 1" in scrape_text(address)
    assert relay.proc.poll() is None
