"""The memory ceiling (``limits.max_memory``, ``limits.memory_low_mark``): past the ceiling
of resident memory, new connections are refused and the connections feeding the largest
output queues stop being read, until the resident size is below the low mark.

The ceiling is on by default: ``max_memory = "auto"`` is ``AUTO_SHARE`` per cent of the
memory limit of the control group the relay runs in (``memory.max`` on cgroup v2,
``memory.limit_in_bytes`` on v1, the lowest of its own and its ancestors'), or of the
machine's memory where no group sets one, so that the kernel's OOM killer is never the
relay's bound. A number of bytes sets it; 0 turns it off.

The resident size is sampled from ``/proc/self/statm`` a few times a second while a
ceiling is set. Freed memory is not always given back to the system by the allocator, so
while over the ceiling the relay asks glibc to return what it can (``malloc_trim``), at
most once a second; the low mark is reached when the memory the relay held is freed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from collections.abc import Callable

from ..config import Limits

log = logging.getLogger("strelay")

SAMPLE_INTERVAL = 0.25
# Output queues whose feeders are paused at each sample while over the ceiling: the
# largest first, more at every sample for as long as it lasts.
PAUSE_BATCH = 16

TRIM_INTERVAL = 1.0

AUTO = "auto"
# The share of the memory limit the automatic ceiling takes: what is left holds the kernel's
# socket buffers charged to the group, the page cache and a hand-over's second process.
AUTO_SHARE = 80
# cgroup v1's "no limit" (PAGE_COUNTER_MAX pages, rounded to pages): anything this large.
_UNLIMITED = 1 << 60

try:
    _PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
    _PAGE_SIZE = 4096


def read_rss() -> int:
    """This process's resident size in bytes (0 where /proc cannot tell)."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


def _malloc_trim() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)`` (give free heap memory back), or nothing elsewhere."""
    try:
        # The symbols the process has loaded already (libc's among them): nothing is
        # searched for or loaded.
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]

    def call() -> None:
        trim(0)

    return call


def _mounts(mountinfo: str) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    """The (root, mount point) of the cgroup v2 hierarchy and of v1's memory hierarchy."""
    v2 = v1 = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        after = line.split(" - ", 1)[1].split()
        if len(after) < 3:
            continue
        fstype, options = after[0], after[2].split(",")
        place = (_unescape(fields[3]), _unescape(fields[4]))
        if fstype == "cgroup2" and v2 is None:
            v2 = place
        elif fstype == "cgroup" and "memory" in options and v1 is None:
            v1 = place
    return v2, v1


def _unescape(field: str) -> str:
    """mountinfo's octal escapes (a space is ``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _lowest_limit(
    mount: tuple[str, str], group: str, name: str, read: Callable[[str], str | None]
) -> tuple[int, str] | None:
    """The lowest ``name`` limit of ``group`` and its ancestors under ``mount``, with the
    group that sets it (None: none does)."""
    root, point = mount
    if root != "/" and (group == root or group.startswith(root + "/")):
        group = group[len(root) :] or "/"
    found: tuple[int, str] | None = None
    path = group.rstrip("/") or "/"
    while True:
        text = read(os.path.join(point, path.lstrip("/"), name))
        text = (text or "").strip()
        if text.isdigit():
            value = int(text)
            if value < _UNLIMITED and (found is None or value < found[0]):
                found = (value, path)
        if path == "/":
            return found
        path = os.path.dirname(path)


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


def cgroup_limit(read: Callable[[str], str | None] = _read_text) -> tuple[int, str] | None:
    """The memory limit of the control group this process runs in, in bytes, and where it
    is set (``"memory.max of cgroup /system.slice/x.service"``): None where none is."""
    own = read("/proc/self/cgroup") or ""
    v2, v1 = _mounts(read("/proc/self/mountinfo") or "")
    found: list[tuple[int, str]] = []
    for line in own.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, group = parts
        if hierarchy == "0" and controllers == "" and v2 is not None:
            limit = _lowest_limit(v2, group, "memory.max", read)
            if limit is not None:
                found.append((limit[0], f"memory.max of cgroup {limit[1]}"))
        elif "memory" in controllers.split(",") and v1 is not None:
            limit = _lowest_limit(v1, group, "memory.limit_in_bytes", read)
            if limit is not None:
                found.append((limit[0], f"memory.limit_in_bytes of cgroup {limit[1]}"))
    return min(found) if found else None


def machine_memory(read: Callable[[str], str | None] = _read_text) -> int:
    """The machine's memory in bytes: MemTotal, or where /proc/meminfo is hidden (the
    unit's ``ProcSubset=pid``) what sysinfo(2) says; 0 where neither tells."""
    for line in (read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                return int(fields[1]) * 1024
    try:
        return max(0, os.sysconf("SC_PHYS_PAGES") * _PAGE_SIZE)
    except (ValueError, OSError):  # pragma: no cover - not Linux
        return 0


def resolve_ceiling(
    setting: int | str, read: Callable[[str], str | None] = _read_text
) -> tuple[int, str]:
    """The ceiling in bytes (0: off) that ``max_memory`` asks for, and what it came from."""
    if setting != AUTO:
        assert isinstance(setting, int)
        return setting, "max_memory" if setting else "max_memory = 0: off"
    group = cgroup_limit(read)
    machine = machine_memory(read)
    if group is not None and (not machine or group[0] <= machine):
        limit, where = group
    elif machine:
        limit, where = machine, "machine's memory (no control group limit)"
    else:
        return 0, "auto: no memory limit found, off"
    return (
        limit * AUTO_SHARE // 100,
        f"auto: {AUTO_SHARE} % of {limit / 2**20:.1f} MiB, the {where}",
    )


class MemoryGuard:
    """Whether the relay is over its memory ceiling, with hysteresis."""

    def __init__(
        self,
        limits: Limits | None = None,
        rss: Callable[[], int] = read_rss,
        trim: Callable[[], None] | None = None,
        read: Callable[[str], str | None] = _read_text,
    ) -> None:
        self.read = read
        self.origin = ""  # what the ceiling came from, for the log
        self.rss = rss
        self.trim = trim if trim is not None else _malloc_trim()
        self.next_trim = 0.0
        self.max_memory = 0
        self.low_mark = 0
        self.active = False  # over the ceiling, and not yet below the low mark
        self.next_sample = 0.0
        self.last_rss = 0
        self.active_since = 0.0
        self.active_seconds = 0.0  # time spent over the ceiling, ended spells only
        self.apply_config(limits if limits is not None else Limits())

    def apply_config(self, limits: Limits) -> bool:
        """A new ceiling (the automatic one looked up again): sampled again at the next
        turn. Whether the ceiling or its low mark changed."""
        before = (self.max_memory, self.low_mark)
        self.max_memory, self.origin = resolve_ceiling(limits.max_memory, self.read)
        self.low_mark = limits.memory_low_mark or self.max_memory * 9 // 10
        self.next_sample = 0.0
        return (self.max_memory, self.low_mark) != before

    def describe(self) -> str:
        """The ceiling as the start and reload lines give it."""
        if not self.max_memory:
            return f"memory ceiling off ({self.origin})"
        return (
            f"memory ceiling {self.max_memory / 2**20:.1f} MiB of resident memory "
            f"({self.origin}); served again below {self.low_mark / 2**20:.1f} MiB"
        )

    def sample(self, now: float) -> bool | None:
        """Read the resident size if due: True when the ceiling is crossed now, False when
        usage fell below the low mark now, None when nothing changed."""
        if now < self.next_sample:
            return None
        self.next_sample = now + SAMPLE_INTERVAL
        if not self.max_memory:
            if self.active:
                self._end(now)
                log.info("memory ceiling removed: accepting new connections again")
                return False
            return None
        rss = self.last_rss = self.rss()
        if not self.active and rss > self.max_memory:
            self.active = True
            self.active_since = now
            log.warning(
                "memory ceiling: resident size %.1f MiB is over max_memory (%.1f MiB): "
                "refusing new connections and pausing the feeders of the largest output "
                "queues until it is below %.1f MiB",
                rss / 2**20,
                self.max_memory / 2**20,
                self.low_mark / 2**20,
            )
            return True
        if self.active and rss >= self.low_mark and now >= self.next_trim:
            # Memory freed since may still be the process's: hand it back, then look again.
            self.next_trim = now + TRIM_INTERVAL
            self.trim()
            rss = self.last_rss = self.rss()
        if self.active and rss < self.low_mark:
            self._end(now)
            log.info(
                "memory ceiling: resident size %.1f MiB is below %.1f MiB: accepting new "
                "connections again",
                rss / 2**20,
                self.low_mark / 2**20,
            )
            return False
        return None

    def seconds(self, now: float) -> float:
        """Time spent over the ceiling so far."""
        return self.active_seconds + (now - self.active_since if self.active else 0.0)

    def _end(self, now: float) -> None:
        self.active = False
        self.active_seconds += now - self.active_since
