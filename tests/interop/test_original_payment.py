"""Two original nodes pay each other through our relay (on loopback).

Runs only with ``OFFSET_ORIGINAL_BIN`` set to the folder of a build of the original Offset
(github freedomlayer/offset: stmgr, stnode, stctrl, stindex, stverify); ``make interop``
runs it. Two original index servers and two original nodes are set up as the original's
own CLI test does (original_network.py); the nodes' only relay is ours. They become online
friends through it, and pay each other by invoice both ways: each receipt verifies and both
sides' balances move by the amount. Our relay's /metrics show both nodes listening on it
and the friends' traffic going through it.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import scrape_url

from .conftest import RelayProcess
from .original_network import OriginalNetwork

BIN = Path(sys.executable).parent
ORIGINAL = os.environ.get("OFFSET_ORIGINAL_BIN")
TOOLS = ("stmgr", "stnode", "stctrl", "stindex", "stverify")

pytestmark = pytest.mark.skipif(
    not ORIGINAL,
    reason="OFFSET_ORIGINAL_BIN is not set to the folder of the original Offset binaries",
)

METRICS = '[metrics]\nenabled = true\nlisten = "127.0.0.1:0"\n'


@pytest.fixture(scope="module")
def original() -> Path:
    """The folder of the original binaries; fails (not skips) if one is missing."""
    folder = Path(ORIGINAL or "")
    missing = [tool for tool in TOOLS if not os.access(folder / tool, os.X_OK)]
    if missing:
        pytest.fail(f"OFFSET_ORIGINAL_BIN={folder} lacks {', '.join(missing)}")
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def metrics(relay: RelayProcess) -> dict[str, float]:
    port = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", relay.log_text())
    assert port, relay.log_text()
    return scrape_url(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=5)


def test_two_original_nodes_pay_each_other_through_our_relay(original, tmp_path):
    (tmp_path / "relay").mkdir()
    relay = RelayProcess(tmp_path / "relay", METRICS)
    net = OriginalNetwork(original, tmp_path / "net", ports=free_port)
    try:
        ticket = tmp_path / "relay.ticket"
        subprocess.run(
            [BIN / "stmgr", "relay-ticket", "--idfile", relay.ident, "--address",
             f"127.0.0.1:{relay.port}", "--output", ticket, "--allow-private"],
            check=True,
        )  # fmt: skip
        net.start_index_servers()
        net.start_nodes()
        online_s = net.befriend(ticket)
        node0, node1 = net.nodes
        first = net.pay(node1, node0, 50, "node1-pays-node0")
        second = net.pay(node0, node1, 20, "node0-pays-node1")
        third = net.pay(node1, node0, 7, "node1-pays-node0-again")
        assert net.online()
        values = metrics(relay)
        assert values["offset_relay_listeners"] == 2, values  # each node listens on ours
        assert values["offset_relay_tunnels"] >= 1, values  # the friends talk through it
        assert values["offset_relay_relayed_messages_total"] > 0, values
        # Net: node1 paid 57, node0 paid 20.
        assert node0.balance("node1") == 37 and node1.balance("node0") == -37
        print(f"friends online after {online_s:.2f} s")
        for p in (first, second, third):
            print(
                f"{p.buyer} paid {p.seller} {p.amount}: {p.seconds:.2f} s, {p.attempts} attempts,"
                f" balances {p.balances_before} -> {p.balances_after}"
            )
        print(
            f"our relay: {values['offset_relay_connections_accepted_total']:.0f} connections "
            f"accepted, {values['offset_relay_tunnels']:.0f} tunnels, "
            f"{values['offset_relay_relayed_messages_total']:.0f} messages relayed"
        )
        print("\n".join(node.friends() for node in net.nodes))
    finally:
        net.close()
        relay.stop()
