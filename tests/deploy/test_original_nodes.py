"""Original Offset nodes keep their connections to the packaged relay through a restart, an
upgrade and a restart after a configuration change, and keep paying each other.

Runs only with ``OFFSET_ORIGINAL_BIN`` set to the folder of a build of the original Offset
(github freedomlayer/offset: stmgr, stnode, stctrl, stindex, stverify); ``make interop``
runs it. One booted bookworm host runs the relay from the package of the previous release
(PREVIOUS_COMMIT of test_restart.py), with /metrics on the rig's network. A node host, a
network namespace on the rig's bridge at 198.18.N.200, runs two original index servers and
two original nodes (tests/interop/original_network.py, as the original's own CLI test sets
them up); the nodes' only relay is the host's, by a ticket made from the identity the
package generated there. They become online friends through it and pay each other.

Then, in turn: ``systemctl restart offset-relay``; an upgrade to this tree's package with
apt; a restart after a drop-in changed ``log_level``. After each, proven: the relay's TCP
connections from the node host are the very ones before (the same peer ports on the host,
the same local ports and stnode processes on the node host, and the new process counts no
connection accepted but those it took over, before and after a payment); both nodes still
see the other enabled and online; and a new payment goes through, its receipt verified and
both balances moved by its amount.

Figures: tests/deploy/original-nodes-results.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from offset_appliance import __version__
from offset_appliance.files import load_ticket
from tests.helpers import scrape_url
from tests.interop.original_network import OriginalNetwork, Payment

from .rig import NET_PREFIX, Host, Rig, run
from .test_restart import (
    APT,
    DROP_INS,
    PREVIOUS,
    build_previous,
    install_relay,
    installed_version,
    journal_cursor,
    journal_since,
    relay_key,
    unit,
    wait_active,
    wait_for,
)

pytestmark = [
    pytest.mark.deploy,
    pytest.mark.skipif(
        not os.environ.get("OFFSET_ORIGINAL_BIN"),
        reason="OFFSET_ORIGINAL_BIN is not set to the folder of the original Offset binaries",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PORT = 4567
METRICS_PORT = 9478
TOOLS = ("stmgr", "stnode", "stctrl", "stindex", "stverify")
NODE_ADDRESS_INDEX = 200  # the node host's address in the rig's subnet, which no host takes
RESULTS = ROOT / "tests" / "deploy" / "original-nodes-results.json"
ACCEPTED = "offset_relay_connections_accepted_total"


@pytest.fixture(scope="module")
def original() -> Path:
    """The folder of the original binaries; fails (not skips) if one is missing."""
    folder = Path(os.environ["OFFSET_ORIGINAL_BIN"])
    missing = [tool for tool in TOOLS if not os.access(folder / tool, os.X_OK)]
    if missing:
        pytest.fail(f"OFFSET_ORIGINAL_BIN={folder} lacks {', '.join(missing)}")
    return folder


@pytest.fixture(scope="module")
def rig(make_rig: Callable[..., Rig], tmp_path_factory: pytest.TempPathFactory) -> Rig:
    previous = build_previous(tmp_path_factory.mktemp("previous"))
    return make_rig(1, name="orignodes", repo_debs=[previous])


@pytest.fixture(scope="module")
def host(rig: Rig) -> Host:
    """The host with the previous release installed and /metrics on the rig's network."""
    host = rig.hosts[0]
    install_relay(
        host,
        "50-test-metrics.toml",
        f'[metrics]\nenabled = true\nlisten = "{host.address}:{METRICS_PORT}"\n',
    )
    assert installed_version(host) == PREVIOUS
    wait_for("the metrics endpoint", lambda: _reachable(host), 30)
    return host


def metrics(host: Host) -> dict[str, float]:
    return scrape_url(f"http://{host.address}:{METRICS_PORT}/metrics")


def _reachable(host: Host) -> bool:
    try:
        metrics(host)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def node_host(rig: Rig) -> Iterator[tuple[str, str]]:
    """A network namespace on the rig's bridge at 198.18.N.200: (namespace, its address)."""
    n = int(rig.gateway.split(".")[2])
    netns = link = f"or{n}-onodes"
    address = f"{NET_PREFIX}.{n}.{NODE_ADDRESS_INDEX}"
    try:
        rig.adopt(netns=[netns], links=[link])
        run(["ip", "netns", "add", netns])
        run(["ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns])
        run(["ip", "link", "set", link, "master", f"or{n}-br", "up"])
        run(["ip", "-n", netns, "addr", "add", f"{address}/24", "dev", "eth0"])
        run(["ip", "-n", netns, "link", "set", "eth0", "up"])
        run(["ip", "-n", netns, "link", "set", "lo", "up"])
        yield netns, address
    finally:
        run(["ip", "netns", "del", netns], check=False)
        run(["ip", "link", "del", link], check=False)


def relay_peers(host: Host, node_address: str) -> set[str]:
    """The relay's established connections from the node host, as the host's kernel lists
    them (/proc/net/tcp: the host has no ss): each peer's address and port."""
    peers = set()
    for line in host.read("/proc/net/tcp").splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if state != "01" or int(local.split(":")[1], 16) != PORT:  # 01: ESTABLISHED
            continue
        address, port = remote.split(":")
        peer = f"{socket.inet_ntoa(struct.pack('<I', int(address, 16)))}:{int(port, 16)}"
        if peer.startswith(f"{node_address}:"):
            peers.add(peer)
    return peers


def node_sockets(netns: str, host: Host) -> set[str]:
    """The node host's connections to the relay: each local port and the stnode process
    holding it."""
    out = run(["ip", "netns", "exec", netns, "ss", "-Htnp", "state", "established",
               f"( dport = :{PORT} and dst {host.address} )"]).stdout  # fmt: skip
    found = set()
    for line in out.splitlines():
        fields = line.split()
        process = re.search(r'users:\(\("([^"]+)",pid=(\d+)', line)
        assert process, line
        found.add(f"{fields[2]} {process.group(1)}[{process.group(2)}]")
    return found


def test_original_nodes_keep_their_connections_through_restart_upgrade_and_config(
    original: Path, rig: Rig, host: Host, deb_package: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    figures: dict[str, Any] = {"previous_release": PREVIOUS, "this_release": __version__}
    # The relay's ticket for its address on the rig, made with our stmgr from the identity
    # the package generated on the host.
    ident = tmp_path / "relay.ident"
    ident.write_text(host.read("/var/lib/offset-relay/relay.ident"))
    ident.chmod(0o600)
    ticket = tmp_path / "relay.ticket"
    subprocess.run(
        [BIN / "stmgr", "relay-ticket", "--address", f"{host.address}:{PORT}", "--idfile",
         ident, "--output", ticket, "--allow-private"],
        check=True,
    )  # fmt: skip
    assert load_ticket(ticket).public_key == relay_key(host)
    ident.unlink()
    payments: list[dict[str, Any]] = []
    with node_host(rig) as (netns, node_address):
        net = OriginalNetwork(original, tmp_path / "net", prefix=("ip", "netns", "exec", netns))
        try:
            net.start_index_servers()
            net.start_nodes()
            figures["friends_online_s"] = round(net.befriend(ticket), 3)
            node0, node1 = net.nodes

            def pay(step: str, amount: int) -> Payment:
                buyer, seller = (node1, node0) if len(payments) % 2 == 0 else (node0, node1)
                payment = net.pay(buyer, seller, amount, f"{step}-{buyer.name}-{seller.name}")
                payments.append(
                    {
                        "after": step,
                        "buyer": payment.buyer,
                        "seller": payment.seller,
                        "amount": payment.amount,
                        "round_trip_s": round(payment.seconds, 3),
                        "pay_attempts": payment.attempts,
                        "balances_after": payment.balances_after,
                    }
                )
                return payment

            pay("set-up", 50)
            # The nodes listen on the relay and talk through a tunnel: their connections.
            wait_for("the friends' connections", lambda: len(relay_peers(host, node_address)) >= 3)
            values = metrics(host)
            assert values["offset_relay_listeners"] == 2, values
            assert values["offset_relay_tunnels"] >= 1, values

            def step(name: str, action: Callable[[], None]) -> None:
                peers = relay_peers(host, node_address)
                sockets = node_sockets(netns, host)
                before = metrics(host)
                cursor = journal_cursor(host)
                pid = unit(host, "MainPID")["MainPID"]
                action()
                wait_active(host)
                wait_for("the metrics endpoint", lambda: _reachable(host), 30)
                new_pid = unit(host, "MainPID")["MainPID"]
                assert new_pid != pid, f"{name}: the relay was not restarted"
                after = metrics(host)
                restored = [
                    m.group()
                    for line in journal_since(host, cursor, new_pid)
                    if (m := re.search(r"hand-over: \d+ connections.*", line))
                ]
                # The same TCP connections, seen from both ends, and no new one: the new
                # process has counted only those it took over.
                assert relay_peers(host, node_address) == peers, name
                assert node_sockets(netns, host) == sockets, name
                assert after[ACCEPTED] == len(peers), (name, after[ACCEPTED], peers)
                assert restored == [f"hand-over: {len(peers)} connections restored"], restored
                assert net.online(), "\n".join(node.friends() for node in net.nodes)
                payment = pay(name, 10 + len(payments))
                # The payment went through the same connections.
                assert relay_peers(host, node_address) == peers, name
                assert metrics(host)[ACCEPTED] == after[ACCEPTED], name
                figures.setdefault("steps", {})[name] = {
                    "relay_pid": {"before": pid, "after": new_pid},
                    "accepted_total": {
                        "before": before[ACCEPTED],
                        "after": after[ACCEPTED],
                        "after_payment": metrics(host)[ACCEPTED],
                    },
                    "relay_peers_on_host": sorted(peers),
                    "node_sockets": sorted(sockets),
                    "journal": restored,
                    "payment_round_trip_s": round(payment.seconds, 3),
                    "version": installed_version(host),
                }

            def restart() -> None:
                host.ssh("systemctl restart offset-relay")

            step("restart", restart)

            def upgrade() -> None:
                rig.publish([deb_package])
                host.ssh(f"{APT} update >/dev/null && {APT} install offset-relay >/dev/null",
                         timeout=600)  # fmt: skip
                assert installed_version(host) == __version__

            step("upgrade", upgrade)

            def config_change() -> None:
                host.write(f"{DROP_INS}/60-test-log-level.toml", 'log_level = "debug"\n')
                host.ssh("systemctl restart offset-relay")

            step("config-restart", config_change)
            effective = host.ssh("strelay --print-config --config /etc/offset-relay/relay.toml")
            assert re.search(r'^log_level = "debug"', effective.stdout, re.M), effective.stdout

            # A crash (kill -9): nothing is handed over, the nodes' connections end. They
            # come back by themselves (the original's reconnect back-off) to the next process,
            # whose listening socket waited in the fd store meanwhile, and pay again.
            peers = relay_peers(host, node_address)
            pid = unit(host, "MainPID")["MainPID"]
            killed = time.monotonic()
            host.ssh("systemctl kill -s SIGKILL offset-relay", check=False)
            wait_for("the next process", lambda: unit(host, "MainPID")["MainPID"] not in
                     ("0", pid), 30)  # fmt: skip
            wait_active(host)
            relay_back = time.monotonic()
            wait_for("the metrics endpoint", lambda: _reachable(host), 30)

            def back_online() -> bool:
                now = relay_peers(host, node_address)
                return len(now) >= 3 and not now & peers and net.online()

            wait_for("the nodes back online", back_online, 60)
            nodes_back = time.monotonic()
            payment = pay("crash", 10 + len(payments))
            figures["crash"] = {
                "relay_running_again_after_kill_s": round(relay_back - killed, 2),
                "nodes_online_again_after_kill_s": round(nodes_back - killed, 2),
                "original_node_backoff_s": 8.0,
                "new_connections": len(relay_peers(host, node_address)),
                "payment_round_trip_s": round(payment.seconds, 3),
            }
        except BaseException:
            print(net.logs())
            raise
        finally:
            net.close()
            host.ssh(f"rm -f {DROP_INS}/60-test-log-level.toml", check=False)
    figures["payments"] = payments
    figures["test_s"] = round(time.monotonic() - started, 1)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
