"""Google Ads API v26 offline conversions, for customers still allowlisted for click imports.

`uploadClickConversions` with `partialFailure: true`: per-row errors come back inside a 200 as a
`GoogleAdsFailure` whose `location.fieldPathElements[0].index` names the row. Restatements and
retractions go to `uploadConversionAdjustments`, keyed by the original conversion's order id.

Codes that are about the account or its setup (`SETUP`: terms not accepted, unknown or wrong
conversion action, not allowlisted, no permission) pause the destination whether they come per
row or for the whole request; the rows stay due. `CLICK_NOT_FOUND` is final (Google cannot tie
the click to this account), not retried. Every name is checked against the `google-ads` SDK's
enums by `tests/test_export_contracts.py`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from leadloop.envnames import CheckedEnvName
from leadloop.export.base import (
    BaseDestination,
    BatchRejected,
    DestinationSettings,
    OutRow,
    RowResult,
    classify_row,
    google_ads_time,
    json_value,
)
from leadloop.export.consent import user_data_allowed
from leadloop.export.google_auth import GoogleToken
from leadloop.export.google_data_manager import (
    CLICK_IDS,
    GCLID,
    GoogleSettings,
    google_click,
    google_rule,
)

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
    "TOO_RECENT_EVENT": 6 * 3600.0,  # the click is < 6 h old
    "TOO_RECENT_CONVERSION": 24 * 3600.0,  # adjustments: the conversion is < 24 h old
    "CONVERSION_NOT_FOUND": 24 * 3600.0,  # adjustments: the conversion is not processed yet
    "CONCURRENT_MODIFICATION": 60.0,
    "INTERNAL_ERROR": 300.0,
}
_ACCOUNT = "customer_id/login_account_id of [destinations.{name}]"
_ACTIONS = "map destination {name} in [[stages]] to "
# Account and setup errors: pause the destination with this fix (rows stay due).
SETUP: dict[str, str] = {
    "CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE": "this account may no longer upload through the Ads "
                                                 "API: use kind = 'google_data_manager' for {name}",
    "UNAUTHORIZED_CUSTOMER": f"check {_ACCOUNT}: the OAuth user cannot upload for that customer",
    "USER_PERMISSION_DENIED": f"give the OAuth user access to {_ACCOUNT}",
    "CUSTOMER_NOT_ENABLED": f"the Google Ads account in {_ACCOUNT} is not enabled",
    "INVALID_LOGIN_CUSTOMER_ID_SERVING_CUSTOMER_ID_COMBINATION":
        "set login_account_id of [destinations.{name}] to a manager of customer_id, or remove it",
    "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS": "accept Google's customer data terms in the Google "
                                                 "Ads account",
    "CUSTOMER_NOT_ENABLED_ENHANCED_CONVERSIONS_FOR_LEADS":
        "turn on enhanced conversions for leads in Google Ads (Goals > Settings), or set "
        "send_user_data = false in [destinations.{name}]",
    "CUSTOMER_DATA_POLICY_PROHIBITS_ENHANCED_CONVERSIONS":
        "the account's data policy forbids enhanced conversions: set send_user_data = false in "
        "[destinations.{name}]",
    "NO_CONVERSION_ACTION_FOUND": _ACTIONS + "existing conversion action ids of customer_id",
    "INVALID_CONVERSION_ACTION_TYPE": _ACTIONS + "conversion actions of type 'Import from clicks'",
    "TOO_RECENT_CONVERSION_ACTION": "wait about 6 hours: Google accepts uploads to a new conversion "
                                    "action only some time after it was created",
}


class GoogleAdsSettings(GoogleSettings):
    kind: Literal["google_ads"] = "google_ads"
    developer_token_env: CheckedEnvName | None = None  # optional and ignored since 2026-09-09


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
    return classify_row(order_id, code, message, duplicate=DUPLICATE, retry_after=RETRY_AFTER,
                        setup=SETUP)


class GoogleAdsDestination(BaseDestination):
    kind: ClassVar[str] = "google_ads"
    config_model: ClassVar[type[DestinationSettings]] = GoogleAdsSettings
    default_base_url: ClassVar[str] = "https://googleads.googleapis.com"
    platform_max: ClassVar[int] = 2000
    adjustments: ClassVar[frozenset[str]] = frozenset({"restatement", "retraction"})
    has_validate_only: ClassVar[bool] = True
    click_ids: ClassVar[tuple[str, ...]] = CLICK_IDS
    click_format: ClassVar[re.Pattern[str] | None] = GCLID
    window_days: ClassVar[int] = 90
    rule = staticmethod(google_rule)

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
        click = google_click(row)
        if click:
            c[click[0]] = click[1]
        c["conversionAction"] = self._action(row.conversion_action)
        c["conversionDateTime"] = google_ads_time(row.conversion_time)
        if row.value is not None:
            c["conversionValue"] = json_value(row.value)
            c["currencyCode"] = row.currency
        c["orderId"] = row.order_id
        ids = []
        if user_data_allowed(row, self.cfg.send_user_data):
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
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        if response.status_code in (400, 401, 403, 404):
            raise self._request_error(body, response.status_code)
        self.raise_for_transport(response)
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
        """A failed request as: the row an error's field path names (reject it), an account or
        setup code (pause), any other named code (pause: not about one row), or nothing named
        (bisect)."""
        err = body.get("error") or {}
        errors = [e for d in err.get("details") or [] for e in d.get("errors") or []]
        for error in errors:
            code = _code(error)
            if code in SETUP:
                return self.paused(code, SETUP[code], error.get("message", ""))
        for error in errors:
            if _index(error) is not None:
                return BatchRejected(_code(error), error.get("message", ""), row_index=_index(error))
        if errors:
            return self.paused(_code(errors[0]), "the request, not one conversion, was refused: "
                               "check [destinations.{name}]", errors[0].get("message", ""))
        if status in (401, 403, 404):
            return self.paused(err.get("status") or f"HTTP_{status}",
                               f"check the OAuth credentials and {_ACCOUNT}", err.get("message", ""))
        return BatchRejected(err.get("status") or f"HTTP_{status}", err.get("message", ""))
