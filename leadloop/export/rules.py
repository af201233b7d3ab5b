"""Platform rules checked before a conversion is sent: the shared ones, and how a destination's
own rule (its class's `rule`, in its module) is combined with them.

A conversion that breaks a rule is *held* with the rule's name in `hold_rule`, and re-checked on
every run: some rules clear with time (`adjustment_too_recent`), others with new CRM data
(`no_click_id` once the click id is synced), and some never do (`event_too_old`) — those stay held
so that `leadloop status` shows why they were never uploaded.

Each platform's window (its class's `window_days`) applies to every row whether or not it has a
click id; `conversion_window_days` in a destination narrows it. The export checks rows waiting
for a retry again before re-sending them, so a window that closed in the meantime holds them
instead.

Whether hashed identities count as an identity is decided by `consent.user_data_allowed`, the
same function the exporters use to put them in the body.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from leadloop.export.consent import consent_hold, user_data_allowed

if TYPE_CHECKING:
    from leadloop.export.base import OutRow

DAY = timedelta(days=1)
# Holds that clear with time alone; every other hold clears only when the lead's data changes.
CLEAR_WITH_TIME = frozenset({"in_future", "adjustment_too_recent"})
PlatformHold = Callable[["OutRow", datetime, bool], "str | None"]


def common(row: OutRow, now: datetime) -> str | None:
    """Rules of every platform: no conversion from the future or before its lead, a value has
    its currency, a restatement has a value."""
    if row.conversion_time > now:
        return "in_future"
    if row.conversion_time < row.lead_created_at:
        return "before_lead_created"
    if row.kind != "retraction" and row.value is not None and not row.currency:
        return "no_currency"
    if row.kind == "restatement" and row.value is None:
        return "no_value"
    return None


def has_identity(row: OutRow, hashed: tuple[str, ...]) -> bool:
    return any(getattr(row, h) for h in hashed)


def no_identity(row: OutRow, hashed: tuple[str, ...], user_data: bool, rule: str) -> str:
    """Why a row without a click id cannot be matched: its hashes may not be sent for want of
    consent (`consent_denied`), or it has none (`rule`)."""
    if not user_data and row.consent_ad_user_data is False and has_identity(row, hashed):
        return "consent_denied"
    return rule


def window(platform_days: int, configured_days: int | None) -> timedelta:
    """The platform's window, narrowed by the destination's `conversion_window_days`."""
    return min(platform_days, configured_days or platform_days) * DAY


def check(row: OutRow, now: datetime, platform_hold: PlatformHold, *, consent_required: bool,
          send_user_data: bool) -> str | None:
    """The name of the first rule `row` breaks (shared rules, consent, then the platform's), or
    None when it may be sent."""
    return (
        common(row, now)
        or consent_hold(row, consent_required)
        or platform_hold(row, now, user_data_allowed(row, send_user_data))
    )
