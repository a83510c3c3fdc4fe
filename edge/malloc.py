"""Fixed allocator thresholds for a worker process.

glibc's malloc adapts the size from which it maps a block of its own (``mmap``) to the largest
mapped block freed so far, and trims the top of its heap once more than twice that is free
there. A worker moves request and response bodies in blocks of up to 256 KB (the event
loop's read size), so after some traffic its heap can end up growing and trimming around
every read: two ``brk`` calls and 256 KB of fresh, zeroed pages per read. Seen in the
benchmark: 1 MiB uploads after a run of 64 KiB downloads at a third of their throughput, with
a second of p99. Fixed thresholds keep freed blocks in the heap for the next read instead.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("edge.malloc")

# mallopt(3) parameters.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Blocks up to this size come from the heap (a read, a joined head, a chunk being forwarded).
MMAP_THRESHOLD = 4 * 1024 * 1024
# Free memory at the top of the heap up to this much is kept for reuse, not returned.
TRIM_THRESHOLD = 32 * 1024 * 1024


def steady_heap() -> bool:
    """Fix the allocator's thresholds (glibc only); False where there is no ``mallopt``."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no tunable thresholds, macOS no mallopt)
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not done:
        log.warning("could not fix the allocator's thresholds (mallopt refused)")
    return done
