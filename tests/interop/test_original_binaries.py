"""The relay against the original Offset binaries (stmgr, strelay, stnode, stctrl).

They run only with ``OFFSET_ORIGINAL_BIN`` set to the folder of a build of the original
(github freedomlayer/offset); without it every test here is skipped. ``make interop`` runs
them. Everything listens on loopback.

- a: files made by either tool work with the other;
- b: our client side (stmgr probe, client.py) through the original strelay;
- c: two original nodes become online friends through our strelay;
- d: an original node keeps its idle listen through our relay across relay rekeys for
  ``OFFSET_INTEROP_HOLD`` seconds (default 660).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from bench.links import Loop
from bench.workers import open_tunnels, payload_bytes
from offset_appliance.client import ClientError, RelayClient
from offset_appliance.files import load_identity, load_ticket
from tests.helpers import scrape_url, stop_process

from .conftest import RelayProcess

BIN = Path(sys.executable).parent
ORIGINAL = os.environ.get("OFFSET_ORIGINAL_BIN")
TOOLS = ("stmgr", "strelay", "stnode", "stctrl")

pytestmark = pytest.mark.skipif(
    not ORIGINAL,
    reason="OFFSET_ORIGINAL_BIN is not set to the folder of the original Offset binaries",
)


@pytest.fixture(scope="module")
def original() -> Path:
    """The folder of the original binaries; fails (not skips) if one is missing."""
    folder = Path(ORIGINAL or "")
    missing = [tool for tool in TOOLS if not os.access(folder / tool, os.X_OK)]
    if missing:
        pytest.fail(f"OFFSET_ORIGINAL_BIN={folder} lacks {', '.join(missing)}")
    return folder


def run(*args, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}: {result.stderr}")
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port}")


class Daemon:
    """An original daemon (strelay or stnode) with its log in a file."""

    def __init__(self, args: list, log: Path, port: int) -> None:
        self.log = log
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        self.proc = subprocess.Popen(
            [str(a) for a in args], stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env
        )
        wait_port(port, self.proc)

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def daemons():
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def original_relay(original: Path, directory: Path, ident: Path, daemons) -> tuple[int, Daemon]:
    port = free_port()
    daemon = Daemon(
        [original / "strelay", "--idfile", ident, "--laddr", f"127.0.0.1:{port}"],
        directory / "strelay.log",
        port,
    )
    daemons.append(daemon)
    return port, daemon


def our_relay(directory: Path, ident: Path | None = None, settings: str = "") -> RelayProcess:
    directory.mkdir(exist_ok=True)
    if ident is not None:
        (directory / "relay.ident").write_bytes(ident.read_bytes())
        (directory / "relay.ident").chmod(0o600)
    return RelayProcess(directory, settings)


def _shape(path: Path, *secrets: str) -> bytes:
    """A file's bytes with its key material replaced, to compare two tools' layouts."""
    data = path.read_bytes()
    for name in secrets:
        value = json.loads(data)[name]
        data = data.replace(value.encode(), b"<" + name.encode() + b">")
    return data


# ---- a: files --------------------------------------------------------------------------------


def test_a_original_files_work_with_our_relay_and_probe(original, tmp_path):
    made = tmp_path / "made"
    made.mkdir()
    ident = made / "relay.ident"
    run(original / "stmgr", "gen-ident", "--output", ident)
    # The original makes it with the umask: ours refuses it until it is made private.
    ident.chmod(0o644)
    refused = run(BIN / "strelay", "--idfile", ident, "--laddr", "127.0.0.1:0", check=False)
    assert refused.returncode != 0 and f"chmod 600 {ident}" in refused.stderr
    relay = our_relay(tmp_path / "ours", ident)
    try:
        assert relay.public_key == bytes(load_identity(ident, check_permissions=False).verify_key)
        ticket = made / "relay.ticket"
        address = f"127.0.0.1:{relay.port}"
        run(original / "stmgr", "relay-ticket", "--idfile", ident, "--address", address,
            "--output", ticket)  # fmt: skip
        assert load_ticket(ticket).public_key == relay.public_key
        probe = run(BIN / "stmgr", "probe", ticket)
        assert "ok" in probe.stdout.lower(), probe.stdout
    finally:
        relay.stop()


def test_a_our_files_work_with_the_original_relay(original, tmp_path, daemons):
    ident, ticket = tmp_path / "relay.ident", tmp_path / "relay.ticket"
    run(BIN / "stmgr", "gen-ident", "--output", ident)
    port, _ = original_relay(original, tmp_path, ident, daemons)
    run(BIN / "stmgr", "relay-ticket", "--idfile", ident, "--address", f"127.0.0.1:{port}",
        "--output", ticket)  # fmt: skip
    # b: our probe (listen, connect, accept, a message each way) through the original relay.
    probe = run(BIN / "stmgr", "probe", ticket)
    assert "ok" in probe.stdout.lower(), probe.stdout


def test_a_both_tools_write_the_same_bytes(original, tmp_path):
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    theirs.mkdir()
    ours.mkdir()
    for folder, tool in ((theirs, original / "stmgr"), (ours, BIN / "stmgr")):
        run(tool, "gen-ident", "--output", folder / "id")
        run(tool, "relay-ticket", "--idfile", folder / "id", "--address", "relay.example:4567",
            "--output", folder / "ticket")  # fmt: skip
    assert _shape(ours / "id", "privateKey") == _shape(theirs / "id", "privateKey")
    assert _shape(ours / "ticket", "publicKey") == _shape(theirs / "ticket", "publicKey")
    # The same identity gives the same ticket, byte for byte, from either tool.
    (theirs / "id").chmod(0o600)
    run(BIN / "stmgr", "relay-ticket", "--idfile", theirs / "id", "--address", "127.0.0.1:1",
        "--output", ours / "same")  # fmt: skip
    run(original / "stmgr", "relay-ticket", "--idfile", theirs / "id", "--address",
        "127.0.0.1:1", "--output", theirs / "same")  # fmt: skip
    assert (ours / "same").read_bytes() == (theirs / "same").read_bytes()


# ---- b: our client side against the original relay -------------------------------------------


def test_b_client_tunnels_and_rekeys_through_the_original_relay(original, tmp_path, daemons):
    ident = tmp_path / "relay.ident"
    run(original / "stmgr", "gen-ident", "--output", ident)
    port, _ = original_relay(original, tmp_path, ident, daemons)
    relay_key = bytes(load_identity(ident, check_permissions=False).verify_key)
    address = ("127.0.0.1", port)

    def client(identity=None) -> RelayClient:
        return RelayClient.open(address, identity, expected_key=relay_key, timeout=10)

    listener_id = SigningKey.generate()
    listener = client(listener_id)
    listener.listen()
    connector = client()
    connector.connect(listener.public_key)
    assert listener.next_incoming() == connector.public_key
    acceptor = client(listener_id)
    acceptor.accept(connector.public_key)
    sizes = (0, 1, 100, 65_536, 500_000)
    for size in sizes:
        payload = os.urandom(size)
        connector.send(payload)
        assert acceptor.receive() == payload
        acceptor.send(payload[::-1])
        assert connector.receive() == payload[::-1]
    # Rekeys started by our side, on both hops and on the listen connection; the original
    # answers each, and data flows under the new keys.
    for conn in (connector, acceptor, listener):
        assert conn.wire.start_rekey(time.monotonic())
    for round_ in range(3):
        connector.send(b"after rekey %d" % round_)
        assert acceptor.receive() == b"after rekey %d" % round_
        acceptor.send(b"back %d" % round_)
        assert connector.receive() == b"back %d" % round_
    assert connector.wire.rekeys == 1 and acceptor.wire.rekeys == 1
    others = []
    while listener.wire.rekeys == 0 and len(others) < 5:
        # Notifications under the relay's new key once it has answered the listener's rekey.
        others.append(client())
        others[-1].connect(listener.public_key)
        assert listener.next_incoming() == others[-1].public_key
    assert listener.wire.rekeys == 1
    for conn in (listener, connector, acceptor, *others):
        conn.close()


def test_b_the_bench_sets_up_tunnels_through_one_listener_of_the_original_relay(
    original, tmp_path, daemons
):
    # The original drops a connect that arrives while its previous announcement to the same
    # listener is still queued (server_loop.rs: ``try_send`` on an ``mpsc::channel(0)``) and
    # closes that connection; the benchmark's tunnel load, 40 tunnels through one listener,
    # must keep to that and set every tunnel up.
    ident = tmp_path / "relay.ident"
    run(original / "stmgr", "gen-ident", "--output", ident)
    port, _ = original_relay(original, tmp_path, ident, daemons)
    relay_key = bytes(load_identity(ident, check_permissions=False).verify_key)
    loop = Loop(("127.0.0.1", port), relay_key)
    try:
        load = open_tunnels(loop, 40, 2, payload_bytes(64, 7))
        assert len(load.listeners) == 1 and load.ready == 40
        load.go()
        loop.run_until(lambda: load.received >= 40 * 2 * 20, 60, "messages through the tunnels")
        assert len(loop.links) == 1 + 2 * 40
    finally:
        loop.shutdown()


@pytest.mark.skipif(
    os.environ.get("OFFSET_INTEROP_LONG") != "1",
    reason="takes an hour (the original relay rekeys after 3601 s): set OFFSET_INTEROP_LONG=1",
)
def test_b_the_original_relay_rekeys_an_idle_listen_and_it_keeps_working(
    original, tmp_path, daemons
):
    ident = tmp_path / "relay.ident"
    run(original / "stmgr", "gen-ident", "--output", ident)
    port, _ = original_relay(original, tmp_path, ident, daemons)
    relay_key = bytes(load_identity(ident, check_permissions=False).verify_key)
    address = ("127.0.0.1", port)
    listener = RelayClient.open(address, expected_key=relay_key, timeout=10)
    listener.listen()
    started = time.monotonic()
    while listener.wire.rekeys < 1 and time.monotonic() - started < 3600 + 300:
        try:  # idle: only keepalives and the relay's own rekeys arrive
            listener.receive(timeout=60)
        except ClientError:
            assert not listener.closed, "the original relay closed the idle listen connection"
    assert listener.wire.rekeys >= 1, "the original relay never rekeyed"
    print(
        f"{listener.wire.rekeys} rekeys by the original relay in {time.monotonic() - started:.0f} s"
    )
    connector = RelayClient.open(address, expected_key=relay_key, timeout=10)
    connector.connect(listener.public_key)
    assert listener.next_incoming() == connector.public_key  # the relay's new send key
    listener.reject(connector.public_key)  # ours: the relay must read it to drop the connect
    assert connector.wait_closed(10) == []
    for conn in (listener, connector):
        conn.close()


# ---- c and d: original nodes through our relay -----------------------------------------------


class Node:
    """An original stnode with an app identity allowed to configure it, set up as the
    original's own CLI tests do (components/test/src/cli_tests)."""

    def __init__(self, original: Path, folder: Path, name: str, daemons) -> None:
        self.original, self.folder, self.name = original, folder, name
        folder.mkdir()
        (folder / "trusted").mkdir()
        self.ident = folder / f"{name}.ident"
        # Our stmgr makes the node's identity: the original node must take it.
        run(BIN / "stmgr", "gen-ident", "--output", self.ident)
        self.app = folder / "app.ident"
        run(original / "stmgr", "gen-ident", "--output", self.app)
        run(original / "stmgr", "init-node-db", "--idfile", self.ident, "--output",
            folder / f"{name}.db")  # fmt: skip
        self.port = free_port()
        self.ticket = folder / f"{name}.ticket"
        run(original / "stmgr", "node-ticket", "--idfile", self.ident, "--address",
            f"127.0.0.1:{self.port}", "--output", self.ticket)  # fmt: skip
        run(original / "stmgr", "app-ticket", "--idfile", self.app, "--output",
            folder / "trusted" / "app.ticket", "--proutes", "--pbuyer", "--pseller",
            "--pconfig")  # fmt: skip
        self.daemon = Daemon(
            [original / "stnode", "--idfile", self.ident, "--laddr", f"127.0.0.1:{self.port}",
             "--database", folder / f"{name}.db", "--trusted", folder / "trusted"],
            folder / "stnode.log",
            self.port,
        )  # fmt: skip
        daemons.append(self.daemon)

    def ctrl(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        return run(self.original / "stctrl", "--idfile", self.app, "--ticket", self.ticket,
                   *args, check=check)  # fmt: skip

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while self.ctrl("info", "friends", check=False).returncode != 0:
            assert time.monotonic() < deadline, "stctrl never reached the node"
            time.sleep(0.2)


def metrics(relay: RelayProcess) -> dict[str, float]:
    port = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", relay.log_text())
    assert port, relay.log_text()
    return scrape_url(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=5)


METRICS = '[metrics]\nenabled = true\nlisten = "127.0.0.1:0"\n'


def test_c_two_original_nodes_become_online_friends_through_our_relay(original, tmp_path, daemons):
    relay = our_relay(tmp_path / "relay", settings=METRICS)
    try:
        ticket = tmp_path / "relay.ticket"
        run(BIN / "stmgr", "relay-ticket", "--idfile", relay.ident, "--address",
            f"127.0.0.1:{relay.port}", "--output", ticket)  # fmt: skip
        nodes = [Node(original, tmp_path / f"node{i}", f"node{i}", daemons) for i in (0, 1)]
        for node in nodes:
            node.wait_ready()
            node.ctrl("config", "add-relay", "--relay", ticket, "--name", "ours")
            node.ctrl("info", "export-ticket", "--ticket", node.folder / "friend.ticket")
        for node, other in ((nodes[0], nodes[1]), (nodes[1], nodes[0])):
            node.ctrl("config", "add-friend", "--friend", other.folder / "friend.ticket",
                      "--name", other.name)  # fmt: skip
            node.ctrl("config", "enable-friend", "--name", other.name)
        deadline = time.monotonic() + 120
        while True:
            tables = [node.ctrl("info", "friends").stdout for node in nodes]
            if all(re.search(r"E\+\s*\|\s*node", table) for table in tables):
                break
            assert time.monotonic() < deadline, "\n".join(tables)
            time.sleep(0.5)
        values = metrics(relay)
        assert values["offset_relay_listeners"] == 2  # each node listens on our relay
        assert values["offset_relay_tunnels"] >= 1  # and they talk through a tunnel
        assert values["offset_relay_relayed_messages_total"] > 0
        print("friends online:", *tables, sep="\n")
        print(
            f"our relay: {values['offset_relay_listeners']:.0f} listeners, "
            f"{values['offset_relay_tunnels']:.0f} tunnels, "
            f"{values['offset_relay_relayed_messages_total']:.0f} messages and "
            f"{values['offset_relay_relayed_bytes_total']:.0f} bytes relayed"
        )
    finally:
        relay.stop()


HOLD = float(os.environ.get("OFFSET_INTEROP_HOLD", "660"))
REKEY = 96.0  # a multiple of 16: every relay rekey falls on a keepalive slot


def test_d_an_original_node_holds_its_idle_listen_across_relay_rekeys(original, tmp_path, daemons):
    relay = our_relay(
        tmp_path / "relay", settings=METRICS + f"[timeouts]\nrekey_interval = {REKEY}\n"
    )
    try:
        ticket = tmp_path / "relay.ticket"
        run(BIN / "stmgr", "relay-ticket", "--idfile", relay.ident, "--address",
            f"127.0.0.1:{relay.port}", "--output", ticket)  # fmt: skip
        node = Node(original, tmp_path / "node", "node", daemons)
        node.wait_ready()
        node.ctrl("config", "add-relay", "--relay", ticket, "--name", "ours")
        deadline = time.monotonic() + 30
        while metrics(relay).get("offset_relay_listeners", 0) < 1:
            assert time.monotonic() < deadline, "the node never listened on the relay"
            time.sleep(0.2)
        first = metrics(relay)
        accepted = first["offset_relay_connections_accepted_total"]
        started = time.monotonic()
        samples = []
        while time.monotonic() - started < HOLD:
            time.sleep(5)
            values = metrics(relay)
            samples.append(values)
            # The node's one listen connection is still the first: no reconnection.
            held = (
                values["offset_relay_connections_accepted_total"] == accepted
                and values["offset_relay_listeners"] == 1
            )
            assert held, (
                f"the node dropped its listen after {time.monotonic() - started:.0f} s and "
                f"{values['offset_relay_rekeys_total']:.0f} relay rekeys; the node's log:\n"
                + (node.folder / "stnode.log").read_text(errors="replace")[-2000:]
            )
        rekeys = samples[-1]["offset_relay_rekeys_total"]
        print(f"held {HOLD:.0f} s, {rekeys:.0f} rekeys, one connection")
        assert rekeys >= HOLD // REKEY - 1
    finally:
        relay.stop()
