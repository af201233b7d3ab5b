"""One contract suite, run against every CRM connector through its harness (see
tests/crm_harnesses/__init__.py): first sync, incremental sync, deletes, merges, stage history,
rate limits and faults. The assertions are record counts: nothing lost, nothing doubled."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from importlib import import_module
from typing import get_args

import pytest
from sqlalchemy import func
from sqlmodel import select

from leadloop.config import CrmKind
from leadloop.context import Context
from leadloop.crm import CRM_KINDS, build_source
from leadloop.errors import QuotaExhaustedError
from leadloop.jobs import run_job
from leadloop.store import session_scope
from leadloop.sync import sync_source
from leadloop.tables import JobRun, Lead, StageChange, SyncState
from tests.crm_harnesses import HARNESSES, Faults, Harness, load_harness


@pytest.fixture(params=sorted(HARNESSES))
def harness(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    h = load_harness(request.param)
    h.start()
    for k, v in h.env().items():
        monkeypatch.setenv(k, v)
    yield h
    h.stop()


@pytest.fixture
def ctx(harness: Harness, engine, make_settings) -> Context:
    return harness.make_context(engine, make_settings)


def test_every_crm_module_is_a_config_kind_with_a_source_and_a_harness() -> None:
    """A CRM is its module: the registry finds it, and the config and this suite must know it."""
    assert tuple(sorted(get_args(CrmKind))) == CRM_KINDS
    assert HARNESSES == CRM_KINDS  # every connector runs this suite
    for kind in CRM_KINDS:
        source = import_module(f"leadloop.crm.{kind}").SOURCE
        assert callable(source.fetch) and callable(source.streams), kind
        assert isinstance(source.needs_stored_ids, tuple | frozenset | set), kind


def _needs(harness: Harness, feature: str) -> None:
    if feature not in harness.supports:
        pytest.skip(f"{harness.kind} fake does not produce {feature!r}")


def sync(ctx: Context) -> dict[str, int]:
    return sync_source(ctx, build_source(ctx))


def stored_leads(ctx: Context) -> dict[str, str]:
    with session_scope(ctx.engine) as s:
        rows = s.exec(select(Lead.crm_id, Lead.status)).all()
    ids = [r[0] for r in rows]
    assert len(ids) == len(set(ids)), "a lead is stored twice"
    return {crm_id: str(status.value if hasattr(status, "value") else status)
            for crm_id, status in rows}


def stored_stages(ctx: Context) -> Counter[tuple[str, str, str]]:
    with session_scope(ctx.engine) as s:
        rows = s.exec(select(Lead.crm_id, StageChange.field, StageChange.value, Lead.status)
                      .join(Lead, Lead.id == StageChange.lead_id)).all()
    return Counter((c, f, v) for c, f, v, status in rows if str(status) == "active")


def assert_matches(harness: Harness, ctx: Context) -> None:
    assert stored_leads(ctx) == harness.expected_leads()
    stages = stored_stages(ctx)
    assert set(stages) == harness.expected_stages()


def test_first_sync_backfills_everything(harness: Harness, ctx: Context) -> None:
    ids = harness.seed(45)
    for crm_id in ids[:10]:
        harness.advance_stage(crm_id)
    counts = sync(ctx)
    assert counts["leads"] >= 45
    assert counts.get("rejected", 0) == 0
    assert_matches(harness, ctx)
    with session_scope(ctx.engine) as s:
        lead = s.exec(select(Lead).where(Lead.crm_id == ids[0])).one()
        assert lead.email_sha256 and lead.phone_e164_sha256  # hashed at ingestion
        assert "@" not in str(lead.attributes)  # clear e-mail never stored


def test_incremental_sync_reads_changes_only(harness: Harness, ctx: Context) -> None:
    _needs(harness, "incremental")
    harness.seed(30)
    sync(ctx)
    first = harness.update(4)  # an hour later
    sync(ctx)  # re-reads the look-back window before the first cursor: the seeded leads
    second = harness.update(3)  # another hour later, other leads
    counts = sync(ctx)
    # Only the changes: the 3 new ones plus the 4 inside the look-back of the last cursor.
    assert counts["leads"] == len(set(first) | set(second)) == 7
    assert_matches(harness, ctx)
    assert len(stored_leads(ctx)) == 30
    with session_scope(ctx.engine) as s:
        states = s.exec(select(SyncState)).all()
        assert states and all(st.cursor_updated_at <= ctx.now() for st in states
                              if st.cursor_updated_at is not None)


def test_deletes_are_reflected(harness: Harness, ctx: Context) -> None:
    _needs(harness, "delete")
    harness.seed(20)
    sync(ctx)
    gone = harness.delete(3)
    counts = sync(ctx)
    assert counts["deleted"] == len(gone)
    leads = stored_leads(ctx)
    assert len(leads) == 20  # marked, not dropped
    assert {i for i, st in leads.items() if st == "deleted"} == set(gone)
    assert_matches(harness, ctx)


def test_merges_mark_the_absorbed_lead(harness: Harness, ctx: Context) -> None:
    _needs(harness, "merge")
    a, b, c = harness.seed(3)
    sync(ctx)
    harness.merge(a, b)
    counts = sync(ctx)
    assert counts["merged"] == 1
    leads = stored_leads(ctx)
    assert leads == {a: "active", b: "merged", c: "active"}
    with session_scope(ctx.engine) as s:
        survivor = s.exec(select(Lead).where(Lead.crm_id == a)).one()
        absorbed = s.exec(select(Lead).where(Lead.crm_id == b)).one()
        assert absorbed.merged_into_id == survivor.id


def test_stage_history_is_backfilled_and_extended(harness: Harness, ctx: Context) -> None:
    _needs(harness, "stage_history")
    ids = harness.seed(12)
    for crm_id in ids[:6]:
        harness.advance_stage(crm_id)
    sync(ctx)
    assert_matches(harness, ctx)
    entered = [harness.advance_stage(crm_id) for crm_id in ids[:3]]
    sync(ctx)
    stages = stored_stages(ctx)
    for crm_id, (field, value) in zip(ids[:3], entered, strict=True):
        assert stages[(crm_id, field, value)] == 1
    assert set(stages) == harness.expected_stages()


@pytest.mark.parametrize("fault", ["server_errors", "dropped_connections", "rate_limited",
                                   "repeated_pages"])
def test_faults_lose_and_double_nothing(harness: Harness, ctx: Context, fault: str) -> None:
    _needs(harness, fault)
    harness.seed(60)
    harness.inject_faults(Faults(**{fault: 2}))
    sync(ctx)
    assert_matches(harness, ctx)
    with session_scope(ctx.engine) as s:
        assert s.exec(select(func.count()).select_from(Lead)).one() == 60


def test_daily_quota_stops_cleanly_then_resumes(harness: Harness, ctx: Context) -> None:
    _needs(harness, "daily_quota")
    harness.seed(25)
    harness.inject_faults(Faults(daily_quota_exhausted=True))
    result = run_job(ctx, "sync")
    assert not result.ok and result.error
    assert "resume" in result.error.lower()  # says when the sync can go on
    with session_scope(ctx.engine) as s:
        run = s.exec(select(JobRun)).one()
        assert run.outcome.value == "failed"
    harness.inject_faults(Faults())  # the budget is back
    sync(ctx)
    assert_matches(harness, ctx)


def test_quota_error_is_the_quota_class(harness: Harness, ctx: Context) -> None:
    _needs(harness, "daily_quota")
    harness.seed(2)
    harness.inject_faults(Faults(daily_quota_exhausted=True))
    with pytest.raises(QuotaExhaustedError):
        sync(ctx)
