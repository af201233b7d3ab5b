"""Platform rules decided once: conversion windows for every row (and for rows waiting for a
retry), consent in one place, values out of range held, manual-import files that stay inert."""

from __future__ import annotations

import csv
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from leadloop.export.engine import run_export
from leadloop.report.data import build_report_data
from leadloop.sandbox.fake_platforms import FakePlatforms
from leadloop.store import session_scope
from leadloop.tables import ConversionStatus, StageChange
from tests.export_helpers import NOW, full_lead
from tests.test_export_outbox import make_ctx, rows


def test_enhanced_conversions_without_a_click_id_have_a_window_too(
        sqlite_engine: Any, fakes: FakePlatforms, tmp_path: Path) -> None:
    full_lead(sqlite_engine, 1, gclid=None, age=timedelta(days=120))  # hashes only, 120 days old
    full_lead(sqlite_engine, 2, gclid=None, age=timedelta(days=10))
    result = run_export(make_ctx(sqlite_engine, fakes, tmp_path, names=("gdm",)))
    assert (result["sent"], result["held"]) == (1, 1)
    held = [r for r in rows(sqlite_engine) if r.status == ConversionStatus.held]
    assert held[0].hold_rule == "event_too_old"


def test_conversion_window_days_narrows_the_window(sqlite_engine: Any, fakes: FakePlatforms,
                                                   tmp_path: Path) -> None:
    full_lead(sqlite_engine, 1, age=timedelta(days=40))
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("msads",),
                   msads={"conversion_window_days": 30})
    assert run_export(ctx)["held"] == 1
    assert rows(sqlite_engine)[0].hold_rule == "event_too_old"


def test_a_retry_whose_window_closed_meanwhile_is_held_not_resent(
        sqlite_engine: Any, fakes: FakePlatforms, tmp_path: Path) -> None:
    full_lead(sqlite_engine, 1, age=timedelta(days=6))  # Meta: 1 day left in its 7-day window
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("meta",))
    fakes.fail_next("meta", "503")
    assert run_export(ctx)["failed"] == 1
    (row,) = rows(sqlite_engine)
    two_days = make_ctx(sqlite_engine, fakes, tmp_path, names=("meta",),
                        clock=lambda: NOW + timedelta(days=2))
    result = run_export(two_days)
    assert result["requests"] == 0 and result["held"] == 1
    (row,) = rows(sqlite_engine)
    assert (row.status, row.hold_rule) == (ConversionStatus.held, "event_too_old")
    assert len(fakes.received("meta")) == 1


@pytest.mark.parametrize("name", ["gdm", "li"])
def test_denied_consent_without_consent_required_is_not_counted_as_an_identity(
        sqlite_engine: Any, fakes: FakePlatforms, tmp_path: Path, name: str) -> None:
    # hashes only, consent denied: the exporter may not send the hashes, so the rule holds it
    full_lead(sqlite_engine, 1, gclid=None, li_fat_id=None, consent=False)
    # a click id as well: sent on the click alone, without the hashes
    full_lead(sqlite_engine, 2, consent=False)
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=(name,), **{name: {"consent_required": False}})
    result = run_export(ctx)
    assert (result["sent"], result["held"]) == (1, 1)
    held = [r for r in rows(sqlite_engine) if r.status == ConversionStatus.held]
    assert held[0].hold_rule == "consent_denied"
    (body,) = [r.json() for r in fakes.received({"gdm": "google_data_manager", "li": "linkedin"}[name])]
    text = str(body)
    assert "userIdentifiers" not in text and "SHA256_EMAIL" not in text


@pytest.mark.parametrize("amount", ["-5", "Infinity", "1e308", "200000001"])
def test_values_out_of_range_are_held_with_a_named_rule(
        sqlite_engine: Any, fakes: FakePlatforms, tmp_path: Path, amount: str) -> None:
    full_lead(sqlite_engine, 1, won_at=NOW - timedelta(days=2))
    with session_scope(sqlite_engine) as s:  # what a CRM (or a CSV) can hand over
        s.execute(update(StageChange).where(StageChange.value == "closedwon")  # type: ignore[arg-type]
                  .values(amount=Decimal(amount)))
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("gads",))
    result = run_export(ctx)
    won = [r for r in rows(sqlite_engine) if r.stage == "Won"]
    assert [(r.status, r.hold_rule, r.value) for r in won] == [
        (ConversionStatus.held, "value_out_of_range", None)]
    assert result["sent"] == 1  # the Qualified conversion went out
    holds = build_report_data(ctx).holds
    assert holds.to_dict("records") == [
        {"destination": "gads", "hold_rule": "value_out_of_range", "n": 1}]  # counted in the report
    # the CRM is corrected: the row is released with the sane value
    with session_scope(sqlite_engine) as s:
        s.execute(update(StageChange).where(StageChange.value == "closedwon")  # type: ignore[arg-type]
                  .values(amount=Decimal("1200")))
    later = make_ctx(sqlite_engine, fakes, tmp_path, names=("gads",),
                     clock=lambda: NOW + timedelta(minutes=5))
    assert run_export(later)["sent"] == 1


def test_nan_is_out_of_range_wherever_it_comes_from() -> None:
    from leadloop.config import StageConfig
    from leadloop.export.outbox import _in_bounds

    stage = StageConfig(name="Won", crm_values=["closedwon"])
    assert not _in_bounds(stage, Decimal("NaN")) and not _in_bounds(stage, Decimal("-Infinity"))
    assert _in_bounds(stage, Decimal("0")) and _in_bounds(stage, None)


def test_value_bounds_are_configurable_per_stage(sqlite_engine: Any, fakes: FakePlatforms,
                                                 tmp_path: Path) -> None:
    from leadloop.config import settings_from_dict
    from tests.conftest import BASE_CONFIG
    from tests.export_helpers import settings_sections

    full_lead(sqlite_engine, 1, won_at=NOW - timedelta(days=2), amount="5000")
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("gads",))
    sections = settings_sections(fakes.urls, ("gads",))
    sections["stages"][2]["max_value"] = 1000.0
    ctx.settings = settings_from_dict({**BASE_CONFIG, **sections}, base_dir=tmp_path)
    run_export(ctx)
    (won,) = [r for r in rows(sqlite_engine) if r.stage == "Won"]
    assert won.hold_rule == "value_out_of_range"


def test_csv_files_validate_click_ids_and_write_inert_cells(
        sqlite_engine: Any, fakes: FakePlatforms, tmp_path: Path) -> None:
    full_lead(sqlite_engine, 1, gclid='=HYPERLINK("http://evil.example","x")')
    full_lead(sqlite_engine, 2, gclid="Cj0KCQiA-ok_123")
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=())
    from leadloop.config import settings_from_dict
    from tests.conftest import BASE_CONFIG

    stages = [dict(s) for s in BASE_CONFIG["stages"]]
    stages[1] = {**stages[1], "destinations": {"files": "@SUM(1+1)"}}
    ctx.settings = settings_from_dict({**BASE_CONFIG, "stages": stages, "destinations": {
        "files": {"kind": "csv_files", "output_dir": str(tmp_path / "files")}}}, base_dir=tmp_path)
    result = run_export(ctx)
    assert (result["sent"], result["held"]) == (1, 1)
    held = [r for r in rows(sqlite_engine) if r.status == ConversionStatus.held]
    assert held[0].hold_rule == "invalid_click_id"
    (path,) = list((tmp_path / "files").glob("*.csv"))
    lines = list(csv.reader(path.read_text().splitlines()[1:]))
    assert lines[1][:2] == ["Cj0KCQiA-ok_123", "'@SUM(1+1)"]  # the conversion name came in as a formula
    assert not any(cell.startswith(("=", "+", "-", "@")) for line in lines for cell in line)
