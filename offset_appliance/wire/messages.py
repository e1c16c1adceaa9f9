"""The Offset messages (docs/protocol.md section 8), one frozen dataclass each, with the
general codecs: every layout through the general builder and reader of ``capnp``. The
specialised codecs of the hot path, which must agree with these, are in ``fastpath``.

Keys, nonces, salts and signatures travel as ``BufferN`` structs whose i-th UInt64 is the
big-endian reading of bytes 8i..8i+8; each struct that wraps one (``PublicKey``, ``Salt``,
...) is a struct with a single pointer to it.

``decode`` functions raise ``ProtocolError`` on any malformed input and nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Self, TypeVar

from ..errors import ProtocolError
from .capnp import (
    MessageBuilder,
    StructReader,
    pack,
    read_message,
    read_unpacked,
    struct_pointer,
    unpack_bytearray,
)

PUBLIC_KEY_LEN = 32
DH_PUBLIC_KEY_LEN = 32
SALT_LEN = 32
RAND_NONCE_LEN = 16
SIGNATURE_LEN = 64

# Union tags.
INIT_LISTEN, INIT_ACCEPT, INIT_CONNECT = 0, 1, 2
KA_KEEPALIVE, KA_MESSAGE = 0, 1
CONTENT_REKEY, CONTENT_USER = 0, 1
DEST_EMPTY, DEST_PUBLIC_KEY = 0, 1

# BufferN <-> bytes: read the words little-endian as Cap'n Proto stores them, write them
# big-endian as the protocol reads them (and back).
WORDS_LE = {size: struct.Struct(f"<{size // 8}Q") for size in (16, 32, 64)}
WORDS_BE = {size: struct.Struct(f">{size // 8}Q") for size in (16, 32, 64)}


def _check_bytes(name: str, value: object, size: int) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise ValueError(f"{name} must be {size} bytes")


def _put_buffer(builder: MessageBuilder, pointer: int, value: bytes) -> None:
    """A wrapper struct (PublicKey, Salt, ...) holding a BufferN of ``value``."""
    wrapper = builder.set_struct(pointer, 0, 1)
    words = len(value) // 8
    inner = builder.set_struct(wrapper, words, 0)
    builder.set_words(inner, WORDS_BE[len(value)].unpack(value))


def _get_buffer(parent: StructReader, index: int, size: int, what: str) -> bytes:
    """The bytes of the BufferN inside the wrapper struct at pointer ``index``."""
    wrapper = parent.struct(index)
    inner = None if wrapper is None else wrapper.struct(0)
    if inner is None:
        raise ProtocolError(f"{what} is missing")
    return WORDS_BE[size].pack(*WORDS_LE[size].unpack(inner.data_section(size // 8)))


def unpacked_words(data: bytes) -> bytearray:
    """The words of a packed message, unpacked once for both the fast path and the reader."""
    if isinstance(data, bytes):
        return unpack_bytearray(data)
    if isinstance(data, bytearray | memoryview):
        return unpack_bytearray(bytes(data))
    raise ProtocolError("message is not bytes")


def _root(data: bytes) -> StructReader:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError("message is not bytes")
    return read_message(data).root()


# ---- handshake ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExchangeRandNonce:
    """First handshake message: a nonce, the sender's key and the key it expects, if any."""

    rand_nonce: bytes
    src_public_key: bytes
    opt_dest_public_key: bytes | None

    def __post_init__(self) -> None:
        _check_bytes("rand_nonce", self.rand_nonce, RAND_NONCE_LEN)
        _check_bytes("src_public_key", self.src_public_key, PUBLIC_KEY_LEN)
        if self.opt_dest_public_key is not None:
            _check_bytes("opt_dest_public_key", self.opt_dest_public_key, PUBLIC_KEY_LEN)

    def encode(self) -> bytes:
        """The packed Cap'n Proto encoding, through the general builder."""
        builder = MessageBuilder()
        root = builder.set_struct(0, 1, 3)
        _put_buffer(builder, root + 1, self.rand_nonce)
        _put_buffer(builder, root + 2, self.src_public_key)
        if self.opt_dest_public_key is not None:
            builder.set_word(root, DEST_PUBLIC_KEY)
            _put_buffer(builder, root + 3, self.opt_dest_public_key)
        return builder.finish()

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse a packed encoding with the general reader; raises ProtocolError if it is
        malformed."""
        root = _root(data)
        rand_nonce = _get_buffer(root, 0, RAND_NONCE_LEN, "randNonce")
        src = _get_buffer(root, 1, PUBLIC_KEY_LEN, "srcPublicKey")
        tag = root.uint16(0)
        if tag == DEST_EMPTY:
            dest = None
        elif tag == DEST_PUBLIC_KEY:
            dest = _get_buffer(root, 2, PUBLIC_KEY_LEN, "optDestPublicKey")
        else:
            raise ProtocolError(f"unknown optDestPublicKey variant {tag}")
        return cls(rand_nonce, src, dest)


@dataclass(frozen=True, slots=True)
class ExchangeDh:
    """Second handshake message: a signed X25519 key, the peer's nonce echoed, a salt."""

    dh_public_key: bytes
    rand_nonce: bytes
    key_salt: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _check_bytes("dh_public_key", self.dh_public_key, DH_PUBLIC_KEY_LEN)
        _check_bytes("rand_nonce", self.rand_nonce, RAND_NONCE_LEN)
        _check_bytes("key_salt", self.key_salt, SALT_LEN)
        _check_bytes("signature", self.signature, SIGNATURE_LEN)

    def encode(self) -> bytes:
        """The packed Cap'n Proto encoding, through the general builder."""
        builder = MessageBuilder()
        root = builder.set_struct(0, 0, 4)
        _put_buffer(builder, root, self.dh_public_key)
        _put_buffer(builder, root + 1, self.rand_nonce)
        _put_buffer(builder, root + 2, self.key_salt)
        _put_buffer(builder, root + 3, self.signature)
        return builder.finish()

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse a packed encoding with the general reader; raises ProtocolError if it is
        malformed."""
        root = _root(data)
        return cls(
            _get_buffer(root, 0, DH_PUBLIC_KEY_LEN, "dhPublicKey"),
            _get_buffer(root, 1, RAND_NONCE_LEN, "randNonce"),
            _get_buffer(root, 2, SALT_LEN, "keySalt"),
            _get_buffer(root, 3, SIGNATURE_LEN, "signature"),
        )


@dataclass(frozen=True, slots=True)
class Rekey:
    """A new X25519 key and salt, sent inside the channel to replace the keys."""

    dh_public_key: bytes
    key_salt: bytes

    def __post_init__(self) -> None:
        _check_bytes("dh_public_key", self.dh_public_key, DH_PUBLIC_KEY_LEN)
        _check_bytes("key_salt", self.key_salt, SALT_LEN)

    def _build(self, builder: MessageBuilder, pointer: int) -> None:
        start = builder.set_struct(pointer, 0, 2)
        _put_buffer(builder, start, self.dh_public_key)
        _put_buffer(builder, start + 1, self.key_salt)

    @classmethod
    def _read(cls, reader: StructReader) -> Self:
        return cls(
            _get_buffer(reader, 0, DH_PUBLIC_KEY_LEN, "dhPublicKey"),
            _get_buffer(reader, 1, SALT_LEN, "keySalt"),
        )

    def encode(self) -> bytes:
        """The packed Cap'n Proto encoding of a Rekey on its own."""
        builder = MessageBuilder()
        self._build(builder, 0)
        return builder.finish()

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse a packed encoding; raises ProtocolError if it is malformed."""
        return cls._read(_root(data))


# ---- relay messages -----------------------------------------------------------------------


def _encode_public_key_message(public_key: bytes) -> bytes:
    builder = MessageBuilder()
    root = builder.set_struct(0, 0, 1)
    _put_buffer(builder, root, public_key)
    return builder.finish()


@dataclass(frozen=True, slots=True)
class RejectConnection:
    """A listener refuses the pending connection from ``public_key``."""

    public_key: bytes

    def __post_init__(self) -> None:
        _check_bytes("public_key", self.public_key, PUBLIC_KEY_LEN)

    def encode(self) -> bytes:
        """The packed Cap'n Proto encoding."""
        return _encode_public_key_message(self.public_key)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse a packed encoding; raises ProtocolError if it is malformed."""
        return cls(_get_buffer(_root(data), 0, PUBLIC_KEY_LEN, "publicKey"))


@dataclass(frozen=True, slots=True)
class IncomingConnection:
    """The relay tells a listener that ``public_key`` wants to connect to it."""

    public_key: bytes

    def __post_init__(self) -> None:
        _check_bytes("public_key", self.public_key, PUBLIC_KEY_LEN)

    def encode(self) -> bytes:
        """The packed Cap'n Proto encoding."""
        return _encode_public_key_message(self.public_key)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse a packed encoding; raises ProtocolError if it is malformed."""
        return cls(_get_buffer(_root(data), 0, PUBLIC_KEY_LEN, "publicKey"))


@dataclass(frozen=True, slots=True)
class Listen:
    """InitConnection ``listen``: the sender waits for incoming connections."""

    def encode(self) -> bytes:
        """The packed InitConnection."""
        return encode_init_connection(self)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse an InitConnection that must be ``listen``."""
        return _expect_init(cls, data)


@dataclass(frozen=True, slots=True)
class Accept:
    """InitConnection ``accept``: this new connection takes the one from ``public_key``."""

    public_key: bytes

    def __post_init__(self) -> None:
        _check_bytes("public_key", self.public_key, PUBLIC_KEY_LEN)

    def encode(self) -> bytes:
        """The packed InitConnection."""
        return encode_init_connection(self)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse an InitConnection that must be ``accept``."""
        return _expect_init(cls, data)


@dataclass(frozen=True, slots=True)
class Connect:
    """InitConnection ``connect``: the sender wants a tunnel to listener ``public_key``."""

    public_key: bytes

    def __post_init__(self) -> None:
        _check_bytes("public_key", self.public_key, PUBLIC_KEY_LEN)

    def encode(self) -> bytes:
        """The packed InitConnection."""
        return encode_init_connection(self)

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse an InitConnection that must be ``connect``."""
        return _expect_init(cls, data)


InitConnection = Listen | Accept | Connect


def encode_init_connection(msg: InitConnection) -> bytes:
    """The packed InitConnection for one of its three variants."""
    builder = MessageBuilder()
    root = builder.set_struct(0, 1, 1)
    if isinstance(msg, Listen):
        builder.set_word(root, INIT_LISTEN)
    elif isinstance(msg, Accept):
        builder.set_word(root, INIT_ACCEPT)
        _put_buffer(builder, root + 1, msg.public_key)
    elif isinstance(msg, Connect):
        builder.set_word(root, INIT_CONNECT)
        _put_buffer(builder, root + 1, msg.public_key)
    else:
        raise TypeError(f"not an InitConnection variant: {type(msg).__name__}")
    return builder.finish()


def decode_init_connection(data: bytes) -> InitConnection:
    """Parse a packed InitConnection; raises ProtocolError if it is malformed."""
    if data == _LISTEN_PACKED:
        return _LISTEN  # what every listener sends (our encoding and the original's)
    return decode_init_connection_general(data)


def decode_init_connection_general(data: bytes) -> InitConnection:
    """``decode_init_connection`` through the general reader alone."""
    root = _root(data)
    tag = root.uint16(0)
    if tag == INIT_LISTEN:
        return Listen()
    if tag == INIT_ACCEPT:
        return Accept(_get_buffer(root, 0, PUBLIC_KEY_LEN, "accept"))
    if tag == INIT_CONNECT:
        return Connect(_get_buffer(root, 0, PUBLIC_KEY_LEN, "connect"))
    raise ProtocolError(f"unknown InitConnection variant {tag}")


_LISTEN = Listen()
_LISTEN_PACKED = encode_init_connection(_LISTEN)

_Init = TypeVar("_Init", bound=Listen | Accept | Connect)


def _expect_init(cls: type[_Init], data: bytes) -> _Init:
    init = decode_init_connection(data)
    if not isinstance(init, cls):
        raise ProtocolError(f"expected {cls.__name__.lower()}, got {type(init).__name__.lower()}")
    return init


# ---- channel and keepalive layers ----------------------------------------------------------

# The fixed words of their layouts, shared with the specialised codecs of ``fastpath``.

HEADER_4 = struct.Struct("<4Q")
U64 = struct.Struct("<Q")
HEADER_6 = struct.Struct("<6Q")

# KaMessage: root pointer, the struct (tag word, Data pointer), then the Data body.
KA_ROOT = struct_pointer(0, 1, 1)
# ChannelMessage: root pointer, the struct (randPadding, content pointers), ChannelContent
# (tag word, Data pointer), then randPadding's body, then user's body.
CHANNEL_ROOT = struct_pointer(0, 0, 2)
CHANNEL_CONTENT = struct_pointer(0, 1, 1)

KEEPALIVE: bytes = pack(HEADER_4.pack(3 << 32, KA_ROOT, KA_KEEPALIVE, 0))
"""The packed KaMessage ``keepAlive``."""


def encode_channel_rekey(padding: bytes, rekey: Rekey) -> bytes:
    """The packed ChannelMessage carrying ``rekey`` after ``padding``."""
    builder = MessageBuilder()
    root = builder.set_struct(0, 0, 2)
    builder.set_data(root, padding)
    content = builder.set_struct(root + 1, 1, 1)
    builder.set_word(content, CONTENT_REKEY)
    rekey._build(builder, content + 1)
    return builder.finish()


def read_ka_message(words: bytearray) -> bytes | None:
    """The payload of a KaMessage from its unpacked words (any layout), or None for
    ``keepAlive``: the general reader."""
    root = read_unpacked(words).root()
    tag = root.uint16(0)
    if tag == KA_KEEPALIVE:
        return None
    if tag == KA_MESSAGE:
        payload = root.data(0)
        return b"" if payload is None else payload
    raise ProtocolError(f"unknown KaMessage variant {tag}")


def decode_ka_message_general(data: bytes) -> bytes | None:
    """The payload of a packed KaMessage, or None for ``keepAlive``, through the general
    reader alone."""
    return read_ka_message(unpacked_words(data))


def read_channel_message(words: bytearray) -> bytes | Rekey:
    """The user data of a ChannelMessage from its unpacked words (any layout), or its
    Rekey: the general reader (the padding is ignored)."""
    content = read_unpacked(words).root().struct(1)
    if content is None:
        raise ProtocolError("ChannelMessage content is missing")
    tag = content.uint16(0)
    if tag == CONTENT_USER:
        user = content.data(0)
        return b"" if user is None else user
    if tag == CONTENT_REKEY:
        rekey = content.struct(0)
        if rekey is None:
            raise ProtocolError("Rekey is missing")
        return Rekey._read(rekey)
    raise ProtocolError(f"unknown ChannelContent variant {tag}")


def decode_channel_message_general(data: bytes) -> bytes | Rekey:
    """The user data of a packed ChannelMessage, or its Rekey, through the general reader
    alone."""
    return read_channel_message(unpacked_words(data))
