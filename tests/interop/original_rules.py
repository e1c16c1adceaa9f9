"""A peer that keeps the original Offset node's rules, for tests that have no original build.

It follows components/keepalive/src/keepalive.rs and components/secure_channel/src/*.rs of
the original (docs/protocol.md sections 3 and 4), counted in ticks as the original counts:

- ``ticks_to_close`` starts at ``keepalive_ticks`` and goes back to it only when a KaMessage
  (either variant) arrives; each tick takes one off and at zero the peer closes.
- ``ticks_to_send_keepalive`` starts at half of that and goes back to it only when the peer
  sends a KaMessage; each tick takes one off and at zero a ``keepAlive`` goes out.
- Rekey frames, sent or received, touch neither; a received Rekey (an answer to ours or the
  start of the other side's) restarts the rekey countdown of ``ticks_to_rekey``, which
  otherwise loses one per tick and, once at zero, sends a Rekey on the next tick (or on
  every tick while our previous rekey is unanswered).
- Every channel message carries 0 to 65,535 bytes of random padding (two random bytes,
  big-endian, give the length).

The handshake and the cipher are the relay's own (known-answer tests check those against
independent code); the timers and the padding are this file's own, so a relay that gets
them wrong fails against it.
"""

from __future__ import annotations

import os
import socket
import threading
import time

from nacl.signing import SigningKey

from offset_appliance.wire.channel import Handshake, SecureChannel
from offset_appliance.wire.connection import VERSION_FRAME
from offset_appliance.wire.fastpath import (
    decode_ka_message,
    encode_ka_message,
)
from offset_appliance.wire.frames import FrameDecoder, encode_frame
from offset_appliance.wire.messages import (
    KEEPALIVE,
    encode_init_connection,
)

KEEPALIVE_TICKS = 0x20
TICKS_TO_REKEY = 3600


class PeerClosed(Exception):
    """The peer closed the connection, as the original would (the reason is the message)."""


def original_padding() -> bytes:
    """0 to 65,535 random bytes, the length read big-endian from two random bytes."""
    return os.urandom(int.from_bytes(os.urandom(2), "big"))


class OriginalRulesPeer:
    """One connection's protocol stack with the original's timer rules, sans-IO and in ticks."""

    def __init__(
        self,
        identity: SigningKey | None = None,
        *,
        expected_peer: bytes | None = None,
        keepalive_ticks: int = KEEPALIVE_TICKS,
        ticks_to_rekey: int = TICKS_TO_REKEY,
    ) -> None:
        self.identity = identity or SigningKey.generate()
        self.keepalive_ticks = keepalive_ticks
        self.ticks_to_rekey = ticks_to_rekey
        self._decoder = FrameDecoder()
        self._handshake: Handshake | None = Handshake(self.identity, expected_peer)
        self._version_seen = False
        self.channel: SecureChannel | None = None
        self._out = [VERSION_FRAME, encode_frame(self._handshake.start())]
        self.ticks_to_close = keepalive_ticks
        self.ticks_to_send_keepalive = keepalive_ticks // 2
        self.cur_ticks_to_rekey = ticks_to_rekey
        self.ticks = 0
        self.keepalives_received = 0
        self.rekeys_started = 0
        self.rekeys_received = 0
        self.closed: str | None = None

    @property
    def is_open(self) -> bool:
        return self.channel is not None and self.closed is None

    def _close(self, reason: str) -> None:
        self.closed = reason
        raise PeerClosed(reason)

    # ---- input ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[bytes]:
        """Bytes from the relay; returns the KaMessage.message payloads they complete."""
        if self.closed is not None:
            raise PeerClosed(self.closed)
        messages = []
        for frame in self._decoder.feed(data):
            if not self._version_seen:
                if frame != VERSION_FRAME[8:]:
                    self._close("wrong version frame")
                self._version_seen = True
            elif self._handshake is not None:
                reply = self._handshake.receive(frame)
                if reply is not None:
                    self._out.append(encode_frame(reply))
                if self._handshake.done:
                    self.channel = self._handshake.channel
                    self.channel._padding = original_padding  # type: ignore[union-attr]
                    self._handshake = None
            else:
                message = self._receive_channel(frame)
                if message is not None:
                    messages.append(message)
        return messages

    def _receive_channel(self, frame: bytes) -> bytes | None:
        channel = self.channel
        assert channel is not None
        user = channel.open(frame)
        if user is None:  # a Rekey: rekey_occurred restarts the countdown, nothing else
            self.rekeys_received += 1
            self.cur_ticks_to_rekey = self.ticks_to_rekey
            for answer in channel.outbox:
                self._out.append(encode_frame(answer))
            channel.outbox.clear()
            return None
        message = decode_ka_message(user)  # raises on a KaMessage that does not decode
        self.ticks_to_close = self.keepalive_ticks
        if message is None:
            self.keepalives_received += 1
        return message

    # ---- output --------------------------------------------------------------------------

    def send(self, message: bytes) -> None:
        """One KaMessage.message (a relay message or tunnel data)."""
        assert self.channel is not None
        self._out.append(encode_frame(self.channel.seal(encode_ka_message(message))))
        self.ticks_to_send_keepalive = self.keepalive_ticks // 2

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out = []
        return out

    # ---- time ----------------------------------------------------------------------------

    def tick(self) -> None:
        """One timer tick: the keepalive loop's, then the secure channel loop's."""
        if self.channel is None:
            return
        self.ticks += 1
        self.ticks_to_close = max(0, self.ticks_to_close - 1)
        self.ticks_to_send_keepalive = max(0, self.ticks_to_send_keepalive - 1)
        if self.ticks_to_close == 0:
            self._close(f"no KaMessage for {self.keepalive_ticks} ticks (tick {self.ticks})")
        if self.ticks_to_send_keepalive == 0:
            self._out.append(encode_frame(self.channel.seal(KEEPALIVE)))
            self.ticks_to_send_keepalive = self.keepalive_ticks // 2
        if self.cur_ticks_to_rekey > 0:
            self.cur_ticks_to_rekey -= 1
            return
        frame = self.channel.start_rekey()
        if frame is None:  # RekeyInProgress: try again on the next tick
            return
        self._out.append(encode_frame(frame))
        self.rekeys_started += 1
        self.cur_ticks_to_rekey = self.ticks_to_rekey


class LivePeer:
    """An ``OriginalRulesPeer`` on a real socket, ticking every ``tick`` seconds in a thread."""

    def __init__(self, address: tuple[str, int], tick: float, **kwargs) -> None:
        self.peer = OriginalRulesPeer(**kwargs)
        self.tick = tick
        self.sock = socket.create_connection(address, timeout=10)
        self.inbox: list[bytes] = []
        self.error: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.sock.sendall(self.peer.data_to_send())
        self._thread.start()

    @property
    def public_key(self) -> bytes:
        return bytes(self.peer.identity.verify_key)

    def _run(self) -> None:
        next_tick = time.monotonic() + self.tick
        try:
            while not self._stop.is_set():
                self.sock.settimeout(max(0.001, next_tick - time.monotonic()))
                try:
                    data = self.sock.recv(1 << 16)
                    if not data:
                        raise PeerClosed("the relay closed the connection")
                    with self._lock:
                        self.inbox.extend(self.peer.receive_data(data))
                except TimeoutError:
                    pass
                with self._lock:
                    if time.monotonic() >= next_tick:
                        next_tick += self.tick
                        self.peer.tick()
                    out = self.peer.data_to_send()
                    if out:
                        self.sock.sendall(out)
        except Exception as exc:  # reported by wait_open, wait_message and the tests
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.sock.close()

    def wait_open(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.peer.is_open:
            if self.error or time.monotonic() > deadline:
                raise AssertionError(f"handshake did not finish: {self.error}")
            time.sleep(0.01)

    def send(self, message: bytes) -> None:
        with self._lock:
            self.peer.send(message)
            self.sock.sendall(self.peer.data_to_send())

    def send_init(self, init) -> None:
        self.send(encode_init_connection(init))

    def wait_message(self, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self.inbox:
                    return self.inbox.pop(0)
            if self.error or time.monotonic() > deadline:
                raise AssertionError(f"no message: {self.error}")
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
