"""Floors: the least work each benchmark's figure could cost, measured in this process.

A relay hop must at least open and seal every frame, and a relay handshake must at least do
its Ed25519 and X25519 operations; a tunnel round trip cannot beat the same two protocol
stacks talking directly over loopback. Each figure is reported as a ratio to its floor.
"""

from __future__ import annotations

import os
import random
import select
import socket
import time

from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
    crypto_scalarmult,
    crypto_scalarmult_base,
)
from nacl.signing import SigningKey

from offset_appliance.client import RelayClient
from offset_appliance.wire.connection import Connection, State
from offset_appliance.wire.fastpath import (
    encode_channel_user,
    encode_ka_message,
)
from offset_appliance.wire.frames import HEADER_LEN

from .relay import BenchError

NONCE_LEN = 12
TAG_LEN = 16


def aead_floor(size: int, count: int, repeats: int = 3) -> float:
    """CPU seconds to open and seal ``count`` messages of ``size`` bytes (one relay hop).

    The messages are timed in ``repeats`` equal parts and the cheapest part counts, since a
    floor is the least the work can cost and a shared machine only ever adds to it.
    """
    key = os.urandom(32)
    plain = os.urandom(size)
    clock = time.process_time
    part = max(1, count // repeats)
    best = float("inf")
    for _ in range(repeats):
        started = clock()
        for index in range(part):
            nonce = index.to_bytes(NONCE_LEN, "little")
            sealed = crypto_aead_chacha20poly1305_ietf_encrypt(plain, None, nonce, key)
            crypto_aead_chacha20poly1305_ietf_decrypt(sealed, None, nonce, key)
        best = min(best, (clock() - started) / part)
    return best * count


def handshake_floor(count: int, repeats: int = 3) -> float:
    """CPU seconds per handshake for the relay's public-key operations alone.

    Per connection the relay makes an X25519 key pair, signs its ExchangeDh (Ed25519),
    verifies the peer's signature and computes the X25519 shared secret. The cheapest of
    ``repeats`` runs counts, as in ``aead_floor``.
    """
    identity = SigningKey.generate()
    peer = SigningKey.generate()
    peer_verify = peer.verify_key
    signed = peer.sign(os.urandom(80))
    peer_dh = crypto_scalarmult_base(os.urandom(32))
    nonce_and_salt = os.urandom(48)
    clock = time.process_time
    part = max(1, count // repeats)
    best = float("inf")
    for _ in range(repeats):
        started = clock()
        for _ in range(part):
            private = os.urandom(32)
            public = crypto_scalarmult_base(private)
            identity.sign(public + nonce_and_salt)
            peer_verify.verify(signed)
            crypto_scalarmult(private, peer_dh)
        best = min(best, (clock() - started) / part)
    return best


# ---- round trips ---------------------------------------------------------------------------


class End:
    """One end of a blocking ping-pong over a ``wire.Connection``: send, then wait for a reply."""

    def __init__(self, sock: socket.socket, wire: Connection) -> None:
        self.sock = sock
        self.wire = wire
        self.inbox: list[bytes] = []

    @classmethod
    def of_client(cls, client: RelayClient) -> End:
        """Take over an open ``RelayClient`` (same socket, same protocol stack)."""
        client.sock.settimeout(None)
        return cls(client.sock, client.wire)

    def flush(self) -> None:
        chunks = self.wire.data_to_send()
        if chunks:
            self.sock.sendall(b"".join(chunks))

    def step(self) -> None:
        """Read once and feed the protocol stack."""
        data = self.sock.recv(1 << 16)
        if not data:
            raise BenchError("connection closed during a round-trip measurement")
        self.inbox.extend(self.wire.receive_data(data, time.monotonic()))
        self.flush()

    def send(self, message: bytes) -> None:
        self.wire.send_message(message, time.monotonic())
        self.flush()

    def receive(self) -> bytes:
        while not self.inbox:
            self.step()
        return self.inbox.pop(0)


def round_trips(a: End, b: End, size: int, count: int, until: float | None = None) -> list[float]:
    """Seconds per round trip a -> b -> a of a ``size``-byte message (stops early at ``until``)."""
    message = os.urandom(size)
    clock = time.perf_counter
    samples = []
    for _ in range(count):
        if until is not None and time.monotonic() >= until:
            break
        started = clock()
        a.send(message)
        if b.receive() != message:
            raise BenchError("a round trip delivered different bytes")
        b.send(message)
        if a.receive() != message:
            raise BenchError("a round trip delivered different bytes")
        samples.append(clock() - started)
    return samples


def direct_pair() -> tuple[End, End, list[socket.socket]]:
    """Two protocol stacks connected directly over loopback TCP, handshake done."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    left = socket.create_connection(server.getsockname())
    right, _ = server.accept()
    server.close()
    for sock in (left, right):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    now = time.monotonic()
    a = End(left, Connection(SigningKey.generate(), now))
    b = End(right, Connection(SigningKey.generate(), now))
    a.flush()
    b.flush()
    deadline = time.monotonic() + 10
    while a.wire.state is not State.OPEN or b.wire.state is not State.OPEN:
        if time.monotonic() > deadline:
            raise BenchError("direct handshake did not complete")
        readable, _, _ = select.select([left, right], [], [], 0.1)
        for sock in readable:
            (a if sock is left else b).step()
    return a, b, [left, right]


def relay_pair(address: tuple[str, int], relay_key: bytes) -> tuple[End, End, list[RelayClient]]:
    """A tunnel through the relay: (connector end, acceptor end, clients to close)."""
    identity = SigningKey.generate()
    clients = []
    try:
        listener = RelayClient.open(address, identity, expected_key=relay_key)
        clients.append(listener)
        listener.listen()
        connector = RelayClient.open(address, expected_key=relay_key)
        clients.append(connector)
        connector.connect(listener.public_key)
        if listener.next_incoming() != connector.public_key:
            raise BenchError("the relay announced the wrong connecting key")
        acceptor = RelayClient.open(address, identity, expected_key=relay_key)
        clients.append(acceptor)
        acceptor.accept(connector.public_key)
        a, b = End.of_client(connector), End.of_client(acceptor)
        round_trips(a, b, 16, 1)  # the tunnel is established once one message went through
    except BaseException:
        for client in clients:
            client.close()
        raise
    return a, b, clients


# ---- wire overhead -------------------------------------------------------------------------


def frame_size(padding: bytes, message: bytes) -> int:
    """Bytes on the wire for one tunnel message: frame header, nonce, sealed channel message."""
    sealed = encode_channel_user(padding, encode_ka_message(message))
    return HEADER_LEN + NONCE_LEN + len(sealed) + TAG_LEN


def wire_overhead(size: int, samples: int, seed: int = 7) -> dict[str, float]:
    """Mean bytes on the wire per ``size``-byte message.

    Ours is measured through a real ``Connection``; the original's padding rule (uniform
    0..65535 bytes) and no padding at all are computed with the same encoder.
    """
    message = os.urandom(size)
    now = time.monotonic()
    a = Connection(SigningKey.generate(), now)
    b = Connection(SigningKey.generate(), now)
    for _ in range(4):
        data = b"".join(a.data_to_send())
        if data:
            b.receive_data(data, now)
        data = b"".join(b.data_to_send())
        if data:
            a.receive_data(data, now)
    if a.state is not State.OPEN or b.state is not State.OPEN:
        raise BenchError("in-memory handshake did not complete")
    a.data_to_send()
    total = 0
    for _ in range(samples):
        a.send_message(message, now)
        chunks = a.data_to_send()
        total += sum(map(len, chunks))
        if b.receive_data(b"".join(chunks), now) != [message]:
            raise BenchError("in-memory connection delivered different bytes")
    # The original's padding averages 32 KiB; a couple of thousand draws pin its mean well.
    draws = min(samples, 2000)
    rng = random.Random(seed)
    original = sum(frame_size(rng.randbytes(rng.randrange(65536)), message) for _ in range(draws))
    return {
        "message_bytes": size,
        "ours": total / samples,
        "original": original / draws,
        "no_padding": float(frame_size(b"", message)),
    }
