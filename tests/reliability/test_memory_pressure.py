"""Memory pressure survived with the shipped settings: a live relay in a memory control
group of 80 MiB (one this test makes: cgroup v1's memory hierarchy or v2), 64 tunnels from
64 loopback sources whose acceptors never read but keep the relay's keepalive rule.

With the default ``max_memory = "auto"`` the relay takes 80 % of the group's limit as its
ceiling (its start line says so), lives, and a newcomer's tunnel carries again within a
bounded time: the acceptors that took nothing for a keepalive timeout are closed as
``stalled`` and their memory given back. With ``max_memory = 0`` the same load gets the
relay killed by the kernel (the proof that the load is the one that kills).

Needs root and a writable memory hierarchy; skipped otherwise. Figures:
tests/reliability/memory-pressure-results.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from offset_appliance.client import ClientError, RelayClient

from .relaylib import METRICS, closed, scrape, wait_metrics

MiB = 1 << 20
LIMIT = 80 * MiB
TUNNELS = 64
KEEPALIVE = 12.0  # the relay's [timeouts] keepalive here, to keep the test short
BLOB = b"\xa5" * 60_000
RESULTS = Path(__file__).with_name("memory-pressure-results.json")
# A liveness bound, not a speed figure: the stalled acceptors' keepalive timeout, the
# samples and trims after it, and the newcomer's own set-up.
SERVED_AGAIN_WITHIN = KEEPALIVE + 30.0


def _memory_hierarchy() -> tuple[Path, str] | None:
    """Where a memory group can be made here, and its limit file's name."""
    v1 = Path("/sys/fs/cgroup/memory")
    if (v1 / "memory.limit_in_bytes").exists():
        return v1, "memory.limit_in_bytes"
    v2 = Path("/sys/fs/cgroup")
    try:
        if "memory" in (v2 / "cgroup.subtree_control").read_text().split():
            return v2, "memory.max"
    except OSError:
        pass
    return None


@contextlib.contextmanager
def memory_group(limit: int) -> Iterator[Path]:
    """A memory control group of ``limit`` bytes (no swap), removed at the end."""
    found = _memory_hierarchy()
    if os.geteuid() != 0 or found is None:
        pytest.skip("needs root and a memory control group hierarchy")
    base, limit_file = found
    group = base / f"offset-relay-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        group.mkdir()
        (group / limit_file).write_text(str(limit))
        for swap in ("memory.memsw.limit_in_bytes", "memory.swap.max"):
            if (group / swap).exists():
                (group / swap).write_text(str(limit) if "memsw" in swap else "0")
    except OSError as exc:
        pytest.skip(f"cannot make a memory control group: {exc}")
    try:
        yield group
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            try:
                group.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def client_from(relay, ip: str, identity: SigningKey | None = None, **kwargs) -> RelayClient:
    sock = socket.create_connection(relay.address, timeout=10, source_address=(ip, 0))
    client = RelayClient(
        sock,
        identity or SigningKey.generate(),
        expected_key=relay.public_key,
        keepalive=KEEPALIVE,
        **kwargs,
    )
    client._handshake(time.monotonic() + 10)
    return client


class Attack:
    """Tunnels whose acceptors never read: their connectors send until the relay stops
    reading them; the acceptors speak every few seconds (the keepalive rule) and the
    listeners keep theirs."""

    def __init__(self, relay) -> None:
        self.relay = relay
        self.listeners: list[RelayClient] = []
        self.acceptors: list[RelayClient] = []
        self.connectors: list[RelayClient] = []
        self.threads: list[threading.Thread] = []
        self.stop = threading.Event()
        self.refused = 0  # tunnels the relay refused to open

    def open(self, count: int) -> None:
        identities = [SigningKey.generate() for _ in range(count)]
        for n, identity in enumerate(identities):
            listener = client_from(self.relay, f"127.0.9.{n + 1}", identity)
            listener.listen()
            self.listeners.append(listener)
        wait_metrics(self.relay, lambda v: v["offset_relay_listeners"] == count, 20, "listening")
        for n, (identity, listener) in enumerate(zip(identities, self.listeners, strict=True)):
            ip = f"127.0.9.{n + 1}"
            try:
                connector = client_from(self.relay, ip)
                connector.connect(listener.public_key)
                assert listener.next_incoming() == connector.public_key
                sock = socket.create_connection(
                    self.relay.address, timeout=10, source_address=(ip, 0)
                )
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                acceptor = RelayClient(
                    sock, identity, expected_key=self.relay.public_key, keepalive=KEEPALIVE
                )
                acceptor._handshake(time.monotonic() + 10)
            except (ClientError, OSError):
                self.refused += 1  # over the ceiling already: the rest are refused
                continue
            acceptor.accept(connector.public_key)
            self.connectors.append(connector)
            self.acceptors.append(acceptor)
            thread = threading.Thread(target=self._feed, args=(connector,), daemon=True)
            thread.start()
            self.threads.append(thread)
        keeper = threading.Thread(target=self._keep_alive, daemon=True)
        keeper.start()
        self.threads.append(keeper)

    def _feed(self, connector: RelayClient) -> None:
        connector.sock.settimeout(None)
        wire = connector.wire
        while not self.stop.is_set():
            wire.send_message(BLOB, time.monotonic())
            try:
                connector.sock.sendall(b"".join(wire.data_to_send()))
            except OSError:
                return

    def _keep_alive(self) -> None:
        while not self.stop.wait(KEEPALIVE / 4):
            for acceptor in self.acceptors:
                with contextlib.suppress(ClientError, OSError):
                    acceptor.send(b"still here")  # read by its connector's kernel only
            for listener in self.listeners:
                with contextlib.suppress(ClientError, OSError):
                    listener.receive(timeout=0.01)  # runs its timers: keepalives

    def open_count(self) -> int:
        """Attack connections the relay still holds open (listeners are never closed)."""
        return len(self.listeners) + sum(
            not _closed_by_peer(c) for c in self.acceptors + self.connectors
        )

    def close(self) -> None:
        self.stop.set()
        for client in self.listeners + self.acceptors + self.connectors:
            with contextlib.suppress(OSError):
                client.sock.shutdown(socket.SHUT_RDWR)
            client.close()
        for thread in self.threads:
            thread.join(10)


def _closed_by_peer(client: RelayClient) -> bool:
    """Whether the relay closed this connection (an EOF or reset is waiting), unread data
    aside."""
    sock = client.sock
    try:
        sock.setblocking(False)
        while True:
            data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(10)


def newcomer_carries(relay) -> bool:
    """A new tunnel from a source of its own: set up, and data carried both ways."""
    identity = SigningKey.generate()
    clients: list[RelayClient] = []
    try:
        listener = client_from(relay, "127.0.10.1", identity)
        clients.append(listener)
        listener.listen()
        connector = client_from(relay, "127.0.10.2")
        clients.append(connector)
        connector.connect(listener.public_key)
        if listener.next_incoming(timeout=5) != connector.public_key:
            return False
        acceptor = client_from(relay, "127.0.10.1", identity)
        clients.append(acceptor)
        acceptor.accept(connector.public_key)
        connector.send(b"ping")
        acceptor.send(b"pong")
        return acceptor.receive(timeout=5) == b"ping" and connector.receive(timeout=5) == b"pong"
    except (ClientError, OSError):
        return False
    finally:
        for client in clients:
            client.close()


def record(key: str, figures: dict) -> None:
    try:
        results = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        results = {}
    results[key] = figures
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def peak_rss(relay) -> int:
    """The relay's largest resident size so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{relay.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def ceiling_line(relay) -> str:
    """The start line that says the memory ceiling (it follows the listening lines)."""
    deadline = time.monotonic() + 10
    while True:
        for line in relay.lines:
            if "memory ceiling" in line:
                return line
        assert time.monotonic() < deadline, relay.log_text()
        time.sleep(0.05)


def in_group(group: Path) -> tuple[str, ...]:
    return ("sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group / "cgroup.procs"))


def test_with_the_default_ceiling_the_relay_lives_and_newcomers_are_served_again(
    relay_factory,
):
    with memory_group(LIMIT) as group:
        relay = relay_factory(
            METRICS + f"[timeouts]\nkeepalive = {KEEPALIVE}\n", prefix=in_group(group)
        )
        started = [ceiling_line(relay)]
        assert (
            started and "memory ceiling 64.0 MiB of resident memory (auto: 80 % of " in (started[0])
        ), relay.log_text()
        assert "80.0 MiB, the memory" in started[0]
        attack = Attack(relay)
        try:
            began = time.monotonic()
            attack.open(TUNNELS)
            deadline = began + 60
            while not any("is over max_memory" in line for line in relay.lines):
                assert relay.proc.poll() is None, relay.log_text()[-3000:]
                assert time.monotonic() < deadline, "the ceiling was never reached"
                time.sleep(0.1)
            tripped = time.monotonic()
            seen_rss = relay.rss_kib() * 1024
            # Refused while over it; served again once the stalled acceptors are gone.
            served_after = None
            while served_after is None:
                assert relay.proc.poll() is None, relay.log_text()[-3000:]
                if newcomer_carries(relay):
                    served_after = time.monotonic() - tripped
                else:
                    assert time.monotonic() - tripped < SERVED_AGAIN_WITHIN, relay.log_text()[
                        -3000:
                    ]
                    time.sleep(0.5)
            values = scrape(relay)
            still_open = attack.open_count()
            peak = peak_rss(relay)
        finally:
            attack.close()
        assert relay.proc.poll() is None  # never killed
        # How the memory came back is a figure: receivers that took nothing for a keepalive
        # timeout closed as stalled (tests/unit/test_memory_ceiling.py proves the rule), or
        # what malloc_trim gave back before any was due.
        stalled = closed(values, "stalled")
        assert values['offset_relay_connections_refused_total{limit="memory"}'] >= 1
        record(
            "default_ceiling",
            {
                "group_limit_mib": LIMIT / MiB,
                "ceiling_mib": 64.0,
                "tunnels_tried": TUNNELS,
                "tunnels_refused_at_set_up": attack.refused,
                "keepalive_s": KEEPALIVE,
                "ceiling_reached_after_attack_began_s": round(tripped - began, 1),
                "rss_when_the_ceiling_was_seen_mib": round(seen_rss / MiB, 1),
                "peak_rss_mib": round(peak / MiB, 1),
                "newcomer_served_after_s": round(served_after, 1),
                "closed_stalled": stalled,
                "attack_connections_still_open": still_open,
                "attack_connections": len(attack.listeners) + 2 * len(attack.acceptors),
            },
        )


def test_without_a_ceiling_the_same_load_gets_the_relay_killed(relay_factory):
    with memory_group(LIMIT) as group:
        relay = relay_factory(
            METRICS + f"[limits]\nmax_memory = 0\n[timeouts]\nkeepalive = {KEEPALIVE}\n",
            prefix=in_group(group),
        )
        assert "memory ceiling off" in ceiling_line(relay)
        attack = Attack(relay)
        try:
            with contextlib.suppress(ClientError, OSError):
                attack.open(TUNNELS)  # the relay may die before all are open
            deadline = time.monotonic() + 60
            while relay.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            attack.close()
        assert relay.proc.returncode == -signal.SIGKILL, relay.log_text()[-2000:]
        record("no_ceiling", {"group_limit_mib": LIMIT / MiB, "exit": relay.proc.returncode})
