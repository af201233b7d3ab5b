"""How many BLAS/OpenMP threads model fitting may use.

HistGradientBoosting (OpenMP) and NumPy's BLAS start one thread per core by default. On a
machine whose cores are busy with other work that oversubscribes them: `model evaluate` on
9,240 rows took 392 s of wall time on 2 loaded cores instead of 24 s. The fitting runs under a
threadpoolctl limit: `[model] threads` when set, else the cores not busy right now.

"Busy right now" is read from the kernel's CPU counters over a short moment while this process
waits, so it counts only other work. The 1-minute load average, used before, also counted this
process's own last minute: after a sync had kept one core busy, scoring on an idle 2-core machine
was held to one thread (a gradient-boosting fit on 200,000 rows takes 1.6-1.9x as long).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from threadpoolctl import threadpool_limits

SAMPLE_S = 0.2
REUSE_S = 30.0  # a training asks several times within seconds: one measurement serves them
_PROC_STAT = Path("/proc/stat")
_last: tuple[float, float] | None = None  # (monotonic time, busy cores) of the last measurement


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all cores since boot, or None where /proc/stat is absent."""
    try:
        fields = [int(v) for v in _PROC_STAT.read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user time
    return total - idle, total


def busy_cores(sample_s: float = SAMPLE_S) -> float | None:
    """How many cores other processes keep busy, measured over `sample_s` while this one sleeps
    (the measurement of the last `REUSE_S` seconds when there is one)."""
    global _last
    if _last is not None and time.monotonic() - _last[0] < REUSE_S:
        return _last[1]
    before = _cpu_times()
    if before is None:
        return None
    time.sleep(sample_s)
    after = _cpu_times()
    if after is None or after[1] <= before[1]:
        return None
    busy = (os.cpu_count() or 1) * (after[0] - before[0]) / (after[1] - before[1])
    _last = (time.monotonic(), busy)
    return busy


def free_cores() -> int:
    cores = os.cpu_count() or 1
    busy = busy_cores()
    if busy is None:  # not Linux: the load average (which includes this process's recent work)
        try:
            busy = os.getloadavg()[0]
        except OSError:
            busy = 0.0
    return max(1, min(cores, round(cores - busy)))


@contextmanager
def limited_threads(configured: int | None = None) -> Iterator[int]:
    """Run the block with at most `configured` (or the free cores) native threads."""
    n = configured or free_cores()
    with threadpool_limits(limits=n):
        yield n
