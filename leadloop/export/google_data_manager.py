"""Google Data Manager API (`events:ingest`): the Google path for new integrations.

Offline click conversions and enhanced conversions for leads in one event shape. No partial
failure: an invalid field rejects the whole request (fast-fail). When the error names an event
(`events[3]....` in `BadRequest.fieldViolations`) that row is rejected and the rest re-sent; when
its `ErrorInfo.reason` is about the account or its setup (`SETUP`, names from the SDK's
`ErrorReason`) the destination pauses with its rows still due; only a 400 that names no reason is
bisected. Per-event processing results arrive later, as counts per reason, from
`requestStatus:retrieve` (see `diagnose`).

A value change is a restatement: the same `transactionId` re-sent with the new value, which Data
Manager treats as an adjustment of the conversion it already has. Data Manager documents no
retraction, so a lost deal or deleted lead cannot be withdrawn here (the report says so).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, ClassVar, Literal

from pydantic import Field

from leadloop.envnames import CheckedEnvName
from leadloop.export.base import (
    BaseDestination,
    BatchRejected,
    DestinationSettings,
    OutRow,
    RowResult,
    Settlement,
    json_value,
    rfc3339,
)
from leadloop.export.consent import user_data_allowed
from leadloop.export.google_auth import GoogleToken
from leadloop.export.rules import DAY, has_identity, no_identity
from leadloop.http import RateLimiter

SCOPE = "https://www.googleapis.com/auth/datamanager"
MAX_DESTINATIONS = 10
_EVENT_INDEX = re.compile(r"^events\[(\d+)\]")
_GENERIC = frozenset({"INVALID_ARGUMENT", "FAILED_PRECONDITION", "ERROR_REASON_UNSPECIFIED"})
_ACCOUNT = "operating_account_id/login_account_id of [destinations.{name}]"
# ErrorReason values (google-ads-datamanager) that are about the account or its setup, not a row:
# the fix, in one sentence. `tests/test_export_contracts.py` checks each name against the SDK.
SETUP: dict[str, str] = {
    "PERMISSION_DENIED": "give the Google account of the OAuth credentials access to the Google Ads "
                         f"account in {_ACCOUNT}",
    "NOT_FOUND": f"check {_ACCOUNT}: Google does not find that account",
    "INVALID_DESTINATION": f"check {_ACCOUNT} and linked_account_id",
    "OPERATING_ACCOUNT_LOGIN_ACCOUNT_MISMATCH": "set login_account_id of [destinations.{name}] to a "
                                                "manager account of operating_account_id, or remove it",
    "TERMS_AND_CONDITIONS_NOT_SIGNED": "accept Google's customer data terms in the Google Ads account "
                                       "(Tools > Data manager)",
    "INVALID_CONVERSION_ACTION_ID": "map destination {name} in [[stages]] to existing conversion action "
                                    "ids of the operating account",
    "INVALID_CONVERSION_ACTION_TYPE": "map destination {name} in [[stages]] to conversion actions of type "
                                      "'Import from clicks' or 'CRM'",
    "CONVERSION_ACTION_TOO_RECENTLY_CREATED": "wait a few hours: Google accepts uploads to a new "
                                              "conversion action only some time after it was created",
    "DESTINATION_ACCOUNT_NOT_ENABLED_ENHANCED_CONVERSIONS_FOR_LEADS":
        "turn on enhanced conversions for leads in Google Ads (Goals > Settings), or set "
        "send_user_data = false in [destinations.{name}]",
    "DESTINATION_ACCOUNT_ENHANCED_CONVERSIONS_TERMS_NOT_SIGNED":
        "accept the enhanced conversions terms in Google Ads (Goals > Settings > Enhanced conversions)",
    "DESTINATION_ACCOUNT_DATA_POLICY_PROHIBITS_ENHANCED_CONVERSIONS":
        "the account's data policy forbids enhanced conversions: set send_user_data = false in "
        "[destinations.{name}]",
    "NOT_ALLOWLISTED": "ask Google to allowlist the Cloud project of the OAuth client for this feature",
}


CLICK_IDS = ("gclid", "gbraid", "wbraid")  # Google takes exactly one: gclid first, then the iOS braids
GCLID = re.compile(r"^[A-Za-z0-9_\-]{6,512}$")  # a URL-safe token
_HASHED = ("email_google_sha256", "phone_e164_sha256")


class GoogleSettings(DestinationSettings):
    """Keys of both Google destinations."""

    validate_only: bool = False
    service_account_file_env: CheckedEnvName | None = None
    operating_account_id: str | None = None
    customer_id: str | None = None
    login_account_id: str | None = None


class DataManagerSettings(GoogleSettings):
    kind: Literal["google_data_manager"] = "google_data_manager"
    linked_account_id: str | None = None
    requests_per_minute: float | None = Field(None, gt=0)


def google_click(row: OutRow) -> tuple[str, str] | None:
    """The click id Google gets for `row`: (its name, its value), or None."""
    for kind in CLICK_IDS:
        value = getattr(row, kind)
        if value:
            return kind, value
    return None


def google_rule(row: OutRow, now: datetime, user_data: bool, window: timedelta) -> str | None:
    """Google's rules, for Data Manager and the Ads API alike. Google imports a conversion, with
    a click id or as an enhanced conversion for leads matched on hashes, only while the lead's
    click is inside the action's click-through window (at most 90 days; the maximum is
    unverified, the platform answers `EVENT_TOO_OLD` past the real window anyway) at upload
    time; the lead's creation stands in for the click. Adjustments go between 24 hours and 54
    days after the conversion."""
    if row.kind == "conversion":
        if google_click(row) is None and not (user_data and has_identity(row, _HASHED)):
            return no_identity(row, _HASHED, user_data, "no_click_id")
        if now - row.conversion_time > window:
            return "event_too_old"
        if now - row.lead_created_at > window:
            return "click_too_old"
        return None
    age = now - row.conversion_time
    if age < DAY:
        return "adjustment_too_recent"
    if age > 54 * DAY:
        return "adjustment_window_passed"
    return None


def consent_value(flag: bool | None) -> str | None:
    return None if flag is None else ("CONSENT_GRANTED" if flag else "CONSENT_DENIED")


class DataManagerDestination(BaseDestination):
    kind: ClassVar[str] = "google_data_manager"
    config_model: ClassVar[type[DestinationSettings]] = DataManagerSettings
    default_base_url: ClassVar[str] = "https://datamanager.googleapis.com"
    platform_max: ClassVar[int] = 2000
    has_validate_only: ClassVar[bool] = True
    adjustments: ClassVar[frozenset[str]] = frozenset({"restatement"})
    click_ids: ClassVar[tuple[str, ...]] = CLICK_IDS
    click_format: ClassVar[re.Pattern[str] | None] = GCLID
    window_days: ClassVar[int] = 90
    has_diagnostics: ClassVar[bool] = True
    rule = staticmethod(google_rule)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.token = GoogleToken(self, SCOPE)
        self.limiter = RateLimiter(self.cfg.requests_per_minute or 300, 60.0)

    @property
    def has_credentials(self) -> bool:
        return self.token.configured

    def batches(self, rows: Sequence[OutRow]) -> Iterator[list[OutRow]]:
        """≤ 2,000 events and ≤ 10 destinations (conversion actions) per request."""
        batch: list[OutRow] = []
        actions: set[str] = set()
        for row in sorted(rows, key=lambda r: r.conversion_action):
            new_action = row.conversion_action not in actions
            if len(batch) >= self.max_batch_size or (new_action and len(actions) >= MAX_DESTINATIONS):
                yield batch
                batch, actions = [], set()
            batch.append(row)
            actions.add(row.conversion_action)
        if batch:
            yield batch

    def _destination(self, action: str, reference: bool) -> dict[str, Any]:
        cfg = self.cfg
        account = (cfg.operating_account_id or cfg.customer_id or "").replace("-", "")
        dest: dict[str, Any] = {}
        if reference:
            dest["reference"] = action
        dest["operatingAccount"] = {"accountType": "GOOGLE_ADS", "accountId": account}
        if cfg.login_account_id:
            dest["loginAccount"] = {"accountType": "GOOGLE_ADS",
                                    "accountId": cfg.login_account_id.replace("-", "")}
        if cfg.linked_account_id:
            dest["linkedAccount"] = {"accountType": "GOOGLE_ADS",
                                     "accountId": cfg.linked_account_id.replace("-", "")}
        dest["productDestinationId"] = action
        return dest

    def _event(self, row: OutRow, reference: bool) -> dict[str, Any]:
        ev: dict[str, Any] = {}
        if reference:
            ev["destinationReferences"] = [row.conversion_action]
        # A restatement re-sends the conversion under its original transaction id, new value.
        ev["transactionId"] = row.original_order_id
        ev["eventTimestamp"] = rfc3339(row.conversion_time)
        if row.kind == "restatement":
            ev["lastUpdatedTimestamp"] = rfc3339(max(row.created_at, row.conversion_time))
        ids = []
        if user_data_allowed(row, self.cfg.send_user_data):
            if row.email_google_sha256:
                ids.append({"emailAddress": row.email_google_sha256})
            if row.phone_e164_sha256:
                ids.append({"phoneNumber": row.phone_e164_sha256})
        if ids:
            ev["userData"] = {"userIdentifiers": ids}
        consent = {k: v for k, v in (
            ("adUserData", consent_value(row.consent_ad_user_data)),
            ("adPersonalization", consent_value(row.consent_ad_personalization))) if v}
        if consent:
            ev["consent"] = consent
        click = google_click(row)
        if click:
            ev["adIdentifiers"] = {click[0]: click[1]}
        if row.currency and row.value is not None:
            ev["currency"] = row.currency
        if row.value is not None:
            ev["conversionValue"] = json_value(row.value)
        return ev

    def build_payload(self, rows: Sequence[OutRow]) -> dict[str, Any]:
        actions = list(dict.fromkeys(r.conversion_action for r in rows))
        reference = len(actions) > 1
        events = [self._event(r, reference) for r in rows]
        body: dict[str, Any] = {
            "destinations": [self._destination(a, reference) for a in actions],
            "events": events,
        }
        if any("userData" in e for e in events):
            body["encoding"] = "HEX"
        return body

    def validate_payload(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {**payload, "validateOnly": True}

    def send(self, payload: dict[str, Any], rows: Sequence[OutRow]) -> list[RowResult]:
        self.limiter.acquire()
        response = self.post(f"{self.base_url}/v1/events:ingest", payload, self.token.header())
        body = _json(response)
        if response.status_code in (400, 401, 403, 404):
            raise self._request_error(body, response.status_code)
        self.raise_for_transport(response)
        request_id = body.get("requestId")
        code = "VALIDATED" if payload.get("validateOnly") else "PROCESSING"
        warnings = body.get("fieldWarnings") or []
        return [RowResult(r.order_id, "sent", code, None, response={"requestId": request_id,
                          **({"fieldWarnings": warnings} if warnings else {})},
                          request_id=request_id) for r in rows]

    def _request_error(self, body: dict[str, Any], status: int) -> Exception:
        """A google.rpc error as: the event it names (reject that row), a setup or account
        reason (pause), any other named reason (pause: it is about the request, not a row), or
        no reason at all (bisect)."""
        err = body.get("error") or {}
        status_name = err.get("status") or f"HTTP_{status}"
        message = err.get("message") or "request rejected"
        reasons = [d["reason"] for d in err.get("details") or []
                   if d.get("@type", "").endswith("google.rpc.ErrorInfo") and d.get("reason")]
        violations = [fv for d in err.get("details") or [] for fv in d.get("fieldViolations") or []]
        for fv in violations:
            m = _EVENT_INDEX.match(fv.get("field", ""))
            if m:
                return BatchRejected(fv.get("reason") or (reasons or [status_name])[0],
                                     f"{fv.get('field')}: {fv.get('description', message)}",
                                     row_index=int(m.group(1)))
        named = [r for r in [*reasons, *(fv.get("reason") for fv in violations)]
                 if r and r not in _GENERIC]
        setup = next((r for r in named if r in SETUP), None)
        if setup is None and status_name in SETUP:
            setup = status_name
        if setup is not None:
            return self.paused(setup, SETUP[setup], message)
        if status in (401, 403, 404) or status_name == "UNAUTHENTICATED":
            return self.paused(status_name, "check the OAuth credentials and " + _ACCOUNT, message)
        if named:
            return self.paused(named[0], "the request, not one event, was refused: check "
                               "[destinations.{name}] and its conversion actions in [[stages]]", message)
        return BatchRejected(status_name, message)

    def settle(self, diagnostics: dict[str, Any]) -> Settlement:
        """`settle` for this destination (a pause's fix names it)."""
        settled = settle(diagnostics)
        if settled.outcome == "paused" and settled.message:
            return replace(settled, message=settled.message.format(name=self.name))
        return settled

    def diagnose(self, request_id: str) -> dict[str, Any] | None:
        """Status of an ingested request: SUCCESS, PROCESSING, PARTIAL_SUCCESS or FAILED, with
        per-reason error counts."""
        self.limiter.acquire()
        try:
            response = self.http.get(f"{self.base_url}/v1/requestStatus:retrieve",
                                     params={"requestId": request_id}, headers=self.token.header())
        except Exception:  # diagnostics are best effort; the upload itself succeeded
            return None
        if response.status_code != 200:
            return None
        per = _json(response).get("requestStatusPerDestination") or []
        statuses = {d.get("requestStatus", "REQUEST_STATUS_UNKNOWN") for d in per}
        for worst in ("FAILED", "PARTIAL_SUCCESS", "PROCESSING", "SUCCESS"):
            if worst in statuses:
                break
        else:
            worst = "PROCESSING"
        errors: dict[str, int] = {}
        for d in per:
            for c in (d.get("errorInfo") or {}).get("errorCounts") or []:
                errors[c.get("reason", "?")] = errors.get(c.get("reason", "?"), 0) + int(
                    c.get("recordCount") or 0)
        return {"requestStatus": worst, "errorCounts": errors, "requestId": request_id}


# What an asynchronous FAILED means (ProcessingErrorReason): the events were there already, the
# account needs a fix (rows go back to due and the destination pauses), or try again later.
# Any other reason rejects the request's rows; CLICK_NOT_FOUND and EVENT_TOO_OLD are final.
_DUPLICATE = frozenset({"PROCESSING_ERROR_REASON_DUPLICATE_TRANSACTION_ID",
                        "PROCESSING_ERROR_REASON_DUPLICATE_GCLID"})
_RETRY = {"PROCESSING_ERROR_REASON_INTERNAL_ERROR": 3600.0,
          "PROCESSING_ERROR_REASON_TOO_RECENT_CLICK": 6 * 3600.0}
ASYNC_SETUP = {
    "PROCESSING_ERROR_REASON_DESTINATION_ACCOUNT_ENHANCED_CONVERSIONS_TERMS_NOT_SIGNED":
        SETUP["DESTINATION_ACCOUNT_ENHANCED_CONVERSIONS_TERMS_NOT_SIGNED"],
    "PROCESSING_ERROR_OPERATING_ACCOUNT_MISMATCH_FOR_AD_IDENTIFIER":
        "the click ids belong to another Google Ads account than operating_account_id of "
        "[destinations.{name}]",
    "PROCESSING_ERROR_REASON_INVALID_OPERATING_ACCOUNT_FOR_CLICK":
        "the click ids belong to another Google Ads account than operating_account_id of "
        "[destinations.{name}]",
    "PROCESSING_ERROR_REASON_ONE_PER_CLICK_CONVERSION_ACTION_NOT_PERMITTED_WITH_BRAID":
        "set the conversion actions of destination {name} to count every conversion, not one per click",
}


def settle(diagnostics: dict[str, Any]) -> Settlement:
    """What a request's asynchronous status means for each of its rows. PARTIAL_SUCCESS keeps the
    rows sent but marked: Google reports counts per reason, not which events failed, so the report
    does not count them as accepted."""
    status, errors = diagnostics["requestStatus"], diagnostics.get("errorCounts") or {}
    summary = ", ".join(f"{reason} x{n}" for reason, n in sorted(errors.items()))
    if status != "FAILED":
        return Settlement("sent", status, summary or None)
    reasons = set(errors) or {"PROCESSING_ERROR_REASON_UNSPECIFIED"}
    setup = sorted(reasons & set(ASYNC_SETUP))
    if setup:
        return Settlement("paused", setup[0].removeprefix("PROCESSING_ERROR_REASON_"),
                          ASYNC_SETUP[setup[0]])
    if reasons <= _DUPLICATE:
        return Settlement("sent", "DUPLICATE", summary)
    if reasons <= set(_RETRY):
        return Settlement("retry", "FAILED", summary, max(_RETRY[r] for r in reasons))
    return Settlement("rejected", "FAILED", f"Google failed the request after accepting it: {summary}")


def _json(response: Any) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
