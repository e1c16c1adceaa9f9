"""The memory ceiling on by default: "auto" follows the memory limit of the relay's control
group (cgroup v2 or v1, the lowest of its own and its ancestors'), or the machine's memory;
over the ceiling, receivers that take nothing of a large queue for a keepalive timeout are
closed, while those that read slowly stay."""

from __future__ import annotations

import dataclasses
import logging
import os

import pytest

from offset_appliance.config import Limits
from offset_appliance.relay.memory import AUTO_SHARE, MemoryGuard, cgroup_limit, resolve_ceiling
from offset_appliance.wire.messages import Accept, Connect, encode_init_connection

MiB = 1 << 20

V2_MOUNTS = (
    "24 30 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 "
    "rw,nsdelegate,memory_recursiveprot\n"
)
V1_MOUNTS = (
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
)
MEMINFO = "MemTotal:       24576000 kB\nMemFree:        1000 kB\n"


def files(**paths: str):
    table = {"/proc/meminfo": MEMINFO, **paths}
    return lambda path: table.get(path)


def test_cgroup_v2_takes_the_lowest_memory_max_of_the_group_and_its_ancestors():
    read = files(
        **{
            "/proc/self/cgroup": "0::/system.slice/offset-relay.service\n",
            "/proc/self/mountinfo": V2_MOUNTS,
            "/sys/fs/cgroup/system.slice/offset-relay.service/memory.max": "2147483648\n",
            "/sys/fs/cgroup/system.slice/memory.max": "1073741824\n",
            "/sys/fs/cgroup/memory.max": "max\n",
        }
    )
    assert cgroup_limit(read) == (1 << 30, "memory.max of cgroup /system.slice")
    ceiling, origin = resolve_ceiling("auto", read)
    assert ceiling == (1 << 30) * AUTO_SHARE // 100
    assert origin == "auto: 80 % of 1024.0 MiB, the memory.max of cgroup /system.slice"


def test_cgroup_v1_reads_memory_limit_in_bytes_and_ignores_its_no_limit_value():
    read = files(
        **{
            "/proc/self/cgroup": "9:name=systemd:/\n4:memory:/relay\n0::/\n",
            "/proc/self/mountinfo": V1_MOUNTS,
            "/sys/fs/cgroup/memory/relay/memory.limit_in_bytes": "83886080\n",
            "/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
            "/sys/fs/cgroup/unified/memory.max": None,  # hybrid: no controllers in v2
        }
    )
    assert cgroup_limit(read) == (80 * MiB, "memory.limit_in_bytes of cgroup /relay")
    assert resolve_ceiling("auto", read)[0] == 64 * MiB


def test_a_group_inside_a_namespace_is_found_under_its_mount_root():
    # A container's view: the mount's root is the container's group.
    mounts = V2_MOUNTS.replace(" / /sys/fs/cgroup ", " /machine.slice/c1 /sys/fs/cgroup ")
    read = files(
        **{
            "/proc/self/cgroup": "0::/machine.slice/c1/app\n",
            "/proc/self/mountinfo": mounts,
            "/sys/fs/cgroup/app/memory.max": "536870912\n",
        }
    )
    assert cgroup_limit(read) == (512 * MiB, "memory.max of cgroup /app")


def test_without_a_group_limit_auto_takes_the_machine_memory_and_a_number_is_taken_as_is():
    read = files(**{"/proc/self/cgroup": "0::/\n", "/proc/self/mountinfo": V2_MOUNTS})
    assert cgroup_limit(read) is None
    ceiling, origin = resolve_ceiling("auto", read)
    assert ceiling == 24576000 * 1024 * AUTO_SHARE // 100
    assert "the machine's memory" in origin
    assert resolve_ceiling(123456, read) == (123456, "max_memory")
    assert resolve_ceiling(0, read)[0] == 0
    # /proc/meminfo hidden (the unit's ProcSubset=pid): the machine's memory as sysinfo(2)
    # gives it.
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert resolve_ceiling("auto", lambda path: None)[0] == physical * AUTO_SHARE // 100


def test_a_group_limit_above_the_machine_memory_gives_way_to_it():
    read = files(
        **{
            "/proc/self/cgroup": "0::/big\n",
            "/proc/self/mountinfo": V2_MOUNTS,
            "/sys/fs/cgroup/big/memory.max": str(1 << 40),
        }
    )
    assert "the machine's memory" in resolve_ceiling("auto", read)[1]


def test_the_guard_says_its_ceiling_and_looks_again_on_reload():
    limit = ["83886080"]
    guard = MemoryGuard(Limits(), rss=lambda: 0, read=lambda p: _v1(p, limit[0]))
    assert guard.max_memory == 64 * MiB and guard.low_mark == 64 * MiB * 9 // 10
    assert guard.describe() == (
        "memory ceiling 64.0 MiB of resident memory (auto: 80 % of 80.0 MiB, the "
        "memory.limit_in_bytes of cgroup /relay); served again below 57.6 MiB"
    )
    assert not guard.apply_config(Limits())  # unchanged
    limit[0] = "167772160"
    assert guard.apply_config(Limits()) and guard.max_memory == 128 * MiB
    assert guard.apply_config(Limits(max_memory=0)) and guard.describe().startswith(
        "memory ceiling off"
    )


def _v1(path: str, limit: str) -> str | None:
    return {
        "/proc/self/cgroup": "4:memory:/relay\n",
        "/proc/self/mountinfo": V1_MOUNTS,
        "/sys/fs/cgroup/memory/relay/memory.limit_in_bytes": limit,
        "/proc/meminfo": MEMINFO,
    }.get(path)


def test_a_reload_that_changes_the_ceiling_says_the_new_one(rigs, caplog):
    rig = rigs(limits={"max_memory": 100 * MiB})
    policy = rig.server.policy
    assert policy.memory.describe().startswith(
        "memory ceiling 100.0 MiB of resident memory (max_memory)"
    )
    config = rig.server.config
    with caplog.at_level(logging.INFO, logger="strelay"):
        policy.apply(config, rig.clock())  # unchanged: nothing said
        assert not [r for r in caplog.records if "memory ceiling" in r.getMessage()]
        limits = dataclasses.replace(config.limits, max_memory=200 * MiB)
        policy.apply(dataclasses.replace(config, limits=limits), rig.clock())
    (line,) = [r.getMessage() for r in caplog.records if "memory ceiling" in r.getMessage()]
    assert line.startswith("memory ceiling 200.0 MiB")


# ---- over the ceiling: a receiver that takes nothing is closed, a slow one is not ------------


@pytest.mark.parametrize("reads", [False, True])
def test_over_the_ceiling_a_receiver_that_takes_nothing_for_a_keepalive_timeout_is_closed(
    rigs, reads
):
    rss = [10 * MiB]
    rig = rigs(limits={"max_memory": 100 * MiB}, timeouts={"keepalive": 8.0})
    server = rig.server
    server.policy.memory.rss = lambda: rss[0]
    listener = rig.listener()
    connector = rig.node()
    connector.send(encode_init_connection(Connect(listener.public_key)))
    rig.settle()
    acceptor = rig.node(listener.identity, rcvbuf=4096)
    acceptor.send(encode_init_connection(Accept(connector.public_key)))
    rig.settle()
    acceptor.reading = False
    for _ in range(200):  # past the kernel's buffers: the relay's queue fills
        connector.send(b"x" * 60_000)
    rig.settle()
    queue = rig.client_of(acceptor)
    assert queue.out_size >= 1 * MiB  # the high water mark: the connector is paused
    rss[0] = 101 * MiB  # over the ceiling from now on
    gone_at = None
    for second in range(1, 31):
        # The acceptor keeps the relay's keepalive rule (it speaks), and reads a little
        # each second or nothing at all.
        acceptor.send(b"still here")
        if reads:
            acceptor.reading = True
            acceptor.pump()
            acceptor.reading = False
        rig.clock.advance(1.0)
        rig.settle()
        if queue.id not in server.clients:
            gone_at = second
            break
    closed = server.stats.closed
    if reads:
        assert gone_at is None and closed["stalled"] == 0
    else:
        # Not before a keepalive timeout of taking nothing (the kernel may take a little
        # more of the queue at first), and then at once.
        assert gone_at is not None and gone_at >= 8 and closed["stalled"] == 1
        assert closed["tunnel_peer_closed"] == 1  # the connector learns: its tunnel ended
        assert 'reason="stalled"' in server.metrics_text()
