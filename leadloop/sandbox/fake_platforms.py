"""Fake ad platforms on 127.0.0.1 that check payloads the way the vendors do.

One `LocalServer` per platform: Google Data Manager (`POST /v1/events:ingest`,
`GET /v1/requestStatus:retrieve`), Google Ads v26 (`:uploadClickConversions`,
`:uploadConversionAdjustments`), Meta (`POST /v26.0/{dataset}/events`), Microsoft
(`POST /CampaignManagement/v13/OfflineConversions/Apply` and `.../OfflineConversionAdjustments/Apply`)
and LinkedIn (`POST /rest/conversionEvents`). Each validates required fields, formats, limits,
one click id, 64-hex hashes and event age, answers with the vendor's error shape, and keeps a
ledger of accepted ids (order / transaction / event id) so a re-upload is deduplicated like the
real thing.

Tests script answers: `fail_next(kind, "429" | "500" | "fast_fail", ...)` for whole-request
failures, `reject(kind, order_id, code)` for a per-row error, `setup_error(kind, code)` for an
account that is not set up (every request refused the vendor's way until `setup_error(kind, None)`),
`fail_async(status, reasons)` for Data Manager diagnostics that report FAILED or PARTIAL_SUCCESS,
and `oauth(kind, lifetime)` for Microsoft/LinkedIn token endpoints whose access tokens expire
(an expired or unknown token is refused with the vendor's 401). `echo_token` makes error bodies
repeat the Authorization header, as some proxies and WAFs do. Data Manager restates an event
re-sent with a known `transactionId` and a new value.

    platforms = FakePlatforms()
    urls = platforms.start()        # {kind: base_url}; [destinations.x] base_url = urls["meta"]
    ...
    platforms.stop()
"""

from __future__ import annotations

import re
import threading
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl

from leadloop.sandbox.server import LocalServer, Reply, Request

KINDS = ("google_data_manager", "google_ads", "meta", "microsoft", "linkedin")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
_RFC3339_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
_ADS_TIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}[+-]\d{2}:\d{2}$")
_ACTION = re.compile(r"^customers/\d+/conversionActions/\d+$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
# Microsoft's published operation error codes this fake answers with (name -> number).
MS_ERRORS = {
    "InvalidCredentials": 105, "AuthenticationTokenExpired": 109, "NullRequest": 100,
    "OfflineConversionsNullOrEmpty": 5600, "OfflineConversionsLimitExceeded": 5601,
    "OfflineConversionMicrosoftClickIdNullOrEmpty": 5603, "OfflineConversionNameInvalid": 5606,
    "OfflineConversionNameNullOrEmpty": 5605, "OfflineConversionTimeInvalid": 5607,
    "OfflineConversionTimeOutOfWindow": 5609, "FutureConversionTimeCannotBeSet": 5614,
    "OfflineConversionNotAcceptedForGoal": 5615, "OfflineConversionInvalidAdjustmentType": 5618,
    "EmailMustBeHashed": 8004,
}


def _parse_ads_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S%z")


def _parse_z(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class FakePlatforms:
    def __init__(self, now: Callable[[], datetime] = lambda: datetime.now(UTC),
                 require_token: str | None = None) -> None:
        self.now = now
        self.require_token = require_token
        self.servers = {k: LocalServer() for k in KINDS}
        self.ledgers: dict[str, dict[str, dict[str, Any]]] = {k: {} for k in KINDS}
        self.adjustments: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
        self._scripted: dict[str, deque[Reply]] = defaultdict(deque)
        self._row_errors: dict[str, dict[str, str]] = defaultdict(dict)
        self._requests_status: dict[str, dict[str, Any]] = {}
        self._setup: dict[str, str] = {}
        self._async: tuple[str, dict[str, int]] | None = None
        self._tokens: dict[str, dict[str, datetime]] = defaultdict(dict)  # kind -> token -> expiry
        self._token_life: dict[str, float] = {}
        self._refresh_life = 365 * 86400.0
        self.token_requests: dict[str, list[dict[str, str]]] = defaultdict(list)
        self.echo_token = False
        self.urls: dict[str, str] = {}
        self._routes()

    # -- lifecycle and scripting ----------------------------------------------------------

    def start(self) -> dict[str, str]:
        """Start every fake; return {destination kind: base_url} (also kept in `.urls`)."""
        self.urls = {k: s.start() for k, s in self.servers.items()}
        return dict(self.urls)

    def stop(self) -> None:
        """Stop every server at once (each shutdown waits for its poll loop)."""
        threads = [threading.Thread(target=s.stop) for s in self.servers.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def reset(self) -> None:
        """Forget ledgers, scripts and received requests (to reuse running servers in tests)."""
        for kind in KINDS:
            self.ledgers[kind].clear()
            self.adjustments[kind].clear()
            self.servers[kind].received.clear()
        self._scripted.clear()
        self._row_errors.clear()
        self._requests_status.clear()
        self._setup.clear()
        self._async = None
        self._tokens.clear()
        self._token_life.clear()
        self.token_requests.clear()
        self.echo_token = False

    def __enter__(self) -> FakePlatforms:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def received(self, kind: str) -> list[Request]:
        """The upload requests `kind` received (token requests are in `token_requests`)."""
        return [r for r in self.servers[kind].received if r.method == "POST" and "token" not in
                r.path.lower()]

    def fail_next(self, kind: str, mode: str, *, times: int = 1, retry_after: int = 1) -> None:
        """Script whole-request failures: "429" (with Retry-After), "500", "503", "fast_fail"."""
        for _ in range(times):
            self._scripted[kind].append(self._failure(kind, mode, retry_after))

    def reject(self, kind: str, order_id: str, code: str) -> None:
        """Make the platform refuse one row (by order / transaction / event id) with `code`."""
        self._row_errors[kind][order_id] = code

    def setup_error(self, kind: str, code: str | None) -> None:
        """Refuse every upload to `kind` as an account that is not set up (`code` is the vendor's
        name, e.g. TERMS_AND_CONDITIONS_NOT_SIGNED, OfflineConversionNameInvalid, 403); None
        clears it (the account was fixed)."""
        if code is None:
            self._setup.pop(kind, None)
        else:
            self._setup[kind] = code

    def fail_async(self, status: str | None, reasons: dict[str, int] | None = None) -> None:
        """Data Manager: report the next ingested requests as `status` (FAILED, PARTIAL_SUCCESS)
        with these error counts in `requestStatus:retrieve`; None goes back to normal."""
        self._async = None if status is None else (status, dict(reasons or {}))

    def oauth(self, kind: str, lifetime: float = 3600.0, refresh_lifetime: float = 365 * 86400.0
              ) -> None:
        """Serve the token endpoint of `kind` (microsoft, linkedin) and require its tokens: each
        refresh grant issues a new access token valid `lifetime` seconds of the fake's clock
        (LinkedIn also announces `refresh_token_expires_in` = `refresh_lifetime`)."""
        self._token_life[kind] = lifetime
        self._refresh_life = refresh_lifetime

    def expire_tokens(self, kind: str) -> None:
        """Every access token of `kind` issued so far is now expired."""
        for token in self._tokens[kind]:
            self._tokens[kind][token] = self.now() - timedelta(seconds=1)

    def _failure(self, kind: str, mode: str, retry_after: int) -> Reply:
        if mode == "429":
            body = self._error_body(kind, 429, "RESOURCE_EXHAUSTED", "Too many requests")
            return Reply(429, body, {"Retry-After": str(retry_after)})
        if mode in ("500", "503"):
            return Reply(int(mode), self._error_body(kind, int(mode), "UNAVAILABLE", "try again"))
        if mode == "fast_fail":
            return Reply(400, self._error_body(kind, 400, "INVALID_ARGUMENT", "invalid request"))
        raise ValueError(mode)

    def _error_body(self, kind: str, status: int, reason: str, message: str) -> dict[str, Any]:
        if kind in ("google_data_manager", "google_ads"):
            return {"error": {"code": status, "message": message, "status": reason}}
        if kind == "meta":
            return {"error": {"message": message, "type": "OAuthException",
                              "code": 100 if status == 400 else 2, "is_transient": status != 400,
                              "error_user_msg": message, "fbtrace_id": uuid.uuid4().hex[:11]}}
        if kind == "microsoft":
            return {"TrackingId": str(uuid.uuid4()), "Type": "ApiFaultDetail", "BatchErrors": [],
                    "OperationErrors": [{"Code": 0, "ErrorCode": reason, "Message": message}]}
        return {"message": message, "status": status, "serviceErrorCode": 0}

    def _wrap(self, kind: str, handler: Callable[[Request], Reply]) -> Callable[[Request], Reply]:
        def serve(req: Request) -> Reply:
            reply = self._serve(kind, handler, req)
            if self.echo_token and reply.status >= 400 and isinstance(reply.body, dict):
                # a proxy or WAF that repeats the request's credentials in its error text
                echo = f" (request had Authorization: {req.header('authorization')}, " \
                       f"access_token={req.arg('access_token')})"
                reply = Reply(reply.status, _append_message(reply.body, echo), reply.headers)
            return reply

        return serve

    def _serve(self, kind: str, handler: Callable[[Request], Reply], req: Request) -> Reply:
        if self._scripted[kind] and req.method == "POST":
            return self._scripted[kind].popleft()
        if kind in self._token_life and not self._oauth_valid(kind, req):
            return self._unauthorised(kind)
        if self.require_token and not self._authorised(kind, req):
            return self._unauthorised(kind)
        if kind in self._setup and req.method == "POST":
            return self._setup_reply(kind, self._setup[kind], req)
        return handler(req)

    def _oauth_valid(self, kind: str, req: Request) -> bool:
        token = (req.header("authorization") or "").removeprefix("Bearer ")
        expiry = self._tokens[kind].get(token)
        return expiry is not None and expiry > self.now()

    def _token(self, kind: str) -> Callable[[Request], Reply]:
        def grant(req: Request) -> Reply:
            form = dict(parse_qsl(req.body.decode()))
            self.token_requests[kind].append(form)
            if form.get("grant_type") != "refresh_token" or not form.get("refresh_token"):
                return Reply(400, {"error": "invalid_grant", "error_description": "bad grant"})
            token = f"{kind}-access-{uuid.uuid4().hex[:12]}"
            life = self._token_life.get(kind, 3600.0)
            self._tokens[kind][token] = self.now() + timedelta(seconds=life)
            body: dict[str, Any] = {"access_token": token, "token_type": "Bearer",
                                    "expires_in": int(life), "refresh_token": form["refresh_token"]}
            if kind == "linkedin":
                body["refresh_token_expires_in"] = int(self._refresh_life)
            return Reply(200, body)

        return grant

    def _setup_reply(self, kind: str, code: str, req: Request) -> Reply:
        """How each vendor refuses an account that is not set up."""
        if kind == "google_data_manager":
            status = 403 if code == "PERMISSION_DENIED" else 400
            details: list[dict[str, Any]] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                              "reason": code, "domain": "datamanager.googleapis.com"}]
            if code == "INVALID_CONVERSION_ACTION_ID":
                details.insert(0, {"@type": "type.googleapis.com/google.rpc.BadRequest",
                                   "fieldViolations": [{
                                       "field": "destinations[0].product_destination_id",
                                       "description": "conversion action not found",
                                       "reason": code}]})
            return Reply(status, {"error": {
                "code": status, "message": f"{code.replace('_', ' ').lower()}",
                "status": "PERMISSION_DENIED" if status == 403 else "INVALID_ARGUMENT",
                "details": details}})
        if kind == "google_ads":
            key = "conversionAdjustments" if "Adjustments" in req.path else "conversions"
            n = len((req.json() or {}).get(key) or [])
            field = "conversion_adjustments" if key == "conversionAdjustments" else "conversions"
            enum = "conversionUploadError"
            errors = [self._ads_error(i, field, code, code.lower(), enum) for i in range(n)]
            return self._ads_reply(errors, [{} for _ in range(n)])
        if kind == "meta":
            return Reply(400, {"error": {
                "message": "Unsupported post request. Object with ID does not exist, cannot be "
                           "loaded due to missing permissions, or does not support this operation",
                "type": "GraphMethodException", "code": 100, "error_subcode": 33,
                "fbtrace_id": uuid.uuid4().hex[:11]}})
        if kind == "microsoft":
            if code in ("InvalidCredentials", "AuthenticationTokenExpired"):
                return Reply(401, {"TrackingId": str(uuid.uuid4()), "Type": "AdApiFaultDetail",
                                   "Errors": [{"Code": MS_ERRORS[code], "ErrorCode": code,
                                               "Message": "Authentication failed.", "Detail": None}]})
            items = (req.json() or {}).get("OfflineConversions") or \
                (req.json() or {}).get("OfflineConversionAdjustments") or []
            return Reply(200, {"PartialErrors": [self._ms_row_error(i, code) for i in range(len(items))]})
        if code == "NONEXISTENT_VERSION":
            return Reply(426, {"status": 426, "code": code, "message": "Requested version is not active"})
        return Reply(403, {"status": 403, "serviceErrorCode": 100, "code": code,
                           "message": "Not enough permissions to access: conversionEvents"})

    @staticmethod
    def _ms_row_error(i: int, code: str, path: str | None = None) -> dict[str, Any]:
        return {"Code": MS_ERRORS.get(code, 0), "ErrorCode": code, "Message": code, "Index": i,
                "FieldPath": path, "Details": None, "Type": "BatchError"}

    def _authorised(self, kind: str, req: Request) -> bool:
        if kind == "meta":
            return req.arg("access_token") == self.require_token
        return req.header("authorization") == f"Bearer {self.require_token}"

    def _unauthorised(self, kind: str) -> Reply:
        if kind == "meta":
            return Reply(400, {"error": {"message": "Invalid OAuth access token.",
                                         "type": "OAuthException", "code": 190}})
        if kind == "microsoft":
            return Reply(401, {"TrackingId": str(uuid.uuid4()), "Type": "AdApiFaultDetail",
                               "Errors": [{"Code": 109, "ErrorCode": "AuthenticationTokenExpired",
                                           "Message": "Authentication token expired.",
                                           "Detail": None}]})
        if kind == "linkedin":
            return Reply(401, {"status": 401, "serviceErrorCode": 65601, "code": "EXPIRED_ACCESS_TOKEN",
                               "message": "The token used in the request has expired"})
        return Reply(401, self._error_body(kind, 401, "UNAUTHENTICATED", "invalid credentials"))

    def _routes(self) -> None:
        s = self.servers
        s["google_data_manager"].route("POST", r"/v1/events:ingest",
                                       self._wrap("google_data_manager", self._dm_ingest))
        s["google_data_manager"].route("GET", r"/v1/requestStatus:retrieve",
                                       self._wrap("google_data_manager", self._dm_status))
        s["google_ads"].route("POST", r"/v26/customers/(\d+):uploadClickConversions",
                              self._wrap("google_ads", self._ads_upload))
        s["google_ads"].route("POST", r"/v26/customers/(\d+):uploadConversionAdjustments",
                              self._wrap("google_ads", self._ads_adjust))
        s["meta"].route("POST", r"/v26\.0/(\d+)/events", self._wrap("meta", self._meta_events))
        s["microsoft"].route("POST", r"/CampaignManagement/v13/OfflineConversions/Apply",
                             self._wrap("microsoft", self._ms_apply))
        s["microsoft"].route("POST", r"/CampaignManagement/v13/OfflineConversionAdjustments/Apply",
                             self._wrap("microsoft", self._ms_adjust))
        s["linkedin"].route("POST", r"/rest/conversionEvents", self._wrap("linkedin", self._li_batch))
        s["microsoft"].route("POST", r"/common/oauth2/v2\.0/token", self._token("microsoft"))
        s["linkedin"].route("POST", r"/oauth/v2/accessToken", self._token("linkedin"))

    # -- Google Data Manager --------------------------------------------------------------

    def _dm_problem(self, body: dict[str, Any]) -> tuple[str, str, str] | None:
        dests = body.get("destinations") or []
        if not dests or len(dests) > 10:
            return "destinations", "INVALID_ARGUMENT", "1 to 10 destinations required"
        refs = {d.get("reference") for d in dests}
        for i, d in enumerate(dests):
            if not str((d.get("operatingAccount") or {}).get("accountId", "")).isdigit():
                return f"destinations[{i}].operating_account", "INVALID_OPERATING_ACCOUNT", "bad id"
            if not str(d.get("productDestinationId", "")).isdigit():
                return (f"destinations[{i}].product_destination_id", "INVALID_CONVERSION_ACTION_ID",
                        "conversion action id must be numeric")
        events = body.get("events") or []
        if not 1 <= len(events) <= 2000:
            return "events", "TOO_MANY_EVENTS", "1 to 2000 events per request"
        for i, ev in enumerate(events):
            p = f"events[{i}]"
            if not _RFC3339_Z.match(ev.get("eventTimestamp", "")):
                return f"{p}.event_timestamp", "EVENT_TIME_INVALID", "RFC 3339 timestamp required"
            if _parse_z(ev["eventTimestamp"]) > self.now() + timedelta(minutes=5):
                return f"{p}.event_timestamp", "EVENT_TIME_INVALID", "event in the future"
            ads = ev.get("adIdentifiers") or {}
            if sum(k in ads for k in ("gclid", "gbraid", "wbraid")) > 1:
                return f"{p}.ad_identifiers", "INVALID_ARGUMENT", "set only one click id"
            ids = (ev.get("userData") or {}).get("userIdentifiers") or []
            if not ads and not ids:
                return p, "NO_IDENTIFIERS_PROVIDED", "a click id or user data is required"
            for j, uid in enumerate(ids):
                value = uid.get("emailAddress") or uid.get("phoneNumber") or ""
                if body.get("encoding") != "HEX" or not HEX64.match(value):
                    return (f"{p}.user_data.user_identifiers[{j}]", "INVALID_HEX_ENCODING",
                            "identifiers must be SHA-256 hex with encoding HEX")
            cur = ev.get("currency")
            if cur is not None and not _CURRENCY.match(cur):
                return f"{p}.currency", "INVALID_CURRENCY_CODE", "ISO 4217 code required"
            for k, v in (ev.get("consent") or {}).items():
                if v not in ("CONSENT_GRANTED", "CONSENT_DENIED"):
                    return f"{p}.consent.{k}", "INVALID_ARGUMENT", f"invalid enum {v}"
            for r in ev.get("destinationReferences") or []:
                if r not in refs:
                    return f"{p}.destination_references", "INVALID_ARGUMENT", "unknown reference"
        return None

    def _dm_ingest(self, req: Request) -> Reply:
        body = req.json() or {}
        problem = self._dm_problem(body)
        if problem:
            field, reason, description = problem
            return Reply(400, {"error": {
                "code": 400, "message": f"{field}: {description}", "status": "INVALID_ARGUMENT",
                "details": [
                    {"@type": "type.googleapis.com/google.rpc.BadRequest",
                     "fieldViolations": [{"field": field, "description": description,
                                          "reason": reason}]},
                    {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
                     "domain": "datamanager.googleapis.com"},
                ]}})
        request_id = str(uuid.uuid4())
        if body.get("validateOnly"):
            return Reply(200, {"requestId": request_id})
        ledger, errors = self.ledgers["google_data_manager"], defaultdict[str, int](int)
        accepted = 0
        for ev in body["events"]:
            tid = ev.get("transactionId", "")
            code = self._row_errors["google_data_manager"].get(tid)
            if code:
                errors[code] += 1
            elif tid and tid in ledger and ledger[tid].get("conversionValue") != ev.get("conversionValue"):
                ledger[tid] = ev  # the same transaction with a new value: a restatement
                self.adjustments["google_data_manager"].append(ev)
                accepted += 1
            elif tid and tid in ledger:
                errors["PROCESSING_ERROR_REASON_DUPLICATE_TRANSACTION_ID"] += 1
            else:
                ledger[tid or uuid.uuid4().hex] = ev
                accepted += 1
        status = "SUCCESS" if not errors else ("PARTIAL_SUCCESS" if accepted else "FAILED")
        if self._async is not None:
            status, errors = self._async[0], defaultdict(int, self._async[1])
        self._requests_status[request_id] = {"requestStatusPerDestination": [{
            "destination": d, "requestStatus": status,
            "errorInfo": {"errorCounts": [{"recordCount": str(n), "reason": r}
                                          for r, n in errors.items()]},
            "eventsIngestionStatus": {"recordCount": str(accepted)},
        } for d in body["destinations"]]}
        return Reply(200, {"requestId": request_id})

    def _dm_status(self, req: Request) -> Reply:
        status = self._requests_status.get(req.arg("requestId") or "")
        if status is None:
            return Reply(404, {"error": {"code": 404, "message": "request not found",
                                         "status": "NOT_FOUND"}})
        return Reply(200, status)

    # -- Google Ads API v26 ---------------------------------------------------------------

    @staticmethod
    def _ads_error(index: int, field: str, code: str, message: str, enum: str) -> dict[str, Any]:
        return {"errorCode": {enum: code}, "message": message,
                "location": {"fieldPathElements": [{"fieldName": field, "index": index}]}}

    def _ads_reply(self, errors: list[dict[str, Any]], results: list[dict[str, Any]]) -> Reply:
        body: dict[str, Any] = {"results": results, "jobId": str(4294967296 + len(results))}
        if errors:
            body["partialFailureError"] = {
                "code": 3, "message": f"{len(errors)} of {len(results)} rows failed",
                "details": [{"@type": "type.googleapis.com/google.ads.googleads.v26.errors.GoogleAdsFailure",
                             "errors": errors, "requestId": uuid.uuid4().hex}]}
        return Reply(200, body)

    def _ads_request_problem(self, req: Request, body: dict[str, Any], key: str) -> Reply | None:
        login = req.header("login-customer-id")
        if login is not None and not login.isdigit():
            return Reply(400, {"error": {"code": 400, "status": "INVALID_ARGUMENT",
                                         "message": "login-customer-id must be digits only"}})
        if not body.get("partialFailure"):
            return Reply(400, {"error": {"code": 400, "status": "INVALID_ARGUMENT",
                                         "message": "partial_failure must be true"}})
        if not 1 <= len(body.get(key) or []) <= 2000:
            return Reply(400, {"error": {"code": 400, "status": "INVALID_ARGUMENT",
                "message": "too many rows", "details": [{
                    "@type": "type.googleapis.com/google.ads.googleads.v26.errors.GoogleAdsFailure",
                    "errors": [{"errorCode": {"conversionUploadError": "TOO_MANY_CONVERSIONS_IN_REQUEST"},
                                "message": "fewer than 2001"}]}]}})
        return None

    def _ads_upload(self, req: Request) -> Reply:
        body = req.json() or {}
        bad = self._ads_request_problem(req, body, "conversions")
        if bad:
            return bad
        ledger = self.ledgers["google_ads"]
        errors: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for i, c in enumerate(body["conversions"]):
            code = self._ads_row_problem(c)
            oid = c.get("orderId", "")
            if not code:
                code = self._row_errors["google_ads"].get(oid)
            if not code and oid in ledger:
                same = ledger[oid].get("conversionDateTime") == c.get("conversionDateTime")
                code = "CLICK_CONVERSION_ALREADY_EXISTS" if same else "ORDER_ID_ALREADY_IN_USE"
            if code:
                errors.append(self._ads_error(i, "conversions", code, code.replace("_", " ").lower(),
                                              "conversionUploadError"))
                results.append({})
                continue
            if not body.get("validateOnly"):
                ledger[oid] = c
            results.append({k: c[k] for k in ("gclid", "gbraid", "wbraid", "conversionAction",
                                               "conversionDateTime") if k in c})
        return self._ads_reply(errors, [] if body.get("validateOnly") else results)

    def _ads_row_problem(self, c: dict[str, Any]) -> str | None:
        clicks = [k for k in ("gclid", "gbraid", "wbraid") if k in c]
        if {"gbraid", "wbraid"} <= set(clicks):
            return "GBRAID_WBRAID_BOTH_SET"
        if len(clicks) > 1:
            return "GCLID_AND_BRAID_BOTH_SET" if "gclid" in clicks else "GBRAID_WBRAID_BOTH_SET"
        if not _ACTION.match(c.get("conversionAction", "")):
            return "NO_CONVERSION_ACTION_FOUND"
        if not _ADS_TIME.match(c.get("conversionDateTime", "")):
            return "INVALID_CONVERSION_DATE_TIME"
        if _parse_ads_time(c["conversionDateTime"]) > self.now() + timedelta(minutes=5):
            return "CONVERSION_PRECEDES_EVENT"
        ids = c.get("userIdentifiers") or []
        if not clicks and not ids:
            return "EVENT_NOT_FOUND"
        for uid in ids:
            value = uid.get("hashedEmail") or uid.get("hashedPhoneNumber") or ""
            if not HEX64.match(value) or len(uid) != 1:
                return "INVALID_USER_IDENTIFIER"
        if "conversionValue" in c and not _CURRENCY.match(c.get("currencyCode", "")):
            return "INVALID_CURRENCY_CODE"
        return None

    def _ads_adjust(self, req: Request) -> Reply:
        body = req.json() or {}
        bad = self._ads_request_problem(req, body, "conversionAdjustments")
        if bad:
            return bad
        errors: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        for i, a in enumerate(body["conversionAdjustments"]):
            code = self._row_errors["google_ads"].get(a.get("orderId", ""))
            original = self.ledgers["google_ads"].get(a.get("orderId", ""))
            kind = a.get("adjustmentType")
            if code:
                pass
            elif "orderId" in a and "gclidDateTimePair" in a:
                code = "GCLID_DATE_TIME_PAIR_AND_ORDER_ID_BOTH_SET"
            elif kind not in ("RESTATEMENT", "RETRACTION"):
                code = "INVALID_ADJUSTMENT_TYPE"
            elif kind == "RESTATEMENT" and "restatementValue" not in a:
                code = "RESTATEMENT_VALUE_REQUIRED"  # a stand-in name: the field is required
            elif kind == "RETRACTION" and "restatementValue" in a:
                code = "RESTATEMENT_VALUE_NOT_ALLOWED_FOR_RETRACTION"
            elif not _ADS_TIME.match(a.get("adjustmentDateTime", "")):
                code = "INVALID_ADJUSTMENT_DATE_TIME"
            elif original is None:
                code = "CONVERSION_NOT_FOUND"
            else:
                conv_time = _parse_ads_time(original["conversionDateTime"])
                age = self.now() - conv_time
                if age < timedelta(hours=24):
                    code = "TOO_RECENT_CONVERSION"
                elif age > timedelta(days=54):
                    code = "CONVERSION_EXPIRED"
                elif _parse_ads_time(a["adjustmentDateTime"]) < conv_time:
                    code = "ADJUSTMENT_PRECEDES_CONVERSION"
                elif any(x.get("orderId") == a["orderId"] and x.get("adjustmentType") == "RETRACTION"
                         for x in self.adjustments["google_ads"]):
                    code = "CONVERSION_ALREADY_RETRACTED"
            if code:
                errors.append(self._ads_error(i, "conversion_adjustments", code, code.lower(),
                                              "conversionAdjustmentUploadError"))
                results.append({})
                continue
            if not body.get("validateOnly"):
                self.adjustments["google_ads"].append(a)
            results.append({"orderId": a["orderId"], "adjustmentType": kind})
        return self._ads_reply(errors, [] if body.get("validateOnly") else results)

    # -- Meta -----------------------------------------------------------------------------

    def _meta_events(self, req: Request) -> Reply:
        body = req.json() or {}
        data = body.get("data")
        trace = uuid.uuid4().hex[:11]

        def invalid(msg: str, subcode: int) -> Reply:
            return Reply(400, {"error": {"message": "Invalid parameter", "type": "OAuthException",
                                         "code": 100, "error_subcode": subcode, "is_transient": False,
                                         "error_user_title": "Invalid event", "error_user_msg": msg,
                                         "fbtrace_id": trace}})

        if not isinstance(data, list) or not 1 <= len(data) <= 1000:
            return invalid("data must be an array of 1 to 1000 events", 2804019)
        now = self.now()
        for i, ev in enumerate(data):
            t = ev.get("event_time")
            user = ev.get("user_data") or {}
            custom = ev.get("custom_data") or {}
            if not ev.get("event_name"):
                return invalid(f"data[{i}]: event_name is required", 2804008)
            if not isinstance(t, int):
                return invalid(f"data[{i}]: event_time must be a Unix timestamp in seconds", 2804003)
            when = datetime.fromtimestamp(t, UTC)
            if when < now - timedelta(days=7):
                return invalid(f"data[{i}]: event_time is more than 7 days in the past", 2804003)
            if when > now + timedelta(minutes=5):
                return invalid(f"data[{i}]: event_time is in the future", 2804004)
            if ev.get("action_source") != "system_generated":
                return invalid(f"data[{i}]: action_source must be system_generated", 2804050)
            lead_id = user.get("lead_id")
            if not isinstance(lead_id, int) or not 15 <= len(str(lead_id)) <= 17:
                return invalid(f"data[{i}]: user_data.lead_id must be the Lead Ads lead id", 2804051)
            if custom.get("event_source") != "crm" or not custom.get("lead_event_source"):
                return invalid(f"data[{i}]: custom_data.event_source crm and lead_event_source "
                               "are required", 2804052)
            for key in ("em", "ph"):
                if any(not HEX64.match(v) for v in user.get(key) or []):
                    return invalid(f"data[{i}]: user_data.{key} must be SHA-256 hex", 2804007)
            cur = custom.get("currency")
            if cur is not None and not re.fullmatch(r"[a-z]{3}", cur):
                return invalid(f"data[{i}]: currency must be a 3-letter code", 2804009)
            code = self._row_errors["meta"].get(ev.get("event_id", ""))
            if code:
                return invalid(f"data[{i}]: {code}", 2804053)
        ledger = self.ledgers["meta"]
        for ev in data:  # dedup by (event_name, event_id) like Meta; counted as received anyway
            ledger.setdefault(f"{ev['event_name']}|{ev.get('event_id')}", ev)
        return Reply(200, {"events_received": len(data), "messages": [], "fbtrace_id": trace})

    # -- Microsoft ------------------------------------------------------------------------

    _MS_KEYS = frozenset({"MicrosoftClickId", "ConversionName", "ConversionTime", "ConversionValue",
                          "ConversionCurrencyCode", "ExternalAttributionCredit",
                          "ExternalAttributionModel", "HashedEmailAddress", "HashedPhoneNumber"})
    _MS_ADJ_KEYS = frozenset({"MicrosoftClickId", "ConversionName", "ConversionTime",
                              "AdjustmentTime", "AdjustmentType", "AdjustmentValue",
                              "AdjustmentCurrencyCode", "HashedEmailAddress", "HashedPhoneNumber"})

    def _ms_fault(self, code: str, message: str) -> Reply:
        return Reply(400, {"TrackingId": str(uuid.uuid4()), "Type": "ApiFaultDetail",
                           "BatchErrors": [], "OperationErrors": [
                               {"Code": MS_ERRORS[code], "ErrorCode": code, "Message": message,
                                "Details": None}]})

    def _ms_common(self, i: int, item: dict[str, Any], keys: frozenset[str]) -> dict[str, Any] | None:
        def err(code: str, path: str | None) -> dict[str, Any]:
            return self._ms_row_error(i, code, path)

        unknown = set(item) - keys
        if unknown:  # the REST deserialiser drops unknown fields; the fake refuses them loudly
            return err("NullRequest", sorted(unknown)[0])
        if not item.get("MicrosoftClickId"):
            return err("OfflineConversionMicrosoftClickIdNullOrEmpty", "MicrosoftClickId")
        if not item.get("ConversionName"):
            return err("OfflineConversionNameNullOrEmpty", "ConversionName")
        if not _RFC3339_Z.match(str(item.get("ConversionTime", ""))):
            return err("OfflineConversionTimeInvalid", "ConversionTime")
        when = _parse_z(item["ConversionTime"])
        if when > self.now() + timedelta(minutes=5):
            return err("FutureConversionTimeCannotBeSet", "ConversionTime")
        if when < self.now() - timedelta(days=90):
            return err("OfflineConversionTimeOutOfWindow", "ConversionTime")
        for key in ("HashedEmailAddress", "HashedPhoneNumber"):
            if key in item and not HEX64.match(str(item[key])):
                return err("EmailMustBeHashed", key)
        return None

    def _ms_apply(self, req: Request) -> Reply:
        items = (req.json() or {}).get("OfflineConversions")
        if not isinstance(items, list) or not 1 <= len(items) <= 1000:
            return self._ms_fault("OfflineConversionsNullOrEmpty" if not items
                                  else "OfflineConversionsLimitExceeded", "1 to 1000 conversions")
        ledger, errors = self.ledgers["microsoft"], []
        for i, item in enumerate(items):
            e = self._ms_common(i, item, self._MS_KEYS)
            scripted = self._row_errors["microsoft"].get(item.get("MicrosoftClickId", ""))
            if not e and scripted:
                e = self._ms_row_error(i, scripted)
            if e:
                errors.append(e)
                continue
            # same click + name + time: ignored as a duplicate, like Microsoft
            ledger.setdefault(f"{item['MicrosoftClickId']}|{item['ConversionName']}|"
                              f"{item['ConversionTime']}", item)
        return Reply(200, {"PartialErrors": errors or None})

    def _ms_adjust(self, req: Request) -> Reply:
        items = (req.json() or {}).get("OfflineConversionAdjustments")
        if not isinstance(items, list) or not 1 <= len(items) <= 1000:
            return self._ms_fault("OfflineConversionsLimitExceeded", "1 to 1000 items")
        errors = []
        for i, item in enumerate(items):
            e = self._ms_common(i, item, self._MS_ADJ_KEYS)
            key = f"{item.get('MicrosoftClickId')}|{item.get('ConversionName')}|{item.get('ConversionTime')}"
            if not e and item.get("AdjustmentType") not in ("Restate", "Retract"):
                e = self._ms_row_error(i, "OfflineConversionInvalidAdjustmentType", "AdjustmentType")
            if not e and key not in self.ledgers["microsoft"]:
                # no published code for "no such conversion"; the click id names nothing we know
                e = self._ms_row_error(i, "OfflineConversionMicrosoftClickIdNullOrEmpty",
                                       "MicrosoftClickId")
            if e:
                errors.append(e)
            else:
                self.adjustments["microsoft"].append(item)
        return Reply(200, {"PartialErrors": errors or None})

    # -- LinkedIn -------------------------------------------------------------------------

    _LI_ID_TYPES = frozenset({"SHA256_EMAIL", "LINKEDIN_FIRST_PARTY_ADS_TRACKING_UUID", "ACXIOM_ID",
                              "ORACLE_MOAT_ID"})

    def _li_batch(self, req: Request) -> Reply:
        if not re.fullmatch(r"\d{6}", req.header("linkedin-version") or ""):
            return Reply(426, {"status": 426, "code": "NONEXISTENT_VERSION",
                               "message": "Requested version is not active"})
        if req.header("x-restli-protocol-version") != "2.0.0" or \
                req.header("x-restli-method") != "BATCH_CREATE":
            return Reply(400, {"status": 400, "code": "ILLEGAL_ARGUMENT",
                               "message": "BATCH_CREATE with Rest.li protocol 2.0.0 expected"})
        elements = (req.json() or {}).get("elements")
        if not isinstance(elements, list) or not 1 <= len(elements) <= 5000:
            return Reply(400, {"status": 400, "code": "ILLEGAL_ARGUMENT",
                               "message": "1 to 5000 elements"})
        out = []
        for el in elements:
            problem = self._li_problem(el)
            if problem:
                out.append({"status": 400, "error": {"status": 400, "code": "ILLEGAL_ARGUMENT",
                                                     "message": problem}})
                continue
            self.ledgers["linkedin"].setdefault(el.get("eventId") or uuid.uuid4().hex, el)
            out.append({"status": 201})
        return Reply(200, {"elements": out})

    def _li_problem(self, el: dict[str, Any]) -> str | None:
        if not str(el.get("conversion", "")).startswith("urn:lla:llaPartnerConversion:"):
            return "/conversion must be urn:lla:llaPartnerConversion:{id}"
        t = el.get("conversionHappenedAt")
        if not isinstance(t, int) or t < 10**12:
            return "/conversionHappenedAt must be epoch milliseconds"
        when = datetime.fromtimestamp(t / 1000, UTC)
        if when < self.now() - timedelta(days=90):
            return "/conversionHappenedAt is older than 90 days"
        value = el.get("conversionValue")
        if value is not None and (not isinstance(value.get("amount"), str)
                                  or not _CURRENCY.match(value.get("currencyCode") or "")):
            return "/conversionValue/amount must be a string with a currencyCode"
        user = el.get("user")
        if not isinstance(user, dict) or not isinstance(user.get("userIds"), list):
            return "/user/userIds is required"
        if not user["userIds"]:
            return "/user/userIds needs at least one id"
        for uid in user["userIds"]:
            if uid.get("idType") not in self._LI_ID_TYPES:
                return f"/user/userIds/idType {uid.get('idType')} is not valid"
            if uid["idType"] == "SHA256_EMAIL" and not HEX64.match(uid.get("idValue", "")):
                return "/user/userIds SHA256_EMAIL must be SHA-256 hex"
        scripted = self._row_errors["linkedin"].get(el.get("eventId", ""))
        return scripted


def _append_message(body: dict[str, Any], text: str) -> dict[str, Any]:
    """`body` with `text` added to the message fields a vendor's error carries."""
    out = dict(body)
    if isinstance(out.get("error"), dict):
        err = dict(out["error"])
        for key in ("message", "error_user_msg"):
            if key in err:
                err[key] = f"{err[key]}{text}"
        out["error"] = err
    for key in ("message", "Message"):
        if key in out:
            out[key] = f"{out[key]}{text}"
    for key in ("Errors", "OperationErrors", "BatchErrors", "PartialErrors"):
        if isinstance(out.get(key), list):
            out[key] = [{**e, "Message": f"{e.get('Message')}{text}"} for e in out[key]]
    if "message" not in out and "error" not in out and not any(
            k in out for k in ("Errors", "OperationErrors", "BatchErrors", "PartialErrors", "Message")):
        out["message"] = text
    return out
