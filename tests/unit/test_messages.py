"""The Offset messages against the reference ``capnp`` tool, and their decoders under abuse."""

from __future__ import annotations

import os
import re
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from offset_appliance.errors import ProtocolError
from offset_appliance.wire.capnp import pack, unpack
from offset_appliance.wire.fastpath import (
    decode_channel_message,
    decode_dh,
    decode_ka_message,
    decode_rand_nonce,
    encode_channel_user,
    encode_ka_message,
)
from offset_appliance.wire.messages import (
    KEEPALIVE,
    Accept,
    Connect,
    ExchangeDh,
    ExchangeRandNonce,
    IncomingConnection,
    Listen,
    RejectConnection,
    Rekey,
    decode_init_connection,
    encode_channel_rekey,
    encode_init_connection,
)

from ..capnp import tool

W = tool.wrapped_text
KEY = bytes(range(1, 33))
KEY2 = bytes(range(255, 223, -1))
NONCE = bytes(range(100, 116))
SALT = bytes([0xFF] * 8 + [0] * 8 + [0x80] * 16)
SIGNATURE = bytes(range(7, 71))

# ---- layout ----------------------------------------------------------------------------------

# docs/protocol.md section 8: data words, pointers, and where each field lives.
LAYOUT = {
    "Buffer128": (2, 0, {"x0": "bits[0, 64)", "x1": "bits[64, 128)"}),
    "Buffer256": (4, 0, {f"x{i}": f"bits[{64 * i}, {64 * i + 64})" for i in range(4)}),
    "Buffer512": (8, 0, {f"x{i}": f"bits[{64 * i}, {64 * i + 64})" for i in range(8)}),
    "PublicKey": (0, 1, {"inner": "ptr[0]"}),
    "DhPublicKey": (0, 1, {"inner": "ptr[0]"}),
    "Salt": (0, 1, {"inner": "ptr[0]"}),
    "Signature": (0, 1, {"inner": "ptr[0]"}),
    "RandValue": (0, 1, {"inner": "ptr[0]"}),
    "InitConnection": (
        1,
        1,
        {
            "listen": "bits[0, 0), union tag = 0",
            "accept": "ptr[0], union tag = 1",
            "connect": "ptr[0], union tag = 2",
        },
    ),
    "RejectConnection": (0, 1, {"publicKey": "ptr[0]"}),
    "IncomingConnection": (0, 1, {"publicKey": "ptr[0]"}),
    "KaMessage": (
        1,
        1,
        {"keepAlive": "bits[0, 0), union tag = 0", "message": "ptr[0], union tag = 1"},
    ),
    "ExchangeRandNonce": (
        1,
        3,
        {
            "randNonce": "ptr[0]",
            "srcPublicKey": "ptr[1]",
            "empty": "bits[0, 0), union tag = 0",
            "publicKey": "ptr[2], union tag = 1",
        },
    ),
    "ExchangeDh": (
        0,
        4,
        {
            "dhPublicKey": "ptr[0]",
            "randNonce": "ptr[1]",
            "keySalt": "ptr[2]",
            "signature": "ptr[3]",
        },
    ),
    "Rekey": (0, 2, {"dhPublicKey": "ptr[0]", "keySalt": "ptr[1]"}),
    "ChannelContent": (
        1,
        1,
        {"rekey": "ptr[0], union tag = 0", "user": "ptr[0], union tag = 1"},
    ),
    "ChannelMessage": (0, 2, {"randPadding": "ptr[0]", "content": "ptr[1]"}),
}


def test_schema_layout_is_the_protocol_table():
    compiled = tool.compile_layout()
    blocks = re.findall(
        r"struct (\w+) @0x[0-9a-f]+ \{  # (\d+) bytes, (\d+) ptrs\n(.*?)\n\}", compiled, re.S
    )
    found = {name: (int(size) // 8, int(ptrs), body) for name, size, ptrs, body in blocks}
    assert set(found) == set(LAYOUT)
    for name, (data_words, pointers, fields) in LAYOUT.items():
        assert found[name][:2] == (data_words, pointers), name
        for field, where in fields.items():
            assert re.search(
                rf"\b{field} @\d+ :[\w]+;  # {re.escape(where)}\n", found[name][2] + "\n"
            ), (
                name,
                field,
            )
    # Every union tag sits in bits 0..15 of the data section.
    assert compiled.count("union {  # tag bits [0, 16)") == 4


# ---- our encodings, read by the tool -----------------------------------------------------------


def text_of(value: object) -> tuple[str, str]:
    """(root struct name, the tool's expected text) for a message dataclass."""
    if isinstance(value, ExchangeRandNonce):
        dest = (
            "(empty = void)"
            if value.opt_dest_public_key is None
            else f"(publicKey = {W(value.opt_dest_public_key)})"
        )
        return "ExchangeRandNonce", (
            f"(randNonce = {W(value.rand_nonce)}, srcPublicKey = {W(value.src_public_key)}, "
            f"optDestPublicKey = {dest})"
        )
    if isinstance(value, ExchangeDh):
        return "ExchangeDh", (
            f"(dhPublicKey = {W(value.dh_public_key)}, randNonce = {W(value.rand_nonce)}, "
            f"keySalt = {W(value.key_salt)}, signature = {W(value.signature)})"
        )
    if isinstance(value, Rekey):
        return "Rekey", f"(dhPublicKey = {W(value.dh_public_key)}, keySalt = {W(value.key_salt)})"
    if isinstance(value, RejectConnection | IncomingConnection):
        return type(value).__name__, f"(publicKey = {W(value.public_key)})"
    if isinstance(value, Listen):
        return "InitConnection", "(listen = void)"
    if isinstance(value, Accept | Connect):
        return "InitConnection", f"({type(value).__name__.lower()} = {W(value.public_key)})"
    raise TypeError(value)


MESSAGES = [
    ExchangeRandNonce(NONCE, KEY, None),
    ExchangeRandNonce(NONCE, KEY, KEY2),
    ExchangeRandNonce(bytes(16), bytes(32), bytes(32)),
    ExchangeDh(KEY, NONCE, SALT, SIGNATURE),
    ExchangeDh(b"\xff" * 32, b"\xff" * 16, b"\xff" * 32, b"\xff" * 64),
    Rekey(KEY, SALT),
    RejectConnection(KEY),
    IncomingConnection(KEY2),
    Listen(),
    Accept(KEY),
    Connect(KEY2),
    Connect(bytes(32)),
]


@pytest.mark.parametrize("value", MESSAGES, ids=repr)
def test_tool_reads_our_messages(value):
    name, expected = text_of(value)
    assert tool.decode(name, value.encode()) == expected


@pytest.mark.parametrize("value", MESSAGES, ids=repr)
def test_our_messages_are_byte_for_byte_the_tools(value):
    # Same object order, same packing: nothing for a peer to trip over.
    name, text = text_of(value)
    assert value.encode() == tool.encode(name, text)


def test_init_connection_encoders_agree():
    for value in (Listen(), Accept(KEY), Connect(KEY)):
        assert encode_init_connection(value) == value.encode()


def test_keepalive_is_the_tools_keepalive():
    assert KEEPALIVE == tool.encode("KaMessage", "(keepAlive = void)")
    assert tool.decode("KaMessage", KEEPALIVE) == "(keepAlive = void)"


PAYLOADS = {
    "empty": b"",
    "one byte": b"\x00",
    "text": b"hello, relay",
    "every byte": bytes(range(256)),
    "a word of zeros then data": bytes(8) + b"\x01" * 9,
    "random 1000": os.urandom(1000),
    "random 2048": os.urandom(2048),
    "random 70000": os.urandom(70_000),
    "zeros 20000": bytes(20_000),
}


@pytest.mark.parametrize("name", PAYLOADS)
def test_tool_reads_our_ka_messages(name):
    payload = PAYLOADS[name]
    expected = f"(message = {tool.data_text(payload)})"
    assert tool.decode("KaMessage", encode_ka_message(payload)) == expected


@pytest.mark.parametrize("name", PAYLOADS)
@pytest.mark.parametrize("padding", [b"", b"p", os.urandom(8), os.urandom(255)], ids=len)
def test_tool_reads_our_channel_messages(name, padding):
    user = PAYLOADS[name]
    expected = (
        f"(randPadding = {tool.data_text(padding)}, content = (user = {tool.data_text(user)}))"
    )
    assert tool.decode("ChannelMessage", encode_channel_user(padding, user)) == expected


def test_tool_reads_our_channel_rekey():
    padding = os.urandom(100)
    expected = (
        f"(randPadding = {tool.data_text(padding)}, content = (rekey = "
        f"(dhPublicKey = {W(KEY)}, keySalt = {W(SALT)})))"
    )
    packed = encode_channel_rekey(padding, Rekey(KEY, SALT))
    assert tool.decode("ChannelMessage", packed) == expected


# ---- the tool's encodings, read by us -----------------------------------------------------------


@pytest.mark.parametrize("value", MESSAGES, ids=repr)
def test_we_read_the_tools_messages(value):
    name, text = text_of(value)
    packed = tool.encode(name, text)
    assert type(value).decode(packed) == value
    if name == "InitConnection":
        assert decode_init_connection(packed) == value


@pytest.mark.parametrize("name", PAYLOADS)
def test_we_read_the_tools_ka_and_channel_messages(name):
    payload = PAYLOADS[name]
    ka = tool.encode("KaMessage", f"(message = {tool.data_literal(payload)})")
    assert decode_ka_message(ka) == payload
    text = (
        f"(randPadding = {tool.data_literal(b'xyz')}, content = (user = {tool.data_literal(ka)}))"
    )
    assert decode_ka_message(decode_channel_message(tool.encode("ChannelMessage", text))) == payload


def test_we_read_the_tools_channel_rekey():
    text = f'(randPadding = "", content = (rekey = (dhPublicKey = {W(KEY)}, keySalt = {W(SALT)})))'
    assert decode_channel_message(tool.encode("ChannelMessage", text)) == Rekey(KEY, SALT)


def test_we_read_the_tools_multi_segment_message():
    # A Data too big for the builder's first segment goes into a second one, reached by a
    # far pointer: the layout the Rust and C++ encoders give large tunnel messages.
    user = os.urandom(600 * 1024)
    padding = os.urandom(200)
    text = (
        f"(randPadding = {tool.data_literal(padding)}, "
        f"content = (user = {tool.data_literal(user)}))"
    )
    packed = tool.encode("ChannelMessage", text)
    segments = struct.unpack_from("<I", unpack(packed))[0] + 1
    assert segments > 1, "the tool no longer splits this message; pick a larger Data"
    assert decode_channel_message(packed) == user


# ---- properties ---------------------------------------------------------------------------------

b16 = st.binary(min_size=16, max_size=16)
b32 = st.binary(min_size=32, max_size=32)
b64 = st.binary(min_size=64, max_size=64)

any_message = st.one_of(
    st.builds(ExchangeRandNonce, b16, b32, st.none() | b32),
    st.builds(ExchangeDh, b32, b16, b32, b64),
    st.builds(Rekey, b32, b32),
    st.builds(RejectConnection, b32),
    st.builds(IncomingConnection, b32),
    st.just(Listen()),
    st.builds(Accept, b32),
    st.builds(Connect, b32),
)


@given(any_message)
def test_every_message_round_trips(value):
    assert type(value).decode(value.encode()) == value


@given(st.binary(max_size=5000), st.binary(max_size=255))
def test_ka_and_channel_round_trip(payload, padding):
    ka = encode_ka_message(payload)
    assert decode_ka_message(ka) == payload
    assert decode_channel_message(encode_channel_user(padding, ka)) == ka


@given(b32, b32, st.binary(max_size=255))
def test_channel_rekey_round_trips(key, salt, padding):
    assert decode_channel_message(encode_channel_rekey(padding, Rekey(key, salt))) == Rekey(
        key, salt
    )


DECODERS = [
    ExchangeRandNonce.decode,
    ExchangeDh.decode,
    Rekey.decode,
    RejectConnection.decode,
    IncomingConnection.decode,
    Listen.decode,
    Accept.decode,
    Connect.decode,
    decode_init_connection,
    decode_ka_message,
    decode_channel_message,
    decode_rand_nonce,
    decode_dh,
]


def decode_all(data: bytes) -> None:
    """Feed ``data`` to every decoder: each may succeed or raise ProtocolError, nothing else."""
    for decode in DECODERS:
        try:
            decode(data)
        except ProtocolError:
            pass


@given(st.binary(max_size=400))
@example(b"\x10\x01\x50\x01\x01\x01\x01")  # a struct pointer whose struct is cut off
@example(b"\x00\x00")
@example(b"\xff" * 30)
def test_decoders_survive_arbitrary_bytes(data):
    decode_all(data)


VALID = [value.encode() for value in MESSAGES] + [  # type: ignore[attr-defined]
    KEEPALIVE,
    encode_ka_message(b"payload bytes"),
    encode_channel_user(b"pad", encode_ka_message(bytes(range(200)))),
    encode_channel_rekey(b"padding", Rekey(KEY, SALT)),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["set", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif action == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=9))
        elif action == "delete" and data:
            del data[pos]
        else:
            del data[pos:]
    return bytes(data)


@given(mutated())
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_decoders_survive_mutated_messages(data):
    decode_all(data)


def test_mutations_are_caught_not_only_survived():
    # A flipped union tag is read as another variant or refused; never silently the same.
    packed = bytearray(encode_init_connection(Connect(KEY)))
    assert decode_init_connection(bytes(packed)) == Connect(KEY)
    tag_at = packed.index(b"\x01\x02") + 1  # tag byte of the data word, then its value
    packed[tag_at] = 7
    with pytest.raises(ProtocolError, match="unknown InitConnection variant 7"):
        decode_init_connection(bytes(packed))


# ---- the dataclasses ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: ExchangeRandNonce(bytes(15), KEY, None), "rand_nonce"),
        (lambda: ExchangeRandNonce(NONCE, KEY, bytes(31)), "opt_dest_public_key"),
        (lambda: ExchangeDh(KEY, NONCE, SALT, bytes(63)), "signature"),
        (lambda: Rekey(KEY, bytearray(32)), "key_salt"),  # type: ignore[arg-type]
        (lambda: RejectConnection("k" * 32), "public_key"),  # type: ignore[arg-type]
        (lambda: Connect(bytes(33)), "public_key"),
    ],
)
def test_fields_are_checked(make, error):
    with pytest.raises(ValueError, match=error):
        make()


def test_variant_decoders_insist_on_their_variant():
    assert Accept.decode(Accept(KEY).encode()) == Accept(KEY)
    assert Listen.decode(Listen().encode()) == Listen()
    with pytest.raises(ProtocolError, match="expected connect, got accept"):
        Connect.decode(Accept(KEY).encode())


def test_unknown_union_variants_are_refused():
    ka = bytearray(encode_ka_message(b"abc"))
    assert ka[5:7] == b"\x01\x01"  # the KaMessage data word, packed: 1 (message)
    ka[6] = 5
    with pytest.raises(ProtocolError, match="unknown KaMessage variant 5"):
        decode_ka_message(bytes(ka))


def test_channel_message_without_content_is_refused():
    packed = tool.encode("ChannelMessage", '(randPadding = "x")')
    with pytest.raises(ProtocolError, match="content is missing"):
        decode_channel_message(packed)


def test_decoders_refuse_what_is_not_bytes():
    with pytest.raises(ProtocolError):
        decode_ka_message("text")


# ---- the fixed-layout fast paths agree with the general reader --------------------------


def _channel_words(user: bytes, padding: bytes, user_first: bool, spare_words: int) -> bytes:
    """A one-segment ChannelMessage laid out by hand, Data bodies in either order."""
    from offset_appliance.wire.capnp import data_pointer, struct_pointer

    def body(data: bytes) -> bytes:
        return data + bytes(-len(data) % 8)

    first, second = (user, padding) if user_first else (padding, user)
    first_words = len(body(first)) // 8
    # Words: 0 root, 1 padding ptr, 2 content ptr, 3 tag, 4 user ptr, 5.. bodies, then spare.
    if user_first:
        padding_ptr = data_pointer(3 + first_words, len(padding))
        user_ptr = data_pointer(0, len(user))
    else:
        padding_ptr = data_pointer(3, len(padding))
        user_ptr = data_pointer(first_words, len(user))
    segment = b"".join(
        w.to_bytes(8, "little")
        for w in (struct_pointer(0, 0, 2), padding_ptr, struct_pointer(0, 1, 1), 1, user_ptr)
    )
    segment += body(first) + body(second) + bytes(8 * spare_words)
    table = (0).to_bytes(4, "little") + (len(segment) // 8).to_bytes(4, "little")
    return pack(table + segment)


@pytest.mark.parametrize("user_first", [False, True])
@pytest.mark.parametrize("spare_words", [0, 3])
@pytest.mark.parametrize("size", [0, 1, 9, 64, 3000])
def test_channel_layouts_decode_the_same(user_first, spare_words, size):
    user = bytes((i * 7 + 1) % 256 for i in range(size))
    padding = b"\x01" * 13
    encoded = _channel_words(user, padding, user_first, spare_words)
    assert decode_channel_message(encoded) == user


def test_channel_fast_path_refuses_out_of_bounds_user():
    from offset_appliance.wire.capnp import data_pointer, struct_pointer

    words = (struct_pointer(0, 0, 2), 0, struct_pointer(0, 1, 1), 1, data_pointer(0, 100))
    segment = b"".join(w.to_bytes(8, "little") for w in words) + bytes(8)
    table = (0).to_bytes(4, "little") + (len(segment) // 8).to_bytes(4, "little")
    with pytest.raises(ProtocolError):
        decode_channel_message(pack(table + segment))
