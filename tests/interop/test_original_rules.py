"""The relay against a peer that keeps the original node's timer rules (original_rules.py).

Without an original build these stand in for the real node: only KaMessages reset the
peer's deadlines, it pads every message with 0 to 65,535 bytes and rekeys on the original's
countdown. A relay that lets a rekey stand in for a keepalive loses such a peer.
"""

from __future__ import annotations

import os
import time

import pytest
from nacl.signing import SigningKey

from offset_appliance.wire.connection import Connection
from offset_appliance.wire.messages import Accept, Connect, IncomingConnection, Listen

from .original_rules import LivePeer, OriginalRulesPeer, PeerClosed


def _run(relay: Connection, peer: OriginalRulesPeer, tick: float, seconds: float) -> float:
    """Drive both in memory; the peer ticks half a tick out of phase with the relay's timers.

    Returns the time reached. Raises PeerClosed if the peer gives up on the relay.
    """
    now = 0.0
    step = tick / 2
    half_ticks = 0
    while now < seconds:
        now += step
        half_ticks += 1
        if relay.next_deadline() <= now:
            relay.handle_timer(now)
        data = b"".join(relay.data_to_send())
        if data:
            peer.receive_data(data)
        if half_ticks % 2 == 1:
            peer.tick()
        data = peer.data_to_send()
        if data:
            relay.receive_data(data, now)
    return now


def _pair(tick: float, keepalive: float, rekey_interval: float, **peer_args):
    # The exact timers (no spread): every relay rekey then falls on a keepalive slot, the
    # case a relay that let a rekey stand in for a keepalive would get wrong.
    relay = Connection(
        SigningKey.generate(),
        0.0,
        keepalive=keepalive,
        rekey_interval=rekey_interval,
        timer_spread=0.0,
    )
    peer = OriginalRulesPeer(**peer_args)
    for _ in range(3):
        peer.receive_data(b"".join(relay.data_to_send()))
        relay.receive_data(peer.data_to_send(), 0.0)
    assert peer.is_open
    return relay, peer


def test_an_idle_connection_outlives_the_hourly_rekey_with_the_defaults():
    # The original's constants: 1 s ticks, 32 ticks of keepalive, 3600 of rekey; the relay's
    # rekey at 3600 s = 225 x 16 s falls on a keepalive slot.
    relay, peer = _pair(1.0, keepalive=32.0, rekey_interval=3600.0)
    try:
        _run(relay, peer, 1.0, 2 * 3600 + 100)
    except PeerClosed as exc:
        pytest.fail(f"the original's rules closed the connection: {exc}")
    assert relay.rekeys >= 2
    assert peer.keepalives_received >= (2 * 3600) // 16 - 2


@pytest.mark.parametrize("peer_rekey_ticks", [3600, 20])
def test_an_idle_connection_survives_rekeys_on_every_keepalive_slot(peer_rekey_ticks):
    # keepalive = 4 s and rekey_interval = 2 s: every relay rekey falls on a keepalive slot.
    tick = 0.125
    relay, peer = _pair(tick, keepalive=4.0, rekey_interval=2.0, ticks_to_rekey=peer_rekey_ticks)
    try:
        _run(relay, peer, tick, 120.0)
    except PeerClosed as exc:
        pytest.fail(f"the original's rules closed the connection: {exc}")
    assert relay.rekeys >= 40
    assert peer.keepalives_received >= 50


def test_the_peer_pads_as_the_original_does():
    relay, peer = _pair(1.0, keepalive=32.0, rekey_interval=3600.0)
    sizes = set()
    for _ in range(40):
        peer.send(b"x")
        sizes.add(len(peer.data_to_send()))
    # Frames of 0..65,535 bytes of padding: far more spread than 0..255 could give.
    assert max(sizes) - min(sizes) > 4096
    relay.receive_data(b"", 0.0)


def test_the_peer_closes_on_kamessage_silence_even_while_rekeys_arrive():
    # The peer itself must be able to fail: a relay that only rekeys loses it at 32 ticks.
    relay, peer = _pair(1.0, keepalive=32.0, rekey_interval=3600.0)
    with pytest.raises(PeerClosed, match="no KaMessage for 32 ticks"):
        for second in range(1, 40):
            assert relay.start_rekey(float(second)) or True
            peer.receive_data(b"".join(relay.data_to_send()))
            relay.receive_data(peer.data_to_send(), float(second))
            peer.tick()
    assert peer.rekeys_received >= 31


def test_original_rules_peers_hold_listens_and_tunnel_through_the_relay(relay_factory):
    # A relay rekey every 2 s on a 4 s keepalive: each rekey falls on a keepalive slot. The
    # peers tick every 1/8 s, so their 32-tick deadline is the relay's 4 s.
    relay = relay_factory("[timeouts]\nkeepalive = 4.0\nrekey_interval = 2.0\n")
    tick = 0.125
    args = {"expected_peer": relay.public_key}
    listener_id = SigningKey.generate()
    listeners = [
        LivePeer(relay.address, tick, identity=listener_id, **args),
        LivePeer(relay.address, tick, ticks_to_rekey=20, **args),  # rekeys on its own too
    ]
    try:
        for peer in listeners:
            peer.wait_open()
            peer.send_init(Listen())
        hold_until = time.monotonic() + 20.0  # ten relay rekeys, five keepalive timeouts
        while time.monotonic() < hold_until:
            for peer in listeners:
                assert peer.error is None, peer.error
            time.sleep(0.2)
        for peer in listeners:
            assert peer.error is None, peer.error
            assert peer.peer.rekeys_received >= 8
        connector = LivePeer(relay.address, tick, **args)
        acceptor = LivePeer(relay.address, tick, identity=listener_id, **args)
        try:
            connector.wait_open()
            connector.send_init(Connect(listener_id.verify_key.encode()))
            notice = IncomingConnection.decode(listeners[0].wait_message())
            assert notice.public_key == connector.public_key
            acceptor.wait_open()
            acceptor.send_init(Accept(connector.public_key))
            payloads = [os.urandom(n) for n in (0, 1, 1000, 60_000)]
            for payload in payloads:
                connector.send(payload)
                acceptor.send(payload[::-1])
            assert [acceptor.wait_message() for _ in payloads] == payloads
            assert [connector.wait_message() for _ in payloads] == [p[::-1] for p in payloads]
        finally:
            connector.stop()
            acceptor.stop()
    finally:
        for peer in listeners:
            peer.stop()
