"""Job bookkeeping: every run recorded, failures kept, unchanged data not re-analysed (and
re-analysed as soon as anything it reads, or the configuration it depends on, changed)."""

from __future__ import annotations

from datetime import timedelta

from sqlmodel import Session, select

from leadloop import freshness
from leadloop.crm.base import EventIn, Page
from leadloop.export.outbox import bulk_update
from leadloop.jobs import run_job
from leadloop.sandbox.fake_platforms import FakePlatforms
from leadloop.store import session_scope
from leadloop.sync import apply_page
from leadloop.tables import Conversion, JobOutcome, JobRun, Lead
from tests.scoring_helpers import SIM_END, demo_context, load_funnel


def test_validation_is_skipped_until_a_lead_changes(sqlite_engine, tmp_path):
    ctx = demo_context(sqlite_engine, tmp_path)
    load_funnel(ctx, 400)
    ctx.now = lambda: SIM_END + timedelta(minutes=1)
    first = run_job(ctx, "validate")
    assert first.ok and "skipped" not in first.counts
    ctx.now = lambda: SIM_END + timedelta(minutes=2)
    assert run_job(ctx, "validate").counts["skipped"] == "no lead changed since the last validation"
    with Session(sqlite_engine) as s:
        crm_id = s.exec(select(Lead.crm_id)).first()
    ctx.now = lambda: SIM_END + timedelta(minutes=3)
    with session_scope(sqlite_engine) as session:
        apply_page(session, ctx, "hubspot", "contacts",
                   Page(events=[EventIn(crm_id, "pricing_view", SIM_END)]))
    ctx.now = lambda: SIM_END + timedelta(minutes=4)
    assert "skipped" not in run_job(ctx, "validate").counts
    ctx.now = lambda: SIM_END + timedelta(days=1)  # more leads are past their horizon: re-run
    assert "skipped" not in run_job(ctx, "validate").counts
    with Session(sqlite_engine) as s:
        runs = s.exec(select(JobRun).where(JobRun.name == "validate")).all()
    assert [r.outcome for r in runs] == [JobOutcome.ok] * 4
    assert all(r.finished_at is not None for r in runs)


def test_a_new_release_reruns_validation_on_an_unchanged_store(sqlite_engine, tmp_path,
                                                               monkeypatch):
    ctx = demo_context(sqlite_engine, tmp_path)
    load_funnel(ctx, 200)
    ctx.now = lambda: SIM_END + timedelta(minutes=1)
    assert "skipped" not in run_job(ctx, "validate").counts
    monkeypatch.setattr(freshness, "__version__", "99.0.0")
    assert "skipped" not in run_job(ctx, "validate").counts  # computed by the new release
    assert "skipped" in run_job(ctx, "validate").counts


def test_a_failing_job_is_recorded_with_its_error(sqlite_engine, tmp_path, monkeypatch):
    ctx = demo_context(sqlite_engine, tmp_path)
    monkeypatch.delenv("LEADLOOP_SANDBOX_HUBSPOT_TOKEN", raising=False)
    result = run_job(ctx, "sync")
    assert not result.ok and "LEADLOOP_SANDBOX_HUBSPOT_TOKEN is not set" in result.error
    with Session(sqlite_engine) as s:
        run = s.exec(select(JobRun)).one()
    assert run.outcome == JobOutcome.failed and "LEADLOOP_SANDBOX_HUBSPOT_TOKEN" in run.error


def test_score_and_report_skip_only_while_their_inputs_are_unchanged(sqlite_engine, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("LEADLOOP_SANDBOX_GOOGLE_TOKEN", "t0ken-g")
    monkeypatch.setenv("LEADLOOP_SANDBOX_META_TOKEN", "t0ken-m")
    with FakePlatforms(now=lambda: SIM_END) as platforms:
        ctx = demo_context(sqlite_engine, tmp_path, model={"min_leads": 200, "min_conversions": 30},
                           destinations={
            "google_data_manager": {"base_url": platforms.urls["google_data_manager"],
                                    "operating_account_id": "1234567890",
                                    "token_env": "LEADLOOP_SANDBOX_GOOGLE_TOKEN"},
            "meta": {"base_url": platforms.urls["meta"], "dataset_id": "100000000000001",
                     "token_env": "LEADLOOP_SANDBOX_META_TOKEN"}})
        ctx.out_dir = tmp_path / "out"
        load_funnel(ctx, 3000)  # enough for the gate's intervals
        minute = iter(range(1, 100))

        def run(name: str) -> dict:
            at = SIM_END + timedelta(minutes=next(minute))
            ctx.now = lambda: at
            result = run_job(ctx, name)
            assert result.ok, result.error
            return result.counts

        for name in ("score", "validate", "export", "report"):
            assert "skipped" not in run(name)
        assert "skipped" in run("score") and "skipped" in run("report")

    (ctx.out_dir / "report.html").unlink()  # a missing file is written again
    assert "skipped" not in run("report") and (ctx.out_dir / "report.html").exists()

    with Session(sqlite_engine) as s:  # an outbox row written by a later run: the report shows it
        conversion_id = s.exec(select(Conversion.id)).first()
    with session_scope(sqlite_engine) as session:
        bulk_update(session, [{"id": conversion_id, "hold_rule": "manual"}], job_run_id=10_000)
    assert "skipped" not in run("report")

    first, *rest = ctx.settings.stages  # an edited stage mapping changes the report
    ctx.settings = ctx.settings.model_copy(
        update={"stages": [first.model_copy(update={"value": 5.0}), *rest]})
    assert "skipped" not in run("report")
    assert "skipped" in run("report")

    with Session(sqlite_engine) as s:
        crm_id = s.exec(select(Lead.crm_id)).first()
    with session_scope(sqlite_engine) as session:
        apply_page(session, ctx, "hubspot", "contacts",
                   Page(events=[EventIn(crm_id, "pricing_view", SIM_END)]))
    counts = run("score")
    assert "skipped" not in counts and counts["scored"] == 1
    assert "skipped" not in run("report")
