"""The daemon in-process, with fake job bodies: scheduling, ordering, failures, the lease,
graceful stop, health and metrics. (The real daemon as a subprocess: test_daemon_process.py.)

Schedules run on a fake clock (tests/fake_clock.py): a test moves it on and the jobs due run,
instead of sleeping through real one-second schedules."""

from __future__ import annotations

import logging
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
from leadloop.daemon import Daemon, run_daemon
from leadloop.errors import ConfigError, LeaseHeldError, SourceError
from leadloop.schedule import build_trigger, cron_day_of_week, first_run_time, scheduled_jobs
from leadloop.store import session_scope
from leadloop.tables import JobOutcome, JobRun
from tests.daemon_helpers import gdm_stage, ingested_ids
from tests.fake_clock import FakeClock, wait_until

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


def start_in_thread(ctx: Context, clock: FakeClock | None = None, **kwargs: Any
                    ) -> tuple[threading.Thread, dict[str, Any]]:
    """Run the daemon in a thread; with `clock`, its scheduler runs on that clock, and this
    returns once the jobs due at the start have run."""
    out: dict[str, Any] = {}
    daemon = Daemon(ctx)
    if clock is not None:
        clock.watch(daemon.scheduler)

    def target() -> None:
        try:
            out["code"] = daemon.run(**kwargs)
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    if clock is not None:
        wait_until(lambda: daemon.scheduler.running or "error" in out, what="the scheduler")
        clock.advance(0)
    return thread, out


def stop(ctx: Context, thread: threading.Thread, timeout: float = 15) -> None:
    ctx.stop.set()
    thread.join(timeout)
    assert not thread.is_alive(), "daemon did not stop in time"


def job_runs(engine: Engine) -> list[JobRun]:
    with session_scope(engine) as session:
        return list(session.exec(select(JobRun).order_by(JobRun.id)))  # type: ignore[arg-type]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock(datetime.now(UTC).replace(microsecond=0))
    fake.install(monkeypatch)
    return fake


@pytest.fixture
def fast_ctx(make_context: Callable[..., Context], engine: Engine, clock: FakeClock) -> Context:
    ctx = make_context(engine, schedule=FAST)
    ctx.now = clock.now
    return ctx


def test_jobs_run_on_schedule_and_export_follows_each_sync(
    fast_ctx: Context, recorder: Recorder, engine: Engine, clock: FakeClock
) -> None:
    thread, out = start_in_thread(fast_ctx, clock, wait=False)
    assert (recorder.starts("sync"), recorder.starts("score")) == (1, 1)  # due at start
    clock.advance(0.5)
    assert recorder.starts("sync") == 1  # not yet due
    for _ in range(2):
        clock.advance(1)
    stop(fast_ctx, thread)
    assert out == {"code": 0}
    assert recorder.starts("sync") == 3 and recorder.starts("score") == 3
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
    caplog: pytest.LogCaptureFixture, clock: FakeClock,
) -> None:
    monkeypatch.setitem(jobs.JOBS, "sync", recorder.body("sync", fail=SourceError("CRM down")))
    monkeypatch.setitem(jobs.JOBS, "score", recorder.body("score", fail=RuntimeError("bug")))
    thread, out = start_in_thread(fast_ctx, clock, wait=False)
    clock.advance(1)
    stop(fast_ctx, thread)
    assert out == {"code": 0}
    assert recorder.starts("sync") == 2 and recorder.starts("score") == 2
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
    fast_ctx: Context, recorder: Recorder, engine: Engine, clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "leadloop.daemon")
    assert lease.acquire(engine, "other", timedelta(seconds=60), clock.now())
    daemon = Daemon(fast_ctx)
    clock.watch(daemon.scheduler)
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(code=daemon.run(wait=True)), daemon=True)
    thread.start()
    wait_until(lambda: "waiting for the lease" in caplog.text, what="the daemon to wait")
    assert recorder.events == [] and thread.is_alive()
    lease.release(engine, "other")
    wait_until(lambda: daemon.scheduler.running, what="the lease to be taken")  # polls it 1/s
    clock.advance(0)
    assert lease.holder(engine).owner == daemon.owner  # type: ignore[union-attr]
    assert recorder.starts("sync") == 1
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
    thread, out = start_in_thread(fast_ctx, wait=False)  # the export runs at start
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
    fast_ctx: Context, recorder: Recorder, engine: Engine, clock: FakeClock
) -> None:
    thread, out = start_in_thread(fast_ctx, clock, wait=False)
    holder = lease.holder(engine)
    assert holder is not None
    # another daemon took the lease over (as if ours had expired while we stalled)
    lease.release(engine, holder.owner)
    assert lease.acquire(engine, "usurper", timedelta(seconds=60), clock.now())
    clock.advance(1)  # the next heartbeat (every lease_seconds / 3) finds it gone
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
    make_context: Callable[..., Context], engine: Engine, recorder: Recorder, clock: FakeClock
) -> None:
    port = free_port()
    ctx = make_context(engine, schedule=FAST, health={"port": port})
    ctx.now = clock.now
    thread, out = start_in_thread(ctx, clock, wait=False)
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


# -- the real daemon as a subprocess, against the sandbox ---------------------------------------

E2E_TOKEN = "pat-na1-e2e-SECRET-5d1e0c"
E2E_CONFIG = """
[database]
url = "sqlite:///{db}"

[crm]
kind = "hubspot"
base_url = "{hubspot}"
token_env = "LEADLOOP_E2E_TOKEN"
lookback_minutes = 1
[crm.properties]
consent_ad_user_data = "ll_consent_ad_user_data"
consent_ad_personalization = "ll_consent_ad_personalization"
{stage}

[schedule]
sync = "2s"
export = "2s"
score = "3s"
validate = "4s"
retrain = "0 3 * * *"
report = "0 7 * * *"
misfire_grace_seconds = 5
lease_seconds = 6
stop_timeout_seconds = 20

[model]
dir = "{tmp}/models"
"""


def leadloop(cfg: Any, *args: str, **kwargs: Any) -> Any:
    import os
    import subprocess
    import sys

    env = {**os.environ, "LEADLOOP_E2E_TOKEN": E2E_TOKEN}
    return subprocess.Popen([sys.executable, "-m", "leadloop", "-c", str(cfg), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_daemon_process_runs_cycles_refuses_a_twin_and_stops_cleanly_mid_export(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import signal

    from leadloop.sandbox.fake_hubspot import FakeHubSpot
    from leadloop.sandbox.fake_platforms import FakePlatforms
    from leadloop.store import make_engine
    from leadloop.tables import Conversion, ConversionStatus

    real_ingest = FakePlatforms._dm_ingest

    def slow_ingest(self: FakePlatforms, req: Any) -> Any:
        time.sleep(0.15)  # a real upload takes a while: keeps an export in flight
        return real_ingest(self, req)

    monkeypatch.setattr(FakePlatforms, "_dm_ingest", slow_ingest)
    hubspot = FakeHubSpot(token=E2E_TOKEN, requests_per_window=None, search_per_second=None)
    platforms = FakePlatforms(require_token=E2E_TOKEN)
    hubspot.start()
    platforms.start()
    added: list[str] = []

    def add_qualified(n: int) -> None:
        for _ in range(n):
            now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            i = len(added)
            added.append(hubspot.add_contact(
                createdate=now, email=f"person{i}@example.org", hs_google_click_id=f"Cj0KCQ-e2e-{i}",
                lifecyclestage="salesqualifiedlead", hs_v2_date_entered_salesqualifiedlead=now,
                ll_consent_ad_user_data="true", ll_consent_ad_personalization="true"))

    cfg = tmp_path / "leadloop.toml"
    db = tmp_path / "leadloop.db"
    stage = gdm_stage(stage="Sales qualified", value=400.0, destination="google_data_manager",
                      customer="700000002", url=platforms.urls["google_data_manager"],
                      token_env="LEADLOOP_E2E_TOKEN", batch_size=3)
    cfg.write_text(E2E_CONFIG.format(db=db, hubspot=hubspot.base_url, tmp=tmp_path, stage=stage))
    engine = make_engine(f"sqlite:///{db}")
    adding = threading.Event()

    def keep_adding() -> None:
        while not adding.wait(0.7):
            add_qualified(4)

    def runs(name: str, outcome: JobOutcome) -> int:
        return sum(1 for r in job_runs(engine) if r.name == name and r.outcome == outcome)

    add_qualified(12)
    daemon = leadloop(cfg, "--log-format", "json", "run")
    adder = threading.Thread(target=keep_adding, daemon=True)
    adder.start()
    try:
        wait_for(lambda: lease.holder(engine) is not None, 20, "the daemon's lease")
        twin = leadloop(cfg, "run")
        _, twin_err = twin.communicate(timeout=30)
        assert twin.returncode == 1
        assert "Error: another leadloop daemon holds the lease on this database: " in twin_err
        assert lease.holder(engine).owner.split(":")[1] == str(daemon.pid)  # type: ignore[union-attr]

        # several cycles, then SIGTERM while an export is uploading
        wait_for(lambda: runs("sync", JobOutcome.ok) >= 3 and runs("export", JobOutcome.ok) >= 2,
                 60, "three sync cycles")
        seen = len(platforms.received("google_data_manager"))
        wait_for(lambda: any(r.name == "export" and r.outcome == JobOutcome.running
                             for r in job_runs(engine))
                 and len(platforms.received("google_data_manager")) > seen, 30, "an export in flight")
        adding.set()
        stopped_at = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        _, logs = daemon.communicate(timeout=30)
        assert daemon.returncode == 0, logs[-3000:]
        assert time.monotonic() - stopped_at < 10
    finally:
        adding.set()
        if daemon.poll() is None:
            daemon.kill()
    assert lease.holder(engine) is None
    assert not [r for r in job_runs(engine) if r.outcome == JobOutcome.running]
    assert any(r.name == "score" for r in job_runs(engine))  # the other jobs are scheduled too

    # JSON log lines, the stop is logged, and no secret or e-mail in them
    entries = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    messages = [e["message"] for e in entries]
    assert any(m.startswith("SIGTERM received: finishing the batch in flight") for m in messages)
    assert any("lease released" in m for m in messages)
    assert E2E_TOKEN not in logs and "@example.org" not in logs

    # finish what the interrupted export left, then compare store and platform: nothing lost,
    # nothing sent twice, nothing accepted that the store does not know as sent
    for job in ("sync", "export"):
        once = leadloop(cfg, job)
        out, err = once.communicate(timeout=60)
        assert once.returncode == 0, out + err
    with session_scope(engine) as session:
        conversions = list(session.exec(select(Conversion)))
    assert len(conversions) == len(added)
    assert {c.status for c in conversions} == {ConversionStatus.sent}, [
        (c.status, c.hold_rule, c.last_error) for c in conversions if c.status != ConversionStatus.sent]
    ledger = platforms.ledgers["google_data_manager"]
    assert set(ledger) == {c.order_id for c in conversions}
    sent = ingested_ids(platforms)
    assert len(sent) == len(added) and set(sent.values()) == {1}

    status = leadloop(cfg, "status", "--json")
    out, err = status.communicate(timeout=30)
    assert status.returncode == 0, out + err
    data = json.loads(out)
    assert data["daemon"] is None and data["failed_jobs"] == []
    assert data["jobs"]["sync"]["last_run"]["outcome"] == "ok"
    assert data["conversions"]["google_data_manager"]["sent"] == len(added)
    engine.dispose()
    hubspot.stop()
    platforms.stop()
