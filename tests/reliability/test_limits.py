"""The relay's limits under attack: connection caps (per source IP and in total), memory per
idle tunnel, a reader that never reads, and running out of file descriptors. Each test states
its bound and checks it, and checks that honest nodes keep being served.
"""

from __future__ import annotations

import os
import resource

import pytest
from nacl.signing import SigningKey

from offset_appliance.wire.connection import VERSION_FRAME
from offset_appliance.wire.messages import Accept, Connect, Listen, encode_init_connection

from .honest import HonestTunnel
from .relaylib import (
    SOURCE_IPS,
    Stream,
    assert_probe_passes,
    assert_relay_clean,
    closed,
    incoming_key,
    interesting,
    open_connections,
    refused,
    scrape,
    settings,
    wait_metrics,
)
from .scale import rounds
from .swarm import Session, Swarm

MIB = 1024  # in KiB, the unit of VmRSS
LISTEN = encode_init_connection(Listen())


def _listener(swarm: Swarm, identity: SigningKey | None = None, source: str | None = None):
    session = swarm.open(identity, source=source)
    session.on_open = lambda s: swarm.send(s, LISTEN)
    return session


# ---- connection caps ---------------------------------------------------------------------

CAP_TOTAL = 30
CAP_PER_IP = 5
CAPS = settings(
    limits={
        "max_connections": CAP_TOTAL,
        "max_connections_per_ip": CAP_PER_IP,
        "max_handshakes": CAP_TOTAL,
    },
    timeouts={"conn_timeout": 120.0},  # unfinished handshakes keep their slot all along
)
IP_A, IP_G = "127.0.3.1", "127.0.3.7"
IPS_B_TO_F = [f"127.0.3.{n}" for n in range(2, 7)]


def _refused_at_once(swarm: Swarm, source: str) -> Session:
    """A connection the relay must close before it sends a single byte."""
    session = swarm.open(raw=True, source=source)
    swarm.send_raw(session, VERSION_FRAME)
    swarm.run_until(lambda: session.closed, 30, f"a refusal of a connection from {source}")
    assert session.received_raw == 0, "the relay started a handshake it should have refused"
    return session


def _caps_round(relay) -> None:
    before = scrape(relay)
    swarm = Swarm(relay.address, relay.public_key)
    # One address takes its whole share with handshakes it never finishes.
    holders = [swarm.open(raw=True, source=IP_A) for _ in range(CAP_PER_IP)]
    for session in holders:
        swarm.send_raw(session, VERSION_FRAME)
    wait_metrics(relay, lambda v: open_connections(v) == CAP_PER_IP, 30, "holders admitted")
    _refused_at_once(swarm, IP_A)
    values = wait_metrics(
        relay,
        lambda v: (
            refused(v, "max_connections_per_ip") - refused(before, "max_connections_per_ip") == 1
        ),
        30,
        "the per-IP refusal counted",
    )
    # Everyone else is still served.
    assert_probe_passes(relay)

    # Five more addresses fill the relay with honest listeners.
    listeners = [_listener(swarm, source=ip) for ip in IPS_B_TO_F for _ in range(CAP_PER_IP)]
    swarm.run_until(lambda: all(s.is_open and not s.pending for s in listeners), 60, "listen")
    wait_metrics(relay, lambda v: v["offset_relay_listeners"] == len(listeners), 30, "listening")
    assert open_connections(scrape(relay)) == CAP_TOTAL
    _refused_at_once(swarm, IP_G)
    values = wait_metrics(
        relay,
        lambda v: refused(v, "max_connections") - refused(before, "max_connections") == 1,
        30,
        "the total refusal counted",
    )

    # Freed slots serve again, the address that was at its cap included.
    for session in holders[:3]:
        swarm.close(session)
    wait_metrics(relay, lambda v: open_connections(v) == CAP_TOTAL - 3, 30, "slots freed")
    assert_probe_passes(relay)
    wait_metrics(relay, lambda v: open_connections(v) == CAP_TOTAL - 3, 30, "probe gone")
    again = swarm.open(raw=True, source=IP_A)
    swarm.send_raw(again, VERSION_FRAME)
    swarm.run_until(lambda: again.received_raw > 0 or again.closed, 30, "the relay to answer")
    assert not again.closed and again.received_raw > 0
    # Nothing honest was dropped to make room.
    assert all(not s.closed for s in listeners)
    values = scrape(relay)
    assert closed(values, "handshake_evicted") == closed(before, "handshake_evicted")
    swarm.close_all()
    wait_metrics(relay, lambda v: open_connections(v) == 0, 30, "all closed")
    assert_relay_clean(relay)


@pytest.mark.slow
def test_per_ip_and_total_connection_caps_hold(relay_factory, figures):
    relay = relay_factory(CAPS)
    for _ in rounds("connection_caps"):
        _caps_round(relay)
        figures.attack_held("connection_caps")


# ---- memory per idle tunnel --------------------------------------------------------------

IDLE_TUNNELS = 500
# A tunnel is two connections, each a socket, a wire.Connection with its keys and a few
# small buffers once the relay has sealed a message for it: well under 24 KiB per tunnel.
# (Without a bound here, a pool of random padding per connection once cost 132 KiB.)
IDLE_TUNNEL_KIB = 24
OPEN_WINDOW = 100  # connects under way at once, well below the handshake cap


def _settle(swarm: Swarm, connectors: list[Session]) -> None:
    """Wait until every connector has had its answer through the tunnel, or was closed."""
    swarm.run_until(lambda: all(c.inbox or c.closed for c in connectors), 120, "tunnels")
    lost = [c.close_reason for c in connectors if c.closed]
    assert not lost, lost[:5]


def _idle_tunnels_round(relay, figures) -> None:
    swarm = Swarm(relay.address, relay.public_key)
    listener_id = SigningKey.generate()
    listener = _listener(swarm, listener_id)
    acceptors: list[Session] = []

    def on_incoming(_listener: Session, message: bytes) -> None:
        key = incoming_key(message)
        acceptor = swarm.open(listener_id, source=SOURCE_IPS[len(acceptors) % 50])
        acceptor.on_open = lambda s: swarm.send(s, encode_init_connection(Accept(key)))
        acceptor.on_message = lambda s, m: swarm.send(s, b"back")
        acceptors.append(acceptor)

    listener.on_message = on_incoming
    swarm.run_until(lambda: listener.is_open and not listener.pending, 30, "listener")
    wait_metrics(relay, lambda v: v["offset_relay_listeners"] == 1, 30, "listening")
    rss_before = relay.rss_kib()
    connect = encode_init_connection(Connect(listener.public_key))
    connectors: list[Session] = []
    for number in range(IDLE_TUNNELS):
        if number % OPEN_WINDOW == 0:
            # One window at a time, each spliced before the next, keeps the pending connects
            # under the listener's cap.
            _settle(swarm, connectors)
        connector = swarm.open(source=SOURCE_IPS[100 + number % 50])
        connector.on_open = lambda s: swarm.send_all(s, [connect, b"hi"])
        connectors.append(connector)
    # Every tunnel has carried a message each way: both ends have sealed traffic.
    _settle(swarm, connectors)
    assert all(c.inbox == [b"back"] for c in connectors)
    values = scrape(relay)
    assert values["offset_relay_tunnels"] == IDLE_TUNNELS
    growth = relay.rss_kib() - rss_before
    assert growth < IDLE_TUNNELS * IDLE_TUNNEL_KIB, f"{growth / IDLE_TUNNELS:.1f} KiB per tunnel"
    swarm.close_all()
    wait_metrics(relay, lambda v: open_connections(v) == 0, 60, "all closed")
    assert_relay_clean(relay)
    figures.add("idle_tunnels_held", IDLE_TUNNELS)


@pytest.mark.slow
def test_idle_tunnels_cost_little_memory(relay_factory, figures):
    relay = relay_factory(settings(limits={"max_half_tunnels_per_listener": 2 * OPEN_WINDOW}))
    rss_start = relay.rss_kib()
    for _ in rounds("idle_tunnels"):
        _idle_tunnels_round(relay, figures)
        figures.attack_held("idle_tunnels")
    figures.rss("idle_tunnels", rss_start, relay.rss_kib())


# ---- readers that never read -------------------------------------------------------------

STUCK_TUNNELS = 21
HIGH_WATER = 256 * 1024
KEEPALIVE = 6.0
MESSAGE = 64 * 1024
RECV_SIZE = 256 * 1024  # the relay reads at most this much at once
# Per stuck tunnel the relay holds at most the high-water mark of queued output, one read's
# worth of input and a message being sealed; the kernel's socket buffers are not its memory.
STUCK_RSS_BOUND = STUCK_TUNNELS * (HIGH_WATER + RECV_SIZE + 2 * MESSAGE) // 1024 + 16 * MIB
HELD_BACK = 1 << 20  # bytes a writer has queued that the relay would not take
GROUPS = ("alive", "silent", "abandoned")


def _stuck_round(relay, figures) -> None:
    before = scrape(relay)
    swarm = Swarm(relay.address, relay.public_key, keepalive=KEEPALIVE)
    listener_id = SigningKey.generate()
    listener = _listener(swarm, listener_id)
    readers: dict[bytes, Session] = {}
    streams: dict[bytes, Stream] = {}

    def on_incoming(_listener: Session, message: bytes) -> None:
        key = incoming_key(message)
        reader = swarm.open(listener_id, rcvbuf=16 * 1024)
        # Later, a third of the readers go silent as well, a third lose their writer; the
        # rest keep sending keepalives all along.
        reader.tag = GROUPS[len(readers) % len(GROUPS)]

        def on_open(session: Session) -> None:
            swarm.send(session, encode_init_connection(Accept(key)))
            swarm.stop_reading(session)

        reader.on_open = on_open
        reader.on_message = lambda s, m: streams[key].receive(m)
        readers[key] = reader

    listener.on_message = on_incoming
    swarm.run_until(lambda: listener.is_open and not listener.pending, 30, "listener")
    wait_metrics(relay, lambda v: v["offset_relay_listeners"] == 1, 30, "listening")
    # From several addresses, as from several nodes: one address may have only
    # max_half_tunnels_per_listener_per_ip pending connects to a listener.
    writers = [swarm.open(source=SOURCE_IPS[n % 50]) for n in range(STUCK_TUNNELS)]
    connect = encode_init_connection(Connect(listener.public_key))
    for number, writer in enumerate(writers):
        writer.on_open = lambda s: swarm.send(s, connect)
        streams[writer.public_key] = Stream(number, 0, number, 1 << 40, MESSAGE)
    swarm.run_until(
        lambda: len(readers) == STUCK_TUNNELS and all(r.is_open for r in readers.values()),
        60,
        "stuck tunnels",
    )
    wait_metrics(relay, lambda v: v["offset_relay_tunnels"] == STUCK_TUNNELS, 30, "tunnels")
    rss_before = relay.rss_kib()

    def push() -> bool:
        for writer in writers:
            stream = streams[writer.public_key]
            while writer.is_open and writer.pending < 2 * HELD_BACK:
                swarm.send(writer, stream.next_message())
        # Held back: the relay stopped reading every writer, so their queues stay full.
        return all(w.pending >= HELD_BACK for w in writers)

    swarm.run_until(push, 120, "every writer to be held back")
    swarm.run_for(2.0)  # unbounded buffering would keep growing meanwhile
    rss = relay.rss_kib()
    assert rss - rss_before < STUCK_RSS_BOUND, (rss_before, rss, STUCK_RSS_BOUND)

    # Silent readers are closed at the keepalive deadline, and their writers after them.
    # A reader whose writer is gone is closed once the flush of what it was owed has waited
    # a keepalive interval. Readers that keep sending keepalives keep their tunnel however
    # long they stall.
    group = {tag: [k for k, r in readers.items() if r.tag == tag] for tag in set(GROUPS)}
    alive, silent, abandoned = (group[tag] for tag in GROUPS)
    by_key = {w.public_key: w for w in writers}
    for key in silent:
        readers[key].timers = False
    for key in abandoned:
        swarm.close(by_key[key], reset=True)
    # (A reader that does not read cannot see its own close; the relay's count shows it.)
    swarm.run_until(lambda: all(by_key[k].closed for k in silent), 60, "writers to be closed")

    def gone(values, reason: str) -> float:
        return closed(values, reason) - closed(before, reason)

    # The swarm keeps running while the relay's counts are awaited: the live readers and
    # the listener go on sending keepalives (a wait that stopped them would have the relay
    # close them too, rightly, and the counts would never match).
    scraped: dict[str, dict[str, float]] = {}

    def counted() -> bool:
        values = scraped["last"] = scrape(relay)
        return gone(values, "keepalive_timeout") == len(silent) and gone(
            values, "flush_timeout"
        ) == len(abandoned)

    try:
        swarm.run_until(counted, 60, "the relay's closes")
    except AssertionError:
        raise AssertionError(
            "relay metrics never showed silent readers closed at the keepalive deadline, "
            f"abandoned ones after the flush: {interesting(scraped['last'])}"
        ) from None
    after = scraped["last"]
    assert after["offset_relay_tunnels"] == len(alive)
    assert all(not by_key[k].closed for k in alive)

    # The live readers now read: what was held back arrives whole and in order.
    for key in alive:
        swarm.start_reading(readers[key])

    def drained() -> bool:
        return all(streams[k].caught_up for k in alive)

    swarm.run_until(drained, 120, "the held-back streams to drain")
    errors = [e for s in streams.values() for e in s.errors]
    assert not errors, errors[:10]
    figures.add("bytes_checked", sum(streams[k].received_bytes for k in alive))
    swarm.close_all()
    wait_metrics(relay, lambda v: open_connections(v) == 0, 60, "all closed")
    assert_relay_clean(relay)


@pytest.mark.slow
def test_readers_that_never_read_hold_bounded_memory(relay_factory, figures):
    relay = relay_factory(
        settings(
            limits={"buffer_high_water": HIGH_WATER, "buffer_low_water": HIGH_WATER // 4},
            timeouts={"keepalive": KEEPALIVE},
        )
    )
    rss_start = relay.rss_kib()
    for _ in rounds("never_reading"):
        _stuck_round(relay, figures)
        figures.attack_held("never_reading")
    figures.rss("never_reading", rss_start, relay.rss_kib())


# ---- connects that are never accepted -----------------------------------------------------

UNACCEPTED = 20
HALF_TUNNEL_BUFFER = 256 * 1024
# Data sent before the accept is kept, up to HALF_TUNNEL_BUFFER per half-tunnel; then the
# relay stops reading the connecting side (plus one read's worth and a message in hand).
UNACCEPTED_RSS_BOUND = UNACCEPTED * (HALF_TUNNEL_BUFFER + RECV_SIZE + 2 * MESSAGE) // 1024 + (
    16 * MIB
)


def _unaccepted_round(relay, figures) -> None:
    swarm = Swarm(relay.address, relay.public_key)
    listener_id = SigningKey.generate()
    listener = _listener(swarm, listener_id)
    announced: list[bytes] = []
    listener.on_message = lambda s, m: announced.append(incoming_key(m))
    swarm.run_until(lambda: listener.is_open and not listener.pending, 30, "listener")
    wait_metrics(relay, lambda v: v["offset_relay_listeners"] == 1, 30, "listening")
    rss_before = relay.rss_kib()
    connect = encode_init_connection(Connect(listener.public_key))
    writers = [swarm.open(source=SOURCE_IPS[n % 50]) for n in range(UNACCEPTED)]
    streams = {}
    for number, writer in enumerate(writers):
        writer.on_open = lambda s: swarm.send(s, connect)
        streams[writer.public_key] = Stream(number, 0, number, 1 << 40, MESSAGE)

    def push() -> bool:
        for writer in writers:
            stream = streams[writer.public_key]
            while writer.is_open and writer.pending < 2 * HELD_BACK:
                swarm.send(writer, stream.next_message())
        return len(announced) == UNACCEPTED and all(w.pending >= HELD_BACK for w in writers)

    swarm.run_until(push, 60, "every unaccepted writer to be held back")
    swarm.run_for(2.0)  # unbounded buffering would keep growing meanwhile
    rss = relay.rss_kib()
    assert rss - rss_before < UNACCEPTED_RSS_BOUND, (rss_before, rss, UNACCEPTED_RSS_BOUND)
    assert scrape(relay)["offset_relay_half_tunnels"] == UNACCEPTED

    # Accepted at last, every half-tunnel delivers what was held, whole and in order.
    for key in announced:
        acceptor = swarm.open(listener_id)
        acceptor.on_open = lambda s, key=key: swarm.send(s, encode_init_connection(Accept(key)))
        acceptor.on_message = lambda s, m, key=key: streams[key].receive(m)
    swarm.run_until(
        lambda: all(s.caught_up for s in streams.values()), 120, "the held data to arrive"
    )
    errors = [e for s in streams.values() for e in s.errors]
    assert not errors, errors[:10]
    assert all(not w.closed for w in writers)
    figures.add("bytes_checked", sum(s.received_bytes for s in streams.values()))
    swarm.close_all()
    wait_metrics(relay, lambda v: open_connections(v) == 0, 60, "all closed")
    assert_relay_clean(relay)


@pytest.mark.slow
def test_unaccepted_connects_hold_bounded_memory(relay_factory, figures):
    relay = relay_factory(settings(limits={"half_tunnel_buffer": HALF_TUNNEL_BUFFER}))
    rss_start = relay.rss_kib()
    for _ in rounds("unaccepted"):
        _unaccepted_round(relay, figures)
        figures.attack_held("unaccepted_connects")
    figures.rss("unaccepted", rss_start, relay.rss_kib())


# ---- early data is let go once delivered ---------------------------------------------------

EARLY_ROUNDS = 4  # all within one half-tunnel lifetime (32 s)
EARLY_CONNECTS = 40
EARLY_DATA = 1 << 20  # what each connect sends before it is accepted: a full buffer
# The relay holds one round's early data (EARLY_CONNECTS MiB) while it is delivered. Were it
# kept after delivery (by the half-tunnel's expiry timer, as it once was), the rounds would
# add up to EARLY_ROUNDS times that.
EARLY_RSS_BOUND = 2 * EARLY_CONNECTS * EARLY_DATA // 1024 + 16 * MIB


def _early_data_round(relay, swarm: Swarm, number: int) -> None:
    listener_id = SigningKey.generate()
    listener = _listener(swarm, listener_id)
    announced: list[bytes] = []
    listener.on_message = lambda s, m: announced.append(incoming_key(m))
    swarm.run_until(lambda: listener.is_open and not listener.pending, 30, "listener")
    wait_metrics(relay, lambda v: v["offset_relay_listeners"] == 1, 30, "listening")
    connect = encode_init_connection(Connect(listener.public_key))
    streams: dict[bytes, Stream] = {}
    connectors = []
    for index in range(EARLY_CONNECTS):
        stream = Stream(number * EARLY_CONNECTS + index, 0, index, EARLY_DATA, MESSAGE)
        connector = swarm.open(source=SOURCE_IPS[index % 50])

        def on_open(session: Session, stream: Stream = stream) -> None:
            swarm.send(session, connect)
            while not stream.done_sending:
                swarm.send(session, stream.next_message())

        connector.on_open = on_open
        streams[connector.public_key] = stream
        connectors.append(connector)
    swarm.run_until(
        lambda: len(announced) == EARLY_CONNECTS and all(c.is_open for c in connectors),
        60,
        "connects",
    )
    for key in announced:
        acceptor = swarm.open(listener_id)
        acceptor.on_open = lambda s, key=key: swarm.send(s, encode_init_connection(Accept(key)))
        acceptor.on_message = lambda s, m, key=key: streams[key].receive(m)
    swarm.run_until(lambda: all(s.complete for s in streams.values()), 60, "early data")
    errors = [e for s in streams.values() for e in s.errors]
    assert not errors, errors[:10]
    swarm.close_all()
    wait_metrics(relay, lambda v: open_connections(v) == 0, 60, "all closed")


@pytest.mark.slow
def test_early_data_is_let_go_once_delivered(relay_factory, figures):
    relay = relay_factory(settings())
    for _ in rounds("early_data"):
        swarm = Swarm(relay.address, relay.public_key)
        rss_before = relay.rss_kib()
        for number in range(EARLY_ROUNDS):
            _early_data_round(relay, swarm, number)
        rss = relay.rss_kib()
        assert rss - rss_before < EARLY_RSS_BOUND, (rss_before, rss, EARLY_RSS_BOUND)
        assert_relay_clean(relay)
        figures.add("bytes_checked", EARLY_ROUNDS * EARLY_CONNECTS * EARLY_DATA)


# ---- out of file descriptors -------------------------------------------------------------

FD_SLACK = 12  # descriptors the relay may still open when the flood starts
FD_FLOOD = 60


def _fd_round(relay, figures) -> None:
    swarm = Swarm(relay.address, relay.public_key)
    honest = HonestTunnel(swarm)
    pid = relay.proc.pid
    original = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + FD_SLACK, original[1]))
    try:
        flood = []
        for number in range(FD_FLOOD):
            session = swarm.open(raw=True, source=SOURCE_IPS[number])
            swarm.send_raw(session, VERSION_FRAME)
            flood.append(session)

        def settled() -> bool:
            honest.pump()
            # Each flood connection is either admitted (the relay sent its handshake) or shed.
            return all(s.closed or s.received_raw > 0 for s in flood)

        swarm.run_until(settled, 60, "every flood connection to be admitted or shed")
        shed = [s for s in flood if s.closed]
        admitted = [s for s in flood if not s.closed]
        assert all(s.received_raw == 0 for s in shed)
        assert shed and len(admitted) <= FD_SLACK, (len(shed), len(admitted))
        # The tunnel that existed before keeps working while descriptors are exhausted.
        honest.pump()
        swarm.run_for(1.0)
        delivered = honest.check()
        honest.pump()
        swarm.run_until(lambda: honest.check() > delivered, 30, "honest traffic")
        assert "out of file descriptors" in relay.log_text()
        for session in admitted:
            swarm.close(session)
        wait_metrics(
            relay, lambda v: open_connections(v) == 3, 30, "the flood gone", shed_scrapes=True
        )
        # Descriptors are back: new connections are served again.
        assert_probe_passes(relay)
        assert refused(scrape(relay), "file_descriptors") >= len(shed)
        honest.check()
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, original)
    swarm.close_all()
    assert_relay_clean(relay)
    figures.add("connections_shed_without_descriptors", len(shed))


@pytest.mark.slow
def test_out_of_file_descriptors_sheds_new_connections_and_keeps_tunnels(relay_factory, figures):
    relay = relay_factory(settings(timeouts={"conn_timeout": 120.0}))
    rss_start = relay.rss_kib()
    for _ in rounds("fd_exhaustion"):
        _fd_round(relay, figures)
        figures.attack_held("fd_exhaustion")
    figures.rss("fd_exhaustion", rss_start, relay.rss_kib())
