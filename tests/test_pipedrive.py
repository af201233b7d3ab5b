"""Pipedrive specifics: v2 request shape, the token header, archived deals, won/lost times,
and pacing under the burst limit without drawing 429s."""

from __future__ import annotations

import pytest
from sqlmodel import select

from leadloop.crm import build_source
from leadloop.store import session_scope
from leadloop.sync import sync_source
from leadloop.tables import Lead, StageChange
from tests.crm_harnesses.pipedrive import PipedriveHarness


@pytest.fixture
def pd(monkeypatch):
    h = PipedriveHarness()
    h.start()
    for k, v in h.env().items():
        monkeypatch.setenv(k, v)
    yield h
    h.stop()


def _ctx(pd, engine, make_settings, **crm):
    sections = pd.settings_sections()
    sections["crm"] = {**sections["crm"], **crm}
    return pd.make_context(engine, lambda **kw: make_settings(**{**kw, **sections}))


def test_v2_requests_use_header_token_cursor_and_updated_since(pd, sqlite_engine, make_settings):
    pd.seed(60)
    ctx = _ctx(pd, sqlite_engine, make_settings, page_size=2000)
    sync_source(ctx, build_source(ctx))
    pd.update(2)
    sync_source(ctx, build_source(ctx))
    received = pd.fake.server.received
    assert all(r.path.startswith("/api/v2/") for r in received)
    assert all(r.header("x-api-token") == pd.fake.token and "api_token" not in r.query for r in received)
    persons = [r for r in received if r.path == "/api/v2/persons"]
    assert all(r.arg("limit") == "500" and r.arg("sort_by") == "update_time"
               and r.arg("sort_direction") == "asc" for r in persons)
    assert persons[-1].arg("updated_since", "").endswith("Z")
    with session_scope(sqlite_engine) as s:
        lead = s.exec(select(Lead).where(Lead.crm_id == "1")).one()
        assert lead.email_sha256 and lead.gclid == "gclid-1"


def test_archived_and_won_deals_keep_their_stage_times(pd, sqlite_engine, make_settings):
    a, b = pd.seed(2)
    for _ in range(4):
        pd.advance_stage(a)  # through every stage to won
    won_at = pd.clock.now()
    deal_b = pd._deal_of[b]
    pd.fake.touch(pd.fake.deals, deal_b, is_archived=True)
    ctx = _ctx(pd, sqlite_engine, make_settings)
    sync_source(ctx, build_source(ctx))
    with session_scope(sqlite_engine) as s:
        rows = s.exec(select(Lead.crm_id, StageChange.field, StageChange.value, StageChange.entered_at)
                      .join(Lead, Lead.id == StageChange.lead_id)).all()
    facts = {(c, f, v): t for c, f, v, t in rows}
    assert facts[(a, "status", "won")] == won_at
    assert (a, "stage", "Negotiations") in facts and (a, "stage", "Lead In") in facts
    assert (b, "stage", "Lead In") in facts  # from /deals/archived
    assert any(r.path == "/api/v2/deals/archived" for r in pd.fake.server.received)


def test_burst_limit_is_paced_without_429s(pd, sqlite_engine, make_settings):
    pd.fake.burst = 6
    pd.seed(12)
    ctx = _ctx(pd, sqlite_engine, make_settings, page_size=4, requests_per_10s=25)
    source = build_source(ctx)
    sync_source(ctx, source)
    assert pd.fake.throttled == 0  # 25 per 10 s against 6 per 2 s: no 429 drawn
    assert source.requests == 3 + 3 + 1 + 1  # persons, deals, archived deals, stages
