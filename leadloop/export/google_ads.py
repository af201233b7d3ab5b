"""Google Ads API v26 offline conversions, for customers still allowlisted for click imports.

`uploadClickConversions` with `partialFailure: true`: per-row errors come back inside a 200 as a
`GoogleAdsFailure` whose `location.fieldPathElements[0].index` names the row. Restatements and
retractions go to `uploadConversionAdjustments`, keyed by the original conversion's order id.
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
    google_ads_time,
    json_value,
)
from leadloop.export.google_auth import GoogleToken

SCOPE = "https://www.googleapis.com/auth/adwords"
API_VERSION = "v26"

# Answers that mean "we already have it": our order ids are unique per conversion, so a clash
# can only be our own earlier upload (e.g. a crash between send and commit).
DUPLICATE = frozenset({
    "CLICK_CONVERSION_ALREADY_EXISTS", "ORDER_ID_ALREADY_IN_USE",
    "RESTATEMENT_ALREADY_EXISTS", "CONVERSION_ALREADY_RETRACTED",
})
# Transient: retry after the given seconds.
RETRY_AFTER = {
    "TOO_RECENT_EVENT": 6 * 3600.0,
    "TOO_RECENT_CONVERSION_ACTION": 6 * 3600.0,
    "CLICK_NOT_FOUND": 6 * 3600.0,  # the click may not be processed yet
    "TOO_RECENT_CONVERSION": 24 * 3600.0,  # adjustments: the conversion is < 24 h old
    "CONVERSION_NOT_FOUND": 24 * 3600.0,  # adjustments: the conversion is not processed yet
    "CONCURRENT_MODIFICATION": 60.0,
    "INTERNAL_ERROR": 300.0,
}
FATAL = frozenset({"CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE", "UNAUTHORIZED_CUSTOMER",
                   "USER_PERMISSION_DENIED", "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS"})


def _code(error: dict[str, Any]) -> str:
    codes = error.get("errorCode") or {}
    return next(iter(codes.values()), "UNKNOWN") if codes else "UNKNOWN"


def _index(error: dict[str, Any]) -> int | None:
    for element in (error.get("location") or {}).get("fieldPathElements") or []:
        if element.get("fieldName") in ("conversions", "conversion_adjustments",
                                        "conversionAdjustments") and "index" in element:
            return int(element["index"])
    return None


def classify(order_id: str, code: str, message: str) -> RowResult:
    return classify_row(order_id, code, message, duplicate=DUPLICATE, retry_after=RETRY_AFTER)


class GoogleAdsDestination(BaseDestination):
    kind: ClassVar[str] = "google_ads"
    default_base_url: ClassVar[str] = "https://googleads.googleapis.com"
    platform_max: ClassVar[int] = 2000
    supports_adjustments: ClassVar[bool] = True
    has_validate_only: ClassVar[bool] = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.token = GoogleToken(self, SCOPE)
        self.customer = (self.cfg.customer_id or self.cfg.operating_account_id or "").replace("-", "")

    @property
    def has_credentials(self) -> bool:
        return self.token.configured

    def _action(self, action: str) -> str:
        return action if action.startswith("customers/") else (
            f"customers/{self.customer}/conversionActions/{action}")

    def _conversion(self, row: OutRow) -> dict[str, Any]:
        c: dict[str, Any] = {}
        click = row.google_click
        if click:
            c[click[0]] = click[1]
        c["conversionAction"] = self._action(row.conversion_action)
        c["conversionDateTime"] = google_ads_time(row.conversion_time)
        if row.value is not None:
            c["conversionValue"] = json_value(row.value)
            c["currencyCode"] = row.currency
        c["orderId"] = row.order_id
        ids = []
        if self.cfg.send_user_data and row.consent_ad_user_data is not False:
            if row.email_google_sha256:
                ids.append({"hashedEmail": row.email_google_sha256})
            if row.phone_e164_sha256:
                ids.append({"hashedPhoneNumber": row.phone_e164_sha256})
        if ids:
            c["userIdentifiers"] = ids
        if row.consent_ad_user_data is not None:
            c["consent"] = {"adUserData": "GRANTED" if row.consent_ad_user_data else "DENIED"}
        return c

    def _adjustment(self, row: OutRow) -> dict[str, Any]:
        a: dict[str, Any] = {
            "conversionAction": self._action(row.conversion_action),
            "adjustmentType": "RETRACTION" if row.kind == "retraction" else "RESTATEMENT",
        }
        if row.kind != "retraction":
            a["restatementValue"] = {"adjustedValue": json_value(row.value),
                                     "currencyCode": row.currency}
        a["orderId"] = row.original_order_id
        a["adjustmentDateTime"] = google_ads_time(max(row.created_at, row.conversion_time))
        return a

    def build_payload(self, rows: Sequence[OutRow]) -> dict[str, Any]:
        if rows and rows[0].kind != "conversion":
            return {"conversionAdjustments": [self._adjustment(r) for r in rows],
                    "partialFailure": True}
        return {"conversions": [self._conversion(r) for r in rows], "partialFailure": True}

    def validate_payload(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {**payload, "validateOnly": True}

    def _headers(self) -> dict[str, str]:
        headers = dict(self.token.header())
        if self.cfg.login_account_id:
            headers["login-customer-id"] = self.cfg.login_account_id.replace("-", "")
        if self.cfg.developer_token_env:  # optional and ignored since 2026-09-09
            headers["developer-token"] = self.secret("developer_token_env") or ""
        return headers

    def send(self, payload: dict[str, Any], rows: Sequence[OutRow]) -> list[RowResult]:
        method = "uploadConversionAdjustments" if "conversionAdjustments" in payload else (
            "uploadClickConversions")
        url = f"{self.base_url}/{self.cfg.api_version or API_VERSION}/customers/{self.customer}:{method}"
        response = self.post(url, payload, self._headers())
        self.raise_for_transport(response)
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code >= 400:
            raise self._request_error(body, response.status_code)
        row_errors: dict[int, RowResult] = {}
        failure = body.get("partialFailureError") or {}
        for detail in failure.get("details") or []:
            for error in detail.get("errors") or []:
                idx = _index(error)
                if idx is not None and 0 <= idx < len(rows) and idx not in row_errors:
                    row_errors[idx] = classify(rows[idx].order_id, _code(error),
                                               error.get("message", ""))
        job = body.get("jobId")
        out = []
        for i, row in enumerate(rows):
            out.append(row_errors.get(i) or RowResult(
                row.order_id, "sent", "OK", None, response={"jobId": job} if job else {}))
        return out

    def _request_error(self, body: dict[str, Any], status: int) -> Exception:
        err = body.get("error") or {}
        for detail in err.get("details") or []:
            for error in detail.get("errors") or []:
                code = _code(error)
                if code in FATAL:
                    return FatalDestinationError(
                        f"destination {self.name}: Google Ads refused the upload ({code})",
                        hint="accounts no longer allowlisted must use kind = "
                        "'google_data_manager'" if "ALLOWLIST" in code else None)
                return BatchRejected(code, error.get("message", ""), row_index=_index(error))
        return BatchRejected(err.get("status") or f"HTTP_{status}", err.get("message", ""))
