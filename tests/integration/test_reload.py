"""A checked reload on a live relay: a bad value of any setting stops a start (exit 78) and
is refused at reload with the running configuration kept, and said once in the log, in
STATUS= and in /metrics; a good reload puts every change in force at once, tunnels open.

BAD_VALUES is the one list of every setting with a value the relay must refuse: a setting
added to the configuration gets its row here (test_every_setting_has_a_bad_value_row
fails until it has one).
"""

from __future__ import annotations

import os
import queue
import re
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from offset_appliance.client import ClientError
from offset_appliance.config import Config, config_values, load_config

from .conftest import BIN, RelayProcess
from .test_metrics import METRICS, metrics_address, parse, scrape_text

EX_CONFIG = 78
IDLE = 3600.0
BAD_FILE = "50-bad.toml"

# (setting, a value it must refuse as TOML, what the one-line error says about it)
BAD_VALUES = [
    ("identity_file", "42", "expected a path"),
    ("listen", '["relay.example:4567"]', "must be an IP address"),
    ("listen", "[]", "expected a list of addresses"),
    ("log_level", '"loud"', "expected one of debug, info, warning, error"),
    ("limits.max_connections", "0", "must be between 1 and"),
    ("limits.max_connections_per_ip", '"many"', "expected a number"),
    ("limits.max_handshakes", "70000", "must be between 1 and 65536"),
    ("limits.max_frame_length", "4095", "must be between 4096 and"),
    ("limits.max_half_tunnels_per_listener", "1025", "must be between 1 and 1024"),
    ("limits.max_half_tunnels_per_listener_per_ip", "0", "must be between 1 and 1024"),
    ("limits.half_tunnel_buffer", "1.5", "expected an integer"),
    ("limits.max_orphaned_bytes", "-1", "must be between 0 and"),
    ("limits.buffer_high_water", "1000", "must be below buffer_high_water"),
    ("limits.buffer_low_water", "2000000", "must be below buffer_high_water"),
    ("limits.new_connections_per_ip_per_second", "true", "expected a number"),
    ("limits.new_connections_per_ip_burst", "0", "must be between 1 and"),
    ("timeouts.conn_timeout", "0", "must be between 0.1 and"),
    ("timeouts.relay_conn_timeout", "nan", "expected a finite number"),
    ("timeouts.keepalive", "1.0", "must be between 2 and"),
    ("timeouts.half_tunnel", "1e9", "must be between 0.1 and"),
    ("timeouts.rekey_interval", '"hourly"', "expected a number"),
    ("metrics.enabled", '"yes"', "expected true or false"),
    ("metrics.listen", '"localhost:9477"', "must be an IP address"),
]
# The controls of who uses the relay: each row applies once the configuration has its key.
CONTROL_BAD_VALUES = [
    ("access.listen_allow", '["not-a-key"]', "is not a public key (43 base64url characters)"),
    ("access.listen_deny", '["/nonexistent/keys"]', "cannot read key file /nonexistent/keys"),
    ("access.connect_allow", '"abc"', "expected a list of strings"),
    ("access.connect_deny", "[1]", "expected a list of strings"),
    ("access.ip_allow", '["300.1.2.3"]', "is not an address or network"),
    ("access.ip_deny", '["2001:db8::/129"]', "is not an address or network"),
    ("limits.ipv4_prefix", "7", "must be between 8 and 32"),
    ("limits.ipv6_prefix", "129", "must be between 16 and 128"),
    ("limits.max_memory", "-1", "must be between 0 and"),
    ("limits.memory_low_mark", "1.5", "expected an integer"),
    ("bans.enabled", "1", "expected true or false"),
    ("bans.threshold", "0", "must be between 1 and"),
    ("bans.window", "0", "must be between 0.1 and"),
    ("bans.ban_time", "-1", "must be between 0.1 and"),
    ("bans.multiplier", "0.5", "must be between 1 and 1000"),
    ("bans.max_ban_time", "0.01", "must be between 0.1 and"),
    ("bans.forget_after", '"day"', "expected a number"),
    ("bans.table_size", "15", "must be between 16 and"),
    ("bandwidth.connection_rate", "100", "must be 0 (no limit) or between 1024 and"),
    ("bandwidth.connection_burst", "100", "must be 0 (no limit) or between 4096 and"),
    ("bandwidth.key_rate", "1.5", "expected an integer"),
    ("bandwidth.key_burst", "-1", "must be 0 (no limit) or between 4096 and"),
    ("bandwidth.prefix_rate", '"fast"', "expected a number"),
    ("bandwidth.prefix_burst", "1e20", "expected an integer"),
    ("bandwidth.total_rate", str(1 << 41), "must be 0 (no limit) or between 1024 and"),
    ("bandwidth.total_burst", "true", "expected a number"),
    ("budgets.key_daily", "-1", "must be 0 (no budget) or between 1 and"),
    ("budgets.key_monthly", "1.5", "expected an integer"),
    ("budgets.prefix_daily", '"1G"', "expected a number"),
    ("budgets.prefix_monthly", str(1 << 61), "must be 0 (no budget) or between 1 and"),
    ("budgets.total_monthly", "-5", "must be 0 (no budget) or between 1 and"),
    ("budgets.action", '"drop"', "expected one of throttle, refuse"),
    ("budgets.floor_rate", "10", "must be 0 (not slowed) or between 1024 and"),
    ("budgets.state_file", '"relative.json"', "expected an absolute path"),
    ("budgets.save_interval", "0.5", "must be between 1 and 86400 seconds"),
]
_SETTINGS = set(
    config_values(Config(identity_file=Path("/relay.ident"), listen=(("127.0.0.1", 0),)))
)
BAD_VALUES += [row for row in CONTROL_BAD_VALUES if row[0] in _SETTINGS]


def _drop_in(setting: str, value: str) -> str:
    table, _, key = setting.rpartition(".")
    return f"[{table}]\n{key} = {value}\n" if table else f"{setting} = {value}\n"


ROW_IDS = [f"{setting}={value}" for setting, value, _says in BAD_VALUES]


def test_every_setting_has_a_bad_value_row(tmp_path):
    config = tmp_path / "relay.toml"
    config.write_text('identity_file = "id"\nlisten = ["127.0.0.1:0"]\n')
    settings = set(config_values(load_config(config)))
    assert settings - {setting for setting, _value, _says in BAD_VALUES} == set()


@pytest.fixture(scope="module")
def start_ident(tmp_path_factory) -> Path:
    """One identity for every start row: each row's own start reads it (and stops at the
    row's bad value), so the rows need not make one each."""
    ident = tmp_path_factory.mktemp("start") / "relay.ident"
    subprocess.run([BIN / "stmgr", "gen-ident", "--output", ident], check=True)
    return ident


@pytest.mark.parametrize("setting,value,says", BAD_VALUES, ids=ROW_IDS)
def test_a_bad_value_stops_the_start_with_one_line(tmp_path, start_ident, setting, value, says):
    ident = start_ident
    config = tmp_path / "relay.toml"
    config.write_text(f'identity_file = "{ident}"\nlisten = ["127.0.0.1:0"]\n')
    (tmp_path / "relay.d").mkdir()
    (tmp_path / "relay.d" / BAD_FILE).write_text(_drop_in(setting, value))
    result = subprocess.run(
        [BIN / "strelay", "--config", config], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == EX_CONFIG, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{tmp_path / 'relay.d' / BAD_FILE}: {setting}" in lines[0]
    assert says in lines[0]


class Notifications:
    """A NOTIFY_SOCKET of our own: what the relay tells systemd. A thread reads every message
    at once, as systemd does; reading one closes the descriptors it carries, among them the
    pipe of a BARRIER=1, which answers the barrier: the relay need not wait out its barrier
    timeout when it stores its listening sockets at start and hands over at stop."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="notify", dir="/tmp")
        self.path = os.path.join(self.dir, "s")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self._statuses: queue.Queue[str] = queue.Queue()
        self._open = True
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while self._open:
            try:
                message = self.sock.recv(65536).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            for line in message.splitlines():
                if line.startswith("STATUS="):
                    self._statuses.put(line[7:])

    def statuses(self, timeout: float = 10.0, until=lambda s: True) -> str:
        """The STATUS= lines received until one satisfies ``until``; returns that one."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                status = self._statuses.get(timeout=left)
            except queue.Empty:
                break
            if until(status):
                return status
        raise AssertionError("no such STATUS= line")

    def close(self) -> None:
        self._open = False
        self._reader.join(5)
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


class LiveRelay:
    """A relay with metrics, a notify socket and an open tunnel, reloaded by the unit's way:
    ``strelay --reload PID``."""

    def __init__(self, directory: Path, monkeypatch) -> None:
        self.notify = Notifications()
        with monkeypatch.context() as env:
            env.setenv("NOTIFY_SOCKET", self.notify.path)
            # The listener stays idle through every test of the module: a keepalive timeout
            # longer than the module runs, on both sides.
            self.relay = RelayProcess(directory, METRICS + f"[timeouts]\nkeepalive = {IDLE}\n")
        self.metrics = metrics_address(self.relay)
        self.drop_ins = directory / "relay.d"
        self.drop_ins.mkdir()
        listener_id = SigningKey.generate()
        self.listener = self.relay.client(listener_id, keepalive=IDLE)
        self.listener.listen()
        self.connector = self.relay.client(keepalive=IDLE)
        self.connector.connect(self.listener.public_key)
        assert self.listener.next_incoming() == self.connector.public_key
        self.acceptor = self.relay.client(listener_id, keepalive=IDLE)
        self.acceptor.accept(self.connector.public_key)

    def reload(self) -> subprocess.CompletedProcess:
        """``strelay --reload`` as ExecReload runs it; returns once the relay has reloaded."""
        done = self.relay.log_text().count("reload failed") + self.relay.log_text().count(
            "configuration reloaded"
        )
        result = subprocess.run(
            [BIN / "strelay", "--reload", str(self.relay.proc.pid), "--config", self.relay.config],
            capture_output=True,
            text=True,
            timeout=30,
        )
        deadline = time.monotonic() + 15
        while (
            self.relay.log_text().count("reload failed")
            + self.relay.log_text().count("configuration reloaded")
            == done
        ):
            assert time.monotonic() < deadline, "no reload:\n" + self.relay.log_text()
            time.sleep(0.02)
        return result

    def values(self) -> dict[str, float]:
        return parse(scrape_text(self.metrics))

    def tunnel_works(self) -> None:
        payload = os.urandom(4096)
        self.connector.send(payload)
        assert self.acceptor.receive(10) == payload
        self.acceptor.send(payload[::-1])
        assert self.connector.receive(10) == payload[::-1]

    def stop(self) -> None:
        for client in (self.listener, self.connector, self.acceptor):
            client.close()
        self.relay.stop()
        self.notify.close()
        assert "Traceback" not in self.relay.log_text(), self.relay.log_text()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    relay = LiveRelay(tmp_path_factory.mktemp("live"), monkeypatch)
    yield relay
    relay.stop()


@pytest.mark.parametrize("setting,value,says", BAD_VALUES, ids=ROW_IDS)
def test_a_bad_value_at_reload_keeps_the_running_relay(live, setting, value, says):
    relay = live.relay
    bad = live.drop_ins / BAD_FILE
    bad.write_text(_drop_in(setting, value))
    before = len(relay.lines)
    try:
        result = live.reload()
        # systemctl reload fails: ExecReload's own check says why and exits 78.
        assert result.returncode == EX_CONFIG, result.stderr
        assert f"{bad}: {setting}" in result.stderr and says in result.stderr
        # The relay heard of it and refused it in one line naming the file and the setting.
        lines = relay.lines[before:]
        failed = [line for line in lines if "reload" in line]
        assert len(failed) == 1, lines
        assert "reload failed, keeping the running configuration: " in failed[0]
        assert f"{bad}: {setting}" in failed[0] and says in failed[0]
        status = live.notify.statuses(until=lambda s: s.startswith("reload failed: "))
        assert f"{bad}: {setting}" in status
        values = live.values()
        assert values["offset_relay_config_last_reload_successful"] == 0
        live.tunnel_works()
    finally:
        bad.unlink()
    good_since = values["offset_relay_config_last_reload_success_timestamp_seconds"]
    before = len(relay.lines)
    assert live.reload().returncode == 0
    # Nothing of the bad file was applied: the good file's reload finds nothing to change.
    assert any("configuration reloaded: nothing changed" in line for line in relay.lines[before:])
    assert not any(" -> " in line for line in relay.lines[before:]), relay.lines[before:]
    values = live.values()
    assert values["offset_relay_config_last_reload_successful"] == 1
    assert values["offset_relay_config_last_reload_success_timestamp_seconds"] > good_since
    live.notify.statuses(until=lambda s: not s.startswith("reload failed"))
    live.tunnel_works()
    assert relay.proc.poll() is None


def _connects(relay: RelayProcess) -> bool:
    try:
        relay.client().close()
    except ClientError:
        return False
    return True


def test_a_good_reload_applies_every_change_at_once_with_tunnels_open(live):
    relay = live.relay
    change = live.drop_ins / "60-change.toml"
    # The tunnel holds three connections: room for none more.
    change.write_text('log_level = "warning"\n[limits]\nmax_connections = 3\n')
    before = len(relay.lines)
    try:
        assert live.reload().returncode == 0
        lines = relay.lines[before:]
        assert "reload: limits.max_connections 20000 -> 3" in "\n".join(lines)
        assert "reload: limits.max_handshakes 512 -> 3" in "\n".join(lines)
        assert "reload: log_level debug -> warning" in "\n".join(lines)
        assert any("configuration reloaded: 3 settings changed" in line for line in lines)
        assert not _connects(relay)
        live.tunnel_works()
        assert live.values()["offset_relay_config_last_reload_successful"] == 1
    finally:
        change.unlink()
    before = len(relay.lines)
    assert live.reload().returncode == 0
    # Said though the running level (warning) hides info lines: the new one (debug) does not.
    assert "reload: limits.max_connections 3 -> 20000" in "\n".join(relay.lines[before:])
    assert "reload: log_level warning -> debug" in "\n".join(relay.lines[before:])
    assert _connects(relay)
    live.tunnel_works()


def test_a_file_with_one_bad_value_applies_none_of_its_good_ones(live):
    relay = live.relay
    change = live.drop_ins / "60-change.toml"
    change.write_text("[limits]\nmax_connections = 3\n[timeouts]\nkeepalive = 0.5\n")
    try:
        assert live.reload().returncode == EX_CONFIG
        assert live.values()["offset_relay_config_last_reload_successful"] == 0
        # max_connections = 3 is not in force: a fourth connection gets in.
        assert _connects(relay)
        live.tunnel_works()
    finally:
        change.unlink()
    assert live.reload().returncode == 0


def test_restart_only_settings_stay_and_the_rest_applies(live):
    relay = live.relay
    change = live.drop_ins / "60-change.toml"
    change.write_text('listen = ["127.0.0.1:1"]\n[timeouts]\nhalf_tunnel = 20.0\n')
    before = len(relay.lines)
    try:
        assert live.reload().returncode == 0
        text = "\n".join(relay.lines[before:])
        assert "listen changed in the configuration; this takes a restart" in text
        assert "reload: timeouts.half_tunnel 32.0 -> 20.0" in text
        assert not re.search(r"reload: listen .* -> ", text), text
        assert _connects(relay)  # still on the old address
    finally:
        change.unlink()
    assert live.reload().returncode == 0


def test_reload_of_a_process_that_is_gone_is_one_line(tmp_path):
    config = tmp_path / "relay.toml"
    ident = tmp_path / "relay.ident"
    subprocess.run([BIN / "stmgr", "gen-ident", "--output", ident], check=True)
    config.write_text(f'identity_file = "{ident}"\nlisten = ["127.0.0.1:0"]\n')
    gone = subprocess.Popen(["true"])
    gone.wait()
    result = subprocess.run(
        [BIN / "strelay", "--reload", str(gone.pid), "--config", config],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 69
    assert result.stderr == f"strelay: --reload {gone.pid}: no such process\n"


def test_the_listener_still_gets_connects_after_the_reloads(live):
    """A reload does not disturb who is listening: a new connect still reaches the listener."""
    connector = live.relay.client(SigningKey.generate())
    try:
        connector.connect(live.listener.public_key)
        assert live.listener.next_incoming() == connector.public_key
    finally:
        connector.close()
