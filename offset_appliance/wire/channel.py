"""The secure channel (docs/protocol.md section 3): handshake, encrypted frames and rekeying."""

from __future__ import annotations

import enum
import hmac
import os
from collections.abc import Callable
from typing import Any, Protocol, TypedDict

from nacl._sodium import ffi as _ffi
from nacl._sodium import lib as _lib
from nacl.signing import SigningKey

from ..errors import CloseReason, ProtocolError
from .fastpath import (
    Forwarded,
    channel_user_prefix,
    channel_user_prefix_padded,
    decode_channel_message,
    decode_dh,
    decode_rand_nonce,
    encode_channel_rekey_fast,
    encode_channel_user,
    encode_channel_user_padded,
    encode_dh,
    encode_rand_nonce,
    forward_channel_message,
    forward_ka_message,
)
from .frames import HEADER_LEN
from .messages import (
    KEEPALIVE,
    RAND_NONCE_LEN,
    SALT_LEN,
    ExchangeDh,
    ExchangeRandNonce,
    Rekey,
)

NONCE_LEN = 12
TAG_LEN = 16

Random = Callable[[int], bytes]


def hkdf_sha512_256(salt: bytes, ikm: bytes) -> bytes:
    """RFC 5869 HKDF with SHA-512/256, empty info, 32 bytes out (one block of output)."""
    prk = hmac.digest(salt, ikm, "sha512_256")
    return hmac.digest(prk, b"\x01", "sha512_256")


# ChaCha20-Poly1305-IETF straight through PyNaCl's libsodium binding: the same library
# calls as nacl.bindings' wrappers, without their per-call argument checks and zero-filled
# buffers, which cost more than the cipher itself for small messages (bench/PROFILE.md).
# Keys and nonces are checked where they are made: keys are 32 bytes, nonces 12.
_alloc = _ffi.new_allocator(should_clear_after_alloc=False)
_ABYTES = _lib.crypto_aead_chacha20poly1305_ietf_abytes()
_aead_encrypt = _lib.crypto_aead_chacha20poly1305_ietf_encrypt
_aead_decrypt = _lib.crypto_aead_chacha20poly1305_ietf_decrypt
_NULL = _ffi.NULL


class _Buffer(Protocol):
    """What cffi's ``ffi.buffer`` gives: slicing it copies the memory out as bytes."""

    def __getitem__(self, index: slice, /) -> bytes: ...


_buffer: Callable[[Any, int], _Buffer] = _ffi.buffer


def _encrypt(nonce: bytes, key: bytes, plaintext: bytes) -> bytes:
    """``nonce || ciphertext || tag``, in one buffer."""
    size = len(plaintext) + _ABYTES
    out = _alloc("unsigned char[]", NONCE_LEN + size)
    out[0:NONCE_LEN] = nonce
    # The output length is known (libsodium takes NULL for it).
    _aead_encrypt(out + NONCE_LEN, _NULL, plaintext, len(plaintext), _NULL, 0, _NULL, nonce, key)
    return _buffer(out, NONCE_LEN + size)[:]


_memmove = _ffi.memmove


def _encrypt_frame(nonce: bytes, key: bytes, prefix: bytes, rest: bytes | memoryview) -> memoryview:
    """The whole frame (its length, then ``nonce || ciphertext || tag``) sealing
    ``prefix + rest``, in one buffer: the plaintext is copied in once and encrypted in place
    (libsodium encrypts in place when the output is the input), and the buffer goes out as
    it is, without the copies of a join and of ``_encrypt``'s result."""
    plain = len(prefix) + len(rest)
    payload = NONCE_LEN + plain + _ABYTES
    out = _alloc("unsigned char[]", HEADER_LEN + payload)
    out[0:HEADER_LEN] = payload.to_bytes(HEADER_LEN, "big")
    out[HEADER_LEN : HEADER_LEN + NONCE_LEN] = nonce
    body = out + (HEADER_LEN + NONCE_LEN)
    _memmove(body, prefix, len(prefix))
    _memmove(body + len(prefix), rest, len(rest))
    _aead_encrypt(body, _NULL, body, plain, _NULL, 0, _NULL, nonce, key)
    return memoryview(_buffer(out, HEADER_LEN + payload))  # type: ignore[arg-type]


def _decrypt(frame: bytes | memoryview, nonce: bytes, key: bytes) -> bytes | None:
    """The plaintext of ``frame`` (nonce, ciphertext, tag), or None if it fails to verify."""
    size = len(frame) - NONCE_LEN - _ABYTES
    out = _alloc("unsigned char[]", max(size, 1))
    source = _ffi.from_buffer(frame)
    result = _aead_decrypt(
        out, _NULL, _NULL, source + NONCE_LEN, size + _ABYTES, _NULL, 0, nonce, key
    )
    if result != 0:
        return None
    return _buffer(out, size)[:]


# The handshake's X25519 and Ed25519 calls, straight through the same binding for the same
# reason: nacl.bindings' wrappers and PyNaCl's key objects cost about as much again as the
# curve arithmetic. Every argument is bytes of the right length where these are called
# (the decoders check the lengths of keys and signatures).
_scalarmult = _lib.crypto_scalarmult
_scalarmult_base = _lib.crypto_scalarmult_base
_sign = _lib.crypto_sign
_sign_open: Callable[..., int] = _lib.crypto_sign_open
_ZERO_KEY = bytes(32)


def _x25519(private: bytes, public: bytes) -> bytes | None:
    """The X25519 shared secret, or None when libsodium refuses the point (all-zero result)."""
    if len(private) != 32 or len(public) != 32:
        return None
    out = _alloc("unsigned char[]", 32)
    if _scalarmult(out, private, public) != 0:
        return None
    return _buffer(out, 32)[:]


def _x25519_base(private: bytes) -> bytes:
    out = _alloc("unsigned char[]", 32)
    if _scalarmult_base(out, private) != 0:
        raise RuntimeError("X25519 of the base point failed")  # libsodium never does this
    return _buffer(out, 32)[:]


def sign_detached(secret_key: bytes, message: bytes) -> bytes:
    """The Ed25519 signature of ``message`` by a 64-byte libsodium secret key."""
    # The binding has crypto_sign (signature then message) but not its detached form.
    out = _alloc("unsigned char[]", 64 + len(message))
    _sign(out, _NULL, message, len(message), secret_key)
    return _buffer(out, 64)[:]


def verify_detached(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` (64 bytes) is ``public_key``'s (32 bytes) over ``message``: the
    check PyNaCl's ``VerifyKey.verify`` makes, through the same ``crypto_sign_open``."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    out = _alloc("unsigned char[]", max(len(message), 1))
    return _sign_open(out, _NULL, signature + message, 64 + len(message), public_key) == 0


def derive_keys(
    dh_private: bytes, peer_dh_public: bytes, own_salt: bytes, peer_salt: bytes
) -> tuple[bytes, bytes]:
    """(send_key, recv_key) from an X25519 exchange; refuses low-order peer points."""
    if not (isinstance(dh_private, bytes) and isinstance(peer_dh_public, bytes)):
        raise ProtocolError("invalid Diffie-Hellman public key", CloseReason.BAD_DH_KEY)
    shared = _x25519(dh_private, peer_dh_public)
    if shared is None:
        raise ProtocolError("invalid Diffie-Hellman public key", CloseReason.BAD_DH_KEY)
    if shared == _ZERO_KEY:
        raise ProtocolError("low-order Diffie-Hellman public key", CloseReason.BAD_DH_KEY)
    return hkdf_sha512_256(own_salt, shared), hkdf_sha512_256(peer_salt, shared)


def _new_dh(random: Random) -> tuple[bytes, bytes, bytes]:
    """A fresh X25519 key pair and salt: (private, public, salt)."""
    private = random(32)
    return private, _x25519_base(private), random(SALT_LEN)


class ChannelExport(TypedDict):
    """``SecureChannel.export_state``: each direction as ``[key, nonce counter]``, the
    rekey started (``[private key, salt]``), the frames to send, the rekeys done."""

    send: list[bytes | int] | None
    recv: list[bytes | int] | None
    old_recv: list[bytes | int] | None
    pending: list[bytes] | None
    outbox: list[bytes]
    rekeys: int


class HandshakeExport(TypedDict):
    """``Handshake.export_state``: the phase's name, our keys and nonce, the key exchange
    under way (``[private, public, salt]``) and the peer's key once known."""

    state: str
    public_key: bytes
    expected_peer: bytes | None
    my_nonce: bytes
    dh: list[bytes] | None
    peer_public_key: bytes | None


class PaddingSource:
    """Random padding for channel messages: a length 0..255 and that many random bytes.

    The original draws 0..65535 bytes (docs/protocol.md 3.2); ours keeps the intended 0..255.
    Randomness is read from the OS CSPRNG in bulk, so padding costs no syscall per message.
    """

    __slots__ = ("_pool", "_pos", "_random")

    POOL = 1 << 16

    def __init__(self, random: Random = os.urandom) -> None:
        self._random = random
        self._pool = b""
        self._pos = 0

    def length(self) -> int:
        """A padding length alone, 0..255 (for ``encode_channel_user_padded``)."""
        pos = self._pos
        pool = self._pool
        if pos >= len(pool):
            pool = self._pool = self._random(self.POOL)
            pos = 0
        self._pos = pos + 1
        return pool[pos]

    def __call__(self) -> bytes:
        pos = self._pos
        pool = self._pool
        if pos + 256 > len(pool):
            pool = self._pool = self._random(self.POOL)
            pos = 0
        length = pool[pos]
        self._pos = pos + 1 + length
        return pool[pos + 1 : pos + 1 + length]


# One pool serves every channel in the process: a pool per channel cost each connection
# 64 KiB of memory (and of CSPRNG output) from its first message on.
_SHARED_PADDING = PaddingSource()
# The packed ChannelMessage carrying a keepAlive, per padding length (made when first used).
_KEEPALIVE_PLAINTEXTS: list[bytes | None] = [None] * 256


class _Direction:
    """One direction's key and nonce counter (little-endian, as libsodium increments)."""

    __slots__ = ("key", "counter")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.counter = 0

    def nonce(self) -> bytes:
        return self.counter.to_bytes(NONCE_LEN, "little")


class SecureChannel:
    """Encrypts and decrypts channel frames after the handshake, and runs rekeys."""

    __slots__ = (
        "_send",
        "_recv",
        "_old_recv",
        "_pending",
        "_random",
        "_padding",
        "outbox",
        "rekeys",
    )

    def __init__(self, send_key: bytes, recv_key: bytes, random: Random = os.urandom) -> None:
        self._send = _Direction(send_key)
        self._recv = _Direction(recv_key)
        self._old_recv: _Direction | None = None
        self._pending: tuple[bytes, bytes] | None = None  # our rekey awaiting an answer
        self._random = random
        self._padding = _SHARED_PADDING if random is os.urandom else PaddingSource(random)
        # Frames the channel itself must send (rekey answers), in order, before anything else.
        self.outbox: list[bytes] = []
        self.rekeys = 0  # key switches completed, whoever started them

    def _seal(self, plaintext: bytes) -> bytes:
        send = self._send
        nonce = send.counter.to_bytes(NONCE_LEN, "little")
        send.counter += 1
        return _encrypt(nonce, send.key, plaintext)

    def seal(self, user: bytes) -> bytes:
        """The frame payload carrying ``user`` (a KaMessage) to the peer."""
        padding = self._padding
        if padding is _SHARED_PADDING:
            # The process's padding bytes for a random length: the packed start of the
            # message is then made once per pair of lengths.
            return self._seal(encode_channel_user_padded(padding.length(), user))
        return self._seal(encode_channel_user(padding(), user))

    def seal_keepalive(self) -> bytes:
        """``seal(KEEPALIVE)``: an idle connection's one message, its plaintext for each
        padding length made once per process."""
        padding = self._padding
        if padding is _SHARED_PADDING:
            length = padding.length()
            plaintext = _KEEPALIVE_PLAINTEXTS[length]
            if plaintext is None:
                plaintext = _KEEPALIVE_PLAINTEXTS[length] = encode_channel_user_padded(
                    length, KEEPALIVE
                )
            return self._seal(plaintext)
        return self._seal(encode_channel_user(padding(), KEEPALIVE))

    def carried_prefix(self, length: int) -> bytes:
        """The packed start of our ChannelMessage (header words, a padding) carrying user
        data of ``length`` bytes whose packed words follow it as they came."""
        padding = self._padding
        if padding is _SHARED_PADDING:
            return channel_user_prefix_padded(padding.length(), length)
        return channel_user_prefix(padding(), length)

    def frame_carried(self, length: int, words: bytes | memoryview) -> memoryview:
        """The whole frame (its length prefix too) sealing user data of ``length`` bytes
        given as its packed words (from ``open_forward``), carried into our message as they
        are, in one buffer."""
        prefix = self.carried_prefix(length)
        send = self._send
        nonce = send.counter.to_bytes(NONCE_LEN, "little")
        send.counter += 1
        return _encrypt_frame(nonce, send.key, prefix, words)

    def start_rekey(self) -> bytes | None:
        """Begin a rekey; returns the frame to send, or None if one is already pending."""
        if self._pending is not None:
            return None
        private, public, salt = _new_dh(self._random)
        self._pending = (private, salt)
        return self._seal(encode_channel_rekey_fast(self._padding(), Rekey(public, salt)))

    def _try_open(
        self, direction: _Direction, nonce: bytes, frame: bytes | memoryview
    ) -> bytes | None:
        if nonce != direction.counter.to_bytes(NONCE_LEN, "little"):
            return None
        plain = _decrypt(frame, nonce, direction.key)
        if plain is None:
            return None
        direction.counter += 1
        return plain

    def open(self, frame: bytes | memoryview) -> bytes | None:
        """Decrypt one frame: the user payload, or None when it was a rekey (handled here)."""
        return self.content(self.decrypt(frame))

    def open_forward(self, frame: bytes | memoryview) -> tuple[Forwarded | None, int] | None:
        """``open`` for a frame whose KaMessage the relay forwards: None when it was a
        rekey (handled here), else ``(what Connection.send_packed takes, its payload's
        length)``, with None and 0 for a keepalive. A ChannelMessage and KaMessage in our
        layout are checked in place and forwarded as they came (``forward_channel_message``),
        anything else decoded first; whatever ``open`` and ``forward_ka_message`` refuse
        raises the same error."""
        recv = self._recv
        nonce = recv.counter.to_bytes(NONCE_LEN, "little")
        if (
            self._old_recv is None
            and len(frame) >= NONCE_LEN + TAG_LEN
            and frame[:NONCE_LEN] == nonce
        ):
            # The usual frame, as decrypt takes it (no rekey settling), in one call.
            plain = _decrypt(frame, nonce, recv.key)
            if plain is not None:
                recv.counter += 1
            else:
                plain = self.decrypt(frame)  # raises what it raises
        else:
            plain = self.decrypt(frame)
        forwarded = forward_channel_message(plain)
        if forwarded is not None:
            return forwarded
        user = self.content(plain)
        if user is None:
            return None
        forwarded = forward_ka_message(user)
        return (None, 0) if forwarded is None else forwarded

    def decrypt(self, frame: bytes | memoryview) -> bytes:
        """The plaintext of one frame (a packed ChannelMessage), under the receiving key or
        the one before it while a rekey settles."""
        if len(frame) < NONCE_LEN + TAG_LEN:
            raise ProtocolError("encrypted frame too short")
        nonce = bytes(frame[:NONCE_LEN])
        plain = None
        if self._old_recv is not None:
            plain = self._try_open(self._old_recv, nonce, frame)
        if plain is None:
            plain = self._try_open(self._recv, nonce, frame)
            if plain is None:
                raise ProtocolError(
                    "frame failed to decrypt (bad nonce or tag)", CloseReason.DECRYPT_FAILED
                )
            self._old_recv = None
        return plain

    def content(self, plain: bytes) -> bytes | None:
        """The user data of a decrypted ChannelMessage, or None for a Rekey (handled here)."""
        content = decode_channel_message(plain)
        if isinstance(content, Rekey):
            self._on_rekey(content)
            return None
        return content

    def _on_rekey(self, rekey: Rekey) -> None:
        if self._pending is None:
            # We answer: our Rekey goes out under the old send key, then the sender switches.
            private, public, salt = _new_dh(self._random)
            send_key, recv_key = derive_keys(private, rekey.dh_public_key, salt, rekey.key_salt)
            self.outbox.append(
                self._seal(encode_channel_rekey_fast(self._padding(), Rekey(public, salt)))
            )
        else:
            # Their message answers ours (or crossed it: simultaneous rekeys are legal).
            private, salt = self._pending
            self._pending = None
            send_key, recv_key = derive_keys(private, rekey.dh_public_key, salt, rekey.key_salt)
        self._send = _Direction(send_key)
        self._old_recv = self._recv
        self._recv = _Direction(recv_key)
        self.rekeys += 1

    # ---- hand-over (relay/handover.py) ------------------------------------------------

    def export_state(self) -> ChannelExport:
        """Keys, nonce counters and rekey state, as plain data (secret: see SECURITY.md)."""

        def direction(d: _Direction | None) -> list[bytes | int] | None:
            return None if d is None else [d.key, d.counter]

        return {
            "send": direction(self._send),
            "recv": direction(self._recv),
            "old_recv": direction(self._old_recv),
            "pending": None if self._pending is None else list(self._pending),
            "outbox": list(self.outbox),
            "rekeys": self.rekeys,
        }

    @classmethod
    def restore_state(cls, state: ChannelExport, random: Random = os.urandom) -> SecureChannel:
        """Rebuild a channel from ``export_state``; ``ValueError`` if anything is off."""

        def direction(value: list[bytes | int] | None) -> _Direction | None:
            if value is None:
                return None
            key: object = value[0]
            counter: object = value[1]
            if len(value) != 2:
                raise ValueError("channel direction of the wrong shape")
            if not (isinstance(key, bytes) and len(key) == 32):
                raise ValueError("channel key of the wrong length")
            if not (isinstance(counter, int) and 0 <= counter < 1 << (8 * NONCE_LEN)):
                raise ValueError("nonce counter out of range")
            d = _Direction(key)
            d.counter = counter
            return d

        send, recv = direction(state["send"]), direction(state["recv"])
        if send is None or recv is None:
            raise ValueError("channel without keys")
        channel = cls(send.key, recv.key, random)
        channel._send, channel._recv = send, recv
        channel._old_recv = direction(state["old_recv"])
        pending = state["pending"]
        if pending is not None:
            private, salt = pending
            if not (isinstance(private, bytes) and len(private) == 32):
                raise ValueError("pending rekey key of the wrong length")
            if not (isinstance(salt, bytes) and len(salt) == SALT_LEN):
                raise ValueError("pending rekey salt of the wrong length")
            channel._pending = (private, salt)
        outbox = state["outbox"]
        if not all(isinstance(frame, bytes) for frame in outbox):
            raise ValueError("channel outbox of the wrong type")
        channel.outbox = list(outbox)
        channel.rekeys = int(state["rekeys"])
        return channel


class _HandshakeState(enum.Enum):
    AWAIT_NONCE = enum.auto()
    AWAIT_DH = enum.auto()
    DONE = enum.auto()


class Handshake:
    """The symmetric four-frame handshake of docs/protocol.md 3.1, for one side."""

    __slots__ = (
        "_identity",
        "_secret_key",
        "_public_key",
        "_expected_peer",
        "_random",
        "_state",
        "_my_nonce",
        "_dh",
        "peer_public_key",
        "channel",
    )

    def __init__(
        self,
        identity: SigningKey,
        expected_peer: bytes | None = None,
        random: Random = os.urandom,
    ) -> None:
        self._identity = identity
        # The 64-byte libsodium secret key (seed and public key) that signs our ExchangeDh.
        self._secret_key = identity._signing_key
        self._public_key = bytes(identity.verify_key)
        self._expected_peer = expected_peer
        self._random = random
        self._state = _HandshakeState.AWAIT_NONCE
        self._my_nonce = random(RAND_NONCE_LEN)
        self._dh: tuple[bytes, bytes, bytes] | None = None
        self.peer_public_key: bytes | None = None
        self.channel: SecureChannel | None = None

    @property
    def done(self) -> bool:
        """Whether the channel is established (``channel`` and ``peer_public_key`` are set)."""
        return self._state is _HandshakeState.DONE

    def start(self) -> bytes:
        """Our ExchangeRandNonce, sent as soon as the connection is up."""
        return encode_rand_nonce(
            ExchangeRandNonce(self._my_nonce, self._public_key, self._expected_peer)
        )

    def receive(self, frame: bytes) -> bytes | None:
        """Take the peer's next handshake frame; returns the frame to send in reply, if any."""
        if self._state is _HandshakeState.AWAIT_NONCE:
            peer = decode_rand_nonce(frame)
            if self._expected_peer is not None and peer.src_public_key != self._expected_peer:
                raise ProtocolError(
                    f"peer proved a different public key than expected: "
                    f"{_b64(peer.src_public_key)}, expected {_b64(self._expected_peer)}",
                    CloseReason.WRONG_KEY,
                )
            self.peer_public_key = peer.src_public_key
            private, public, salt = self._dh = _new_dh(self._random)
            signature = sign_detached(self._secret_key, public + peer.rand_nonce + salt)
            self._state = _HandshakeState.AWAIT_DH
            return encode_dh(ExchangeDh(public, peer.rand_nonce, salt, signature))
        if self._state is _HandshakeState.AWAIT_DH:
            dh = decode_dh(frame)
            if dh.rand_nonce != self._my_nonce:
                raise ProtocolError(
                    "peer echoed the wrong handshake nonce", CloseReason.WRONG_NONCE
                )
            assert self.peer_public_key is not None and self._dh is not None
            if not verify_detached(
                self.peer_public_key, dh.dh_public_key + dh.rand_nonce + dh.key_salt, dh.signature
            ):
                raise ProtocolError("bad handshake signature", CloseReason.BAD_SIGNATURE)
            private, _public, salt = self._dh
            send_key, recv_key = derive_keys(private, dh.dh_public_key, salt, dh.key_salt)
            self._dh = None
            self.channel = SecureChannel(send_key, recv_key, self._random)
            self._state = _HandshakeState.DONE
            return None
        raise ProtocolError("handshake frame after the handshake ended")

    # ---- hand-over (relay/handover.py) ------------------------------------------------

    def export_state(self) -> HandshakeExport:
        """Where the handshake stands, as plain data (its DH private key is secret)."""
        return {
            "state": self._state.name,
            "public_key": self._public_key,
            "expected_peer": self._expected_peer,
            "my_nonce": self._my_nonce,
            "dh": None if self._dh is None else list(self._dh),
            "peer_public_key": self.peer_public_key,
        }

    @classmethod
    def restore_state(
        cls, state: HandshakeExport, identity: SigningKey, random: Random = os.urandom
    ) -> Handshake:
        """Rebuild a handshake under way; ``ValueError`` if it was another identity's."""
        if state["public_key"] != bytes(identity.verify_key):
            raise ValueError("handshake under way as another identity")
        try:
            phase = _HandshakeState[state["state"]]
        except KeyError:
            raise ValueError(f"unknown handshake state {state['state']!r}") from None
        if phase is _HandshakeState.DONE:
            raise ValueError("a finished handshake is not restored")
        my_nonce = state["my_nonce"]
        if not (isinstance(my_nonce, bytes) and len(my_nonce) == RAND_NONCE_LEN):
            raise ValueError("handshake nonce of the wrong length")
        handshake = cls(identity, state["expected_peer"], random)
        handshake._state = phase
        handshake._my_nonce = my_nonce
        dh = state["dh"]
        if phase is _HandshakeState.AWAIT_DH:
            if dh is None:
                raise ValueError("handshake awaiting the key exchange without its keys")
            private, public, salt = dh
            if not all(isinstance(x, bytes) for x in (private, public, salt)):
                raise ValueError("handshake key exchange of the wrong type")
            if len(private) != 32 or len(public) != 32 or len(salt) != SALT_LEN:
                raise ValueError("handshake key exchange of the wrong length")
            peer = state["peer_public_key"]
            if not (isinstance(peer, bytes) and len(peer) == 32):
                raise ValueError("handshake peer key of the wrong length")
            handshake._dh = (private, public, salt)
            handshake.peer_public_key = peer
        elif dh is not None:
            raise ValueError("key exchange before the peer's nonce")
        return handshake


def _b64(key: bytes) -> str:
    """A key as the identity and ticket files write it (base64url, no padding)."""
    import base64

    return base64.urlsafe_b64encode(key).rstrip(b"=").decode("ascii")
