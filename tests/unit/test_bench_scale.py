"""Test 10's plan: how many relay instances a connection count needs under a descriptor
limit, and the loopback source addresses its clients connect from."""

from __future__ import annotations

from bench.scenarios import SCALE_SPARE_DESCRIPTORS, scale_plan, scale_sources


def test_one_instance_when_the_limit_allows():
    assert scale_plan(100_000, 1 << 20) == (1, [100_000])
    assert scale_plan(100_000, 100_000 + SCALE_SPARE_DESCRIPTORS) == (1, [100_000])


def test_the_fewest_instances_that_fit_a_lower_limit():
    count, shares = scale_plan(100_000, 20_000)
    assert count == 6 and sum(shares) == 100_000
    assert max(shares) <= 20_000 - SCALE_SPARE_DESCRIPTORS
    assert max(shares) - min(shares) <= 1
    # One more connection than five instances hold needs a sixth.
    per = 20_000 - SCALE_SPARE_DESCRIPTORS
    assert scale_plan(5 * per, 20_000)[0] == 5
    assert scale_plan(5 * per + 1, 20_000)[0] == 6


def test_source_addresses_are_distinct_loopback_addresses():
    sources = scale_sources(600)
    assert len(set(sources)) == 600
    assert sources[0] == "127.0.1.1" and sources[253] == "127.0.1.254"
    assert sources[254] == "127.0.2.1"
    assert all(address.startswith("127.") for address in sources)


def test_exact_cpu_only_for_single_threaded_processes():
    # /proc/<pid>/schedstat counts a process's main thread only: a multi-threaded relay (the
    # original's) is read from /proc/<pid>/stat's ticks instead, which include every thread.
    import subprocess
    import sys
    from pathlib import Path

    from bench.relay import exact_cpu

    code = "import threading, time\n" + (
        "[threading.Thread(target=time.sleep, args=(30,), daemon=True).start() for _ in range(2)]\n"
        "print('up', flush=True)\ntime.sleep(30)\n"
    )
    threaded = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    single = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert threaded.stdout is not None and threaded.stdout.readline() == "up\n"
        assert exact_cpu(threaded.pid) is None
        reading = exact_cpu(single.pid)
        if Path("/proc/self/schedstat").exists():  # the kernel keeps the count (CONFIG_SCHED_INFO)
            assert reading is not None and reading > 0
        else:
            assert reading is None
    finally:
        for proc in (threaded, single):
            proc.kill()
            proc.wait()
