"""Network faults between the peers and a booted bookworm host running the package.

1. A lossy, slow link: every frame between the controller and the relay's host, both ways,
   is delayed by 100 ms plus or minus 20 ms, 1 % are lost and 10 % overtake the ones before
   them (netem's ``delay 100ms 20ms loss 1% reorder 10%``). The kernel the tests run on may
   lack ``sch_netem``, so the link is made in user space (impair.py): the host's link leaves
   the rig's bridge and an AF_PACKET forwarder joins the two. Through it, 100 tunnels stream
   checksummed messages both ways and 20 idle listeners keep the original node's keepalive
   rule for ``OFFSET_NETEM_SECONDS`` (default 60; set up first, then the link turns lossy
   and slow under them). Proven: every message arrives once, in
   order, intact and in its own tunnel; nobody closes anything (no peer sees a close, the
   relay's journal and /metrics count none, no keepalive timeout in particular); and the
   forwarder did lose, delay and reorder frames of both directions.
2. Peers that vanish without a FIN: a second node host (a network namespace on the bridge,
   198.18.N.200) holds an idle listener, a connector whose connect stays pending (its
   listener, on the controller, never accepts) and one end of a tunnel in the middle of a
   bulk transfer both ways with a peer on the controller. Its link is cut, then its process
   killed, so no FIN or reset reaches the relay. Proven, with the relay's keepalive timeout
   shortened to KEEPALIVE seconds: the relay closes each of the three for keepalive_timeout
   within the timeout (plus a margin) of the cut, and the tunnel's other end for
   tunnel_peer_closed, which its peer sees as a plain close after every message in order;
   the listener of the pending connect hears nothing (the original has no message for it)
   and stays, while the half-tunnel outlives its connecting side until its lifetime ends, as
   in the original (docs/protocol.md 6.2); the vanished listener's key may listen again.

Figures: tests/deploy/netem-results.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from offset_appliance.files import b64url_encode
from offset_appliance.wire.messages import (
    Accept,
    Connect,
    IncomingConnection,
    Listen,
    encode_init_connection,
)
from tests.helpers import scrape_url

from .restart_load import KEEPALIVE, MESSAGE_SIZE, Load, percentiles
from .rig import NET_PREFIX, Host, Rig, run
from .test_restart import (
    DROP_INS,
    install_relay,
    journal_cursor,
    relay_key,
    wait_active,
    wait_for,
)

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
PORT = 4567
METRICS_PORT = 9477
RESULTS = ROOT / "tests" / "deploy" / "netem-results.json"
TUNNELS = 100
IDLE = 20
NETEM_SECONDS = float(os.environ.get("OFFSET_NETEM_SECONDS", "60"))
NETEM = {"delay": 0.1, "jitter": 0.02, "loss": 0.01, "reorder": 0.1}
# The relay's keepalive timeout while peers vanish (the original's is 32 s), and the slack
# allowed past a deadline: the relay's timers run on a one-second tick at best.
KEEPALIVE_SHORT = 8.0
HALF_TUNNEL = 32.0  # timeouts.half_tunnel, left at the original's
MARGIN = 3.0
NODE_ADDRESS_INDEX = 200  # a node host's address in the rig's subnet, which no host takes


@pytest.fixture(scope="module")
def rig(make_rig: Callable[..., Rig], deb_package: Path) -> Rig:
    return make_rig(1, name="faults", repo_debs=[deb_package])


@pytest.fixture(scope="module")
def host(rig: Rig) -> Host:
    host = rig.hosts[0]
    # 100 tunnels are 300 connections from one address; every close is logged (debug) and
    # counted (/metrics, on the rig's network).
    install_relay(
        host,
        "50-test-faults.toml",
        'log_level = "debug"\n\n[limits]\nmax_connections_per_ip = 2048\n\n'
        f'[metrics]\nenabled = true\nlisten = "{host.address}:{METRICS_PORT}"\n',
    )
    wait_for("the metrics endpoint", lambda: _reachable(host), 30)
    return host


def subnet(rig: Rig) -> int:
    """The N of the rig's 198.18.N.0/24 (its bridge is orN-br, host i's link orN-hi)."""
    return int(rig.gateway.split(".")[2])


def _reachable(host: Host) -> bool:
    try:
        metrics(host)
    except OSError:
        return False
    return True


def metrics(host: Host) -> dict[str, float]:
    """The relay's /metrics samples, by name with labels."""
    return scrape_url(f"http://{host.address}:{METRICS_PORT}/metrics")


def closes(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """connections_closed_total by reason, counted between two scrapes, zeros left out."""
    prefix = "offset_relay_connections_closed_total"
    return {
        name.split('"')[1]: after[name] - before.get(name, 0.0)
        for name in after
        if name.startswith(prefix) and after[name] != before.get(name, 0.0)
    }


def journal_closes(host: Host, cursor: str) -> list[tuple[float, str]]:
    """The relay's close lines since ``cursor``: (wall-clock time, the line)."""
    out = host.ssh(
        f"journalctl -u offset-relay -o json --output-fields=MESSAGE --no-pager --cursor '{cursor}'"
    ).stdout
    found = []
    for line in out.splitlines():
        entry = json.loads(line)
        message = entry.get("MESSAGE")
        if isinstance(message, str) and ": close, key " in message:
            found.append((int(entry["__REALTIME_TIMESTAMP"]) / 1e6, message))
    return found


def key_prefix(identity: SigningKey) -> str:
    """How the relay's log names a key."""
    return b64url_encode(bytes(identity.verify_key))[:8]


def save_results(key: str, figures: dict[str, Any]) -> None:
    results: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        results = json.loads(RESULTS.read_text())
    results[key] = figures
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


# ---- 1. a lossy, slow link ---------------------------------------------------------------


@dataclass
class ImpairedLink:
    """The forwarder's counts of each direction's frames, once it has stopped."""

    stats: dict[str, dict[str, int]]


def _gso_max_segs(netns: str | None, link: str) -> str:
    argv = ["ip", "-d", "-j", *(["-n", netns] if netns else []), "link", "show", link]
    return str(json.loads(run(argv).stdout)[0]["gso_max_segs"])


@contextlib.contextmanager
def impaired_link(rig: Rig, host: Host, workdir: Path) -> Iterator[ImpairedLink]:
    """The host's link taken off the bridge and joined to it again through impair.py."""
    n = subnet(rig)
    bridge, host_link = f"or{n}-br", f"or{n}-h1"
    near, far = f"or{n}-nm0", f"or{n}-nm1"
    stats_file = workdir / "impair.json"
    # Frames larger than the MTU cannot be forwarded: the senders segment every one.
    saved = {
        (host.netns, "host0"): _gso_max_segs(host.netns, "host0"),
        (None, bridge): _gso_max_segs(None, bridge),
    }
    link = ImpairedLink({})
    forwarder: subprocess.Popen[bytes] | None = None
    try:
        rig.adopt(links=[near])
        run(["ip", "link", "add", near, "type", "veth", "peer", "name", far])
        run(["ip", "link", "set", far, "master", bridge, "up"])
        run(["ip", "link", "set", near, "up"])
        for (netns, name), _ in saved.items():
            run(["ip", *(["-n", netns] if netns else []), "link", "set", name, "gso_max_segs", "1"])
        run(["ip", "link", "set", host_link, "nomaster"])
        argv = [sys.executable, "-m", "tests.deploy.impair", host_link, near]
        argv += [f"--{name}={value}" for name, value in NETEM.items()]
        with open(workdir / "impair.log", "wb") as log:
            forwarder = subprocess.Popen(
                [*argv, f"--stats={stats_file}"],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(
            "the forwarder",
            lambda: stats_file.with_suffix(".ready").exists() or forwarder.poll() is not None,
            10,
        )
        assert forwarder.poll() is None, (workdir / "impair.log").read_text()
        yield link
        forwarder.send_signal(signal.SIGTERM)
        forwarder.wait(10)
        link.stats = json.loads(stats_file.read_text())
    finally:
        if forwarder is not None and forwarder.poll() is None:
            forwarder.kill()
            forwarder.wait()
        run(["ip", "link", "del", near], check=False)
        run(["ip", "link", "set", host_link, "master", bridge], check=False)
        for (netns, name), value in saved.items():
            ns = ["-n", netns] if netns else []
            run(["ip", *ns, "link", "set", name, "gso_max_segs", value], check=False)


def test_lossy_slow_network_loses_and_closes_nothing(rig: Rig, host: Host, tmp_path: Path) -> None:
    key = relay_key(host)
    cursor = journal_cursor(host)
    before = metrics(host)
    load = Load((host.address, PORT), key)
    try:
        load.set_up(TUNNELS, IDLE)
        load.start()
        with impaired_link(rig, host, tmp_path) as link:
            load.mark("impaired")
            end = time.monotonic() + NETEM_SECONDS
            while time.monotonic() < end and not any(p.closed for p in load.peers):
                time.sleep(min(1.0, max(0.0, end - time.monotonic())))
            load.finish()
            # Before the load's sockets close (the relay would count those closes).
            logged = journal_closes(host, cursor)
            after = metrics(host)
    finally:
        load.close()
    closed = [(p.name, p.closed) for p in load.peers if p.closed]
    assert not closed, f"{len(closed)} connections closed, first {closed[:5]}"
    bad = [(p.name, p.bad[:3]) for a, b in load.ends for p in (a, b) if p.bad]
    assert not bad, f"messages lost, repeated, reordered or crossed: {bad[:5]}"
    unfinished = [
        (a.name, a.sent, b.expected, b.sent, a.expected)
        for a, b in load.ends
        if a.sent != b.expected or b.sent != a.expected
    ]
    assert not unfinished, f"messages not delivered: {unfinished[:5]}"
    assert all(a.expected > 0 and b.expected > 0 for a, b in load.ends)
    # Nobody closed anything: the relay neither logged nor counted a close.
    assert logged == []
    assert closes(before, after) == {}
    assert (
        after["offset_relay_keepalive_timeouts_total"]
        == before["offset_relay_keepalive_timeouts_total"]
    )
    assert after["offset_relay_tunnels"] == TUNNELS
    # The link did what it says, both ways: the traffic went through it, impaired.
    for direction, counts in link.stats.items():
        assert counts["oversize"] == 0, (direction, counts)
        assert counts["dropped"] > 0 and counts["reordered"] > 0, (direction, counts)
        assert counts["delayed"] > counts["frames"] / 2, (direction, counts)
    to_host = sum(a.sent for a, _ in load.ends) + sum(b.sent for _, b in load.ends)
    assert sum(c["frames"] for c in link.stats.values()) > to_host
    ka_gaps = sorted(p.longest_ka_gap for p in load.idle)
    assert ka_gaps[-1] < KEEPALIVE
    connector_to_acceptor = sum(a.sent for a, _ in load.ends)
    acceptor_to_connector = sum(b.sent for _, b in load.ends)
    save_results(
        "lossy_network",
        {
            "impairment": {
                "delay_ms": NETEM["delay"] * 1000,
                "jitter_ms": NETEM["jitter"] * 1000,
                "loss": NETEM["loss"],
                "reorder": NETEM["reorder"],
                "both_directions": True,
                "made_by": "tests/deploy/impair.py (user space: this kernel has no sch_netem)",
            },
            "seconds": NETEM_SECONDS,
            "tunnels": TUNNELS,
            "idle_listeners": IDLE,
            "messages": {
                "connector_to_acceptor": connector_to_acceptor,
                "acceptor_to_connector": acceptor_to_connector,
            },
            "bytes": {
                "connector_to_acceptor": connector_to_acceptor * MESSAGE_SIZE,
                "acceptor_to_connector": acceptor_to_connector * MESSAGE_SIZE,
            },
            "lost_repeated_reordered_crossed": 0,
            "closed": 0,
            # Of every listen connection (the tunnels' listeners too), since it opened.
            "longest_keepalive_gap_of_idle_listeners_s": round(ka_gaps[-1], 2),
            "longest_silence_of_tunnel_ends_s": {
                k: round(v, 2) for k, v in percentiles(load.pauses("impaired")).items()
            },
            "frames": link.stats,
        },
    )


# ---- 2. peers that vanish without a FIN --------------------------------------------------


class NodeStatus:
    """The last status line of the node host's peers (lost_node.py), read in a thread."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.latest: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            with contextlib.suppress(ValueError):
                self.latest = json.loads(line)


@contextlib.contextmanager
def node_host(rig: Rig) -> Iterator[tuple[str, str, str]]:
    """A network namespace on the rig's bridge at 198.18.N.200: (namespace, its link on
    the controller's side, its address)."""
    n = subnet(rig)
    netns, link = f"or{n}-lost", f"or{n}-lost"
    address = f"{NET_PREFIX}.{n}.{NODE_ADDRESS_INDEX}"
    try:
        rig.adopt(netns=[netns], links=[link])
        run(["ip", "netns", "add", netns])
        run(["ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns])
        run(["ip", "link", "set", link, "master", f"or{n}-br", "up"])
        run(["ip", "-n", netns, "addr", "add", f"{address}/24", "dev", "eth0"])
        run(["ip", "-n", netns, "link", "set", "eth0", "up"])
        run(["ip", "-n", netns, "link", "set", "lo", "up"])
        yield netns, link, address
    finally:
        run(["ip", "netns", "del", netns], check=False)
        run(["ip", "link", "del", link], check=False)


def test_vanished_peers_are_freed_by_the_keepalive(rig: Rig, host: Host, tmp_path: Path) -> None:
    dropin = f"{DROP_INS}/60-test-keepalive.toml"
    host.write(dropin, f"[timeouts]\nkeepalive = {KEEPALIVE_SHORT}\n")
    host.ssh("systemctl restart offset-relay")
    wait_active(host)
    ids = {
        name: SigningKey.generate()
        for name in ("idle", "pending", "tunnel", "listener", "tunnel_listener", "other")
    }
    pub = {name: bytes(key.verify_key) for name, key in ids.items()}
    load = Load((host.address, PORT), relay_key(host), KEEPALIVE_SHORT)
    again = Load((host.address, PORT), load.relay_key, KEEPALIVE_SHORT)
    node: subprocess.Popen[str] | None = None
    try:
        with node_host(rig) as (netns, link, _):
            listener = load.open_peer("listener", ids["listener"], encode_init_connection(Listen()))
            tunnel_listener = load.open_peer(
                "tunnel_listener", ids["tunnel_listener"], encode_init_connection(Listen())
            )
            with open(tmp_path / "node.log", "wb") as log:
                node = subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        netns,
                        sys.executable,
                        "-m",
                        "tests.deploy.lost_node",
                        host.address,
                        str(PORT),
                        load.relay_key.hex(),
                        str(KEEPALIVE_SHORT),
                        bytes(ids["idle"]).hex(),
                        f"{bytes(ids['pending']).hex()}:{pub['listener'].hex()}",
                        f"{bytes(ids['tunnel']).hex()}:{pub['tunnel_listener'].hex()}",
                    ],
                    cwd=ROOT,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                )
            status = NodeStatus(node)
            load.settle(lambda: bool(listener.inbox and tunnel_listener.inbox), 30)
            connected = time.monotonic()  # the pending connect's half-tunnel is this old
            assert listener.inbox.pop() == IncomingConnection(pub["pending"]).encode()
            assert tunnel_listener.inbox.pop() == IncomingConnection(pub["tunnel"]).encode()
            accept = load.open_peer(
                "accept", ids["tunnel_listener"], encode_init_connection(Accept(pub["tunnel"]))
            )
            load.add_bulk_end(accept, 0, 1)
            load.start()

            def streaming() -> bool:
                theirs = status.latest.get("tunnel", {})
                assert not any(p.closed for p in load.peers), [p.closed for p in load.peers]
                assert not any(s.get("closed") for s in status.latest.values()), status.latest
                return accept.expected > 2000 and theirs.get("received", 0) > 2000

            wait_for("the bulk transfer both ways", streaming, 30)
            in_flight = {"node_to_controller": accept.expected}
            in_flight["controller_to_node"] = status.latest["tunnel"]["received"]
            cursor = journal_cursor(host)
            before = metrics(host)
            # The cut first, then the kill: the node's FIN and resets go nowhere.
            cut = time.time()
            run(["ip", "link", "set", link, "down"])
            node.kill()
            node.wait(10)

            expected = {
                "idle_listener": (key_prefix(ids["idle"]), "keepalive_timeout"),
                "pending_connector": (key_prefix(ids["pending"]), "keepalive_timeout"),
                "tunnel_end": (key_prefix(ids["tunnel"]), "keepalive_timeout"),
                "tunnel_other_end": (key_prefix(ids["tunnel_listener"]), "tunnel_peer_closed"),
            }
            freed: dict[str, float] = {}
            lines: list[tuple[float, str]] = []

            def all_freed() -> bool:
                lines[:] = journal_closes(host, cursor)
                for what, (prefix, reason) in expected.items():
                    for when, line in lines:
                        if f"key {prefix}," in line and re.search(rf": {reason}( \(.*\))?$", line):
                            freed.setdefault(what, round(when - cut, 2))
                return len(freed) == len(expected)

            wait_for("the relay to free the vanished peers", all_freed, KEEPALIVE_SHORT + 15)
            assert len(lines) == len(expected), lines  # nothing else closed, nothing twice
            late = {what: s for what, s in freed.items() if s > KEEPALIVE_SHORT + MARGIN}
            assert not late, (late, lines)
            wait_for("the tunnel's other end to see its close", lambda: bool(accept.closed), 10)
            seen = round(time.time() - cut, 2)
            # Closed by the relay. It had stopped reading this end (what it sent could not go
            # on to the vanished one), so the kernel may close with a reset, not a FIN.
            how = accept.closed or ""
            assert how == "closed by the relay" or "reset by peer" in how, how
            assert accept.bad == []
            after = metrics(host)
            assert closes(before, after) == {"keepalive_timeout": 3, "tunnel_peer_closed": 1}
            assert (
                after["offset_relay_keepalive_timeouts_total"]
                - before["offset_relay_keepalive_timeouts_total"]
                == 3
            )
            # The listener of the vanished connect: nothing is said to it, and the half-tunnel
            # outlives its connecting side until its own lifetime ends (the original's rules).
            assert after["offset_relay_half_tunnels"] == 1
            assert after["offset_relay_listeners"] == 2
            wait_for(
                "the orphaned half-tunnel to expire",
                lambda: metrics(host)["offset_relay_half_tunnels"] == 0,
                max(1.0, connected + HALF_TUNNEL + MARGIN - time.monotonic()),
            )
            expired = round(time.monotonic() - connected, 2)
            assert listener.closed is None and listener.inbox == []
            assert tunnel_listener.closed is None
            # The vanished listener's key is free: it listens again, and is connected to.
            relisten = again.open_peer("relisten", ids["idle"], encode_init_connection(Listen()))
            again.open_peer("other", ids["other"], encode_init_connection(Connect(pub["idle"])))
            again.settle(lambda: bool(relisten.inbox), 10)
            assert relisten.inbox == [IncomingConnection(pub["other"]).encode()]
    finally:
        if node is not None and node.poll() is None:
            node.kill()
            node.wait()
        load.finish(timeout=1)
        load.close()
        again.close()
        host.ssh(f"rm -f {dropin} && systemctl restart offset-relay")
        wait_active(host)
    save_results(
        "vanished_peers",
        {
            "keepalive_timeout_s": KEEPALIVE_SHORT,
            "half_tunnel_lifetime_s": HALF_TUNNEL,
            "freed_after_cut_s": freed,
            "other_end_saw_close_after_cut_s": seen,
            "other_end_saw": "FIN" if accept.closed == "closed by the relay" else "reset",
            "half_tunnel_expired_after_connect_s": expired,
            "bulk_messages_before_cut": in_flight,
            "bulk_messages_received_by_the_controller": accept.expected,
        },
    )
