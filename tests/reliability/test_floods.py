"""Floods against a running strelay: handshakes that never finish, and connects by the
thousand to one listener. Each states the bound the relay must hold, checks it, and checks
that honest nodes are served throughout.

Memory bounds are checked on the relay's resident set (VmRSS). Python rarely gives freed
memory back to the system, so a bound on the growth is a bound on the peak.
"""

from __future__ import annotations

import random
import time

import pytest
from nacl.signing import SigningKey

from offset_appliance.probe import HEALTHY, probe
from offset_appliance.wire.connection import VERSION_FRAME
from offset_appliance.wire.frames import encode_frame
from offset_appliance.wire.messages import (
    Accept,
    Connect,
    ExchangeRandNonce,
    Listen,
    RejectConnection,
    encode_init_connection,
)

from .honest import HonestTunnel
from .relaylib import (
    SOURCE_IPS,
    Prober,
    assert_relay_clean,
    closed,
    failed,
    incoming_key,
    interesting,
    open_connections,
    refused,
    scrape,
    settings,
    wait_metrics,
)
from .scale import SOAK, rounds
from .swarm import Session, Swarm

MIB = 1024  # in KiB, the unit of VmRSS

# ---- 1,000 handshakes that never finish --------------------------------------------------

STALLED = 1000
HANDSHAKE_CAP = 100
CONN_TIMEOUT = 3.0
# Each unfinished handshake costs the relay a socket, a Connection and its first output, a
# few KiB; at most HANDSHAKE_CAP are alive at once, every newer one evicts the oldest.
HANDSHAKE_FLOOD_RSS_BOUND = 24 * MIB


def _stall(swarm: Swarm, number: int) -> Session:
    """A connection that starts a handshake in one of four ways and never finishes it."""
    session = swarm.open(raw=True, source=SOURCE_IPS[number % len(SOURCE_IPS)])
    kind = number % 4
    if kind == 1:
        swarm.send_raw(session, VERSION_FRAME)
    elif kind == 2:
        hello = ExchangeRandNonce(bytes(16), bytes(SigningKey.generate().verify_key), None)
        swarm.send_raw(session, VERSION_FRAME + encode_frame(hello.encode()))
    elif kind == 3:
        # Slowloris: a frame announced, then a byte now and then, for ever.
        swarm.send_raw(session, VERSION_FRAME + (200).to_bytes(8, "big") + b"\x00" * 10)
    session.tag = kind
    return session


def _handshake_flood_round(relay, rss_start: int, figures) -> None:
    before = scrape(relay)
    swarm = Swarm(relay.address, relay.public_key)
    stalled = [_stall(swarm, n) for n in range(STALLED)]
    swarm.run_until(lambda: all(s.connected or s.closed for s in stalled), 30, "connects")
    # Honest nodes are probed while the unfinished handshakes are held.
    prober = Prober(relay)
    prober.start()
    most_handshaking = 0.0
    next_look = 0.0

    def all_closed() -> bool:
        nonlocal most_handshaking, next_look
        now = time.monotonic()
        if now >= next_look:
            next_look = now + 0.5
            for session in stalled:
                if session.tag == 3 and not session.closed:
                    swarm.send_raw(session, b"\x00")
            gauge = scrape(relay)['offset_relay_connections{state="handshaking"}']
            most_handshaking = max(most_handshaking, gauge)
        return all(s.closed for s in stalled)

    # A liveness bound: every stalled connection is closed by the relay, none by us.
    swarm.run_until(all_closed, 60, "the relay to close every unfinished handshake")
    probes = prober.finish()
    assert probes and all(code == HEALTHY for code, _ in probes), probes
    assert all(s.close_reason != "closed by us" for s in stalled)
    assert most_handshaking <= HANDSHAKE_CAP

    after = scrape(relay)
    timed_out = failed(after, "timeout") - failed(before, "timeout")
    evicted = failed(after, "evicted") - failed(before, "evicted")
    # Those in the cap when their deadline came were closed at it, slowloris included; the
    # others were evicted by newer ones.
    assert timed_out + evicted == STALLED, interesting(after)
    assert 0 < timed_out <= HANDSHAKE_CAP
    assert evicted == refused(after, "max_handshakes") - refused(before, "max_handshakes")
    assert failed(after, "peer_closed") == failed(before, "peer_closed")
    rss = relay.rss_kib()
    assert rss - rss_start < HANDSHAKE_FLOOD_RSS_BOUND, (rss_start, rss)
    assert_relay_clean(relay)
    figures.attack_held("handshake_flood")
    figures.add("unfinished_handshakes_closed", STALLED)
    figures.add("probes_passed", len(probes))


@pytest.mark.slow
def test_unfinished_handshakes_are_capped_and_closed_at_the_deadline(relay_factory, figures):
    relay = relay_factory(
        settings(
            limits={
                "max_handshakes": HANDSHAKE_CAP,
                "max_connections": 4 * STALLED,
                "max_connections_per_ip": 64,
            },
            timeouts={"conn_timeout": CONN_TIMEOUT},
        )
    )
    rss_start = relay.rss_kib()
    for _ in rounds("handshake_flood"):
        _handshake_flood_round(relay, rss_start, figures)
    figures.rss("handshake_flood", rss_start, relay.rss_kib())


# ---- 10,000 connects to one listener -----------------------------------------------------

FLOOD = 10_000
HALF_TUNNEL_CAP = 64
IN_FLIGHT = 200
# The listener holds at most HALF_TUNNEL_CAP pending connects; every other connect is closed
# as soon as it is read, so the relay holds about IN_FLIGHT flood connections at a time
# (each a few KiB) plus the capped half-tunnels.
CONNECT_FLOOD_RSS_BOUND = 32 * MIB


def _connect_flood_round(relay, round_no: int, rss_start: int, figures) -> None:
    before = scrape(relay)
    rng = random.Random(round_no)
    swarm = Swarm(relay.address, relay.public_key)
    honest = HonestTunnel(swarm)
    listener_id = SigningKey.generate()
    listener = swarm.open(listener_id)
    listener.on_open = lambda s: swarm.send(s, encode_init_connection(Listen()))
    announced: list[bytes] = []
    listener.on_message = lambda s, m: announced.append(incoming_key(m))
    swarm.run_until(lambda: listener.is_open and not listener.pending, 30, "listener")
    wait_metrics(relay, lambda v: v["offset_relay_listeners"] == 2, 30, "listening")
    connect = encode_init_connection(Connect(listener.public_key))
    flood: list[Session] = []
    unresolved: set[Session] = set()
    probes: list[int] = []

    def launch() -> bool:
        # A flood connect is resolved once the relay closed it or announced it.
        announced_now = set(announced)
        for session in list(unresolved):
            if session.closed or session.public_key in announced_now:
                unresolved.discard(session)
        while len(flood) < FLOOD and len(unresolved) < IN_FLIGHT:
            session = swarm.open(source=rng.choice(SOURCE_IPS))
            session.on_open = lambda s: swarm.send(s, connect)
            flood.append(session)
            unresolved.add(session)
            if len(flood) % 2500 == 0:
                # Honest nodes are still served in the middle of the flood.
                probes.append(probe(f"127.0.0.1:{relay.port}", relay.public_key, 20).code)
        honest.pump()
        return len(flood) == FLOOD and not unresolved

    swarm.run_until(launch, 600 if SOAK else 300, f"{FLOOD} connects to be answered")
    assert probes and all(code == HEALTHY for code in probes), probes
    honest.check()
    assert not listener.closed, listener.close_reason
    # Exactly the cap got through; everyone else was closed by the relay.
    assert len(announced) == len(set(announced)) == HALF_TUNNEL_CAP
    pending = [s for s in flood if not s.closed]
    assert sorted(s.public_key for s in pending) == sorted(announced)
    assert all(s.close_reason != "closed by us" for s in flood if s.closed)
    refused_before = closed(before, "half_tunnel_limit")
    after = wait_metrics(
        relay,
        lambda v: closed(v, "half_tunnel_limit") - refused_before == FLOOD - HALF_TUNNEL_CAP,
        30,
        "the refused connects counted",
    )
    assert after["offset_relay_half_tunnels"] == HALF_TUNNEL_CAP
    assert closed(after, "listener_full") == closed(before, "listener_full")
    rss = relay.rss_kib()
    assert rss - rss_start < CONNECT_FLOOD_RSS_BOUND, (rss_start, rss)

    # The listener is still in charge: it accepts one pending connect and rejects another.
    chosen, rejected = pending[0], pending[1]
    acceptor = swarm.open(listener_id)
    acceptor.on_open = lambda s: swarm.send(s, encode_init_connection(Accept(chosen.public_key)))
    swarm.run_until(lambda: acceptor.is_open and not acceptor.pending, 30, "accept")
    swarm.send(chosen, b"through the flood")
    swarm.run_until(lambda: bool(acceptor.inbox), 30, "tunnel data")
    assert acceptor.inbox == [b"through the flood"]
    swarm.send(listener, RejectConnection(rejected.public_key).encode())
    swarm.run_until(lambda: rejected.closed, 30, "the rejected connect to close")
    honest.pump()
    honest.check()
    assert_relay_clean(relay)
    swarm.close_all()
    wait_metrics(relay, lambda v: open_connections(v) == 0, 60, "all closed")
    figures.attack_held("connect_flood")
    figures.add("flood_connects", FLOOD)


@pytest.mark.slow
def test_connect_flood_to_one_listener_is_capped(relay_factory, figures):
    relay = relay_factory(
        settings(
            limits={"max_half_tunnels_per_listener": HALF_TUNNEL_CAP},
            timeouts={"half_tunnel": 600.0},  # nothing expires: the cap alone must hold
        )
    )
    rss_start = relay.rss_kib()
    for round_no in rounds("connect_flood"):
        _connect_flood_round(relay, round_no, rss_start, figures)
    figures.rss("connect_flood", rss_start, relay.rss_kib())
