"""Report numbers against values computed by hand on tests/test_report_fixture.py."""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import types
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from sqlalchemy.engine import Engine

from leadloop.context import Context
from leadloop.errors import ConfigError
from leadloop.report import build_report_data, render_report, write_reports
from leadloop.report.data import wilson
from leadloop.report.terminal import print_validation_rows
from leadloop.scoring.card import ModelCard
from leadloop.store import session_scope
from leadloop.tables import Conversion, ConversionStatus
from tests.test_report_fixture import HOSTILE_CAMPAIGN, NOW, REPORT_SECTIONS, populate

approx = pytest.approx


@pytest.fixture
def report_ctx(make_context: Callable[..., Context]) -> Callable[..., Context]:
    def build(engine: Engine, **overrides: Any) -> Context:
        ctx = make_context(engine, **{**REPORT_SECTIONS, **overrides})
        ctx.now = lambda: NOW
        return ctx

    return build


def _row(df: Any, key: str, value: str) -> dict[str, Any]:
    rows = df[df[key] == value].to_dict("records")
    assert len(rows) == 1, f"{key}={value}: {rows}"
    return rows[0]


def test_wilson_interval_matches_hand_computation() -> None:
    assert wilson(2, 4) == approx((0.1500, 0.8500), abs=5e-5)
    assert wilson(1, 6) == approx((0.0300, 0.5635), abs=5e-4)
    assert wilson(0, 1)[0] == 0.0
    low, high = wilson(0, 0)
    assert low != low and high != high  # NaN when there is nothing to estimate


@pytest.mark.postgres
def test_lead_value_numbers(engine: Engine, report_ctx: Callable[..., Context]) -> None:
    populate(engine)
    data = build_report_data(report_ctx(engine))

    g = _row(data.by["source"], "source", "google")
    assert (g["leads"], g["micro:pricing_view"], g["micro:newsletter_signup"]) == (4, 2, 1)
    assert (g["qualified"], g["won"], g["revenue"]) == (2, 1, 1000.0)
    assert (g["qualified_ci_low"], g["qualified_ci_high"]) == approx((0.15, 0.85), abs=1e-4)
    assert g["revenue_per_lead"] == 250.0
    # latest score per lead: L1 0.8/80 (not the older 0.1/10), L2 0.6/60, L3 and L4 0.2/20
    assert g["mean_predicted_value"] == approx(45.0)
    assert g["mean_predicted_probability"] == approx(0.45)
    assert g["actual_rate_scored"] == approx(0.5)
    assert g["value_uploaded"] == 1200.0
    assert (g["accepted:google"], g["accepted:meta"]) == (2, 1)

    fb = _row(data.by["source"], "source", "facebook")
    # L6's "closedwon" sits on the lead property, not the deal stage the Won stage names
    assert (fb["leads"], fb["qualified"], fb["won"], fb["revenue"]) == (6, 1, 0, 0.0)
    assert fb["micro:newsletter_signup"] == 2
    assert (fb["qualified_ci_low"], fb["qualified_ci_high"]) == approx((0.0300, 0.5635), abs=5e-4)
    assert fb["scored"] == 0
    assert (fb["value_uploaded"], fb["accepted:meta"], fb["accepted:google"]) == (100.0, 1, 0)
    assert _row(data.by["source"], "source", "(none)")["leads"] == 1

    months = data.by["month"].set_index("month")
    assert months.loc["2025-01", ["leads", "qualified"]].tolist() == [3, 2]
    assert months.loc["2025-02", ["leads", "qualified"]].tolist() == [8, 1]
    pages = data.by["landing_page"].set_index("landing_page")
    assert pages.loc["https://example.com/demo", "leads"] == 10  # L1's query string dropped
    assert _row(data.by["medium"], "medium", "paid_social")["leads"] == 6

    s = data.summary
    assert (s.leads, s.qualified, s.won, s.revenue) == (11, 3, 1, 1000.0)
    assert (s.accepted, s.value_uploaded) == (4, 1300.0)
    assert data.won_stage == "Won" and data.macro_stage == "Qualified"


@pytest.mark.postgres
def test_uploads_reconciliation(engine: Engine, report_ctx: Callable[..., Context]) -> None:
    populate(engine)
    data = build_report_data(report_ctx(engine))
    u = data.uploads.set_index("destination")
    assert u.loc["google", ["built", "sent", "rejected", "dead", "held", "attempted"]].tolist() == \
        [4, 2, 1, 1, 0, 4]
    assert u.loc["google", "value_accepted"] == 1100.0
    assert u.loc["meta", ["built", "sent", "held", "rejected"]].tolist() == [3, 2, 1, 0]
    assert data.holds.to_dict("records") == [
        {"destination": "meta", "hold_rule": "meta_event_older_than_7_days", "n": 1}]
    rej = {(r["status"], r["platform_code"]): (r["n"], r["message"])
           for r in data.rejections.to_dict("records")}
    assert rej == {("rejected", "INVALID_CLICK_ID"): (1, "click id not found"),
                   ("dead", "UNAVAILABLE"): (1, "503 from platform")}
    cvp = {(r["stage"], r["destination"]): r for r in data.crm_vs_platform.to_dict("records")}
    q_google = cvp[("Qualified", "google")]
    assert (q_google["crm_leads"], q_google["built"], q_google["accepted"], q_google["gap"]) == \
        (3, 3, 1, 2)
    q_meta = cvp[("Qualified", "meta")]
    assert (q_meta["accepted"], q_meta["held"], q_meta["gap"]) == (2, 1, 1)
    assert cvp[("Won", "google")]["gap"] == 0
    assert cvp[("Lead", "")]["crm_leads"] == 1


def test_guardrails_on_fixture(sqlite_engine: Engine, report_ctx: Callable[..., Context]) -> None:
    populate(sqlite_engine)
    g = {x.key: x for x in build_report_data(report_ctx(sqlite_engine)).guardrails}
    assert [x.status for x in g.values()] == ["warn", "warn", "warn", "pass", "pass", "warn"]
    # google receives 100 and 1,000; meta only ever 100
    assert g["distinct_values"].sentence.startswith("meta receives a single value")
    assert "google / won_deal: 1" in g["volume"].sentence  # L1 Won on 2025-02-19, within 30 days
    # medians by hand: Qualified after 5, 10, 20 days -> 10; Won after 40 days
    assert "Qualified 10.0 d" in g["delay"].sentence and "Won 40.0 d" in g["delay"].sentence
    # L1 granted, L2 denied, L5 unknown
    assert "33% granted" in g["consent"].sentence and "33% are unknown" in g["consent"].sentence


def test_guardrails_pass_and_warn_on_duplicates(sqlite_engine: Engine,
                                                report_ctx: Callable[..., Context]) -> None:
    ids = populate(sqlite_engine)
    with session_scope(sqlite_engine) as s:  # four more conversions of one click id, varied values
        for i, crm in enumerate(["6", "7", "8", "9"]):
            s.add(Conversion(order_id=f"extra-{crm}", destination="google", lead_id=ids[crm],
                             stage="Qualified", conversion_action="qualified_lead",
                             value=Decimal(50 + i), status=ConversionStatus.sent, click_id="g-1",
                             conversion_time=NOW))
    ctx = report_ctx(sqlite_engine, report={"min_conversions_per_30d": 1})
    g = {x.key: x for x in build_report_data(ctx).guardrails}
    assert g["duplicates"].status == "warn" and "1 click ids" in g["duplicates"].sentence
    assert g["volume"].status == "pass"
    assert g["distinct_values"].status == "warn" and "google" not in g["distinct_values"].sentence


def test_never_uploaded_warns_for_a_stage_without_accepted_rows(
        sqlite_engine: Engine, report_ctx: Callable[..., Context]) -> None:
    populate(sqlite_engine)
    stages = [dict(s) for s in REPORT_SECTIONS["stages"]]
    stages[2] = {**stages[2], "destinations": {"google": "won_deal", "meta": "Purchase"}}
    g = {x.key: x for x in build_report_data(report_ctx(sqlite_engine, stages=stages)).guardrails}
    assert g["never_uploaded"].status == "warn"
    assert "meta / Won" in g["never_uploaded"].sentence


def test_validation_uses_latest_run_only(sqlite_engine: Engine, report_ctx: Callable[..., Context],
                                         tmp_path: Path) -> None:
    populate(sqlite_engine)
    paths = write_reports(report_ctx(sqlite_engine), tmp_path / "out")
    assert tmp_path / "out" / "validation.csv" in paths
    with (tmp_path / "out" / "validation.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["micro"], r["segment"], r["verdict"]) for r in rows] == [
        ("pricing_view", "all", "predictive"), ("newsletter_signup", "all", "negative"),
        ("pricing_view", "utm_source=google", "not enough data")]
    assert float(rows[0]["lift"]) == approx(5.33)
    assert list(rows[0])[:4] == ["micro", "segment", "n", "n_with"]


def test_since_filters_by_creation(sqlite_engine: Engine, report_ctx: Callable[..., Context]) -> None:
    populate(sqlite_engine)
    data = build_report_data(report_ctx(sqlite_engine), since=datetime(2025, 2, 1))
    assert data.summary.leads == 8 and data.summary.qualified == 1
    assert data.uploads.set_index("destination").loc["meta", "built"] == 1  # only L5's


def test_outputs_escape_untrusted_text_and_hold_no_pii(sqlite_engine: Engine,
                                                       report_ctx: Callable[..., Context],
                                                       tmp_path: Path) -> None:
    populate(sqlite_engine)
    out = tmp_path / "out"
    write_reports(report_ctx(sqlite_engine), out)
    page = (out / "report.html").read_text()
    assert HOSTILE_CAMPAIGN not in page and "&lt;script&gt;" in page
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "src=" not in page and "@import" not in page
    assert not re.search(r"url\((?!#)", page)  # only the SVGs' own clip paths
    assert "someone@example.com" not in page and "email=" not in page
    assert "pricing_view reason &lt;b&gt;" in page
    assert page.count("<svg") >= 6  # volume/quality, rate, month, calibration, forest, uploads
    for name in ("lead_value_by_source", "lead_value_by_campaign", "uploads_by_destination",
                 "guardrails", "crm_vs_platform"):
        assert (out / f"{name}.csv").is_file()
    with (out / "lead_value_by_campaign.csv").open(newline="") as f:
        campaigns = {r["campaign"] for r in csv.DictReader(f)}
    assert "'=HYPERLINK(\"http://evil\")" in campaigns  # cannot run as a spreadsheet formula
    doc = json.loads((out / "report.json").read_text())
    assert doc["summary"]["leads"] == 11 and doc["summary"]["qualified_ci"][0] == approx(0.0975,
                                                                                          abs=1e-3)
    assert {g["status"] for g in doc["tables"]["guardrails"]} == {"pass", "warn"}
    assert "NaN" not in (out / "report.json").read_text()
    for path in out.iterdir():
        assert "someone@example.com" not in path.read_text()


def test_empty_store_still_writes_every_file(sqlite_engine: Engine,
                                             report_ctx: Callable[..., Context],
                                             tmp_path: Path) -> None:
    paths = write_reports(report_ctx(sqlite_engine), tmp_path)
    assert {p.name for p in paths} >= {"report.html", "validation.csv", "report.json"}
    page = (tmp_path / "report.html").read_text()
    assert "No validation run yet" in page and "No conversions built yet" in page
    assert "no model trained yet" in page


def test_model_card_section(sqlite_engine: Engine, report_ctx: Callable[..., Context],
                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    card = {
        "version": "m-1", "created_at": "2025-02-28T00:00:00+00:00", "chosen": "hgb",
        "fallback_reason": None, "data_window": {"start": "2025-01-01", "end": "2025-02-28"},
        "counts": {"n": 11, "positives": 3},
        "metrics": {"roc_auc": 0.81, "pr_auc": 0.5, "brier": 0.12, "ece": 0.03},
        "baseline": {"roc_auc": 0.5, "pr_auc": 0.27, "brier": 0.2, "ece": 0.0},
        "calibration": [{"bin": i, "predicted": i / 10, "observed": i / 11, "n": 5}
                        for i in range(1, 6)],
        "lift_by_decile": [{"decile": d, "n": 10, "rate": 0.3 / d, "lift": 3 / d}
                           for d in range(1, 11)],
        "permutation_importance": [{"feature": "utm_source", "importance": 0.08},
                                   {"feature": "micro:pricing_view", "importance": 0.12}],
    }
    fake = types.ModuleType("leadloop.scoring.registry")
    fake.current_card = lambda settings: ModelCard.from_dict(card)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "leadloop.scoring.registry", fake)
    populate(sqlite_engine)
    write_reports(report_ctx(sqlite_engine), tmp_path)
    page = (tmp_path / "report.html").read_text()
    for title in ("Calibration (held-out leads)", "Lift by decile", "Top features", "0.810", "m-1"):
        assert title in page
    assert "no model" not in page


def test_render_report_formats(sqlite_engine: Engine, report_ctx: Callable[..., Context],
                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    populate(sqlite_engine)
    ctx = report_ctx(sqlite_engine)
    assert render_report(ctx, fmt="text", out=None, since=None) is None
    printed = capsys.readouterr().out
    assert "Lead value by source" in printed and "Value-bidding guardrails" in printed
    text = render_report(ctx, fmt="json", out=None, since=datetime(2025, 2, 1))
    assert text is not None and json.loads(text)["summary"]["leads"] == 8
    msg = render_report(ctx, fmt="html", out=tmp_path / "r.html", since=None)
    assert msg == f"wrote {tmp_path / 'r.html'}" and (tmp_path / "r.html").is_file()
    msg = render_report(ctx, fmt="csv", out=tmp_path / "csv", since=None)
    assert msg is not None and (tmp_path / "csv" / "validation.csv").is_file()
    render_report(ctx, fmt="html", out=None, since=None)  # default: [report] out_dir
    assert (tmp_path / "reports" / "report.html").is_file()
    with pytest.raises(ConfigError, match="--out"):
        render_report(ctx, fmt="csv", out=tmp_path / "x.csv", since=None)


def test_print_validation_rows(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"micro": "guide", "n_with": 120, "rate_with": 0.4, "rate_without": 0.1, "lift": 4.0,
             "lift_ci_low": 3.1, "lift_ci_high": 5.2, "p_value": 1e-6, "q_value": 2e-6,
             "verdict": "predictive", "reason": "Leads who download convert 4x as often."}]
    buf = io.StringIO()
    print_validation_rows(rows, console=Console(file=buf, width=140))
    out = buf.getvalue()
    assert "guide" in out and "4.00 [3.10–5.20]" in out and "<0.001" in out and "predictive" in out
    assert "convert 4x" in out
    print_validation_rows(rows)
    assert "predictive" in capsys.readouterr().out


def test_leads_with_no_attribution_at_all_are_one_none_row(
        engine: Engine, report_ctx: Callable[..., Context]) -> None:
    """No lead has a utm field or a landing page (a CSV with none mapped): each table is one
    "(none)" row, and no pandas warning on the way (pytest turns warnings into errors)."""
    from leadloop.tables import Lead

    with session_scope(engine) as s:
        s.add_all(Lead(source="csv", crm_id=str(i), created_at=datetime(2025, 1, 5 + i, tzinfo=UTC))
                  for i in range(3))
    data = build_report_data(report_ctx(engine))
    for name in ("source", "medium", "campaign", "landing_page"):
        table = data.by[name]
        assert table[name].tolist() == ["(none)"] and table["leads"].tolist() == [3], name


def test_validation_csv_bounds_an_underflowed_p_value_as_validate_json_does(
        sqlite_engine: Engine, report_ctx: Callable[..., Context], tmp_path: Path) -> None:
    from leadloop.tables import ValidationResult

    at = datetime(2025, 3, 1, tzinfo=UTC)
    with session_scope(sqlite_engine) as s:
        s.add(ValidationResult(
            job_run_id=1, computed_at=at, micro="engaged", segment="all", n=9240, n_with=2953,
            n_without=6287, macro_with=2012, macro_without=1549, rate_with=0.681,
            rate_without=0.246, lift=2.77, lift_ci_low=2.63, lift_ci_high=2.91, p_value=0.0,
            q_value=0.0, phi=0.4, verdict="predictive", reason="r", role="primary goal"))
        s.add(ValidationResult(
            job_run_id=1, computed_at=at, micro="guide", segment="all", n=9240, n_with=2888,
            n_without=6352, macro_with=1030, macro_without=2531, rate_with=0.357,
            rate_without=0.398, lift=0.9, lift_ci_low=0.85, lift_ci_high=0.95, p_value=1.4e-4,
            q_value=3e-4, phi=-0.04, verdict="negative", reason="r", role="retire"))
    out = tmp_path / "out"
    write_reports(report_ctx(sqlite_engine), out)
    with (out / "validation.csv").open(newline="") as f:
        rows = {r["micro"]: r for r in csv.DictReader(f)}
    assert (rows["engaged"]["p_value"], rows["engaged"]["q_value"]) == ("< 1e-300", "< 1e-300")
    assert float(rows["guide"]["p_value"]) == approx(1.4e-4)
    doc = {r["micro"]: r for r in json.loads((out / "report.json").read_text())["tables"]["validation"]}
    assert doc["engaged"]["q_value"] == "< 1e-300" and doc["guide"]["q_value"] == approx(3e-4)
    assert "&lt; 1e-300" in (out / "report.html").read_text()
