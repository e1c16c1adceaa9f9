"""The protocol stack through memory: handshake, data, rekeys, keepalive and failures."""

import pytest
from nacl.bindings import crypto_scalarmult_base
from nacl.signing import SigningKey

from offset_appliance.errors import ProtocolError
from offset_appliance.wire import messages
from offset_appliance.wire.channel import hkdf_sha512_256
from offset_appliance.wire.connection import VERSION_FRAME, Connection, State
from offset_appliance.wire.frames import FrameDecoder, encode_frame, frame_header

from ..helpers import deliver, exchange, pair


def test_sha512_256_check_vector_from_the_protocol():
    import hashlib

    digest = hashlib.new("sha512_256", b"This is a test!").hexdigest()
    assert digest == "349c7ea7498d0432dcb0604a9ed37a8b65a90bfa166c91475f072a29e42da1fb"
    # RFC 5869 structure: one HMAC to extract, one to expand T(1).
    assert len(hkdf_sha512_256(b"salt", b"ikm")) == 32
    assert hkdf_sha512_256(b"salt", b"ikm") != hkdf_sha512_256(b"tlas", b"ikm")


def test_handshake_opens_both_sides_with_each_others_keys():
    a, b = pair()
    assert a.state is State.OPEN and b.state is State.OPEN
    assert a.peer_public_key is not None and b.peer_public_key is not None
    assert a.peer_public_key != b.peer_public_key


def test_first_bytes_are_the_version_frame():
    conn = Connection(SigningKey.generate(), 0.0)
    out = b"".join(conn.data_to_send())
    assert out.startswith(VERSION_FRAME)
    assert VERSION_FRAME == bytes(8 - 1) + b"\x04" + bytes(4)


def test_messages_flow_both_ways_in_order():
    a, b = pair()
    for i in range(50):
        a.send_message(b"a%d" % i, 1.0)
    assert deliver(a, b, 1.0) == [b"a%d" % i for i in range(50)]
    b.send_message(b"x" * 300_000, 1.0)
    assert deliver(b, a, 1.0) == [b"x" * 300_000]


def test_expected_peer_key_is_enforced():
    relay = Connection(SigningKey.generate(), 0.0)
    wrong = SigningKey.generate().verify_key
    node = Connection(SigningKey.generate(), 0.0, expected_peer=bytes(wrong))
    with pytest.raises(ProtocolError, match="different public key"):
        for _ in range(3):
            exchange(relay, node, 0.0)
    assert node.state is State.CLOSED


def test_expected_peer_key_accepts_the_right_relay():
    relay_id = SigningKey.generate()
    relay = Connection(relay_id, 0.0)
    node = Connection(SigningKey.generate(), 0.0, expected_peer=bytes(relay_id.verify_key))
    for _ in range(3):
        exchange(relay, node, 0.0)
    assert node.state is State.OPEN and relay.state is State.OPEN


@pytest.mark.parametrize("version", [b"\x00\x00\x00\x01", b"\x00\x00\x00", b"\x00" * 5])
def test_wrong_version_frame_closes(version):
    conn = Connection(SigningKey.generate(), 0.0)
    with pytest.raises(ProtocolError):
        conn.receive_data(encode_frame(version), 0.0)
    assert conn.state is State.CLOSED


def _handshake_frames(conn: Connection) -> list[bytes]:
    return FrameDecoder().feed(b"".join(conn.data_to_send()))


def test_wrong_nonce_echo_is_refused():
    victim = Connection(SigningKey.generate(), 0.0)
    attacker_id = SigningKey.generate()
    frames = _handshake_frames(victim)  # version, our ExchangeRandNonce
    hello = messages.ExchangeRandNonce(bytes(16), bytes(attacker_id.verify_key), None).encode()
    victim.receive_data(encode_frame(bytes(4)) + encode_frame(hello), 0.0)
    assert len(frames) == 2
    dh_private = bytes(range(32))
    dh_public = crypto_scalarmult_base(dh_private)
    wrong_nonce, salt = b"\x01" * 16, b"\x02" * 32
    sig = attacker_id.sign(dh_public + wrong_nonce + salt).signature
    dh = messages.ExchangeDh(dh_public, wrong_nonce, salt, sig).encode()
    with pytest.raises(ProtocolError, match="nonce"):
        victim.receive_data(encode_frame(dh), 0.0)


def test_bad_signature_is_refused():
    victim = Connection(SigningKey.generate(), 0.0)
    attacker_id = SigningKey.generate()
    frames = _handshake_frames(victim)
    their_nonce = messages.ExchangeRandNonce.decode(frames[1]).rand_nonce
    hello = messages.ExchangeRandNonce(bytes(16), bytes(attacker_id.verify_key), None).encode()
    victim.receive_data(encode_frame(bytes(4)) + encode_frame(hello), 0.0)
    dh_public = crypto_scalarmult_base(bytes(range(32)))
    salt = b"\x02" * 32
    sig = SigningKey.generate().sign(dh_public + their_nonce + salt).signature  # wrong signer
    dh = messages.ExchangeDh(dh_public, their_nonce, salt, sig).encode()
    with pytest.raises(ProtocolError, match="signature"):
        victim.receive_data(encode_frame(dh), 0.0)


def test_low_order_dh_point_is_refused():
    victim = Connection(SigningKey.generate(), 0.0)
    attacker_id = SigningKey.generate()
    frames = _handshake_frames(victim)
    their_nonce = messages.ExchangeRandNonce.decode(frames[1]).rand_nonce
    hello = messages.ExchangeRandNonce(bytes(16), bytes(attacker_id.verify_key), None).encode()
    victim.receive_data(encode_frame(bytes(4)) + encode_frame(hello), 0.0)
    low_order = bytes(32)  # the identity point: every shared secret would be zero
    salt = b"\x02" * 32
    sig = attacker_id.sign(low_order + their_nonce + salt).signature
    dh = messages.ExchangeDh(low_order, their_nonce, salt, sig).encode()
    with pytest.raises(ProtocolError, match="Diffie-Hellman"):
        victim.receive_data(encode_frame(dh), 0.0)


def test_tampered_frame_is_refused():
    a, b = pair()
    a.send_message(b"hello", 1.0)
    data = bytearray(b"".join(a.data_to_send()))
    data[-1] ^= 1
    with pytest.raises(ProtocolError, match="decrypt"):
        b.receive_data(bytes(data), 1.0)


def test_replayed_frame_is_refused():
    a, b = pair()
    a.send_message(b"hello", 1.0)
    data = b"".join(a.data_to_send())
    assert b.receive_data(data, 1.0) == [b"hello"]
    with pytest.raises(ProtocolError):
        b.receive_data(data, 1.0)


def _chat(a, b, now, tag):
    a.send_message(tag + b"-a", now)
    b.send_message(tag + b"-b", now)
    to_a, to_b = exchange(a, b, now)
    return to_a, to_b


def test_sequential_rekeys_both_ways_mid_stream():
    a, b = pair()
    for round_ in range(3):
        initiator, responder = (a, b) if round_ % 2 == 0 else (b, a)
        assert initiator.start_rekey(1.0)
        # Data sent after the rekey but before the answer still arrives (old receiver).
        initiator.send_message(b"after-rekey", 1.0)
        responder.send_message(b"before-answer", 1.0)
        assert deliver(initiator, responder, 1.0) == [b"after-rekey"]
        responder.send_message(b"after-answer", 1.0)
        assert deliver(responder, initiator, 1.0) == [b"before-answer", b"after-answer"]
        to_a, to_b = _chat(a, b, 1.0, b"r%d" % round_)
        assert to_a == [b"r%d-b" % round_] and to_b == [b"r%d-a" % round_]
    assert a.rekeys + b.rekeys >= 3


def test_simultaneous_rekeys():
    a, b = pair()
    assert a.start_rekey(1.0) and b.start_rekey(1.0)
    a.send_message(b"from-a", 1.0)
    b.send_message(b"from-b", 1.0)
    to_a, to_b = exchange(a, b, 1.0)
    assert to_a == [b"from-b"] and to_b == [b"from-a"]
    for i in range(3):
        to_a, to_b = _chat(a, b, 1.0, b"%d" % i)
        assert to_a == [b"%d-b" % i] and to_b == [b"%d-a" % i]


def test_second_rekey_while_pending_is_not_started():
    a, b = pair()
    assert a.start_rekey(1.0)
    assert not a.start_rekey(1.0)


def test_rekey_starts_on_its_own_after_the_interval():
    a, b = pair(rekey_interval=100.0, keepalive=1000.0)
    assert a.next_deadline() == 100.0
    a.handle_timer(100.0)
    b.handle_timer(100.0)  # both due at once: a simultaneous rekey
    to_a, to_b = _chat(a, b, 100.0, b"x")
    assert to_a == [b"x-b"] and to_b == [b"x-a"]
    to_a, to_b = _chat(a, b, 100.0, b"y")
    assert to_a == [b"y-b"] and to_b == [b"y-a"]


def test_keepalive_sent_at_half_interval_and_consumed_silently():
    a, b = pair(keepalive=32.0)
    assert a.next_deadline() == 16.0
    a.handle_timer(15.9)
    assert a.data_to_send() == []
    a.handle_timer(16.0)
    assert deliver(a, b, 16.0) == []  # a keepalive, not a message
    assert b._keepalive.last_recv == 16.0


def test_idle_connection_times_out_but_not_while_paused():
    a, b = pair(keepalive=32.0)
    a.pause_reading()
    a.handle_timer(40.0)  # no receive deadline while paused
    a.resume_reading(40.0)
    a.handle_timer(71.9)
    with pytest.raises(ProtocolError, match="keepalive"):
        a.handle_timer(72.0)


def test_setup_must_finish_within_conn_timeout():
    conn = Connection(SigningKey.generate(), 0.0, conn_timeout=8.0)
    conn.handle_timer(7.9)
    with pytest.raises(ProtocolError, match="timed out"):
        conn.handle_timer(8.0)


# ---- keepalive and rekey timers count as the original's do (docs/protocol.md 3.3 and 4) ----


def _frames(conn: Connection) -> list[bytes]:
    return FrameDecoder().feed(b"".join(conn.data_to_send()))


def test_a_rekey_does_not_stand_in_for_a_keepalive():
    # The rekey and the keepalive fall due at the same moment: both must go out.
    a, b = pair(keepalive=32.0, rekey_interval=16.0)
    a.handle_timer(16.0)
    frames = _frames(a)
    assert len(frames) == 2  # the Rekey and a KaMessage.keepAlive
    assert b.receive_data(b"".join(encode_frame(f) for f in frames), 16.0) == []
    assert b._keepalive.last_recv == 16.0
    assert a.next_deadline() == 32.0  # the next keepalive, 16 s after this one


def test_a_rekey_frame_does_not_reset_the_receive_deadline():
    a, b = pair(keepalive=32.0)
    a.start_rekey(20.0)
    assert deliver(a, b, 20.0) == []  # only a Rekey frame: not a KaMessage
    b.handle_timer(31.9)
    with pytest.raises(ProtocolError, match="keepalive"):
        b.handle_timer(32.0)


def test_answering_a_rekey_does_not_count_as_sending():
    a, b = pair(keepalive=32.0)
    a.start_rekey(10.0)
    deliver(a, b, 10.0)  # b answers with its own Rekey
    assert len(_frames(b)) == 1
    assert b.next_deadline() == 16.0  # a keepalive still owed at 16 s, not at 26 s


def test_a_rekey_answer_does_not_reset_the_receive_deadline():
    a, b = pair(keepalive=32.0)
    a.start_rekey(10.0)
    deliver(a, b, 10.0)
    assert deliver(b, a, 11.0) == []  # the answer completes a's rekey
    with pytest.raises(ProtocolError, match="keepalive"):
        a.handle_timer(32.0)


def test_a_completed_rekey_restarts_the_countdown_on_both_sides():
    a, b = pair(keepalive=1000.0, rekey_interval=100.0)
    assert b.next_deadline() == 100.0
    a.start_rekey(60.0)
    deliver(a, b, 60.0)  # started by the peer: b's countdown restarts
    assert b.next_deadline() == 160.0
    deliver(b, a, 61.0)  # the answer completes a's own rekey: so does a's
    assert a.next_deadline() == 161.0
    assert a.rekeys == b.rekeys == 1


def test_an_unauthenticated_peer_cannot_send_a_large_frame():
    # Before the channel is up a frame may be at most 1 KiB (a handshake message needs at
    # most 280 bytes): a 1 MiB frame announced by an unauthenticated peer is refused at its
    # header, before the relay buffers or unpacks any of it.
    conn = Connection(SigningKey.generate(), 0.0)
    with pytest.raises(ProtocolError, match="exceeds the maximum of 1024"):
        conn.receive_data(VERSION_FRAME + frame_header(1 << 20) + b"\x01\x01" * 1000, 0.0)
    assert conn.state is State.CLOSED


def test_after_the_handshake_large_frames_are_accepted():
    a, b = pair()
    a.send_message(b"z" * 900_000, 1.0)
    assert deliver(a, b, 1.0) == [b"z" * 900_000]


def test_timer_would_close_says_when_the_timer_closes():
    conn = Connection(SigningKey.generate(), 0.0, conn_timeout=5.0)
    assert not conn.timer_would_close(4.9)
    assert conn.timer_would_close(5.0)
    a, b = pair(0.0, keepalive=10.0)
    assert not a.timer_would_close(9.9)
    assert a.timer_would_close(10.0)
    a.pause_reading()
    assert not a.timer_would_close(100.0)
    a.resume_reading(100.0)
    b.send_message(b"hi", 105.0)
    deliver(b, a, 105.0)
    assert not a.timer_would_close(114.9)
    with pytest.raises(ProtocolError, match="keepalive timeout"):
        a.handle_timer(115.0)


def test_a_frame_budget_holds_the_rest_for_the_next_call():
    a, b = pair()
    for i in range(10):
        a.send_message(b"m%d" % i, 1.0)
    data = b"".join(a.data_to_send())
    got = b.receive_data(data, 1.0, frame_budget=3)
    assert got == [b"m0", b"m1", b"m2"] and b.backlog
    got += b.receive_data(b"", 1.0, frame_budget=3)
    got += b.receive_data(b"", 1.0, frame_budget=3)
    assert b.backlog
    got += b.receive_data(b"", 1.0, frame_budget=3)
    assert not b.backlog
    assert got == [b"m%d" % i for i in range(10)]


def test_held_frames_and_set_up_limits_survive_a_hand_over():
    a, b = pair()
    for i in range(5):
        a.send_message(b"h%d" % i, 1.0)
    assert b.receive_data(b"".join(a.data_to_send()), 1.0, frame_budget=2) == [b"h0", b"h1"]
    again = Connection.restore_state(b.export_state(1.0), SigningKey.generate(), 1.0)
    assert again.backlog
    assert again.receive_data(b"", 1.0) == [b"h2", b"h3", b"h4"]
    # A connection still in set-up keeps its small frame limit across the hand-over.
    identity = SigningKey.generate()
    fresh = Connection(identity, 0.0)
    fresh.receive_data(VERSION_FRAME, 0.0)
    restored = Connection.restore_state(fresh.export_state(0.0), identity, 0.0)
    with pytest.raises(ProtocolError, match="exceeds the maximum of 1024"):
        restored.receive_data(frame_header(1 << 20), 0.0)


def test_timers_of_connections_opened_together_are_spread_never_late():
    # A whole population reconnecting at once must not keep falling due at once: each
    # connection's first keepalive and each rekey come a random part of TIMER_SPREAD early.
    from offset_appliance.wire.connection import TIMER_SPREAD

    keepalives, rekeys = set(), set()
    for _ in range(20):
        a, _b = pair(keepalive=32.0, rekey_interval=1000.0, timer_spread=TIMER_SPREAD)
        due = a._keepalive.send_deadline()
        assert 16.0 * (1 - TIMER_SPREAD) <= due <= 16.0
        assert 1000.0 * (1 - TIMER_SPREAD) <= a._next_rekey <= 1000.0
        keepalives.add(due)
        rekeys.add(a._next_rekey)
        # After a rekey the next one is spread again, from the time it was started.
        a.start_rekey(500.0)
        assert 500.0 + 1000.0 * (1 - TIMER_SPREAD) <= a._next_rekey <= 1500.0
    assert len(keepalives) == 20 and len(rekeys) == 20


@pytest.mark.parametrize("own_random", [False, True])
def test_keepalives_from_the_cached_plaintexts_open_as_keepalives(own_random):
    # The process's padding (cached keepAlive plaintexts, one per length) and a connection's
    # own random source (encoded each time) both give frames the peer takes as keepalives.
    import os

    kwargs = {"random": lambda n: os.urandom(n)} if own_random else {}
    a, b = pair(keepalive=32.0, **kwargs)
    lengths = set()
    for step in range(1, 200):
        now = 16.0 * step
        b._keepalive.last_recv = now
        a._keepalive.last_recv = now
        a.handle_timer(now)
        data = b"".join(a.data_to_send())
        lengths.add(len(data))
        assert b.receive_data(data, now) == []
        assert b._keepalive.last_recv == now
    assert len(lengths) > 20  # the padding length still varies from one to the next
