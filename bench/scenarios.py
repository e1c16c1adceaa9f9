"""The benchmarks of issue "Performance", one function each, returning plain JSON-ready dicts.

Every load runs against a fresh ``strelay`` so that memory and CPU readings belong to that
load alone. A measurement window starts only after the load is set up and warmed up; inside
it the relay's CPU time, the client processes' CPU time and the workers' counters are read at
both edges, so a figure is always "work done in the window / cost in the window".
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from nacl.signing import SigningKey

from offset_appliance.client import RelayClient
from offset_appliance.files import b64url_encode
from offset_appliance.probe import HEALTHY, probe
from offset_appliance.wire.connection import TIMER_SPREAD

from . import floors
from .relay import (
    BenchError,
    BenchRelay,
    Usage,
    cpu_times,
    free_port,
    machine_cpu,
    steal_share,
)
from .workers import (
    BYTES,
    FAILED,
    MESSAGES,
    Target,
    Worker,
    bulk_receiver,
    bulk_sender,
    handshake_worker,
    idle_worker,
    total,
    tunnel_worker,
)

GIB = 1 << 30
PAYLOAD_SEED = 5


@dataclass(frozen=True)
class Sizes:
    """How big each benchmark is; ``FULL`` is what ``make bench`` runs, ``SMOKE`` is tiny."""

    bulk_bytes: int = GIB
    bulk_message: int = 64 * 1024
    small_message: int = 64
    small_connections: tuple[int, ...] = (100, 1000, 10000)
    small_headline: int = 1000  # the run whose figures are the headline of test 2
    small_window: int = 2  # messages in flight per tunnel and direction
    # The same load at the headline scale with other windows: deeper windows put more
    # messages into each read and write, so the cost per message depends on them.
    small_windows: tuple[int, ...] = (1, 8)
    small_seconds: float = 10.0
    handshake_seconds: float = 10.0
    handshake_concurrency: int = 32  # per client process
    idle_connections: int = 10_000
    idle_seconds: float = 60.0
    idle_workers: int = 4
    latency_message: int = 100
    latency_samples: int = 2000
    wire_samples: int = 10_000
    workers: int = 2  # client processes for the tunnel and handshake loads
    warmup: float = 1.0
    floor_handshakes: int = 2000
    floor_small: int = 20_000
    controls_rounds: int = 2  # test 9: each configuration runs this many times, alternating
    # Test 10: listen connections from many loopback addresses, held with the original's
    # keepalives at a shortened rekey interval: the longest at which every connection still
    # rekeys in the hold, once (a rekey comes up to a quarter of the interval early, so at
    # 210 to 280 s after its connection opened; the hold starts when the last one has).
    scale_connections: int = 100_000
    scale_seconds: float = 300.0
    scale_rekey_interval: float = 280.0
    scale_workers: int = 4
    scale_sources: int = 16  # 127.0.1.1 on: a few thousand connections per address
    scale_probe_interval: float = 0.5


FULL = Sizes()
SMOKE = Sizes(
    bulk_bytes=4 << 20,
    small_connections=(10, 40),
    small_headline=40,
    small_windows=(4,),
    small_seconds=1.0,
    handshake_seconds=1.0,
    handshake_concurrency=4,
    idle_connections=40,
    idle_seconds=1.0,
    latency_samples=50,
    wire_samples=200,
    warmup=0.2,
    floor_handshakes=50,
    floor_small=500,
    controls_rounds=1,
    scale_connections=200,
    scale_seconds=4.0,
    scale_rekey_interval=1.5,
    scale_workers=2,
    scale_sources=4,
    scale_probe_interval=0.2,
)


def sizes_dict(sizes: Sizes) -> dict:
    """The sizes, as recorded in results.json."""
    return asdict(sizes)


# ---- measuring -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """What happened between two readings: wall time, the relay's and the clients' CPU."""

    seconds: float
    relay_user: float
    relay_system: float
    client_cpu: float
    counts: tuple[int, ...]  # deltas of the workers' MESSAGES, BYTES and FAILED counters
    rss_kib: int
    steal_share: float = 0.0  # of all CPUs' time, taken by the hypervisor (``machine_cpu``)
    # The relay's CPU seconds to the nanosecond (``exact_cpu``), where the kernel keeps them.
    relay_exact: float | None = None

    @property
    def relay_cpu(self) -> float:
        # user and system are in 10 ms ticks: a short window (the smoke's 4 MiB bulk run) can
        # read 0 in ticks, so the exact count is used when there is one and it saw the work.
        ticks = self.relay_user + self.relay_system
        if self.relay_exact is not None and (self.relay_exact > 0 or ticks == 0):
            return self.relay_exact
        return ticks

    def as_dict(self) -> dict:
        return {
            "seconds": round(self.seconds, 3),
            "relay_cpu_seconds": round(self.relay_cpu, 3),
            "relay_user_seconds": round(self.relay_user, 3),
            "relay_system_seconds": round(self.relay_system, 3),
            # How busy the relay was: 1.0 means it had one core to itself and used all of it.
            "relay_cpu_share": round(self.relay_cpu / self.seconds, 3),
            "client_cpu_seconds": round(self.client_cpu, 3),
            "steal_share": round(self.steal_share, 3),
        }


class Meter:
    """Reads the relay and the client processes at the start and end of a window."""

    def __init__(self, relay: BenchRelay, workers: list[Worker]) -> None:
        self.relay = relay
        self.workers = workers
        self._start: tuple[Usage, float, tuple[int, ...], tuple[int, int]] | None = None

    def _clients_cpu(self) -> float:
        total_seconds = 0.0
        for worker in self.workers:
            assert worker.proc.pid is not None  # started in Worker()
            user, system = cpu_times(worker.proc.pid)
            total_seconds += user + system
        return total_seconds

    def _counts(self) -> tuple[int, ...]:
        return tuple(total(self.workers, slot) for slot in (MESSAGES, BYTES, FAILED))

    def start(self) -> None:
        self._start = (self.relay.usage(), self._clients_cpu(), self._counts(), machine_cpu())

    def stop(self) -> Window:
        end_usage, end_clients, end_counts = self.relay.usage(), self._clients_cpu(), self._counts()
        end_machine = machine_cpu()
        assert self._start is not None
        usage, clients, counts, machine = self._start
        return Window(
            seconds=end_usage.at - usage.at,
            relay_user=end_usage.user - usage.user,
            relay_system=end_usage.system - usage.system,
            client_cpu=end_clients - clients,
            counts=tuple(b - a for a, b in zip(counts, end_counts, strict=True)),
            rss_kib=end_usage.rss_kib,
            steal_share=steal_share(machine, end_machine),
            relay_exact=(
                end_usage.exact - usage.exact
                if end_usage.exact is not None and usage.exact is not None
                else None
            ),
        )


def percentiles(samples: list[float]) -> dict:
    """p50, p99 and mean of durations in seconds, as microseconds."""
    if not samples:
        raise BenchError("no samples were taken")
    ordered = sorted(samples)

    def at(fraction: float) -> float:
        # Nearest rank: the smallest sample with at least ``fraction`` of samples at or below.
        return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]

    return {
        "samples": len(ordered),
        "p50_us": round(at(0.50) * 1e6, 1),
        "p99_us": round(at(0.99) * 1e6, 1),
        "mean_us": round(sum(ordered) / len(ordered) * 1e6, 1),
    }


def _target(relay: BenchRelay) -> Target:
    return Target(relay.address[0], relay.address[1], relay.public_key)


def _baseline(relay: BenchRelay) -> Usage:
    """The relay's usage after one probe (so first-connection costs are not counted per
    connection later); also proves the relay works before any load starts."""
    result = probe(relay.ticket_address, relay.public_key, 10.0)
    if result.code != HEALTHY:
        raise BenchError(f"the relay failed its first probe: {result.message}")
    return relay.usage()


def _finish(relay: BenchRelay, workers: list[Worker]) -> list:
    """Stop the workers, collecting their final reports, then the relay; fail on errors."""
    collected = [worker.stop() for worker in workers]
    relay.stop()
    problems = relay.problems()
    if problems:
        raise BenchError(f"the relay logged errors: {problems[0]}")
    if any(report is None for report in collected):
        raise BenchError("a client process ended without its final report")
    return collected


def _abandon(relay: BenchRelay, workers: list[Worker], clients: list) -> None:
    """Tear everything down after a failure, without raising over the original error."""
    for client in clients:
        client.close()
    for worker in workers:
        worker.tell("stop")
        worker.kill()
    relay.stop()
    # What the relay warned about explains most failures (refusals, evictions, closes).
    warnings = [line for line in relay.lines if "WARNING" in line or "ERROR" in line]
    for line in warnings[-10:]:
        print(f"bench: the relay logged: {line}", file=sys.stderr)


def _split(count: int, parts: int) -> list[int]:
    """``count`` spread over ``parts`` as evenly as possible (no zero parts)."""
    parts = max(1, min(parts, count))
    return [count // parts + (1 if index < count % parts else 0) for index in range(parts)]


# ---- 1. bulk -------------------------------------------------------------------------------


def bulk(workdir: Path, sizes: Sizes, *, profile: Path | None = None) -> dict:
    """64 KiB messages through one tunnel: MB/s and relay CPU per GiB, against open + seal."""
    size = sizes.bulk_message
    count = max(1, sizes.bulk_bytes // size)
    relay = BenchRelay(workdir / "bulk", profile=profile)
    workers: list[Worker] = []
    try:
        _baseline(relay)
        target = _target(relay)
        receiver = Worker("bulk receiver", bulk_receiver, target, count, size, PAYLOAD_SEED)
        workers.append(receiver)
        listener_key = receiver.expect("listening", 60)
        sender = Worker("bulk sender", bulk_sender, target, listener_key, count, size, PAYLOAD_SEED)
        workers.append(sender)
        sender.expect("ready", 60)
        receiver.expect("ready", 60)
        meter = Meter(relay, workers)
        meter.start()
        sender.tell("go")
        received = receiver.expect("done", 900)
        window = meter.stop()
        sent = sender.expect("done", 60)
    except BaseException:
        _abandon(relay, workers, [])
        raise
    _finish(relay, workers)
    moved = count * size
    seconds = received["finished"] - sent["started"]
    gib = moved / GIB
    result = {
        "message_bytes": size,
        "messages": count,
        "bytes": moved,
        "seconds": round(seconds, 3),
        "mb_per_s": round(moved / seconds / 1e6, 1),
        "relay_cpu_per_gib": round(window.relay_cpu / gib, 3),
        # What one relay core could carry at the measured CPU cost (None: no CPU time read).
        "mb_per_relay_cpu_second": (
            round(moved / window.relay_cpu / 1e6, 1) if window.relay_cpu else None
        ),
    }
    result.update(window.as_dict())
    return result


# ---- 2, 5 (loaded) and 6. small messages ---------------------------------------------------


def small(
    workdir: Path,
    sizes: Sizes,
    connections: int,
    *,
    latency: bool,
    window: int | None = None,
    profile: Path | None = None,
    settings: dict | None = None,
    name: str = "small",
) -> dict:
    """64-byte messages over many tunnels (``connections`` / 2 of them), flowing both ways."""
    tunnels = max(1, connections // 2)
    window = window or sizes.small_window
    relay = BenchRelay(
        workdir / f"{name}-{connections}-{window}", profile=profile, settings=settings
    )
    workers: list[Worker] = []
    clients: list[RelayClient] = []
    try:
        base = _baseline(relay)
        target = _target(relay)
        started = time.monotonic()
        for index, count in enumerate(_split(tunnels, sizes.workers)):
            workers.append(
                Worker(
                    f"tunnel client {index}",
                    tunnel_worker,
                    target,
                    count,
                    window,
                    sizes.small_message,
                    PAYLOAD_SEED,
                )
            )
        opened = sum(worker.expect("ready", 600)["connections"] for worker in workers)
        setup_seconds = time.monotonic() - started
        if latency:
            a, b, clients = floors.relay_pair(relay.address, relay.public_key)
        for worker in workers:
            worker.tell("go")
        time.sleep(sizes.warmup)
        meter = Meter(relay, workers)
        meter.start()
        until = time.monotonic() + sizes.small_seconds
        samples: list[float] = []
        if latency:
            # Measured from this process while the load runs; it shares the CPUs with it.
            samples = floors.round_trips(a, b, sizes.latency_message, 1 << 30, until=until)
        time.sleep(max(0.0, until - time.monotonic()))
        measured = meter.stop()
    except BaseException:
        _abandon(relay, workers, clients)
        raise
    for client in clients:
        client.close()
    reports = _finish(relay, workers)
    messages, rx_bytes, failed = measured.counts
    if messages == 0:
        raise BenchError(f"no messages were relayed with {connections} connections")
    if failed:
        raise BenchError(f"{failed} tunnel connections failed during the measurement")
    if any(report["received"] == 0 for report in reports):
        raise BenchError("a tunnel client received nothing")
    result = {
        "connections": opened,
        "tunnels": tunnels,
        "setup_seconds": round(setup_seconds, 1),
        "window": window,
        "in_flight": tunnels * 2 * window,
        "messages": messages,
        "messages_per_s": round(messages / measured.seconds),
        "relay_cpu_us_per_message": round(measured.relay_cpu / messages * 1e6, 2),
        "messages_per_relay_cpu_second": round(messages / measured.relay_cpu)
        if measured.relay_cpu
        else None,
        "rss_kib": measured.rss_kib,
        "rss_kib_per_connection": round((measured.rss_kib - base.rss_kib) / opened, 2),
        "wire_bytes_per_message": round(rx_bytes / messages, 1),
    }
    result.update(measured.as_dict())
    if latency:
        result["latency"] = percentiles(samples)
    return result


# ---- 9. controls: bandwidth limits, budgets, access lists, bans on -------------------------


def controls_settings(workdir: Path) -> dict:
    """Every control of the relay on, with limits so generous that none ever acts: what is
    measured is the cost of checking and counting. Tables of the relay's config; a new
    control adds its table (or its keys to "limits") here."""
    huge = 1 << 40  # bytes a second, or bytes: never reached in a bench run
    # Keys of no bench client (the clients' identities are fresh each run): the deny lists
    # are looked up on every request and never match.
    strangers = [b64url_encode(bytes(SigningKey.generate().verify_key)) for _ in range(2)]
    return {
        "access": {
            "ip_allow": ["127.0.0.0/8"],
            "ip_deny": ["198.51.100.0/24"],
            "listen_deny": strangers[:1],
            "connect_deny": strangers[1:],
        },
        "bans": {"enabled": True, "threshold": 1 << 20},
        "limits": {"max_memory": 64 << 30, "ipv6_prefix": 56},
        "bandwidth": {
            "connection_rate": huge,
            "key_rate": huge,
            "prefix_rate": huge,
            "total_rate": huge,
        },
        "budgets": {
            "key_daily": huge,
            "key_monthly": huge,
            "prefix_daily": huge,
            "prefix_monthly": huge,
            "total_monthly": huge,
            "action": "refuse",
            "state_file": str(workdir / "usage.json"),
            "save_interval": 5.0,
        },
    }


def controls(workdir: Path, sizes: Sizes) -> dict:
    """Test 2's headline load with every control off, then on (``controls_settings``),
    alternating ``controls_rounds`` times; the cheapest run of each is compared, since a
    shared machine only ever adds to a reading."""
    connections = sizes.small_headline
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for index in range(sizes.controls_rounds):
        for state in ("off", "on"):
            directory = workdir / f"controls-{state}-{index}"
            settings = controls_settings(directory) if state == "on" else None
            if settings:
                directory.mkdir(parents=True, exist_ok=True)
            result = small(
                directory, sizes, connections, latency=False, settings=settings, name="load"
            )
            runs[state].append(result)
    off = min(run["relay_cpu_us_per_message"] for run in runs["off"])
    on = min(run["relay_cpu_us_per_message"] for run in runs["on"])
    return {
        "connections": runs["off"][0]["connections"],
        "window": sizes.small_window,
        "rounds": sizes.controls_rounds,
        "settings": controls_settings(workdir / "controls-on-N"),
        "relay_cpu_us_per_message_off": off,
        "relay_cpu_us_per_message_on": on,
        "overhead": round(on / off - 1, 4),
        "runs": runs,
    }


# ---- floors --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Floors:
    """The floors, in CPU seconds: measured at the start and at the end of a run, and the
    cheaper reading of each is used, since a shared machine only ever adds to a floor."""

    aead_per_gib: float  # open + seal of the bulk test's messages, per GiB
    small_per_message: float  # open + seal of one small message's frame
    handshake: float  # the public-key operations of one relay handshake

    def cheapest(self, other: Floors) -> Floors:
        """Field by field, the lower of two readings."""
        return Floors(
            min(self.aead_per_gib, other.aead_per_gib),
            min(self.small_per_message, other.small_per_message),
            min(self.handshake, other.handshake),
        )


def measure_floors(sizes: Sizes, small_wire_bytes: float) -> Floors:
    """Time every floor once, in this process."""
    count = max(1, sizes.bulk_bytes // sizes.bulk_message)
    aead = floors.aead_floor(sizes.bulk_message, count) / (count * sizes.bulk_message / GIB)
    plain = max(1, round(small_wire_bytes) - 8 - floors.NONCE_LEN - floors.TAG_LEN)
    small = floors.aead_floor(plain, sizes.floor_small) / sizes.floor_small
    return Floors(aead, small, floors.handshake_floor(sizes.floor_handshakes))


def apply_floors(results: dict, floor: Floors) -> None:
    """Add each floor and each relay/floor ratio to the results it belongs to."""
    bulk = results.get("bulk")
    if bulk:
        bulk["floor_cpu_per_gib"] = round(floor.aead_per_gib, 3)
        bulk["ratio"] = round(bulk["relay_cpu_per_gib"] / floor.aead_per_gib, 2)
    handshakes = results.get("handshakes")
    if handshakes:
        handshakes["floor_cpu_us_per_handshake"] = round(floor.handshake * 1e6, 1)
        handshakes["floor_per_s"] = round(1 / floor.handshake)
        handshakes["ratio"] = round(
            handshakes["relay_cpu_us_per_handshake"] / (floor.handshake * 1e6), 2
        )
    small = results.get("small")
    if small:
        small["floor_cpu_us_per_message"] = round(floor.small_per_message * 1e6, 2)
    instances = results.get("instances")
    if instances:
        instances["floor_cpu_us_per_message"] = round(floor.small_per_message * 1e6, 2)


# ---- 3. handshakes -------------------------------------------------------------------------


def handshakes(workdir: Path, sizes: Sizes, *, profile: Path | None = None) -> dict:
    """Complete connections (version, handshake, listen) per second, sustained."""
    relay = BenchRelay(workdir / "handshakes", profile=profile)
    workers: list[Worker] = []
    try:
        _baseline(relay)
        target = _target(relay)
        for index in range(sizes.workers):
            worker = Worker(
                f"handshake client {index}", handshake_worker, target, sizes.handshake_concurrency
            )
            workers.append(worker)
        for worker in workers:
            worker.expect("ready", 60)
        time.sleep(sizes.warmup)
        meter = Meter(relay, workers)
        meter.start()
        time.sleep(sizes.handshake_seconds)
        window = meter.stop()
    except BaseException:
        _abandon(relay, workers, [])
        raise
    reports = _finish(relay, workers)
    completed, _, failed = window.counts
    if completed == 0:
        raise BenchError("no handshakes completed")
    per_handshake = window.relay_cpu / completed
    result = {
        "concurrency": sizes.handshake_concurrency * sizes.workers,
        "completed": completed,
        "failed": failed,
        "last_failure": next((r["last_failure"] for r in reports if r and r["failed"]), ""),
        "per_s": round(completed / window.seconds),
        "relay_cpu_us_per_handshake": round(per_handshake * 1e6, 1),
        "per_relay_cpu_second": round(completed / window.relay_cpu) if window.relay_cpu else None,
    }
    result.update(window.as_dict())
    return result


# ---- 4. idle scale -------------------------------------------------------------------------


def idle(workdir: Path, sizes: Sizes) -> dict:
    """Hold many listen connections with keepalives flowing; RSS per connection and probes."""
    relay = BenchRelay(workdir / "idle")
    workers: list[Worker] = []
    try:
        base = _baseline(relay)
        target = _target(relay)
        started = time.monotonic()
        for index, count in enumerate(_split(sizes.idle_connections, sizes.idle_workers)):
            workers.append(Worker(f"idle client {index}", idle_worker, target, count))
        for worker in workers:
            worker.expect("ready", 600)
        setup_seconds = time.monotonic() - started
        meter = Meter(relay, workers)
        meter.start()
        until = time.monotonic() + sizes.idle_seconds
        round_trips: list[float] = []
        probe_handshakes: list[float] = []
        probe_failures = []
        while True:
            result = probe(relay.ticket_address, relay.public_key, 10.0)
            if result.code == HEALTHY:
                round_trips.append(result.round_trip_seconds)  # type: ignore[arg-type]
                probe_handshakes.append(result.handshake_seconds)  # type: ignore[arg-type]
            else:
                probe_failures.append(result.message)
            if time.monotonic() >= until:
                break
            time.sleep(min(0.2, max(0.0, until - time.monotonic())))
        window = meter.stop()
        # STATUS= comes every 2 s; wait for one that shows every connection listening.
        listening = relay.wait_status("listening", sizes.idle_connections, 5)
    except BaseException:
        _abandon(relay, workers, [])
        raise
    reports = _finish(relay, workers)
    lost = sum(report["lost"] for report in reports)
    open_at_end = sum(report["open"] for report in reports)
    summary = {
        "connections": sizes.idle_connections,
        "setup_seconds": round(setup_seconds, 1),
        "hold_seconds": round(window.seconds, 1),
        "relay_listening": listening,
        "open_at_end": open_at_end,
        "lost": lost,
        "received_keepalives": sum(report["received_keepalives"] for report in reports),
        "sent_keepalives": sum(report["keepalives_sent"] for report in reports),
        "rss_kib_base": base.rss_kib,
        "rss_kib": window.rss_kib,
        "rss_kib_per_connection": round(
            (window.rss_kib - base.rss_kib) / sizes.idle_connections, 2
        ),
        "probe_round_trip": percentiles(round_trips),
        "probe_handshake": percentiles(probe_handshakes),
        "probe_failures": len(probe_failures),
    }
    summary.update(window.as_dict())
    return summary


# ---- 10. scale: many idle nodes -------------------------------------------------------------


def scale_sources(count: int) -> tuple[str, ...]:
    """``count`` loopback source addresses: 127.0.1.1, 127.0.1.2, ... (all of 127/8 is local)."""
    return tuple(f"127.0.{1 + index // 254}.{1 + index % 254}" for index in range(count))


def _open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# A client process holds at most this many connections (each is one of its descriptors).
SCALE_PER_WORKER = 15_000
# Descriptors a relay needs besides its connections (listening and metrics sockets, logs,
# lingering closes, the probe's connections).
SCALE_SPARE_DESCRIPTORS = 1_500


def _closed_by_reason(metrics_port: int) -> dict[str, int]:
    """``connections_closed_total`` of the /metrics on 127.0.0.1:``metrics_port``, by reason."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as page:
        text = page.read().decode()
    found = {}
    for line in text.splitlines():
        match = re.match(r'\w+_connections_closed_total\{.*reason="([^"]+)".*\} (\S+)', line)
        if match and float(match.group(2)):
            found[match.group(1)] = int(float(match.group(2)))
    return found


def _hourly_share(
    shares: list[float], relay_cpu: float, hold: float, rekeys: int, connections: int
) -> float | None:
    """The relay CPU share with the original's one rekey an hour per connection: the
    keepalives-only share (the quietest stretch) plus ``connections`` / 3600 rekeys a
    second at the cost the hold's rekeys showed."""
    if not shares or not rekeys or hold <= 0:
        return None
    quiet = min(shares)
    per_rekey = max(0.0, relay_cpu - quiet * hold) / rekeys
    return round(quiet + connections / 3600 * per_rekey, 3)


def scale_plan(connections: int, fd_limit: int) -> tuple[int, list[int]]:
    """(instances, connections per instance) for ``connections`` under a per-process
    descriptor limit: one instance when it fits, else the fewest that do."""
    per_instance = max(1, fd_limit - SCALE_SPARE_DESCRIPTORS)
    count = max(1, -(-connections // per_instance))
    return count, _split(connections, count)


def scale(workdir: Path, sizes: Sizes, fd_limit: int) -> dict:
    """Hold ``scale_connections`` listen connections (the original's keepalive rule, a
    shortened rekey interval), probing throughout: RSS and CPU per idle node, probe round
    trips, losses, and the time to set up and to tear down.

    One relay holds them all when the descriptor limit allows; under a lower limit (a
    process here may not raise it) they are spread over the fewest instances that fit, and
    the results say so (``instances``, ``limited_by``).
    """
    count = sizes.scale_connections
    instances, shares = scale_plan(count, fd_limit)
    sources = scale_sources(sizes.scale_sources)
    relays: list[BenchRelay] = []
    metrics_ports: list[int] = []
    groups: list[list[Worker]] = []
    try:
        for index, share in enumerate(shares):
            metrics_ports.append(free_port())
            settings = {
                "limits": {"max_connections": share + 1000},
                "timeouts": {"rekey_interval": sizes.scale_rekey_interval},
                # Its close reasons are read from /metrics at the end of the hold.
                "metrics": {"enabled": True, "listen": f"127.0.0.1:{metrics_ports[-1]}"},
            }
            relays.append(BenchRelay(workdir / f"scale-{index}", settings=settings))
        bases = [_baseline(relay) for relay in relays]
        base_descriptors = [_open_descriptors(relay.pid) for relay in relays]
        started = time.monotonic()
        processes = max(sizes.scale_workers, -(-count // SCALE_PER_WORKER))
        per_relay = _split(max(processes, instances), instances)
        serial = 0
        for relay, share, parts in zip(relays, shares, per_relay, strict=True):
            group = []
            for part in _split(share, parts):
                # Each client process its own share of the source addresses.
                mine = sources[serial % len(sources) :: processes] or sources
                group.append(
                    Worker(f"scale client {serial}", idle_worker, _target(relay), part, mine)
                )
                serial += 1
            groups.append(group)
        everyone = [worker for group in groups for worker in group]
        for worker in everyone:
            worker.expect("ready", max(600, count / 50))
        setup_seconds = time.monotonic() - started
        setup_usage = [relay.usage() for relay in relays]
        meters = [Meter(relay, group) for relay, group in zip(relays, groups, strict=True)]
        for meter in meters:
            meter.start()
        until = time.monotonic() + sizes.scale_seconds
        round_trips: list[float] = []
        probe_failures: list[str] = []
        # All relays' CPU in buckets of a thirtieth of the hold: the rekeys come in a burst.
        bucket = max(1.0, sizes.scale_seconds / 30)
        samples = [(time.monotonic(), sum(relay.usage().cpu for relay in relays))]
        turn = 0
        while True:
            relay = relays[turn % instances]
            turn += 1
            result = probe(relay.ticket_address, relay.public_key, 10.0)
            if result.code == HEALTHY:
                round_trips.append(result.round_trip_seconds)  # type: ignore[arg-type]
            else:
                probe_failures.append(result.message)
            now = time.monotonic()
            if now - samples[-1][0] >= bucket:
                samples.append((now, sum(relay.usage().cpu for relay in relays)))
            if now >= until:
                break
            time.sleep(min(sizes.scale_probe_interval, max(0.0, until - now)))
        windows = [meter.stop() for meter in meters]
        samples.append((time.monotonic(), sum(relay.usage().cpu for relay in relays)))
        listening = [
            relay.wait_status("listening", share, 5)
            for relay, share in zip(relays, shares, strict=True)
        ]
        closed: dict[str, int] = {}
        for port in metrics_ports:
            for reason, value in _closed_by_reason(port).items():
                closed[reason] = closed.get(reason, 0) + value
        # Tear down: every client closes its connections; the relays are done when their
        # descriptors are back to what they had before the load.
        stopped = time.monotonic()
        for worker in everyone:
            worker.tell("stop")
        reports = [worker.expect("stopped", 600) for worker in everyone]
        deadline = time.monotonic() + 600
        for relay, before in zip(relays, base_descriptors, strict=True):
            while _open_descriptors(relay.pid) > before:
                if time.monotonic() > deadline:
                    raise BenchError("a relay still held connections 600 s after the clients left")
                time.sleep(0.05)
        teardown_seconds = time.monotonic() - stopped
        ends = [relay.usage() for relay in relays]
    except BaseException:
        for index, relay in enumerate(relays):
            _abandon(relay, groups[index] if index < len(groups) else [], [])
        raise
    for worker in everyone:
        worker.kill()
    for relay in relays:
        relay.stop()
        problems = relay.problems()
        if problems:
            raise BenchError(f"the relay logged errors: {problems[0]}")
    shares_of_core = [
        (later - earlier) / (t1 - t0)
        for (t0, earlier), (t1, later) in zip(samples, samples[1:], strict=False)
        if t1 > t0
    ]
    hold = max(window.seconds for window in windows)
    relay_cpu = sum(window.relay_cpu for window in windows)
    rss_kib = sum(window.rss_kib for window in windows)
    rss_base = sum(base.rss_kib for base in bases)
    rekeyed = sum(report["rekeyed_connections"] for report in reports)
    per_instance = [
        {
            "connections": share,
            "relay_listening": listening[index],
            "rss_kib": windows[index].rss_kib,
            "rss_kib_per_connection": round(
                (windows[index].rss_kib - bases[index].rss_kib) / share, 2
            ),
            "relay_cpu_share": round(windows[index].relay_cpu / windows[index].seconds, 3),
        }
        for index, share in enumerate(shares)
    ]
    return {
        "connections": count,
        "instances": instances,
        # Why more than one instance: the descriptor limit a process here may not raise.
        "limited_by": "" if instances == 1 else f"RLIMIT_NOFILE hard limit {fd_limit}",
        "per_instance": per_instance,
        "source_addresses": len(sources),
        "client_processes": len(everyone),
        "rekey_interval": sizes.scale_rekey_interval,
        # Whether every connection's rekey fell due inside the hold: the set-up (from the
        # first connection to the start of the hold) took less than the earliest a rekey
        # comes, and the interval is no longer than the hold.
        "rekeys_due_in_hold": (
            setup_seconds <= (1 - TIMER_SPREAD) * sizes.scale_rekey_interval
            and sizes.scale_rekey_interval <= hold
        ),
        "setup_seconds": round(setup_seconds, 1),
        "setup_relay_cpu_seconds": round(
            sum(used.cpu - base.cpu for used, base in zip(setup_usage, bases, strict=True)), 1
        ),
        "hold_seconds": round(hold, 1),
        "teardown_seconds": round(teardown_seconds, 1),
        "teardown_relay_cpu_seconds": round(sum(end.cpu for end in ends) - samples[-1][1], 1),
        "relay_listening": sum(value or 0 for value in listening),
        "open_at_end": sum(report["open"] for report in reports),
        # Connections that ended during the hold (each client counts the ones it saw end).
        "lost": sum(report["lost"] for report in reports),
        "last_failure": next((r["last_failure"] for r in reports if r["last_failure"]), ""),
        # Set-ups that failed and were tried again (a handshake timed out on a busy machine).
        "setup_failures": sum(report["setup_failures"] for report in reports),
        # What the relays closed, by reason, set-up to the end of the hold (the probes'
        # own connections among them).
        "closed_by_relay": closed,
        "rekeys": sum(report["rekeys"] for report in reports),
        "rekeyed_connections": rekeyed,
        "every_connection_rekeyed": rekeyed == count,
        "received_keepalives": sum(report["received_keepalives"] for report in reports),
        "sent_keepalives": sum(report["keepalives_sent"] for report in reports),
        "rss_kib_base": rss_base,
        "rss_kib": rss_kib,
        "rss_kib_per_connection": round((rss_kib - rss_base) / count, 2),
        # All instances together: the share of one core the relays used over the hold.
        "relay_cpu_seconds": round(relay_cpu, 3),
        # In 10 ms ticks (the total above is exact): how much of it the kernel's.
        "relay_user_seconds": round(sum(window.relay_user for window in windows), 2),
        "relay_system_seconds": round(sum(window.relay_system for window in windows), 2),
        "relay_cpu_share": round(relay_cpu / hold, 3),
        "relay_cpu_share_max_bucket": round(max(shares_of_core), 3) if shares_of_core else None,
        # The hold's rekeys come at 3600 / rekey_interval times the original's rate. The
        # quietest stretch is keepalives alone; what the hold used beyond it, per rekey, is
        # an estimate of a rekey's cost; with it, the share at the original's hourly rekey.
        "relay_cpu_share_at_hourly_rekeys": _hourly_share(
            shares_of_core, relay_cpu, hold, sum(report["rekeys"] for report in reports), count
        ),
        "relay_cpu_share_min_bucket": round(min(shares_of_core), 3) if shares_of_core else None,
        "bucket_seconds": round(bucket, 1),
        "client_cpu_seconds": round(sum(window.client_cpu for window in windows), 3),
        "steal_share": round(max(window.steal_share for window in windows), 3),
        "probe_round_trip": percentiles(round_trips),
        "probe_failures": len(probe_failures),
        "probe_last_failure": probe_failures[-1] if probe_failures else "",
    }


# ---- 5. latency (idle) ---------------------------------------------------------------------


def latency(workdir: Path, sizes: Sizes) -> dict:
    """Round trip of a 100-byte message through a tunnel, and directly (the floor)."""
    a, b, sockets = floors.direct_pair()
    try:
        floors.round_trips(a, b, sizes.latency_message, 20)  # warm up
        direct = floors.round_trips(a, b, sizes.latency_message, sizes.latency_samples)
    finally:
        for sock in sockets:
            sock.close()
    relay = BenchRelay(workdir / "latency")
    clients: list[RelayClient] = []
    try:
        _baseline(relay)
        a, b, clients = floors.relay_pair(relay.address, relay.public_key)
        floors.round_trips(a, b, sizes.latency_message, 20)
        through = floors.round_trips(a, b, sizes.latency_message, sizes.latency_samples)
    except BaseException:
        _abandon(relay, [], clients)
        raise
    for client in clients:
        client.close()
    _finish(relay, [])
    relay_stats, direct_stats = percentiles(through), percentiles(direct)
    return {
        "message_bytes": sizes.latency_message,
        "relay": relay_stats,
        "direct": direct_stats,
        "added_p50_us": round(relay_stats["p50_us"] - direct_stats["p50_us"], 1),
        "added_p99_us": round(relay_stats["p99_us"] - direct_stats["p99_us"], 1),
    }


# ---- 7. wire overhead ----------------------------------------------------------------------


def wire(sizes: Sizes) -> dict:
    """Bytes on the wire per 64-byte message: ours and the original's padding rule."""
    result = floors.wire_overhead(sizes.small_message, sizes.wire_samples)
    return {key: round(value, 1) for key, value in result.items()}


# ---- 8. instances: one relay per core ------------------------------------------------------


def instances(workdir: Path, sizes: Sizes, count: int) -> dict:
    """Test 2's headline load (window ``small_window``) spread over ``count`` relays.

    The same tunnels and the same client processes as with one relay, each relay getting
    its share of both (with 2 relays and 2 client processes: one process per relay). Every
    relay's CPU is read at the window's edges; the figures are per instance and in total.
    """
    tunnels = max(1, sizes.small_headline // 2)
    window = sizes.small_window
    relays: list[BenchRelay] = []
    groups: list[list[Worker]] = []
    try:
        for index in range(count):
            relays.append(BenchRelay(workdir / f"instances-{count}-{index}"))
        for relay in relays:
            _baseline(relay)
        shares = _split(tunnels, count)
        processes = _split(max(sizes.workers, count), count)
        for index, (relay, share) in enumerate(zip(relays, shares, strict=True)):
            target = _target(relay)
            groups.append(
                [
                    Worker(
                        f"tunnel client {index}.{part}",
                        tunnel_worker,
                        target,
                        tunnels_here,
                        window,
                        sizes.small_message,
                        PAYLOAD_SEED,
                    )
                    for part, tunnels_here in enumerate(_split(share, processes[index]))
                ]
            )
        everyone = [worker for group in groups for worker in group]
        opened = sum(worker.expect("ready", 600)["connections"] for worker in everyone)
        for worker in everyone:
            worker.tell("go")
        time.sleep(sizes.warmup)
        meters = [Meter(relay, group) for relay, group in zip(relays, groups, strict=True)]
        for meter in meters:
            meter.start()
        time.sleep(sizes.small_seconds)
        measured = [meter.stop() for meter in meters]
    except BaseException:
        for relay, group in zip(relays, groups + [[]] * (len(relays) - len(groups)), strict=True):
            _abandon(relay, group, [])
        raise
    for relay, group in zip(relays, groups, strict=True):
        _finish(relay, group)
    per_instance = []
    for index, window_of in enumerate(measured):
        messages, _bytes, failed = window_of.counts
        if messages == 0:
            raise BenchError(f"instance {index} of {count} relayed no messages")
        if failed:
            raise BenchError(f"{failed} tunnel connections failed on instance {index}")
        per_instance.append(
            {
                "tunnels": shares[index],
                "messages": messages,
                "messages_per_s": round(messages / window_of.seconds),
                "relay_cpu_us_per_message": round(window_of.relay_cpu / messages * 1e6, 2),
                "messages_per_relay_cpu_second": round(messages / window_of.relay_cpu)
                if window_of.relay_cpu
                else None,
                **window_of.as_dict(),
            }
        )
    messages = sum(each["messages"] for each in per_instance)
    seconds = max(window_of.seconds for window_of in measured)
    relay_cpu = sum(window_of.relay_cpu for window_of in measured)
    return {
        "instances": count,
        "connections": opened,
        "tunnels": tunnels,
        "window": window,
        "messages": messages,
        "messages_per_s": round(messages / seconds),
        "relay_cpu_us_per_message": round(relay_cpu / messages * 1e6, 2),
        "relay_cpu_share": round(relay_cpu / seconds, 3),
        "client_cpu_seconds": round(sum(w.client_cpu for w in measured), 3),
        "seconds": round(seconds, 3),
        "per_instance": per_instance,
    }
