"""A fake clock for the in-process daemon: schedules fire when a test moves the clock, not after
real seconds.

APScheduler 3 reads the time with `datetime.now` in its scheduler loop, its executors' misfire
check and a new interval trigger; the clock replaces that name in those modules and serves as
the jobs' `ctx.now`. `advance` moves the time, wakes the scheduler and returns once a pass of
its loop begun after the move has ended and every job it started has finished, so a test states
how much schedule time passes and what happened in it. (The scheduler announces submitted jobs at the end of a
pass, hence the pass count: a private method of APScheduler 3, wrapped here in tests only.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, tzinfo

import pytest
from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_SUBMITTED,
    JobEvent,
)
from apscheduler.schedulers.base import BaseScheduler

_READERS = ("apscheduler.schedulers.base", "apscheduler.executors.base",
            "apscheduler.triggers.interval")


class FakeClock:
    def __init__(self, start: datetime) -> None:
        self._now = start
        self._lock = threading.Lock()
        self._running = 0  # jobs submitted to an executor and not yet finished
        self._passes_begun = 0  # passes of the schedulers' loops (_process_jobs)
        self._passes_ended = 0
        self._schedulers: list[BaseScheduler] = []

    def now(self, tz: tzinfo | None = UTC) -> datetime:
        with self._lock:
            return self._now.astimezone(tz)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        clock = self

        class ClockedDatetime(datetime):
            @classmethod
            def now(cls, tz: tzinfo | None = None) -> datetime:  # type: ignore[override]
                return clock.now(tz)

        for module in _READERS:
            monkeypatch.setattr(f"{module}.datetime", ClockedDatetime)

    def watch(self, scheduler: BaseScheduler) -> None:
        """Count the scheduler's jobs in flight, so `advance` can wait for them."""
        def on_event(event: JobEvent) -> None:
            with self._lock:
                self._running += 1 if event.code == EVENT_JOB_SUBMITTED else -1

        scheduler.add_listener(on_event, EVENT_JOB_SUBMITTED)
        scheduler.add_listener(on_event, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
        process_jobs = scheduler._process_jobs

        def counted_pass() -> float | None:
            with self._lock:
                self._passes_begun += 1
                number = self._passes_begun
            try:
                return process_jobs()
            finally:
                with self._lock:
                    self._passes_ended = max(self._passes_ended, number)

        scheduler._process_jobs = counted_pass  # type: ignore[method-assign]
        self._schedulers.append(scheduler)

    def advance(self, seconds: float = 0, timeout: float = 10) -> None:
        """Move the time on by `seconds`, then wait (in real time, at most `timeout`) until the
        schedulers have run every job due by then."""
        with self._lock:
            self._now += timedelta(seconds=seconds)
            after = self._passes_begun + 1
        for scheduler in self._schedulers:
            scheduler.wakeup()
        wait_until(lambda: self._settled(after), timeout, "the jobs due to run")

    def _settled(self, pass_number: int) -> bool:
        with self._lock:
            return self._passes_ended >= pass_number and self._running == 0


def wait_until(condition: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    """Poll `condition` in real time: for the effect of a step already taken, not for a schedule."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
