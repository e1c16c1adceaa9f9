"""Every rule of docs/protocol.md section 6 against a real strelay process over real sockets."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pytest
from nacl.signing import SigningKey

from offset_appliance.client import ClientError, ConnectionClosed
from offset_appliance.wire.frames import FrameDecoder

from .conftest import tunnel


@pytest.mark.parametrize("size", [1, 100, 64 * 1024, 512 * 1024])
def test_tunnel_carries_messages_both_ways_byte_exact(relay, size):
    _, connector, acceptor = tunnel(relay)
    data = os.urandom(size)
    connector.send(data)
    assert acceptor.receive() == data
    acceptor.send(data[::-1])
    assert connector.receive() == data[::-1]


def test_many_messages_keep_their_order(relay):
    _, connector, acceptor = tunnel(relay)
    sent = [os.urandom(n % 700 + 1) for n in range(500)]
    connector.send_many(sent)
    assert [acceptor.receive() for _ in sent] == sent


def test_relay_proves_the_ticket_key_and_a_wrong_key_is_refused(relay):
    from offset_appliance.client import ClientError, RelayClient

    wrong = bytes(SigningKey.generate().verify_key)
    with pytest.raises(ClientError, match="different public key"):
        RelayClient.open(relay.address, expected_key=wrong, timeout=5)


def test_connect_to_a_key_that_is_not_listening_is_closed(relay):
    node = relay.client()
    node.connect(bytes(SigningKey.generate().verify_key))
    assert node.wait_closed(5) == []


def test_second_pending_connect_from_the_same_key_is_closed(relay):
    listener = relay.client()
    listener.listen()
    x_id = SigningKey.generate()
    first = relay.client(x_id)
    first.connect(listener.public_key)
    assert listener.next_incoming() == first.public_key
    second = relay.client(x_id)
    second.connect(listener.public_key)
    assert second.wait_closed(5) == []
    # The first is still pending and can be accepted.
    acceptor = relay.client(listener.identity)
    acceptor.accept(first.public_key)
    first.send(b"ok")
    assert acceptor.receive() == b"ok"


def test_accept_without_a_pending_connect_is_closed(relay):
    listener = relay.client()
    listener.listen()
    acceptor = relay.client(listener.identity)
    acceptor.accept(bytes(SigningKey.generate().verify_key))
    assert acceptor.wait_closed(5) == []


def test_accept_from_a_key_that_is_not_listening_is_closed(relay):
    acceptor = relay.client()
    acceptor.accept(bytes(SigningKey.generate().verify_key))
    assert acceptor.wait_closed(5) == []


def test_reject_closes_the_connecting_side(relay):
    listener = relay.client()
    listener.listen()
    connector = relay.client()
    connector.connect(listener.public_key)
    assert listener.next_incoming() == connector.public_key
    listener.reject(connector.public_key)
    assert connector.wait_closed(5) == []
    # The listener goes on listening.
    other = relay.client()
    other.connect(listener.public_key)
    assert listener.next_incoming() == other.public_key


def test_data_sent_before_accept_is_delivered_in_order(relay):
    listener = relay.client()
    listener.listen()
    connector = relay.client()
    connector.connect(listener.public_key)
    early = [b"early-%d" % i for i in range(20)] + [os.urandom(200_000)]
    connector.send_many(early)
    assert listener.next_incoming() == connector.public_key
    time.sleep(0.2)  # let the relay buffer it before the accept exists
    acceptor = relay.client(listener.identity)
    acceptor.accept(connector.public_key)
    assert [acceptor.receive() for _ in early] == early


def test_connector_gone_before_accept_still_delivers_then_closes(relay):
    listener = relay.client()
    listener.listen()
    connector = relay.client()
    connector.connect(listener.public_key)
    connector.send(b"last words")
    assert listener.next_incoming() == connector.public_key
    connector.close()
    time.sleep(0.2)
    acceptor = relay.client(listener.identity)
    acceptor.accept(connector.public_key)
    assert acceptor.wait_closed(5) == [b"last words"]


def test_a_second_listen_is_closed_and_the_first_keeps_its_key(relay):
    listener_id = SigningKey.generate()
    first, connector, acceptor = tunnel(relay, listener_id)
    pending = relay.client()
    pending.connect(first.public_key)
    assert first.next_incoming() == pending.public_key
    second = relay.client(listener_id)
    second.listen()
    assert second.wait_closed(5) == []
    connector.send(b"tunnel lives")
    assert acceptor.receive() == b"tunnel lives"
    late = relay.client(listener_id)  # the pending connect survived: the owner accepts it
    late.accept(pending.public_key)
    pending.send(b"still pending")
    assert late.receive() == b"still pending"
    third = relay.client()
    third.connect(listener_id.verify_key.encode())
    assert first.next_incoming() == third.public_key
    first.close()
    for _ in range(50):  # once the first is gone, a new listen takes the key
        time.sleep(0.1)
        fourth = relay.client(listener_id)
        fourth.listen()
        try:
            fourth.receive(0.3)
        except ClientError:
            if not fourth.closed:
                break
    else:
        raise AssertionError("no listen took the key after the first closed")
    fifth = relay.client()
    fifth.connect(listener_id.verify_key.encode())
    assert fourth.next_incoming() == fifth.public_key


def test_closing_one_end_flushes_then_closes_the_other(relay):
    _, connector, acceptor = tunnel(relay)
    burst = [os.urandom(50_000) for _ in range(40)]
    connector.send_many(burst)
    connector.close()
    assert acceptor.wait_closed(10) == burst


def test_listener_close_keeps_established_tunnels(relay):
    listener, connector, acceptor = tunnel(relay)
    # Established: a message went through (the relay serves connections in its own order,
    # so an accept sent just before the listener's close is not yet known to be spliced).
    connector.send(b"spliced")
    assert acceptor.receive() == b"spliced"
    listener.close()
    time.sleep(0.2)
    acceptor.send(b"still here")
    assert connector.receive() == b"still here"


def test_half_tunnel_expires(relay_factory):
    relay = relay_factory("[timeouts]\nhalf_tunnel = 1.0\n")
    listener = relay.client()
    listener.listen()
    connector = relay.client()
    connector.connect(listener.public_key)
    listener.next_incoming()
    started = time.monotonic()
    assert connector.wait_closed(10) == []
    assert time.monotonic() - started >= 0.9
    acceptor = relay.client(listener.identity)
    acceptor.accept(connector.public_key)
    assert acceptor.wait_closed(5) == []


def test_first_relay_message_must_come_in_time(relay_factory):
    relay = relay_factory("[timeouts]\nrelay_conn_timeout = 3.0\nkeepalive = 2.0\n")
    # Both sides send keepalives every second; they must not extend the deadline.
    idle = relay.client(keepalive=2.0)
    started = time.monotonic()
    with pytest.raises(ConnectionClosed):
        idle.receive(10)
    assert 2.9 <= time.monotonic() - started < 6


def test_relay_sends_keepalive_after_16_seconds_of_silence(relay):
    node = relay.client(keepalive=1000.0)
    node.listen()
    sock = node.sock
    node.wire.data_to_send()
    started = time.monotonic()
    sock.settimeout(20)
    data = sock.recv(4096)  # the first thing the relay sends on a quiet listen connection
    waited = time.monotonic() - started
    assert data and node.wire.receive_data(data, time.monotonic()) == []  # a keepalive
    # Half the 32 s timeout, less a random part of up to a quarter for the first one
    # (connections opened together do not keep sending together): 12 to 16 s.
    assert 11.5 <= waited <= 17.5, waited


def _raw(relay):
    sock = socket.create_connection(relay.address, timeout=10)
    return sock


def _closed_by_relay(sock: socket.socket, timeout: float = 10) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def _raw_handshake_frames(sock):
    decoder, frames = FrameDecoder(), []
    while len(frames) < 2:
        frames += decoder.feed(sock.recv(4096))
    return frames


def _hostile_inputs(relay):
    """(name, function that attacks over a fresh socket and returns the socket)."""
    from nacl.bindings import crypto_scalarmult_base

    from offset_appliance.wire import messages
    from offset_appliance.wire.frames import encode_frame

    def garbage():
        s = _raw(relay)
        s.sendall(os.urandom(5000))
        return s

    def wrong_version():
        s = _raw(relay)
        s.sendall(encode_frame(b"\x00\x00\x00\x07"))
        return s

    def oversize_length():
        s = _raw(relay)
        s.sendall(encode_frame(bytes(4)) + (1 << 40).to_bytes(8, "big"))
        return s

    def dh(nonce_ok: bool, sig_ok: bool):
        s = _raw(relay)
        frames = _raw_handshake_frames(s)
        their_nonce = messages.ExchangeRandNonce.decode(frames[1]).rand_nonce
        me = SigningKey.generate()
        hello = messages.ExchangeRandNonce(os.urandom(16), bytes(me.verify_key), None).encode()
        s.sendall(encode_frame(bytes(4)) + encode_frame(hello))
        dh_pub = crypto_scalarmult_base(os.urandom(32))
        salt = os.urandom(32)
        nonce = their_nonce if nonce_ok else os.urandom(16)
        signer = me if sig_ok else SigningKey.generate()
        sig = signer.sign(dh_pub + nonce + salt).signature
        s.sendall(encode_frame(messages.ExchangeDh(dh_pub, nonce, salt, sig).encode()))
        return s

    def replayed_frame():
        node = relay.client()
        node.listen()
        node.send(messages.RejectConnection(bytes(32)).encode())
        # Resend the last frame as is: its nonce is now stale.
        node.wire.send_message(b"x", time.monotonic())
        chunks = node.wire.data_to_send()
        node.sock.sendall(b"".join(chunks) + b"".join(chunks))
        return node.sock

    def undecodable_first_message():
        node = relay.client()
        node.send(b"\x00\x00\x00\x00\x01\x00\x00\x00\xff\xff\xff\xff")
        return node.sock

    return [
        ("garbage", garbage),
        ("wrong version", wrong_version),
        ("oversize length prefix", oversize_length),
        ("wrong nonce echo", lambda: dh(False, True)),
        ("bad signature", lambda: dh(True, False)),
        ("replayed frame", replayed_frame),
        ("undecodable first message", undecodable_first_message),
    ]


def test_bad_input_closes_only_that_connection(relay):
    _, connector, acceptor = tunnel(relay)
    for name, attack in _hostile_inputs(relay):
        sock = attack()
        assert _closed_by_relay(sock), name
        sock.close()
        payload = os.urandom(1000)
        connector.send(payload)
        assert acceptor.receive() == payload, name
    assert relay.proc.poll() is None


def test_slow_reader_does_not_grow_the_relay(relay):
    """A writer pushes 200 MiB at a reader that stops reading; relay memory stays bounded."""
    _, connector, acceptor = tunnel(relay)
    rss_before = relay.rss_kib()
    chunk = os.urandom(64 * 1024)
    total = 200 * 1024 * 1024
    sent_hash = hashlib.sha256()
    progress = {"sent": 0}

    def writer():
        batch = [chunk] * 16
        while progress["sent"] < total:
            try:
                connector.send_many(batch)
            except Exception:  # noqa: BLE001 - the test reports what arrived
                return
            for item in batch:
                sent_hash.update(item)
            progress["sent"] += len(batch) * len(chunk)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    time.sleep(3)  # the reader reads nothing meanwhile
    stalled_at = progress["sent"]
    rss_stalled = relay.rss_kib()
    assert stalled_at < total, "the writer was never held back"
    # Bound: buffers are capped at about 1 MiB per direction plus socket buffers.
    assert rss_stalled - rss_before < 24 * 1024, (rss_before, rss_stalled)
    got_hash = hashlib.sha256()
    received = 0
    while received < total:
        data = acceptor.receive(30)
        got_hash.update(data)
        received += len(data)
    thread.join(30)
    assert received == total and got_hash.digest() == sent_hash.digest()
    assert relay.rss_kib() - rss_before < 32 * 1024


def test_client_rekeys_mid_stream(relay):
    _, connector, acceptor = tunnel(relay)
    for round_ in range(3):
        before = [os.urandom(1000 + round_) for _ in range(20)]
        connector.send_many(before)
        assert connector.wire.start_rekey(time.monotonic())
        acceptor.wire.start_rekey(time.monotonic())  # and the other hop, at the same time
        after = [os.urandom(2000) for _ in range(20)]
        connector.send_many(after)
        acceptor.send_many(after[::-1])
        assert [acceptor.receive() for _ in range(40)] == before + after
        assert [connector.receive() for _ in range(20)] == after[::-1]
    # One more exchange each way, so that both have read the relay's last answers.
    connector.send(b"x")
    assert acceptor.receive() == b"x"
    acceptor.send(b"y")
    assert connector.receive() == b"y"
    # The acceptor's rekey can still be pending when its next round starts (the relay's
    # answer queued behind tunnel data), so that round starts none; the connector's never is.
    assert connector.wire.rekeys >= 3 and acceptor.wire.rekeys >= 2


def test_relay_rekeys_on_its_own_interval(relay_factory):
    relay = relay_factory("[timeouts]\nrekey_interval = 0.5\n")
    _, connector, acceptor = tunnel(relay)
    deadline = time.monotonic() + 4
    sent = 0
    while time.monotonic() < deadline:
        payload = sent.to_bytes(4, "big") * 100
        connector.send(payload)
        assert acceptor.receive() == payload
        acceptor.send(payload[::-1])
        assert connector.receive() == payload[::-1]
        sent += 1
        time.sleep(0.05)
    # The relay started the rekeys; the clients only answered them.
    assert connector.wire.rekeys >= 3 and acceptor.wire.rekeys >= 3
