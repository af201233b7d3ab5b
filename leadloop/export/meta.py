"""Meta Conversions API for CRM (Conversion Leads): one event per CRM stage a Lead Ads lead reached.

`lead_id` is the 15-16 digit Lead Ads id, sent unhashed as an integer; `action_source` is
`system_generated`, `custom_data.event_source` is `crm`. Hashes follow Meta's rules (e-mail
trimmed and lower-cased, phone digits only). The access token travels as a query parameter and
is never logged or written with the payload. A request with one invalid event fails as a whole;
the export engine then splits the batch to find it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from leadloop.errors import FatalDestinationError
from leadloop.export.base import (
    BaseDestination,
    BatchRejected,
    OutRow,
    RetryLater,
    RowResult,
    json_value,
    unix_seconds,
)
from leadloop.http import describe_response, retry_after_seconds

API_VERSION = "v26.0"
_TRANSIENT_CODES = frozenset({1, 2, 4, 17, 32, 341, 613, 80004})
_AUTH_CODES = frozenset({10, 102, 190, 200})


class MetaDestination(BaseDestination):
    kind: ClassVar[str] = "meta"
    default_base_url: ClassVar[str] = "https://graph.facebook.com"
    platform_max: ClassVar[int] = 1000

    def event(self, row: OutRow) -> dict[str, Any]:
        user: dict[str, Any] = {}
        if self.cfg.send_user_data and row.consent_ad_user_data is not False:
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
            raise FatalDestinationError(f"config key destinations.{self.name}.dataset_id: "
                                        "is required (the Meta dataset / pixel id)")
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
            if code in _AUTH_CODES:
                raise FatalDestinationError(
                    f"destination {self.name}: Meta refused the token ({label}: {message})",
                    hint=f"check the access token named by destinations.{self.name}.token_env")
            raise BatchRejected(label, message)
        self.raise_for_transport(response)
        if response.status_code >= 400:
            raise BatchRejected(f"HTTP_{response.status_code}", describe_response(response))
        trace = body.get("fbtrace_id")
        return [RowResult(r.order_id, "sent", "OK", None,
                          response={"events_received": body.get("events_received"),
                                    "fbtrace_id": trace}, request_id=trace) for r in rows]
