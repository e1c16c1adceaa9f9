"""Fuzz targets: one function per decoder or protocol layer, fed arbitrary bytes.

A target may raise ``ProtocolError`` (the input was refused, as it should be) and nothing
else; any other exception, or a failed assertion about what a layer accepted, is a bug. The
relay core is stricter still: it turns bad input into a close and never raises at all.

The same functions are driven by Hypothesis in ``tests/reliability/test_fuzz_targets.py``
(part of ``make test``) and by atheris, coverage-guided, with ``python -m fuzz.run``.
Everything is deterministic: identities and "random" bytes come from fixed seeds, so a
failing input reproduces.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from nacl.bindings import crypto_scalarmult_base
from nacl.signing import SigningKey

from offset_appliance.errors import ProtocolError
from offset_appliance.relay.core import Close, CoreLimits, RelayCore, Role, Send
from offset_appliance.wire import capnp
from offset_appliance.wire.channel import SecureChannel
from offset_appliance.wire.connection import VERSION_FRAME, Connection, State
from offset_appliance.wire.fastpath import (
    EQUIVALENCES,
    decode_channel_message,
    decode_ka_message,
    encode_channel_user,
    encode_ka_message,
)
from offset_appliance.wire.frames import HEADER_LEN, FrameDecoder, encode_frame
from offset_appliance.wire.messages import (
    Accept,
    Connect,
    ExchangeDh,
    ExchangeRandNonce,
    IncomingConnection,
    Listen,
    RejectConnection,
    Rekey,
    decode_init_connection,
    encode_channel_rekey,
    encode_init_connection,
)

RELAY_ID = SigningKey(bytes(range(32)))
PEER_ID = SigningKey(bytes(range(32, 64)))
PEER_KEY = bytes(PEER_ID.verify_key)
KEY_A, KEY_B, KEY_C = b"A" * 32, b"B" * 32, b"C" * 32
SMALL_FRAME = 4096


def _seeded(seed: int) -> Callable[[int], bytes]:
    """A deterministic stand-in for os.urandom."""
    rng = random.Random(seed)
    return rng.randbytes


# ---- frames ------------------------------------------------------------------------------


def frames(data: bytes) -> None:
    """The frame decoder, fed in up to three chunks; every byte is a frame, a header or kept."""
    decoder = FrameDecoder(SMALL_FRAME)
    cuts = sorted({b % (len(data) + 1) for b in data[:2]})
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    out = []
    for piece in pieces:
        out += decoder.feed(piece)
    assert all(len(frame) <= SMALL_FRAME for frame in out)
    assert sum(HEADER_LEN + len(frame) for frame in out) + decoder.buffered == len(data)


# ---- packed Cap'n Proto ------------------------------------------------------------------


def _walk(reader: capnp.StructReader | None, depth: int) -> None:
    if reader is None or depth > 4:
        return
    reader.uint16(0)
    reader.data_section(4)
    for index in range(min(reader.pointer_count, 4)):
        for read in (reader.struct, reader.data):
            try:
                value = read(index)
            except ProtocolError:
                continue
            if isinstance(value, capnp.StructReader):
                _walk(value, depth + 1)


def packed(data: bytes) -> None:
    """Unpacking, re-packing, and walking every pointer of whatever message it holds."""
    words = capnp.unpack(data)
    assert len(words) % capnp.WORD == 0
    assert capnp.unpack(capnp.pack(words)) == words
    _walk(capnp.read_message(data).root(), 0)


# ---- messages ----------------------------------------------------------------------------

_MESSAGE_TYPES = (ExchangeRandNonce, ExchangeDh, Rekey, RejectConnection, IncomingConnection)
_INIT_TYPES = (Listen, Accept, Connect)
_PACKED_KINDS = {"KaMessage", "ChannelMessage", "ExchangeRandNonce", "ExchangeDh", "InitConnection"}


def messages(data: bytes) -> None:
    """Every message decoder; what one accepts must survive a round trip through its encoder,
    and every specialised decoder must agree with its general twin."""
    for pair in EQUIVALENCES:
        if pair.takes in _PACKED_KINDS:
            problem = pair.disagreement(data)
            assert problem is None, problem
    for cls in _MESSAGE_TYPES:
        try:
            value = cls.decode(data)
        except ProtocolError:
            continue
        assert cls.decode(value.encode()) == value
    for init_cls in _INIT_TYPES:
        try:
            variant = init_cls.decode(data)
        except ProtocolError:
            continue
        assert decode_init_connection(variant.encode()) == variant
    try:
        init = decode_init_connection(data)
    except ProtocolError:
        pass
    else:
        assert decode_init_connection(encode_init_connection(init)) == init
    try:
        payload = decode_ka_message(data)
    except ProtocolError:
        pass
    else:
        if payload is not None:
            assert decode_ka_message(encode_ka_message(payload)) == payload
    try:
        content = decode_channel_message(data)
    except ProtocolError:
        pass
    else:
        if isinstance(content, Rekey):
            assert decode_channel_message(encode_channel_rekey(b"", content)) == content
        else:
            assert decode_channel_message(encode_channel_user(b"pad", content)) == content


# ---- secure channel: handshake -----------------------------------------------------------

_PEER_HELLO = ExchangeRandNonce(bytes(16), PEER_KEY, None).encode()


def _relay_connection() -> Connection:
    return Connection(RELAY_ID, 0.0, max_frame_length=SMALL_FRAME, random=_seeded(1))


def handshake(data: bytes) -> None:
    """A relay-side connection fed hostile bytes at each point of the handshake.

    The first byte picks the point: before the version, after it, or after a valid
    ExchangeRandNonce (where the rest is the peer's ExchangeDh frame)."""
    mode, rest = (data[0] % 3, data[1:]) if data else (0, b"")
    conn = _relay_connection()
    prefix = b""
    if mode >= 1:
        prefix += VERSION_FRAME
    if mode == 2:
        prefix += encode_frame(_PEER_HELLO)
    if prefix:
        conn.receive_data(prefix, 0.0)
    conn.receive_data(rest, 0.1)
    # Nothing here knows a signature by the peer's key over the relay's fresh values.
    assert conn.state is not State.OPEN


def handshake_dh(data: bytes) -> None:
    """A correctly signed ExchangeDh carrying any 32 bytes as the Diffie-Hellman key and salt
    (low-order and non-canonical points included): refused or opened, never anything else."""
    dh_public = data[:32].ljust(32, b"\0")
    salt = data[32:64].ljust(32, b"\0")
    conn = _relay_connection()
    out = b"".join(conn.data_to_send())
    relay_hello = FrameDecoder().feed(out)[1]
    nonce = ExchangeRandNonce.decode(relay_hello).rand_nonce
    signature = PEER_ID.sign(dh_public + nonce + salt).signature
    dh = ExchangeDh(dh_public, nonce, salt, signature).encode()
    conn.receive_data(VERSION_FRAME + encode_frame(_PEER_HELLO) + encode_frame(dh), 0.0)
    assert conn.state is State.OPEN and conn.peer_public_key == PEER_KEY


# ---- secure channel: encrypted frames, rekeys, keepalive ---------------------------------


def channel(data: bytes) -> None:
    """An open channel fed a raw frame, or any plaintext sealed with the right key (so the
    ChannelMessage, Rekey and KaMessage decoders all see hostile input)."""
    mode, rest = (data[0] % 3, data[1:]) if data else (0, b"")
    ours = SecureChannel(KEY_A, KEY_B, _seeded(2))
    peer = SecureChannel(KEY_B, KEY_A, _seeded(3))
    if mode == 0:
        frame = rest
    elif mode == 1:
        frame = peer._seal(rest)  # any ChannelMessage, rekeys included
    else:
        frame = peer.seal(rest)  # any KaMessage in a valid ChannelMessage
    user = ours.open(frame)
    if user is not None:
        decode_ka_message(user)
    else:
        # Only a rekey yields no user data, and it was taken and answered exactly once.
        assert mode == 1 and ours.rekeys == 1 and len(ours.outbox) == 1


# ---- the relay's rules -------------------------------------------------------------------


def relay_message(data: bytes) -> None:
    """Hostile relay messages on every kind of connection; the core closes, never raises,
    and every action names a connection it knows."""
    core = RelayCore(CoreLimits(max_half_tunnels_per_listener=2, half_tunnel_buffer=64))
    known = set()

    def opened(conn_id: int, key: bytes) -> None:
        core.opened(conn_id, key, 0.0)
        known.add(conn_id)

    opened(1, KEY_A)
    core.message(1, encode_init_connection(Listen()), 0.0)
    opened(2, KEY_B)
    core.message(2, encode_init_connection(Connect(KEY_A)), 0.0)
    opened(3, KEY_C)  # pending: the data is its first message
    opened(4, KEY_A)
    core.message(4, encode_init_connection(Accept(KEY_B)), 0.0)
    assert core.role(4) is Role.TUNNEL and core.role(2) is Role.TUNNEL
    opened(5, KEY_C)
    core.message(5, encode_init_connection(Connect(KEY_A)), 0.0)
    # Split the input into messages so several arrive in a row on each connection.
    parts = data.split(b"\xfe") if data else [b""]
    for part in parts:
        for conn_id in (1, 2, 3, 4, 5):
            core.message(conn_id, part, 0.1)
    core.handle_timer(1e6)
    gone: set[int] = set()
    actions = []
    while (taken := core.next_action()) is not None:
        actions.append(taken)
    for action in actions:
        assert action.conn_id in known and action.conn_id not in gone, action
        if isinstance(action, Close):
            gone.add(action.conn_id)
    # Nothing closes the tunnel between 2 and 4: everything 2 sent reaches 4, unchanged and
    # in order, and nothing else does.
    assert [a.payload for a in actions if isinstance(a, Send) and a.conn_id == 4] == parts


TARGETS: dict[str, Callable[[bytes], None]] = {
    "frames": frames,
    "packed": packed,
    "messages": messages,
    "handshake": handshake,
    "handshake_dh": handshake_dh,
    "channel": channel,
    "relay_message": relay_message,
}


def _dh_seed() -> bytes:
    public = crypto_scalarmult_base(bytes(range(1, 33)))
    return public + bytes(32)


# Valid inputs each target starts mutating from (the atheris corpus, Hypothesis' examples).
SEEDS: dict[str, list[bytes]] = {
    "frames": [encode_frame(b"abc") * 3, VERSION_FRAME, encode_frame(b"")],
    "packed": [
        _PEER_HELLO,
        encode_init_connection(Connect(KEY_A)),
        encode_ka_message(b"x" * 3000),
        encode_channel_user(b"pad", b"\xff" * 700),
    ],
    "messages": [
        _PEER_HELLO,
        ExchangeRandNonce(bytes(16), PEER_KEY, KEY_A).encode(),
        ExchangeDh(KEY_A, bytes(16), KEY_B, bytes(64)).encode(),
        Rekey(KEY_A, KEY_B).encode(),
        RejectConnection(KEY_A).encode(),
        encode_init_connection(Listen()),
        encode_init_connection(Accept(KEY_B)),
        encode_ka_message(b"hello"),
        encode_channel_user(b"pad", b"user"),
        encode_channel_rekey(b"", Rekey(KEY_A, KEY_B)),
    ],
    "handshake": [b"\x00" + VERSION_FRAME, b"\x01" + encode_frame(_PEER_HELLO), b"\x02"],
    "handshake_dh": [_dh_seed(), crypto_scalarmult_base(KEY_C) + KEY_A],
    "channel": [
        b"\x01" + encode_channel_user(b"", encode_ka_message(b"m")),
        b"\x01" + encode_channel_rekey(b"", Rekey(crypto_scalarmult_base(KEY_C), KEY_B)),
        b"\x02" + encode_ka_message(b"data"),
    ],
    "relay_message": [
        encode_init_connection(Listen()),
        RejectConnection(KEY_B).encode() + b"\xfe" + encode_init_connection(Accept(KEY_C)),
        b"data\xfemore",
    ],
}
