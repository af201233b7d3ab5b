"""Outbox state transitions, as pure functions: what a row's columns become after a rule check,
a platform's answer or a diagnostics report. No session, no clock: `now` comes in, a dict of
column changes goes out, and the engine (`engine.py`) writes it.

States: pending (due) -> sent | rejected | failed (retry at `next_attempt_at`) | dead (out of
attempts or past the retry horizon); pending <-> held (a platform rule says not yet, or never).
A "paused" answer changes nothing: the row stays due for the next run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from leadloop.export.base import OutRow, RowResult, Settlement
from leadloop.tables import ConversionStatus

BACKOFF_START = 300.0  # seconds before the first retry of a transient failure
BACKOFF_CAP = 6 * 3600.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long a destination keeps retrying a row: `max_attempts` sends, and no retry scheduled
    later than `horizon` after the row's first failure."""

    max_attempts: int
    horizon: timedelta

    @classmethod
    def of(cls, cfg: Any) -> RetryPolicy:
        return cls(cfg.max_attempts, timedelta(hours=cfg.retry_horizon_hours))


def backoff_seconds(attempts: int, retry_after: float | None) -> float:
    """Wait before the next try: the platform's `Retry-After` when it gave one, else exponential
    from 5 minutes, capped at 6 hours. `attempts` counts the try that just failed."""
    if retry_after is not None:
        return retry_after
    return min(BACKOFF_START * 2 ** (attempts - 1), BACKOFF_CAP)


def rule_change(row_id: int, was: str | None, rule: str | None) -> dict[str, Any] | None:
    """A pending/held row after a rule check: held under `rule`, pending when none, or None when
    nothing changes."""
    if rule == was:
        return None
    return {"id": row_id, "hold_rule": rule,
            "status": ConversionStatus.held if rule else ConversionStatus.pending}


def retry_hold(row_id: int, rule: str) -> dict[str, Any]:
    """A due row (a retry included) that a rule now holds: its scheduled retry is dropped."""
    return {"id": row_id, "status": ConversionStatus.held, "hold_rule": rule,
            "next_attempt_at": None}


def result_change(res: RowResult, row_id: int, attempts: int, response: dict[str, Any] | None,
                  now: datetime, policy: RetryPolicy) -> tuple[str, dict[str, Any]]:
    """(count key, column changes) for a row's answer from the platform ("sent", "rejected" or
    "retry"; a "paused" answer never gets here). `attempts` and `response` are the row's before
    this send; the first failure's time travels in the stored response."""
    attempts += 1
    change: dict[str, Any] = {"id": row_id, "attempts": attempts,
                              "platform_code": res.platform_code, "request_id": res.request_id}
    if res.outcome == "sent":
        change.update(status=ConversionStatus.sent, sent_at=now, last_error=None,
                      next_attempt_at=None, platform_response=res.response or {})
        return "sent", change
    if res.outcome == "rejected":
        change.update(status=ConversionStatus.rejected, last_error=res.message,
                      next_attempt_at=None, platform_response=res.response or {})
        return "rejected", change
    first = (response or {}).get("first_failed_at") or now.isoformat()
    next_at = now + timedelta(seconds=backoff_seconds(attempts, res.retry_after))
    dead = (attempts >= policy.max_attempts
            or next_at > datetime.fromisoformat(first) + policy.horizon)
    change.update(status=ConversionStatus.dead if dead else ConversionStatus.failed,
                  last_error=res.message, next_attempt_at=None if dead else next_at,
                  platform_response={**(res.response or {}), "first_failed_at": first})
    return ("dead" if dead else "failed"), change


def settle_change(settled: Settlement, diagnostics: dict[str, Any], now: datetime
                  ) -> dict[str, Any]:
    """Column changes for the rows of one request once the platform's diagnostics settled it:
    rejected, retried later, back to due (the destination pauses), or still sent (with the
    platform's code and message kept)."""
    change: dict[str, Any] = {"platform_code": settled.code,
                              "platform_response": {"diagnostics": diagnostics}}
    message = settled.message
    if settled.outcome == "rejected":
        change.update(status=ConversionStatus.rejected, last_error=message)
    elif settled.outcome == "retry":
        change.update(status=ConversionStatus.failed, last_error=message, next_attempt_at=now
                      + timedelta(seconds=settled.retry_after or BACKOFF_START))
    elif settled.outcome == "paused":
        change.update(status=ConversionStatus.pending, last_error=message, sent_at=None)
    elif message:
        change["last_error"] = message
    return change


def rejected_payload(row: OutRow) -> dict[str, Any]:
    """What the rejected-record row keeps of a conversion the platform refused (no identity)."""
    return {"stage": row.stage, "kind": row.kind, "crm_id": row.crm_id,
            "conversion_action": row.conversion_action}
