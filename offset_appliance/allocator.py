"""The C allocator's settings for the relay process (glibc's ``mallopt``).

glibc returns the top of its heap to the kernel whenever more than a threshold of it is
free, and takes it back on the next allocation, one page fault per page. The relay's tunnel
path allocates and frees a few 64 KiB buffers per large message and up to a 1 MiB receive
buffer per read, in batches; under the default threshold (raised by glibc as it goes, from
128 KiB) the heap shrank and grew again every few reads: about one 64 KiB buffer's pages
faulted in per relayed 64 KiB message, a third of the relay's CPU time in bulk transfers
going to the kernel (bench/PROFILE.md, fifth round). Fixed thresholds above those sizes keep
the pages: at most ``TRIM_THRESHOLD`` of free heap stays resident.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

# From glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Allocations below this come from the heap (the largest receive buffer is 1 MiB).
MMAP_THRESHOLD = 4 << 20
# Free memory at the top of the heap kept rather than returned to the kernel.
TRIM_THRESHOLD = 4 << 20

# An operator's own settings (environment variables glibc reads) are left as they are.
_OPERATOR_SETTINGS = ("GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def tune() -> bool:
    """Set the thresholds; False (and nothing changed) without glibc's ``mallopt`` or when
    the environment sets the allocator up already."""
    if any(name in os.environ for name in _OPERATOR_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    set_option: Callable[[int, int], int] = mallopt  # as argtypes and restype say
    # mallopt returns 1 on success.
    return set_option(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and (
        set_option(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
