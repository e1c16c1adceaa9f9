"""The wall clock stepped forward and back by hours under a live relay while tunnels carry
(libfaketime moves only the relay's CLOCK_REALTIME; its monotonic clock is the real one).

Its timers run on the monotonic clock: a live tunnel and an idle listener that keeps the
keepalive rule are never closed, and a silent connection opened just before each step is
closed one keepalive timeout after it fell silent, neither early nor late. Its budget
periods follow UTC days and months: the clock runs across a month's last midnight (one new
period), is stepped back three hours (said once; counting goes on in the new period, nothing
is reset) and forward again (no second new period), and the state file's counts hold every
byte read since that midnight once.

Needs Debian's faketime package (tools/install-deps installs it); skipped without it.
"""

from __future__ import annotations

import calendar
import contextlib
import json
import os
import threading
import time
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from offset_appliance.client import ClientError, ConnectionClosed, RelayClient

from ..integration.conftest import tunnel
from .relaylib import METRICS

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
KEEPALIVE = 6.0
# The bound on a keepalive close's lateness: the relay's loop wakes for timers, a second
# at worst (TIMER_SLACK), and the test polls.
LATE = 1.5
NOISE = os.urandom(8184)
MIDNIGHT = calendar.timegm(time.strptime("2027-01-01T00:00:00", "%Y-%m-%dT%H:%M:%S"))


class Clock:
    """The relay's wall clock: an offset from the real one, in a file libfaketime reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.set(0.0)

    def set(self, offset: float) -> None:
        self.offset = offset
        self.path.write_text(f"{offset:+.3f}\n")

    def at(self, moment: float) -> None:
        """Make the relay's clock read ``moment`` now."""
        self.set(moment - time.time())

    def step(self, seconds: float) -> None:
        self.set(self.offset + seconds)

    def now(self) -> float:
        return time.time() + self.offset


class Traffic(threading.Thread):
    """Numbered messages both ways through one tunnel, each checked on arrival, and an idle
    listener kept alive; any close or mismatch is recorded."""

    def __init__(self, ends) -> None:
        super().__init__(daemon=True)
        self.listener, self.connector, self.acceptor = ends
        self.stop = threading.Event()
        self.carried = 0  # payload bytes, both ways
        self.failure: str | None = None

    def run(self) -> None:
        number = 0
        try:
            while not self.stop.is_set():
                for sender, receiver in (
                    (self.connector, self.acceptor),
                    (self.acceptor, self.connector),
                ):
                    # 8 KiB that do not pack smaller (the relay counts bytes on the wire).
                    message = number.to_bytes(8, "big") + NOISE
                    sender.send(message)
                    got = receiver.receive(timeout=10)
                    if got != message:
                        self.failure = f"message {number}: got {got[:8].hex()}"
                        return
                    self.carried += len(message)
                    number += 1
                with contextlib.suppress(ClientError):
                    self.listener.receive(timeout=0.02)  # runs its timers: keepalives
        except (ConnectionClosed, OSError) as exc:
            self.failure = f"closed: {exc}"
        except ClientError as exc:
            if "timed out" not in str(exc):
                self.failure = str(exc)


def silent(relay) -> tuple[RelayClient, float]:
    """A listener that then says nothing (not even keepalives), and when it fell silent: the
    moment before its last message (the listen) is sent, which the relay cannot have heard
    earlier (taken after the send, the relay may already have read it a few ms before)."""
    client = RelayClient.open(
        relay.address, SigningKey.generate(), expected_key=relay.public_key, timeout=10
    )
    since = time.monotonic()
    client.listen()
    return client, since


def closed_after(client: RelayClient, since: float) -> float:
    """Seconds from ``since`` until the relay closes ``client`` (read without answering)."""
    sock = client.sock
    sock.settimeout(KEEPALIVE * 3)
    while sock.recv(1 << 16):
        pass
    return time.monotonic() - since


def test_clock_steps_move_no_timer_and_budget_periods_follow_utc_days_once(relay_factory, tmp_path):
    if not LIBFAKETIME.exists():
        pytest.skip("needs libfaketime (Debian package faketime)")
    clock = Clock(tmp_path / "faketime")
    state = tmp_path / "usage.json"
    clock.at(MIDNIGHT - 4)  # four seconds before a month's last midnight
    relay = relay_factory(
        METRICS + f"[timeouts]\nkeepalive = {KEEPALIVE}\n"
        f'[budgets]\ntotal_monthly = {10**13}\nstate_file = "{state}"\nsave_interval = 1\n',
        prefix=(
            "env",
            f"LD_PRELOAD={LIBFAKETIME}",
            f"FAKETIME_TIMESTAMP_FILE={clock.path}",
            "FAKETIME_NO_CACHE=1",
            "FAKETIME_DONT_FAKE_MONOTONIC=1",
        ),
    )
    ends = tunnel(relay)
    traffic = Traffic(ends)
    traffic.start()
    waits: dict[str, float] = {}
    try:
        # Across midnight: one new period.
        deadline = time.monotonic() + 20
        while not any("budgets: a new period, 2027-01-01" in line for line in relay.lines):
            assert time.monotonic() < deadline, "no new period at midnight"
            assert traffic.failure is None, traffic.failure
            time.sleep(0.1)
        carried_at_midnight = traffic.carried
        # Each step with a silent connection opened just before it.
        for name, step in (("back 3 h", -3 * 3600.0), ("forward 3 h 30 min", 3.5 * 3600.0)):
            quiet, since = silent(relay)
            time.sleep(1)
            clock.step(step)
            waits[name] = closed_after(quiet, since)
            quiet.close()
            assert KEEPALIVE <= waits[name] <= KEEPALIVE + LATE, (name, waits[name])
            assert traffic.failure is None, traffic.failure
    finally:
        traffic.stop.set()
        traffic.join(15)
    try:
        assert traffic.failure is None, traffic.failure
        carried = traffic.carried
        # Traffic stopped: the next saves hold every byte read (a save adds the pending ones).
        time.sleep(2.5)
        document = json.loads(state.read_text())
    finally:
        for end in ends:
            end.close()
    lines = relay.lines
    assert sum("budgets: a new period" in line for line in lines) == 1, lines
    behind = [line for line in lines if "budgets: the clock reads" in line]
    assert (
        len(behind) == 1 and "2026-12-31, before the current period's day 2027-01-01" in (behind[0])
    )
    assert not any("keepalive_timeout" in line and "tunnel" in line for line in lines)
    assert (document["day"], document["month"]) == ("2027-01-01", "2027-01")
    # Every byte read since the new period began is counted in it, through both steps (a
    # reset would lose them), and none twice: at most what was read in the whole run, its
    # frames' overhead included (the relay counts bytes read, the test payload).
    month = document["total"][1]
    assert month >= carried - carried_at_midnight, (month, carried, carried_at_midnight)
    assert month <= carried * 1.05, (month, carried)
    assert document["total"][0] == month
