"""The tunnel hot path's fast paths against the general ones: forwarding a KaMessage as it
came (``forward_ka_message`` accepts exactly what ``decode_ka_message`` accepts, and what it
returns decodes to the same payload), and reading a ChannelMessage's user data straight from
its packed bytes (the same outcome as unpacking it whole), and the padded start of a message
made once per pair of lengths (the same bytes as the general encoder with that padding)."""

from __future__ import annotations

import os

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from offset_appliance.errors import ProtocolError
from offset_appliance.wire.capnp import pack, packed_words, unpack
from offset_appliance.wire.channel import PaddingSource
from offset_appliance.wire.connection import Connection
from offset_appliance.wire.messages import (
    KEEPALIVE,
    _user_from_packed,
    decode_channel_message,
    decode_channel_message_unpacked,
    decode_ka_message,
    encode_channel_user,
    encode_channel_user_padded,
    encode_ka_message,
    forward_ka_message,
    padding_of,
)

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


def _same_outcome(data: bytes) -> None:
    try:
        expected = decode_ka_message(data)
    except ProtocolError:
        with pytest.raises(ProtocolError):
            forward_ka_message(data)
        return
    result = forward_ka_message(data)
    if expected is None:
        assert result is None
        return
    assert result is not None
    forwarded, length = result
    assert decode_ka_message(forwarded) == expected
    assert length == len(expected)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=3000),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=3),
    st.integers(-3, 3),
)
@example(b"x" * 64, [(20, 6)], -8)  # a word short, the run's count to match
@example(b"x" * 64, [(20, 8)], 8)  # a word more, the run's count to match
@example(b"x" * 64, [(1, 12)], 0)  # the segment size one more
@example(b"", [], 1)  # a body where none belongs
def test_a_changed_encoding_gets_what_the_decoder_says(payload, changes, cut):
    data = bytearray(encode_ka_message(payload))
    for at, value in changes:
        data[at % len(data)] = value
    if cut > 0:
        data += os.urandom(cut)
    elif cut < 0:
        del data[cut:]
    _same_outcome(bytes(data))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_get_what_the_decoder_says(data):
    _same_outcome(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4000))
def test_packed_words_counts_what_unpack_makes(words):
    data = words[: len(words) // 8 * 8]
    packed = pack(data)
    assert packed_words(packed) == len(unpack(packed)) // 8 == len(data) // 8


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
    forwarded = relay_a.receive_data(b"".join(sender.data_to_send()), 0.0, forward=True)
    assert relay_a.forwarded_bytes == sum(map(len, messages))
    relay_b.send_packed(forwarded, 0.0)
    assert receiver.receive_data(b"".join(relay_b.data_to_send()), 0.0) == messages


# ---- ChannelMessage straight from the packed bytes -------------------------------------------


def _same_channel_outcome(data: bytes) -> None:
    try:
        expected = decode_channel_message_unpacked(data)
    except ProtocolError:
        with pytest.raises(ProtocolError):
            decode_channel_message(data)
        return
    assert decode_channel_message(data) == expected


@pytest.mark.parametrize("padding", [0, 1, 8, 255, 3000, 65535])
@pytest.mark.parametrize("size", [0, 1, 8, 9, 64, 2048, 5000, 65536])
def test_our_channel_messages_are_read_from_the_packed_bytes(padding, size):
    user = os.urandom(size)
    data = encode_channel_user(os.urandom(padding), user)
    assert _user_from_packed(data) == user
    assert decode_channel_message(data) == user


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=300),
    st.binary(max_size=3000),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=3),
    st.integers(-3, 3),
)
@example(b"", b"x" * 64, [], -8)
@example(b"", b"x" * 64, [(25, 6)], -8)  # a word short, the run's count to match
@example(b"", b"x" * 64, [(25, 8)], 8)  # a word more, the run's count to match
@example(bytes(200), b"x" * 64, [(0, 0x30)], 0)
def test_a_changed_channel_message_gets_what_the_general_reader_says(padding, user, changes, cut):
    data = bytearray(encode_channel_user(padding, user))
    for at, value in changes:
        data[at % len(data)] = value
    if cut > 0:
        data += os.urandom(cut)
    elif cut < 0:
        del data[cut:]
    _same_channel_outcome(bytes(data))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_get_what_the_general_reader_says(data):
    _same_channel_outcome(data)


# ---- the padded start of a message, made once per pair of lengths -----------------------------


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 255), st.binary(max_size=3000))
@example(0, b"")
@example(255, b"\x00" * 8 + b"x")  # a first word with zero bytes: not one run
def test_padded_encoding_is_the_general_encoding_with_that_padding(padding_length, user):
    data = encode_channel_user_padded(padding_length, user)
    assert data == encode_channel_user(padding_of(padding_length), user)
    assert decode_channel_message(data) == user
    # A second time, from the prefix made the first time.
    assert encode_channel_user_padded(padding_length, user) == data


def test_the_padding_length_is_drawn_for_each_message():
    source = PaddingSource(lambda size: bytes(range(256)) * (size // 256))
    assert [source.length() for _ in range(300)] == [n % 256 for n in range(300)]
