"""The daemon: APScheduler wiring, the single-instance lease, and graceful shutdown.

`run_daemon(ctx)` holds the database's lease (see `leadloop.lease`), then runs the jobs of
`[schedule]` on a `BlockingScheduler` with the memory job store: our state lives in our own
tables, so the jobs are rebuilt from the config at each start. Every job has an explicit id,
`max_instances=1`, `coalesce=True` and the configured misfire grace time.

Ordering of sync and export: both run under one pipeline lock, and each sync is followed at once,
in the same thread and still under the lock, by an export. So every sync's result is uploaded
right after it, and an export fired by its own schedule (which then only picks up retries and
held rows that became due) waits for a sync in flight instead of reading it half-done. When both
have the same schedule, export is not scheduled on its own: the chained run is enough.

Interval schedules carry on across restarts: the first run is due one interval after the job's
last recorded start in `job_run` (or at once when it is overdue or never ran).

SIGTERM/SIGINT set `ctx.stop`; jobs check `ctx.stopping` between batches and return after
committing the batch in flight, the scheduler stops firing, the lease is released, and the
process exits 0. If a job does not finish within `stop_timeout_seconds`, the process exits 1
anyway (its open transaction is rolled back by the database, so nothing is half-written).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, timedelta
from typing import Any

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers import SchedulerNotRunningError
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.interval import IntervalTrigger

from leadloop import lease
from leadloop.config import load_settings
from leadloop.context import Context
from leadloop.errors import ConfigErrors, LeaseHeldError
from leadloop.jobs import run_job
from leadloop.metrics import DaemonMetrics, HealthServer
from leadloop.schedule import build_trigger, first_run_time, last_starts, scheduled_jobs

log = logging.getLogger("leadloop.daemon")

PIPELINE = ("sync", "export")  # serialised by one lock; a sync is chained to an export
HEARTBEAT_JOB = "lease-heartbeat"


# -- the daemon -----------------------------------------------------------------------------------


class Daemon:
    """One daemon process: lease, scheduler, job wrappers, health endpoint, shutdown."""

    def __init__(self, ctx: Context, *, owner: str | None = None) -> None:
        self.ctx = ctx
        self.owner = owner or lease.make_owner()
        cfg = ctx.settings.schedule
        self.ttl = timedelta(seconds=cfg.lease_seconds)
        self.stop_timeout = float(cfg.stop_timeout_seconds)
        self.jobs = scheduled_jobs(ctx.settings)
        self.chain_export = "sync" in self.jobs and "export" in ctx.settings.schedule.jobs()
        self.metrics = DaemonMetrics(ctx.engine)
        self._config_mtime = self._config_stamp()
        self.exit_code = 0
        self.lease_held = False
        self._pipeline = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._idle = threading.Condition()
        self._stopped = threading.Event()  # the scheduler's main loop has returned
        self.scheduler = BlockingScheduler(
            timezone=UTC,
            jobstores={"default": MemoryJobStore()},
            executors={
                "default": ThreadPoolExecutor(max_workers=max(2, len(self.jobs))),
                # the heartbeat has its own thread, so long jobs can never starve it
                "lease": ThreadPoolExecutor(max_workers=1),
            },
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": cfg.misfire_grace_seconds,
            },
        )
        self.scheduler.add_listener(self._on_job_error, EVENT_JOB_ERROR)
        self.scheduler.add_listener(self._on_job_missed, EVENT_JOB_MISSED)

    # -- lifecycle --

    def run(self, *, wait: bool) -> int:
        with self._signals():
            if not self._take_lease(wait):
                return 0  # asked to stop while waiting for the lease
            server: HealthServer | None = None
            try:
                server = self._start_health()
                self._add_jobs()
                threading.Thread(target=self._watch_stop, name="leadloop-stop", daemon=True).start()
                log.info("daemon %s started: %s", self.owner,
                         ", ".join(f"{n} {s}" for n, s in self.jobs.items()) or "no jobs scheduled")
                self.scheduler.start()  # blocks until the stop watcher shuts it down
                self._stopped.set()
                if not self._drain():
                    self._hard_exit()
            finally:
                self._stopped.set()
                if server is not None:
                    server.stop()
                if self.lease_held and lease.release(self.ctx.engine, self.owner):
                    log.info("daemon %s stopped; lease released", self.owner)
                self.lease_held = False
        return self.exit_code

    def _take_lease(self, wait: bool) -> bool:
        announced = False
        poll = max(0.2, min(5.0, self.ttl.total_seconds() / 3))
        while True:
            if not lease.blocked_by_live_holder(self.ctx.engine, lease.LEASE_NAME,
                                                self.ctx.now()) and lease.acquire(
                    self.ctx.engine, self.owner, self.ttl, self.ctx.now()):
                self.lease_held = True
                return True
            info = lease.holder(self.ctx.engine)
            if info is None:
                continue  # released between our two statements: try again at once
            if not wait:
                raise LeaseHeldError(
                    "another leadloop daemon holds the lease on this database: "
                    + info.describe(self.ctx.now()),
                    hint="stop it first, or start this one with `run --wait` to take over "
                    "when it stops (a crashed daemon's lease expires after "
                    f"[schedule] lease_seconds = {self.ttl.total_seconds():.0f})",
                )
            if not announced:
                log.info("waiting for the lease held by %s", info.describe(self.ctx.now()))
                announced = True
            if self.ctx.stop.wait(poll):
                return False

    def _add_jobs(self) -> None:
        now = self.ctx.now()
        starts = last_starts(self.ctx)
        for name, spec in self.jobs.items():
            self.scheduler.add_job(
                self._run, build_trigger(spec, f"schedule.{name}"), args=(name,), id=name, name=name,
                next_run_time=first_run_time(spec, starts.get(name), now),
            )
        beat = self.ttl.total_seconds() / 3
        self.scheduler.add_job(
            self._heartbeat, IntervalTrigger(seconds=beat, timezone=UTC), id=HEARTBEAT_JOB,
            name=HEARTBEAT_JOB, executor="lease", misfire_grace_time=max(1, int(beat)),
        )

    def _watch_stop(self) -> None:
        """Turn `ctx.stop` (set by a signal, a lost lease or a test) into a scheduler shutdown,
        from a plain thread: a signal handler must not run the scheduler's locking code."""
        self.ctx.stop.wait()
        while not self._stopped.is_set():
            try:
                self.scheduler.shutdown(wait=False)  # running jobs go on; _drain waits for them
                return
            except SchedulerNotRunningError:  # stop came before start() finished
                self._stopped.wait(0.05)

    def _drain(self) -> bool:
        """Wait for jobs in flight to finish their batch; False if they overran the timeout."""
        deadline = time.monotonic() + self.stop_timeout
        with self._idle:
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("jobs %s did not stop within %.0fs; exiting anyway (their open "
                              "transaction is rolled back)", sorted(self._in_flight),
                              self.stop_timeout)
                    return False
                log.info("stopping: waiting for %s to finish its batch", sorted(self._in_flight))
                self._idle.wait(min(left, 5.0))
        return True

    def _hard_exit(self) -> None:
        """The executor's threads are not daemonic; only os._exit bounds the stop time."""
        if self.lease_held:
            lease.release(self.ctx.engine, self.owner)
        logging.shutdown()
        os._exit(1)

    @contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # embedded (tests): the caller sets ctx.stop itself
            return

        def on_signal(signum: int, _frame: Any) -> None:
            if not self.ctx.stop.is_set():
                log.info("%s received: finishing the batch in flight, then stopping",
                         signal.Signals(signum).name)
            self.ctx.stop.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _start_health(self) -> HealthServer | None:
        cfg = self.ctx.settings.health
        if cfg.port is None:
            return None
        return HealthServer(cfg.host, cfg.port, self.metrics, self.health).start()

    def health(self) -> tuple[bool, str]:
        if not self.scheduler.running:
            return False, "scheduler not running"
        if not self.lease_held:
            return False, "lease not held"
        if self.ctx.stopping:
            return False, "stopping"
        return True, f"scheduler running, lease held by {self.owner}"

    # -- jobs --

    def _run(self, name: str) -> None:
        """The scheduled callable of a job: track it for the drain, serialise the pipeline."""
        if self.ctx.stopping:
            return
        with self._idle:
            self._in_flight[name] = self._in_flight.get(name, 0) + 1
        try:
            if name in PIPELINE:
                with self._pipeline:
                    self._run_one(name)
                    if name == "sync" and self.chain_export:
                        self._run_one("export")
            else:
                self._run_one(name)
        finally:
            with self._idle:
                self._in_flight[name] -= 1
                if not self._in_flight[name]:
                    del self._in_flight[name]
                self._idle.notify_all()

    def _config_stamp(self) -> int | None:
        try:
            return self.ctx.config_path.stat().st_mtime_ns if self.ctx.config_path else None
        except OSError:
            return None

    def _reload_config(self) -> None:
        """Apply a config file edited since the last job (e.g. saved from `leadloop serve`).
        An invalid file is logged and the previous settings stay; the schedule and the database
        are those the daemon started with."""
        stamp = self._config_stamp()
        if stamp is None or stamp == self._config_mtime:
            return
        self._config_mtime = stamp
        try:
            settings = load_settings(self.ctx.config_path)  # type: ignore[arg-type]
        except ConfigErrors as exc:
            log.error("config file changed but is invalid; keeping the previous settings: %s",
                      exc.message.replace("\n", "; "))
            return
        if settings != self.ctx.settings:
            self.ctx.settings = settings
            log.info("config file %s changed: applied from this job on", self.ctx.config_path)

    def _run_one(self, name: str) -> None:
        if self.ctx.stopping:
            return
        self._reload_config()
        # A shallow copy per run: settings, engine and the stop event are shared, but the
        # job_run id a job stamps on its rows is its own even when jobs overlap.
        job_ctx = replace(self.ctx, job_run_id=None)
        started = time.monotonic()
        outcome = "crashed"
        try:
            result = run_job(job_ctx, name)
            outcome = "interrupted" if result.ok and self.ctx.stopping else (
                "ok" if result.ok else "failed")
        finally:
            self.metrics.observe(name, outcome, time.monotonic() - started)

    def _heartbeat(self) -> None:
        try:
            renewed = lease.renew(self.ctx.engine, self.owner, self.ttl, self.ctx.now())
        except Exception as exc:  # database unreachable: keep trying while the lease lasts
            log.warning("lease heartbeat failed (%s); retrying", type(exc).__name__)
            return
        if not renewed and self.lease_held:
            self.lease_held = False
            self.exit_code = 1
            holder = lease.holder(self.ctx.engine)
            log.error("lost the daemon lease%s; stopping",
                      f" to {holder.owner}" if holder else "")
            self.ctx.stop.set()

    def _on_job_error(self, event: JobExecutionEvent) -> None:
        exc = event.exception
        log.error("job %s crashed (a bug; recorded in job_run, the schedule goes on): %s: %s",
                  event.job_id, type(exc).__name__, exc,
                  exc_info=(type(exc), exc, exc.__traceback__) if exc else None)

    def _on_job_missed(self, event: JobExecutionEvent) -> None:
        log.warning("job %s missed its run at %s (past the misfire grace time)",
                    event.job_id, event.scheduled_run_time)


def run_daemon(ctx: Context, *, wait: bool) -> int:
    """Run the scheduler until SIGTERM/SIGINT. Returns the exit code (0 after a clean stop).

    Raises `LeaseHeldError` when another daemon holds this database's lease and `wait` is False.
    """
    return Daemon(ctx).run(wait=wait)
