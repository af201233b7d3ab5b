"""How many BLAS/OpenMP threads model fitting may use.

HistGradientBoosting (OpenMP) and NumPy's BLAS start one thread per core by default. On a
machine whose cores are busy with other work that oversubscribes them: `model evaluate` on
9,240 rows took 392 s of wall time on 2 loaded cores instead of 24 s. The fitting runs under a
threadpoolctl limit: `[model] threads` when set, else the cores not already busy (CPU count
minus the 1-minute load average, at least 1).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from threadpoolctl import threadpool_limits


def free_cores() -> int:
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        load = 0.0
    return max(1, min(cores, round(cores - load)))


@contextmanager
def limited_threads(configured: int | None = None) -> Iterator[int]:
    """Run the block with at most `configured` (or the free cores) native threads."""
    n = configured or free_cores()
    with threadpool_limits(limits=n):
        yield n
