"""Length-prefixed frames (docs/protocol.md 1): an 8-byte big-endian length, then the body."""

from __future__ import annotations

from typing import TypedDict, cast

from ..errors import CloseReason, ProtocolError

HEADER_LEN = 8
# The original's limit on a frame's length (docs/protocol.md 1); ``config`` takes its default
# from here.
MAX_FRAME_LENGTH = 1048576
# Before the secure channel is up, a peer sends three frames: its version (4 bytes), then
# ExchangeRandNonce and ExchangeDh. Laid out as every encoder does, these are 19 and 28
# words, at most 190 and 280 bytes packed however they are packed (10 bytes a word at
# worst), and a few words more for a multi-segment layout: 1 KiB leaves room for any
# encoding while an unauthenticated peer can no longer make the relay hold or unpack 1 MiB.
SETUP_FRAMES = 3
SETUP_FRAME_LENGTH = 1024
# ``feed_views`` returns a complete frame at least this long as a view of the bytes it arrived
# in rather than a copy of them (a 64 KiB frame out of a 1 MiB read).
VIEW_MIN = 4096

_from_bytes = int.from_bytes

# A frame body: bytes, or a memoryview of what it arrived in (``FrameDecoder.feed_views``).
Frame = bytes | memoryview


def frame_header(length: int) -> bytes:
    """The 8-byte prefix announcing a frame of ``length`` bytes."""
    return length.to_bytes(HEADER_LEN, "big")


def encode_frame(payload: bytes) -> bytes:
    """One whole frame as bytes (for small frames; large ones are sent as header + payload)."""
    return len(payload).to_bytes(HEADER_LEN, "big") + payload


class DecoderExport(TypedDict):
    """``FrameDecoder.export_state``: the partial frame received so far."""

    partial: bytes
    need: int
    setup_left: int


class FrameDecoder:
    """Splits a byte stream into frame bodies, refusing oversize frames before buffering them."""

    __slots__ = ("_chunks", "_have", "_need", "max_length", "_setup_left", "_setup_length")

    def __init__(
        self,
        max_length: int = MAX_FRAME_LENGTH,
        *,
        setup_frames: int = 0,
        setup_length: int = SETUP_FRAME_LENGTH,
    ) -> None:
        # A partial frame is kept as a list of chunks and joined once, when complete, so a
        # large frame arriving in many reads costs one copy rather than a copy per read.
        self._chunks: list[bytes] = []
        self._have = 0
        self._need = 0
        self.max_length = max_length
        # The first ``setup_frames`` frames may be at most ``setup_length`` bytes each.
        self._setup_left = setup_frames
        self._setup_length = min(setup_length, max_length)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return self._have

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return every frame body now complete, in order."""
        return cast("list[bytes]", self.feed_views(data, self.max_length + 1))

    def feed_views(self, data: bytes, view_min: int = VIEW_MIN) -> list[Frame]:
        """``feed``, with frames of ``view_min`` bytes or more as memoryviews of the bytes
        received (which they keep alive while they are held) instead of copies; a partial
        frame is always kept as a copy of its own."""
        if self._setup_left:
            return self._feed_setup(data, view_min)
        if self._chunks:
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            src = b"".join(self._chunks)
            self._chunks = []
        else:
            src = data
        frames: list[Frame] = []
        pos = 0
        end = len(src)
        max_length = self.max_length
        view = None
        need = HEADER_LEN
        while end - pos >= HEADER_LEN:
            length = _from_bytes(src[pos : pos + HEADER_LEN], "big")
            if length > max_length:
                raise ProtocolError(
                    f"frame of {length} bytes exceeds the maximum of {max_length}",
                    CloseReason.OVERSIZE_FRAME,
                )
            start = pos + HEADER_LEN
            if end - start < length:
                need = HEADER_LEN + length
                break
            if length >= view_min:
                if view is None:
                    view = memoryview(src)
                frames.append(view[start : start + length])
            else:
                frames.append(src[start : start + length])
            pos = start + length
        if pos < end:
            rest = src[pos:]
            self._chunks = [rest]
            self._have = len(rest)
            self._need = need
        else:
            self._have = 0
        return frames

    def _feed_setup(self, data: bytes, view_min: int) -> list[Frame]:
        # The first frames, under their own small limit (they are small: the partial frame
        # is simply joined again on every read), then the rest as usual.
        if self._chunks:
            self._chunks.append(data)
            src = b"".join(self._chunks)
            self._chunks = []
        else:
            src = data
        frames: list[Frame] = []
        pos = 0
        end = len(src)
        limit = self._setup_length
        need = HEADER_LEN
        while self._setup_left and end - pos >= HEADER_LEN:
            length = _from_bytes(src[pos : pos + HEADER_LEN], "big")
            if length > limit:
                raise ProtocolError(
                    f"set-up frame of {length} bytes exceeds the maximum of {limit}",
                    CloseReason.OVERSIZE_FRAME,
                )
            start = pos + HEADER_LEN
            if end - start < length:
                need = HEADER_LEN + length
                break
            frames.append(src[start : start + length])
            pos = start + length
            self._setup_left -= 1
        rest = src[pos:] if pos else src
        self._have = 0
        if self._setup_left:
            if rest:
                self._chunks = [rest]
                self._have = len(rest)
                self._need = need
            return frames
        if rest:
            frames.extend(self.feed_views(rest, view_min))
        return frames

    # ---- hand-over (relay/handover.py) ------------------------------------------------

    def export_state(self) -> DecoderExport:
        """The partial frame received so far, as plain data."""
        return {
            "partial": b"".join(self._chunks),
            "need": self._need,
            "setup_left": self._setup_left,
        }

    def restore_state(self, state: DecoderExport) -> None:
        """Take back what ``export_state`` gave; raises ``ValueError`` if it does not fit."""
        partial, need = state["partial"], state["need"]
        if not isinstance(partial, bytes) or not isinstance(need, int):
            raise ValueError("partial frame state of the wrong type")
        if partial and not (len(partial) < need <= HEADER_LEN + self.max_length):
            raise ValueError("partial frame longer than announced or over the frame limit")
        setup_left = state.get("setup_left", 0)
        if not isinstance(setup_left, int) or not 0 <= setup_left <= SETUP_FRAMES:
            raise ValueError("set-up frame count of the wrong type or out of range")
        self._setup_left = setup_left
        self._chunks = [partial] if partial else []
        self._have = len(partial)
        self._need = need if partial else 0
