"""Bursts against a running strelay, all in one scenario: a burst of handshakes, a mass expiry
of pending connects that fall due in one pass of the loop, and mass closes, while honest
tunnels stream checked data through it. The relay must come out alive, every byte intact.

The mass expiry is made the way it happens in the field: the connects arrive, then the relay
is stalled past their deadline (a paused VM; here SIGSTOP, then SIGCONT), so every one of
them is due in the same pass, timed to meet a burst of handshakes queued while it stood.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable

import pytest
from nacl.signing import SigningKey

from offset_appliance.config import LIMIT_MAXIMUM
from offset_appliance.wire.messages import Connect, Listen, encode_init_connection

from .honest import HonestTunnel
from .relaylib import (
    SOURCE_IPS,
    assert_probe_passes,
    assert_relay_clean,
    closed,
    incoming_key,
    open_connections,
    scrape,
    settings,
    wait_metrics,
)
from .scale import rounds
from .swarm import Session, Swarm

LISTENER_KEYS = 8
PER_KEY = 113  # 904 pending connects, each listener under the default cap of 128
HALF_TUNNEL = 5.0
STALL = HALF_TUNNEL + 1.0
FIRST_MESSAGE = 600.0  # sessions are opened first and send their connects all at once
BURST = 480  # handshakes queued while the relay stands, under the cap of 512 at once
MOST = LIMIT_MAXIMUM["max_half_tunnels_per_listener"]
HONEST = 3
WINDOW = 200  # handshakes under way at once while opening many sessions
PUMP_INTERVAL = 0.1
SETUP = 60.0  # the relay's handshake deadline: a loaded test machine is slow, not hostile


def _listener(swarm: Swarm, identity: SigningKey | None = None) -> tuple[Session, list[bytes]]:
    announced: list[bytes] = []
    session = swarm.open(identity)
    session.on_open = lambda s: swarm.send(s, encode_init_connection(Listen()))
    session.on_message = lambda s, m: announced.append(incoming_key(m))
    return session, announced


def _open_many(
    swarm: Swarm, count: int, rng: random.Random, pump: Callable[[], None], what: str
) -> list[Session]:
    """``count`` handshaken sessions that have sent nothing yet, at most ``WINDOW``
    handshaking at once (the relay's first-message deadline is set long enough)."""
    sessions: list[Session] = []

    def step() -> bool:
        lost = [s for s in sessions if s.closed]
        assert not lost, f"{what}: the relay closed {len(lost)}: {lost[0].close_reason}"
        opening = sum(1 for s in sessions if not s.is_open)
        while len(sessions) < count and opening < WINDOW:
            sessions.append(swarm.open(source=rng.choice(SOURCE_IPS)))
            opening += 1
        pump()
        return len(sessions) == count and all(s.is_open for s in sessions)

    swarm.run_until(step, 300, what)
    return sessions


def _alive(relay) -> bool:
    """True, or fail at once naming how the relay died (a wait would only time out)."""
    code = relay.proc.poll()
    assert code is None, f"the relay died (exit {code}):\n" + relay.log_text()[-4000:]
    return True


def _reload(relay, old: str, new: str) -> None:
    """Change a setting in the relay's config file and reload it with SIGHUP."""
    relay.config.write_text(relay.config.read_text().replace(old, new))
    seen = relay.log_text().count("configuration reloaded")
    relay.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while relay.log_text().count("configuration reloaded") == seen:
        assert time.monotonic() < deadline, "the relay did not reload:\n" + relay.log_text()
        time.sleep(0.02)


def _bursts_round(relay, round_no: int, figures) -> None:
    rng = random.Random(round_no)
    before = scrape(relay)
    swarm = Swarm(relay.address, relay.public_key)
    honest = [HonestTunnel(swarm, number=round_no * 100 + n) for n in range(HONEST)]

    last_pump = [0.0]

    def pump() -> None:
        # A window each way now and then: the honest tunnels check bytes, they need not
        # take the machine from the swarm's handshakes.
        now = time.monotonic()
        if now - last_pump[0] >= PUMP_INTERVAL:
            last_pump[0] = now
            for tunnel in honest:
                tunnel.pump()

    # ---- mass expiry: 904 pending connects fall due in one pass, with a handshake burst.
    listeners = [_listener(swarm) for _ in range(LISTENER_KEYS)]
    swarm.run_until(lambda: all(s.is_open and not s.pending for s, _ in listeners), 60, "listeners")
    connectors = _open_many(swarm, LISTENER_KEYS * PER_KEY, rng, pump, "904 connectors")
    connects = [encode_init_connection(Connect(s.public_key)) for s, _ in listeners]
    for number, session in enumerate(connectors):
        swarm.send(session, connects[number % LISTENER_KEYS])
    # The relay reads them within a moment, well inside their deadline; then it stands.
    swarm.run_until(
        lambda: sum(len(a) for _, a in listeners) == LISTENER_KEYS * PER_KEY,
        60,
        "904 connects announced",
    )
    assert all(len(set(a)) == PER_KEY for _, a in listeners)
    burst: list[Session] = []
    relay.proc.send_signal(signal.SIGSTOP)
    try:
        # The burst connects to a relay that stands; the kernel queues it for the relay.
        for _ in range(BURST):
            session = swarm.open(source=rng.choice(SOURCE_IPS))
            session.on_open = lambda s: swarm.send(s, encode_init_connection(Listen()))
            burst.append(session)
        deadline = time.monotonic() + STALL
        while time.monotonic() < deadline:
            swarm.poll(0.05)
            pump()
    finally:
        relay.proc.send_signal(signal.SIGCONT)
    swarm.run_until(
        lambda: (
            _alive(relay) and all(s.closed for s in connectors) and all(s.is_open for s in burst)
        ),
        120,
        "the expired connects closed and the burst handshaken",
    )
    _reload(relay, f"half_tunnel = {HALF_TUNNEL}", "half_tunnel = 600.0")  # for what follows
    assert relay.proc.poll() is None, "the relay died:\n" + relay.log_text()[-4000:]
    assert all(s.close_reason != "closed by us" for s in connectors)
    after = wait_metrics(
        relay,
        lambda v: (
            closed(v, "half_tunnel_expired") - closed(before, "half_tunnel_expired")
            == LISTENER_KEYS * PER_KEY
        ),
        30,
        "904 half-tunnels expired",
    )
    assert after["offset_relay_half_tunnels"] == 0
    for tunnel in honest:
        tunnel.check()

    # ---- mass closes: the burst's 480 listeners go at once, then a listener holding the
    # most pending connects the config allows.
    wait_metrics(
        relay,
        lambda v: v["offset_relay_listeners"] >= LISTENER_KEYS + BURST + HONEST,
        30,
        "the burst listening",
    )
    for session in burst:
        swarm.close(session, reset=rng.random() < 0.5)
    big, announced = _listener(swarm)
    swarm.run_until(lambda: big.is_open and not big.pending, 60, "the big listener")
    to_big = encode_init_connection(Connect(big.public_key))
    pending = _open_many(swarm, MOST, rng, pump, f"{MOST} connectors")
    for session in pending:
        swarm.send(session, to_big)
    swarm.run_until(lambda: len(announced) == MOST, 60, f"{MOST} connects announced")
    over = swarm.open()
    over.on_open = lambda s: swarm.send(s, to_big)
    swarm.run_until(lambda: over.closed, 60, "the connect over the bound refused")
    swarm.close(big)
    swarm.run_until(
        lambda: _alive(relay) and all(s.closed for s in pending), 120, "the pending connects closed"
    )
    assert relay.proc.poll() is None, "the relay died:\n" + relay.log_text()[-4000:]
    assert all(s.close_reason != "closed by us" for s in pending)
    base = closed(before, "listener_closed")
    wait_metrics(
        relay,
        lambda v: closed(v, "listener_closed") - base == MOST,
        30,
        f"{MOST} connects closed with their listener",
    )
    for _ in range(20):
        pump()
        swarm.poll(0.05)
    delivered = 0
    for tunnel in honest:
        delivered += tunnel.check()
    assert delivered > 0
    assert_probe_passes(relay)
    assert_relay_clean(relay)
    _reload(relay, "half_tunnel = 600.0", f"half_tunnel = {HALF_TUNNEL}")
    swarm.close_all()
    wait_metrics(relay, lambda v: open_connections(v) == 0, 60, "all closed")
    figures.attack_held("bursts")
    figures.add("half_tunnels_expired_in_one_pass", LISTENER_KEYS * PER_KEY)
    figures.add("connects_closed_with_their_listener", MOST)
    figures.add("burst_handshakes", BURST)
    figures.add("bytes_checked", delivered)


@pytest.mark.slow
def test_handshake_burst_mass_expiry_and_mass_closes_leave_the_relay_alive(relay_factory, figures):
    relay = relay_factory(
        settings(
            limits={"max_half_tunnels_per_listener": MOST, "max_connections_per_ip": 1024},
            timeouts={
                "half_tunnel": HALF_TUNNEL,
                "relay_conn_timeout": FIRST_MESSAGE,
                "conn_timeout": SETUP,
            },
        )
    )
    rss_start = relay.rss_kib()
    for round_no in rounds("bursts"):
        _bursts_round(relay, round_no, figures)
    figures.rss("bursts", rss_start, relay.rss_kib())
