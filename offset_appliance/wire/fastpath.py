"""The specialised codecs of the hot path, each beside the general codec it must agree with.

The channel and keepalive layers carry every tunnel message, and the handshake messages every
new connection: their usual layouts are written and read here directly, sliced and joined
rather than built and walked, and anything else falls to the general codecs of ``messages``.
``EQUIVALENCES`` pairs every specialised function with its general twin; one parametrised
test holds each pair to the same outcome on valid, re-packed and corrupted input.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

from ..errors import ProtocolError
from .capnp import (
    MAX_EXPANSION_WORDS,
    MAX_STEP_BYTES,
    MAX_STEPS,
    WORD,
    data_pointer,
    default_max_words,
    far_pointer,
    pack,
    pack_message,
    packed_words,
    skip_packed_words,
    struct_pointer,
    unpack,
    unpack_bytearray,
)
from .messages import (
    CHANNEL_CONTENT,
    CHANNEL_ROOT,
    CONTENT_REKEY,
    CONTENT_USER,
    DH_PUBLIC_KEY_LEN,
    HEADER_4,
    HEADER_6,
    KA_MESSAGE,
    KA_ROOT,
    KEEPALIVE,
    PUBLIC_KEY_LEN,
    RAND_NONCE_LEN,
    SALT_LEN,
    SIGNATURE_LEN,
    U64,
    WORDS_BE,
    WORDS_LE,
    ExchangeDh,
    ExchangeRandNonce,
    Rekey,
    decode_channel_message_general,
    decode_init_connection,
    decode_init_connection_general,
    decode_ka_message_general,
    encode_channel_rekey,
    read_channel_message,
    read_ka_message,
    unpacked_words,
)

# ---- fixed layouts of the handshake messages ------------------------------------------------
#
# Our encoder always writes the same words for a handshake message but for the BufferN values,
# so the unpacked message is a template with the values at fixed offsets. Encoding fills the
# template and packs it; decoding checks that every other byte is the template's and reads the
# values out. Any other encoding (another valid layout) goes through the general reader.


def _unpack_for_fixed(data: bytes) -> bytearray | None:
    if type(data) is not bytes or len(data) > 1024:
        return None
    try:
        return unpack_bytearray(data)
    except ProtocolError:
        return None  # the general reader says what is wrong


def _nonzero_with_zeros(word: bytes) -> bool:
    # A word the packer writes as its own tag and bytes: it neither joins a zero run nor a
    # verbatim run (one takes words of at most one zero byte), so packing restarts after it.
    return word != bytes(WORD) and word.count(0) >= 2


class _FixedLayout:
    """The unpacked template of one handshake layout and where its BufferN values go.

    Where every value is bordered by template words that pack on their own, the packed
    message is the packed template pieces with each value's packing between them, so the
    values are spliced into packed bytes directly: a value without zero bytes packs as one
    verbatim run (the 0xff tag, its first word, the count of the others, the others), and
    a packed message made of the template's pieces and such runs unpacks to the template
    with those values, which is all ``decode_packed`` accepts.
    """

    __slots__ = ("template", "fields", "_blank", "_pieces", "_runs")

    def __init__(
        self, encode_general: Callable[[tuple[bytes, ...]], bytes], sizes: tuple[int, ...]
    ) -> None:
        zeros = tuple(bytes(size) for size in sizes)
        self.template = bytes(unpack_bytearray(encode_general(zeros)))
        fields = []
        for index, size in enumerate(sizes):
            marker = bytes(range(1, size + 1))
            values = list(zeros)
            values[index] = marker
            marked = bytes(unpack_bytearray(encode_general(tuple(values))))
            stored = WORDS_LE[size].pack(*WORDS_BE[size].unpack(marker))
            at = marked.find(stored)
            if len(marked) != len(self.template) or at < 0 or at % 8:
                raise RuntimeError("a handshake message has no fixed layout")  # a codec bug
            fields.append((at, size))
        self.fields = tuple(fields)
        self._blank = tuple(bytes(size) for size in sizes)
        # The packed template between the values, and each value's verbatim-run count byte.
        template = self.template
        order = sorted(self.fields)
        bordered = order == list(self.fields) and all(
            at >= WORD
            and _nonzero_with_zeros(template[at - WORD : at])
            and (
                at + size == len(template)
                or _nonzero_with_zeros(template[at + size : at + size + WORD])
            )
            for at, size in order
        )
        if bordered:
            edges = [0] + [x for at, size in order for x in (at, at + size)] + [len(template)]
            self._pieces: tuple[bytes, ...] | None = tuple(
                pack(template[edges[i] : edges[i + 1]]) for i in range(0, len(edges), 2)
            )
            self._runs = tuple(bytes([size // WORD - 1]) for _at, size in order)
        else:
            self._pieces = None
            self._runs = ()

    def encode(self, values: tuple[bytes, ...]) -> bytes:
        pieces = self._pieces
        if pieces is None:
            words = bytearray(self.template)
            for (at, size), value in zip(self.fields, values, strict=True):
                words[at : at + size] = WORDS_LE[size].pack(*WORDS_BE[size].unpack(value))
            return pack(bytes(words))
        out = [pieces[0]]
        for (_at, size), run, value, piece in zip(
            self.fields, self._runs, values, pieces[1:], strict=True
        ):
            stored = WORDS_LE[size].pack(*WORDS_BE[size].unpack(value))
            if 0 in stored:
                out.append(pack(stored))
            else:
                out += (b"\xff", stored[:WORD], run, stored[WORD:])
            out.append(piece)
        return b"".join(out)

    def decode_packed(self, data: bytes) -> tuple[bytes, ...] | None:
        """The values of a packed message made of the template's pieces and one verbatim run
        per value, else None (the message may still be valid: the other paths decide)."""
        pieces = self._pieces
        if pieces is None or type(data) is not bytes:
            return None
        first = pieces[0]
        if not data.startswith(first):
            return None
        pos = len(first)
        values = []
        for (_at, size), run, piece in zip(self.fields, self._runs, pieces[1:], strict=True):
            end = pos + size + 2
            if (
                len(data) < end
                or data[pos] != 0xFF
                or data[pos + 9 : pos + 10] != run
                or not data.startswith(piece, end)
            ):
                return None
            stored = data[pos + 1 : pos + 9] + data[pos + 10 : end]
            values.append(WORDS_BE[size].pack(*WORDS_LE[size].unpack(stored)))
            pos = end + len(piece)
        if pos != len(data):
            return None
        return tuple(values)

    def decode(self, words: bytearray) -> tuple[bytes, ...] | None:
        if len(words) != len(self.template):
            return None
        values = []
        for at, size in self.fields:
            values.append(WORDS_BE[size].pack(*WORDS_LE[size].unpack_from(words, at)))
        words = bytearray(words)
        for (at, size), blank in zip(self.fields, self._blank, strict=True):
            words[at : at + size] = blank
        if words != self.template:
            return None
        return tuple(values)


_RAND_NONCE_FIXED = _FixedLayout(
    lambda v: ExchangeRandNonce(v[0], v[1], None).encode(),
    (RAND_NONCE_LEN, PUBLIC_KEY_LEN),
)
_RAND_NONCE_DEST_FIXED = _FixedLayout(
    lambda v: ExchangeRandNonce(*v).encode(),
    (RAND_NONCE_LEN, PUBLIC_KEY_LEN, PUBLIC_KEY_LEN),
)
_DH_FIXED = _FixedLayout(
    lambda v: ExchangeDh(*v).encode(),
    (DH_PUBLIC_KEY_LEN, RAND_NONCE_LEN, SALT_LEN, SIGNATURE_LEN),
)


def encode_rand_nonce(message: ExchangeRandNonce) -> bytes:
    """``message.encode()``, from the fixed layout's template."""
    if message.opt_dest_public_key is None:
        return _RAND_NONCE_FIXED.encode((message.rand_nonce, message.src_public_key))
    return _RAND_NONCE_DEST_FIXED.encode(
        (message.rand_nonce, message.src_public_key, message.opt_dest_public_key)
    )


def decode_rand_nonce(data: bytes) -> ExchangeRandNonce:
    """``ExchangeRandNonce.decode(data)``: the fixed layouts read in place, anything else
    by the general reader."""
    fields = _RAND_NONCE_FIXED.decode_packed(data)
    if fields is not None:
        return ExchangeRandNonce(fields[0], fields[1], None)
    fields = _RAND_NONCE_DEST_FIXED.decode_packed(data)
    if fields is not None:
        return ExchangeRandNonce(*fields)
    words = _unpack_for_fixed(data)
    if words is not None:
        fields = _RAND_NONCE_FIXED.decode(words)
        if fields is not None:
            return ExchangeRandNonce(fields[0], fields[1], None)
        fields = _RAND_NONCE_DEST_FIXED.decode(words)
        if fields is not None:
            return ExchangeRandNonce(*fields)
    return ExchangeRandNonce.decode(data)


def encode_dh(message: ExchangeDh) -> bytes:
    """``message.encode()``, from the fixed layout's template."""
    return _DH_FIXED.encode(
        (message.dh_public_key, message.rand_nonce, message.key_salt, message.signature)
    )


def decode_dh(data: bytes) -> ExchangeDh:
    """``ExchangeDh.decode(data)``: the fixed layout read in place, anything else by the
    general reader."""
    fields = _DH_FIXED.decode_packed(data)
    if fields is not None:
        return ExchangeDh(*fields)
    words = _unpack_for_fixed(data)
    if words is not None:
        fields = _DH_FIXED.decode(words)
        if fields is not None:
            return ExchangeDh(*fields)
    return ExchangeDh.decode(data)


# ---- channel and keepalive layers ---------------------------------------------------------

# These layouts are written out word by word rather than through MessageBuilder because
# every tunnel message goes through them: the few header words are packed normally, the
# Data bodies as verbatim runs, so a payload is only ever sliced and joined.

# The packed header words depend only on the Data lengths, which repeat: pack them once.
_PACKED_HEADERS: dict[bytes, bytes] = {}
_PACKED_HEADERS_LIMIT = 4096
_COUNT = tuple(bytes([n]) for n in range(256))
_PAD = tuple(bytes(n) for n in range(8))
# A body of at most this many bytes is one verbatim run: 0xff, its first word, a count.
_ONE_RUN = 256 * 8


def _packed_header(header: bytes) -> bytes:
    packed = _PACKED_HEADERS.get(header)
    if packed is None:
        packed = pack(header)
        if len(_PACKED_HEADERS) >= _PACKED_HEADERS_LIMIT:
            _PACKED_HEADERS.clear()
        _PACKED_HEADERS[header] = packed
    return packed


def _one_run(body: bytes) -> bool:
    # A body that fits one run and whose first word has no zero byte (which the reference
    # packer never tags 0xff) is packed as 0xff, word, count, rest, zero padding.
    return 8 <= len(body) <= _ONE_RUN and 0 not in body[:8]


def _run_pieces(body: bytes) -> tuple[bytes, ...]:
    """The packing of a body that passed ``_one_run``: a single verbatim run."""
    length = len(body)
    return (b"\xff", body[:8], _COUNT[(length + 7) // 8 - 1], body[8:], _PAD[-length % 8])


def encode_ka_message(payload: bytes) -> bytes:
    """The packed KaMessage ``message`` carrying ``payload``."""
    length = len(payload)
    body_words = (length + 7) // 8
    header = HEADER_4.pack((3 + body_words) << 32, KA_ROOT, KA_MESSAGE, data_pointer(0, length))
    if _one_run(payload):
        return b"".join((_packed_header(header), *_run_pieces(payload)))
    return pack_message(header, (payload,), _packed_header(header))


# Fixed layouts our encoders write (and the reference encoders too, for one segment):
# segment table, root pointer, struct words, then the Data. Decoders check these words and
# slice the Data out; anything else goes through the general reader.
_KA_FIXED = struct.Struct("<IIQQQ")
_CHANNEL_FIXED = struct.Struct("<IIQQQQQ")
LIST_KIND = 1
_BYTE_LIST = LIST_KIND | (2 << 32)
_LOW35 = (1 << 35) - 1


def decode_ka_message(data: bytes) -> bytes | None:
    """The payload of a packed KaMessage, or None for ``keepAlive``."""
    if data == KEEPALIVE:  # an idle connection's one message, as the encoders pack it
        return None
    words = unpacked_words(data)
    if len(words) >= 32:
        segments, size, root, tag, pointer = _KA_FIXED.unpack_from(words)
        if (
            segments == 0
            and size * 8 + 8 == len(words)
            and root == KA_ROOT
            and tag & 0xFFFF == KA_MESSAGE
            and pointer & _LOW35 == _BYTE_LIST
            and 32 + (pointer >> 35) <= len(words)
        ):
            return bytes(words[32 : 32 + (pointer >> 35)])
    # Not our layout: the general reader, on the words already unpacked.
    return read_ka_message(words)


# Forwarding (the relay's tunnels): a KaMessage ``message`` is sent on as it was received when
# it is in the layout our encoder writes (and the reference's, for one segment): its packed
# header words are exactly ours for its length, and the packed body unpacks to exactly the
# words of the payload. Then the bytes decode to the same payload as a re-encoding would, and
# nothing but the header and the body's run structure needs reading. The packed headers seen
# map to their payload length; a header missing from the map is checked once, by unpacking.
_KA_FORWARD_HEADERS: dict[bytes, int] = {}
_KA_FORWARD_LIMIT = 4096
# The root pointer and the tag word as packed: the bytes between the first and last header words.
_KA_MIDDLE = pack(HEADER_4.pack(0, KA_ROOT, KA_MESSAGE, 0))[2:7]
_POP = tuple(bin(tag).count("1") for tag in range(256))


def _ka_forward_length(header: bytes) -> int | None:
    """The payload length of a packed KaMessage header (its first 4 words as packed), if it
    is exactly what ``encode_ka_message`` writes for that length; None otherwise."""
    try:
        segments, size, root, tag, pointer = _KA_FIXED.unpack(unpack(header))
    except (ProtocolError, struct.error):
        return None
    length: int = pointer >> 35
    expected = HEADER_4.pack(
        (3 + (length + 7) // 8) << 32, KA_ROOT, KA_MESSAGE, data_pointer(0, length)
    )
    if _packed_header(expected) != header:
        return None
    if len(_KA_FORWARD_HEADERS) >= _KA_FORWARD_LIMIT:
        _KA_FORWARD_HEADERS.clear()
    _KA_FORWARD_HEADERS[header] = length
    return length


def forward_ka_message(data: bytes) -> tuple[bytes, int] | None:
    """A received packed KaMessage as the relay sends it on: ``(packed, payload length)``, or
    None for ``keepAlive``. ``packed`` is ``data`` itself when it is in our layout (see above),
    else the canonical encoding of its payload; whatever ``decode_ka_message`` refuses raises
    the same ``ProtocolError``, and ``decode_ka_message(packed)`` is always its payload."""
    if type(data) is bytes and len(data) > 8:
        # The header: the segment table word and the data pointer vary with the length, the
        # two words between them do not.
        middle = 1 + _POP[data[0]]
        last = middle + 5
        if data[middle:last] == _KA_MIDDLE and last < len(data):
            end = last + 1 + _POP[data[last]]
            header = data[:end]
            length = _KA_FORWARD_HEADERS.get(header)
            if length is None:
                length = _ka_forward_length(header)
            if length is not None:
                body_words = (length + 7) // 8
                rest = len(data) - end
                if rest == 0:
                    if body_words == 0:
                        return data, 0
                elif (
                    # The usual body: one verbatim run.
                    data[end] == 0xFF
                    and rest > 9
                    and data[end + 9] + 1 == body_words
                    and rest == 10 + 8 * data[end + 9]
                ) or (
                    4 + body_words <= default_max_words(len(data))
                    and _body_words(data, end) == body_words
                ):
                    return data, length
    payload = decode_ka_message(data)
    if payload is None:
        return None
    return encode_ka_message(payload), len(payload)


def _body_words(data: bytes, pos: int) -> int:
    try:
        return packed_words(data, pos)
    except ProtocolError:
        return -1  # decode_ka_message says what is wrong


def encode_channel_user(padding: bytes, user: bytes) -> bytes:
    """The packed ChannelMessage carrying ``user`` data after ``padding``."""
    padding_words = (len(padding) + 7) // 8
    user_words = (len(user) + 7) // 8
    header = HEADER_6.pack(
        (5 + padding_words + user_words) << 32,
        CHANNEL_ROOT,
        data_pointer(3, len(padding)),
        CHANNEL_CONTENT,
        CONTENT_USER,
        data_pointer(padding_words, len(user)),
    )
    packed_header = _packed_header(header)
    if _one_run(user) and (not padding or _one_run(padding)):
        padding_run = _run_pieces(padding) if padding else ()
        return b"".join((packed_header, *padding_run, *_run_pieces(user)))
    return pack_message(header, (padding, user), packed_header)


# Padding of each length 0..255, drawn once per process: only its length needs to change
# from message to message (the bytes are encrypted with the rest), so each length's packed
# body, and with the header words the whole packed start of a message, is made once.
_PADDINGS = tuple(os.urandom(length) for length in range(256))
_PADDED_PREFIXES: dict[tuple[int, int], bytes] = {}
_PADDED_PREFIXES_LIMIT = 8192


def encode_channel_user_padded(padding_length: int, user: bytes) -> bytes:
    """``encode_channel_user`` with this process's padding of ``padding_length`` (0..255)
    bytes; the same bytes as ``encode_channel_user(padding_of(padding_length), user)``."""
    length = len(user)
    if not _one_run(user):
        return encode_channel_user(_PADDINGS[padding_length], user)
    prefix = _PADDED_PREFIXES.get((padding_length, length))
    if prefix is None:
        prefix = _padded_prefix(padding_length, length)
        if prefix is None:
            return encode_channel_user(_PADDINGS[padding_length], user)
    return b"".join(
        (prefix, b"\xff", user[:8], _COUNT[(length + 7) // 8 - 1], user[8:], _PAD[-length % 8])
    )


def padding_of(padding_length: int) -> bytes:
    """The padding ``encode_channel_user_padded`` uses for this length."""
    return _PADDINGS[padding_length]


def _padded_prefix(padding_length: int, length: int) -> bytes | None:
    # The message for a user body of one verbatim run, less that run: encode a marker
    # body of the same length and cut its run off.
    marker = b"\x01" * length
    whole = encode_channel_user(_PADDINGS[padding_length], marker)
    run = b"".join(_run_pieces(marker))
    if not whole.endswith(run):
        return None
    prefix = whole[: len(whole) - len(run)]
    if len(_PADDED_PREFIXES) >= _PADDED_PREFIXES_LIMIT:
        _PADDED_PREFIXES.clear()
    _PADDED_PREFIXES[(padding_length, length)] = prefix
    return prefix


# Packed ChannelMessage headers (the 6 words of our layout, as packed) seen, and the padding
# and user lengths they announce; a header missing from the map is checked once.
_CHANNEL_HEADERS: dict[bytes, tuple[int, int]] = {}
_CHANNEL_HEADERS_LIMIT = 4096
_CHANNEL_ROOT_PACKED = pack(U64.pack(CHANNEL_ROOT))
_CHANNEL_MIDDLE = pack(HEADER_6.pack(0, 0, 0, CHANNEL_CONTENT, CONTENT_USER, 0))[2:7]


def _channel_header_lengths(header: bytes) -> tuple[int, int] | None:
    try:
        words = unpack(header)
        if len(words) != 48:
            return None
        _, _, _, padding, _, _, user = _CHANNEL_FIXED.unpack(words)
    except (ProtocolError, struct.error):
        return None
    padding_length, user_length = padding >> 35, user >> 35
    padding_words = (padding_length + 7) // 8
    expected = HEADER_6.pack(
        (5 + padding_words + (user_length + 7) // 8) << 32,
        CHANNEL_ROOT,
        data_pointer(3, padding_length),
        CHANNEL_CONTENT,
        CONTENT_USER,
        data_pointer(padding_words, user_length),
    )
    if _packed_header(expected) != header:
        return None
    if len(_CHANNEL_HEADERS) >= _CHANNEL_HEADERS_LIMIT:
        _CHANNEL_HEADERS.clear()
    lengths = _CHANNEL_HEADERS[header] = (padding_length, user_length)
    return lengths


def _channel_user_at(data: bytes) -> tuple[int, int, int] | None:
    """For a packed ChannelMessage in our layout (``len(data) > 16``): where its packed
    user words start, the user data's length and the unpacking steps taken before them,
    the header words compared with ours for the lengths they give and the padding skipped
    by its run structure. None when the message is anything else."""
    # Header: segment table, root, padding pointer, content pointer, tag, user pointer.
    at = 1 + _POP[data[0]]
    if data[at : at + 2] != _CHANNEL_ROOT_PACKED:
        return None
    at += 3 + _POP[data[at + 2]]
    if data[at : at + 5] != _CHANNEL_MIDDLE or at + 5 >= len(data):
        return None
    end = at + 6 + _POP[data[at + 5]]
    header = data[:end]
    lengths = _CHANNEL_HEADERS.get(header)
    if lengths is None:
        lengths = _channel_header_lengths(header)
        if lengths is None:
            return None
    padding_length, user_length = lengths
    user_words = (user_length + 7) // 8
    if 6 + (padding_length + 7) // 8 + user_words > default_max_words(len(data)):
        return None  # too large to unpack: the general path refuses it
    steps = 6  # the header's
    if padding_length:
        end, taken = skip_packed_words(data, end, (padding_length + 7) // 8)
        if end < 0:
            return None
        steps += taken
    return end, user_length, steps


def _user_from_packed(data: bytes) -> bytes | None:
    """The user data of a packed ChannelMessage in our layout, read from the packed bytes:
    the user body sliced out of its verbatim run (or unpacked alone). None when the message
    is anything else (the general path then decides)."""
    found = _channel_user_at(data)
    if found is None:
        return None
    end, user_length, steps = found
    user_words = (user_length + 7) // 8
    if user_words == 0:
        return b"" if end == len(data) else None
    rest = len(data) - end
    if rest > 9 and data[end] == 0xFF and rest == 10 + 8 * data[end + 9]:
        # One verbatim run: its first word, then its count, then the other words.
        if data[end + 9] + 1 != user_words:
            return None
        if user_length <= 8:
            return data[end + 1 : end + 1 + user_length]
        return data[end + 1 : end + 9] + data[end + 10 : end + 2 + user_length]
    try:
        # Within what the whole message may take to unpack, less what came before.
        words = unpack_bytearray(data, MAX_STEPS + len(data) // MAX_STEP_BYTES - steps, end)
    except ProtocolError:
        return None
    if len(words) != 8 * user_words:
        return None
    return bytes(words[:user_length])


# Forwarding a large message (the relay's tunnels): the ChannelMessage's user data is a
# packed KaMessage, and the ChannelMessage packs those bytes in turn. When both are in our
# layout, the packed user words are carried into the outgoing ChannelMessage as they came
# (packed words concatenate, so only its header and padding are new); the KaMessage inside
# is checked on an unpacked copy of the user data, which is then dropped.
# Smaller user data (one verbatim run) is sliced out instead, which costs less.
CARRY_MIN = _ONE_RUN + 1
# (user data length, its packed words, the KaMessage's payload length)
_Carried = tuple[int, memoryview, int]
# A tunnel message as the relay forwards it (``Connection.send_packed``): a packed KaMessage,
# or large user data as (its length, the packed words it came in).
Forwarded = bytes | tuple[int, memoryview]


def forward_channel_user(data: bytes) -> _Carried | None:
    """For a ChannelMessage whose user data the relay forwards: ``(user data length, its
    packed words, the KaMessage's payload length)`` when the message is in our layout, its
    user data is larger than one verbatim run and is a KaMessage ``message`` that
    ``forward_ka_message`` would send on as it came, and its last word's bytes beyond the
    user data are zero. Then ``channel_user_prefix(padding, length) + words`` is the
    ChannelMessage ``encode_channel_user(padding, user data)`` would write, packed as the
    sender packed it. None for anything else (then ``decode_channel_message`` and
    ``forward_ka_message`` decide), and this accepts nothing that they would refuse."""
    if type(data) is not bytes or len(data) <= 16:
        return None
    found = _channel_user_at(data)
    if found is None or found[1] < CARRY_MIN:
        return None
    return _carried(data, *found)


def _carried(data: bytes, start: int, length: int, steps: int) -> _Carried | None:
    # forward_channel_user, after the ChannelMessage's header and padding.
    words = (length + 7) // 8
    try:
        # As _user_from_packed unpacks them, to check them only (the packed words are
        # what goes on): a stretch of full runs is copied and two strided deletions.
        user = unpack_bytearray(data, MAX_STEPS + len(data) // MAX_STEP_BYTES - steps, start)
    except ProtocolError:
        return None
    if len(user) != 8 * words or any(user[length:]):
        return None
    # The KaMessage inside, as forward_ka_message checks it: its header (at most 23 bytes)
    # exactly ours for its length, its body's packed items as many words as that length.
    middle = 1 + _POP[user[0]]
    last = middle + 5
    if user[middle:last] != _KA_MIDDLE:
        return None
    header = bytes(user[: last + 1 + _POP[user[last]]])
    payload_length = _KA_FORWARD_HEADERS.get(header)
    if payload_length is None:
        payload_length = _ka_forward_length(header)
        if payload_length is None:
            return None
    body_words = (payload_length + 7) // 8
    if 4 + body_words > default_max_words(length):
        return None
    try:
        if packed_words(user, len(header), length) != body_words:
            return None
    except ProtocolError:
        return None
    return length, memoryview(data)[start:], payload_length


def forward_channel_message(data: bytes) -> tuple[Forwarded | None, int] | None:
    """The relay's tunnel path for a decrypted ChannelMessage in our layout carrying user
    data: ``(what send_packed takes, payload length)``, with None and 0 for a keepalive;
    large user data as ``forward_channel_user`` carries it, smaller as ``forward_ka_message``
    forwards it (raising what it raises). None when the message is anything else (a Rekey,
    another layout): ``decode_channel_message`` then reads it.

    The usual small message (padding and user data each one verbatim run, the KaMessage's
    body one run) is read here without another call: the same steps as
    ``_channel_user_at``, ``_user_from_packed`` and ``forward_ka_message``, one after the
    other."""
    if type(data) is not bytes or len(data) <= 16:
        return None
    pop = _POP
    size = len(data)
    # The ChannelMessage's header words, as _channel_user_at reads them.
    at = 1 + pop[data[0]]
    if data[at : at + 2] != _CHANNEL_ROOT_PACKED:
        return None
    at += 3 + pop[data[at + 2]]
    if data[at : at + 5] != _CHANNEL_MIDDLE or at + 5 >= size:
        return None
    end = at + 6 + pop[data[at + 5]]
    lengths = _CHANNEL_HEADERS.get(data[:end])
    if lengths is None:
        return _forward_channel_general(data)
    padding_length, length = lengths
    padding_words = (padding_length + 7) // 8
    words = (length + 7) // 8
    if not 0 < length < CARRY_MIN or 6 + padding_words + words > MAX_EXPANSION_WORDS:
        return _forward_channel_general(data)
    if padding_words:
        # The padding: one verbatim run, else skipped by the general walk.
        if end + 9 < size and data[end] == 0xFF and data[end + 9] + 1 == padding_words:
            end += 2 + 8 * padding_words
        else:
            return _forward_channel_general(data)
    # The user data: one verbatim run.
    rest = size - end
    if not (rest > 9 and data[end] == 0xFF and rest == 10 + 8 * data[end + 9]):
        return _forward_channel_general(data)
    if data[end + 9] + 1 != words:
        return None
    if length <= 8:
        user = data[end + 1 : end + 1 + length]
    else:
        user = data[end + 1 : end + 9] + data[end + 10 : end + 2 + length]
    # The KaMessage, as forward_ka_message's first test (a body of one run).
    middle = 1 + pop[user[0]]
    last = middle + 5
    if user[middle:last] == _KA_MIDDLE and last < length:
        header_end = last + 1 + pop[user[last]]
        payload_length = _KA_FORWARD_HEADERS.get(user[:header_end])
        if payload_length is not None:
            rest = length - header_end
            if (
                rest > 9
                and user[header_end] == 0xFF
                and user[header_end + 9] + 1 == (payload_length + 7) // 8
                and rest == 10 + 8 * user[header_end + 9]
            ):
                return user, payload_length
    forwarded = forward_ka_message(user)
    return (None, 0) if forwarded is None else forwarded


def _forward_channel_general(data: bytes) -> tuple[Forwarded | None, int] | None:
    # forward_channel_message through the general helpers.
    found = _channel_user_at(data)
    if found is None:
        return None
    end, length, steps = found
    if length >= CARRY_MIN:
        carried = _carried(data, end, length, steps)
        if carried is None:
            return None
        return carried[:2], carried[2]
    user = _user_from_packed(data)
    if user is None:
        return None
    forwarded = forward_ka_message(user)
    return (None, 0) if forwarded is None else forwarded


def channel_user_prefix(padding: bytes, user_length: int) -> bytes:
    """The packed start of ``encode_channel_user(padding, user)`` for user data of
    ``user_length`` bytes: its header words and padding, all of it but the user words."""
    padding_words = (len(padding) + 7) // 8
    header = HEADER_6.pack(
        (5 + padding_words + (user_length + 7) // 8) << 32,
        CHANNEL_ROOT,
        data_pointer(3, len(padding)),
        CHANNEL_CONTENT,
        CONTENT_USER,
        data_pointer(padding_words, user_length),
    )
    return pack_message(header, (padding, b""), _packed_header(header))


_CARRIED_PREFIXES: dict[tuple[int, int], bytes] = {}


def channel_user_prefix_padded(padding_length: int, user_length: int) -> bytes:
    """``channel_user_prefix`` with this process's padding of ``padding_length`` bytes (as
    ``encode_channel_user_padded`` uses), made once per pair of lengths."""
    key = (padding_length, user_length)
    prefix = _CARRIED_PREFIXES.get(key)
    if prefix is None:
        prefix = channel_user_prefix(_PADDINGS[padding_length], user_length)
        if len(_CARRIED_PREFIXES) >= _PADDED_PREFIXES_LIMIT:
            _CARRIED_PREFIXES.clear()
        _CARRIED_PREFIXES[key] = prefix
    return prefix


# The original's layout of a user ChannelMessage: its builder allocates the root struct, the
# padding, the content struct and the user data in that order, in segments of 1,024 words
# first: an object that does not fit goes behind a far pointer, to a landing pad at the
# start of a new segment (or after the padding in its segment). The segments are packed
# whole, so the padding body may come before the content struct, after the user data, or
# between. Every word but the bodies packs as one item of its own; those words are read one
# by one, the padding skipped by its run structure and the user body sliced out of it.
_DATA_LOW = 1 | (2 << 32)  # a Data pointer's kind and element size, offset 0
_LANDING_1, _LANDING_2 = far_pointer(1, 0), far_pointer(2, 0)
_CONTENT_HERE = struct_pointer(0, 1, 1)
_ITEM_WORDS: dict[bytes, int] = {}
_ITEM_WORDS_LIMIT = 8192


class _Walk:
    """A cursor over packed bytes taking items one by one, counting its steps."""

    __slots__ = ("data", "pos", "steps")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.steps = 0

    def word(self) -> int:
        """The next word when it is packed as one tagged item, else -1."""
        data = self.data
        pos = self.pos
        if pos >= len(data):
            return -1
        tag = data[pos]
        end = pos + 1 + _POP[tag]
        if tag == 0 or tag == 0xFF or end > len(data):
            return -1
        item = data[pos:end]
        word = _ITEM_WORDS.get(item)
        if word is None:
            word = U64.unpack(unpack(item))[0]
            if len(_ITEM_WORDS) >= _ITEM_WORDS_LIMIT:
                _ITEM_WORDS.clear()
            _ITEM_WORDS[item] = word
        self.pos = end
        self.steps += 1
        return word

    def skip(self, words: int) -> int:
        """Where the packed items of the next ``words`` words start, then skips them; -1
        when they do not end there."""
        start = self.pos
        if words:
            end, taken = skip_packed_words(self.data, start, words)
            if end < 0:
                return -1
            self.pos = end
            self.steps += taken
        return start

    def body(self, length: int) -> bytes | None:
        """The next Data body of ``length`` bytes: sliced out of one verbatim run, else its
        items unpacked alone."""
        data = self.data
        start = self.pos
        words = (length + 7) // 8
        if not words:
            return b""
        if data[start : start + 1] == b"\xff" and start + 9 < len(data):
            end = start + 10 + 8 * data[start + 9]
            if data[start + 9] + 1 == words and end <= len(data):
                self.pos = end
                self.steps += 1
                if length <= 8:
                    return data[start + 1 : start + 1 + length]
                return data[start + 1 : start + 9] + data[start + 10 : start + 2 + length]
        if self.skip(words) < 0:
            return None
        try:
            return unpack(data[start : self.pos])[:length]
        except ProtocolError:
            return None


def _data_length(word: int) -> int:
    # The length of the Data a pointer word at a body's start gives, else -1.
    return word >> 35 if word & 0xFFFFFFFF_FFFFFFFF >> 29 == _DATA_LOW else -1


def decode_channel_original(data: bytes) -> bytes | None:
    """The user data of a packed ChannelMessage in the original's layout (one, two or
    three segments; see above), read from the packed bytes, within the word and step
    bounds of the general reader. None when the message is anything else (the general
    path then decides), and this accepts nothing that it would refuse."""
    if type(data) is not bytes or len(data) <= 16:
        return None
    walk = _Walk(data)
    table = walk.word()
    segments = (table & 0xFFFFFFFF) + 1
    if table < 0 or segments > 3:
        return None
    sizes = [table >> 32]
    if segments > 1:
        more = walk.word()
        if more < 0 or (segments == 2 and more >> 32):
            return None
        sizes += [more & 0xFFFFFFFF, more >> 32][: segments - 1]
    if walk.word() != CHANNEL_ROOT:
        return None
    padding = walk.word()
    content = walk.word()
    layout: list[int] = []  # the words of each segment, as read
    if padding & 0xFFFFFFFF == 5 and (padding >> 32) & 7 == 2:
        # The padding in the first segment, the content struct after it.
        padding_length = padding >> 35
        padding_words = (padding_length + 7) // 8
        if content != struct_pointer(padding_words, 1, 1) or walk.skip(padding_words) < 0:
            return None
        if walk.word() != 1:
            return None
        user = walk.word()
        user_length = _data_length(user)
        if user_length >= 0:
            layout = [5 + padding_words + (user_length + 7) // 8]
        elif user == _LANDING_1:
            user_length = _data_length(walk.word())
            if user_length < 0:
                return None
            layout = [5 + padding_words, 1 + (user_length + 7) // 8]
        else:
            return None
        found = walk.body(user_length)
    elif padding == _LANDING_1 and content == _CONTENT_HERE and walk.word() == 1:
        # The padding at the start of the second segment.
        user = walk.word()
        user_length = _data_length(user)
        found = None
        if user_length >= 0:
            # The user data in the first segment.
            found = walk.body(user_length)
            padding_length = _data_length(walk.word())
            padding_words = (padding_length + 7) // 8
            if found is None or padding_length < 0 or walk.skip(padding_words) < 0:
                return None
            layout = [5 + (user_length + 7) // 8, 1 + padding_words]
        elif user == _LANDING_2 or user & 0xFFFFFFFF_00000007 == far_pointer(1, 0):
            padding_length = _data_length(walk.word())
            padding_words = (padding_length + 7) // 8
            if padding_length < 0 or walk.skip(padding_words) < 0:
                return None
            user_length = _data_length(walk.word())
            if user_length < 0:
                return None
            user_words = (user_length + 7) // 8
            if user == _LANDING_2:
                layout = [5, 1 + padding_words, 1 + user_words]
            elif user == far_pointer(1, 1 + padding_words):
                layout = [5, 2 + padding_words + user_words]  # after the padding
            else:
                return None
            found = walk.body(user_length)
        else:
            return None
    else:
        return None
    if (
        found is None
        or walk.pos != len(data)
        or sizes != layout
        or len(layout) + 1 + sum(layout) > default_max_words(len(data))
        or walk.steps > MAX_STEPS + len(data) // MAX_STEP_BYTES
    ):
        return None
    return found


def decode_channel_message(data: bytes) -> bytes | Rekey:
    """The user data of a packed ChannelMessage, or its Rekey (the padding is ignored)."""
    if type(data) is bytes and len(data) > 16:
        user = _user_from_packed(data)
        if user is not None:
            return user
        user = decode_channel_original(data)
        if user is not None:
            return user
        rekey = decode_channel_rekey(data)
        if rekey is not None:
            return rekey
    return decode_channel_message_unpacked(data)


def decode_channel_message_unpacked(data: bytes) -> bytes | Rekey:
    """``decode_channel_message`` by unpacking the whole message first (any layout)."""
    words = unpacked_words(data)
    if len(words) >= 48:
        segments, size, root, _, content, tag, pointer = _CHANNEL_FIXED.unpack_from(words)
        if (
            segments == 0
            and size * 8 + 8 == len(words)
            and root == CHANNEL_ROOT
            and content == CHANNEL_CONTENT
            and tag & 0xFFFF == CONTENT_USER
            and pointer & 3 == LIST_KIND
            and (pointer >> 32) & 7 == 2
            and not pointer & 0x80000000
        ):
            # Like the reference reader, the padding (never read) is not checked.
            start = 48 + (pointer & 0xFFFFFFFF) // 4 * 8
            end = start + (pointer >> 35)
            if end <= len(words):
                return bytes(words[start:end])
    return read_channel_message(words)


# ---- Rekey ------------------------------------------------------------------------------
#
# A ChannelMessage carrying a Rekey, once an hour or so per connection: the header words
# depend only on the padding length, the two BufferN values are spliced in as the handshake
# layouts splice theirs. Two layouts are read from the packed bytes: ours (every struct, then
# the padding body) and the original's (the padding body right after the root struct: its
# builder writes the fields in order). Anything else goes through the general reader.

# The Rekey's pointer (to the struct right after ChannelContent's) and a wrapper's pointer
# to its Buffer256 (right after it).
REKEY_POINTER = struct_pointer(0, 0, 2)
BUFFER256_POINTER = struct_pointer(0, 4, 0)
# Packed words our Rekey ChannelMessage has between the padding pointer and the key: the
# content pointer, the union tag (rekey, zero), the Rekey pointer, the two wrapper pointers
# and the key's Buffer256 pointer. The original's has the same from the union tag on.
_REKEY_POINTERS = HEADER_6.pack(
    CHANNEL_CONTENT,
    CONTENT_REKEY,
    REKEY_POINTER,
    struct_pointer(1, 0, 1),
    struct_pointer(5, 0, 1),
    BUFFER256_POINTER,
)
_REKEY_MIDDLE = pack(_REKEY_POINTERS)
_REKEY_TAIL = pack(_REKEY_POINTERS[8:])
_BUFFER256_PACKED = pack(U64.pack(BUFFER256_POINTER))
# Both layouts have 16 words of structs after the root pointer: the root struct's 2, then
# 14 from ChannelContent on (after the padding body, in the original's).
_REKEY_STRUCT_WORDS = 16
_OURS, _ORIGINAL = 15, 1  # the padding pointer's offset in each layout
# A padding of at most this many words leaves the whole message far inside the bounds of
# the general reader (words and unpacking steps); a larger one goes through it.
_REKEY_PADDING_WORDS = 256
# The packed header words of our layout up to the key, per padding length (0..255).
_REKEY_PREFIXES: list[bytes | None] = [None] * 256
# Packed segment table, root and padding pointer words seen: (padding length, layout, the
# packed words that must follow them).
_REKEY_HEADERS: dict[bytes, tuple[int, int, bytes]] = {}
_REKEY_HEADERS_LIMIT = 4096


def _rekey_words(padding_length: int, layout: int) -> bytes:
    # The segment table, the root pointer and the padding pointer of a Rekey ChannelMessage.
    padding_words = (padding_length + 7) // 8
    return struct.pack(
        "<3Q",
        (1 + _REKEY_STRUCT_WORDS + padding_words) << 32,
        CHANNEL_ROOT,
        data_pointer(layout, padding_length),
    )


def _rekey_prefix(padding_length: int) -> bytes:
    prefix = _REKEY_PREFIXES[padding_length]
    if prefix is None:
        prefix = _REKEY_PREFIXES[padding_length] = (
            pack(_rekey_words(padding_length, _OURS)) + _REKEY_MIDDLE
        )
    return prefix


def _packed_buffer256(value: bytes) -> bytes:
    # A Buffer256 between words that pack on their own: one verbatim run when it has no
    # zero byte, else packed as the reference packer packs those four words.
    stored = WORDS_LE[32].pack(*WORDS_BE[32].unpack(value))
    if 0 in stored:
        return pack(stored)
    return b"".join((b"\xff", stored[:8], b"\x03", stored[8:]))


def encode_channel_rekey_fast(padding: bytes, rekey: Rekey) -> bytes:
    """``encode_channel_rekey(padding, rekey)``: the header words made once per padding
    length (0..255), the key and salt spliced in; any other padding by the general encoder."""
    if type(padding) is not bytes or len(padding) > 255 or type(rekey) is not Rekey:
        return encode_channel_rekey(padding, rekey)
    header = b"".join(
        (
            _rekey_prefix(len(padding)),
            _packed_buffer256(rekey.dh_public_key),
            _BUFFER256_PACKED,
            _packed_buffer256(rekey.key_salt),
        )
    )
    if not padding:
        return header
    if _one_run(padding):
        return b"".join((header, *_run_pieces(padding)))
    return pack_message(b"", (padding,), header)


def _rekey_header(key: bytes) -> tuple[int, int, bytes] | None:
    # What decode_channel_rekey needs of packed header words it has not seen before, if they
    # are exactly those of one of the two layouts.
    try:
        words = unpack(key)
    except ProtocolError:
        return None
    if len(words) != 24:
        return None
    padding_length = U64.unpack_from(words, 16)[0] >> 35
    padding_words = (padding_length + 7) // 8
    if padding_words > _REKEY_PADDING_WORDS:
        return None
    for layout in (_OURS, _ORIGINAL):
        if pack(_rekey_words(padding_length, layout)) == key:
            break
    else:
        return None
    if layout == _OURS:
        follows = _REKEY_MIDDLE
    else:
        follows = pack(U64.pack(struct_pointer(padding_words, 1, 1)))
    if len(_REKEY_HEADERS) >= _REKEY_HEADERS_LIMIT:
        _REKEY_HEADERS.clear()
    found = _REKEY_HEADERS[key] = (padding_length, layout, follows)
    return found


def _buffer256_at(data: bytes, pos: int) -> tuple[bytes, int] | None:
    # The Buffer256 whose packed words start at ``pos`` and where they end, when they end
    # at a word boundary: sliced out of one verbatim run, else its words unpacked alone.
    if data[pos : pos + 1] == b"\xff" and data[pos + 9 : pos + 10] == b"\x03":
        end = pos + 34
        if end > len(data):
            return None
        stored = data[pos + 1 : pos + 9] + data[pos + 10 : end]
    else:
        end, _ = skip_packed_words(data, pos, 4)
        if end < 0:
            return None
        try:
            stored = unpack(data[pos:end])
        except ProtocolError:
            return None
    return WORDS_BE[32].pack(*WORDS_LE[32].unpack(stored)), end


def decode_channel_rekey(data: bytes) -> Rekey | None:
    """The Rekey of a packed ChannelMessage in our layout or the original's (one segment,
    its padding at most 256 words), read from the packed bytes: the header and pointer words
    compared with those layouts', the key and salt sliced out of their runs, the padding
    skipped by its run structure. None when the message is anything else (the general path
    then decides), and this accepts nothing that it would refuse."""
    if type(data) is not bytes or len(data) <= 16:
        return None
    # Segment table, root pointer, padding pointer: each a word on its own.
    at = 1 + _POP[data[0]]
    if data[at : at + 2] != _CHANNEL_ROOT_PACKED or at + 2 >= len(data):
        return None
    end = at + 3 + _POP[data[at + 2]]
    key = data[:end]
    found = _REKEY_HEADERS.get(key)
    if found is None:
        found = _rekey_header(key)
        if found is None:
            return None
    padding_length, layout, follows = found
    padding_words = (padding_length + 7) // 8
    if not data.startswith(follows, end):
        return None
    pos = end + len(follows)
    if layout == _ORIGINAL:
        # The padding, then the union tag's zero word (not run together with zero words
        # ending the padding) and the pointers up to the key.
        if padding_words:
            pos, _ = skip_packed_words(data, pos, padding_words)
            if pos < 0:
                return None
        if not data.startswith(_REKEY_TAIL, pos):
            return None
        pos += len(_REKEY_TAIL)
    dh = _buffer256_at(data, pos)
    if dh is None or not data.startswith(_BUFFER256_PACKED, dh[1]):
        return None
    salt = _buffer256_at(data, dh[1] + len(_BUFFER256_PACKED))
    if salt is None:
        return None
    pos = salt[1]
    if layout == _OURS and padding_words:
        pos, _ = skip_packed_words(data, pos, padding_words)
        if pos < 0:
            return None
    if pos != len(data):
        return None
    return Rekey(dh[0], salt[0])


# ---- the pairs: each specialised codec and the general one it must agree with -------------


def _forward_ka_reference(data: bytes) -> tuple[bytes, int] | None:
    # What forwarding a KaMessage means: its payload (through the general reader) and length.
    payload = decode_ka_message_general(data)
    return None if payload is None else (payload, len(payload))


def _forwarded_ka_view(result: tuple[bytes, int] | None) -> tuple[bytes | None, int] | None:
    # ``forward_ka_message``'s result as the general reader reads what it forwards.
    if result is None:
        return None
    packed, length = result
    return decode_ka_message_general(packed), length


def _forwarded_user(item: Forwarded) -> bytes:
    # The KaMessage a ``Forwarded`` item is: the packed bytes, or carried user words under
    # a header of ours (read back by the general reader).
    if type(item) is tuple:
        length, words = item
        user = decode_channel_message_general(channel_user_prefix(b"", length) + bytes(words))
        if not isinstance(user, bytes):
            raise AssertionError("carried words read back as a Rekey")
        return user
    assert isinstance(item, bytes)
    return item


def _forward_channel_reference(data: bytes) -> tuple[bytes | None, int] | None:
    # What forwarding a ChannelMessage means: the payload of the KaMessage in its user data
    # (None and 0 for a keepalive); a Rekey is not forwarded.
    content = decode_channel_message_general(data)
    if isinstance(content, Rekey):
        return None
    return _forward_ka_reference(content) or (None, 0)


def _forwarded_channel_view(
    result: tuple[Forwarded | None, int] | None,
) -> tuple[bytes | None, int] | None:
    if result is None:
        return None
    item, length = result
    if item is None:
        return None, length
    return decode_ka_message_general(_forwarded_user(item)), length


def _carried_reference(data: bytes) -> tuple[bytes, int] | None:
    # What carrying a ChannelMessage's user data means: that user data, a KaMessage with
    # a payload of the given length.
    content = decode_channel_message_general(data)
    if isinstance(content, Rekey):
        return None
    payload = decode_ka_message_general(content)
    return None if payload is None else (content, len(payload))


def _carried_view(result: _Carried | None) -> tuple[bytes, int] | None:
    if result is None:
        return None
    length, words, payload_length = result
    return _forwarded_user((length, words)), payload_length


def _padded_reference(padding_length: int, user: bytes) -> bytes:
    return encode_channel_user(padding_of(padding_length), user)


def _prefix_padded_reference(padding_length: int, user_length: int) -> bytes:
    return channel_user_prefix(padding_of(padding_length), user_length)


class Equivalence(NamedTuple):
    """A specialised codec and the general codec it must agree with.

    Both take the same arguments, drawn as ``takes`` says: packed bytes of a message
    (``"KaMessage"``, ``"ChannelMessage"``, ``"ExchangeRandNonce"``, ``"ExchangeDh"``,
    ``"InitConnection"``; valid, re-packed or damaged), or the values an encoder takes.
    ``view(fast(...))`` must equal ``reference(...)``, a ``ProtocolError`` from one
    standing for one from the other; with ``declines``, ``fast`` may also return None
    (leaving the message to the general path) where ``reference`` gives anything.
    """

    name: str
    fast: Callable[..., object]
    reference: Callable[..., object]
    takes: str
    view: Callable[[Any], object] | None = None
    declines: bool = False

    def disagreement(self, *args: Any) -> str | None:
        """How the pair disagrees on ``args``, or None when it agrees. ``fast`` is called
        twice: what it learnt the first time (header words seen, prefixes made) must not
        change its answer."""
        expected = _outcome(self.reference, args, None)
        got = _outcome(self.fast, args, self.view)
        again = _outcome(self.fast, args, self.view)
        if again != got:
            return f"{self.name}: {got!r} the first time, {again!r} the second"
        if self.declines and got is None:
            return None  # left to the general path
        if self.view is not None and _refused(expected):
            # What is forwarded is refused as a whole: the general path says why.
            return None if _refused(got) else f"{self.name}: {got!r} where refused"
        return None if got == expected else f"{self.name}: {got!r}, expected {expected!r}"


def _outcome(function: Callable[..., object], args: tuple[Any, ...], view: Any) -> object:
    try:
        result = function(*args)
    except ProtocolError as exc:
        return ("refused", str(exc))
    if view is None:
        return result
    try:
        return view(result)
    except ProtocolError as exc:
        return ("gave what the general reader refuses", str(exc))


def _refused(outcome: object) -> bool:
    return isinstance(outcome, tuple) and outcome[:1] == ("refused",)


EQUIVALENCES: tuple[Equivalence, ...] = (
    Equivalence(
        "decode_rand_nonce", decode_rand_nonce, ExchangeRandNonce.decode, "ExchangeRandNonce"
    ),
    Equivalence("decode_dh", decode_dh, ExchangeDh.decode, "ExchangeDh"),
    Equivalence(
        "encode_rand_nonce",
        encode_rand_nonce,
        ExchangeRandNonce.encode,
        "ExchangeRandNonce value",
    ),
    Equivalence("encode_dh", encode_dh, ExchangeDh.encode, "ExchangeDh value"),
    Equivalence(
        "decode_init_connection",
        decode_init_connection,
        decode_init_connection_general,
        "InitConnection",
    ),
    Equivalence("decode_ka_message", decode_ka_message, decode_ka_message_general, "KaMessage"),
    Equivalence(
        "forward_ka_message",
        forward_ka_message,
        _forward_ka_reference,
        "KaMessage",
        view=_forwarded_ka_view,
    ),
    Equivalence(
        "decode_channel_message",
        decode_channel_message,
        decode_channel_message_general,
        "ChannelMessage",
    ),
    Equivalence(
        "decode_channel_message_unpacked",
        decode_channel_message_unpacked,
        decode_channel_message_general,
        "ChannelMessage",
    ),
    Equivalence(
        "decode_channel_original",
        decode_channel_original,
        decode_channel_message_general,
        "ChannelMessage",
        declines=True,
    ),
    Equivalence(
        "decode_channel_rekey",
        decode_channel_rekey,
        decode_channel_message_general,
        "ChannelMessage",
        declines=True,
    ),
    Equivalence(
        "encode_channel_rekey_fast",
        encode_channel_rekey_fast,
        encode_channel_rekey,
        "padding, Rekey",
    ),
    Equivalence(
        "forward_channel_message",
        forward_channel_message,
        _forward_channel_reference,
        "ChannelMessage",
        view=_forwarded_channel_view,
        declines=True,
    ),
    Equivalence(
        "forward_channel_user",
        forward_channel_user,
        _carried_reference,
        "ChannelMessage",
        view=_carried_view,
        declines=True,
    ),
    Equivalence(
        "encode_channel_user_padded",
        encode_channel_user_padded,
        _padded_reference,
        "padding length, user data",
    ),
    Equivalence(
        "channel_user_prefix_padded",
        channel_user_prefix_padded,
        _prefix_padded_reference,
        "padding length, user data length",
    ),
)
"""Every specialised codec of this module with its general twin (tests/unit/test_fastpath.py)."""
