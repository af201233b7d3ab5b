"""The sandbox funnel: deterministic, realistic in shape, and loadable through `apply_page`."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import numpy as np
import pytest
from sqlmodel import func, select

from leadloop.sandbox.simulator import MACRO_STAGE, SPREAD_MICRO_DAYS, funnel_pages, simulate
from leadloop.store import session_scope
from leadloop.sync import apply_page
from leadloop.tables import Lead, LeadEvent, StageChange


@pytest.fixture(scope="module")
def funnel():
    return simulate(20_000, seed=11)


def _odds_ratio(funnel, micro: str) -> float:
    has = funnel.cols[f"micro:{micro}"] != -1
    y = funnel.cols["sql"] != -1
    a, b, c, d = (has & y).sum(), (has & ~y).sum(), (~has & y).sum(), (~has & ~y).sum()
    return float(a * d / (b * c))


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    a, b, c = simulate(500, seed=3), simulate(500, seed=3), simulate(500, seed=4)
    assert list(a.leads) == list(b.leads)
    assert [x.email for x in a.leads] != [x.email for x in c.leads]
    assert a.end == datetime(2026, 10, 1, tzinfo=UTC)


def test_macro_rate_deals_and_outcomes_are_realistic(funnel) -> None:
    leads = list(funnel.leads)
    macro = sum(lead.entered(MACRO_STAGE) is not None for lead in leads) / len(leads)
    assert 0.10 <= macro <= 0.25
    outcomes = Counter(d.outcome for lead in leads for d in lead.deals)
    assert outcomes["won"] > 0 and outcomes["lost"] > 0 and outcomes["open"] > 0
    assert outcomes["won"] < macro * len(leads)  # won deals are a fraction of SQLs
    amounts = np.array([d.amount for lead in leads for d in lead.deals])
    assert amounts.min() > 0 and np.median(amounts) < amounts.mean()  # right-skewed (lognormal)
    assert len({d.deal_id for lead in leads for d in lead.deals}) == len(amounts)


def test_times_are_ordered_censored_at_end_and_micro_events_precede_the_macro(funnel) -> None:
    """Except the spread micro-conversions', whose times ignore the conversion (tested below)."""
    for lead in funnel.leads[:5000]:
        times = [t for _, t in lead.lifecycle]
        assert times == sorted(times) and lead.lifecycle[0][0] == "lead"
        assert lead.created_at <= lead.updated_at <= funnel.end
        macro_at = lead.entered(MACRO_STAGE)
        for name, at in lead.micro_events:
            assert lead.created_at <= at <= funnel.end
            assert macro_at is None or at < macro_at or name in SPREAD_MICRO_DAYS
        for deal in lead.deals:
            deal_times = [t for _, t in deal.stages]
            assert deal_times == sorted(deal_times) and deal_times[-1] <= funnel.end
            assert macro_at is not None and deal.created_at >= macro_at
            assert (deal.stage == "closedwon") == (deal.outcome == "won")


def test_planted_micro_effects_show_in_the_data(funnel) -> None:
    effects = funnel.truth.micro_effects
    assert effects["newsletter_signup"] == 1.0 and effects["careers_page_view"] < 1.0
    assert _odds_ratio(funnel, "pricing_view") > _odds_ratio(funnel, "guide_download") > 1.4
    assert _odds_ratio(funnel, "webinar_signup") > 1.4
    assert 0.8 < _odds_ratio(funnel, "newsletter_signup") < 1.25
    assert _odds_ratio(funnel, "careers_page_view") < 0.7


def test_a_spread_null_micro_is_independent_of_conversion_and_spread_over_its_days(funnel) -> None:
    (name, days), = SPREAD_MICRO_DAYS.items()
    assert funnel.truth.micro_effects[name] == 1.0 and funnel.truth.micro_spread_days == {name: days}
    # presence independent of the eventual conversion (uncensored truth)
    has = funnel.cols[f"micro:{name}"] != -1
    created, at = funnel.cols["created"][has], funnel.cols[f"micro:{name}"][has]
    early = created < funnel.cols["created"].max() - days * 86_400  # not cut by the export's end
    converts = funnel.truth.converts
    assert abs(has[converts].mean() - has[~converts].mean()) < 0.02
    # spread uniformly over the first `days` days, before and after the macro stage alike
    delay = (at - created)[early] / 86_400
    assert 0 <= delay.min() < 1 and days - 1 < delay.max() <= days
    assert abs(np.median(delay) - days / 2) < 1.5
    sql = funnel.cols["sql"][has][early]
    converted = sql != -1
    assert (at[early][converted] > sql[converted]).mean() > 0.5  # mostly after the conversion


def test_adding_a_spread_micro_leaves_the_other_draws_of_a_seed_unchanged() -> None:
    """The null micro-conversion has its own random stream: a seed's funnel is otherwise what it
    was (the last-modified time may move when the new event is the lead's latest change)."""
    f = simulate(3000, seed=3)
    # figures of seed 3 before the spread micro-conversion was added
    assert int(f.truth.converts.sum()) == 558 and int((f.cols["micro:pricing_view"] != -1).sum()) == 405
    assert int(f.cols["sql"][:2000].sum()) == 4_093_047_206


def test_sources_differ_in_volume_and_quality(funnel) -> None:
    by_campaign: dict[str, list[bool]] = {}
    for lead in funnel.leads:
        by_campaign.setdefault(lead.utm_campaign or lead.channel, []).append(
            lead.entered(MACRO_STAGE) is not None)
    cheap, valuable = by_campaign["leadgen-ebook-leadads"], by_campaign["abm-enterprise"]
    assert len(cheap) > 4 * len(valuable)
    assert np.mean(valuable) > 3 * np.mean(cheap)


def test_identities_and_click_ids_are_fake_and_well_formed(funnel) -> None:
    leads = funnel.leads[:3000]
    assert all(lead.email.endswith(("@example.com", "@example.org", "@example.net"))
               or "@" not in lead.email for lead in leads)
    assert all("-555-01" in lead.phone for lead in leads if lead.phone)
    meta = [lead.meta_lead_id for lead in leads if lead.meta_lead_id]
    assert meta and all(m.isdigit() and 15 <= len(m) <= 16 for m in meta)
    assert all(not (lead.gclid and (lead.gbraid or lead.wbraid)) for lead in leads)
    assert any(lead.gbraid or lead.wbraid for lead in leads)
    assert 0.9 < np.mean([lead.consent_ad_user_data for lead in leads]) < 1.0
    assert [lead.crm_id for lead in leads] == sorted((lead.crm_id for lead in leads), key=int)


def test_funnel_pages_load_the_store(engine, make_context) -> None:
    ctx = make_context(engine)
    small = simulate(700, seed=5)
    pages = list(funnel_pages(small, page_size=300))
    assert [len(p.leads) for p in pages] == [300, 300, 100]
    with session_scope(engine) as session:
        for page in pages:
            apply_page(session, ctx, "hubspot", "contacts", page)
    leads = list(small.leads)
    n_stages = sum(len(lead.lifecycle) + sum(len(d.stages) for d in lead.deals) for lead in leads)
    n_events = sum(len(lead.micro_events) for lead in leads)
    with session_scope(engine) as session:
        assert session.exec(select(func.count()).select_from(Lead)).one() == 700
        assert session.exec(select(func.count()).select_from(StageChange)).one() == n_stages
        assert session.exec(select(func.count()).select_from(LeadEvent)).one() == n_events
        lost = session.exec(select(StageChange).where(StageChange.value == "closedlost")).all()
        assert lost and all(s.is_lost and s.deal_id and s.amount for s in lost)
