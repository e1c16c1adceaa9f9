"""Every specialised codec of ``wire.fastpath`` against its general twin (``EQUIVALENCES``):
the same outcome on valid encodings, on other valid packings of the same words, on damaged
bytes and on arbitrary bytes."""

from __future__ import annotations

import os
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offset_appliance.wire.capnp import data_pointer, far_pointer, pack, struct_pointer, unpack
from offset_appliance.wire.fastpath import (
    CARRY_MIN,
    EQUIVALENCES,
    Equivalence,
    decode_channel_message,
    decode_channel_original,
    decode_channel_rekey,
    encode_channel_rekey_fast,
    encode_channel_user,
    encode_ka_message,
)
from offset_appliance.wire.messages import (
    KEEPALIVE,
    Accept,
    Connect,
    ExchangeDh,
    ExchangeRandNonce,
    Listen,
    Rekey,
    decode_channel_message_general,
    encode_channel_rekey,
    encode_init_connection,
)

# ---- valid messages -------------------------------------------------------------------------


@st.composite
def _value(draw: st.DrawFn, size: int) -> bytes:
    # Values with zero bytes now and then: a value without one is spliced into the packed
    # bytes as a verbatim run, one with one is packed the general way.
    if draw(st.booleans()):
        return draw(st.binary(min_size=size, max_size=size))
    return bytes(
        draw(st.integers(0, 255) if draw(st.booleans()) else st.integers(1, 255))
        for _ in range(size)
    )


rand_nonces = st.builds(ExchangeRandNonce, _value(16), _value(32), st.one_of(st.none(), _value(32)))
dhs = st.builds(ExchangeDh, _value(32), _value(16), _value(32), _value(64))
init_connections = st.one_of(
    st.just(Listen()), st.builds(Accept, _value(32)), st.builds(Connect, _value(32))
)


def _zero_heavy(data: bytes) -> bytes:
    # Words with two or more zero bytes here and there: runs end early, zero runs and
    # tagged words among the verbatim runs, in both packings.
    out = bytearray(data)
    for at in range(0, len(out), 997):
        out[at : at + 3] = bytes(3)
    for at in range(400, len(out), 3001):
        out[at : at + 40] = bytes(40)
    return bytes(out)


@st.composite
def _payload(draw: st.DrawFn) -> bytes:
    size = draw(st.sampled_from([0, 1, 7, 8, 9, 64, 2000, 2100, CARRY_MIN, 4200, 6500]))
    kind = draw(st.sampled_from(["drawn", "random", "zero-heavy", "letters"]))
    if kind == "drawn":
        return draw(st.binary(max_size=3000))
    if kind == "letters":
        return b"x" * size
    data = draw(st.randoms(use_true_random=False)).randbytes(size)
    return _zero_heavy(data) if kind == "zero-heavy" else data


ka_messages = st.one_of(st.just(KEEPALIVE), _payload().map(encode_ka_message))


_PADDING_8 = os.urandom(8)


def _buffer256(value: bytes) -> tuple[int, ...]:
    return struct.unpack(">4Q", value)


def original_rekey(padding: bytes, rekey: Rekey) -> bytes:
    """A Rekey ChannelMessage as the original writes it: its builder allocates in field order,
    so the padding body comes right after the root struct, before ChannelContent; the one
    segment is packed whole by the reference packer."""
    words = (len(padding) + 7) // 8
    body = padding + bytes(8 * words - len(padding))
    structs = struct.pack(
        "<14Q",
        0,  # ChannelContent: the union tag, rekey
        struct_pointer(0, 0, 2),
        struct_pointer(1, 0, 1),
        struct_pointer(5, 0, 1),
        struct_pointer(0, 4, 0),
        *_buffer256(rekey.dh_public_key),
        struct_pointer(0, 4, 0),
        *_buffer256(rekey.key_salt),
    )
    header = struct.pack(
        "<4Q",
        (17 + words) << 32,
        struct_pointer(0, 0, 2),
        data_pointer(1, len(padding)),
        struct_pointer(words, 1, 1),
    )
    return pack(header + body + structs)


class _OriginalArena:
    """The original's message builder as far as a ChannelMessage needs it: segments of
    1,024 words first, each new one as large as all before it (or what it must hold), an
    object placed in its pointer's segment when it fits, else in the first segment with
    room for it and a landing pad, else in a new one, behind a far pointer."""

    def __init__(self) -> None:
        self.sizes = [1024]
        self.next_size = 2048
        self.words: list[list[int]] = [[0]]  # the root pointer

    def _room(self, segment: int, amount: int) -> int | None:
        words = self.words[segment]
        if len(words) + amount > self.sizes[segment]:
            return None
        at = len(words)
        words.extend([0] * amount)
        return at

    def place(self, ref: tuple[int, int], amount: int, pointer: Any) -> tuple[int, int]:
        """Allocate ``amount`` words for the object ``ref`` points to; ``pointer(offset)``
        is its pointer word. Returns where the object starts."""
        segment, at = ref
        start = self._room(segment, amount)
        if start is not None:
            self.words[segment][at] = pointer(start - at - 1)
            return segment, start
        for other in range(len(self.words)):
            pad = self._room(other, amount + 1)
            if pad is not None:
                break
        else:
            size = max(amount + 1, self.next_size)
            self.next_size += size
            self.sizes.append(size)
            self.words.append([])
            other, pad = len(self.words) - 1, 0
            self._room(other, amount + 1)
        self.words[segment][at] = far_pointer(other, pad)
        self.words[other][pad] = pointer(0)
        return other, pad + 1

    def body(self, where: tuple[int, int], data: bytes) -> None:
        segment, at = where
        for index in range(0, len(data), 8):
            word = data[index : index + 8]
            self.words[segment][at + index // 8] = int.from_bytes(word, "little")

    def packed(self) -> bytes:
        table = [len(self.words) - 1] + [len(words) for words in self.words]
        table += [0] * (len(table) % 2)
        out = struct.pack(f"<{len(table)}I", *table)
        for words in self.words:
            out += struct.pack(f"<{len(words)}Q", *words)
        return pack(out)


def original_user(padding: bytes, user: bytes) -> bytes:
    """A user ChannelMessage as the original writes it: the root struct, the padding, the
    content struct, the user data, allocated in that order (far pointers and new segments
    where the first 1,024 words run out), the segments packed whole by the reference packer."""
    arena = _OriginalArena()
    root = arena.place((0, 0), 2, lambda offset: struct_pointer(offset, 0, 2))
    where = arena.place(root, (len(padding) + 7) // 8, lambda o: data_pointer(o, len(padding)))
    arena.body(where, padding)
    content = arena.place((root[0], root[1] + 1), 2, lambda offset: struct_pointer(offset, 1, 1))
    arena.words[content[0]][content[1]] = 1  # the union tag: user
    ref = (content[0], content[1] + 1)
    where = arena.place(ref, (len(user) + 7) // 8, lambda offset: data_pointer(offset, len(user)))
    arena.body(where, user)
    return arena.packed()


def original_ka_message(payload: bytes | None) -> bytes:
    """A KaMessage as the original writes it (a keepalive is ours byte for byte)."""
    if payload is None:
        return KEEPALIVE
    arena = _OriginalArena()
    root = arena.place((0, 0), 2, lambda offset: struct_pointer(offset, 1, 1))
    arena.words[0][root[1]] = 1  # the union tag: message
    ref = (root[0], root[1] + 1)
    where = arena.place(ref, (len(payload) + 7) // 8, lambda o: data_pointer(o, len(payload)))
    arena.body(where, payload)
    return arena.packed()


rekeys = st.builds(Rekey, _value(32), _value(32))
rekey_paddings = st.one_of(
    st.sampled_from([b"", _PADDING_8, bytes(8), bytes(16)]),
    st.binary(max_size=300),
    st.integers(0, 2100).map(os.urandom),
)


@st.composite
def channel_messages(draw: st.DrawFn) -> bytes:
    padding = draw(st.sampled_from([b"", b"", _PADDING_8]) | st.binary(max_size=300))
    kind = draw(
        st.sampled_from(
            ["ka", "ka", "damaged ka", "damaged ka", "user", "rekey", "rekey", "original rekey"]
            + ["original ka", "original ka", "original user"]
        )
    )
    if kind.startswith("original ") and kind != "original rekey":
        # The original's padding: any length 0..65535, those where its layout changes
        # (segments of 1,024 words) drawn more often.
        length = draw(
            st.integers(0, 65535) | st.sampled_from([0, 8, 255, 8152, 8160, 8168, 8176, 16376])
        )
        padding = draw(st.randoms(use_true_random=False)).randbytes(length)
        if kind == "original user":
            return original_user(padding, draw(_payload()))
        payload = draw(st.none() | _payload() | st.sampled_from([b"x" * 8000, b"x" * 16384]))
        return original_user(padding, original_ka_message(payload))
    if kind == "rekey":
        return encode_channel_rekey(draw(rekey_paddings), draw(rekeys))
    if kind == "original rekey":
        return original_rekey(draw(rekey_paddings), draw(rekeys))
    user = draw(_payload()) if kind == "user" else draw(ka_messages)
    if kind == "damaged ka":
        # A valid ChannelMessage around a KaMessage that is not: more or fewer bytes, or
        # one byte changed.
        at = draw(st.integers(0, len(user) - 1))
        user = draw(
            st.sampled_from(
                [
                    user + draw(st.binary(min_size=1, max_size=16)),
                    user[: -draw(st.integers(1, 9))],
                    user[:at] + bytes([user[at] ^ draw(st.integers(1, 255))]) + user[at + 1 :],
                ]
            )
        )
    return encode_channel_user(padding, user)


VALID = {
    "KaMessage": ka_messages,
    "ChannelMessage": channel_messages(),
    "ExchangeRandNonce": rand_nonces.map(ExchangeRandNonce.encode),
    "ExchangeDh": dhs.map(ExchangeDh.encode),
    "InitConnection": init_connections.map(encode_init_connection),
}

# ---- other packings of the same words, and damage -----------------------------------------


def _packed_words_one_by_one(words: bytes) -> bytes:
    # Another valid packing of the same words: every word on its own tag, no runs.
    out = bytearray()
    for pos in range(0, len(words), 8):
        word = words[pos : pos + 8]
        tag = sum(1 << bit for bit in range(8) if word[bit])
        out.append(tag)
        out += bytes(b for b in word if b)
        if tag in (0, 0xFF):
            out.append(0)
    return bytes(out)


def _packed_verbatim(words: bytes) -> bytes:
    # Another valid packing: one verbatim run of every word (the capnp tool reads it).
    return b"\xff" + words[:8] + bytes([len(words) // 8 - 1]) + words[8:]


def _structural(data: bytes) -> list[int]:
    # Where changes matter most: the header, and the bytes that can be tags and counts.
    return [at for at, byte in enumerate(data[:80])] + [
        at for at in range(80, len(data)) if data[at] in (0x00, 0xFF)
    ]


@st.composite
def packed(draw: st.DrawFn, takes: str) -> bytes:
    """A message of kind ``takes`` (now and then of another kind), packed our way or
    another valid way, then damaged or not; or arbitrary bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=400))
    kind = takes if draw(st.integers(0, 5)) else draw(st.sampled_from(sorted(VALID)))
    data = draw(VALID[kind])
    words = unpack(data)
    packing = draw(st.sampled_from(["ours"] * 3 + ["reference", "one by one", "verbatim"]))
    if packing == "reference":
        data = pack(words)  # runs end at a word with two zero bytes, whoever made it
    elif packing == "one by one" and len(words) <= 8000:
        data = _packed_words_one_by_one(words)
    elif packing == "verbatim" and 8 <= len(words) <= 256 * 8:
        data = _packed_verbatim(words)
    changed = bytearray(data)
    if changed:
        for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):
            structural = _structural(bytes(changed))
            at = draw(st.integers(0, 1 << 20))
            at = at % len(changed) if draw(st.booleans()) else structural[at % len(structural)]
            edit = draw(st.sampled_from(["set", "flip", "cut", "insert"]))
            if edit == "set":
                changed[at] = draw(st.integers(0, 255))
            elif edit == "flip":
                changed[at] ^= draw(st.integers(1, 255))
            elif edit == "cut":
                del changed[at : at + draw(st.integers(1, 12))]
            else:
                changed[at:at] = draw(st.binary(min_size=1, max_size=9))
            if not changed:
                break
    cut = draw(st.integers(-9, 9)) if draw(st.integers(0, 2)) == 0 else 0
    if cut > 0:
        changed += draw(st.binary(min_size=cut, max_size=cut))
    elif cut < 0:
        del changed[cut:]
    return bytes(changed)


INPUTS: dict[str, st.SearchStrategy[tuple[Any, ...]]] = {
    **{kind: packed(kind).map(lambda data: (data,)) for kind in VALID},
    "ExchangeRandNonce value": rand_nonces.map(lambda message: (message,)),
    "ExchangeDh value": dhs.map(lambda message: (message,)),
    "padding, Rekey": st.tuples(rekey_paddings, rekeys),
    "padding length, user data": st.tuples(
        st.integers(0, 255),
        st.one_of(st.binary(max_size=3000), st.just(b"\x00" * 8 + b"x"), _payload(), ka_messages),
    ),
    "padding length, user data length": st.tuples(
        st.integers(0, 255), st.integers(0, 70000) | st.sampled_from([0, 8, 2048, CARRY_MIN])
    ),
}


# ---- the one test ---------------------------------------------------------------------------


def _check(pair: Equivalence, args: tuple[Any, ...]) -> None:
    problem = pair.disagreement(*args)
    assert problem is None, problem


def test_every_input_kind_is_drawn():
    assert {pair.takes for pair in EQUIVALENCES} <= set(INPUTS)
    assert len({pair.name for pair in EQUIVALENCES}) == len(EQUIVALENCES)


@pytest.mark.parametrize("pair", EQUIVALENCES, ids=lambda pair: pair.name)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_fast_path_agrees_with_its_general_twin(pair, data):
    _check(pair, data.draw(INPUTS[pair.takes], label=pair.takes))


# Cases found before (by the tests of each pair this one replaced), kept as they are.
_KA_64 = encode_ka_message(b"x" * 64)
_CHANNEL_64 = encode_channel_user(b"", _KA_64)


def _set(data: bytes, at: int, value: int) -> bytes:
    changed = bytearray(data)
    changed[at % len(changed)] = value
    return bytes(changed)


_REKEY = Rekey(bytes(range(1, 33)), bytes(range(101, 133)))
_REKEY_ZEROS = Rekey(bytes(8) + bytes(range(1, 25)), bytes(range(32)))

KNOWN = [
    ("KaMessage", _set(_KA_64, 20, 6)[:-8]),  # a word short, the run's count to match
    ("KaMessage", _set(_KA_64, 20, 8) + b"\x01" * 8),  # a word more, the run's count to match
    ("KaMessage", _set(_KA_64, 1, 12)),  # the segment size one more
    ("KaMessage", encode_ka_message(b"") + b"\x01"),  # a body where none belongs
    ("ChannelMessage", encode_channel_user(b"", b"x" * 64)[:-8]),
    ("ChannelMessage", _set(encode_channel_user(b"", b"x" * 64), 25, 6)[:-8]),
    ("ChannelMessage", _set(encode_channel_user(b"", b"x" * 64), 25, 8) + b"\x01" * 8),
    ("ChannelMessage", _set(encode_channel_user(bytes(200), b"x" * 64), 0, 0x30)),
    ("ChannelMessage", _CHANNEL_64),
    # Valid ChannelMessages around KaMessages that are not: bytes after it, one short.
    ("ChannelMessage", encode_channel_user(b"", _KA_64 + b"\x00\x00")),
    ("ChannelMessage", encode_channel_user(b"", _KA_64 + b"\x01" * 9)),
    ("ChannelMessage", encode_channel_user(_PADDING_8, _KA_64 + b"\x00\x05")),
    ("ChannelMessage", encode_channel_user(b"", _KA_64[:-1])),
    ("ChannelMessage", encode_channel_user(b"", KEEPALIVE)),
    ("ChannelMessage", encode_channel_user(b"", encode_ka_message(_zero_heavy(os.urandom(4200))))),
    (
        "ChannelMessage",
        _set(encode_channel_user(b"", encode_ka_message(_zero_heavy(os.urandom(4200)))), 2059, 0),
    ),
    # Rekeys: ours and the original's, a padding ending in zero words (the original's then
    # runs into the union tag's zero word), padding the fast path leaves to the general one.
    # The original's user layouts: one segment, the user data or the padding in a second,
    # both in a second, each in its own, the content struct in a second (left to the general
    # path), and one with its segment sizes changed.
    ("ChannelMessage", original_user(b"x" * 100, _KA_64)),
    ("ChannelMessage", original_user(b"", original_ka_message(b"x" * 16384))),
    ("ChannelMessage", original_user(bytes(9000), _KA_64)),
    ("ChannelMessage", original_user(b"x" * 9000, b"y" * 5000)),
    ("ChannelMessage", original_user(b"x" * 40000, b"y" * 20000)),
    ("ChannelMessage", original_user(b"x" * 8168, _KA_64)),
    ("ChannelMessage", _set(original_user(b"x" * 40000, _KA_64), 5, 0x30)),
    ("ChannelMessage", original_user(b"x" * 40000, KEEPALIVE)[:-3]),
    ("ChannelMessage", encode_channel_rekey(b"", _REKEY)),
    ("ChannelMessage", encode_channel_rekey(bytes(16), _REKEY_ZEROS)),
    ("ChannelMessage", encode_channel_rekey(b"x" * 2049, _REKEY)),
    ("ChannelMessage", original_rekey(b"", _REKEY)),
    ("ChannelMessage", original_rekey(b"x" * 8 + bytes(8), _REKEY)),
    ("ChannelMessage", original_rekey(bytes(5), _REKEY_ZEROS)),
    ("ChannelMessage", original_rekey(b"x" * 2049, _REKEY)),
    ("ChannelMessage", encode_channel_rekey(b"x" * 9, _REKEY)[:-1]),
    ("ChannelMessage", encode_channel_rekey(b"x" * 9, _REKEY) + b"\x00\x00"),
    ("ChannelMessage", _set(encode_channel_rekey(b"x" * 9, _REKEY), 1, 0x13)),
    ("ChannelMessage", _set(original_rekey(b"x" * 9, _REKEY), 1, 0x11)),
    ("InitConnection", b"\x10\x01\x50\x01\x01\x01\x01"),  # a struct pointer, its struct cut off
    ("InitConnection", b"\x00\x00"),
    ("InitConnection", b"\xff" * 30),
]


@pytest.mark.parametrize(("takes", "data"), KNOWN, ids=lambda v: v if isinstance(v, str) else "")
def test_known_cases(takes, data):
    for pair in EQUIVALENCES:
        if pair.takes in VALID:
            _check(pair, (data,))
    assert takes in VALID


def test_listen_is_checked_byte_by_byte():
    # Every one-byte change of the usual Listen: the shortcut never answers for the reader.
    pair = next(pair for pair in EQUIVALENCES if pair.name == "decode_init_connection")
    data = encode_init_connection(Listen())
    for at in range(len(data)):
        for xor in (1, 0x80):
            _check(pair, (data[:at] + bytes([data[at] ^ xor]) + data[at + 1 :],))


def _padding_without_zero_bytes(length: int) -> bytes:
    return bytes(byte % 255 + 1 for byte in os.urandom(length))


def test_the_original_user_layouts_are_read_from_the_packed_bytes():
    # The original's usual messages, sampled over all padding lengths: the fast path
    # answers with what the general reader reads, except where the content struct itself
    # went to a new segment (padding of 1,020 or 1,021 words).
    for length in [*range(0, 65536, 997), 255, 8152, 8169, 65535]:
        padding = os.urandom(length)
        for payload in (None, b"x" * 100, os.urandom(16384)):
            data = original_user(padding, original_ka_message(payload))
            user = decode_channel_message_general(data)
            assert decode_channel_original(data) == user
            assert decode_channel_message(data) == user
    assert decode_channel_original(original_user(bytes(8168), KEEPALIVE)) is None


def test_the_rekey_layouts_are_read_from_the_packed_bytes():
    # Ours and the original's, for every padding length the channel uses: the fast path
    # answers (the general reader is not needed) with what the general reader reads. The
    # padding has no zero byte here; a last padding word of zeros is the next test's.
    for length in range(256):
        padding = _padding_without_zero_bytes(length)
        for rekey in (_REKEY, _REKEY_ZEROS):
            for data in (encode_channel_rekey(padding, rekey), original_rekey(padding, rekey)):
                assert decode_channel_rekey(data) == rekey
                assert decode_channel_message_general(data) == rekey
            assert encode_channel_rekey_fast(padding, rekey) == encode_channel_rekey(padding, rekey)


def test_a_rekey_whose_padding_ends_in_a_zero_word_is_read_right_or_left_to_the_general_path():
    # A padding whose last word is all zeros (its last bytes zero, and the word's fill):
    # in the original's layout the packer runs that word together with the zero union tag
    # after it, which the fast path does not take apart; it must then decline, never read
    # something else. In our layout the padding comes last and the fast path answers.
    for length in range(1, 256):
        tail = length % 8 or 8
        padding = _padding_without_zero_bytes(length - tail) + bytes(tail)
        for rekey in (_REKEY, _REKEY_ZEROS):
            ours, theirs = encode_channel_rekey(padding, rekey), original_rekey(padding, rekey)
            assert decode_channel_message_general(ours) == rekey
            assert decode_channel_message_general(theirs) == rekey
            assert decode_channel_rekey(ours) == rekey
            assert decode_channel_rekey(theirs) is None
            assert decode_channel_message(theirs) == rekey
