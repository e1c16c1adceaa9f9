"""A real strelay handing its connections over to the next one, through a descriptor store
speaking sd_notify (as systemd's), and the same SIGTERM without a service manager."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from offset_appliance.client import ConnectionClosed

from ..unit.test_handover import FakeStore
from .conftest import BIN, RelayProcess, tunnel
from .test_metrics import METRICS, parse, scrape_text

# Starts strelay as systemd would with a store: the stored descriptors from 3 on, named.
EXEC_WITH_FDS = """
import os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
for index, fd in enumerate(fds):
    os.dup2(fd, 3 + index, inheritable=True)
os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=sys.argv[2], LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[3], sys.argv[3:])
"""


class Strelay:
    """strelay with a config on a fixed address, its log collected."""

    def __init__(self, argv: list[str], env: dict[str, str], pass_fds=()) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            argv, env=env, stderr=subprocess.PIPE, text=True, pass_fds=pass_fds
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"no {text!r} in:\n" + "\n".join(self.lines))
            time.sleep(0.02)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(15)
        self._reader.join(5)
        return code


@pytest.fixture
def store(tmp_path):
    made = FakeStore(tmp_path / "notify")
    yield made
    made.close()


def _config(tmp_path: Path, relay: RelayProcess) -> Path:
    """The first relay's config with the port it got written in (a restart keeps it)."""
    config = tmp_path / "fixed.toml"
    config.write_text(relay.config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{relay.port}"))
    return config


def test_strelay_hands_over_to_the_next_process_and_a_tunnel_carries_on(tmp_path, store):
    first = RelayProcess(tmp_path)
    config = _config(tmp_path, first)
    first.stop()
    env = dict(os.environ, NOTIFY_SOCKET=store.path)
    old = Strelay([str(BIN / "strelay"), "--config", str(config)], env)
    old.wait_for("relay public key")
    listener, connector, acceptor = tunnel(first)
    connector.send(b"before")
    assert acceptor.receive() == b"before"
    assert old.stop() == 0
    assert any("handed over 3 connections" in line for line in old.lines), old.lines
    connector.send(b"while no relay runs")  # waits in the kernel for the next process
    names = [name for name, _ in store.fds]
    assert sorted(set(names)) == ["conn", "listen", "state"] and names.count("conn") == 3
    new = _inheriting(store, config, env)
    try:
        new.wait_for("hand-over: 3 connections restored")
        assert acceptor.receive(10) == b"while no relay runs"
        acceptor.send(b"and back")
        assert connector.receive(10) == b"and back"
        time.sleep(0.2)
        # The store gave the connections and the state back; it keeps the listening socket.
        assert [name for name, _ in store.fds] == ["listen"]
    finally:
        assert new.stop() == 0
    for client in (listener, connector, acceptor):
        client.close()
    assert not any("Traceback" in line for line in old.lines + new.lines)


def test_without_a_service_manager_sigterm_closes_every_connection(relay):
    listener, connector, acceptor = tunnel(relay)
    assert relay.stop() == 0
    for client in (listener, connector, acceptor):
        with pytest.raises(ConnectionClosed):
            client.receive(5)
    assert not any("handed over" in line for line in relay.lines)
    assert any("stopped" in line for line in relay.lines)


def _inheriting(store: FakeStore, config: Path, env: dict[str, str]) -> Strelay:
    """strelay started as systemd starts it with what the store holds."""
    names = [name for name, _ in store.fds]
    fds = [fd for _, fd in store.fds]
    return Strelay(
        [
            sys.executable,
            "-c",
            EXEC_WITH_FDS,
            ",".join(map(str, fds)),
            ":".join(names),
            str(BIN / "strelay"),
            "--config",
            str(config),
        ],
        env,
        pass_fds=fds,
    )


def _reload_verdict(relay: Strelay) -> float:
    match = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", "\n".join(relay.lines))
    assert match, relay.lines
    values = parse(scrape_text(("127.0.0.1", int(match.group(1)))))
    return values["offset_relay_config_last_reload_successful"]


def test_a_restart_with_a_bad_drop_in_serves_on_with_the_handed_over_config(tmp_path, store):
    first = RelayProcess(tmp_path)
    config = _config(tmp_path, first)
    config.write_text(config.read_text() + METRICS)
    first.stop()
    env = dict(os.environ, NOTIFY_SOCKET=store.path)
    old = Strelay([str(BIN / "strelay"), "--config", str(config)], env)
    old.wait_for("relay public key")
    listener, connector, acceptor = tunnel(first)
    assert old.stop() == 0
    # A typo in a drop-in, then the restart.
    drop_in = tmp_path / "fixed.d" / "50-typo.toml"
    drop_in.parent.mkdir()
    drop_in.write_text('[limits]\nmax_connections = "many"\n')
    new = _inheriting(store, config, env)
    try:
        new.wait_for("metrics on http://")
        errors = [line for line in new.lines if "configuration not loaded" in line]
        assert len(errors) == 1 and errors[0].endswith(
            f"configuration not loaded: {drop_in}: limits.max_connections: "
            "expected a number, got 'many'; serving with the configuration of the previous "
            "process (the hand-over's) until a reload or restart reads good files"
        ), new.lines
        assert any("hand-over: 3 connections restored" in line for line in new.lines)
        connector.send(b"after the restart")
        assert acceptor.receive(10) == b"after the restart"
        # READY=1 follows the start lines: wait for the new process's.
        deadline = time.monotonic() + 10
        while not [m for m in store.messages if "READY=1" in m and "configuration not" in m]:
            assert time.monotonic() < deadline, store.messages
            time.sleep(0.05)
        statuses = [m for m in store.messages if "STATUS=" in m and "READY=1" in m]
        assert "STATUS=configuration not loaded, serving the hand-over's: " in statuses[-1]
        assert _reload_verdict(new) == 0
        # The drop-in fixed, a reload applies the files.
        drop_in.write_text("[limits]\nmax_connections = 77\n")
        new.proc.send_signal(signal.SIGHUP)
        new.wait_for("configuration reloaded")
        assert any("limits.max_connections 20000 -> 77" in line for line in new.lines)
        assert _reload_verdict(new) == 1
        acceptor.send(b"and back")
        assert connector.receive(10) == b"and back"
    finally:
        assert new.stop() == 0
    for client in (listener, connector, acceptor):
        client.close()
    assert not any("Traceback" in line for line in old.lines + new.lines)


def test_a_start_with_a_bad_file_and_no_hand_over_fails_as_before(tmp_path, store):
    first = RelayProcess(tmp_path)
    config = _config(tmp_path, first)
    first.stop()
    config.write_text(config.read_text() + '[limits]\nmax_connections = "many"\n')
    env = dict(os.environ, NOTIFY_SOCKET=store.path)
    result = subprocess.run(
        [BIN / "strelay", "--config", config], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 78
    assert result.stderr.count("\n") == 1 and "limits.max_connections" in result.stderr
