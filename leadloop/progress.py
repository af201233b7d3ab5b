"""Progress for long work: a rich progress bar on a terminal, periodic count lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

log = logging.getLogger("leadloop.progress")


class Tracker(Protocol):
    def advance(self, n: int = 1) -> None: ...

    def set_total(self, total: int | None) -> None: ...


class _LogTracker:
    def __init__(self, description: str, total: int | None, every: float) -> None:
        self.description, self.total, self.every = description, total, every
        self.done = 0
        self._last = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            of = f"/{self.total}" if self.total else ""
            log.info("%s: %d%s", self.description, self.done, of)

    def set_total(self, total: int | None) -> None:
        self.total = total


class _RichTracker:
    def __init__(self, progress: Progress, task: int) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1) -> None:
        self._progress.advance(self._task, n)  # type: ignore[arg-type]

    def set_total(self, total: int | None) -> None:
        self._progress.update(self._task, total=total)  # type: ignore[arg-type]


@contextmanager
def track(description: str, total: int | None = None, *, every: float = 10.0) -> Iterator[Tracker]:
    """Yield a tracker; draw a bar when stderr is a terminal, else log counts every `every` s."""
    if sys.stderr.isatty():
        columns = (
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, transient=True) as progress:
            task = progress.add_task(description, total=total)
            yield _RichTracker(progress, task)
    else:
        tracker = _LogTracker(description, total, every)
        yield tracker
        if tracker.done:
            log.info("%s: %d done", description, tracker.done)
