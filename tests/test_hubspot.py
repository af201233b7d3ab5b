"""HubSpot connector against the fake HubSpot server (a real HTTP server on 127.0.0.1)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlmodel import func, select

from leadloop.context import Context
from leadloop.crm.hubspot import HubSpotSource
from leadloop.errors import FatalSourceError, QuotaExhaustedError
from leadloop.http import make_session
from leadloop.sandbox.fake_hubspot import FakeHubSpot, micro_property
from leadloop.sandbox.simulator import MICRO_CONVERSIONS, simulate
from leadloop.store import session_scope
from leadloop.sync import sync_source
from leadloop.tables import Lead, LeadEvent, LeadStatus, RejectedRecord, StageChange, SyncState

TOKEN = "pat-na1-test-secret-0123456789"
ENV = "LEADLOOP_TEST_HUBSPOT_TOKEN"


class Clock:
    def __init__(self) -> None:
        self.t = datetime(2026, 10, 2, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.t

    def tick(self, minutes: float = 60) -> None:
        self.t += timedelta(minutes=minutes)


def crm_section(base_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "hubspot", "base_url": base_url, "token_env": ENV, "lookback_minutes": 10,
        "properties": {
            "gbraid": "ll_gbraid", "wbraid": "ll_wbraid", "msclkid": "ll_msclkid",
            "meta_lead_id": "ll_meta_lead_id", "utm_source": "ll_utm_source",
            "utm_medium": "ll_utm_medium", "utm_campaign": "ll_utm_campaign", "country": "country",
            "consent_ad_user_data": "ll_consent_ad_user_data",
            "consent_ad_personalization": "ll_consent_ad_personalization",
        },
        "extra_properties": ["ll_company_size", "ll_job_level", "industry"],
        **extra,
    }


MICRO = [{"name": m, "property": micro_property(m)} for m in MICRO_CONVERSIONS]


def fast_http(**kwargs: Any):
    kwargs.setdefault("backoff_factor", 0.0)
    kwargs["timeout"] = (2.0, 5.0)
    return make_session(**kwargs)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, TOKEN)


@pytest.fixture
def fake(clock: Clock) -> Iterator[FakeHubSpot]:
    with FakeHubSpot(simulate(400, seed=3), token=TOKEN, now=clock, requests_per_window=None,
                     search_per_second=None) as hs:
        yield hs


def make_ctx(engine, make_settings, fake: FakeHubSpot, clock: Clock, **crm: Any) -> Context:
    settings = make_settings(crm=crm_section(fake.base_url, **crm), micro_conversions=MICRO)
    return Context(settings=settings, engine=engine, now=clock, http_factory=fast_http)


def source(ctx: Context) -> HubSpotSource:
    # a generous client budget: the fake has no limit in most tests
    return HubSpotSource(ctx, rate_window_seconds=0.01, search_per_second=10_000)


def count(engine, table, *where) -> int:
    with session_scope(engine) as s:
        return s.exec(select(func.count()).select_from(table).where(*where)).one()


def live_contacts(fake: FakeHubSpot) -> set[str]:
    return {k for k, v in fake.contacts.items() if v.archived_at is None}


def test_first_sync_matches_the_fake_and_stage_times_are_right(engine, make_settings, fake, clock,
                                                               env) -> None:
    ctx = make_ctx(engine, make_settings, fake, clock)
    totals = sync_source(ctx, source(ctx))
    assert count(engine, Lead) == len(fake.contacts) == 400
    # the only rejects are the simulator's few malformed e-mails (the lead is kept without them)
    assert count(engine, RejectedRecord, RejectedRecord.object_type.not_like("%.identity")) == 0  # type: ignore[attr-defined]
    assert totals["leads"] == 400
    funnel_leads = {lead.crm_id: lead for lead in simulate(400, seed=3).leads}
    n_life = sum(len(lead.lifecycle) for lead in funnel_leads.values())
    n_deal = sum(len(d.stages) for lead in funnel_leads.values() for d in lead.deals)
    assert count(engine, StageChange, StageChange.field == "lifecyclestage") == n_life
    assert count(engine, StageChange, StageChange.field == "dealstage") == n_deal
    assert count(engine, LeadEvent) == sum(len(lead.micro_events) for lead in funnel_leads.values())
    with session_scope(engine) as s:
        won = s.exec(select(StageChange, Lead).join(Lead).where(StageChange.value == "closedwon")).first()
        lost = s.exec(select(StageChange).where(StageChange.value == "closedlost")).all()
        lead_row = s.exec(select(Lead).where(Lead.gclid.is_not(None))).first()  # type: ignore[union-attr]
    assert won is not None
    stage, lead = won
    deal = next(d for d in funnel_leads[lead.crm_id].deals if d.deal_id == stage.deal_id)
    assert stage.entered_at.replace(tzinfo=UTC) == dict(deal.stages)["closedwon"].replace(microsecond=0)
    assert float(stage.amount) == pytest.approx(deal.amount) and stage.currency == "EUR"
    assert lost and all(s.is_lost for s in lost)
    assert lead_row is not None and lead_row.utm_source and lead_row.attributes["ll_company_size"]
    assert lead_row.email_sha256 and lead_row.consent_ad_user_data is not None
    # search used one ascending sort object on the right property per object type
    searches = [r.json() for r in fake.received if r.path.endswith("/search")]
    assert {s["sorts"][0]["propertyName"] for s in searches} == {"lastmodifieddate", "hs_lastmodifieddate"}
    assert all(len(s["sorts"]) == 1 and s["limit"] == 200 for s in searches)


def test_incremental_sync_reads_only_changes_and_reflects_archive_and_merge(
        engine, make_settings, fake, clock, env) -> None:
    ctx = make_ctx(engine, make_settings, fake, clock)
    sync_source(ctx, source(ctx))
    # records the 10-minute look-back re-reads on the next run (their store already has them)
    lookback = sum(
        o.updated >= max(x.updated for x in objs.values()) - timedelta(minutes=10)
        for objs in (fake.contacts, fake.deals) for o in objs.values())
    clock.tick()
    ids = sorted(live_contacts(fake), key=int)
    fake.update_contact(ids[0], ll_job_level="vp")
    fake.set_lifecycle(ids[1], "salesqualifiedlead")
    new = fake.add_contact(email="new.lead@example.com", ll_utm_source="google")
    deal = fake.add_deal(ids[2], "appointmentscheduled", 500.0)
    fake.archive(ids[3])
    fake.merge(ids[4], ids[5])
    clock.tick()
    fake.received.clear()
    fake.records_returned = 0
    sync_source(ctx, source(ctx))
    # only the changed records came back: 4 contacts, 1 deal, 1 archived contact (+ look-back)
    assert fake.records_returned == 4 + 1 + 1 + lookback
    with session_scope(engine) as s:
        by_id = {lead.crm_id: lead for lead in s.exec(select(Lead)).all()}
        assert by_id[new].status == LeadStatus.active
        assert by_id[ids[0]].attributes["ll_job_level"] == "vp"
        assert by_id[ids[3]].status == LeadStatus.deleted
        assert by_id[ids[5]].status == LeadStatus.merged
        assert by_id[ids[5]].merged_into_id == by_id[ids[4]].id
        new_deal = s.exec(select(StageChange).where(StageChange.deal_id == deal)).one()
        assert new_deal.lead_id == by_id[ids[2]].id
        sql = s.exec(select(StageChange).where(StageChange.lead_id == by_id[ids[1]].id,
                                               StageChange.value == "salesqualifiedlead")).one()
        assert sql.entered_at.replace(tzinfo=UTC) == clock.t - timedelta(minutes=60)
        state = s.get(SyncState, ("hubspot", "contacts"))
        assert state is not None and state.cursor_updated_at is not None


@pytest.mark.slow
def test_the_10k_cap_is_crossed_without_loss_and_equal_timestamps_use_an_id_walk(
        sqlite_engine, make_settings, clock, env) -> None:
    engine = sqlite_engine
    with FakeHubSpot(token=TOKEN, now=clock, requests_per_window=None, search_per_second=None) as fake:
        # 10,450 contacts, 10,300 of them modified at the very same millisecond
        for _ in range(10_300):
            fake.add_contact()
        for _ in range(150):
            clock.tick(1)
            fake.add_contact()
        ctx = make_ctx(engine, make_settings, fake, clock, objects=["contacts"])
        clock.tick()
        totals = sync_source(ctx, source(ctx))
        assert count(engine, Lead) == 10_450
        # the capped query is re-read once by id (tie order is not guaranteed), nothing else
        assert totals["leads"] <= 10_000 + 10_450
        offsets = [int(r.json().get("after") or 0) for r in fake.received if r.path.endswith("/search")]
        assert max(offsets) < 10_000
        id_walk = [r.json() for r in fake.received if r.path.endswith("/search")
                   and r.json()["sorts"][0]["propertyName"] == "hs_object_id"]
        assert id_walk


def test_faults_are_survived_without_loss_or_doubles(engine, make_settings, fake, clock, env) -> None:
    ctx = make_ctx(engine, make_settings, fake, clock)
    # four failures in a row (within the session's retry budget), then two replayed pages
    fake.inject(server_errors=2, dropped_connections=1, rate_limited=1, repeated_pages=2)
    totals = sync_source(ctx, source(ctx))
    assert count(engine, Lead) == 400
    # the replayed pages were detected and not applied twice
    assert totals["leads"] == 400
    assert fake._faults == dict.fromkeys(fake._faults, 0)


def test_repeated_page_is_not_yielded_twice(engine, make_settings, fake, clock, env) -> None:
    ctx = make_ctx(engine, make_settings, fake, clock, objects=["contacts"])
    src = source(ctx)
    fake.inject(repeated_pages=1)
    pages = list(src.fetch("contacts", None, started_at=clock()))
    ids = [lead.crm_id for p in pages for lead in p.leads]
    assert len(ids) == len(set(ids)) == 400


def test_auth_error_names_the_env_var_and_hides_the_token(engine, make_settings, fake, clock,
                                                          monkeypatch, caplog) -> None:
    monkeypatch.setenv(ENV, "pat-na1-wrong-token-987654321")
    ctx = make_ctx(engine, make_settings, fake, clock)
    with caplog.at_level(logging.DEBUG), pytest.raises(FatalSourceError) as err:
        sync_source(ctx, source(ctx))
    assert ENV in str(err.value)
    assert "wrong-token" not in str(err.value) and "wrong-token" not in caplog.text


def test_daily_quota_stops_with_the_reset_time(engine, make_settings, fake, clock, env) -> None:
    ctx = make_ctx(engine, make_settings, fake, clock)
    fake.inject(daily_exhausted=True)
    with pytest.raises(QuotaExhaustedError, match=r"daily API limit.*resets"):
        sync_source(ctx, source(ctx))


def test_oauth_refresh_flow(engine, make_settings, fake, clock, monkeypatch) -> None:
    fake.oauth_client = ("cid", "csecret-123456", "refresh-abcdef")
    fake.token_ttl = 3600
    monkeypatch.setenv("HS_CID", "cid")
    monkeypatch.setenv("HS_SECRET", "csecret-123456")
    monkeypatch.setenv("HS_REFRESH", "refresh-abcdef")
    ctx = make_ctx(engine, make_settings, fake, clock, auth_flow="refresh_token", token_env=None,
                   client_id_env="HS_CID", client_secret_env="HS_SECRET", refresh_token_env="HS_REFRESH")
    sync_source(ctx, source(ctx))
    assert count(engine, Lead) == 400
    assert sum(r.path == "/oauth/v1/token" for r in fake.received) == 1


def test_date_versioned_paths(engine, make_settings, fake, clock, env) -> None:
    ctx = make_ctx(engine, make_settings, fake, clock, api_version="2026-09")
    sync_source(ctx, source(ctx))
    assert count(engine, Lead) == 400
    paths = {r.path for r in fake.received}
    assert "/crm/objects/2026-09/contacts/search" in paths
    assert "/crm/pipelines/2026-09/deals" in paths
    assert "/crm/associations/2026-09/deals/contacts/batch/read" in paths


def test_bad_createdate_is_rejected_and_the_rest_goes_on(engine, make_settings, fake, clock, env) -> None:
    bad = sorted(fake.contacts, key=int)[7]
    fake.contacts[bad].own()["createdate"] = "not a date"
    ctx = make_ctx(engine, make_settings, fake, clock)
    sync_source(ctx, source(ctx))
    assert count(engine, Lead) == 399
    with session_scope(engine) as s:
        rej = s.exec(select(RejectedRecord).where(RejectedRecord.record_ref == bad)).all()
    assert rej and "createdate" in rej[0].reason


def test_deal_whose_contact_is_not_synced_brings_the_contact_along(engine, make_settings, fake, clock,
                                                                   env) -> None:
    ctx = make_ctx(engine, make_settings, fake, clock, objects=["deals"])
    totals = sync_source(ctx, source(ctx))
    assert totals["stages"] > 0
    assert count(engine, RejectedRecord, RejectedRecord.object_type.not_like("%.identity")) == 0  # type: ignore[attr-defined]
    with_deals = {c for c, o in fake.contacts.items() if o.assoc}
    assert count(engine, Lead) == len(with_deals)


def test_incremental_deal_sync_reads_only_the_contacts_the_store_lacks(engine, make_settings,
                                                                        fake, clock, env) -> None:
    """An incremental sync asks the store about the contacts of its deals (a keyed read), not
    for every stored CRM id; a contact it holds is not read from HubSpot again."""
    ctx = make_ctx(engine, make_settings, fake, clock, objects=["deals"])
    sync_source(ctx, source(ctx))
    stored = {c for c, o in fake.contacts.items() if o.assoc}
    unstored = sorted(set(fake.contacts) - stored, key=int)
    clock.tick()
    old_deal = fake.add_deal(sorted(stored, key=int)[0], "appointmentscheduled", 100.0)
    new_deal = fake.add_deal(unstored[0], "appointmentscheduled", 200.0)
    clock.tick()
    fake.received.clear()
    sync_source(ctx, source(ctx))
    read = [i["id"] for r in fake.received if r.path.endswith("/objects/contacts/batch/read")
            for i in r.json()["inputs"]]
    assert read == [unstored[0]]
    with session_scope(engine) as s:
        by_deal = {r.deal_id: lead for r, lead in s.exec(
            select(StageChange, Lead).join(Lead).where(
                StageChange.deal_id.in_([old_deal, new_deal])))}  # type: ignore[attr-defined]
    assert {d: lead.crm_id for d, lead in by_deal.items()} == {
        old_deal: sorted(stored, key=int)[0], new_deal: unstored[0]}


class SimulatedTime:
    """A monotonic clock that moves only when the limiter sleeps: what the limiter grants is then
    a function of its configuration alone, not of how fast (or loaded) the machine is."""

    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds


def test_rate_limiter_grants_at_its_rate_on_a_clock_that_moves_by_exactly_the_wait() -> None:
    """A token short by float rounding (1e-17) once made it sleep 1e-17 s forever."""
    from leadloop.http import RateLimiter

    sim = SimulatedTime()
    limiter = RateLimiter(38, 1.0, burst=1.0, clock=sim.now, sleep=sim.sleep)
    for _ in range(200):
        limiter.acquire()
        assert len(sim.sleeps) < 400
    assert sim.now() == pytest.approx(199 / 38) and min(sim.sleeps) > 1e-3


def test_rate_limiter_keeps_90_percent_of_the_allowed_rate_and_draws_no_429(
        sqlite_engine, make_settings, clock, env, monkeypatch) -> None:
    """The source's limiter, as it configures it for a plan of 40 requests per 1-second rolling
    window, over simulated time: every request waits for a grant, no rolling window holds more
    than the plan allows (HubSpot would answer 429), and grants come at ≥ 90 % of the allowed
    rate. The real-time figure under a real plan is bench/sync.py's."""
    import leadloop.crm.hubspot as hubspot
    from leadloop.http import RateLimiter

    sim = SimulatedTime()
    monkeypatch.setattr(hubspot, "RateLimiter", lambda *a, **kw: RateLimiter(
        *a, **kw, clock=sim.now, sleep=sim.sleep))
    allowed, window = 40, 1.0
    with FakeHubSpot(token=TOKEN, now=clock, requests_per_window=None,
                     search_per_second=None, retry_after=None) as fake:
        for _ in range(1500):
            fake.add_contact()
        for cid in list(fake.contacts):
            fake.archive(cid)
        ctx = make_ctx(sqlite_engine, make_settings, fake, clock, requests_per_10s=allowed)
        src = HubSpotSource(ctx, rate_window_seconds=window)
        grants: list[float] = []
        granted = src.api.limiter.acquire

        def acquire(cost: float = 1.0) -> None:
            granted(cost)
            grants.append(sim.now())

        monkeypatch.setattr(src.api.limiter, "acquire", acquire)
        for _ in range(3):
            list(src.fetch("contacts_archived", None, started_at=clock()))
        n = len(fake.received)
    assert n == len(grants) == 45 and sim.sleeps  # 15 pages, 3 times; the limiter did hold back
    busiest = max(sum(1 for u in grants if t - window < u <= t) for t in grants)
    assert busiest <= allowed, busiest
    rate = (n - 1) / (grants[-1] - grants[0])
    assert rate >= 0.9 * allowed / window, rate


def test_an_archived_deal_takes_its_stages_with_it(engine, make_settings, fake, clock, env) -> None:
    ctx = make_ctx(engine, make_settings, fake, clock)
    ids = sorted(live_contacts(fake), key=int)
    deal = fake.add_deal(ids[0], "closedwon", 900.0)
    clock.tick()
    sync_source(ctx, source(ctx))
    with session_scope(engine) as s:
        assert s.exec(select(StageChange).where(StageChange.deal_id == deal)).all()
        before = s.exec(select(Lead).where(Lead.crm_id == ids[0])).one().updated_at
    clock.tick()
    fake.archive(deal, "deals")
    clock.tick()
    counts = sync_source(ctx, source(ctx))
    assert counts["deals_deleted"] >= 1
    with session_scope(engine) as s:
        assert not s.exec(select(StageChange).where(StageChange.deal_id == deal)).all()
        lead = s.exec(select(Lead).where(Lead.crm_id == ids[0])).one()
        assert lead.status == LeadStatus.active and lead.updated_at > before
        # the other deals and the lead's own stages are untouched
        assert s.exec(select(func.count()).select_from(StageChange)).one() > 0


def test_a_deal_with_more_than_500_contacts_is_paged_and_every_contact_gets_its_stage_once(
        engine, make_settings, clock, env) -> None:
    with FakeHubSpot(token=TOKEN, now=clock, requests_per_window=None, search_per_second=None) as fake:
        contacts = [fake.add_contact() for _ in range(1_203)]
        big = fake.add_deal(contacts[0], "closedwon", 5000.0)
        for cid in contacts[1:]:
            fake.associate(big, cid)
        small = fake.add_deal(contacts[1], "qualifiedtobuy", 10.0)
        clock.tick()
        # deals only: the contacts come along through the association batch read
        ctx = make_ctx(engine, make_settings, fake, clock, objects=["deals"])
        sync_source(ctx, source(ctx))
        with session_scope(engine) as s:
            rows = s.exec(select(Lead.crm_id, StageChange.value).join(Lead)
                          .where(StageChange.deal_id == big)).all()
            small_rows = s.exec(select(Lead.crm_id).join(StageChange)
                                .where(StageChange.deal_id == small)).all()
        assert sorted(c for c, _ in rows) == sorted(contacts, key=str)  # each once, none lost
        assert {v for _, v in rows} == {"closedwon"}
        assert small_rows == [contacts[1]]
        reads = [r.json()["inputs"] for r in fake.received
                 if r.path == "/crm/v4/associations/deals/contacts/batch/read"]
        # 500 + 500 + 203: two follow-ups, each for the big deal alone, with its cursor
        assert len(reads) == 3
        assert sorted(i["id"] for i in reads[0]) == sorted([big, small])
        assert all(len(r) == 1 and r[0]["id"] == big and r[0]["after"] for r in reads[1:])
