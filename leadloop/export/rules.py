"""Platform rules checked before a conversion is sent.

A conversion that breaks a rule is *held* with the rule's name in `hold_rule`, and re-checked on
every run: some rules clear with time (`adjustment_too_recent`), others with new CRM data
(`no_click_id` once the click id is synced), and some never do (`event_too_old`) — those stay held
so that `leadloop status` shows why they were never uploaded.

Windows (spec sheet), applied to every row whether or not it has a click id: Meta events at most
7 days old at send time; Microsoft and LinkedIn 90 days; Google conversions (offline clicks and
enhanced conversions for leads alike) at most 90 days old, and their lead's click at most 90
days old (the action's click-through window; the maximum is unverified, the platform answers
`EVENT_TOO_OLD` past the real window anyway); Google adjustments between 24 hours and 54 days
after the conversion. `conversion_window_days` in a destination narrows its window. The export
checks rows waiting for a retry again before re-sending them, so a window that closed in the
meantime holds them instead.

Whether hashed identities count as an identity is decided by `consent.user_data_allowed`, the
same function the exporters use to put them in the body.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timedelta

from leadloop.export.base import OutRow
from leadloop.export.consent import consent_hold, user_data_allowed

_META_LEAD_ID = re.compile(r"^\d{15,17}$")
# Click id shapes, checked where a click id lands in a file a person opens (csv_files): URL-safe
# tokens for Google and Microsoft, the first-party tracking UUID for LinkedIn.
CLICK_ID_FORMATS = {
    "gclid": re.compile(r"^[A-Za-z0-9_\-]{6,512}$"),
    "msclkid": re.compile(r"^[A-Za-z0-9_\-]{6,128}$"),
    "li_fat_id": re.compile(r"^[A-Za-z0-9\-]{6,128}$"),
    "meta_lead_id": _META_LEAD_ID,
}
DAY = timedelta(days=1)
WINDOW_DAYS = {"google": 90, "meta": 7, "microsoft": 90, "linkedin": 90}
# Holds that clear with time alone; every other hold clears only when the lead's data changes.
CLEAR_WITH_TIME = frozenset({"in_future", "adjustment_too_recent"})
Rule = Callable[[OutRow, datetime, bool, int | None], str | None]


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


def _has_identity(row: OutRow, hashed: tuple[str, ...]) -> bool:
    return any(getattr(row, h) for h in hashed)


def _no_identity(row: OutRow, hashed: tuple[str, ...], user_data: bool, rule: str) -> str:
    """Why a row without a click id cannot be matched: its hashes may not be sent for want of
    consent (`consent_denied`), or it has none (`rule`)."""
    if not user_data and row.consent_ad_user_data is False and _has_identity(row, hashed):
        return "consent_denied"
    return rule


def _window(platform: str, window: int | None) -> timedelta:
    days = WINDOW_DAYS[platform]
    return min(days, window or days) * DAY


def google(row: OutRow, now: datetime, user_data: bool, window: int | None = None) -> str | None:
    if row.kind == "conversion":
        hashed = ("email_google_sha256", "phone_e164_sha256")
        if row.google_click is None and not (user_data and _has_identity(row, hashed)):
            return _no_identity(row, hashed, user_data, "no_click_id")
        # Google imports a conversion, with a click id or as an enhanced conversion for leads
        # matched on hashes, only while the lead's click is inside the action's click-through
        # window (at most 90 days) at upload time; the lead's creation stands in for the click.
        if now - row.conversion_time > _window("google", window):
            return "event_too_old"
        if now - row.lead_created_at > _window("google", window):
            return "click_too_old"
    else:
        age = now - row.conversion_time
        if age < DAY:
            return "adjustment_too_recent"
        if age > 54 * DAY:
            return "adjustment_window_passed"
    return None


def meta(row: OutRow, now: datetime, user_data: bool, window: int | None = None) -> str | None:
    if not row.meta_lead_id or not _META_LEAD_ID.match(row.meta_lead_id):
        return "no_meta_lead_id"
    if now - row.conversion_time > _window("meta", window):
        return "event_too_old"
    return None


def microsoft(row: OutRow, now: datetime, user_data: bool, window: int | None = None) -> str | None:
    if not row.msclkid:
        return "no_click_id"
    if now - row.conversion_time > _window("microsoft", window):
        return "event_too_old"
    return None


def linkedin(row: OutRow, now: datetime, user_data: bool, window: int | None = None) -> str | None:
    if not row.li_fat_id and not (user_data and row.email_sha256):
        return _no_identity(row, ("email_sha256",), user_data, "no_linkedin_id")
    if now - row.conversion_time > _window("linkedin", window):
        return "event_too_old"
    return None


def _file(click: str, rule: Rule) -> Rule:
    """A manual-import file's rule: the platform's own, plus a click id of the platform's shape
    (a CRM field must not become a spreadsheet formula or break the import)."""

    def check_file(row: OutRow, now: datetime, user_data: bool, window: int | None = None
                   ) -> str | None:
        value = getattr(row, click)
        if value and not CLICK_ID_FORMATS[click].match(value):
            return "invalid_click_id"
        return rule(row, now, user_data, window)

    return check_file


def google_file(row: OutRow, now: datetime, user_data: bool, window: int | None = None) -> str | None:
    """The click-import file template has a Google Click ID column only (no braids, no hashes)."""
    if row.kind == "conversion" and not row.gclid:
        return "no_click_id"
    return google(row, now, user_data, window)


RULES: dict[str, Rule] = {
    "google_data_manager": google,
    "google_ads": google,
    "meta": meta,
    "microsoft": microsoft,
    "linkedin": linkedin,
    # csv_files: one per file platform
    "file:google": _file("gclid", google_file),
    "file:meta": _file("meta_lead_id", meta),
    "file:microsoft": _file("msclkid", microsoft),
    "file:linkedin": _file("li_fat_id", linkedin),
}


def check(rule_set: str, row: OutRow, now: datetime, *, consent_required: bool,
          send_user_data: bool, window_days: int | None = None) -> str | None:
    """The name of the first rule `row` breaks for this platform, or None when it may be sent."""
    return (
        _common(row, now)
        or consent_hold(row, consent_required)
        or RULES[rule_set](row, now, user_data_allowed(row, send_user_data), window_days)
    )
