"""Out of file descriptors, a scrape waiting on ``/metrics`` must not make the relay spin:
its listening socket is paused with the relay's own, then looked at again."""

from __future__ import annotations

import os
import resource
import socket
import time

from offset_appliance.wire.connection import VERSION_FRAME

from .relaylib import assert_probe_passes, assert_relay_clean, metrics_address, scrape, settings

# CPU the relay may use in a second while out of descriptors with a scrape waiting: a turn
# of the loop every 0.1 s, not a busy loop (which takes all the CPU it is given).
CPU_BOUND = 0.1


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_waiting_scrape_does_not_spin_the_loop_when_out_of_descriptors(relay_factory):
    relay = relay_factory(settings())
    pid = relay.proc.pid
    scrape(relay)  # the endpoint works
    original = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    waiting: list[socket.socket] = []
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use, original[1]))
    try:
        # Take whatever descriptors are left (numbers below the limit may be free) with
        # connections to the relay, until it says it is out of them.
        deadline = time.monotonic() + 30
        while "out of file descriptors" not in relay.log_text():
            assert time.monotonic() < deadline, "the relay never ran out of descriptors"
            sock = socket.create_connection(relay.address, timeout=5)
            sock.sendall(VERSION_FRAME)
            waiting.append(sock)
            time.sleep(0.05)
        # Scrapes the relay cannot accept: its listening socket stays readable.
        for _ in range(3):
            waiting.append(socket.create_connection(metrics_address(relay), timeout=5))
        time.sleep(0.3)
        before = _cpu_seconds(pid)
        time.sleep(1.0)
        used = _cpu_seconds(pid) - before
        assert used < CPU_BOUND, f"the relay used {used:.2f} s of CPU in 1 s: a busy loop"
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, original)
        for sock in waiting:
            sock.close()
    # Descriptors are back: scrapes and the relay are served again.
    deadline = time.monotonic() + 10
    while True:
        try:
            values = scrape(relay)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert values
    assert_probe_passes(relay)
    assert_relay_clean(relay)
