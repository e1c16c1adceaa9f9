"""Packed Cap'n Proto (docs/protocol.md section 8): stream framing, packing, pointers.

This is the schema-free half of the codec; ``messages.py`` lays our fixed structs out with it.

- ``pack`` / ``pack_message`` / ``unpack``: the packing scheme. Each word is a tag byte
  saying which of its bytes are non-zero, then those bytes; tag 0x00 is followed by a count
  of further zero words, tag 0xff by the 8 bytes and a count of words copied verbatim.
- ``MessageBuilder``: a one-segment message, structs first and ``Data`` bodies after them.
- ``read_message`` / ``StructReader``: a bounds-checked reader of any valid encoding:
  several segments, far pointers with single or double landing pads, objects in any order,
  structs larger or smaller than the schema expects.

``Data`` bodies are never looped over byte by byte or word by word: they are packed as
verbatim runs and unpacked by slicing. Every decoding failure raises ``ProtocolError`` with a
one-line message, and nothing else.
"""

from __future__ import annotations

import re
import struct
from operator import itemgetter

from ..errors import ProtocolError

WORD = 8

# Pointer kinds (the low two bits of a pointer word).
STRUCT = 0
LIST = 1
FAR = 2

# List element size code of Data and List(UInt8).
BYTE_ELEMENTS = 2

# Reader limits. Zero runs let 2 bytes of packed input stand for 2 KiB of message, and a
# word of one non-zero byte costs 2 bytes for 8, so the unpacked size is capped on its own:
# at most 8 MiB, and by default at most the packed size plus MAX_EXPANSION_WORDS (64 KiB).
# Real messages come nowhere near: their Data is ciphertext or random padding, which
# packing does not shrink, and their few struct words fit the 64 KiB many times over. So
# a frame costs the reader about what its own size costs, never several times more.
MAX_SEGMENTS = 512
MAX_MESSAGE_WORDS = 1 << 20
MAX_EXPANSION_WORDS = 8192
MAX_DEPTH = 64
# Objects may legally overlap, so a message could make a reader visit the same words over
# and over; a budget proportional to the message bounds the work (as the C++ reader does).
TRAVERSAL_FACTOR = 8

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_U64_PAIR = struct.Struct("<QQ")

# ---- packing -----------------------------------------------------------------------------

# Maps every byte to 1 if it is non-zero, so that one translate() gives the tag bits.
_NONZERO = bytes([0]) + bytes([1]) * 255
# Multiplying the 0/1 bytes of a word (read little-endian) by this gathers byte i's bit into
# bit 56 + i: the partial products never collide and those below bit 56 cannot carry into it.
_GATHER = 0x0102040810204080
_NONZERO_BYTE = re.compile(b"[^\x00]")

_ZERO_WORD = bytes(WORD)
_ZEROS = tuple(bytes(WORD * n) for n in range(257))
_COUNT = tuple(bytes([n]) for n in range(256))
_ZERO_RUNS = tuple(b"\x00" + bytes([n]) for n in range(256))
_POPCOUNT = tuple(bin(tag).count("1") for tag in range(256))

# A verbatim run: the 0xff-tagged word and at most 255 more.
_RUN_WORDS = 256
_RUN_BYTES = _RUN_WORDS * WORD
# A full run as packed: tag, word, count, 255 words.
_FULL_RUN_PACKED = 2 + _RUN_BYTES
# How many words holding a zero byte _pack_body packs one by one, looking for a word to
# start a run with, before it starts one anyway: this keeps zero-heavy bodies sliced too.
_MAX_LEADER_SKIPS = 8


def _scatter_getter(tag: int) -> itemgetter[tuple[int, ...]]:
    # Index k of the source is the k-th present byte; index popcount(tag) is a zero byte
    # appended by the caller, used for every absent byte. Always 8 indices, so the getter
    # returns a tuple even for tags with a single bit.
    present = 0
    indices = []
    for bit in range(8):
        if tag >> bit & 1:
            indices.append(present)
            present += 1
        else:
            indices.append(_POPCOUNT[tag])
    return itemgetter(*indices)


_SCATTER = tuple(_scatter_getter(tag) for tag in range(256))
# The byte positions a tag says are present, in order.
_BITS = tuple(tuple(bit for bit in range(8) if tag >> bit & 1) for tag in range(256))

# Packed words seen recently (tag and present bytes) and what they unpack to: the struct
# words of the messages on the hot path repeat, and a lookup is cheaper than a scatter.
_UNPACKED_WORDS: dict[bytes, bytes] = {}
_UNPACKED_WORDS_LIMIT = 4096


def _tags(data: bytes) -> bytes:
    """The tag of every word of ``data``, computed for all of them at once.

    The gathering product works across a whole big integer: the partial products of one
    word never reach another word's tag byte, and never carry into it.
    """
    length = len(data)
    product = int.from_bytes(data.translate(_NONZERO), "little") * _GATHER
    return product.to_bytes(length + WORD, "little")[WORD - 1 : length : WORD]


def pack(data: bytes) -> bytes:
    """Pack a whole number of words the way the reference implementation does."""
    length = len(data)
    if length % WORD:
        raise ValueError("packing needs a whole number of 8-byte words")
    tags = _tags(data)
    out: list[bytes] = []
    append = out.append
    if 0 not in tags and 0xFF not in tags:
        # No runs (the usual case for the few struct words of a message): each word is its
        # tag and its non-zero bytes, and those are all of the non-zero bytes in order.
        present = data.replace(b"\x00", b"")
        pos = 0
        for tag in tags:
            end = pos + _POPCOUNT[tag]
            append(_COUNT[tag])
            append(present[pos:end])
            pos = end
        return b"".join(out)
    pos = 0
    while pos < length:
        tag = tags[pos // WORD]
        if tag == 0:
            # This word and up to 255 more zero words: tag, then the count of the others.
            limit = min(length, pos + _RUN_BYTES)
            found = _NONZERO_BYTE.search(data, pos + WORD, limit)
            end = limit if found is None else found.start() // WORD * WORD
            append(b"\x00")
            append(_COUNT[(end - pos) // WORD - 1])
        elif tag == 0xFF:
            # Then words are copied verbatim while they have at most one zero byte (from two
            # zero bytes on, tagging them is no longer a loss).
            end = pos + WORD
            limit = min(length, pos + _RUN_BYTES)
            while end < limit and data.count(0, end, end + WORD) < 2:
                end += WORD
            append(b"\xff")
            append(data[pos : pos + WORD])
            append(_COUNT[(end - pos) // WORD - 1])
            append(data[pos + WORD : end])
        else:
            end = pos + WORD
            append(_COUNT[tag])
            append(data[pos:end].replace(b"\x00", b""))
        pos = end
    return b"".join(out)


def _pack_word_with_zero(word: bytes) -> bytes:
    # A word known to hold a zero byte: its tag is not 0xff, so it cannot start a run.
    tag = (int.from_bytes(word.translate(_NONZERO), "little") * _GATHER >> 56) & 0xFF
    return _ZERO_RUNS[0] if tag == 0 else _COUNT[tag] + word.replace(b"\x00", b"")


def _pack_body(body: bytes | memoryview, out: list[bytes | memoryview]) -> None:
    """Append to ``out`` the packing of ``body`` (zero-padded to words), as verbatim runs
    where it can: a 0xff tag may be followed by up to 255 words of anything.

    The word carrying the 0xff tag itself should have no zero byte (the reference packer
    never writes one that does, and the ``capnp`` tool takes such input for unpacked); a
    word that has one is packed on its own instead, a bounded number of times per run.
    Zero words become zero runs. This loops once per run; ``pack_message`` cuts the long
    regular part of a large body by slicing.
    """
    length = len(body)
    if length == 0:
        return
    view = memoryview(body)
    full = length - length % WORD
    last = b"" if full == length else bytes(view[full:]) + bytes(full + WORD - length)
    words = (length + WORD - 1) // WORD
    append = out.append
    index = 0
    skipped = 0
    while index < words:
        pos = index * WORD
        leader = bytes(view[pos : pos + WORD]) if pos < full else last
        if leader == _ZERO_WORD and pos < full:
            found = _NONZERO_BYTE.search(view, pos, full)
            zero_end = full if found is None else found.start() // WORD * WORD
            for run_start in range(pos, zero_end, _RUN_BYTES):
                append(_ZERO_RUNS[min(zero_end - run_start, _RUN_BYTES) // WORD - 1])
            index = zero_end // WORD
            continue
        if skipped < _MAX_LEADER_SKIPS and b"\x00" in leader:
            append(_pack_word_with_zero(leader))
            index += 1
            skipped += 1
            continue
        skipped = 0
        run = min(_RUN_WORDS, words - index)
        end = pos + run * WORD
        append(b"\xff")
        append(leader)
        append(_COUNT[run - 1])
        if pos + WORD < full:
            append(view[pos + WORD : min(end, full)])
        if end > full and pos < full:
            append(last)
        index += run


# Slices cutting a body into full runs: [0:8], [8:2048], [2048:2056], ... (each run's first
# word, then its 255 followers). Kept for the largest body seen so far, up to the largest
# message; replaced whole, never changed in place, so threads can share it.
_encode_slices_cache: tuple[slice, ...] = ()
_SLICE_CACHE_RUNS = MAX_MESSAGE_WORDS // _RUN_WORDS


def _encode_slices(runs: int) -> tuple[slice, ...]:
    global _encode_slices_cache
    cache = _encode_slices_cache
    if len(cache) >= 2 * runs:
        return cache[: 2 * runs]
    # Grow to a power of two, so that bodies of slowly growing sizes rebuild rarely.
    wanted = (
        runs if runs > _SLICE_CACHE_RUNS else min(_SLICE_CACHE_RUNS, 1 << (runs - 1).bit_length())
    )
    slices = []
    for base in range(0, wanted * _RUN_BYTES, _RUN_BYTES):
        slices.append(slice(base, base + WORD))
        slices.append(slice(base + WORD, base + _RUN_BYTES))
    if wanted <= _SLICE_CACHE_RUNS:
        _encode_slices_cache = tuple(slices)
    return tuple(slices[: 2 * runs])


def pack_message(
    header: bytes, bodies: tuple[bytes | memoryview, ...], packed_header: bytes | None = None
) -> bytes:
    """The packed stream of a message: ``header`` (the segment table and every struct, a
    whole number of words) packed word by word, then ``bodies``, each padded to words.

    The last body (the large one, in our messages) is cut into full verbatim runs by
    slicing, and the whole message is joined once.
    """
    out: list[bytes | memoryview] = [pack(header) if packed_header is None else packed_header]
    for body in bodies[:-1]:
        _pack_body(body, out)
    body = bodies[-1] if bodies else b""
    runs = len(body) // _RUN_BYTES
    if runs == 0:
        _pack_body(body, out)
        return b"".join(out)
    view = memoryview(body)
    pieces: list[bytes | memoryview] = [b"".join(out)]
    pieces.extend(map(view.__getitem__, _encode_slices(runs)))
    # pieces is [prefix, word 0, rest 0, word 1, rest 1, ...]: joined with 0xff between
    # them, that is each run's tag and its count (255). A run whose first word holds a zero
    # byte is packed by _pack_body instead and appended to the piece before it.
    leaders = b"".join(pieces[1::2])
    bad = leaders.find(b"\x00")
    removed = 0
    while bad >= 0:
        run = bad // WORD
        index = 1 + 2 * run - removed
        fixed: list[bytes | memoryview] = [pieces[index - 1]]
        _pack_body(view[run * _RUN_BYTES : (run + 1) * _RUN_BYTES], fixed)
        pieces[index - 1] = b"".join(fixed)
        del pieces[index : index + 2]
        removed += 2
        bad = leaders.find(b"\x00", (run + 1) * WORD)
    tail: list[bytes | memoryview] = [pieces[-1]]
    _pack_body(view[runs * _RUN_BYTES :], tail)
    if len(tail) > 1:
        pieces[-1] = b"".join(tail)
    return b"\xff".join(pieces)


# Work bound of one unpacking: every pass of the loop below (a word on its own, a run, or a
# stretch of like items handled at once by slicing) is a step; a message may take at most
# this many steps plus one per MAX_STEP_BYTES of its packed size. What encoders make of
# real messages takes a few per 2 KiB (random-looking Data is one run per 2 KiB); input
# crafted to be slow (a 2-byte word after another, each with a different tag) is refused
# after a bounded amount of work instead of costing a Python step per word of a 1 MiB frame.
MAX_STEPS = 1024
MAX_STEP_BYTES = 128


def _alike(data: bytes, pos: int, stride: int, tag: bytes, most: int) -> int:
    """How many of the ``most`` bytes at ``pos``, ``pos + stride``, ... equal ``tag``, from
    the first on. The window doubles while it matches, so the work stays proportional to
    the count (input made to stop each stretch early costs no more than it gives)."""
    count = 0
    window = 16
    while count < most:
        size = min(window, most - count)
        start = pos + count * stride
        found = data[start : start + size * stride : stride]
        same = size - len(found.lstrip(tag))
        count += same
        if same < size:
            break
        window *= 2
    return count


def _unpack(data: bytes, max_words: int, steps: int | None = None, start: int = 0) -> bytearray:
    out = bytearray()
    view = memoryview(data)
    length = len(data)
    words = 0
    pos = start
    if steps is None:
        steps = MAX_STEPS + length // MAX_STEP_BYTES
    cache = _UNPACKED_WORDS
    while pos < length:
        steps -= 1
        if steps < 0:
            raise ProtocolError("packed message takes too many steps to unpack")
        tag = data[pos]
        if tag == 0:
            if pos + 1 >= length:
                raise ProtocolError("packed message truncated in a zero run")
            if pos + 3 < length and data[pos + 2] == 0:
                # Several zero runs in a row: count them by their tags, add up their counts.
                runs = _alike(data, pos, 2, b"\x00", min((length - pos) // 2, max_words - words))
                stop = pos + 2 * runs
                count = runs + sum(data[pos + 1 : stop : 2])
                pos = stop
            else:
                count = data[pos + 1] + 1
                pos += 2
            words += count
            if words > max_words:
                raise ProtocolError("packed message too large")
            out += _ZEROS[count] if count <= 256 else bytes(WORD * count)
        elif tag == 0xFF:
            if pos + 9 >= length:
                raise ProtocolError("packed message truncated in a verbatim run")
            runs = (length - pos) // _FULL_RUN_PACKED
            if runs > 1 and data[pos + 9] == 0xFF:
                # Consecutive full runs (what encoders make of random-looking data): count
                # them by their tag and count bytes, copy them all, then delete those bytes
                # (two strided deletions, no loop per run).
                stop = pos + runs * _FULL_RUN_PACKED
                runs -= max(
                    len(data[pos:stop:_FULL_RUN_PACKED].lstrip(b"\xff")),
                    len(data[pos + 9 : stop : _FULL_RUN_PACKED].lstrip(b"\xff")),
                )
                words += runs * _RUN_WORDS
                if words > max_words:
                    raise ProtocolError("packed message too large")
                stop = pos + runs * _FULL_RUN_PACKED
                start = len(out)
                out += view[pos:stop]
                del out[start::_FULL_RUN_PACKED]
                del out[start + WORD :: _FULL_RUN_PACKED - 1]
                pos = stop
                continue
            end = pos + 10 + WORD * data[pos + 9]
            if end > length:
                raise ProtocolError("packed message truncated in a verbatim run")
            words += 1 + data[pos + 9]
            if words > max_words:
                raise ProtocolError("packed message too large")
            out += view[pos + 1 : pos + 9]
            out += view[pos + 10 : end]
            pos = end
        else:
            stride = 1 + _POPCOUNT[tag]
            end = pos + stride
            if end > length:
                raise ProtocolError("packed message truncated in a word")
            if end < length and data[end] == tag:
                # Several words with the same tag in a row: scatter each present byte of
                # all of them with one strided copy.
                most = min((length - pos) // stride, max_words - words + 1)
                count = _alike(data, pos, stride, _COUNT[tag], most)
                words += count
                if words > max_words:
                    raise ProtocolError("packed message too large")
                stop = pos + count * stride
                stretch = bytearray(WORD * count)
                for index, bit in enumerate(_BITS[tag], 1):
                    stretch[bit::WORD] = view[pos + index : stop : stride]
                out += stretch
                pos = stop
                continue
            words += 1
            if words > max_words:
                raise ProtocolError("packed message too large")
            packed = data[pos:end]
            word = cache.get(packed)
            if word is None:
                word = bytes(_SCATTER[tag](packed[1:] + b"\x00"))
                if len(cache) >= _UNPACKED_WORDS_LIMIT:
                    cache.clear()
                cache[packed] = word
            out += word
            pos = end
    return out


# What the walks below leave of the step bound for the rest of a message (its header words
# and a last run), so that input they accept never takes ``_unpack`` too many steps (it
# takes at most one step per packed item, fewer where it takes like items at once).
_HEADER_STEPS = 8


def packed_words(data: bytes | bytearray, pos: int = 0, length: int | None = None) -> int:
    """How many words ``data[pos:length]`` unpacks to, found without unpacking it: one step
    per packed word or run, under the step bound of ``_unpack`` (for a message of
    ``length`` bytes) less room for a message's header words. Raises ``ProtocolError`` for
    truncation or too many steps. A stretch of full verbatim runs is counted at once (the
    steps too, one per run)."""
    if length is None:
        length = len(data)
    words = 0
    steps = MAX_STEPS + length // MAX_STEP_BYTES - _HEADER_STEPS
    popcount = _POPCOUNT
    while pos < length:
        steps -= 1
        if steps < 0:
            raise ProtocolError("packed message takes too many steps to unpack")
        tag = data[pos]
        if tag == 0xFF:
            if pos + 9 >= length:
                raise ProtocolError("packed message truncated in a verbatim run")
            runs = (length - pos) // _FULL_RUN_PACKED
            if runs > 1 and data[pos + 9] == 0xFF:
                stop = pos + runs * _FULL_RUN_PACKED
                runs -= max(
                    len(data[pos:stop:_FULL_RUN_PACKED].lstrip(b"\xff")),
                    len(data[pos + 9 : stop : _FULL_RUN_PACKED].lstrip(b"\xff")),
                )
                steps -= runs - 1
                if steps < 0:
                    raise ProtocolError("packed message takes too many steps to unpack")
                pos += runs * _FULL_RUN_PACKED
                words += runs * _RUN_WORDS
                continue
            count = data[pos + 9]
            pos += 10 + WORD * count
            words += 1 + count
            if pos > length:
                raise ProtocolError("packed message truncated in a verbatim run")
        elif tag == 0:
            if pos + 1 >= length:
                raise ProtocolError("packed message truncated in a zero run")
            words += 1 + data[pos + 1]
            pos += 2
        else:
            pos += 1 + popcount[tag]
            words += 1
            if pos > length:
                raise ProtocolError("packed message truncated in a word")
    return words


def skip_packed_words(data: bytes, pos: int, words: int) -> tuple[int, int]:
    """``(where the packed item after words words from pos starts, steps taken)``, or
    ``(-1, 0)`` when an item ends beyond that many words, the data ends first, or it takes
    more steps than ``_unpack`` allows for data of this size, less room for a message's
    header words."""
    length = len(data)
    bound = MAX_STEPS + length // MAX_STEP_BYTES - _HEADER_STEPS
    steps = 0
    popcount = _POPCOUNT
    while words > 0:
        steps += 1
        if steps > bound or pos >= length:
            return -1, 0
        tag = data[pos]
        if tag == 0xFF:
            if pos + 9 >= length:
                return -1, 0
            count = data[pos + 9]
            pos += 10 + WORD * count
            words -= 1 + count
        elif tag == 0:
            if pos + 1 >= length:
                return -1, 0
            words -= 1 + data[pos + 1]
            pos += 2
        else:
            pos += 1 + popcount[tag]
            words -= 1
    if words or pos > length:
        return -1, 0
    return pos, steps


def default_max_words(packed_length: int) -> int:
    """The unpacked size (in words) a packed message of ``packed_length`` bytes may have."""
    return min(MAX_MESSAGE_WORDS, MAX_EXPANSION_WORDS + (packed_length + WORD - 1) // WORD)


def unpack_bytearray(data: bytes, steps: int | None = None, start: int = 0) -> bytearray:
    """``unpack`` without the final copy, for readers that slice what they need out of it;
    ``start``: unpack ``data[start:]`` (without copying it); ``steps``, if given, is the
    step bound instead of the one for data of this size."""
    return _unpack(data, default_max_words(len(data) - start), steps, start)


def unpack(data: bytes, max_words: int | None = None) -> bytes:
    """Undo packing; refuses truncated input, input that takes too many steps, and output
    of more than ``max_words`` words (by default ``default_max_words``)."""
    data = bytes(data)
    if max_words is None:
        max_words = default_max_words(len(data))
    return bytes(_unpack(data, max_words))


# ---- pointers ----------------------------------------------------------------------------


def struct_pointer(offset: int, data_words: int, pointer_count: int) -> int:
    """A struct pointer word: the struct starts ``offset`` words after the pointer's end."""
    return (pointer_count << 48) | (data_words << 32) | ((offset << 2) & 0xFFFFFFFF) | STRUCT


def data_pointer(offset: int, length: int) -> int:
    """A pointer to a ``Data`` (byte list) of ``length`` bytes, ``offset`` words ahead."""
    return (length << 35) | (BYTE_ELEMENTS << 32) | ((offset << 2) & 0xFFFFFFFF) | LIST


def far_pointer(segment: int, offset: int, double: bool = False) -> int:
    """A far pointer to the landing pad at word ``offset`` of ``segment``."""
    return (segment << 32) | (offset << 3) | (4 if double else 0) | FAR


def _offset(word: int) -> int:
    # Bits 2..31: a signed 30-bit word offset.
    return (((word & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000) >> 2


# ---- building ----------------------------------------------------------------------------


class MessageBuilder:
    """Builds a one-segment message: word 0 is the root pointer, structs follow in order of
    allocation, then the ``Data`` bodies, each padded to whole words."""

    __slots__ = ("_words", "_bodies", "_fixups", "_body_words")

    def __init__(self) -> None:
        self._words: list[int] = [0]
        self._bodies: list[bytes] = []
        # (pointer word, first word of the body among the bodies, body length)
        self._fixups: list[tuple[int, int, int]] = []
        self._body_words = 0

    def set_struct(self, pointer: int, data_words: int, pointer_count: int) -> int:
        """Allocate a zeroed struct, point word ``pointer`` at it; returns its first word."""
        words = self._words
        start = len(words)
        words.extend([0] * (data_words + pointer_count))
        words[pointer] = struct_pointer(start - pointer - 1, data_words, pointer_count)
        return start

    def set_word(self, index: int, value: int) -> None:
        """Store a data word (an unsigned 64-bit value) at word ``index``."""
        self._words[index] = value

    def set_words(self, index: int, values: tuple[int, ...]) -> None:
        """Store consecutive data words from word ``index`` on."""
        self._words[index : index + len(values)] = values

    def set_data(self, pointer: int, body: bytes) -> None:
        """Point word ``pointer`` at a ``Data`` holding ``body`` (placed after the structs)."""
        self._fixups.append((pointer, self._body_words, len(body)))
        self._bodies.append(body)
        self._body_words += (len(body) + WORD - 1) // WORD

    def finish(self) -> bytes:
        """The packed stream: segment table, then the one segment."""
        words = self._words
        first_body = len(words)
        for pointer, at, length in self._fixups:
            words[pointer] = data_pointer(first_body + at - pointer - 1, length)
        size = first_body + self._body_words
        header = struct.pack(f"<{first_body + 1}Q", size << 32, *words)
        return pack_message(header, tuple(self._bodies))


# ---- reading -----------------------------------------------------------------------------


class Message:
    """An unpacked message: its segments and the traversal budget left."""

    __slots__ = ("buf", "segments", "budget")

    def __init__(self, buf: bytearray, segments: tuple[tuple[int, int], ...]) -> None:
        # One buffer for all segments; each segment is (first word, end word) in it, so
        # nothing is copied per segment.
        self.buf = buf
        self.segments = segments
        self.budget = TRAVERSAL_FACTOR * (len(buf) // WORD) + 64

    def root(self) -> StructReader:
        """The root struct (a struct with no fields set when the root pointer is null)."""
        root = self.read_struct(0, self.segments[0][0], 0)
        return _EMPTY_STRUCT if root is None else root

    def _resolve(self, segment: int, at: int) -> tuple[int, int, int] | None:
        """Follow the pointer at word ``at`` of ``segment`` through any far pointer.

        Returns (segment of the object, word describing it, first word of it) or None for
        a null pointer.
        """
        buf = self.buf
        word = _U64.unpack_from(buf, at * WORD)[0]
        if word == 0:
            return None
        if word & 3 != FAR:
            return segment, word, at + 1 + _offset(word)
        segments = self.segments
        target = word >> 32
        if target >= len(segments):
            raise ProtocolError("far pointer to a segment that does not exist")
        start, end = segments[target]
        pad = start + ((word >> 3) & 0x1FFFFFFF)
        if not word & 4:
            # Single landing pad: an ordinary pointer, relative to the pad.
            if pad + 1 > end:
                raise ProtocolError("far pointer landing pad out of bounds")
            landing = _U64.unpack_from(buf, pad * WORD)[0]
            if landing & 3 == FAR:
                raise ProtocolError("far pointer lands on another far pointer")
            return target, landing, pad + 1 + _offset(landing)
        # Double landing pad: a far pointer to the object's start, then a tag word giving its
        # kind and size (the tag's own offset means nothing).
        if pad + 2 > end:
            raise ProtocolError("double far pointer landing pad out of bounds")
        far, tag = _U64_PAIR.unpack_from(buf, pad * WORD)
        if far & 3 != FAR:
            raise ProtocolError("double far landing pad does not start with a far pointer")
        if tag & 3 == FAR:
            raise ProtocolError("double far landing pad tag is a far pointer")
        content = far >> 32
        if content >= len(segments):
            raise ProtocolError("far pointer to a segment that does not exist")
        return content, tag, segments[content][0] + ((far >> 3) & 0x1FFFFFFF)

    def read_struct(self, segment: int, at: int, depth: int) -> StructReader | None:
        """The struct the pointer at word ``at`` of ``segment`` points to, or None if null."""
        if depth > MAX_DEPTH:
            raise ProtocolError("message nested too deeply")
        resolved = self._resolve(segment, at)
        if resolved is None:
            return None
        segment, word, start = resolved
        if word & 3 != STRUCT:
            raise ProtocolError("expected a struct pointer")
        data_words = (word >> 32) & 0xFFFF
        pointer_count = word >> 48
        first, end = self.segments[segment]
        if start < first or start + data_words + pointer_count > end:
            raise ProtocolError("struct pointer out of bounds")
        self.budget -= data_words + pointer_count
        if self.budget < 0:
            raise ProtocolError("message traversal limit exceeded")
        return StructReader(self, segment, start, data_words, pointer_count, depth)

    def read_data(self, segment: int, at: int) -> bytes | None:
        """The bytes of the ``Data`` the pointer at word ``at`` points to, or None if null."""
        resolved = self._resolve(segment, at)
        if resolved is None:
            return None
        segment, word, start = resolved
        if word & 3 != LIST:
            raise ProtocolError("expected a list pointer")
        if (word >> 32) & 7 != BYTE_ELEMENTS:
            raise ProtocolError("expected a list of bytes")
        length = word >> 35
        first, end = self.segments[segment]
        if start < first or start * WORD + length > end * WORD:
            raise ProtocolError("list pointer out of bounds")
        self.budget -= (length + WORD - 1) // WORD
        if self.budget < 0:
            raise ProtocolError("message traversal limit exceeded")
        # The one copy of the body on the way in (a memoryview, not a bytearray slice,
        # which would be a second one).
        return bytes(memoryview(self.buf)[start * WORD : start * WORD + length])


class StructReader:
    """One struct of a message. Fields beyond its sections read as zero or null, which is
    how a struct written with an older or newer schema is read."""

    __slots__ = ("message", "segment", "start", "data_words", "pointer_count", "depth")

    def __init__(
        self,
        message: Message | None,
        segment: int,
        start: int,
        data_words: int,
        pointer_count: int,
        depth: int,
    ) -> None:
        self.message = message
        self.segment = segment
        self.start = start
        self.data_words = data_words
        self.pointer_count = pointer_count
        self.depth = depth

    def uint16(self, offset: int) -> int:
        """The UInt16 at byte ``offset`` of the data section (union tags live here)."""
        if offset + 2 > self.data_words * WORD or self.message is None:
            return 0
        at = self.start * WORD + offset
        buf = self.message.buf
        return buf[at] | buf[at + 1] << 8

    def data_section(self, words: int) -> bytes:
        """The first ``words`` data words as bytes, zero-filled past the end of the section."""
        have = min(words, self.data_words)
        if have == 0 or self.message is None:
            return _ZEROS[words]
        section = bytes(self.message.buf[self.start * WORD : (self.start + have) * WORD])
        return section if have == words else section + _ZEROS[words - have]

    def struct(self, index: int) -> StructReader | None:
        """The struct pointer field ``index``, or None if null or beyond the pointer section."""
        if index >= self.pointer_count or self.message is None:
            return None
        return self.message.read_struct(
            self.segment, self.start + self.data_words + index, self.depth + 1
        )

    def data(self, index: int) -> bytes | None:
        """The ``Data`` pointer field ``index``, or None if null or beyond the section."""
        if index >= self.pointer_count or self.message is None:
            return None
        return self.message.read_data(self.segment, self.start + self.data_words + index)


# What a null root pointer reads as: a struct with no fields set.
_EMPTY_STRUCT = StructReader(None, 0, 0, 0, 0, 0)


def read_message(data: bytes, max_words: int | None = None) -> Message:
    """Unpack a packed stream message and check its segment table."""
    if type(data) is not bytes:
        data = bytes(data)
    if max_words is None:
        max_words = default_max_words(len(data))
    return read_unpacked(_unpack(data, max_words))


def read_unpacked(buf: bytearray) -> Message:
    """A message already unpacked (by ``unpack_bytearray``): check its segment table."""
    total = len(buf) // WORD
    if total == 0:
        raise ProtocolError("empty message")
    count = _U32.unpack_from(buf, 0)[0] + 1
    if count == 1:
        # One segment (what every encoder makes of a small message).
        size = _U32.unpack_from(buf, 4)[0]
        if size + 1 != total:
            if size + 1 > total:
                raise ProtocolError("message shorter than its segment table says")
            raise ProtocolError("trailing data after the message")
        if size == 0:
            raise ProtocolError("message has no root pointer")
        return Message(buf, ((1, total),))
    if count > MAX_SEGMENTS:
        raise ProtocolError(f"message has too many segments ({count})")
    table = count // 2 + 1
    if table > total:
        raise ProtocolError("message truncated in the segment table")
    segments = []
    start = table
    for size in struct.unpack_from(f"<{count}I", buf, 4):
        segments.append((start, start + size))
        start += size
    if start != total:
        if start > total:
            raise ProtocolError("message shorter than its segment table says")
        raise ProtocolError("trailing data after the message")
    if segments[0][0] == segments[0][1]:
        raise ProtocolError("message has no root pointer")
    return Message(buf, tuple(segments))
