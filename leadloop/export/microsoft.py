"""Microsoft Advertising offline conversions (Campaign Management v13 REST).

`OfflineConversions/Apply` for conversions and `OfflineConversionAdjustments/Apply` for
restatements and retractions; times in UTC; ≤ 1,000 per request. Per-row problems come back in a
200 as `PartialErrors[]` with the row's `Index`; a whole-request fault is an `ApiFaultDetail`
(`OperationErrors`, `BatchErrors`) or an `AdApiFaultDetail` (`Errors`, e.g. bad credentials).

Every error name matched here is one of Microsoft's published operation error codes
(https://learn.microsoft.com/advertising/guides/operation-error-codes; numbers in comments), and
`tests/test_export_microsoft.py` checks them against that list. A goal created less than two hours
ago refuses conversions (`OfflineConversionNotAcceptedForGoal`, 5615; the offline conversion daily
summary names the same condition `OfflineConversionGoalTooRecent`): the row is retried after the
wait, not rejected.
Microsoft ignores a duplicate (same click id, goal and time) silently, so no code means "exists".

Access tokens come from the Microsoft identity platform (refresh-token grant, about an hour
each) when `refresh_token_env` is set, else from `token_env`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, ClassVar, Literal

from leadloop.envnames import CheckedEnvName
from leadloop.export.base import (
    BaseDestination,
    BatchRejected,
    DestinationSettings,
    OutRow,
    RetryLater,
    RowResult,
    classify_row,
    json_value,
    rfc3339,
)
from leadloop.export.consent import user_data_allowed

TOKEN_URL = "https://login.microsoftonline.com/common/oauth2/v2.0/token"
SCOPE = "https://ads.microsoft.com/msads.manage offline_access"
RETRY_AFTER = {
    "OfflineConversionNotAcceptedForGoal": 2 * 3600.0,  # 5615: the 2-hour wait after a goal is created
    "OfflineConversionGoalTooRecent": 2 * 3600.0,  # the same, as the daily summary status names it
    "InternalError": 300.0,  # 0
    "CallRateExceeded": 60.0,  # 117
    "OfflineConversionsApplyFailed": 300.0,  # 5612: could not reach Microsoft's internal server
}
_CREDENTIALS = "check the OAuth credentials and developer token of [destinations.{name}]"
_ACCOUNT = "check customer_id and account_id of [destinations.{name}]"
# Account and setup errors: the destination pauses (rows stay due) with this fix.
SETUP: dict[str, str] = {
    "InvalidCredentials": _CREDENTIALS,  # 105
    "UserIsNotAuthorized": "give the Microsoft Advertising user of the OAuth credentials access to "
                           "account_id of [destinations.{name}]",  # 106
    "AuthenticationTokenExpired": _CREDENTIALS + " (the access token expired; set refresh_token_env "
                                  "and client_id_env to refresh it)",  # 109
    "InvalidAccount": _ACCOUNT,  # 208
    "CampaignServiceInvalidAccountStatus": "the Microsoft Advertising account of [destinations.{name}] "
                                           "is not active",  # 1008
    "CampaignServiceAccountIdMissingInRequestHeader": "set account_id in [destinations.{name}]",  # 1009
    "CampaignServiceCustomerIdHasToBeSpecified": "set customer_id in [destinations.{name}]",  # 1029
    "CampaignServiceAccountIdHasToBeSpecified": "set account_id in [destinations.{name}]",  # 1030
    "CampaignServiceInvalidAccountId": _ACCOUNT,  # 1102
    "CampaignServiceInvalidCustomerId": _ACCOUNT,  # 1490
    "OfflineConversionNameInvalid": "map destination {name} in [[stages]] to the names of existing "
                                    "offline conversion goals",  # 5606
    "OfflineConversionPilotNotEnabledForCustomer": "ask Microsoft to enable offline conversions for "
                                                   "the customer of [destinations.{name}]",  # 5613
    "OfflineConversionRestateRetractNotSupported": "the goals of destination {name} do not accept "
                                                   "restatements or retractions",  # 5627
}


def classify(order_id: str, code: str, message: str) -> RowResult:
    return classify_row(order_id, code, message, duplicate=frozenset(), retry_after=RETRY_AFTER,
                        setup=SETUP)


class MicrosoftSettings(DestinationSettings):
    kind: Literal["microsoft"] = "microsoft"
    customer_id: str | None = None
    account_id: str | None = None
    developer_token_env: CheckedEnvName | None = None


MSCLKID = re.compile(r"^[A-Za-z0-9_\-]{6,128}$")  # a URL-safe token


def microsoft_rule(row: OutRow, now: datetime, user_data: bool, window: timedelta) -> str | None:
    """An offline conversion needs its msclkid; at most 90 days old."""
    if not row.msclkid:
        return "no_click_id"
    if now - row.conversion_time > window:
        return "event_too_old"
    return None


class MicrosoftDestination(BaseDestination):
    kind: ClassVar[str] = "microsoft"
    config_model: ClassVar[type[DestinationSettings]] = MicrosoftSettings
    default_base_url: ClassVar[str] = "https://campaign.api.bingads.microsoft.com"
    platform_max: ClassVar[int] = 1000
    adjustments: ClassVar[frozenset[str]] = frozenset({"restatement", "retraction"})
    click_ids: ClassVar[tuple[str, ...]] = ("msclkid",)
    click_format: ClassVar[re.Pattern[str] | None] = MSCLKID
    window_days: ClassVar[int] = 90
    rule = staticmethod(microsoft_rule)

    def _identity(self, row: OutRow, item: dict[str, Any]) -> None:
        if user_data_allowed(row, self.cfg.send_user_data):
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
        headers = self.bearer(TOKEN_URL, SCOPE)
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
        try:
            body = response.json() or {}
        except ValueError:
            body = {}
        if response.status_code in (400, 401, 403, 404) and isinstance(body, dict):
            raise self._fault(body, response.status_code)
        self.raise_for_transport(response)
        if response.status_code >= 400:
            raise BatchRejected(f"HTTP_{response.status_code}", "request rejected")
        errors: dict[int, RowResult] = {}
        for e in body.get("PartialErrors") or []:
            idx = e.get("Index")
            if isinstance(idx, int) and 0 <= idx < len(rows) and idx not in errors:
                errors[idx] = classify(rows[idx].order_id, str(e.get("ErrorCode") or e.get("Code")),
                                       e.get("Message") or "")
        return [errors.get(i) or RowResult(r.order_id, "sent", "OK") for i, r in enumerate(rows)]

    def _fault(self, body: dict[str, Any], status: int) -> Exception:
        """A whole-request fault as: the row a `BatchError` names (reject it), an account or
        setup code (pause), any other request-level code (pause: it is not about one row), or
        nothing named (bisect)."""
        for e in body.get("BatchErrors") or []:
            code = str(e.get("ErrorCode") or e.get("Code"))
            if isinstance(e.get("Index"), int) and code not in SETUP:
                return BatchRejected(code, e.get("Message") or "", row_index=e["Index"])
        for e in [*(body.get("Errors") or []), *(body.get("OperationErrors") or []),
                  *(body.get("BatchErrors") or [])]:
            code = str(e.get("ErrorCode") or e.get("Code"))
            if code in RETRY_AFTER:
                return RetryLater(f"destination {self.name}: {code}", RETRY_AFTER[code])
            fix = SETUP.get(code, "the request, not one conversion, was refused: check "
                                  "[destinations.{name}] and its goals in [[stages]]")
            return self.paused(code, fix, e.get("Message") or "")
        if status in (401, 403, 404):
            return self.paused(f"HTTP_{status}", _CREDENTIALS)
        return BatchRejected(f"HTTP_{status}", "request rejected with no error named")
