"""The daemon in-process, with fake job bodies: scheduling, ordering, failures, the lease,
graceful stop, health and metrics. (The real daemon as a subprocess: test_daemon_process.py.)"""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import select

from leadloop import jobs, lease
from leadloop.context import Context
from leadloop.daemon import (
    Daemon,
    build_trigger,
    cron_day_of_week,
    first_run_time,
    run_daemon,
    scheduled_jobs,
)
from leadloop.errors import ConfigError, LeaseHeldError, SourceError
from leadloop.store import session_scope
from leadloop.tables import JobOutcome, JobRun

FAST = {"sync": "1s", "export": "1s", "score": "1s", "validate": None, "retrain": None,
        "report": None, "lease_seconds": 3, "stop_timeout_seconds": 10}


class Recorder:
    """Fake job bodies that log when they start and end, to check order and overlap."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, float]] = []
        self.lock = threading.Lock()

    def body(self, name: str, seconds: float = 0.05, fail: Exception | None = None
             ) -> Callable[[Context], dict[str, Any]]:
        def run(ctx: Context) -> dict[str, Any]:
            with self.lock:
                self.events.append((name, "start", time.monotonic()))
            time.sleep(seconds)
            with self.lock:
                self.events.append((name, "end", time.monotonic()))
            if fail is not None:
                raise fail
            return {"rows": 1}

        return run

    def starts(self, name: str) -> int:
        return sum(1 for n, kind, _ in self.events if n == name and kind == "start")


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    for name in jobs.JOBS:
        monkeypatch.setitem(jobs.JOBS, name, rec.body(name))
    return rec


def start_in_thread(ctx: Context, **kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["code"] = run_daemon(ctx, **kwargs)
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def stop(ctx: Context, thread: threading.Thread, timeout: float = 15) -> None:
    ctx.stop.set()
    thread.join(timeout)
    assert not thread.is_alive(), "daemon did not stop in time"


def job_runs(engine: Engine) -> list[JobRun]:
    with session_scope(engine) as session:
        return list(session.exec(select(JobRun).order_by(JobRun.id)))  # type: ignore[arg-type]


@pytest.fixture
def fast_ctx(make_context: Callable[..., Context], engine: Engine) -> Context:
    return make_context(engine, schedule=FAST)


def test_jobs_run_on_schedule_and_export_follows_each_sync(
    fast_ctx: Context, recorder: Recorder, engine: Engine
) -> None:
    thread, out = start_in_thread(fast_ctx, wait=False)
    time.sleep(3.5)
    stop(fast_ctx, thread)
    assert out == {"code": 0}
    assert recorder.starts("sync") >= 3 and recorder.starts("score") >= 3
    # sync and export never overlap, and every sync is directly followed by an export
    pipeline = [(n, k) for n, k, _ in recorder.events if n in ("sync", "export")]
    for i in range(0, len(pipeline), 2):
        assert pipeline[i][1] == "start" and pipeline[i + 1] == (pipeline[i][0], "end")
    for i, (n, k) in enumerate(pipeline):
        if (n, k) == ("sync", "end"):
            assert pipeline[i + 1] == ("export", "start")
    runs = job_runs(engine)
    assert {r.outcome for r in runs} == {JobOutcome.ok}
    assert all(r.finished_at is not None and r.counts == {"rows": 1} for r in runs)
    assert lease.holder(engine) is None  # released on stop


def test_failing_and_crashing_jobs_are_recorded_and_the_schedule_goes_on(
    fast_ctx: Context, recorder: Recorder, engine: Engine, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setitem(jobs.JOBS, "sync", recorder.body("sync", fail=SourceError("CRM down")))
    monkeypatch.setitem(jobs.JOBS, "score", recorder.body("score", fail=RuntimeError("bug")))
    thread, out = start_in_thread(fast_ctx, wait=False)
    time.sleep(2.6)
    stop(fast_ctx, thread)
    assert out == {"code": 0}
    assert recorder.starts("sync") >= 2 and recorder.starts("score") >= 2
    runs = job_runs(engine)
    syncs = [r for r in runs if r.name == "sync"]
    scores = [r for r in runs if r.name == "score"]
    assert all(r.outcome == JobOutcome.failed and r.error == "CRM down" for r in syncs)
    assert all(r.outcome == JobOutcome.failed and "RuntimeError: bug" in (r.error or "")
               for r in scores)
    # a failed sync still lets its export run on what the store holds
    assert all(r.outcome == JobOutcome.ok for r in runs if r.name == "export")
    assert "job score crashed" in caplog.text


def test_second_daemon_is_refused_with_the_holders_name(
    fast_ctx: Context, recorder: Recorder, engine: Engine
) -> None:
    assert lease.acquire(engine, "host-a:123:abcd", timedelta(seconds=60), datetime.now(UTC))
    with pytest.raises(LeaseHeldError, match=r"host-a:123:abcd \(held"):
        run_daemon(fast_ctx, wait=False)
    assert recorder.events == []


def test_wait_takes_over_when_the_holder_lets_go(
    fast_ctx: Context, recorder: Recorder, engine: Engine
) -> None:
    assert lease.acquire(engine, "other", timedelta(seconds=60), datetime.now(UTC))
    thread, out = start_in_thread(fast_ctx, wait=True)
    time.sleep(1.5)
    assert recorder.events == [] and thread.is_alive()
    lease.release(engine, "other")
    time.sleep(2.0)
    assert lease.holder(engine).owner != "other"  # type: ignore[union-attr]
    assert recorder.starts("sync") >= 1
    stop(fast_ctx, thread)
    assert out == {"code": 0}


def test_stop_lets_the_batch_in_flight_commit_then_exits(
    fast_ctx: Context, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job that works in batches stops between two of them, with its batches committed."""
    batch_started = threading.Event()
    committed: list[int] = []

    def batched_export(ctx: Context) -> dict[str, Any]:
        for batch in range(100):
            if ctx.stopping:
                break
            batch_started.set()
            time.sleep(0.3)  # the upload of one batch
            committed.append(batch)
        return {"batches": len(committed)}

    for name in jobs.JOBS:
        monkeypatch.setitem(jobs.JOBS, name, lambda ctx: {})
    monkeypatch.setitem(jobs.JOBS, "export", batched_export)
    thread, out = start_in_thread(fast_ctx, wait=False)
    assert batch_started.wait(10)
    time.sleep(0.4)
    began = time.monotonic()
    stop(fast_ctx, thread)
    assert time.monotonic() - began < 2  # one batch, not the 100
    assert out == {"code": 0}
    export = [r for r in job_runs(engine) if r.name == "export"][-1]
    assert export.outcome == JobOutcome.interrupted
    assert export.counts == {"batches": len(committed)} and 1 <= len(committed) < 100
    assert lease.holder(engine) is None


def test_lost_lease_stops_the_daemon_with_exit_code_1(
    fast_ctx: Context, recorder: Recorder, engine: Engine
) -> None:
    thread, out = start_in_thread(fast_ctx, wait=False)
    time.sleep(0.8)
    holder = lease.holder(engine)
    assert holder is not None
    # another daemon took the lease over (as if ours had expired while we stalled)
    lease.release(engine, holder.owner)
    assert lease.acquire(engine, "usurper", timedelta(seconds=60), datetime.now(UTC))
    thread.join(10)
    assert not thread.is_alive()
    assert out == {"code": 1}
    assert lease.holder(engine).owner == "usurper"  # type: ignore[union-attr]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_health_and_metrics_endpoint(
    make_context: Callable[..., Context], engine: Engine, recorder: Recorder
) -> None:
    port = free_port()
    ctx = make_context(engine, schedule=FAST, health={"port": port})
    thread, out = start_in_thread(ctx, wait=False)
    time.sleep(1.8)
    status, body = fetch(f"http://127.0.0.1:{port}/healthz")
    assert status == 200 and body.startswith("ok: scheduler running, lease held by ")
    status, body = fetch(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    assert 'leadloop_job_runs_total{job="sync",outcome="ok"}' in body
    assert 'leadloop_job_duration_seconds_count{job="export"}' in body
    assert "# TYPE leadloop_conversions gauge" in body
    assert fetch(f"http://127.0.0.1:{port}/nope")[0] == 404
    stop(ctx, thread)
    assert out == {"code": 0}
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_health_reports_unhealthy_without_the_lease(fast_ctx: Context) -> None:
    daemon = Daemon(fast_ctx)
    assert daemon.health() == (False, "scheduler not running")


# -- schedule helpers -----------------------------------------------------------------------------

NOW = datetime(2026, 3, 2, 10, 30, tzinfo=UTC)  # a Monday


@pytest.mark.parametrize(
    ("spec", "last", "expected"),
    [
        ("15m", None, NOW),  # never ran: due now
        ("15m", NOW - timedelta(minutes=5), NOW + timedelta(minutes=10)),  # carries on
        ("15m", NOW - timedelta(hours=2), NOW),  # overdue: now
        ("0 3 * * 1", None, datetime(2026, 3, 9, 3, 0, tzinfo=UTC)),  # next Monday 03:00
        ("*/20 * * * *", NOW - timedelta(days=3), datetime(2026, 3, 2, 10, 40, tzinfo=UTC)),
    ],
)
def test_first_run_time(spec: str, last: datetime | None, expected: datetime) -> None:
    assert first_run_time(spec, last, NOW) == expected


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("*", "*"),
        ("1", "mon"),  # crontab: 1 is Monday (APScheduler 3 alone would read Tuesday)
        ("0", "sun"),
        ("7", "sun"),
        ("1-5", "mon,tue,wed,thu,fri"),
        ("5-7", "sun,fri,sat"),
        ("1-5/2", "mon,wed,fri"),
        ("*/3", "sun,wed,sat"),
        ("sat,SUN", "sun,sat"),
    ],
)
def test_cron_day_of_week_keeps_the_crontab_meaning(field: str, expected: str) -> None:
    assert cron_day_of_week(field) == expected


def test_out_of_range_cron_names_its_config_key() -> None:
    with pytest.raises(ConfigError, match=r"config key schedule.retrain: '0 25 \* \* \*'"):
        build_trigger("0 25 * * *", "schedule.retrain")


def test_export_with_the_same_schedule_as_sync_only_runs_chained(
    make_settings: Callable[..., Any],
) -> None:
    same = make_settings(schedule={"sync": "15m", "export": "15m"})
    assert "export" not in scheduled_jobs(same) and "sync" in scheduled_jobs(same)
    other = make_settings(schedule={"sync": "15m", "export": "5m"})
    assert scheduled_jobs(other)["export"] == "5m"
