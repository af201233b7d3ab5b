"""Microsoft Advertising offline conversions (Campaign Management v13 REST).

`OfflineConversions/Apply` for conversions and `OfflineConversionAdjustments/Apply` for
restatements and retractions; times in UTC; ≤ 1,000 per request. Per-row problems come back in a
200 as `PartialErrors[]` with the row's `Index`; a whole-request fault is an `ApiFaultDetail`.
A goal created less than two hours ago is not ready: that answer is retried after two hours.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from leadloop.errors import FatalDestinationError
from leadloop.export.base import (
    BaseDestination,
    BatchRejected,
    OutRow,
    RowResult,
    classify_row,
    json_value,
    rfc3339,
)

DUPLICATE = frozenset({"OfflineConversionAlreadyExists", "DuplicateOfflineConversion"})
RETRY_AFTER = {
    "OfflineConversionGoalNotReady": 2 * 3600.0,  # the 2-hour wait after a goal is created
    "InternalError": 300.0,
}
FATAL = frozenset({"AuthenticationTokenExpired", "InvalidCredentials", "UserIsNotAuthorized",
                   "CustomerIdHasToBeSpecified", "InvalidAccount"})


def classify(order_id: str, code: str, message: str) -> RowResult:
    return classify_row(order_id, code, message, duplicate=DUPLICATE, retry_after=RETRY_AFTER)


class MicrosoftDestination(BaseDestination):
    kind: ClassVar[str] = "microsoft"
    default_base_url: ClassVar[str] = "https://campaign.api.bingads.microsoft.com"
    platform_max: ClassVar[int] = 1000
    supports_adjustments: ClassVar[bool] = True

    def _identity(self, row: OutRow, item: dict[str, Any]) -> None:
        if self.cfg.send_user_data and row.consent_ad_user_data is not False:
            if row.email_sha256:
                item["HashedEmailAddress"] = row.email_sha256
            if row.phone_e164_sha256:
                item["HashedPhoneNumber"] = row.phone_e164_sha256

    def conversion(self, row: OutRow) -> dict[str, Any]:
        item: dict[str, Any] = {
            "MicrosoftClickId": row.msclkid,
            "ConversionName": row.conversion_action,
            "ConversionTime": rfc3339(row.conversion_time),
        }
        if row.value is not None:
            item["ConversionValue"] = json_value(row.value)
            item["ConversionCurrencyCode"] = row.currency
        self._identity(row, item)
        return item

    def adjustment(self, row: OutRow) -> dict[str, Any]:
        item: dict[str, Any] = {
            "MicrosoftClickId": row.msclkid,
            "ConversionName": row.conversion_action,
            "ConversionTime": rfc3339(row.conversion_time),
            "AdjustmentTime": rfc3339(max(row.created_at, row.conversion_time)),
            "AdjustmentType": "Retract" if row.kind == "retraction" else "Restate",
        }
        if row.kind != "retraction":
            item["AdjustmentValue"] = json_value(row.value)
            item["AdjustmentCurrencyCode"] = row.currency
        return item

    def build_payload(self, rows: Sequence[OutRow]) -> dict[str, Any]:
        if rows and rows[0].kind != "conversion":
            return {"OfflineConversionAdjustments": [self.adjustment(r) for r in rows]}
        return {"OfflineConversions": [self.conversion(r) for r in rows]}

    def _headers(self) -> dict[str, str]:
        headers = {}
        token = self.secret("token_env")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        dev = self.secret("developer_token_env")
        if dev:
            headers["DeveloperToken"] = dev
        if self.cfg.customer_id:
            headers["CustomerId"] = self.cfg.customer_id
        if self.cfg.account_id:
            headers["CustomerAccountId"] = self.cfg.account_id
        return headers

    def send(self, payload: dict[str, Any], rows: Sequence[OutRow]) -> list[RowResult]:
        path = ("OfflineConversionAdjustments/Apply" if "OfflineConversionAdjustments" in payload
                else "OfflineConversions/Apply")
        response = self.post(f"{self.base_url}/CampaignManagement/v13/{path}", payload,
                             self._headers())
        self.raise_for_transport(response)
        try:
            body = response.json() or {}
        except ValueError:
            body = {}
        if response.status_code >= 400:
            raise self._fault(body, response.status_code)
        errors: dict[int, RowResult] = {}
        for e in body.get("PartialErrors") or []:
            idx = e.get("Index")
            if isinstance(idx, int) and 0 <= idx < len(rows) and idx not in errors:
                errors[idx] = classify(rows[idx].order_id, str(e.get("ErrorCode") or e.get("Code")),
                                       e.get("Message") or "")
        return [errors.get(i) or RowResult(r.order_id, "sent", "OK") for i, r in enumerate(rows)]

    def _fault(self, body: dict[str, Any], status: int) -> Exception:
        for e in body.get("OperationErrors") or []:
            code = str(e.get("ErrorCode") or e.get("Code"))
            if code in FATAL:
                return FatalDestinationError(f"destination {self.name}: Microsoft Advertising "
                                             f"refused the request ({code}: {e.get('Message')})")
            return BatchRejected(code, e.get("Message") or "")
        for e in body.get("BatchErrors") or []:
            return BatchRejected(str(e.get("ErrorCode") or e.get("Code")), e.get("Message") or "",
                                 row_index=e.get("Index"))
        return BatchRejected(f"HTTP_{status}", str(body)[:300])
