"""Job bookkeeping: every run recorded, failures kept, unchanged data not re-analysed."""

from __future__ import annotations

from datetime import timedelta

from sqlmodel import Session, select

from leadloop.crm.base import EventIn, Page, apply_page
from leadloop.jobs import run_job
from leadloop.store import session_scope
from leadloop.tables import JobOutcome, JobRun, Lead
from tests.scoring_helpers import SIM_END, demo_context, load_funnel


def test_validation_is_skipped_until_a_lead_changes(sqlite_engine, tmp_path):
    ctx = demo_context(sqlite_engine, tmp_path)
    load_funnel(ctx, 400)
    ctx.now = lambda: SIM_END + timedelta(minutes=1)
    first = run_job(ctx, "validate")
    assert first.ok and "skipped" not in first.counts
    ctx.now = lambda: SIM_END + timedelta(minutes=2)
    assert run_job(ctx, "validate").counts == {"skipped": "no lead changed since the last validation"}
    with Session(sqlite_engine) as s:
        crm_id = s.exec(select(Lead.crm_id)).first()
    ctx.now = lambda: SIM_END + timedelta(minutes=3)
    with session_scope(sqlite_engine) as session:
        apply_page(session, ctx, "hubspot", "contacts",
                   Page(events=[EventIn(crm_id, "pricing_view", SIM_END)]))
    ctx.now = lambda: SIM_END + timedelta(minutes=4)
    assert "skipped" not in run_job(ctx, "validate").counts
    with Session(sqlite_engine) as s:
        runs = s.exec(select(JobRun).where(JobRun.name == "validate")).all()
    assert [r.outcome for r in runs] == [JobOutcome.ok] * 3
    assert all(r.finished_at is not None for r in runs)


def test_a_failing_job_is_recorded_with_its_error(sqlite_engine, tmp_path, monkeypatch):
    ctx = demo_context(sqlite_engine, tmp_path)
    monkeypatch.delenv("LEADLOOP_SANDBOX_HUBSPOT_TOKEN", raising=False)
    result = run_job(ctx, "sync")
    assert not result.ok and "LEADLOOP_SANDBOX_HUBSPOT_TOKEN is not set" in result.error
    with Session(sqlite_engine) as s:
        run = s.exec(select(JobRun)).one()
    assert run.outcome == JobOutcome.failed and "LEADLOOP_SANDBOX_HUBSPOT_TOKEN" in run.error
