"""Platform rules checked before a conversion is sent.

A conversion that breaks a rule is *held* with the rule's name in `hold_rule`, and re-checked on
every run: some rules clear with time (`adjustment_too_recent`), others with new CRM data
(`no_click_id` once the click id is synced), and some never do (`event_too_old`) — those stay held
so that `leadloop status` shows why they were never uploaded.

Windows (spec sheet): Meta events at most 7 days old at send time; Microsoft and LinkedIn 90 days;
Google adjustments between 24 hours and 54 days after the conversion; Google clicks up to the
action's click-through window, at most 90 days (the maximum is unverified; the platform answers
`EXPIRED_EVENT` past the real window anyway).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timedelta

from leadloop.export.base import OutRow

_META_LEAD_ID = re.compile(r"^\d{15,17}$")
DAY = timedelta(days=1)
# Holds that clear with time alone; every other hold clears only when the lead's data changes.
CLEAR_WITH_TIME = frozenset({"in_future", "adjustment_too_recent"})
Rule = Callable[[OutRow, datetime, bool], str | None]


def _common(row: OutRow, now: datetime) -> str | None:
    if row.conversion_time > now:
        return "in_future"
    if row.conversion_time < row.lead_created_at:
        return "before_lead_created"
    if row.kind != "retraction" and row.value is not None and not row.currency:
        return "no_currency"
    if row.kind == "restatement" and row.value is None:
        return "no_value"
    return None


def _consent(row: OutRow, consent_required: bool) -> str | None:
    # Unknown consent is sent without a consent field (the account default applies); an explicit
    # denial is never uploaded when the destination requires consent.
    if consent_required and row.consent_ad_user_data is False:
        return "consent_denied"
    return None


def _has_identity(row: OutRow, hashed: tuple[str, ...]) -> bool:
    return any(getattr(row, h) for h in hashed)


def google(row: OutRow, now: datetime, send_user_data: bool) -> str | None:
    if row.kind == "conversion":
        if row.google_click is None and not (
            send_user_data and _has_identity(row, ("email_google_sha256", "phone_e164_sha256"))
        ):
            return "no_click_id"
        # Google imports a click conversion only while the click is inside the action's click-through
        # window (at most 90 days) at upload time; older ones fail async as EVENT_TOO_OLD/EXPIRED_EVENT.
        # The lead's creation stands in for the click time.
        if row.google_click is not None and now - row.lead_created_at > 90 * DAY:
            return "click_too_old"
    else:
        age = now - row.conversion_time
        if age < DAY:
            return "adjustment_too_recent"
        if age > 54 * DAY:
            return "adjustment_window_passed"
    return None


def meta(row: OutRow, now: datetime, send_user_data: bool) -> str | None:
    if not row.meta_lead_id or not _META_LEAD_ID.match(row.meta_lead_id):
        return "no_meta_lead_id"
    if now - row.conversion_time > 7 * DAY:
        return "event_too_old"
    return None


def microsoft(row: OutRow, now: datetime, send_user_data: bool) -> str | None:
    if not row.msclkid:
        return "no_click_id"
    if now - row.conversion_time > 90 * DAY:
        return "event_too_old"
    return None


def linkedin(row: OutRow, now: datetime, send_user_data: bool) -> str | None:
    if not row.li_fat_id and not (send_user_data and row.email_sha256):
        return "no_linkedin_id"
    if now - row.conversion_time > 90 * DAY:
        return "event_too_old"
    return None


def google_file(row: OutRow, now: datetime, send_user_data: bool) -> str | None:
    """The click-import file template has a Google Click ID column only (no braids, no hashes)."""
    if row.kind == "conversion" and not row.gclid:
        return "no_click_id"
    return google(row, now, send_user_data)


RULES: dict[str, Rule] = {
    "google_data_manager": google,
    "google_ads": google,
    "meta": meta,
    "microsoft": microsoft,
    "linkedin": linkedin,
    # csv_files: one per file platform
    "file:google": google_file,
    "file:meta": meta,
    "file:microsoft": microsoft,
    "file:linkedin": linkedin,
}


def check(rule_set: str, row: OutRow, now: datetime, *, consent_required: bool,
          send_user_data: bool) -> str | None:
    """The name of the first rule `row` breaks for this platform, or None when it may be sent."""
    return (
        _common(row, now)
        or _consent(row, consent_required)
        or RULES[rule_set](row, now, send_user_data)
    )
