"""Outbox state transitions (`leadloop/export/transitions.py`) as tables of cases: each row is
what was, what happened, and what the row's columns must become."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from leadloop.export.base import OutRow, RowResult, Settlement
from leadloop.export.transitions import (
    BACKOFF_CAP,
    BACKOFF_START,
    RetryPolicy,
    backoff_seconds,
    rejected_payload,
    result_change,
    retry_hold,
    rule_change,
    settle_change,
)
from leadloop.tables import ConversionStatus as S

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy(max_attempts=8, horizon=timedelta(hours=72))
H = 3600.0


@pytest.mark.parametrize(("attempts", "retry_after", "seconds"), [
    (1, None, BACKOFF_START),  # the first failure waits 5 minutes
    (2, None, 2 * BACKOFF_START),
    (4, None, 8 * BACKOFF_START),
    (7, None, 64 * BACKOFF_START),
    (8, None, BACKOFF_CAP),  # capped at 6 hours
    (30, None, BACKOFF_CAP),
    (1, 42.0, 42.0),  # the platform's Retry-After wins
    (9, 0.0, 0.0),  # even when it says "now"
])
def test_backoff(attempts: int, retry_after: float | None, seconds: float) -> None:
    assert backoff_seconds(attempts, retry_after) == seconds


@pytest.mark.parametrize(("was", "rule", "expected"), [
    (None, None, None),  # pending, still fine: nothing to write
    ("no_click_id", "no_click_id", None),  # held, same reason: nothing to write
    (None, "event_too_old", {"hold_rule": "event_too_old", "status": S.held}),
    ("no_click_id", None, {"hold_rule": None, "status": S.pending}),  # released
    ("adjustment_too_recent", "adjustment_window_passed",
     {"hold_rule": "adjustment_window_passed", "status": S.held}),  # held for another reason
])
def test_rule_change(was: str | None, rule: str | None, expected: dict[str, Any] | None) -> None:
    change = rule_change(7, was, rule)
    assert change == (None if expected is None else {"id": 7, **expected})


def test_a_due_row_a_rule_now_holds_loses_its_retry() -> None:
    assert retry_hold(3, "event_too_old") == {"id": 3, "status": S.held,
                                              "hold_rule": "event_too_old", "next_attempt_at": None}


FIRST = (NOW - timedelta(hours=10)).isoformat()
# (answer, attempts before, stored response, count key, expected columns besides id/attempts/codes)
RESULTS: list[tuple[RowResult, int, dict[str, Any], str, dict[str, Any]]] = [
    (RowResult("o", "sent", "OK", None, response={"a": 1}, request_id="r1"), 0, {}, "sent",
     {"status": S.sent, "sent_at": NOW, "last_error": None, "next_attempt_at": None,
      "platform_response": {"a": 1}}),
    # "already exists" is classified as sent by the destination: a retried row ends sent
    (RowResult("o", "sent", "CLICK_CONVERSION_ALREADY_EXISTS", "dup"), 3,
     {"first_failed_at": FIRST}, "sent",
     {"status": S.sent, "sent_at": NOW, "last_error": None, "next_attempt_at": None,
      "platform_response": {}}),
    (RowResult("o", "rejected", "INVALID_GCLID", "bad click"), 0, {}, "rejected",
     {"status": S.rejected, "last_error": "bad click", "next_attempt_at": None,
      "platform_response": {}}),
    # first transient failure: retry in 5 minutes, the failure's time remembered
    (RowResult("o", "retry", "TRANSIENT", "503"), 0, {}, "failed",
     {"status": S.failed, "last_error": "503",
      "next_attempt_at": NOW + timedelta(seconds=BACKOFF_START),
      "platform_response": {"first_failed_at": NOW.isoformat()}}),
    # a later failure keeps the first failure's time and honours Retry-After
    (RowResult("o", "retry", "TOO_RECENT_EVENT", "wait", retry_after=6 * H), 2,
     {"first_failed_at": FIRST}, "failed",
     {"status": S.failed, "last_error": "wait", "next_attempt_at": NOW + timedelta(hours=6),
      "platform_response": {"first_failed_at": FIRST}}),
    # out of attempts: dead, no retry scheduled
    (RowResult("o", "retry", "TRANSIENT", "503"), 7, {"first_failed_at": FIRST}, "dead",
     {"status": S.dead, "last_error": "503", "next_attempt_at": None,
      "platform_response": {"first_failed_at": FIRST}}),
    # the next try would fall past the retry horizon (72 h after the first failure): dead
    (RowResult("o", "retry", "TOO_RECENT_CONVERSION", "wait", retry_after=63 * H), 1,
     {"first_failed_at": FIRST}, "dead",
     {"status": S.dead, "last_error": "wait", "next_attempt_at": None,
      "platform_response": {"first_failed_at": FIRST}}),
    # ... and just inside it: failed
    (RowResult("o", "retry", "TOO_RECENT_CONVERSION", "wait", retry_after=62 * H), 1,
     {"first_failed_at": FIRST}, "failed",
     {"status": S.failed, "last_error": "wait", "next_attempt_at": NOW + timedelta(hours=62),
      "platform_response": {"first_failed_at": FIRST}}),
]


@pytest.mark.parametrize(("res", "attempts", "response", "key", "expected"), RESULTS)
def test_result_change(res: RowResult, attempts: int, response: dict[str, Any], key: str,
                       expected: dict[str, Any]) -> None:
    got_key, change = result_change(res, 11, attempts, response, NOW, POLICY)
    assert got_key == key
    assert change == {"id": 11, "attempts": attempts + 1, "platform_code": res.platform_code,
                      "request_id": res.request_id, **expected}


DIAG = {"requestStatus": "FAILED"}
SETTLED: list[tuple[str, str | None, float | None, dict[str, Any]]] = [
    ("rejected", "bad", None, {"status": S.rejected, "last_error": "bad"}),
    ("retry", "later", 60.0, {"status": S.failed, "last_error": "later",
                              "next_attempt_at": NOW + timedelta(seconds=60)}),
    ("retry", "later", None, {"status": S.failed, "last_error": "later",
                              "next_attempt_at": NOW + timedelta(seconds=BACKOFF_START)}),
    # back to due, the destination pauses; sent_at cleared so the rows are sent again
    ("paused", "terms", None, {"status": S.pending, "last_error": "terms", "sent_at": None}),
    ("sent", "some rows failed", None, {"last_error": "some rows failed"}),  # partial success
    ("sent", None, None, {}),  # success: only the code and the report are kept
]


@pytest.mark.parametrize(("outcome", "message", "retry_after", "expected"), SETTLED)
def test_settle_change(outcome: str, message: str | None, retry_after: float | None,
                       expected: dict[str, Any]) -> None:
    change = settle_change(Settlement(outcome, "CODE", message, retry_after), DIAG, NOW)
    assert change == {"platform_code": "CODE", "platform_response": {"diagnostics": DIAG},
                      **expected}


def test_a_rejected_record_keeps_no_identity() -> None:
    row = OutRow(id=1, order_id="o", original_order_id="o", kind="conversion", revision=0,
                 stage="Qualified", conversion_action="7001", conversion_time=NOW,
                 value=Decimal("1"), currency="EUR", created_at=NOW, crm_id="c1",
                 lead_created_at=NOW, gclid="G", email_sha256="e" * 64)
    assert rejected_payload(row) == {"stage": "Qualified", "kind": "conversion", "crm_id": "c1",
                                     "conversion_action": "7001"}
