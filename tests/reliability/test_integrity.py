"""Integrity under load: 200 concurrent tunnels streaming checked random data both ways, with
rekeys on both hops and random abrupt disconnects of either end.

Every stream received must be a byte-exact prefix of what was sent on that tunnel (running
SHA-256 on both sides), no message may arrive on another tunnel, tunnels left alone must
deliver everything, and the relay must report no protocol error, no failed handshake and no
ERROR line.
"""

from __future__ import annotations

import random

import pytest
from nacl.signing import SigningKey

from offset_appliance.wire.messages import Accept, Connect, Listen, encode_init_connection

from .relaylib import (
    SOURCE_IPS,
    Stream,
    assert_relay_clean,
    closed,
    failed,
    incoming_key,
    open_connections,
    scrape,
    settings,
    wait_metrics,
)
from .scale import SOAK, rounds
from .swarm import Session, Swarm

TUNNELS = 200
LISTENERS = 20  # each listener key serves ten tunnels
QUOTA = (1 << 20) if SOAK else 512 * 1024  # bytes each direction of each tunnel carries
MAX_MESSAGE = 48 * 1024
ABORT_FRACTION = 0.25
LEAK_BOUND_KIB = 64 * 1024  # growth allowed between the end of the first and of a later round
WINDOW = 96 * 1024  # bytes a session may have queued before we stop producing for it

LISTEN = encode_init_connection(Listen())


class Tunnel:
    """One tunnel under test: its two ends, its two checked streams, its fate."""

    def __init__(self, number: int, listener: SigningKey, seed: int, rng: random.Random):
        self.number = number
        self.listener = listener
        self.forward = Stream(number, 0, seed, QUOTA, MAX_MESSAGE)  # connector -> acceptor
        self.backward = Stream(number, 1, seed + 1, QUOTA, MAX_MESSAGE)  # acceptor -> connector
        self.connector: Session | None = None
        self.acceptor: Session | None = None
        # Some tunnels lose one end abruptly part-way (with a TCP RST or a plain close).
        self.abort_side: str | None = None
        if rng.random() < ABORT_FRACTION:
            self.abort_side = rng.choice(("connector", "acceptor"))
            self.abort_after = rng.randrange(1, QUOTA)
            self.abort_reset = rng.random() < 0.5
        self.aborted = False
        self.finished = False

    @property
    def streams(self) -> tuple[Stream, Stream]:
        """Both directions."""
        return self.forward, self.backward

    def ends(self) -> list[Session]:
        """The connections that exist so far (the acceptor comes after the notification)."""
        return [s for s in (self.connector, self.acceptor) if s is not None]


def _run_round(relay, round_no: int, figures) -> None:
    rng = random.Random(round_no * 7919 + 17)
    swarm = Swarm(relay.address, relay.public_key)
    listener_ids = [SigningKey.generate() for _ in range(LISTENERS)]
    tunnels = [
        Tunnel(n, listener_ids[n % LISTENERS], rng.randrange(1 << 30), rng) for n in range(TUNNELS)
    ]
    by_connector: dict[bytes, Tunnel] = {}
    listeners: list[Session] = []

    def on_incoming(_listener: Session, message: bytes) -> None:
        tunnel = by_connector[incoming_key(message)]
        acceptor = swarm.open(tunnel.listener, source=rng.choice(SOURCE_IPS[:8]))
        acceptor.tag = tunnel
        acceptor.on_open = lambda s: swarm.send(s, encode_init_connection(Accept(tunnel_key(s))))
        acceptor.on_message = lambda s, m: s.tag.forward.receive(m)
        tunnel.acceptor = acceptor

    def tunnel_key(acceptor: Session) -> bytes:
        return acceptor.tag.connector.public_key

    for identity in listener_ids:
        listener = swarm.open(identity, source=rng.choice(SOURCE_IPS[:8]))
        listener.on_open = lambda s: swarm.send(s, LISTEN)
        listener.on_message = on_incoming
        listeners.append(listener)
    swarm.run_until(lambda: all(s.is_open and not s.pending for s in listeners), 60, "listeners")
    wait_metrics(relay, lambda v: v["offset_relay_listeners"] == LISTENERS, 30, "all listening")

    for tunnel in tunnels:
        connector = swarm.open(source=rng.choice(SOURCE_IPS[:8]))
        connector.tag = tunnel
        # Data follows the connect at once: the relay buffers it until the accept.
        connector.on_open = lambda s: swarm.send(
            s, encode_init_connection(Connect(bytes(s.tag.listener.verify_key)))
        )
        connector.on_message = lambda s, m: s.tag.backward.receive(m)
        tunnel.connector = connector
        by_connector[connector.public_key] = tunnel

    def pump() -> None:
        for tunnel in tunnels:
            if tunnel.finished:
                continue
            for session, stream in (
                (tunnel.connector, tunnel.forward),
                (tunnel.acceptor, tunnel.backward),
            ):
                if session is None or not session.is_open or stream.done_sending:
                    continue
                while session.pending < WINDOW and not stream.done_sending:
                    swarm.send(session, stream.next_message())
                    if rng.random() < 0.002:
                        swarm.rekey(session)
                side = "connector" if session is tunnel.connector else "acceptor"
                if (
                    tunnel.abort_side == side
                    and not tunnel.aborted
                    and stream.sent_bytes >= tunnel.abort_after
                ):
                    tunnel.aborted = True
                    swarm.close(session, reset=tunnel.abort_reset)
            _settle(tunnel)

    def _settle(tunnel: Tunnel) -> None:
        if tunnel.aborted:
            # The surviving end is closed by the relay once it has had what was relayed.
            tunnel.finished = all(s.closed for s in tunnel.ends())
        elif all(s.complete for s in tunnel.streams):
            assert tunnel.connector is not None
            swarm.close(tunnel.connector)  # the relay must then close the acceptor
            tunnel.finished = tunnel.acceptor is not None and tunnel.acceptor.closed

    closed_listeners = False

    def done() -> bool:
        nonlocal closed_listeners
        pump()
        if not closed_listeners and all(
            t.forward.received_messages for t in tunnels if not t.aborted
        ):
            # Every tunnel is spliced (its acceptor has had data); established tunnels must
            # outlive their listener's listen connection.
            for listener in listeners[: LISTENERS // 2]:
                swarm.close(listener)
            closed_listeners = True
        return all(t.finished for t in tunnels)

    swarm.run_until(done, 300 if SOAK else 180, "every tunnel to finish")

    errors = [e for t in tunnels for s in t.streams for e in s.errors]
    assert not errors, errors[:10]
    for tunnel in tunnels:
        for session in tunnel.ends():
            assert session.protocol_error is None, (tunnel.number, session.protocol_error)
        if not tunnel.aborted:
            assert all(s.complete for s in tunnel.streams), tunnel.number
            assert tunnel.acceptor is not None
            assert tunnel.acceptor.close_reason != "closed by us"
        else:
            survivor = tunnel.acceptor if tunnel.abort_side == "connector" else tunnel.connector
            if survivor is not None:
                assert survivor.close_reason != "closed by us", tunnel.number
    swarm.close_all()

    aborted = sum(t.aborted for t in tunnels)
    assert 0 < aborted < TUNNELS
    figures.add("tunnels_checked", TUNNELS)
    figures.add("tunnels_aborted", aborted)
    figures.add("bytes_checked", sum(s.received_bytes for t in tunnels for s in t.streams))


@pytest.mark.slow
def test_200_tunnels_byte_exact_with_abrupt_disconnects(relay_factory, figures):
    relay = relay_factory(
        settings(
            limits={"max_connections_per_ip": 1024},
            timeouts={"rekey_interval": 2.0},
        )
    )
    rss_start = relay.rss_kib()
    rss_first = 0
    for round_no in rounds("integrity"):
        _run_round(relay, round_no, figures)
        # The first round gives the relay its working set; later rounds must not add to it.
        rss = relay.rss_kib()
        rss_first = rss_first or rss
        assert rss - rss_first < LEAK_BOUND_KIB, (rss_first, rss)
        values = wait_metrics(
            relay, lambda v: open_connections(v) == 0, 60, "all connections closed"
        )
        # Honest clients never broke the protocol, so the relay must not have seen a violation.
        assert closed(values, "protocol_error") == 0
        assert sum(v for k, v in values.items() if "handshakes_failed" in k) == 0
        assert failed(values, "timeout") == 0
        assert values["offset_relay_tunnels"] == 0 and values["offset_relay_half_tunnels"] == 0
        assert values["offset_relay_rekeys_total"] > 0
        assert_relay_clean(relay)
    rss_end = relay.rss_kib()
    figures.rss("integrity", rss_start, rss_end)
    values = scrape(relay)
    assert values["offset_relay_relayed_bytes_total"] > 0
