"""Length-prefixed frames (docs/protocol.md 1): an 8-byte big-endian length, then the body."""

from __future__ import annotations

from ..config import Limits
from ..errors import CloseReason, ProtocolError

HEADER_LEN = 8

_from_bytes = int.from_bytes


def frame_header(length: int) -> bytes:
    """The 8-byte prefix announcing a frame of ``length`` bytes."""
    return length.to_bytes(HEADER_LEN, "big")


def encode_frame(payload: bytes) -> bytes:
    """One whole frame as bytes (for small frames; large ones are sent as header + payload)."""
    return len(payload).to_bytes(HEADER_LEN, "big") + payload


class FrameDecoder:
    """Splits a byte stream into frame bodies, refusing oversize frames before buffering them."""

    __slots__ = ("_chunks", "_have", "_need", "max_length")

    def __init__(self, max_length: int = Limits.max_frame_length) -> None:
        # A partial frame is kept as a list of chunks and joined once, when complete, so a
        # large frame arriving in many reads costs one copy rather than a copy per read.
        self._chunks: list[bytes] = []
        self._have = 0
        self._need = 0
        self.max_length = max_length

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return self._have

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return every frame body now complete, in order."""
        if self._chunks:
            self._chunks.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            src = b"".join(self._chunks)
            self._chunks = []
        else:
            src = data
        frames: list[bytes] = []
        pos = 0
        end = len(src)
        max_length = self.max_length
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

    # ---- hand-over (relay/handover.py) ------------------------------------------------

    def export_state(self) -> dict:
        """The partial frame received so far, as plain data."""
        return {"partial": b"".join(self._chunks), "need": self._need}

    def restore_state(self, state: dict) -> None:
        """Take back what ``export_state`` gave; raises ``ValueError`` if it does not fit."""
        partial, need = state["partial"], state["need"]
        if not isinstance(partial, bytes) or not isinstance(need, int):
            raise ValueError("partial frame state of the wrong type")
        if partial and not (len(partial) < need <= HEADER_LEN + self.max_length):
            raise ValueError("partial frame longer than announced or over the frame limit")
        self._chunks = [partial] if partial else []
        self._have = len(partial)
        self._need = need if partial else 0
