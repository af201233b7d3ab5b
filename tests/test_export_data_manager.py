"""Data Manager: restatements by re-sending the same transactionId, asynchronous FAILED and
PARTIAL_SUCCESS that change what the store and the report call sent, and what each platform can
retract, as the report reads it."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from leadloop.errors import FatalDestinationError
from leadloop.export.engine import run_export
from leadloop.export.outbox import order_id
from leadloop.export.registry import adjustment_support
from leadloop.report.data import build_report_data
from leadloop.sandbox.fake_platforms import FakePlatforms
from leadloop.store import session_scope
from leadloop.tables import ConversionStatus, Lead, LeadStatus, RejectedRecord, StageChange
from tests.export_helpers import NOW, full_lead, settings_sections
from tests.test_export_outbox import make_ctx, rows


def _won_to_gdm(fakes: FakePlatforms, tmp_path: Path, engine: Any, **kw: Any) -> Any:
    ctx = make_ctx(engine, fakes, tmp_path, names=("gdm",), **kw)
    from leadloop.config import settings_from_dict
    from tests.conftest import BASE_CONFIG

    sections = settings_sections(fakes.urls, ("gdm",))
    sections["stages"][2]["destinations"] = {"gdm": "7003"}
    ctx.settings = settings_from_dict({**BASE_CONFIG, **sections}, base_dir=tmp_path)
    return ctx


def test_a_value_change_is_restated_with_the_same_transaction_id(
        engine: Any, fakes: FakePlatforms, tmp_path: Path) -> None:
    lead_id = full_lead(engine, 1, age=timedelta(days=3), won_at=NOW - timedelta(days=3),
                        amount="1000")
    ctx = _won_to_gdm(fakes, tmp_path, engine)
    assert run_export(ctx)["sent"] == 2
    with session_scope(engine) as s:
        s.execute(update(StageChange).where(StageChange.value == "closedwon")  # type: ignore[arg-type]
                  .values(amount=Decimal("1500")))
    result = run_export(ctx)
    assert result["revisions"] == 1 and result["sent"] == 1
    (restated,) = fakes.adjustments["google_data_manager"]
    assert restated["transactionId"] == order_id("gdm", "hubspot", "1001", "Won", 0)
    assert restated["conversionValue"] == 1500.0 and "lastUpdatedTimestamp" in restated
    assert fakes.ledgers["google_data_manager"][restated["transactionId"]]["conversionValue"] == 1500.0
    # a lost deal cannot be retracted at Data Manager: nothing is built, and the report says so
    with session_scope(engine) as s:
        s.execute(update(Lead).where(Lead.id == lead_id).values(status=LeadStatus.deleted))  # type: ignore[arg-type]
    assert run_export(ctx)["revisions"] == 0
    assert adjustment_support(ctx.settings) == {"gdm": {"can_restate": True, "can_retract": False}}


def test_async_failed_rejects_the_rows_of_that_request(sqlite_engine: Any, fakes: FakePlatforms,
                                                       tmp_path: Path) -> None:
    for i in range(3):
        full_lead(sqlite_engine, i)
    fakes.fail_async("FAILED", {"PROCESSING_ERROR_REASON_CLICK_NOT_FOUND": 3})
    result = run_export(make_ctx(sqlite_engine, fakes, tmp_path, names=("gdm",)))
    assert result["destinations"]["gdm"]["diagnosed"] == 1
    assert {(r.status, r.platform_code) for r in rows(sqlite_engine)} == {
        (ConversionStatus.rejected, "FAILED")}
    with session_scope(sqlite_engine) as s:
        reasons = s.execute(select(RejectedRecord.reason)).scalars().all()  # type: ignore[call-overload]
    assert len(reasons) == 3 and "CLICK_NOT_FOUND x3" in reasons[0]


def test_async_failed_for_the_account_sends_the_rows_again_after_the_fix(
        sqlite_engine: Any, fakes: FakePlatforms, tmp_path: Path) -> None:
    full_lead(sqlite_engine, 1)
    reason = "PROCESSING_ERROR_REASON_DESTINATION_ACCOUNT_ENHANCED_CONVERSIONS_TERMS_NOT_SIGNED"
    fakes.fail_async("FAILED", {reason: 1})
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("gdm",))
    with pytest.raises(FatalDestinationError, match="enhanced conversions terms"):
        run_export(ctx)
    assert rows(sqlite_engine)[0].status == ConversionStatus.pending
    fakes.fail_async(None)
    later = make_ctx(sqlite_engine, fakes, tmp_path, names=("gdm",),
                     clock=lambda: NOW + timedelta(hours=1))
    assert run_export(later)["sent"] == 1


def test_partial_success_is_not_called_sent_by_the_report(sqlite_engine: Any, fakes: FakePlatforms,
                                                          tmp_path: Path) -> None:
    for i in range(4):
        full_lead(sqlite_engine, i)
    fakes.fail_async("PARTIAL_SUCCESS", {"PROCESSING_ERROR_REASON_EVENT_TOO_OLD": 1})
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("gdm", "li"))
    run_export(ctx)
    gdm = [r for r in rows(sqlite_engine) if r.destination == "gdm"]
    assert {(r.status, r.platform_code) for r in gdm} == {(ConversionStatus.sent, "PARTIAL_SUCCESS")}
    assert "EVENT_TOO_OLD x1" in (gdm[0].last_error or "")
    uploads = build_report_data(ctx).uploads.set_index("destination")
    assert (uploads.loc["gdm", "sent"], uploads.loc["gdm", "sent_unconfirmed"]) == (0, 4)
    assert (uploads.loc["li", "sent"], uploads.loc["li", "sent_unconfirmed"]) == (4, 0)
    assert not uploads.loc["li", "can_retract"] and not uploads.loc["gdm", "can_retract"]
    assert uploads.loc["gdm", "can_restate"]
