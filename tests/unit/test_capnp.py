"""The generic packed Cap'n Proto codec: packing, stream framing, pointers and limits."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offset_appliance.errors import ProtocolError
from offset_appliance.wire import fastpath, messages
from offset_appliance.wire.capnp import (
    MAX_DEPTH,
    MAX_EXPANSION_WORDS,
    data_pointer,
    default_max_words,
    far_pointer,
    pack,
    pack_message,
    read_message,
    struct_pointer,
    unpack,
)

from ..capnp import tool

# ---- helpers: messages built word by word ---------------------------------------------------


def stream(*segments: list[int]) -> bytes:
    """The unpacked stream framing of ``segments`` (lists of 64-bit words)."""
    table = [len(segments) - 1, *map(len, segments)]
    if len(table) % 2:
        table.append(0)
    out = [struct.pack(f"<{len(table)}I", *table)]
    out.extend(struct.pack(f"<{len(words)}Q", *words) for words in segments)
    return b"".join(out)


def data_words(value: bytes) -> list[int]:
    """A Data body as words (zero-padded)."""
    padded = value + bytes(-len(value) % 8)
    return list(struct.unpack(f"<{len(padded) // 8}Q", padded))


def capability_pointer(index: int) -> int:
    """A pointer of the fourth kind (an interface reference), which no field of ours is."""
    return (index << 32) | 3


PAYLOAD = b"objects may be anywhere and in any order"


# ---- packing ----------------------------------------------------------------------------------


def test_packing_of_the_specification_examples():
    # The examples of the packing section of the Cap'n Proto encoding spec.
    assert pack(bytes.fromhex("0800000003000200")) == bytes.fromhex("51080302")
    assert pack(bytes.fromhex("0000000000000000")) == bytes.fromhex("0000")
    assert pack(bytes(8 * 3)) == bytes.fromhex("0002")
    run = bytes(range(1, 9)) + bytes(range(9, 17)) * 2
    assert pack(run) == b"\xff" + bytes(range(1, 9)) + b"\x02" + bytes(range(9, 17)) * 2


def test_zero_and_verbatim_runs_stop_at_256_words():
    assert pack(bytes(8 * 300)) == bytes.fromhex("00ff002b")
    word = b"\x01" * 8
    packed = pack(word * 300)
    assert packed[:10] == b"\xff" + word + b"\xff"
    assert packed[10 + 255 * 8 : 10 + 255 * 8 + 10] == b"\xff" + word + bytes([300 - 257])
    assert unpack(packed) == word * 300


def test_verbatim_run_ends_at_a_word_with_two_zero_bytes():
    words = b"\x01" * 8 + b"\x02" * 7 + b"\x00" + b"\x03" * 6 + b"\x00\x00"
    assert pack(words) == b"\xff" + b"\x01" * 8 + b"\x01" + b"\x02" * 7 + b"\x00" + b"\x3f" + (
        b"\x03" * 6
    )


def test_pack_refuses_partial_words():
    with pytest.raises(ValueError):
        pack(b"1234567")


def test_our_packing_is_the_reference_packing():
    # What the capnp tool writes for messages with every kind of word, re-packed by us.
    text = (
        "(randPadding = " + tool.data_literal(bytes(100) + b"\x01\x00" * 40 + os.urandom(300)) + ","
        " content = (user = " + tool.data_literal(b"ab\x00c" * 100 + bytes(3000)) + "))"
    )
    theirs = tool.encode("ChannelMessage", text)
    assert pack(unpack(theirs)) == theirs


word_choices = st.one_of(
    st.binary(min_size=8, max_size=8),
    st.just(bytes(8)),
    st.just(b"\xff" * 8),
    st.binary(min_size=8, max_size=8).map(lambda w: bytes(b if b > 200 else 0 for b in w)),
)
word_streams = st.lists(st.tuples(word_choices, st.integers(1, 300)), max_size=8).map(
    lambda runs: b"".join(word * count for word, count in runs)
)


@given(word_streams)
def test_pack_then_unpack_gives_back_any_word_stream(words):
    assert unpack(pack(words)) == words


headers = st.lists(st.binary(min_size=8, max_size=8), max_size=6).map(b"".join)


@given(headers, st.lists(st.binary(max_size=6000), min_size=1, max_size=3))
@settings(max_examples=200)
def test_pack_message_then_unpack_gives_back_header_and_padded_bodies(header, bodies):
    packed = pack_message(header, tuple(bodies))
    expected = header + b"".join(body + bytes(-len(body) % 8) for body in bodies)
    assert unpack(packed) == expected


def test_large_body_with_zero_bytes_at_run_starts_packs_correctly():
    body = bytearray(os.urandom(2048 * 5 + 13))
    for run in (0, 1, 3):  # make these runs' first words unfit to carry the 0xff tag
        body[2048 * run + 3] = 0
    body[2048 * 3 : 2048 * 3 + 8 * 12] = b"\x00\x01" * 48  # many such words in a row
    body[2048 * 4 : 2048 * 4 + 8 * 200] = bytes(8 * 200)  # and zero words
    packed = pack_message(bytes(8), (bytes(body),))
    assert unpack(packed) == bytes(8) + bytes(body) + bytes(3)


def test_zero_heavy_bodies_stay_small():
    # Zero words in a Data body become zero runs, not verbatim copies.
    packed = fastpath.encode_ka_message(bytes(4_000))
    assert len(packed) < 100
    assert fastpath.decode_ka_message(packed) == bytes(4_000)


def test_unpacked_size_is_bounded_by_the_packed_size():
    # 2 bytes of zero run stand for up to 2 KiB: by default a message may unpack to at most
    # its packed size plus 64 KiB, so a small frame cannot cost megabytes.
    packed = fastpath.encode_ka_message(bytes(100_000))
    assert len(packed) < 1000
    with pytest.raises(ProtocolError, match="too large"):
        fastpath.decode_ka_message(packed)
    bomb = b"\x00\xff" * 100
    assert default_max_words(len(bomb)) == MAX_EXPANSION_WORDS + 25
    with pytest.raises(ProtocolError, match="too large"):
        unpack(bomb)
    assert len(unpack(bomb[:64])) == 32 * 256 * 8


# ---- unpacking and stream framing ----------------------------------------------------------------


@pytest.mark.parametrize(
    "packed",
    [
        b"\x00",  # zero run without its count
        b"\xff" + b"\x01" * 8,  # verbatim run without its count
        b"\xff" + b"\x01" * 8 + b"\x02" + b"\x01" * 15,  # count says 2 words, 1.9 follow
        b"\x13\x01",  # tag says 3 bytes, 1 follows
    ],
)
def test_unpack_refuses_truncated_input(packed):
    with pytest.raises(ProtocolError):
        unpack(packed)


def test_unpack_refuses_to_grow_past_its_limit():
    bomb = b"\x00\xff" * 10
    assert len(unpack(bomb, max_words=2560)) == 2560 * 8
    with pytest.raises(ProtocolError, match="too large"):
        unpack(bomb, max_words=2559)
    with pytest.raises(ProtocolError, match="too large"):
        read_message(b"\x00\xff" * 5000)  # 1.28 million words from 10 KB


def test_full_run_fast_path_handles_partial_and_mixed_runs():
    body = os.urandom(2048 * 4)
    words = body + b"\x01\x00" * 4 + body[:2048]
    packed = pack_message(b"", (words,))
    assert unpack(packed) == words
    # A stream cut in the middle of a sequence of full runs is truncated, not misread.
    for cut in (2050 * 2 + 5, 2050 * 3 + 9, len(packed) - 1):
        with pytest.raises(ProtocolError, match="truncated"):
            unpack(packed[:cut])


@pytest.mark.parametrize(
    ("unpacked", "error"),
    [
        (b"", "empty"),
        (struct.pack("<II", 0, 0), "no root pointer"),
        (struct.pack("<II", 0, 5) + bytes(8 * 4), "shorter"),
        (struct.pack("<II", 0, 1) + bytes(8 * 2), "trailing"),
        (struct.pack("<II", 0xFFFFFFFF, 1) + bytes(8), "too many segments"),
        (struct.pack("<II", 9, 1) + bytes(8), "segment table"),
        (struct.pack("<IIII", 2, 1, 0xFFFFFFFF, 0) + bytes(8), "shorter"),
        (stream([], [0]), "no root pointer"),
    ],
)
def test_read_message_refuses_bad_segment_tables(unpacked, error):
    with pytest.raises(ProtocolError, match=error):
        read_message(pack(unpacked))


def test_every_prefix_of_a_message_is_refused():
    packed = fastpath.encode_channel_user(b"pad", fastpath.encode_ka_message(os.urandom(5000)))
    for cut in range(len(packed)):
        with pytest.raises(ProtocolError):
            fastpath.decode_channel_message(packed[:cut])


# ---- pointers: any valid layout ----------------------------------------------------------------


def ka_text(payload: bytes) -> str:
    return f"(message = {tool.data_text(payload)})"


def test_double_far_pointers_are_followed():
    # Root: a double far pointer to a pad in segment 1, which points at the struct in
    # segment 2; the struct's Data pointer is a single far pointer to segment 3.
    segments = (
        [far_pointer(1, 1, double=True)],
        [0, far_pointer(2, 0), struct_pointer(0, 1, 1)],
        [1, far_pointer(3, 2)],
        [0, 0, data_pointer(0, len(PAYLOAD)), *data_words(PAYLOAD)],
    )
    packed = pack(stream(*segments))
    assert fastpath.decode_ka_message(packed) == PAYLOAD
    assert tool.decode("KaMessage", packed) == ka_text(PAYLOAD)


def test_far_pointer_to_data_with_double_landing_pad():
    body = data_words(PAYLOAD)
    segments = (
        [struct_pointer(0, 1, 1), 1, far_pointer(1, 0, double=True)],
        [far_pointer(2, 1), data_pointer(0, len(PAYLOAD))],
        [0xDEAD, *body],
    )
    packed = pack(stream(*segments))
    assert fastpath.decode_ka_message(packed) == PAYLOAD
    assert tool.decode("KaMessage", packed) == ka_text(PAYLOAD)


def test_objects_in_reverse_order_are_read():
    # The Data body comes first, then the struct that points back at it.
    body = data_words(PAYLOAD)
    struct_at = 1 + len(body)
    segment = [
        struct_pointer(struct_at - 1, 1, 1),
        *body,
        1,
        data_pointer(1 - (struct_at + 2), len(PAYLOAD)),
    ]
    packed = pack(stream(segment))
    assert fastpath.decode_ka_message(packed) == PAYLOAD
    assert tool.decode("KaMessage", packed) == ka_text(PAYLOAD)


def test_channel_message_with_content_before_padding_and_rekey_far_away():
    key, salt = bytes(range(32)), bytes(range(32, 64))
    be = struct.Struct(">4Q")
    seg0 = [
        struct_pointer(0, 0, 2),  # 0: root -> ChannelMessage at 1
        data_pointer(3, 3),  # 1: randPadding, after the content struct
        struct_pointer(0, 1, 1),  # 2: content -> ChannelContent at 3
        0,  # 3: union tag: rekey
        far_pointer(1, 0),  # 4: rekey, in segment 1
        *data_words(b"pad"),  # 5
    ]
    seg1 = [
        struct_pointer(0, 0, 2),  # 0: landing pad -> Rekey at 1
        struct_pointer(1, 0, 1),  # 1: dhPublicKey -> wrapper at 3
        struct_pointer(6, 0, 1),  # 2: keySalt -> wrapper at 9
        struct_pointer(6, 4, 0),  # 3: wrapper -> Buffer256 at 10
        *be.unpack(salt),  # 4..7: keySalt's Buffer256, before its wrapper
        0xFFFF,  # 8: a word nothing points at
        struct_pointer(-6, 4, 0),  # 9: keySalt's wrapper -> Buffer256 at 4, backwards
        *be.unpack(key),  # 10..13: dhPublicKey's Buffer256
    ]
    packed = pack(stream(seg0, seg1))
    assert fastpath.decode_channel_message(packed) == messages.Rekey(key, salt)
    expected = (
        '(randPadding = "pad", content = (rekey = ('
        f"dhPublicKey = {tool.wrapped_text(key)}, keySalt = {tool.wrapped_text(salt)})))"
    )
    assert tool.decode("ChannelMessage", packed) == expected


def test_structs_larger_than_the_schema_are_read():
    # A newer schema: more data words and pointers than ours knows of.
    payload = b"more fields"
    segment = [
        struct_pointer(0, 3, 3),
        1 | (0xABCD << 16),
        0x1111,
        0x2222,
        data_pointer(3, len(payload)),
        data_pointer(0, 5),
        0,
        0x4242,
        *data_words(payload),
    ]
    assert fastpath.decode_ka_message(pack(stream(segment))) == payload


def test_structs_smaller_than_the_schema_read_as_defaults():
    key = os.urandom(32)
    be = struct.Struct(">4Q")
    # ExchangeRandNonce with no data word (so no union tag: empty) and 2 pointers, whose
    # RandValue's Buffer128 has one data word only and whose key's Buffer256 has six.
    segment = [
        struct_pointer(0, 0, 2),
        struct_pointer(1, 0, 1),
        struct_pointer(1, 0, 1),
        struct_pointer(1, 1, 0),
        struct_pointer(1, 6, 0),
        0x0102030405060708,
        *be.unpack(key),
        7,
        8,
    ]
    msg = messages.ExchangeRandNonce.decode(pack(stream(segment)))
    assert msg == messages.ExchangeRandNonce(bytes(range(1, 9)) + bytes(8), key, None)


def test_null_root_reads_as_the_default_struct():
    packed = pack(stream([0]))
    assert fastpath.decode_ka_message(packed) is None  # keepAlive is the union's default
    assert messages.decode_init_connection(packed) == messages.Listen()
    with pytest.raises(ProtocolError, match="missing"):
        messages.RejectConnection.decode(packed)


def test_null_data_reads_as_empty():
    assert fastpath.decode_ka_message(pack(stream([struct_pointer(0, 1, 1), 1, 0]))) == b""


def test_zero_sized_struct_with_offset_minus_one():
    # How encoders write an empty struct: offset -1, no sections.
    root = struct_pointer(0, 0, 1)
    packed = pack(stream([root, struct_pointer(-1, 0, 0)]))
    with pytest.raises(ProtocolError, match="missing"):
        messages.IncomingConnection.decode(packed)  # PublicKey there, but no inner buffer


# ---- pointers: what must be refused -------------------------------------------------------------


BAD_LAYOUTS = {
    "struct past the segment end": [struct_pointer(0, 1, 5), 1],
    "struct before the segment start": [struct_pointer(-3, 1, 1)],
    "data past the segment end": [struct_pointer(0, 1, 1), 1, data_pointer(0, 9)],
    "data before the segment start": [struct_pointer(0, 1, 1), 1, data_pointer(-4, 1)],
    "oversize list": [struct_pointer(0, 1, 1), 1, data_pointer(0, (1 << 29) - 1)],
    "list where the root struct is": [data_pointer(0, 8), 0],
    "capability where the root struct is": [capability_pointer(0)],
    "struct where Data is": [struct_pointer(0, 1, 1), 1, struct_pointer(-1, 0, 0)],
    "capability where Data is": [struct_pointer(0, 1, 1), 1, capability_pointer(0)],
    "list of words where Data is": [struct_pointer(0, 1, 1), 1, (1 << 35) | (5 << 32) | 1, 0],
    "far pointer to a missing segment": [far_pointer(3, 0)],
    "far pointer past the segment end": [far_pointer(0, 7)],
    "far pointer landing on a far pointer": [far_pointer(0, 1), far_pointer(0, 0)],
    "double far pad past the segment end": [far_pointer(0, 1, double=True), 0],
    "double far pad not starting with far": [
        far_pointer(0, 1, double=True),
        struct_pointer(0, 0, 0),
        struct_pointer(0, 1, 1),
    ],
    "double far pad whose tag is far": [
        far_pointer(0, 1, double=True),
        far_pointer(0, 3),
        far_pointer(0, 3),
        1,
    ],
    "double far to a missing segment": [
        far_pointer(0, 1, double=True),
        far_pointer(9, 0),
        struct_pointer(0, 1, 1),
    ],
    "double far to a struct past the end": [
        far_pointer(0, 1, double=True),
        far_pointer(0, 2),
        struct_pointer(0, 1, 1),
    ],
}


@pytest.mark.parametrize("name", sorted(BAD_LAYOUTS))
def test_bad_pointers_are_refused(name):
    packed = pack(stream(BAD_LAYOUTS[name]))
    with pytest.raises(ProtocolError):
        fastpath.decode_ka_message(packed)


def test_wrong_pointer_kind_for_a_required_struct():
    # InitConnection.accept must point at a PublicKey struct, not a list.
    segment = [struct_pointer(0, 1, 1), 1, data_pointer(0, 32), *data_words(bytes(32))]
    with pytest.raises(ProtocolError, match="struct pointer"):
        messages.decode_init_connection(pack(stream(segment)))


def test_nesting_depth_is_limited():
    # A struct whose only pointer points at itself: an endless chain of nested structs.
    segment = [struct_pointer(0, 0, 1), struct_pointer(-1, 0, 1)]
    reader = read_message(pack(stream(segment))).root()
    depth = 0
    with pytest.raises(ProtocolError, match="nested too deeply"):
        while reader is not None:
            reader = reader.struct(0)
            depth += 1
    assert depth == MAX_DEPTH


def test_traversal_is_limited_when_objects_overlap():
    # Twenty pointers to the same 1000-word Data: legal, but reading them all would visit
    # twenty times the message.
    body = os.urandom(8000)
    pointers = [data_pointer(19 - i, len(body)) for i in range(20)]
    segment = [struct_pointer(0, 0, 20), *pointers, *data_words(body)]
    root = read_message(pack(stream(segment))).root()
    assert root.data(0) == body and root.data(19) == body
    with pytest.raises(ProtocolError, match="traversal limit"):
        for index in range(20):
            root.data(index)


def test_reader_fields_beyond_the_sections():
    root = read_message(pack(stream([struct_pointer(0, 1, 0), 0x0102]))).root()
    assert root.uint16(0) == 0x0102
    assert root.uint16(8) == 0
    assert root.struct(0) is None and root.data(3) is None
    assert root.data_section(2) == struct.pack("<QQ", 0x0102, 0)


# ---- bounded unpacking work -------------------------------------------------------------------


def _unpack_word_by_word(packed: bytes) -> bytes:
    """The packing scheme read one item at a time, as the specification states it."""
    out = bytearray()
    pos = 0
    while pos < len(packed):
        tag = packed[pos]
        pos += 1
        word = bytearray(8)
        for bit in range(8):
            if tag >> bit & 1:
                word[bit] = packed[pos]
                pos += 1
        out += word
        if tag == 0:
            out += bytes(8 * packed[pos])
            pos += 1
        elif tag == 0xFF:
            count = packed[pos]
            if pos + 1 + 8 * count > len(packed):
                raise IndexError("truncated")
            out += packed[pos + 1 : pos + 1 + 8 * count]
            pos += 1 + 8 * count
    return bytes(out)


_ITEMS = st.one_of(
    # A stretch of words with one tag (handled together by slicing), or of zero runs.
    st.tuples(st.integers(1, 254), st.integers(1, 40)).map(
        lambda pair: (bytes([pair[0]]) + bytes(range(1, 1 + bin(pair[0]).count("1")))) * pair[1]
    ),
    st.lists(st.integers(0, 255), min_size=1, max_size=40).map(
        lambda counts: b"".join(b"\x00" + bytes([c]) for c in counts)
    ),
    st.binary(min_size=8, max_size=8).map(lambda word: b"\xff" + word + b"\x00"),
    st.integers(0, 255).map(lambda tag: bytes([tag])),
    st.binary(min_size=1, max_size=9),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_ITEMS, max_size=30))
def test_unpack_agrees_with_unpacking_word_by_word(items):
    packed = b"".join(items)
    try:
        expected = _unpack_word_by_word(packed)
    except IndexError:
        expected = None  # truncated
    if expected is not None and len(expected) > 8 * (8192 + (len(packed) + 7) // 8):
        expected = None  # beyond the expansion limit
    if expected is None:
        with pytest.raises(ProtocolError):
            unpack(packed)
    else:
        assert unpack(packed) == expected


def test_a_stretch_of_like_words_unpacks_in_bulk():
    # 1 MiB of 2-byte words with one tag: one strided copy per present byte, not a step each.
    packed = b"\x01\x07" * (1 << 19)
    assert unpack(packed, max_words=1 << 20) == (b"\x07" + bytes(7)) * (1 << 19)
    # By default 4 MiB from a 1 MiB frame is too much: refused once counted, before any
    # of it is made.
    with pytest.raises(ProtocolError, match="too large"):
        unpack(packed)
    zero_runs = b"\x00\x00" * (1 << 19)
    assert unpack(zero_runs, max_words=1 << 20) == bytes(8 << 19)


@pytest.mark.parametrize(
    "item",
    [b"\x01\x01\x02\x01", b"\xff" + b"\x01" * 8 + b"\x00", b"\x00\x00\x01\x01"],
    ids=["alternating tags", "one-word verbatim runs", "zero run then a word"],
)
def test_input_made_to_take_a_step_per_word_is_refused(item):
    # Each item needs a step of its own: a 1 MiB frame of them would cost a Python step per
    # word; the work of one message is bounded instead (1024 steps + one per 128 bytes).
    packed = item * ((1 << 20) // len(item))
    with pytest.raises(ProtocolError, match="too many steps"):
        unpack(packed, max_words=1 << 20)
    # The same items in the numbers real messages need are read.
    few = item * 100
    assert unpack(few) == _unpack_word_by_word(few)
