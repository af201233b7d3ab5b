"""An ad account that is not set up pauses its destination: rows stay due, nothing is rejected,
at most a couple of requests are spent, `status` names the fix, and the next run retries. Only an
error pointing at a row rejects that row."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from leadloop.errors import FatalDestinationError
from leadloop.export.engine import run_export
from leadloop.export.outbox import order_id
from leadloop.jobs import run_job
from leadloop.sandbox.fake_platforms import FakePlatforms
from leadloop.status import collect_status, format_status
from leadloop.tables import ConversionStatus, RejectedRecord
from tests.export_helpers import NOW, full_lead
from tests.test_export_outbox import make_ctx, rows

KIND = {"gdm": "google_data_manager", "gads": "google_ads", "meta": "meta", "msads": "microsoft",
        "li": "linkedin"}


def _rejected(engine: Any) -> int:
    with Session(engine) as s:
        return len(s.exec(select(RejectedRecord)).all())


@pytest.mark.parametrize(("name", "code", "fix_words"), [
    ("gdm", "INVALID_CONVERSION_ACTION_ID", "conversion action ids"),
    ("gdm", "TERMS_AND_CONDITIONS_NOT_SIGNED", "customer data terms"),
    ("gdm", "DESTINATION_ACCOUNT_ENHANCED_CONVERSIONS_TERMS_NOT_SIGNED", "enhanced conversions terms"),
    ("gdm", "PERMISSION_DENIED", "access"),
    ("gdm", "OPERATING_ACCOUNT_LOGIN_ACCOUNT_MISMATCH", "login_account_id"),
    ("gdm", "CONVERSION_ACTION_TOO_RECENTLY_CREATED", "wait"),
    ("gads", "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS", "customer data terms"),
    ("gads", "NO_CONVERSION_ACTION_FOUND", "conversion action ids"),
    ("meta", "100/33", "dataset_id"),
    ("msads", "OfflineConversionNameInvalid", "offline conversion goals"),
    ("msads", "InvalidCredentials", "OAuth credentials"),
    ("li", "ACCESS_DENIED", "rw_conversions"),
    ("li", "NONEXISTENT_VERSION", "api_version"),
])
def test_an_account_not_set_up_pauses_the_destination(sqlite_engine: Any, fakes: FakePlatforms,
                                                      tmp_path: Path, name: str, code: str,
                                                      fix_words: str) -> None:
    for i in range(40):
        full_lead(sqlite_engine, i)
    fakes.setup_error(KIND[name], code)
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=(name,), **{name: {"batch_size": 8}})
    result = run_job(ctx, "export")
    assert not result.ok and "paused" in (result.error or "") and fix_words in (result.error or "")
    assert len(fakes.received(KIND[name])) <= 2  # not 2n-1 bisected requests
    assert all(r.status == ConversionStatus.pending and r.attempts == 0 for r in rows(sqlite_engine))
    assert _rejected(sqlite_engine) == 0

    status = collect_status(ctx)
    (alert,) = status["destination_alerts"]
    assert alert["level"] == "paused" and fix_words in alert["message"]
    assert alert["code"] == code
    assert f"PAUSED {name}:" in format_status(status)

    fakes.setup_error(KIND[name], None)  # the account is fixed: the next run sends everything
    again = run_job(ctx, "export")
    assert again.ok and again.counts["sent"] == 40
    assert collect_status(ctx)["destination_alerts"] == []


def test_other_destinations_go_on_while_one_is_paused(sqlite_engine: Any, fakes: FakePlatforms,
                                                     tmp_path: Path) -> None:
    for i in range(3):
        full_lead(sqlite_engine, i)
    fakes.setup_error("google_data_manager", "TERMS_AND_CONDITIONS_NOT_SIGNED")
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("gdm", "li"))
    with pytest.raises(FatalDestinationError, match="gdm paused"):
        run_export(ctx)
    status = {r.destination: r.status for r in rows(sqlite_engine)}
    assert status == {"gdm": ConversionStatus.pending, "li": ConversionStatus.sent}


def test_a_row_error_in_a_partial_failure_still_rejects_only_that_row(
        sqlite_engine: Any, fakes: FakePlatforms, tmp_path: Path) -> None:
    for i in range(3):
        full_lead(sqlite_engine, i)
    bad = order_id("gads", "hubspot", "1001", "Qualified", 0)
    fakes.reject("google_ads", bad, "UNPARSEABLE_GCLID")
    result = run_export(make_ctx(sqlite_engine, fakes, tmp_path))
    assert (result["sent"], result["rejected"], result["requests"]) == (2, 1, 1)


def test_a_setup_code_on_one_row_keeps_what_was_accepted_and_pauses(
        sqlite_engine: Any, fakes: FakePlatforms, tmp_path: Path) -> None:
    for i in range(4):
        full_lead(sqlite_engine, i)
    # Microsoft answers per row: the goal name is unknown for every row of the first batch
    fakes.setup_error("microsoft", "OfflineConversionNameInvalid")
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("msads",), msads={"batch_size": 2})
    with pytest.raises(FatalDestinationError, match="OfflineConversionNameInvalid"):
        run_export(ctx)
    assert len(fakes.received("microsoft")) == 1
    assert {r.status for r in rows(sqlite_engine)} == {ConversionStatus.pending}


def test_a_400_naming_no_reason_is_still_bisected(sqlite_engine: Any, fakes: FakePlatforms,
                                                  tmp_path: Path) -> None:
    for i in range(4):
        full_lead(sqlite_engine, i)
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("li",))
    from leadloop.sandbox.server import Reply

    fakes._scripted["linkedin"].append(Reply(400, {"message": "bad request"}))
    result = run_export(ctx)
    assert result["sent"] == 4 and result["requests"] == 3  # halves re-sent


def test_microsoft_goal_too_recent_is_retried_after_two_hours(sqlite_engine: Any, fakes: FakePlatforms,
                                                            tmp_path: Path) -> None:
    full_lead(sqlite_engine, 1)
    fakes.reject("microsoft", "msclk00000001", "OfflineConversionNotAcceptedForGoal")
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("msads",))
    result = run_export(ctx)
    assert result["failed"] == 1 and result["rejected"] == 0
    (row,) = rows(sqlite_engine)
    assert row.platform_code == "OfflineConversionNotAcceptedForGoal"
    assert row.next_attempt_at is not None and (row.next_attempt_at - NOW).total_seconds() == 7200


def test_google_click_not_found_is_final(sqlite_engine: Any, fakes: FakePlatforms,
                                         tmp_path: Path) -> None:
    full_lead(sqlite_engine, 1)
    fakes.reject("google_ads", order_id("gads", "hubspot", "1001", "Qualified", 0), "CLICK_NOT_FOUND")
    result = run_export(make_ctx(sqlite_engine, fakes, tmp_path))
    assert result["rejected"] == 1 and result["failed"] == 0


def test_cli_status_exits_1_and_names_the_fix(tmp_path: Path, fakes: FakePlatforms,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from leadloop.cli import cli
    from leadloop.store import make_engine

    db = tmp_path / "ll.db"
    config = tmp_path / "leadloop.toml"
    config.write_text(f"""
[database]
url = "sqlite:///{db}"
[crm]
kind = "hubspot"
token_env = "LL_TEST_HUBSPOT"
[destinations.gdm]
kind = "google_data_manager"
operating_account_id = "1234567890"
base_url = "{fakes.urls['google_data_manager']}"
[[stages]]
name = "Qualified"
crm_values = ["salesqualifiedlead"]
field = "lifecyclestage"
macro = true
value = 10.0
destinations = {{ gdm = "7001" }}
""")
    monkeypatch.setenv("LL_TEST_HUBSPOT", "x")
    runner = CliRunner()
    assert runner.invoke(cli, ["-c", str(config), "status"]).exit_code == 0  # creates the store
    full_lead(make_engine(f"sqlite:///{db}"), 1, age=timedelta(hours=2))
    fakes.setup_error("google_data_manager", "TERMS_AND_CONDITIONS_NOT_SIGNED")
    export = runner.invoke(cli, ["-c", str(config), "export"])
    assert export.exit_code == 1 and "customer data terms" in export.output
    status = runner.invoke(cli, ["-c", str(config), "status"])
    assert status.exit_code == 1
    assert "PAUSED gdm: paused by the platform (TERMS_AND_CONDITIONS_NOT_SIGNED): accept Google's " \
           "customer data terms" in status.output


def test_linkedin_element_refused_for_an_unknown_rule_pauses_after_keeping_the_rest(
        sqlite_engine: Any, fakes: FakePlatforms, tmp_path: Path) -> None:
    from leadloop.sandbox.server import Reply

    for i in range(2):
        full_lead(sqlite_engine, i)
    fakes._scripted["linkedin"].append(Reply(200, {"elements": [
        {"status": 201},
        {"status": 404, "error": {"status": 404, "code": "NOT_FOUND",
                                  "message": "conversion rule 9001 not found"}}]}))
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("li",))
    with pytest.raises(FatalDestinationError, match="conversion rule ids"):
        run_export(ctx)
    assert [r.status for r in rows(sqlite_engine)] == [ConversionStatus.sent, ConversionStatus.pending]
    assert _rejected(sqlite_engine) == 0
