"""Meta Conversions API for CRM (Conversion Leads): one event per CRM stage a Lead Ads lead reached.

`lead_id` is the 15-16 digit Lead Ads id, sent unhashed as an integer; `action_source` is
`system_generated`, `custom_data.event_source` is `crm`. Hashes follow Meta's rules (e-mail
trimmed and lower-cased, phone digits only). The access token travels as a query parameter and
is never logged or written with the payload. A request with one invalid event fails as a whole:
when the error names it (`data[3]`) that row is rejected, otherwise the export engine splits the
batch to find it. Token, permission and dataset errors (Graph API codes 190, 102, 10, 200-299,
and 100/33 "object does not exist or no permission") are about the setup: the destination pauses.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, ClassVar, Literal

from leadloop.export.base import (
    BaseDestination,
    BatchRejected,
    DestinationSettings,
    OutRow,
    RetryLater,
    RowResult,
    json_value,
    unix_seconds,
)
from leadloop.export.consent import user_data_allowed
from leadloop.http import describe_response, retry_after_seconds

API_VERSION = "v26.0"
_TRANSIENT_CODES = frozenset({1, 2, 4, 17, 32, 341, 613, 80004})
_TOKEN = "renew the access token named by token_env of [destinations.{name}] (a system-user token)"
_DATASET = ("check dataset_id of [destinations.{name}] and that the token's system user has access "
            "to that dataset")
_EVENT_INDEX = re.compile(r"\bdata\[(\d+)\]")
LEAD_ID = re.compile(r"^\d{15,17}$")  # a Lead Ads lead id


def _setup_fix(code: int, subcode: int | None) -> str | None:
    """The fix for a Graph API error about the token, permissions or dataset; None otherwise."""
    if code in (102, 190):
        return _TOKEN
    if code == 10 or 200 <= code <= 299:
        return _DATASET
    if code == 100 and subcode == 33:
        return _DATASET
    return None


class MetaSettings(DestinationSettings):
    kind: Literal["meta"] = "meta"
    dataset_id: str | None = None
    lead_event_source: str = "leadloop"


def meta_rule(row: OutRow, now: datetime, user_data: bool, window: timedelta) -> str | None:
    """A CRM conversion lead needs its Lead Ads lead id; events at most 7 days old."""
    if not row.meta_lead_id or not LEAD_ID.match(row.meta_lead_id):
        return "no_meta_lead_id"
    if now - row.conversion_time > window:
        return "event_too_old"
    return None


class MetaDestination(BaseDestination):
    kind: ClassVar[str] = "meta"
    config_model: ClassVar[type[DestinationSettings]] = MetaSettings
    default_base_url: ClassVar[str] = "https://graph.facebook.com"
    platform_max: ClassVar[int] = 1000
    click_ids: ClassVar[tuple[str, ...]] = ("meta_lead_id",)
    click_format: ClassVar[re.Pattern[str] | None] = LEAD_ID
    window_days: ClassVar[int] = 7
    rule = staticmethod(meta_rule)

    def event(self, row: OutRow) -> dict[str, Any]:
        user: dict[str, Any] = {}
        if user_data_allowed(row, self.cfg.send_user_data):
            if row.email_sha256:
                user["em"] = [row.email_sha256]
            if row.phone_digits_sha256:
                user["ph"] = [row.phone_digits_sha256]
        user["lead_id"] = int(row.meta_lead_id or 0)
        custom: dict[str, Any] = {}
        if row.value is not None:
            custom["value"] = json_value(row.value)
            custom["currency"] = (row.currency or "").lower()
        custom["event_source"] = "crm"
        custom["lead_event_source"] = self.cfg.lead_event_source
        return {
            "event_name": row.conversion_action,
            "event_time": unix_seconds(row.conversion_time),
            "user_data": user,
            "custom_data": custom,
            "event_id": row.order_id,
            "action_source": "system_generated",
        }

    def build_payload(self, rows: Sequence[OutRow]) -> dict[str, Any]:
        return {"data": [self.event(r) for r in rows]}

    def send(self, payload: dict[str, Any], rows: Sequence[OutRow]) -> list[RowResult]:
        if not self.cfg.dataset_id:
            raise self.paused("NO_DATASET_ID", "set dataset_id of [destinations.{name}] "
                              "(the Meta dataset / pixel id)")
        token = self.secret("token_env")
        url = f"{self.base_url}/{self.cfg.api_version or API_VERSION}/{self.cfg.dataset_id}/events"
        response = self.post(url, payload, {}, params={"access_token": token} if token else None)
        try:
            body = response.json()
        except ValueError:
            body = {}
        err = body.get("error") if isinstance(body, dict) else None
        if response.status_code >= 400 and isinstance(err, dict):
            code = int(err.get("code") or 0)
            label = f"{code}/{err.get('error_subcode')}" if err.get("error_subcode") else str(code)
            message = err.get("error_user_msg") or err.get("message") or ""
            if err.get("is_transient") or code in _TRANSIENT_CODES or response.status_code >= 500:
                raise RetryLater(f"destination {self.name}: Meta error {label}: {message}",
                                 retry_after_seconds(response))
            fix = _setup_fix(code, err.get("error_subcode"))
            if fix:
                raise self.paused(label, fix, message)
            named = _EVENT_INDEX.search(message)
            raise BatchRejected(label, message, row_index=int(named.group(1)) if named else None)
        self.raise_for_transport(response)
        if response.status_code >= 400:
            raise BatchRejected(f"HTTP_{response.status_code}", describe_response(response))
        trace = body.get("fbtrace_id")
        return [RowResult(r.order_id, "sent", "OK", None,
                          response={"events_received": body.get("events_received"),
                                    "fbtrace_id": trace}, request_id=trace) for r in rows]
