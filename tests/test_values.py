"""Stage mapping of raw stage rows, and the data-driven stage value suggestions."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pandas as pd
import pytest

from leadloop.config import settings_from_dict
from leadloop.context import Context
from leadloop.crm.base import LeadIn, Page, StageIn
from leadloop.store import session_scope
from leadloop.sync import apply_page
from leadloop.values import (
    RAW_STAGE_COLUMNS,
    load_stage_rows,
    macro_value,
    map_stage_rows,
    stage_keys,
    suggest_stage_values,
    suggest_stage_values_toml,
    wilson_interval,
)
from tests.conftest import BASE_CONFIG

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_stage_keys_use_the_stage_field_or_both_crm_stage_properties(make_settings) -> None:
    stages = [*BASE_CONFIG["stages"], {"name": "Demo", "crm_values": ["demo"]}]
    keys = stage_keys(make_settings(stages=stages))
    assert keys[("lifecyclestage", "salesqualifiedlead")] == ["Qualified"]
    assert keys[("dealstage", "closedwon")] == ["Won"]
    assert ("lifecyclestage", "closedwon") not in keys
    assert keys[("lifecyclestage", "demo")] == keys[("dealstage", "demo")] == ["Demo"]
    frame = map_stage_rows(make_settings(), pd.DataFrame([
        (1, "lifecyclestage", "salesqualifiedlead", T0, None, None, "", False),
        (1, "lifecyclestage", "unknown", T0, None, None, "", False),
        (1, "dealstage", "closedwon", T0, Decimal("10.5"), "EUR", "d1", False)],
        columns=RAW_STAGE_COLUMNS))
    assert list(frame["stage"]) == ["Qualified", "Won"] and frame["amount"].iloc[1] == 10.5


def _funnel_page() -> Page:
    """10 leads reach Lead; 6 of them Qualified; 3 of those win deals of 1000, 2000, 3000."""
    page = Page()
    for i in range(10):
        page.leads.append(LeadIn(crm_id=str(i), created_at=T0))
        page.stages.append(StageIn(str(i), "lifecyclestage", "lead", T0))
        if i < 6:
            page.stages.append(StageIn(str(i), "lifecyclestage", "salesqualifiedlead",
                                       T0 + timedelta(days=3)))
        if i < 3:
            page.stages.append(StageIn(str(i), "dealstage", "closedwon", T0 + timedelta(days=9),
                                       f"d{i}", Decimal(1000 * (i + 1)), "EUR"))
        if i == 5:  # a lost deal is not a win
            page.stages.append(StageIn(str(i), "dealstage", "closedlost", T0 + timedelta(days=9),
                                       "d5", Decimal(9999), "EUR", True))
    return page


def test_suggestions_and_ready_to_paste_toml(engine, make_settings) -> None:
    ctx = Context(settings=make_settings(), engine=engine)
    with session_scope(engine) as session:
        apply_page(session, ctx, "hubspot", "contacts", _funnel_page())
    suggestions, cohort = suggest_stage_values(engine, ctx.settings, ctx.now())
    assert (cohort.leads, cohort.younger) == (10, 0)
    by = {s.stage.name: s for s in suggestions}
    assert (by["Lead"].reached, by["Lead"].won) == (10, 3)
    assert (by["Qualified"].reached, by["Qualified"].won) == (6, 3)
    assert by["Qualified"].value == pytest.approx(0.5 * 2000.0)
    assert by["Qualified"].p_low < 0.5 < by["Qualified"].p_high
    assert by["Lead"].value == pytest.approx(0.3 * 2000.0)
    text = suggest_stage_values_toml(ctx)
    parsed = tomllib.loads(text)
    settings = settings_from_dict({"crm": BASE_CONFIG["crm"], "stages": parsed["stages"]})
    values = {s.name: s.value for s in settings.stages}
    assert values == {"Lead": 600.0, "Qualified": 1000.0, "Won": "deal_amount"}
    assert "3 of 6 leads that reached it won" in text
    assert "# Cohort: 10 leads created on or before" in text and "; 0 younger leads left out" in text


def test_macro_value_is_the_macro_stages_own_never_another_stages(engine, make_settings,
                                                                   caplog) -> None:
    ctx = Context(settings=make_settings(), engine=engine)
    with session_scope(engine) as session:
        apply_page(session, ctx, "hubspot", "contacts", _funnel_page())
    rows = load_stage_rows(engine, ctx.settings)
    assert macro_value(ctx.settings, rows) == (100.0, "fixed stage value")
    # "deal_amount" at a macro stage with no amounts: not the won deals' mean (2000), but the
    # stage's default_value, or 0, saying so
    stages = [dict(s) for s in BASE_CONFIG["stages"]]
    stages[1] = {**stages[1], "value": "deal_amount"}
    value, how = macro_value(make_settings(stages=stages), rows)
    assert value == 0.0 and "no deal amounts observed at Qualified" in how
    assert "no default_value" in caplog.text
    stages[1] = {**stages[1], "value": "predicted", "default_value": 750.0}
    value, how = macro_value(make_settings(stages=stages), rows)
    assert value == 750.0 and "default_value" in how and "Qualified" in how
    # amounts recorded at the macro stage itself are its value (mean per lead and deal)
    macro_rows = rows.copy()
    at_macro = macro_rows["stage"] == "Qualified"
    macro_rows.loc[at_macro, "amount"] = [300.0, 500.0, 400.0, 400.0, 400.0, 400.0]
    macro_rows.loc[at_macro, "deal_id"] = [f"q{i}" for i in range(6)]
    value, how = macro_value(make_settings(stages=stages), macro_rows)
    assert value == pytest.approx(400.0) and how == "mean deal amount observed at Qualified"


def test_suggestions_count_only_leads_older_than_the_horizon(engine, make_settings) -> None:
    """Ten young leads that have not had time to qualify would pull every value down."""
    ctx = Context(settings=make_settings(), engine=engine)
    page = _funnel_page()
    young = ctx.now() - timedelta(days=10)
    for i in range(10, 20):
        page.leads.append(LeadIn(crm_id=str(i), created_at=young))
        page.stages.append(StageIn(str(i), "lifecyclestage", "lead", young))
    with session_scope(engine) as session:
        apply_page(session, ctx, "hubspot", "contacts", page)
    suggestions, cohort = suggest_stage_values(engine, ctx.settings, ctx.now())
    assert (cohort.leads, cohort.younger, cohort.horizon_days) == (10, 10, 90)
    by = {s.stage.name: s for s in suggestions}
    assert (by["Lead"].reached, by["Lead"].won) == (10, 3)
    assert by["Lead"].value == pytest.approx(0.3 * 2000.0)
    assert "; 10 younger leads left out" in suggest_stage_values_toml(ctx)


def test_wilson_interval_is_sane_at_the_edges() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and 0.1 < hi < 0.2
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and lo > 0.8
