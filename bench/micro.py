"""``python -m bench.micro``: what each layer of the hot path costs per message, in isolation.

A relayed tunnel message costs the relay one ``receive_data`` (frame, decrypt, two decodes)
and one ``send_message`` (two encodes, padding, encrypt). This times every step on its own,
for a 64-byte and a 64 KiB payload, so that a change to one layer can be measured before and
after without a relay, clients or a profiler's overhead. Steps that need a sender's work
first (an open needs a sealed frame) have that work timed separately and taken out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
)
from nacl.signing import SigningKey

from offset_appliance.wire.channel import PaddingSource, SecureChannel
from offset_appliance.wire.connection import Connection
from offset_appliance.wire.fastpath import (
    decode_channel_message,
    decode_dh,
    decode_ka_message,
    decode_rand_nonce,
    encode_channel_user,
    encode_dh,
    encode_ka_message,
    encode_rand_nonce,
    forward_channel_message,
    forward_ka_message,
)
from offset_appliance.wire.frames import FrameDecoder, encode_frame
from offset_appliance.wire.messages import (
    ExchangeDh,
    ExchangeRandNonce,
)


def per_call(function: Callable[[], object], budget: float = 0.3) -> float:
    """Microseconds of this process's CPU time per call: the best of three runs of about
    ``budget / 3`` seconds each. CPU time, not wall time, so that other work on a shared
    machine moves the figures less (it still slows them through the caches)."""
    count = 1
    while True:
        started = time.process_time()
        for _ in range(count):
            function()
        elapsed = time.process_time() - started
        if elapsed >= budget / 30:
            break
        count *= 4
    count = max(1, round(count * budget / 3 / elapsed))
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        for _ in range(count):
            function()
        best = min(best, (time.process_time() - started) / count)
    return best * 1e6


def _pair() -> tuple[Connection, Connection]:
    now = time.monotonic()
    a = Connection(SigningKey.generate(), now)
    b = Connection(SigningKey.generate(), now)
    for _ in range(4):
        for src, dst in ((a, b), (b, a)):
            data = b"".join(src.data_to_send())
            if data:
                dst.receive_data(data, now)
    return a, b


def layers(size: int) -> list[tuple[str, float]]:
    """(step, microseconds) for one message of ``size`` bytes through each layer."""
    payload = os.urandom(size)
    padding = PaddingSource()
    pad = padding()
    ka = encode_ka_message(payload)
    plain = encode_channel_user(pad, ka)
    key = os.urandom(32)
    nonce = bytes(12)
    sealed = crypto_aead_chacha20poly1305_ietf_encrypt(plain, None, nonce, key)
    frame = encode_frame(nonce + sealed)
    decoder = FrameDecoder()
    left_key, right_key = os.urandom(32), os.urandom(32)
    sealer = SecureChannel(left_key, right_key)
    a, b = _pair()
    sender, _ = _pair()
    now = time.monotonic()

    def relay_hop() -> None:
        # What the relay does per tunnel message: receive on one connection, send on
        # another, the KaMessage forwarded as it came.
        a.send_message(payload, now)
        messages = b.receive_forward(b"".join(a.data_to_send()), now)
        b.send_packed(messages, now)
        b.data_to_send()

    def relay_hop_decoded() -> None:
        # The same, with the KaMessage decoded and encoded again (what the relay does for
        # a message it has to read, and did for tunnel data before forwarding).
        a.send_message(payload, now)
        (message,) = b.receive_data(b"".join(a.data_to_send()), now)
        b.send_message(message, now)
        b.data_to_send()

    rand_nonce = ExchangeRandNonce(os.urandom(16), os.urandom(32), os.urandom(32))
    nonce_data = rand_nonce.encode()
    dh = ExchangeDh(os.urandom(32), os.urandom(16), os.urandom(32), os.urandom(64))
    dh_data = dh.encode()

    def send() -> None:
        sender.send_message(payload, now)
        sender.data_to_send()

    steps: list[tuple[str, Callable[[], object]]] = [
        ("frame: FrameDecoder.feed (one whole frame)", lambda: decoder.feed(frame)),
        ("codec: decode_channel_message", lambda: decode_channel_message(plain)),
        ("codec: decode_ka_message", lambda: decode_ka_message(ka)),
        ("codec: encode_ka_message", lambda: encode_ka_message(payload)),
        ("codec: forward_ka_message (check, keep packed)", lambda: forward_ka_message(ka)),
        (
            "codec: forward_channel_message (both checks, kept packed)",
            lambda: forward_channel_message(plain),
        ),
        ("codec: encode_channel_user", lambda: encode_channel_user(pad, ka)),
        ("channel: PaddingSource()", padding),
        ("channel: SecureChannel.seal (padding, encode, encrypt)", lambda: sealer.seal(ka)),
        (
            "reference: nacl.bindings ChaCha20-Poly1305 encrypt",
            lambda: crypto_aead_chacha20poly1305_ietf_encrypt(plain, None, nonce, key),
        ),
        (
            "reference: nacl.bindings ChaCha20-Poly1305 decrypt",
            lambda: crypto_aead_chacha20poly1305_ietf_decrypt(sealed, None, nonce, key),
        ),
        ("handshake codec: ExchangeRandNonce encode", lambda: encode_rand_nonce(rand_nonce)),
        ("handshake codec: ExchangeRandNonce decode", lambda: decode_rand_nonce(nonce_data)),
        ("handshake codec: ExchangeDh encode", lambda: encode_dh(dh)),
        ("handshake codec: ExchangeDh decode", lambda: decode_dh(dh_data)),
        ("whole: Connection.send_message + data_to_send", send),
        ("whole: one relay hop, decoded (receive, send_message)", relay_hop_decoded),
        ("whole: one relay hop, forwarded (receive, send_packed)", relay_hop),
    ]
    results = [(name, per_call(function)) for name, function in steps]
    # The hops time the sending client's work too; take it out again.
    sending = results[-3][1]
    results[-2] = (results[-2][0], results[-2][1] - sending)
    results[-1] = (results[-1][0], results[-1][1] - sending)
    results.insert(9, ("channel: SecureChannel.open (decrypt, decode)", _open_cost(ka)))
    return results


def _open_cost(user: bytes) -> float:
    """Microseconds per ``SecureChannel.open``: frames are sealed first, then opened in order
    (each open needs the next nonce), best of three batches."""
    count = max(20, min(20_000, int(2e5 / (len(user) + 100))))
    best = float("inf")
    for _ in range(3):
        keys = os.urandom(32), os.urandom(32)
        sender, receiver = SecureChannel(*keys), SecureChannel(keys[1], keys[0])
        frames = [sender.seal(user) for _ in range(count)]
        started = time.process_time()
        for frame in frames:
            receiver.open(frame)
        best = min(best, (time.process_time() - started) / count)
    return best * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.micro", description="Per-layer cost of the tunnel hot path."
    )
    parser.add_argument("--sizes", default="64,65536", help="payload sizes, comma-separated")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    table = {size: layers(size) for size in sizes}
    names = [name for name, _ in table[sizes[0]]]
    print("| step | " + " | ".join(f"{size} B payload" for size in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    for index, name in enumerate(names):
        cells = " | ".join(f"{table[size][index][1]:,.1f} us" for size in sizes)
        print(f"| {name} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
