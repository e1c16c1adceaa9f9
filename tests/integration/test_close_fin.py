"""A tunnel end the relay closes because its other end went is closed with a FIN after the
messages already relayed to it, even when the relay had stopped reading it (input left
unread makes a socket close with a reset, and a reset drops what the kernel had not sent)."""

from __future__ import annotations

import socket
import time

from nacl.signing import SigningKey

from offset_appliance.client import RelayClient


def test_a_paused_tunnel_end_is_closed_with_a_fin_after_what_was_relayed_to_it(relay_factory):
    relay = relay_factory("[limits]\nbuffer_high_water = 65536\nbuffer_low_water = 16384\n")
    owner = SigningKey.generate()
    listener = relay.client(owner)
    listener.listen()
    connector = relay.client()
    connector.connect(listener.public_key)
    assert listener.next_incoming() == connector.public_key
    sock = socket.create_connection(relay.address, timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    acceptor = RelayClient(sock, owner, expected_key=relay.public_key)
    acceptor._handshake(time.monotonic() + 10)
    acceptor.accept(connector.public_key)
    # The acceptor's last words reach the connector's side of the relay first.
    relayed = [bytes([n]) * 1000 for n in range(5)]
    acceptor.send_many(relayed)
    # The connector floods a receiver that never reads: the relay stops reading it, and
    # its input waits unread at the relay.
    connector.sock.setblocking(False)
    pending = b""
    for _ in range(400):
        connector.wire.send_message(b"\xa5" * 30_000, time.monotonic())
        pending += b"".join(connector.wire.data_to_send())
        try:
            pending = pending[connector.sock.send(pending) :]
        except BlockingIOError:
            break
    time.sleep(0.5)
    acceptor.close()  # its unread input makes this a reset: the relay closes the connector
    connector.sock.setblocking(True)
    connector.sock.settimeout(10)
    got = []
    try:
        while True:
            data = connector.sock.recv(1 << 16)
            if not data:
                break
            got.extend(connector.wire.receive_data(data, time.monotonic()))
        ended = "fin"
    except ConnectionResetError:
        ended = "reset"
    assert got[:5] == relayed and ended == "fin", (len(got), ended)
    deadline = time.monotonic() + 10  # the relay's log is read by a thread: a moment
    while not any("tunnel_peer_closed" in line for line in relay.lines):
        assert time.monotonic() < deadline, relay.log_text()[-2000:]
        time.sleep(0.05)
