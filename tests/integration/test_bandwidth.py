"""Bandwidth limits and transfer budgets on a real strelay: a rate measured through a tunnel,
a budget that refuses the next tunnel and is remembered across a restart, every key changed
by SIGHUP with tunnels open, bad values at start and at reload, and ``stmgr usage``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from offset_appliance.client import ClientError, ConnectionClosed, RelayClient
from offset_appliance.files import b64url_encode

from ..helpers import pair
from .conftest import BIN, RelayProcess, tunnel, wait_for
from .test_metrics import METRICS, metrics_address, parse, scrape_text

MESSAGE = os.urandom(16384)  # random: packing would shrink zeros on the wire


def wire_size(message: bytes) -> int:
    """Bytes one message takes on the wire (frame header, packing, tag)."""
    a, _ = pair()
    a.send_message(message, 0.0)
    return len(b"".join(a.data_to_send()))


class Pump:
    """Sends MESSAGE through a tunnel as fast as the relay takes it (a thread), and counts
    what arrives at the other end (another thread), with arrival times."""

    def __init__(self, connector: RelayClient, acceptor: RelayClient) -> None:
        self.connector, self.acceptor = connector, acceptor
        self.arrivals: list[float] = []
        self.running = True
        self.threads = [
            threading.Thread(target=self._send, daemon=True),
            threading.Thread(target=self._receive, daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def _send(self) -> None:
        try:
            while self.running:
                self.connector.send_many([MESSAGE] * 4)
        except (ClientError, OSError):
            pass

    def _receive(self) -> None:
        try:
            while self.running:
                message = self.acceptor.receive(timeout=30)
                assert message == MESSAGE
                self.arrivals.append(time.monotonic())
        except (ClientError, OSError):
            pass

    def received_since(self, start: float) -> int:
        return sum(1 for at in list(self.arrivals) if at >= start)

    def stop(self) -> None:
        self.running = False
        self.connector.close()
        self.acceptor.close()
        for thread in self.threads:
            thread.join(10)


def test_a_one_megabyte_per_second_connection_limit_holds_within_ten_percent(relay_factory):
    rate = 1_000_000
    relay = relay_factory(f"[bandwidth]\nconnection_rate = {rate}\n")
    listener, connector, acceptor = tunnel(relay)
    pump = Pump(connector, acceptor)
    try:
        # The burst (one second's worth) and what the socket buffers hold go first.
        wait_for(lambda: pump.arrivals and time.monotonic() - pump.arrivals[0] > 2.0, "the burst")
        start = time.monotonic()
        wait_for(lambda: time.monotonic() - start >= 5.0, "5 s of traffic", timeout=10)
        arrivals = [at for at in list(pump.arrivals) if at >= start]
        moved = len(arrivals) * wire_size(MESSAGE)
        measured = moved / (arrivals[-1] - start)
        closes = [line for line in relay.lines if "tunnel_peer_closed" in line]
    finally:
        pump.stop()
        listener.close()
    print(f"measured {measured:.0f} B/s through a {rate} B/s limit")
    assert 0.9 * rate <= measured <= 1.1 * rate, f"{measured:.0f} B/s through a {rate} B/s limit"
    assert closes == []  # no tunnel closed while it was throttled


def _refused(relay: RelayProcess, identity: SigningKey, listener_key: bytes) -> bool:
    """Whether a new tunnel of ``identity`` is refused (closed after its handshake)."""
    client = relay.client(identity)
    try:
        client.connect(listener_key)
        client.wait_closed(timeout=3)
        return True
    except ConnectionClosed:
        return True
    except ClientError:
        return False  # still open: the connect waits for its accept
    finally:
        client.close()


def test_a_five_megabyte_budget_refuses_the_next_tunnel_and_survives_a_restart(tmp_path):
    directory = tmp_path / "relay"
    directory.mkdir()
    state = directory / "usage.json"
    settings = (
        f'[budgets]\nkey_monthly = 5000000\naction = "refuse"\nstate_file = "{state}"\n'
        "save_interval = 3600\n"
    )
    heavy = SigningKey.generate()
    relay = RelayProcess(directory, settings)
    try:
        listener, connector, acceptor = tunnel(relay, connector_id=heavy)
        count = 6_000_000 // len(MESSAGE) + 1
        for _ in range(count // 8):
            connector.send_many([MESSAGE] * 8)
        received = [acceptor.receive() for _ in range(count // 8 * 8)]
        assert all(message == MESSAGE for message in received)  # refuse slows nobody
        key = b64url_encode(bytes(heavy.verify_key))
        wait_for(lambda: "monthly budget of 5000000 bytes spent" in relay.log_text(), "the log")
        assert _refused(relay, heavy, listener.public_key)
        assert not _refused(relay, SigningKey.generate(), listener.public_key)
        # The open tunnel is not closed.
        connector.send(b"still there")
        assert acceptor.receive() == b"still there"
        for client in (listener, connector, acceptor):
            client.close()
    finally:
        relay.stop()
    assert "Traceback" not in relay.log_text()
    # The stop wrote the counts (the save interval is an hour).
    out = subprocess.run(
        [BIN / "stmgr", "usage", "--state", state], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"^\s+1\s+([\d,]+)\s+(\S+)$", out, re.M)
    assert match and match.group(2) == key, out
    assert int(match.group(1).replace(",", "")) >= 5_000_000
    relay = RelayProcess(directory, settings)
    try:
        assert "budgets: counts read from" in relay.log_text()
        listener = relay.client()
        listener.listen()
        assert _refused(relay, heavy, listener.public_key)
        assert not _refused(relay, SigningKey.generate(), listener.public_key)
        listener.close()
    finally:
        relay.stop()
    assert "Traceback" not in relay.log_text()


def test_stmgr_usage_bad_state_file_is_one_line_and_nonzero(tmp_path):
    bad = tmp_path / "usage.json"
    bad.write_text('{"format": "offset-relay-usage", "version": 1}')
    for argv, code in (
        (["--state", str(tmp_path / "missing.json")], 66),
        (["--state", str(tmp_path)], 66),
        (["--state", str(bad)], 65),
        (["--top", "0", "--state", str(bad)], 64),
    ):
        proc = subprocess.run([BIN / "stmgr", "usage", *argv], capture_output=True, text=True)
        assert proc.returncode == code, (argv, proc.stderr)
        assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("stmgr: ")
    # argparse's own errors: its usage, then one error line.
    proc = subprocess.run([BIN / "stmgr", "usage", "--by", "port"], capture_output=True, text=True)
    assert proc.returncode == 64 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("stmgr usage: error: argument --by")


# ---- reload ------------------------------------------------------------------------------------


def _reload(relay: RelayProcess, text: str) -> None:
    count = relay.log_text().count("configuration reloaded") + relay.log_text().count(
        "reload failed"
    )
    relay.config.write_text(text)
    relay.proc.send_signal(signal.SIGHUP)
    wait_for(
        lambda: (
            relay.log_text().count("configuration reloaded")
            + relay.log_text().count("reload failed")
            > count
        ),
        "the reload",
    )


def test_every_key_changes_by_sighup_with_tunnels_open(relay_factory, tmp_path):
    relay = relay_factory(METRICS)
    base = relay.config.read_text()
    address = metrics_address(relay)
    relay.client().close()  # the loop runs: SIGHUP is handled
    listener, connector, acceptor = tunnel(relay)
    pump = Pump(connector, acceptor)

    def value(name: str) -> float:
        return parse(scrape_text(address)).get(name, 0.0)

    def throttled(kind: str) -> float:
        return value(f'offset_relay_throttled_seconds_total{{kind="{kind}"}}')

    closes: list[str] = []
    try:
        for kind in ("connection", "key", "prefix", "total"):
            before = throttled(kind)
            _reload(relay, base + f"[bandwidth]\n{kind}_rate = 262144\n{kind}_burst = 65536\n")
            wait_for(lambda kind=kind, before=before: throttled(kind) > before, f"{kind} throttled")
        # Lifted: the tunnel runs faster than the limit again (4 times its 16 messages a
        # second in some half second: a margin that holds on a busy machine).
        _reload(relay, base)
        wait_for(lambda: pump.received_since(time.monotonic() - 0.5) > 32, "full speed")
        # Budgets: a tiny one of each scope is spent at once.
        for key, scope in (
            ("key_daily", "key"),
            ("key_monthly", "key"),
            ("prefix_daily", "prefix"),
            ("prefix_monthly", "prefix"),
            ("total_monthly", "total"),
        ):
            _reload(relay, base + f'[budgets]\n{key} = 100000\naction = "refuse"\n')
            name = f'offset_relay_budget_over{{scope="{scope}"}}'
            wait_for(lambda name=name: value(name) >= 1, f"{key} spent")
        # The floor rate of a throttled budget, and the state file with its save interval.
        state = tmp_path / "usage.json"
        before = throttled("budget")
        _reload(
            relay,
            base + f'[budgets]\nkey_daily = 100000\naction = "throttle"\nfloor_rate = 65536\n'
            f'state_file = "{state}"\nsave_interval = 1\n',
        )
        try:
            wait_for(lambda: throttled("budget") > before, "the floor rate")
        except AssertionError:
            tail = "\n".join(line for line in relay.lines[-200:] if "DEBUG" not in line)
            raise AssertionError(f"no floor rate; the relay's log ends:\n{tail}") from None
        wait_for(state.exists, "the state file", timeout=10)
        # Refuse: a new tunnel of the connector's key is refused; the open one carries on.
        _reload(relay, base + '[budgets]\nkey_daily = 100000\naction = "refuse"\n')
        assert _refused(relay, connector.identity, listener.public_key)
        arrived = len(pump.arrivals)
        wait_for(lambda: len(pump.arrivals) > arrived + 10, "the open tunnel carrying on")
        assert value('offset_relay_connections_refused_total{limit="budget"}') == 1
        closes = [line for line in relay.lines if "tunnel_peer_closed" in line]
    finally:
        pump.stop()
        listener.close()
    assert closes == []


BAD_VALUES = [
    ("bandwidth", "connection_rate", "5"),
    ("bandwidth", "connection_burst", "-1"),
    ("bandwidth", "key_rate", "1.5"),
    ("bandwidth", "key_burst", "100"),
    ("bandwidth", "prefix_rate", '"fast"'),
    ("bandwidth", "prefix_burst", str(1 << 41)),
    ("bandwidth", "total_rate", "-100"),
    ("bandwidth", "total_burst", "true"),
    ("budgets", "key_daily", "-1"),
    ("budgets", "key_monthly", "2.5"),
    ("budgets", "prefix_daily", '"5 MB"'),
    ("budgets", "prefix_monthly", str(1 << 61)),
    ("budgets", "total_monthly", "-5"),
    ("budgets", "action", '"drop"'),
    ("budgets", "floor_rate", "100"),
    ("budgets", "state_file", '"usage.json"'),
    ("budgets", "save_interval", "0"),
]


@pytest.mark.parametrize(("table", "key", "bad"), BAD_VALUES)
def test_a_bad_value_stops_the_start_with_exit_78(tmp_path, table, key, bad):
    ident = tmp_path / "relay.ident"
    subprocess.run([BIN / "stmgr", "gen-ident", "--output", ident], check=True)
    config = tmp_path / "relay.toml"
    config.write_text(
        f'identity_file = "{ident}"\nlisten = ["127.0.0.1:0"]\n[{table}]\n{key} = {bad}\n'
    )
    proc = subprocess.run(
        [BIN / "strelay", "--config", config], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 78
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{config}: {table}.{key}:" in lines[0], proc.stderr


def test_a_bad_value_at_reload_leaves_the_running_relay_unchanged(relay_factory):
    relay = relay_factory(METRICS + "[bandwidth]\nconnection_rate = 262144\n")
    good = relay.config.read_text()
    base = good[: good.index("[bandwidth]")]
    address = metrics_address(relay)
    relay.client().close()
    listener, connector, acceptor = tunnel(relay)
    pump = Pump(connector, acceptor)
    name = 'offset_relay_throttled_seconds_total{kind="connection"}'
    try:
        for table, key, bad in BAD_VALUES:
            tables = {"bandwidth": {"connection_rate": "262144"}, "budgets": {}}
            tables[table][key] = bad
            text = "".join(
                f"[{t}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
                for t, keys in tables.items()
            )
            _reload(relay, base + text)
            failed = [line for line in relay.lines if "reload failed" in line][-1]
            assert f"keeping the running configuration: {relay.config}: {table}.{key}:" in failed
        # Still limited to the old rate: throttled time keeps growing, the tunnel is open.
        before = parse(scrape_text(address))[name]
        wait_for(lambda: parse(scrape_text(address))[name] > before, "the old limit at work")
        arrived = len(pump.arrivals)
        wait_for(lambda: len(pump.arrivals) > arrived + 4, "the tunnel carrying on")
    finally:
        pump.stop()
        listener.close()
    assert relay.log_text().count("reload failed") == len(BAD_VALUES)


def test_the_packaged_units_give_the_relay_a_state_directory():
    root = Path(__file__).resolve().parents[2]
    for unit in ("offset-relay.service", "offset-relay@.service"):
        assert re.search(
            r"^StateDirectory=offset-relay", (root / "systemd" / unit).read_text(), re.M
        )
