"""Known answers for the pieces a peer must get bit-exact (docs/protocol.md sections 3 and 8).

Every expected value here was computed without the code under test: the hex literals by the
``cryptography`` package (OpenSSL), and the tests recompute them with it.
The packed bytes of every message against the reference ``capnp`` tool are in
test_messages.py.
"""

from __future__ import annotations

import itertools

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl.signing import SigningKey

from offset_appliance.wire.channel import (
    Handshake,
    SecureChannel,
    derive_keys,
    hkdf_sha512_256,
)
from offset_appliance.wire.messages import (
    ExchangeDh,
    ExchangeRandNonce,
    decode_ka_message,
    encode_channel_user,
    encode_ka_message,
)

RAW = serialization.Encoding.Raw
RAW_PUBLIC = serialization.PublicFormat.Raw

DH_A = bytes(range(1, 33))  # X25519 private keys (scalars before clamping)
DH_B = bytes(range(33, 65))
SALT_A = bytes(range(64, 96))
SALT_B = bytes(range(96, 128))
SEED = bytes(range(200, 232))  # an Ed25519 identity (the 32-byte seed of an identity file)
PEER_NONCE = bytes(range(16))

DH_A_PUBLIC = "07a37cbc142093c8b755dc1b10e86cb426374ad16aa853ed0bdfc0b2b86d1c7c"
DH_B_PUBLIC = "5869aff450549732cbaaed5e5df9b30a6da31cb0e5742bad5ad4a1a768f1a67b"
SHARED = "a84dc7c3c8f058b1b2dc4cd1e9b5dc0a7987f88b6a9564cde3391fc421159e77"
# A's keys: send = HKDF-SHA512/256(salt = A's salt), receive = HKDF(salt = B's salt).
SEND_A = "4d7e7e0288a7afd1b42e1b44b9d1948fcf1304268055b40a7c915e6356f0de3a"
RECV_A = "8a17b43fc81c9761c86a600dd519e3b698e766fc5148a6eecd7be47e0f945940"
IDENTITY_PUBLIC = "32b53e882e3daac180d7a5f6224d61b6401b43f901db09f0e4d84ce4e4a2718b"
# Ed25519(SEED) over DH_A_PUBLIC || PEER_NONCE || SALT_A: what A's ExchangeDh carries.
SIGNATURE = (
    "c7ffd67e266ef35e1b1eac706c0386a0009254ea24f48262fc66e5e220df1c5f"
    "e73b65a43491ea70fadf4972be741abcf036b85108bffe329ec35175c4635607"
)
# ChaCha20-Poly1305 under SEND_A of b"offset": the frame is nonce || ciphertext || tag, the
# nonce the message counter as 12 little-endian bytes.
SEALED = {
    0: "00000000000000000000000075e6a228c4fd28c572b5e113d93909276aba7abb1cc9",
    1: "0100000000000000000000005fffa0c778b23683a3a229ec9e6c916a5d5c8ba771fd",
    256: "000100000000000000000000bcf209bdf158a173b41ad51c318fc6cd55a236a36a4f",
}


def _hkdf(salt: bytes, ikm: bytes) -> bytes:
    return HKDF(hashes.SHA512_256(), 32, salt, b"").derive(ikm)


def test_the_literals_are_what_cryptography_computes():
    a = X25519PrivateKey.from_private_bytes(DH_A)
    b = X25519PrivateKey.from_private_bytes(DH_B)
    assert a.public_key().public_bytes(RAW, RAW_PUBLIC).hex() == DH_A_PUBLIC
    assert b.public_key().public_bytes(RAW, RAW_PUBLIC).hex() == DH_B_PUBLIC
    shared = a.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(DH_B_PUBLIC)))
    assert shared.hex() == SHARED
    assert _hkdf(SALT_A, shared).hex() == SEND_A
    assert _hkdf(SALT_B, shared).hex() == RECV_A
    identity = Ed25519PrivateKey.from_private_bytes(SEED)
    assert identity.public_key().public_bytes(RAW, RAW_PUBLIC).hex() == IDENTITY_PUBLIC
    buffer = bytes.fromhex(DH_A_PUBLIC) + PEER_NONCE + SALT_A
    assert identity.sign(buffer).hex() == SIGNATURE
    for counter, sealed in SEALED.items():
        nonce = counter.to_bytes(12, "little")
        frame = nonce + ChaCha20Poly1305(bytes.fromhex(SEND_A)).encrypt(nonce, b"offset", None)
        assert frame.hex() == sealed


def test_hkdf_sha512_256_is_rfc_5869_with_sha512_256():
    assert hkdf_sha512_256(SALT_A, bytes.fromhex(SHARED)).hex() == SEND_A
    assert hkdf_sha512_256(SALT_B, bytes.fromhex(SHARED)).hex() == RECV_A
    for salt, ikm in [(b"", b""), (b"s" * 200, b"k" * 32), (bytes(32), bytes(range(32)))]:
        assert hkdf_sha512_256(salt, ikm) == _hkdf(salt, ikm)


def test_send_and_receive_keys_from_salts_and_shared_secret():
    send, recv = derive_keys(DH_A, bytes.fromhex(DH_B_PUBLIC), SALT_A, SALT_B)
    assert (send.hex(), recv.hex()) == (SEND_A, RECV_A)
    # B derives the same pair the other way round.
    b_send, b_recv = derive_keys(DH_B, bytes.fromhex(DH_A_PUBLIC), SALT_B, SALT_A)
    assert (b_send.hex(), b_recv.hex()) == (RECV_A, SEND_A)


def _scripted(*chunks: bytes):
    """A random source that hands out ``chunks`` in order (each call takes one)."""
    queue = list(chunks)

    def random(n: int) -> bytes:
        chunk = queue.pop(0)
        assert len(chunk) == n
        return chunk

    return random


def test_the_handshake_signs_dh_key_peer_nonce_and_salt_and_derives_the_keys():
    own_nonce = bytes(range(50, 66))
    handshake = Handshake(SigningKey(SEED), None, _scripted(own_nonce, DH_A, SALT_A))
    hello = ExchangeRandNonce.decode(handshake.start())
    assert hello.src_public_key.hex() == IDENTITY_PUBLIC and hello.rand_nonce == own_nonce
    peer_identity = SigningKey(bytes(range(150, 182)))
    peer_hello = ExchangeRandNonce(PEER_NONCE, bytes(peer_identity.verify_key), None)
    dh = ExchangeDh.decode(handshake.receive(peer_hello.encode()))
    assert dh.dh_public_key.hex() == DH_A_PUBLIC
    assert dh.rand_nonce == PEER_NONCE and dh.key_salt == SALT_A
    assert dh.signature.hex() == SIGNATURE
    peer_public = bytes.fromhex(DH_B_PUBLIC)
    signed = peer_identity.sign(peer_public + own_nonce + SALT_B).signature
    assert handshake.receive(ExchangeDh(peer_public, own_nonce, SALT_B, signed).encode()) is None
    assert handshake.done
    channel = handshake.channel
    assert channel._send.key.hex() == SEND_A and channel._recv.key.hex() == RECV_A


def test_nonces_are_a_little_endian_counter_in_both_directions():
    send, recv = bytes.fromhex(SEND_A), bytes.fromhex(RECV_A)
    channel = SecureChannel(send, recv)
    peer_seal, peer_open = ChaCha20Poly1305(recv), ChaCha20Poly1305(send)
    for counter in range(300):
        frame = channel.seal(encode_ka_message(b"m%d" % counter))
        nonce = counter.to_bytes(12, "little")
        assert frame[:12] == nonce
        assert b"m%d" % counter in peer_open.decrypt(nonce, frame[12:], None)
        plain = encode_channel_user(b"", encode_ka_message(b"p%d" % counter))
        incoming = nonce + peer_seal.encrypt(nonce, plain, None)
        assert decode_ka_message(channel.open(incoming)) == b"p%d" % counter
    assert SecureChannel(send, recv)._seal(b"offset").hex() == SEALED[0]
    late = SecureChannel(send, recv)
    frames = [late._seal(b"offset") for _ in itertools.repeat(None, 257)]
    assert frames[1].hex() == SEALED[1] and frames[256].hex() == SEALED[256]
