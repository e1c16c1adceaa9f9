"""The memory ceiling (``limits.max_memory``, ``limits.memory_low_mark``): past the ceiling
of resident memory, new connections are refused and the connections feeding the largest
output queues stop being read, until the resident size is below the low mark.

The resident size is sampled from ``/proc/self/statm`` a few times a second while a
ceiling is set. Freed memory is not always given back to the system by the allocator, so
while over the ceiling the relay asks glibc to return what it can (``malloc_trim``), at
most once a second; the low mark is reached when the memory the relay held is freed.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable

from ..config import Limits

log = logging.getLogger("strelay")

SAMPLE_INTERVAL = 0.25
# Output queues whose feeders are paused at each sample while over the ceiling: the
# largest first, more at every sample for as long as it lasts.
PAUSE_BATCH = 16

TRIM_INTERVAL = 1.0

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


class MemoryGuard:
    """Whether the relay is over its memory ceiling, with hysteresis."""

    def __init__(
        self,
        limits: Limits | None = None,
        rss: Callable[[], int] = read_rss,
        trim: Callable[[], None] | None = None,
    ) -> None:
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

    def apply_config(self, limits: Limits) -> None:
        """A new ceiling: sampled again at the next turn."""
        self.max_memory = limits.max_memory
        self.low_mark = limits.memory_low_mark or limits.max_memory * 9 // 10
        self.next_sample = 0.0

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
