"""One Offset connection: frames, version prefix, secure channel and keepalive, sans-IO.

Bytes and the current time go in; relay-layer messages, bytes to send and the next deadline
come out. The relay, the client, the probe and the benchmarks all use this one class.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping
from random import random as _uniform
from typing import Any, TypedDict

from nacl.signing import SigningKey

from ..errors import CloseReason, LocalProtocolError, ProtocolError
from .channel import ChannelExport, Handshake, HandshakeExport, SecureChannel
from .fastpath import (
    Forwarded,
    decode_ka_message,
    encode_ka_message,
)
from .frames import (
    HEADER_LEN,
    MAX_FRAME_LENGTH,
    SETUP_FRAMES,
    DecoderExport,
    Frame,
    FrameDecoder,
    frame_header,
)
from .keepalive import Keepalive, KeepaliveExport

PROTOCOL_VERSION = 0
VERSION_FRAME = frame_header(4) + PROTOCOL_VERSION.to_bytes(4, "big")

_INF = float("inf")

# The original's timers, in seconds; ``config`` takes its defaults from here.
CONN_TIMEOUT = 8.0  # the whole set-up (version and handshake) must finish within it
KEEPALIVE_INTERVAL = 32.0  # silence after which the peer is dropped (we send at half of it)
REKEY_INTERVAL = 3600.0
# Connections opened together (a relay's whole population reconnecting after a restart) must
# not keep falling due together: each rekey comes up to this share of the interval early,
# and a connection's first keepalive up to this share of its half interval early. Both are
# earlier than the original's timers, never later, so every peer's deadline still holds.
TIMER_SPREAD = 0.25


# The layout of ``Connection.export_state``; a restore refuses any other.
STATE_VERSION = 1


class ConnectionExport(TypedDict):
    """``Connection.export_state``: every layer's own export, the timers as seconds from
    the export (None when not running), the output not yet taken and the frames held."""

    v: int
    state: str
    peer_public_key: bytes | None
    decoder: DecoderExport
    handshake: HandshakeExport | None
    channel: ChannelExport | None
    keepalive: KeepaliveExport | None
    keepalive_interval: float
    rekey_interval: float
    rekey_in: float | None
    setup_in: float | None
    out: bytes
    held: list[bytes]


class State(enum.Enum):
    """Where a connection stands in the stack of docs/protocol.md."""

    VERSION = enum.auto()  # waiting for the peer's version frame
    HANDSHAKE = enum.auto()  # secure channel handshake under way
    OPEN = enum.auto()  # channel up: relay messages flow
    CLOSED = enum.auto()  # a protocol error or timeout ended it


class Connection:
    """The protocol stack of one TCP connection, for either side (relay or node).

    ``receive_data`` returns the relay-layer messages (KaMessage.message payloads) in order
    (``receive_forward`` the same messages packed, for a relay's tunnel);
    ``send_message`` queues one; ``data_to_send`` takes the queued output as a list of
    byte strings (suited to ``socket.sendmsg``). Timers: ``next_deadline`` and
    ``handle_timer``. Any violation raises ``ProtocolError`` and the connection is CLOSED.
    """

    __slots__ = (
        "state",
        "peer_public_key",
        "_decoder",
        "_handshake",
        "_channel",
        "_keepalive",
        "_out",
        "_out_size",
        "_held",
        "_deadline",
        "_keepalive_interval",
        "_rekey_interval",
        "_next_rekey",
        "_spread",
        "forwarded_bytes",
    )

    def __init__(
        self,
        identity: SigningKey,
        now: float,
        *,
        expected_peer: bytes | None = None,
        conn_timeout: float = CONN_TIMEOUT,
        keepalive: float = KEEPALIVE_INTERVAL,
        rekey_interval: float = REKEY_INTERVAL,
        max_frame_length: int = MAX_FRAME_LENGTH,
        random: Callable[[int], bytes] = os.urandom,
        timer_spread: float = TIMER_SPREAD,
    ) -> None:
        self.state = State.VERSION
        self.peer_public_key: bytes | None = None
        # The peer's version and handshake frames are held to the small set-up limit.
        self._decoder = FrameDecoder(max_frame_length, setup_frames=SETUP_FRAMES)
        self._held: list[Frame] = []  # complete frames beyond a frame budget
        self._handshake: Handshake | None = Handshake(identity, expected_peer, random)
        self._channel: SecureChannel | None = None
        self._keepalive: Keepalive | None = None
        self._keepalive_interval = keepalive
        self._rekey_interval = rekey_interval
        self._next_rekey = _INF
        self._spread = timer_spread  # 0: the original's exact timers
        # Payload bytes of the messages the last ``receive_forward`` returned.
        self.forwarded_bytes = 0
        self._deadline = now + conn_timeout  # the whole set-up must finish by then
        # Both sides speak first: version, then our handshake nonce, without waiting.
        hello = self._handshake.start()
        self._out: list[bytes | memoryview] = [VERSION_FRAME, frame_header(len(hello)), hello]
        self._out_size = len(VERSION_FRAME) + HEADER_LEN + len(hello)

    # ---- input -------------------------------------------------------------------------

    def _take_frames(self, data: bytes, frame_budget: int | None) -> list[Frame]:
        # The frames to process now: those held from the last call, then those ``data``
        # completes, at most ``frame_budget`` of them (the rest are held).
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection already closed")
        try:
            frames = self._decoder.feed_views(data) if data else []
        except ProtocolError:
            self.state = State.CLOSED
            raise
        if self._held:
            frames[:0] = self._held
            self._held = []
        if frame_budget is not None and len(frames) > frame_budget:
            self._held = frames[frame_budget:]
            del frames[frame_budget:]
        return frames

    def receive_data(self, data: bytes, now: float, frame_budget: int | None = None) -> list[bytes]:
        """Feed received bytes; returns the relay messages they complete, in order.

        With ``frame_budget``, at most that many complete frames are processed; the rest
        are held (``backlog`` is then true) for the next call, which may pass no new bytes.
        An IO shell serving many connections from one loop uses this to give each a share
        of a pass; it should not read more from a connection that has a backlog.
        """
        frames = self._take_frames(data, frame_budget)
        try:
            if self.state is State.OPEN:
                return self._receive_open(frames, now)
            return self._receive_setup(frames, now)
        except ProtocolError:
            self.state = State.CLOSED
            raise

    def receive_forward(
        self, data: bytes, now: float, frame_budget: int | None = None
    ) -> list[Forwarded]:
        """``receive_data`` for a relay's tunnel: the messages come as ``Forwarded`` items
        to pass to another connection's ``send_packed``.

        They are packed KaMessages, checked as ``decode_ka_message`` checks them but not
        decoded when they are in the usual layout, and large ones still packed inside the
        ChannelMessage's packing; ``forwarded_bytes`` is then the total of their payloads'
        lengths. ``frame_budget`` is as for ``receive_data``.
        """
        self.forwarded_bytes = 0
        frames = self._take_frames(data, frame_budget)
        try:
            if self.state is not State.OPEN:
                # Messages after a handshake finished in this read: packed as they are sent.
                payloads = self._receive_setup(frames, now)
                self.forwarded_bytes = sum(map(len, payloads))
                return [encode_ka_message(payload) for payload in payloads]
            if not frames:
                return []
            # _receive_open, with the KaMessages checked and kept packed.
            channel = self._channel
            keepalive = self._keepalive
            assert channel is not None and keepalive is not None
            messages: list[Forwarded] = []
            size = 0
            heard = False
            open_forward = channel.open_forward
            append = messages.append
            for frame in frames:
                opened = open_forward(frame)
                if opened is None:
                    self._next_rekey = self._rekey_after(now)
                    if channel.outbox:
                        self._flush_outbox(channel)
                    continue
                heard = True
                message, length = opened
                if message is not None:
                    append(message)
                    size += length
            if heard:
                keepalive.last_recv = now
            self.forwarded_bytes = size
            return messages
        except ProtocolError:
            self.state = State.CLOSED
            raise

    def _receive_setup(self, frames: list[Frame], now: float) -> list[bytes]:
        for index, frame in enumerate(frames):
            if self.state is State.VERSION:
                if len(frame) != 4:
                    raise ProtocolError(
                        f"version frame of {len(frame)} bytes, expected 4", CloseReason.VERSION
                    )
                version = int.from_bytes(frame, "big")
                if version != PROTOCOL_VERSION:
                    raise ProtocolError(
                        f"unsupported protocol version {version}", CloseReason.VERSION
                    )
                self.state = State.HANDSHAKE
                continue
            handshake = self._handshake
            assert handshake is not None
            reply = handshake.receive(bytes(frame))  # set-up frames are small: bytes
            if reply is not None:
                self._queue(reply)
            if handshake.done:
                self._open(handshake, now)
                return self._receive_open(frames[index + 1 :], now)
        return []

    def _open(self, handshake: Handshake, now: float) -> None:
        self._channel = handshake.channel
        self.peer_public_key = handshake.peer_public_key
        self._handshake = None
        self.state = State.OPEN
        keepalive = self._keepalive = Keepalive(now, self._keepalive_interval)
        # The first keepalive comes a random part of TIMER_SPREAD early; the ones after keep
        # that phase (they follow the last send).
        keepalive.last_send = now - keepalive.half * self._spread * _uniform()
        self._next_rekey = self._rekey_after(now)
        self._deadline = _INF

    def _receive_open(self, frames: list[Frame], now: float) -> list[bytes]:
        if not frames:
            return []
        channel = self._channel
        keepalive = self._keepalive
        assert channel is not None and keepalive is not None
        messages = []
        heard = False
        for frame in frames:
            user = channel.open(frame)
            if user is None:
                # A Rekey frame: it completed a key switch (the peer's or an answer to ours).
                # As the original, that restarts our rekey countdown, and, since the keepalive
                # layer never sees Rekey frames, it does not count as hearing from the peer.
                self._next_rekey = self._rekey_after(now)
                if channel.outbox:
                    self._flush_outbox(channel)
                continue
            heard = True
            message = decode_ka_message(user)
            if message is not None:
                messages.append(message)
        if heard:
            keepalive.last_recv = now
        return messages

    @property
    def backlog(self) -> bool:
        """Complete frames are held beyond a frame budget, waiting for ``receive_data``."""
        return bool(self._held)

    @property
    def rekeys(self) -> int:
        """Rekeys completed on this connection, whichever side started them."""
        return self._channel.rekeys if self._channel is not None else 0

    # ---- output ------------------------------------------------------------------------

    def _queue(self, payload: bytes) -> None:
        self._out.append(frame_header(len(payload)))
        self._out.append(payload)
        self._out_size += HEADER_LEN + len(payload)

    def _flush_outbox(self, channel: SecureChannel) -> None:
        # Rekey answers: they do not stand in for a keepalive (only KaMessages do).
        for frame in channel.outbox:
            self._queue(frame)
        channel.outbox.clear()

    def send_message(self, message: bytes, now: float) -> None:
        """Queue one relay-layer message (a KaMessage.message) for the peer."""
        channel = self._channel
        if channel is None or self.state is not State.OPEN:
            raise LocalProtocolError("cannot send before the secure channel is open")
        payload = channel.seal(encode_ka_message(message))
        out = self._out
        out.append(len(payload).to_bytes(HEADER_LEN, "big"))
        out.append(payload)
        self._out_size += HEADER_LEN + len(payload)
        self._keepalive.last_send = now  # type: ignore[union-attr]

    def send_packed(self, messages: list[Forwarded], now: float) -> None:
        """Queue packed KaMessages (from another connection's ``receive_forward``) for the
        peer, as they are."""
        channel = self._channel
        if channel is None or self.state is not State.OPEN:
            raise LocalProtocolError("cannot send before the secure channel is open")
        seal = channel.seal
        out = self._out
        append = out.append
        size = 0
        for message in messages:
            if type(message) is tuple:
                # Large user data carried as it came: the whole frame in one buffer.
                frame = channel.frame_carried(*message)
                append(frame)
                size += len(frame)
                continue
            payload = seal(message)  # type: ignore[arg-type]
            append(len(payload).to_bytes(HEADER_LEN, "big"))
            append(payload)
            size += HEADER_LEN + len(payload)
        self._out_size += size
        self._keepalive.last_send = now  # type: ignore[union-attr]

    def _rekey_after(self, now: float) -> float:
        """When the next rekey is due: an interval from ``now``, up to TIMER_SPREAD early."""
        return now + self._rekey_interval * (1.0 - self._spread * _uniform())

    def start_rekey(self, now: float) -> bool:
        """Start a rekey now (one is started by ``handle_timer`` every rekey interval)."""
        channel = self._channel
        if channel is None or self.state is not State.OPEN:
            raise LocalProtocolError("cannot rekey before the secure channel is open")
        frame = channel.start_rekey()
        self._next_rekey = self._rekey_after(now)
        if frame is None:
            return False
        # Not a KaMessage: the keepalive send timer runs on (docs/protocol.md, keepalive).
        self._queue(frame)
        return True

    def data_to_send(self) -> list[bytes | memoryview]:
        """Take everything queued for the peer (a list of byte strings, in order)."""
        out = self._out
        if not out:
            return out
        self._out = []
        self._out_size = 0
        return out

    @property
    def pending_output(self) -> int:
        """Bytes queued and not yet taken with ``data_to_send``."""
        return self._out_size

    # ---- time --------------------------------------------------------------------------

    def pause_reading(self) -> None:
        """The IO shell stopped reading (back-pressure): suspend the idle deadline."""
        if self._keepalive is not None:
            self._keepalive.pause()

    def resume_reading(self, now: float) -> None:
        """The IO shell reads again: the peer gets a whole keepalive interval."""
        if self._keepalive is not None:
            self._keepalive.resume(now)

    def next_deadline(self) -> float:
        """The next time ``handle_timer`` has something to do."""
        keepalive = self._keepalive
        if keepalive is None:
            return self._deadline
        return min(keepalive.next_deadline(), self._next_rekey)

    def timer_would_close(self, now: float) -> bool:
        """Whether ``handle_timer(now)`` would close the connection: its set-up deadline
        has passed, or the peer has been silent too long. An IO shell whose loop was busy
        reads what the peer has sent first, so that its own delay is not taken for the
        peer's silence."""
        if self.state is State.CLOSED:
            return False
        keepalive = self._keepalive
        if keepalive is None:
            return now >= self._deadline
        return keepalive.timed_out(now)

    def handle_timer(self, now: float) -> None:
        """Fire whatever is due: set-up timeout, idle timeout, keepalive, rekey."""
        if self.state is State.CLOSED:
            return
        keepalive = self._keepalive
        if keepalive is None:
            if now >= self._deadline:
                self.state = State.CLOSED
                raise ProtocolError("connection set-up timed out", CloseReason.SETUP_TIMEOUT)
            return
        if keepalive.timed_out(now):
            self.state = State.CLOSED
            raise ProtocolError(
                "keepalive timeout: nothing received", CloseReason.KEEPALIVE_TIMEOUT
            )
        if now >= self._next_rekey:
            self.start_rekey(now)
        if keepalive.keepalive_due(now):
            self._queue(self._channel.seal_keepalive())  # type: ignore[union-attr]
            keepalive.last_send = now

    # ---- hand-over (relay/handover.py) -------------------------------------------------

    def export_state(self, now: float) -> ConnectionExport:
        """Everything this connection is, as plain data: keys, nonce counters, rekey state,
        deadlines (as durations from ``now``), the partial frame received and the output
        not yet taken. Secret: it holds the channel keys (docs/SECURITY.md)."""
        if self.state is State.CLOSED:
            raise LocalProtocolError("a closed connection has no state to hand over")
        return {
            "v": STATE_VERSION,
            "state": self.state.name,
            "peer_public_key": self.peer_public_key,
            "decoder": self._decoder.export_state(),
            "handshake": None if self._handshake is None else self._handshake.export_state(),
            "channel": None if self._channel is None else self._channel.export_state(),
            "keepalive": None if self._keepalive is None else self._keepalive.export_state(now),
            "keepalive_interval": self._keepalive_interval,
            "rekey_interval": self._rekey_interval,
            "rekey_in": None if self._next_rekey == _INF else self._next_rekey - now,
            "setup_in": None if self._deadline == _INF else self._deadline - now,
            "out": b"".join(self._out),
            "held": [bytes(frame) for frame in self._held],
        }

    @classmethod
    def restore_state(
        cls,
        state: Mapping[str, Any],
        identity: SigningKey,
        now: float,
        *,
        downtime: float = 0.0,
        max_frame_length: int = MAX_FRAME_LENGTH,
        random: Callable[[int], bytes] = os.urandom,
    ) -> Connection:
        """The connection ``export_state`` described, carrying on at ``now``.

        ``state`` is a ``ConnectionExport`` as read back from storage, so it is checked,
        not trusted. ``downtime`` is how long no process served it: it counts against our
        own deadlines (keepalive to send, rekey), not against the peer's. Anything that does
        not fit exactly raises ``ValueError``: nothing is guessed.
        """
        try:
            return cls._restore(state, identity, now, downtime, max_frame_length, random)
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"connection state incomplete or of the wrong type: {exc!r}") from None

    @classmethod
    def _restore(
        cls,
        state: Mapping[str, Any],
        identity: SigningKey,
        now: float,
        downtime: float,
        max_frame_length: int,
        random: Callable[[int], bytes],
    ) -> Connection:
        if state.get("v") != STATE_VERSION:
            raise ValueError(f"connection state version {state.get('v')!r} is not known")
        try:
            phase = State[state["state"]]
        except KeyError:
            raise ValueError(f"unknown connection state {state['state']!r}") from None
        if phase is State.CLOSED:
            raise ValueError("a closed connection is not restored")
        self = cls.__new__(cls)
        self.state = phase
        peer = state["peer_public_key"]
        if peer is not None and not (isinstance(peer, bytes) and len(peer) == 32):
            raise ValueError("peer public key of the wrong length")
        self.peer_public_key = peer
        self._decoder = FrameDecoder(max_frame_length)
        self._decoder.restore_state(state["decoder"])
        held = state.get("held", [])
        if not isinstance(held, list) or not all(isinstance(frame, bytes) for frame in held):
            raise ValueError("held frames of the wrong type")
        self._held = list(held)
        self._keepalive_interval = float(state["keepalive_interval"])
        self._rekey_interval = float(state["rekey_interval"])
        self._handshake = None
        self._channel = None
        self._keepalive = None
        self._next_rekey = _INF
        self._spread = TIMER_SPREAD
        self._deadline = _INF
        self.forwarded_bytes = 0
        if phase is State.OPEN:
            if peer is None or state["handshake"] is not None or state["channel"] is None:
                raise ValueError("an open connection without its channel")
            self._channel = SecureChannel.restore_state(state["channel"], random)
            if state["keepalive"] is None or state["rekey_in"] is None:
                raise ValueError("an open connection without its deadlines")
            self._keepalive = Keepalive.restore_state(state["keepalive"], now, downtime)
            self._next_rekey = now + float(state["rekey_in"]) - downtime
        else:
            if state["handshake"] is None or state["channel"] is not None:
                raise ValueError("a connection in set-up without its handshake")
            self._handshake = Handshake.restore_state(state["handshake"], identity, random)
            if state["setup_in"] is None:
                raise ValueError("a connection in set-up without its deadline")
            self._deadline = now + float(state["setup_in"])
        out = state["out"]
        if not isinstance(out, bytes):
            raise ValueError("output of the wrong type")
        self._out = [out] if out else []
        self._out_size = len(out)
        return self
