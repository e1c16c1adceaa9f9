"""The original operator documentation, word for word, then `stmgr probe` on its ticket."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def _free_port() -> int:
    """A port free on every address and below the kernel's ephemeral range: the relay binds
    0.0.0.0, and tests running beside this one take their client ports from that range, so
    a port picked there can be taken between this check and the relay's bind."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = list(range(10000, low)) if low > 10100 else []
    for port in random.sample(candidates, min(200, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("relay never listened")


SEED = """
# Public facing relay address
RELAY_ADDRESS="127.0.0.1"

# Public facing relay port
RELAY_PORT={port}

# Create a directory for the relay's data
mkdir relay

# Generate a new identity for the relay
stmgr gen-ident --output relay/relay.ident

# Generate relay ticket
stmgr relay-ticket \\
        --address $RELAY_ADDRESS:$RELAY_PORT \\
        --idfile relay/relay.ident \\
        --output relay/relay.relay

# Start the relay:
strelay --idfile relay/relay.ident --laddr 0.0.0.0:$RELAY_PORT &
echo $! > relay.pid
"""


def test_seed_workflow_verbatim_then_probe(tmp_path):
    port = _free_port()
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    script = tmp_path / "seed.sh"
    script.write_text(SEED.format(port=port))
    subprocess.run(["bash", "-e", script], cwd=tmp_path, env=env, check=True)
    pid = int((tmp_path / "relay.pid").read_text())
    try:
        ident = json.loads((tmp_path / "relay/relay.ident").read_text())
        assert list(ident) == ["privateKey"]
        assert (tmp_path / "relay/relay.ident").stat().st_mode & 0o777 == 0o600
        ticket = json.loads((tmp_path / "relay/relay.relay").read_text())
        assert ticket["address"] == f"127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            probe = subprocess.run(
                [BIN / "stmgr", "probe", tmp_path / "relay/relay.relay", "--timeout", "5"],
                capture_output=True,
                text=True,
            )
            if probe.returncode != 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)  # the relay may still be starting
        assert probe.returncode == 0, probe.stderr
        lines = probe.stdout.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("OK relay 127.0.0.1:"), probe.stdout
        assert "handshake" in lines[0] and "round trip" in lines[0]
    finally:
        os.kill(pid, 15)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)


def test_probe_exit_codes(tmp_path, relay):
    import base64

    def ticket(address: str, key: bytes) -> Path:
        path = tmp_path / f"t{len(list(tmp_path.iterdir()))}.relay"
        body = {
            "publicKey": base64.urlsafe_b64encode(key).rstrip(b"=").decode(),
            "address": address,
        }
        path.write_text(json.dumps(body))
        return path

    def probe(path: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [BIN / "stmgr", "probe", path, "--timeout", "5", *extra], capture_output=True, text=True
        )

    good = ticket(f"127.0.0.1:{relay.port}", relay.public_key)
    assert probe(good).returncode == 0
    wrong_key = probe(ticket(f"127.0.0.1:{relay.port}", os.urandom(32)))
    assert wrong_key.returncode == 1 and "different public key" in wrong_key.stderr
    unreachable = probe(ticket(f"127.0.0.1:{_free_port()}", relay.public_key))
    assert unreachable.returncode == 2 and unreachable.stderr.startswith("UNREACHABLE")
    prom = probe(good, "--format", "prometheus")
    assert prom.returncode == 0
    assert f'offset_relay_probe_success{{address="127.0.0.1:{relay.port}"}} 1' in prom.stdout
