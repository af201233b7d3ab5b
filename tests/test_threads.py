"""How many threads model fitting may use: only other processes' work counts as busy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from leadloop.scoring import threads


def _stat(busy: int, idle: int) -> str:
    # user nice system idle iowait irq softirq steal guest guest_nice
    return f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 2 3 4\n"


@pytest.fixture
def proc_stat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "stat"
    monkeypatch.setattr(threads, "_PROC_STAT", path)
    monkeypatch.setattr(threads, "_last", None)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    return path


def test_busy_cores_counts_the_work_done_while_this_process_waits(proc_stat, monkeypatch):
    samples = iter([_stat(1000, 1000), _stat(1000 + 150, 1000 + 250)])  # 150 of 400 ticks busy
    monkeypatch.setattr(threads.time, "sleep", lambda s: proc_stat.write_text(next(samples)))
    proc_stat.write_text(next(samples))
    assert threads.busy_cores() == pytest.approx(1.5)
    assert threads.free_cores() == 2  # 4 cores - 1.5 busy, rounded (the measurement is reused)


def test_a_high_load_average_from_this_process_does_not_hold_fitting_to_one_thread(
        proc_stat, monkeypatch):
    """The load average counts this process's own last minute (a sync just done); an idle
    machine must still get every core."""
    monkeypatch.setattr(os, "getloadavg", lambda: (3.9, 3.9, 3.9))
    samples = iter([_stat(500, 500), _stat(500, 900)])
    monkeypatch.setattr(threads.time, "sleep", lambda s: proc_stat.write_text(next(samples)))
    proc_stat.write_text(next(samples))
    assert threads.free_cores() == 4


def test_without_proc_stat_the_load_average_decides(proc_stat, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (3.2, 1.0, 1.0))
    assert threads.free_cores() == 1
    with threads.limited_threads(3) as n:  # a configured count wins
        assert n == 3
