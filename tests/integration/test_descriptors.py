"""The relay's descriptor limit: raised to what max_connections needs, and one warning when
even the hard limit is below it (a relay run by hand from a shell starts at 1,024)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from offset_appliance.relay.descriptors import needed
from offset_appliance.wire.messages import Listen, encode_init_connection

from .conftest import wait_for

pytestmark = pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit")


def _soft_limit(pid: int) -> int:
    text = Path(f"/proc/{pid}/limits").read_text()
    match = re.search(r"Max open files\s+(\d+)", text)
    assert match is not None
    return int(match.group(1))


def test_a_relay_started_at_a_shells_soft_limit_raises_it(relay_factory):
    relay = relay_factory(
        "[limits]\nmax_connections = 1000\n", prefix=("prlimit", "--nofile=64:20000", "--")
    )
    assert _soft_limit(relay.proc.pid) == needed(1000)
    # More connections than the soft limit it was started with, all served.
    clients = [relay.client() for _ in range(100)]
    for client in clients:
        client.send(encode_init_connection(Listen()))
    probe = relay.client()  # the 101st still gets its handshake
    probe.close()
    for client in clients:
        client.close()
    assert "descriptors" not in relay.log_text()


def test_a_hard_limit_below_max_connections_is_named_once(relay_factory):
    relay = relay_factory(
        "[limits]\nmax_connections = 5000\n", prefix=("prlimit", "--nofile=256:2048", "--")
    )
    assert _soft_limit(relay.proc.pid) == 2048
    line = wait_for(
        lambda: next((x for x in relay.lines if "RLIMIT_NOFILE" in x), None), "the warning"
    )
    assert "WARNING" in line and "max_connections is 5000" in line
    assert "may open only 2,048 descriptors" in line and "LimitNOFILE=" in line
    assert sum("RLIMIT_NOFILE" in x for x in relay.lines) == 1
    # It still serves.
    client = relay.client()
    client.close()
