"""Give the memory a finished job freed back to the system.

glibc's allocator keeps freed memory in its arenas for reuse: after a million-lead job the
daemon held 630-790 MB while idle, and the next job's peak started from there (the report, last
in the cycle, peaked at 1,066 MB on PostgreSQL while needing far less on its own). After each
job the arenas are trimmed (`malloc_trim`, a few milliseconds); elsewhere (no glibc) this is
a no-op. (A `gc.collect()` first freed little more and cost 0.15 s per job, which an incremental
cycle of five mostly skipped jobs cannot afford.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache
from typing import Any


@cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> bool:
    """Return the allocator's free memory to the system; whether it could."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
