"""Shared test helpers: two protocol stacks talking through memory, and /metrics read as
numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from nacl.signing import SigningKey

from offset_appliance.wire.connection import Connection


def pair(now: float = 0.0, **kwargs) -> tuple[Connection, Connection]:
    """Two connections (a, b) with fresh identities, handshaken through memory; their timers
    are the original's exact ones unless ``timer_spread`` is given."""
    kwargs.setdefault("timer_spread", 0.0)
    a = Connection(SigningKey.generate(), now, **kwargs)
    b = Connection(SigningKey.generate(), now, **kwargs)
    for _ in range(4):
        exchange(a, b, now)
    return a, b


def deliver(src: Connection, dst: Connection, now: float) -> list[bytes]:
    """Move everything ``src`` has queued into ``dst``; returns what ``dst`` received."""
    data = b"".join(src.data_to_send())
    return dst.receive_data(data, now) if data else []


def exchange(a: Connection, b: Connection, now: float) -> tuple[list[bytes], list[bytes]]:
    """One round of delivery both ways: (received by a, received by b)."""
    to_b = deliver(a, b, now)
    to_a = deliver(b, a, now)
    return to_a, to_b


def metric_samples(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text exposition, by name with labels."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def scrape_url(url: str, timeout: float = 10.0) -> dict[str, float]:
    """The samples of the /metrics page at ``url``."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return metric_samples(response.read().decode())


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """Stop ``proc`` as a service manager would (SIGTERM, then SIGKILL after ``timeout``
    seconds); its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def run_local_play(
    playbook_bin: Path,
    folder: Path,
    play: list[dict],
    *args: str,
    variables: dict | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``play`` run by ``playbook_bin`` on localhost (local connection, this interpreter),
    from ``folder``, with ``variables`` as extra variables (above the role's defaults, as an
    inventory's would) and ``args`` before the playbook; returns the finished process."""
    import yaml

    (folder / "play.yml").write_text(yaml.safe_dump(play, sort_keys=False))
    extra: list[str] = []
    if variables is not None:
        (folder / "vars.json").write_text(json.dumps(variables))
        extra = ["-e", "@vars.json"]
    return subprocess.run(
        [
            str(playbook_bin),
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            *extra,
            *args,
            "play.yml",
        ],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_LOCALHOST_WARNING": "0",
            **(env or {}),
        },
    )
