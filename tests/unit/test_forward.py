"""The tunnel hot path's fast paths against the general ones: forwarding a KaMessage as it
came (``forward_ka_message`` accepts exactly what ``decode_ka_message`` accepts, and what it
returns decodes to the same payload), and reading a ChannelMessage's user data straight from
its packed bytes (the same outcome as unpacking it whole), and the padded start of a message
made once per pair of lengths (the same bytes as the general encoder with that padding)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from offset_appliance.errors import ProtocolError
from offset_appliance.wire.capnp import pack, packed_words, unpack
from offset_appliance.wire.channel import PaddingSource, SecureChannel
from offset_appliance.wire.connection import Connection
from offset_appliance.wire.fastpath import (
    CARRY_MIN,
    channel_user_prefix,
    channel_user_prefix_padded,
    decode_channel_message,
    decode_ka_message,
    encode_channel_user,
    encode_ka_message,
    forward_channel_message,
    forward_channel_user,
    forward_ka_message,
    padding_of,
)
from offset_appliance.wire.frames import frame_header
from offset_appliance.wire.messages import (
    KEEPALIVE,
    Rekey,
    encode_channel_rekey,
)

from ..capnp import tool

SIZES = (0, 1, 7, 8, 9, 64, 2040, 2048, 2049, 5000, 65536)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ["random", "letters", "zeros"])
def test_our_encoding_is_forwarded_as_it_is(size, kind):
    payload = {"random": os.urandom(size), "letters": b"x" * size, "zeros": bytes(size)}[kind]
    packed = encode_ka_message(payload)
    forwarded, length = forward_ka_message(packed)
    assert forwarded is packed
    assert length == size


def test_keepalive_is_not_forwarded():
    assert forward_ka_message(KEEPALIVE) is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4000), st.integers(0, 3), st.binary(max_size=300))
def test_packed_words_counts_what_unpack_makes(words, full_runs, tail):
    # Stretches of full verbatim runs (random words, counted at once) among other words.
    data = words + os.urandom(full_runs * 2048) + tail
    data = data[: len(data) // 8 * 8]
    packed = pack(data)
    assert packed_words(packed) == len(unpack(packed)) // 8 == len(data) // 8
    # Within a longer buffer: the same count up to ``length``.
    assert packed_words(packed + os.urandom(50), 0, len(packed)) == len(data) // 8


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=3000), min_size=1, max_size=5))
def test_a_relay_hop_forwarding_delivers_what_the_sender_sent(messages):
    # sender -> relay's connection A (forward) -> relay's connection B -> receiver.
    sender_id, relay_id, receiver_id = (SigningKey.generate() for _ in range(3))
    sender = Connection(sender_id, 0.0, expected_peer=bytes(relay_id.verify_key))
    relay_a = Connection(relay_id, 0.0)
    relay_b = Connection(relay_id, 0.0)
    receiver = Connection(receiver_id, 0.0, expected_peer=bytes(relay_id.verify_key))
    for left, right in ((sender, relay_a), (relay_b, receiver)):
        for _ in range(3):
            right.receive_data(b"".join(left.data_to_send()), 0.0)
            left.receive_data(b"".join(right.data_to_send()), 0.0)
    for message in messages:
        sender.send_message(message, 0.0)
    forwarded = relay_a.receive_forward(b"".join(sender.data_to_send()), 0.0)
    assert relay_a.forwarded_bytes == sum(map(len, messages))
    relay_b.send_packed(forwarded, 0.0)
    assert receiver.receive_data(b"".join(relay_b.data_to_send()), 0.0) == messages


# ---- ChannelMessage straight from the packed bytes -------------------------------------------


@pytest.mark.parametrize("padding", [0, 1, 8, 255, 3000, 65535])
@pytest.mark.parametrize("size", [0, 1, 8, 9, 64, 2048, 5000, 65536])
def test_our_channel_messages_are_read_from_the_packed_bytes(padding, size):
    user = os.urandom(size)
    data = encode_channel_user(os.urandom(padding), user)
    assert decode_channel_message(data) == user


def test_the_padding_length_is_drawn_for_each_message():
    source = PaddingSource(lambda size: bytes(range(256)) * (size // 256))
    assert [source.length() for _ in range(300)] == [n % 256 for n in range(300)]


# ---- large user data carried in its packed words -------------------------------------------


def _carried_outcome(data: bytes, padding: bytes = b"\x07" * 13) -> bool:
    """``forward_channel_user`` accepts only what the general path (decode the ChannelMessage,
    forward its KaMessage as it came) accepts, and then makes the same message; returns
    whether it accepted."""
    carried = forward_channel_user(data)
    if carried is None:
        return False
    length, words, payload_length = carried
    user = decode_channel_message(data)
    assert isinstance(user, bytes) and len(user) == length
    assert forward_ka_message(user) == (user, payload_length)
    assert len(decode_ka_message(user)) == payload_length  # type: ignore[arg-type]
    ours = channel_user_prefix(padding, length) + bytes(words)
    assert unpack(ours) == unpack(encode_channel_user(padding, user))
    assert decode_channel_message(ours) == user
    return True


def _zero_heavy(size: int) -> bytes:
    # Words with two or more zero bytes here and there: runs end early, zero runs and
    # tagged words among the verbatim runs, in both packings.
    data = bytearray(os.urandom(size))
    for at in range(0, size, 997):
        data[at : at + 3] = bytes(3)
    for at in range(400, size, 3001):
        data[at : at + 40] = bytes(40)
    return bytes(data)


@pytest.mark.parametrize("padding", [0, 1, 8, 255, 3000])
@pytest.mark.parametrize("size", [CARRY_MIN, 2100, 5000, 65536])
@pytest.mark.parametrize("kind", ["random", "zero-heavy", "letters"])
def test_large_user_data_is_carried_in_its_packed_words(padding, size, kind):
    payload = {"random": os.urandom, "zero-heavy": _zero_heavy, "letters": lambda n: b"x" * n}[
        kind
    ](size)
    ka = encode_ka_message(payload)
    data = encode_channel_user(os.urandom(padding), ka)
    carried = forward_channel_user(data)
    assert carried is not None
    length, words, payload_length = carried
    assert (length, payload_length) == (len(ka), size)
    # Our own packing carried into our header and padding: exactly what our encoder writes.
    for pad in (b"", os.urandom(9), os.urandom(255)):
        assert channel_user_prefix(pad, length) + bytes(words) == encode_channel_user(pad, ka)
    assert channel_user_prefix_padded(17, length) == channel_user_prefix(padding_of(17), length)
    assert _carried_outcome(data)
    # The same message packed as the reference packer packs it (runs end at a word with two
    # zero bytes, whoever made it): carried too, in that packing, unless a run crosses from
    # the padding into the user data (then the general path reads it).
    assert _carried_outcome(pack(unpack(data))) or padding > 0


def test_small_user_data_is_not_carried():
    ka = encode_ka_message(os.urandom(CARRY_MIN - 30))
    assert len(ka) < CARRY_MIN
    assert forward_channel_user(encode_channel_user(b"", ka)) is None


def test_what_is_not_a_forwardable_kamessage_is_not_carried():
    big = os.urandom(5000)
    # A keepalive padded out, user data that is not a KaMessage, a KaMessage whose header
    # is not ours, and non-zero bytes after the user data in its last word.
    assert forward_channel_user(encode_channel_user(b"", KEEPALIVE + bytes(3000))) is None
    assert forward_channel_user(encode_channel_user(b"", big)) is None
    ka = encode_ka_message(big)
    assert forward_channel_user(encode_channel_user(b"", ka[:-1])) is None
    data = bytearray(encode_channel_user(b"", ka + b"\x00"))
    assert forward_channel_user(bytes(data)) is None  # one byte more than the KaMessage
    words = bytearray(unpack(encode_channel_user(b"", ka[:-2])))
    words[-1] = 1  # after the user data, inside its last word
    assert forward_channel_user(pack(bytes(words))) is None
    with pytest.raises(ProtocolError):
        decode_ka_message(ka[:-2])


@pytest.mark.parametrize("shared_padding", [True, False])
def test_a_relay_hop_carrying_large_messages_delivers_them(shared_padding):
    random = os.urandom if shared_padding else (lambda n: os.urandom(n))
    sender_id, relay_id, receiver_id = (SigningKey.generate() for _ in range(3))
    sender = Connection(sender_id, 0.0, expected_peer=bytes(relay_id.verify_key))
    relay_a = Connection(relay_id, 0.0, random=random)
    relay_b = Connection(relay_id, 0.0, random=random)
    receiver = Connection(receiver_id, 0.0, expected_peer=bytes(relay_id.verify_key))
    for left, right in ((sender, relay_a), (relay_b, receiver)):
        for _ in range(3):
            right.receive_data(b"".join(left.data_to_send()), 0.0)
            left.receive_data(b"".join(right.data_to_send()), 0.0)
    messages = [os.urandom(65536), _zero_heavy(65536), b"x" * 70000, b"short"]
    for message in messages:
        sender.send_message(message, 0.0)
    forwarded = relay_a.receive_forward(b"".join(sender.data_to_send()), 0.0)
    assert [type(item) for item in forwarded] == [tuple, tuple, tuple, bytes]
    assert relay_a.forwarded_bytes == sum(map(len, messages))
    relay_b.send_packed(forwarded, 0.0)
    assert receiver.receive_data(b"".join(relay_b.data_to_send()), 0.0) == messages


@pytest.mark.parametrize("size", [CARRY_MIN, 5000, 65536])
def test_a_carried_frame_is_what_sealing_the_joined_message_gives(size):
    # frame_carried encrypts in place in one buffer: the same bytes as the frame header
    # and the prefix joined to the words, then sealed, for the same state.
    def channel():
        state = iter(range(1 << 30))
        return SecureChannel(
            bytes(32), bytes(range(32)), lambda n: bytes(next(state) % 256 for _ in range(n))
        )

    words = memoryview(os.urandom(8 * ((size + 7) // 8)))
    for _ in range(3):
        one, other = channel(), channel()
        frame = one.frame_carried(size, words)
        payload = other._seal(other.carried_prefix(size) + bytes(words))
        assert bytes(frame) == frame_header(len(payload)) + payload


def test_the_reference_reader_takes_a_carried_message():
    # A KaMessage carried in another packing (the reference packer's) into our header and
    # padding: the capnp tool reads the same user data from it as from our encoding.
    ka = encode_ka_message(_zero_heavy(6000))
    data = pack(unpack(encode_channel_user(b"", ka)))
    carried = forward_channel_user(data)
    assert carried is not None
    length, words, _ = carried
    padding = os.urandom(40)
    ours = channel_user_prefix(padding, length) + bytes(words)
    assert ours != encode_channel_user(padding, ka)  # the packing carried is not ours
    assert tool.decode("ChannelMessage", ours) == tool.decode(
        "ChannelMessage", encode_channel_user(padding, ka)
    )


# ---- the fused tunnel path: ChannelMessage and KaMessage checked in one go ------------------
# (What it gives and refuses, against the general path: tests/unit/test_fastpath.py.)


@pytest.mark.parametrize("padding", [0, 1, 255])
@pytest.mark.parametrize("size", [64, 2000, 2100, 4200])
def test_the_usual_message_takes_the_fused_path(padding, size):
    data = encode_channel_user(os.urandom(padding), encode_ka_message(os.urandom(size)))
    for _ in range(2):  # (the second time from the maps of header words seen)
        assert forward_channel_message(data) is not None


def test_a_rekey_is_left_to_the_channel():
    assert forward_channel_message(encode_channel_rekey(b"", Rekey(bytes(32), bytes(32)))) is None


def test_a_forwarding_relay_hop_across_rekeys_delivers_everything():
    # Rekeys started by either side while tunnel data flows through the forwarding path
    # (frames under the old key while the new one settles included).
    sender_id, relay_id, receiver_id = (SigningKey.generate() for _ in range(3))
    sender = Connection(sender_id, 0.0, expected_peer=bytes(relay_id.verify_key))
    relay_a = Connection(relay_id, 0.0)
    relay_b = Connection(relay_id, 0.0)
    receiver = Connection(receiver_id, 0.0, expected_peer=bytes(relay_id.verify_key))
    for left, right in ((sender, relay_a), (relay_b, receiver)):
        for _ in range(3):
            right.receive_data(b"".join(left.data_to_send()), 0.0)
            left.receive_data(b"".join(right.data_to_send()), 0.0)
    delivered = []
    sent = []
    for round_ in range(6):
        if round_ % 2:
            sender.start_rekey(0.0)
        else:
            relay_a.start_rekey(0.0)
        for size in (10, 3000, 70000):
            message = os.urandom(size)
            sent.append(message)
            sender.send_message(message, 0.0)
        forwarded = relay_a.receive_forward(b"".join(sender.data_to_send()), 0.0)
        sender.receive_data(b"".join(relay_a.data_to_send()), 0.0)
        relay_b.send_packed(forwarded, 0.0)
        delivered += receiver.receive_data(b"".join(relay_b.data_to_send()), 0.0)
    assert delivered == sent
    assert relay_a.rekeys >= 5
