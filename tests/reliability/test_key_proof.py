"""Only the holder of a key's private half can listen or accept as that key.

A connection's key is the one whose signature over the relay's fresh nonce it proved in the
handshake; the relay uses no other. So an attacker who knows L's public key (everyone who
wants to reach L does) can neither listen as L, nor accept L's pending connects, nor replay
a handshake L once made.
"""

from __future__ import annotations

import base64
import json
import signal

from nacl.signing import SigningKey

from offset_appliance.files import b64url_decode
from offset_appliance.wire.connection import VERSION_FRAME
from offset_appliance.wire.frames import FrameDecoder, encode_frame
from offset_appliance.wire.messages import (
    Accept,
    Connect,
    ExchangeRandNonce,
    Listen,
    encode_init_connection,
)

from .relaylib import (
    assert_probe_passes,
    assert_relay_clean,
    closed,
    failed,
    incoming_key,
    scrape,
    settings,
    wait_metrics,
)
from .swarm import Session, Swarm

LISTEN = encode_init_connection(Listen())


class Recorder:
    """An output filter that keeps a copy of every frame a session sends."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder(1 << 30)
        self.frames: list[bytes] = []

    def __call__(self, data: bytes) -> bytes:
        self.frames += self.decoder.feed(data)
        return data


class ClaimKey:
    """An output filter that claims ``key`` in our ExchangeRandNonce (frame 1), while the
    rest of the handshake is signed with our own identity, as it must be without L's."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.decoder = FrameDecoder(1 << 30)
        self.count = 0

    def __call__(self, data: bytes) -> bytes:
        out = []
        for frame in self.decoder.feed(data):
            if self.count == 1:
                hello = ExchangeRandNonce.decode(frame)
                frame = ExchangeRandNonce(hello.rand_nonce, self.key, None).encode()
            self.count += 1
            out.append(encode_frame(frame))
        return b"".join(out)


def test_only_the_key_holder_can_listen_or_accept(relay_factory):
    relay = relay_factory(settings())
    swarm = Swarm(relay.address, relay.public_key)
    owner = SigningKey.generate()
    owner_key = bytes(owner.verify_key)
    listener = swarm.open(owner)
    listener.on_open = lambda s: swarm.send(s, LISTEN)
    swarm.run_until(lambda: listener.is_open and not listener.pending, 30, "listener")
    wait_metrics(relay, lambda v: v["offset_relay_listeners"] == 1, 30, "listening")
    connector = swarm.open()
    connector.on_open = lambda s: swarm.send(s, encode_init_connection(Connect(owner_key)))
    swarm.run_until(lambda: listener.inbox, 30, "the owner to hear of the connect")
    assert incoming_key(listener.inbox.pop()) == connector.public_key
    before = scrape(relay)

    # 1. Claiming the owner's key without its private half: the signature gives it away.
    def attack(session: Session) -> None:
        swarm.send(session, LISTEN)
        swarm.send(session, encode_init_connection(Accept(connector.public_key)))

    impostor = swarm.open(output_filter=ClaimKey(owner_key))
    impostor.on_open = attack
    swarm.run_until(lambda: impostor.closed, 30, "the impostor to be closed")
    values = wait_metrics(
        relay,
        lambda v: failed(v, "bad_signature") == failed(before, "bad_signature") + 1,
        30,
        "a bad signature counted",
    )

    # 2. Replaying a handshake the owner really made: the relay's nonce is new every time.
    recorder = Recorder()
    genuine = swarm.open(owner, output_filter=recorder)
    swarm.run_until(lambda: genuine.is_open and not genuine.pending, 30, "a genuine handshake")
    swarm.close(genuine)
    version, hello, dh = recorder.frames[:3]
    replay = swarm.open(raw=True)
    swarm.send_raw(replay, encode_frame(version) + encode_frame(hello) + encode_frame(dh))
    swarm.run_until(lambda: replay.closed, 30, "the replay to be closed")
    assert encode_frame(version) == VERSION_FRAME
    values = wait_metrics(
        relay,
        lambda v: failed(v, "wrong_nonce") == failed(before, "wrong_nonce") + 1,
        30,
        "a replayed handshake refused",
    )

    # 3. Accepting with one's own key: the pending connect is the owner's, not the thief's.
    thief = swarm.open()
    thief.on_open = lambda s: swarm.send(s, encode_init_connection(Accept(connector.public_key)))
    swarm.run_until(lambda: thief.closed, 30, "the thief's accept to be closed")

    # The owner is still the listener, its pending connect untouched, and it alone accepts.
    values = scrape(relay)
    assert values["offset_relay_listeners"] == 1 and values["offset_relay_half_tunnels"] == 1
    assert closed(values, "duplicate_listen") == closed(before, "duplicate_listen")
    assert not listener.closed and not connector.closed
    acceptor = swarm.open(owner)
    acceptor.on_open = lambda s: swarm.send(s, encode_init_connection(Accept(connector.public_key)))
    swarm.run_until(lambda: acceptor.is_open and not acceptor.pending, 30, "the owner's accept")
    swarm.send(connector, b"for the owner only")
    swarm.run_until(lambda: acceptor.inbox, 30, "tunnel data")
    assert acceptor.inbox == [b"for the owner only"]
    assert impostor.inbox == [] and thief.inbox == []
    swarm.close_all()
    assert_relay_clean(relay)


def test_private_key_never_reaches_the_log(relay_factory):
    # At debug level, through handshakes, a tunnel, failures and a reload.
    relay = relay_factory(settings())
    assert_probe_passes(relay)
    swarm = Swarm(relay.address, relay.public_key)
    junk = swarm.open(raw=True)
    swarm.send_raw(junk, VERSION_FRAME + encode_frame(b"\x00" * 40))
    swarm.run_until(lambda: junk.closed, 30, "the junk to be closed")
    relay.proc.send_signal(signal.SIGHUP)
    wait_metrics(relay, lambda v: "configuration reloaded" in relay.log_text(), 30, "reload")
    secret = json.loads(relay.ident.read_text())["privateKey"]
    seed = b64url_decode(secret, "key")
    text = relay.log_text()
    assert "relay public key" in text and " DEBUG " in text
    for form in (secret, seed.hex(), base64.b64encode(seed).decode(), str(seed)):
        assert form not in text
