"""Real ``strelay`` processes on loopback, and clients that talk to them over real sockets."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from offset_appliance.client import RelayClient
from offset_appliance.files import load_identity
from tests.helpers import stop_process

BIN = Path(sys.executable).parent


class RelayProcess:
    """A running strelay, its address, its public key and its log lines."""

    def __init__(
        self,
        tmp: Path,
        settings: str = "",
        extra_args: tuple[str, ...] = (),
        prefix: tuple[str, ...] = (),
    ) -> None:
        """``prefix``: a command the relay's is run by (``sh -c '...; exec "$@"'``)."""
        self.dir = tmp
        self.ident = tmp / "relay.ident"
        if not self.ident.exists():
            subprocess.run([BIN / "stmgr", "gen-ident", "--output", self.ident], check=True)
        self.public_key = bytes(load_identity(self.ident, check_permissions=False).verify_key)
        self.config = tmp / "relay.toml"
        self.config.write_text(
            f'identity_file = "{self.ident}"\nlisten = ["127.0.0.1:0"]\nlog_level = "debug"\n'
            + settings
        )
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [*prefix, BIN / "strelay", "--config", self.config, *extra_args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = self._wait_port()
        self.address = ("127.0.0.1", self.port)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def _wait_port(self) -> int:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
                if match:
                    return int(match.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError("strelay exited: " + "\n".join(self.lines))
            time.sleep(0.02)
        raise RuntimeError("strelay did not start: " + "\n".join(self.lines))

    def client(self, identity=None, **kwargs) -> RelayClient:
        """A connected, handshaken client that checks the relay's key."""
        return RelayClient.open(
            self.address, identity, expected_key=self.public_key, timeout=10.0, **kwargs
        )

    def rss_kib(self) -> int:
        """Resident memory of the relay process."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def log_text(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> int:
        stop_process(self.proc)
        self._reader.join(5)
        return self.proc.returncode


def wait_for(condition, what: str, timeout: float = 15.0):
    """Poll until ``condition()`` is true (a wait for an event, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def relay_factory(tmp_path):
    """Start relays with extra TOML settings; all are stopped at the end of the test."""
    started: list[RelayProcess] = []

    def start(
        settings: str = "", name: str = "relay", prefix: tuple[str, ...] = ()
    ) -> RelayProcess:
        directory = tmp_path / f"{name}{len(started)}"
        directory.mkdir()
        relay = RelayProcess(directory, settings, prefix=prefix)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()
        assert "Traceback" not in relay.log_text(), relay.log_text()


@pytest.fixture
def relay(relay_factory):
    """One relay with default settings."""
    return relay_factory()


def tunnel(relay: RelayProcess, listener_id=None, connector_id=None):
    """Listen, connect, accept: returns (listen_conn, connector, acceptor)."""
    from nacl.signing import SigningKey

    listener_id = listener_id or SigningKey.generate()
    listener = relay.client(listener_id)
    listener.listen()
    connector = relay.client(connector_id)
    connector.connect(listener.public_key)
    assert listener.next_incoming() == connector.public_key
    acceptor = relay.client(listener_id)
    acceptor.accept(connector.public_key)
    return listener, connector, acceptor


os.environ.pop("NOTIFY_SOCKET", None)
