"""`leadloop status`: last runs, next runs, outbox counts, the lease holder, and the exit code."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from click.testing import CliRunner
from sqlalchemy.engine import Engine

from leadloop import lease
from leadloop.cli import cli
from leadloop.context import Context
from leadloop.status import collect_status, format_status
from leadloop.store import make_engine, session_scope
from leadloop.tables import Conversion, ConversionStatus, JobOutcome, JobRun, Lead

NOW = datetime(2026, 3, 2, 10, 30, tzinfo=UTC)  # a Monday
SCHEDULE = {"sync": "15m", "export": "5m", "score": "1h", "validate": None,
            "retrain": "0 3 * * 1", "report": None}
DESTINATIONS = {"google_ads": {"customer_id": "1234567890"}, "meta": {"dataset_id": "42"}}


def run(name: str, minutes_ago: float, outcome: JobOutcome, secs: float = 2.0, **kw: object) -> JobRun:
    start = NOW - timedelta(minutes=minutes_ago)
    return JobRun(name=name, started_at=start, finished_at=start + timedelta(seconds=secs),
                  outcome=outcome, **kw)


def fill(engine: Engine) -> None:
    with session_scope(engine) as session:
        session.add_all([
            run("sync", 30, JobOutcome.failed, error="config key crm.token_env: not set"),
            run("sync", 5, JobOutcome.ok, counts={"leads": 12, "pages": 2}),
            run("export", 3, JobOutcome.failed, error="meta: 503 after 5 attempts"),
            run("score", 70, JobOutcome.ok, counts={"scored": 40}),
        ])
        lead = Lead(source="hubspot", crm_id="1", created_at=NOW)
        session.add(lead)
        session.flush()
        statuses = [ConversionStatus.sent] * 3 + [ConversionStatus.pending, ConversionStatus.dead]
        for i, st in enumerate(statuses):
            session.add(Conversion(order_id=f"o{i}", destination="google_ads", lead_id=lead.id,
                                   stage=f"S{i}", conversion_action="a", conversion_time=NOW,
                                   value=Decimal(1), status=st))


def make_ctx(make_context: Callable[..., Context], engine: Engine) -> Context:
    ctx = make_context(engine, schedule=SCHEDULE, destinations=DESTINATIONS)
    ctx.now = lambda: NOW
    return ctx


def test_collect_status(engine: Engine, make_context: Callable[..., Context]) -> None:
    fill(engine)
    lease.acquire(engine, "host:1:abc", timedelta(seconds=60), NOW - timedelta(seconds=10))
    data = collect_status(make_ctx(make_context, engine))
    json.dumps(data)  # JSON-able as is
    jobs = data["jobs"]
    assert jobs["sync"]["last_run"] == {
        "started_at": "2026-03-02T10:25:00Z", "finished_at": "2026-03-02T10:25:02Z",
        "seconds": 2.0, "outcome": "ok", "counts": {"leads": 12, "pages": 2}, "error": None,
    }
    assert jobs["sync"]["next_run"] == "2026-03-02T10:40:00Z"  # 15m after its last start
    assert jobs["export"]["next_run"] == "2026-03-02T10:32:00Z"  # own 5m schedule comes first
    assert jobs["score"]["next_run"] == "2026-03-02T10:30:00Z"  # overdue: now
    assert jobs["retrain"] == {"schedule": "0 3 * * 1", "next_run": "2026-03-09T03:00:00Z",
                               "last_run": None}
    assert jobs["validate"] == {"schedule": None, "next_run": None, "last_run": None}
    assert data["conversions"]["google_ads"] == {
        "pending": 1, "held": 0, "sent": 3, "rejected": 0, "failed": 0, "dead": 1, "withdrawn": 0}
    assert set(data["conversions"]["meta"].values()) == {0}
    assert data["daemon"]["owner"] == "host:1:abc" and data["daemon"]["live"] is True
    # sync recovered after its failure; export's last run failed
    assert data["failed_jobs"] == ["export"]


def test_format_status(engine: Engine, make_context: Callable[..., Context]) -> None:
    fill(engine)
    text = format_status(collect_status(make_ctx(make_context, engine)))
    lines = text.splitlines()
    assert lines[0] == "leadloop status at 2026-03-02T10:30:00Z"
    assert lines[1] == "daemon:  not running (no lease was ever taken)"
    sync = next(line for line in lines if line.startswith("sync "))
    assert sync.split() == ["sync", "15m", "2026-03-02T10:25:00Z", "2.0", "ok",
                            "2026-03-02T10:40:00Z", "leads=12,", "pages=2"]
    assert "          error: meta: 503 after 5 attempts" in lines
    google = next(line for line in lines if line.startswith("google_ads"))
    assert google.split() == ["google_ads", "1", "0", "3", "0", "0", "1", "0"]
    assert lines[-1] == "FAILED (last run): export"


def test_expired_lease_shows_the_daemon_as_not_running(
    engine: Engine, make_context: Callable[..., Context]
) -> None:
    lease.acquire(engine, "host:9:dead", timedelta(seconds=60), NOW - timedelta(minutes=5))
    text = format_status(collect_status(make_ctx(make_context, engine)))
    assert "daemon:  not running (lease of host:9:dead expired 2026-03-02T10:26:00Z)" in text


def test_cli_status_exit_code_follows_failed_jobs(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    cfg = tmp_path / "leadloop.toml"
    cfg.write_text(f"""
[database]
url = "sqlite:///{db}"
[crm]
kind = "hubspot"
token_env = "HUBSPOT_TOKEN"
[[stages]]
name = "Qualified"
crm_values = ["salesqualifiedlead"]
macro = true
""")
    runner = CliRunner()
    result = runner.invoke(cli, ["-c", str(cfg), "status", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["failed_jobs"] == []
    engine = make_engine(f"sqlite:///{db}")
    with session_scope(engine) as session:
        session.add(run("report", 1, JobOutcome.failed, error="no data"))
    engine.dispose()
    result = runner.invoke(cli, ["-c", str(cfg), "status"], catch_exceptions=False)
    assert result.exit_code == 1
    assert "FAILED (last run): report" in result.output
