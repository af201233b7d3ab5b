"""Salesforce specifics: SOQL shape, OAuth flows and the one-refresh rule, history fallbacks,
query-locator restarts, and no token in errors or logs."""

from __future__ import annotations

import logging

import pytest
from sqlmodel import select

from leadloop.crm import build_source
from leadloop.crm.salesforce import SalesforceApiError, soql_datetime
from leadloop.errors import FatalSourceError
from leadloop.store import session_scope
from leadloop.sync import sync_source
from leadloop.tables import Lead, StageChange
from tests.crm_harnesses.salesforce import SalesforceHarness


class _NoSessions(set):
    def add(self, _token: str) -> None:
        pass


@pytest.fixture
def sf(monkeypatch):
    h = SalesforceHarness()
    h.start()
    for k, v in h.env().items():
        monkeypatch.setenv(k, v)
    yield h
    h.stop()


def _ctx(sf, engine, make_settings, **crm):
    sections = sf.settings_sections()
    sections["crm"] = {**sections["crm"], **crm}
    return sf.make_context(engine, lambda **kw: make_settings(**{**kw, **sections}))


def test_soql_uses_z_datetimes_queryall_and_modstamp_order(sf, sqlite_engine, make_settings):
    sf.seed(3)
    ctx = _ctx(sf, sqlite_engine, make_settings)
    sync_source(ctx, build_source(ctx))
    sf.update(1)
    sync_source(ctx, build_source(ctx))
    lead_queries = [q for q in sf.fake.queries if q.startswith("SELECT Id, Status") and "WHERE" in q]
    assert lead_queries and all("SystemModstamp >= 2026-" in q and q.rstrip().endswith(
        "ORDER BY SystemModstamp ASC, Id ASC") and "+0000" not in q for q in lead_queries)
    assert any(r.path.endswith("/queryAll") for r in sf.fake.server.received)
    assert soql_datetime(sf.clock.now()) == "2026-11-02T11:00:00Z"
    with session_scope(sqlite_engine) as s:
        lead = s.exec(select(Lead)).first()
        assert lead.gclid and lead.gclid.startswith("gclid-") and lead.utm_campaign == "autumn"


def test_expired_session_is_refreshed_once(sf, sqlite_engine, make_settings):
    sf.seed(250)
    ctx = _ctx(sf, sqlite_engine, make_settings)
    source = build_source(ctx)
    pages = source.fetch("Lead", None, started_at=ctx.now())
    next(pages)
    sf.fake.expire_tokens()  # the session dies mid-pagination
    assert sum(len(p.leads) for p in pages) == 50
    assert source.client.oauth.refreshes == 2


def test_refused_session_fails_clearly_without_the_token(sf, sqlite_engine, make_settings, caplog):
    caplog.set_level(logging.DEBUG)
    sf.seed(2)
    ctx = _ctx(sf, sqlite_engine, make_settings)
    source = build_source(ctx)
    token = source.client.oauth.token()
    sf.fake.tokens = _NoSessions()  # the org accepts no session at all (policy block)
    with pytest.raises(FatalSourceError, match=r"INVALID_SESSION_ID.*even after a token refresh") as err:
        list(source.fetch("Lead", None, started_at=ctx.now()))
    assert token not in str(err.value) and token not in caplog.text
    assert sf.fake.refresh_token not in caplog.text


def test_client_credentials_flow(sf, sqlite_engine, make_settings, monkeypatch):
    sf.seed(4)
    ctx = _ctx(sf, sqlite_engine, make_settings, auth_flow="client_credentials",
               refresh_token_env=None)
    assert sync_source(ctx, build_source(ctx))["leads"] == 4
    assert b"grant_type=client_credentials" in sf.fake.server.received[0].body


def test_query_locator_dying_on_refresh_restarts_from_the_cursor(sf, sqlite_engine, make_settings):
    sf.seed(450)
    sf.fake.locators_die_on_refresh = True
    ctx = _ctx(sf, sqlite_engine, make_settings)
    source = build_source(ctx)
    pages = source.fetch("Lead", None, started_at=ctx.now())
    first = next(pages)
    source.client.oauth.invalidate()  # token rotation mid-way kills the locator
    ids = {lead.crm_id for p in [first, *pages] for lead in p.leads}
    assert len(ids) == 450


def test_untracked_lead_history_is_tolerated(sf, sqlite_engine, make_settings):
    sf.fake.lead_history_enabled = False
    ids = sf.seed(3)
    sf.advance_stage(ids[0])
    ctx = _ctx(sf, sqlite_engine, make_settings)
    counts = sync_source(ctx, build_source(ctx))
    assert counts["leads"] == 3 and counts["rejected"] == 0
    with session_scope(sqlite_engine) as s:
        values = set(s.exec(select(StageChange.value)).all())
    assert values == {"Open - Not Contacted", "Closed - Converted", "Prospecting"}


def test_unknown_gclid_field_names_the_config_key(sf, sqlite_engine, make_settings):
    sf.seed(1)
    ctx = _ctx(sf, sqlite_engine, make_settings, properties={"gclid": "Gclid_Custom__c"})
    with pytest.raises(SalesforceApiError) as err:
        sync_source(ctx, build_source(ctx))
    assert err.value.code == "INVALID_FIELD" and "crm.properties" in (err.value.hint or "")
