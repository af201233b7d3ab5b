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
from sqlmodel import Session, select

from leadloop.export.engine import build_destination, run_export
from leadloop.export.outbox import BUILD_RULES, build, load_rows
from leadloop.report.data import build_report_data
from leadloop.sandbox.fake_platforms import FakePlatforms
from leadloop.store import session_scope
from leadloop.tables import Conversion, ConversionKind, ConversionStatus, StageChange
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


def test_rules_decided_while_building_are_those_of_the_rows_read_back(
        engine: Any, fakes: FakePlatforms, tmp_path: Path) -> None:
    """The build holds or releases each row from the lead and stage facts it has in hand; that
    must be exactly what each platform's rules say about the row as stored."""
    variants: list[dict[str, Any]] = [
        {}, {"gclid": None}, {"gclid": None, "email": None, "phone": None},
        {"meta_lead_id": None}, {"msclkid": None}, {"li_fat_id": None, "email": None},
        {"age": timedelta(days=8)}, {"age": timedelta(days=100)}, {"consent": False},
        {"consent": None, "gclid": None}, {"sql_at": NOW + timedelta(hours=1)},
        {"won_at": NOW - timedelta(days=1), "amount": "250"},
        {"won_at": NOW - timedelta(days=3), "amount": None},
        {"created": NOW - timedelta(days=200), "age": timedelta(days=30)},
    ]
    for i, kw in enumerate(variants):
        full_lead(engine, i, **kw)
    ctx = make_ctx(engine, fakes, tmp_path, names=("gdm", "gads", "meta", "msads", "li"))
    dests = {n: build_destination(ctx, n) for n in ctx.settings.destinations}
    with Session(engine) as session:
        done = build(session, ctx.settings, {n: d.adjustments for n, d in dests.items()}, NOW,
                     rules={n: d.hold_rule for n, d in dests.items()})
        assert not any(done.unchecked.values())
        seen = set()
        for name, dest in dests.items():
            stored = {r.id: r for r in session.exec(
                select(Conversion).where(Conversion.destination == name))}
            for row in load_rows(session, name, [ConversionStatus.pending, ConversionStatus.held]):
                was = stored[row.id]
                if was.hold_rule in BUILD_RULES:
                    continue
                assert was.hold_rule == dest.hold_rule(row, NOW), (name, row.crm_id)
                assert was.status == (ConversionStatus.held if was.hold_rule else ConversionStatus.pending)
                seen.add(was.hold_rule)
        session.rollback()
    assert {None, "no_click_id", "no_meta_lead_id", "event_too_old", "consent_denied",
            "in_future"} <= seen


def test_a_held_row_the_build_does_not_rebuild_is_still_rechecked(
        sqlite_engine: Any, fakes: FakePlatforms, tmp_path: Path) -> None:
    """Rules are decided while building, but a row the build leaves alone (here: of a stage no
    longer mapped to the destination) is still checked after it, as every unsent row was before:
    held for want of a Meta lead id, released once the lead has one."""
    lead_id = full_lead(sqlite_engine, 1)
    with session_scope(sqlite_engine) as session:  # left over from an earlier stage mapping
        session.add(Conversion(order_id="f" * 32, destination="meta", lead_id=lead_id,
                               stage="Won", kind=ConversionKind.conversion,
                               conversion_action="Won", conversion_time=NOW - timedelta(days=1),
                               status=ConversionStatus.held, hold_rule="no_meta_lead_id"))
    result = run_export(make_ctx(sqlite_engine, fakes, tmp_path, names=("meta",)))
    assert result["held"] == 0
    assert {r.stage: r.status for r in rows(sqlite_engine)} == {
        "Qualified": ConversionStatus.sent, "Won": ConversionStatus.sent}
