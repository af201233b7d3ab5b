"""Google Data Manager API (`events:ingest`): the Google path for new integrations.

Offline click conversions and enhanced conversions for leads in one event shape. No partial
failure: an invalid field rejects the whole request (fast-fail). The error names the event
(`events[3]....` in `BadRequest.fieldViolations`), so that row is rejected and the rest re-sent.
Per-event processing results arrive later, as counts per reason, from `requestStatus:retrieve`;
they are stored on every conversion of the request. Adjustments (restate/retract) are not sent
here: their Data Manager shape is not published yet (spec sheet §9).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from leadloop.export.base import (
    BaseDestination,
    BatchRejected,
    OutRow,
    RowResult,
    json_value,
    rfc3339,
)
from leadloop.export.google_auth import GoogleToken
from leadloop.http import RateLimiter

SCOPE = "https://www.googleapis.com/auth/datamanager"
MAX_DESTINATIONS = 10
_EVENT_INDEX = re.compile(r"^events\[(\d+)\]")


def consent_value(flag: bool | None) -> str | None:
    return None if flag is None else ("CONSENT_GRANTED" if flag else "CONSENT_DENIED")


class DataManagerDestination(BaseDestination):
    kind: ClassVar[str] = "google_data_manager"
    default_base_url: ClassVar[str] = "https://datamanager.googleapis.com"
    platform_max: ClassVar[int] = 2000
    has_validate_only: ClassVar[bool] = True

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
        ev["transactionId"] = row.order_id
        ev["eventTimestamp"] = rfc3339(row.conversion_time)
        ids = []
        if self.cfg.send_user_data and row.consent_ad_user_data is not False:
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
        click = row.google_click
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
        self.raise_for_transport(response)
        body = _json(response)
        if response.status_code >= 400:
            raise _fast_fail(body, response.status_code)
        request_id = body.get("requestId")
        code = "VALIDATED" if payload.get("validateOnly") else "PROCESSING"
        warnings = body.get("fieldWarnings") or []
        return [RowResult(r.order_id, "sent", code, None, response={"requestId": request_id,
                          **({"fieldWarnings": warnings} if warnings else {})},
                          request_id=request_id) for r in rows]

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


def _json(response: Any) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _fast_fail(body: dict[str, Any], status: int) -> BatchRejected:
    """Map a google.rpc error to the event it names (fieldViolations) when it names one."""
    err = body.get("error") or {}
    reason = err.get("status") or f"HTTP_{status}"
    message = err.get("message") or "request rejected"
    for detail in err.get("details") or []:
        if detail.get("@type", "").endswith("google.rpc.ErrorInfo") and detail.get("reason"):
            reason = detail["reason"]
    for detail in err.get("details") or []:
        for fv in detail.get("fieldViolations") or []:
            m = _EVENT_INDEX.match(fv.get("field", ""))
            if m:
                return BatchRejected(fv.get("reason") or reason,
                                     f"{fv.get('field')}: {fv.get('description', message)}",
                                     row_index=int(m.group(1)))
    return BatchRejected(reason, message)
