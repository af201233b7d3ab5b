"""Salesforce connector: REST SOQL over Lead and Opportunity, stage times from history objects.

- Streams `Lead` then `Opportunity`, each read with `queryAll` (so deleted rows come back with
  `IsDeleted = true`) ordered by `SystemModstamp, Id` and paged through `nextRecordsUrl`.
  `SystemModstamp` changes on every user or system update (`LastModifiedDate` does not), so it is
  the cursor; SOQL datetimes are written in UTC `Z` form (a `+0000` offset breaks the query).
- Stage times: per page, `LeadHistory` (Field = 'Status', only when field history tracking is on;
  INVALID_TYPE is tolerated) and `OpportunityHistory` (always tracked) for the page's ids.
- A converted lead points to its opportunity (`ConvertedOpportunityId`); the opportunity's stages
  are attributed to that lead. Opportunities that no lead was converted into are not leads and
  are skipped (counted in the log).
- Merged leads are deleted rows whose `MasterRecordId` names the survivor.
- Auth: a static token (`auth_flow = "token"`), or OAuth refresh-token / client-credentials
  through `leadloop.oauth`; the token response's `instance_url` is the API base unless
  `[crm] base_url` overrides it. `INVALID_SESSION_ID` gets one refresh, then fails clearly.
- `REQUEST_LIMIT_EXCEEDED` (the org's rolling 24-hour allocation) stops the sync with the usage
  from `Sforce-Limit-Info`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import requests

from leadloop.context import Context
from leadloop.crm.base import (
    ATTRIBUTION_FIELDS,
    MALFORMED,
    Cursor,
    LeadIn,
    Page,
    StageIn,
    StoredIds,
    as_reject,
    no_stored_ids,
    parse_decimal,
    record_id,
    record_key,
)
from leadloop.crm.rest import Auth, OAuthAuth, RestApi, TokenAuth, follow_pages
from leadloop.errors import ConfigError, FatalSourceError, QuotaExhaustedError, RecordRejected
from leadloop.http import describe_response
from leadloop.oauth import OAuthTokenProvider

log = logging.getLogger(__name__)

DEFAULT_API_VERSION = "v66.0"
DEFAULT_TOKEN_URL = "https://login.salesforce.com/services/oauth2/token"
# IN lists are chunked so that a GET URL stays well under Salesforce's 16 KB URI limit.
_IN_CHUNK = 200
# Salesforce's names for what `[crm.properties]` leaves at its (HubSpot-flavoured) defaults.
_SF_DEFAULTS: dict[str, str | None] = {
    "email": "Email",
    "phone": "Phone",
    "created_at": "CreatedDate",
    "gclid": "GCLID__c",
    "utm_source": "LeadSource",
}
_LEAD_FIELDS = ("Id", "Status", "IsConverted", "ConvertedDate", "ConvertedOpportunityId",
                "CreatedDate", "LastModifiedDate", "SystemModstamp", "IsDeleted", "MasterRecordId")
_OPP_FIELDS = ("Id", "StageName", "Amount", "IsClosed", "IsWon", "CloseDate", "CreatedDate",
               "SystemModstamp", "IsDeleted")


def soql_datetime(value: datetime) -> str:
    """SOQL datetime literal, always UTC with `Z` (never `+0000`)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_sf_datetime(value: Any) -> datetime | None:
    """`2026-11-01T10:00:00.000+0000` (datetime) or `2026-11-01` (date, midnight UTC)."""
    if not value:
        return None
    text = str(value)
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)


def _quote_ids(ids: Iterable[str]) -> str:
    # Salesforce ids are [A-Za-z0-9]{15,18}; anything else would be an injection attempt.
    return ",".join(f"'{i}'" for i in ids if i.isalnum())


def _chunks(items: Sequence[str], size: int = _IN_CHUNK) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class SalesforceApi(RestApi):
    """Salesforce's REST API: a static token or OAuth (refresh token or client credentials,
    whose token response names the instance URL); REQUEST_LIMIT_EXCEEDED is the quota, other
    4xx carry an error code (`SalesforceApiError`)."""

    vendor = "Salesforce"
    auth_hint = "check the credentials, the connected app's policies, and the IP restrictions"

    def __init__(self, ctx: Context) -> None:
        crm = ctx.settings.crm
        self.api_version = crm.api_version or DEFAULT_API_VERSION
        self.page_size = crm.page_size
        self.api_usage: str | None = None
        self._base_override = crm.base_url.rstrip("/") if crm.base_url else None
        self.oauth: OAuthTokenProvider | None = None
        session = ctx.http(timeout=(10.0, crm.timeout_seconds))
        credentials = self._credentials(ctx, session)
        super().__init__(session, self._base_override or "", lambda: credentials)

    def _credentials(self, ctx: Context, session: requests.Session) -> Auth:
        crm = ctx.settings.crm
        if crm.auth_flow == "token":
            if not self._base_override:
                raise ConfigError("crm.base_url", "is required with auth_flow = 'token' "
                                  "(the org's instance URL, e.g. https://acme.my.salesforce.com)")
            return TokenAuth(ctx.settings, "crm.token_env", crm.token_env)
        client_id = ctx.settings.secret("crm.client_id_env", crm.client_id_env)
        client_secret = ctx.settings.secret("crm.client_secret_env", crm.client_secret_env)
        refresh = None
        if crm.auth_flow == "refresh_token":
            refresh = ctx.settings.secret("crm.refresh_token_env", crm.refresh_token_env)
        elif not crm.token_url:
            raise ConfigError("crm.token_url", "is required with auth_flow = "
                              "'client_credentials' (the org's My Domain token URL)")
        self.oauth = OAuthTokenProvider(
            session, crm.token_url or DEFAULT_TOKEN_URL,
            client_id.get_secret_value(), client_secret.get_secret_value(),
            refresh.get_secret_value() if refresh else None, grant=crm.auth_flow,
            secret_envs={"crm.client_id_env": str(crm.client_id_env),
                         "crm.client_secret_env": str(crm.client_secret_env),
                         **({"crm.refresh_token_env": str(crm.refresh_token_env)}
                            if refresh else {})})
        return OAuthAuth(self.oauth, f"the OAuth app in {crm.client_id_env}/"
                                     f"{crm.refresh_token_env or crm.client_secret_env}")

    @property
    def base_url(self) -> str:
        if self._base_override:
            return self._base_override
        assert self.oauth is not None
        self.oauth.token()  # the instance URL arrives with the first token
        instance = self.oauth.extra.get("instance_url")
        if not instance:
            raise FatalSourceError("the Salesforce token response had no instance_url",
                                   hint="set [crm] base_url to the org's instance URL")
        return str(instance).rstrip("/")

    def get(self, path: str) -> dict[str, Any]:
        """GET `path` (absolute path on the instance); one token refresh on INVALID_SESSION_ID."""
        return self.request("GET", path)

    def request_headers(self) -> dict[str, str]:
        if self.page_size:
            return {"Sforce-Query-Options": f"batchSize={max(200, self.page_size)}"}
        return {}

    def observe(self, response: requests.Response) -> None:
        self.api_usage = response.headers.get("Sforce-Limit-Info", self.api_usage)

    def error_code(self, response: requests.Response) -> str:
        return _error_code(response)

    def quota_error(self, response: requests.Response) -> QuotaExhaustedError | None:
        if _error_code(response) != "REQUEST_LIMIT_EXCEEDED":
            return None
        return QuotaExhaustedError(
            f"Salesforce API request limit exceeded ({self.api_usage or 'unknown'}): the org's "
            "rolling 24-hour allocation is used up",
            hint="the sync can resume as calls age out of the 24-hour window; "
            "`GET /services/data/<v>/limits` shows DailyApiRequests.Remaining",
        )

    def fatal_error(self, response: requests.Response) -> Exception:
        return SalesforceApiError(_error_code(response), describe_response(response))

    def query_path(self, soql: str, *, all_rows: bool = False) -> str:
        resource = "queryAll" if all_rows else "query"
        return f"/services/data/{self.api_version}/{resource}?q={quote(soql, safe='')}"


class SalesforceApiError(FatalSourceError):
    """A 4xx from Salesforce other than auth and limits (MALFORMED_QUERY, INVALID_FIELD, ...)."""

    def __init__(self, code: str, message: str) -> None:
        hint = None
        if code == "INVALID_FIELD":
            hint = ("a field in [crm.properties] / extra_properties does not exist in this org: "
                    "fix its API name, or set it to \"\" to leave it out")
        super().__init__(message, hint=hint)
        self.code = code


def _error_code(response: requests.Response) -> str:
    """Salesforce errors are a JSON array of {message, errorCode, fields}."""
    try:
        body = response.json()
    except ValueError:
        return ""
    if isinstance(body, list) and body and isinstance(body[0], dict):
        return str(body[0].get("errorCode", ""))
    if isinstance(body, dict):
        return str(body.get("errorCode") or body.get("error") or "")
    return ""


class SalesforceSource:
    """`CrmSource` for Salesforce (see module docstring)."""

    def __init__(self, ctx: Context) -> None:
        crm = ctx.settings.crm
        self.ctx = ctx
        self.name = crm.source_name
        self.client = SalesforceApi(ctx)
        set_fields = crm.properties.model_fields_set
        self.fields: dict[str, str] = {}
        for key in ("email", "phone", "created_at", *ATTRIBUTION_FIELDS,
                    "consent_ad_user_data", "consent_ad_personalization"):
            name = getattr(crm.properties, key) if key in set_fields else _SF_DEFAULTS.get(key)
            if name:
                self.fields[key] = name
        self.extra = [p for p in crm.extra_properties if p]
        self.status_field = (crm.lead_stage_property if "lead_stage_property" in crm.model_fields_set
                             else "Status")
        self.stage_field = (crm.deal_stage_property if "deal_stage_property" in crm.model_fields_set
                            else "StageName")
        self._lead_history = True  # off after INVALID_TYPE (history tracking not enabled)
        self.skipped_opportunities = 0

    needs_stored_ids = ()

    def streams(self) -> Sequence[str]:
        return ("Lead", "Opportunity")

    # -- paging -----------------------------------------------------------------------------

    def _records(self, soql: str, *, all_rows: bool = False) -> Iterator[tuple[list[dict], int]]:
        """Yield (records, totalSize) per batch, following nextRecordsUrl."""
        first = self.client.query_path(soql, all_rows=all_rows)
        for body, _ in follow_pages(
                lambda next_url: self.client.get(next_url or first),
                lambda body: None if body.get("done", True) else body.get("nextRecordsUrl"),
                vendor="Salesforce", what="query"):
            yield body.get("records", []), int(body.get("totalSize", 0))

    def _query_all(self, soql: str) -> list[dict]:
        return [r for batch, _ in self._records(soql) for r in batch]

    def _incremental(self, sobject: str, fields: Sequence[str], since: Cursor | None
                     ) -> Iterator[tuple[list[dict], int]]:
        """Rows modified at or after `since`, in (SystemModstamp, Id) order, deleted included.

        A query locator can die mid-way (INVALID_QUERY_LOCATOR, e.g. a rotated session): the
        query is then restarted from the last row read; upserts absorb the overlap."""
        start = since.updated_at if since else None
        while True:
            where = f" WHERE SystemModstamp >= {soql_datetime(start)}" if start else ""
            soql = (f"SELECT {', '.join(dict.fromkeys(fields))} FROM {sobject}{where} "
                    "ORDER BY SystemModstamp ASC, Id ASC")
            try:
                for batch, total in self._records(soql, all_rows=True):
                    if batch:
                        start = parse_sf_datetime(batch[-1].get("SystemModstamp")) or start
                    yield batch, total
                return
            except SalesforceApiError as exc:
                if exc.code != "INVALID_QUERY_LOCATOR" or start is None:
                    raise
                log.warning("Salesforce query locator expired; restarting %s from %s",
                            sobject, soql_datetime(start))

    def fetch(self, stream: str, since: Cursor | None, *, started_at: datetime,
              stored_ids: StoredIds = no_stored_ids) -> Iterator[Page]:
        if stream == "Lead":
            yield from self._fetch_leads(since)
        elif stream == "Opportunity":
            yield from self._fetch_opportunities(since)
            if self.skipped_opportunities:
                log.info("skipped %d opportunities that no lead was converted into",
                         self.skipped_opportunities)
        else:
            raise ValueError(f"unknown Salesforce stream {stream!r}")

    # -- leads ------------------------------------------------------------------------------

    def _lead_fields(self) -> list[str]:
        return [*_LEAD_FIELDS, self.status_field, *self.fields.values(), *self.extra]

    def _fetch_leads(self, since: Cursor | None) -> Iterator[Page]:
        for batch, total in self._incremental("Lead", self._lead_fields(), since):
            page = Page(total=total)
            page.rejects += [RecordRejected(f"Lead:{record_id(r, 'Id')}", "record has no usable Id")
                             for r in batch if not (isinstance(r, dict) and record_key(r, "Id"))]
            batch = [r for r in batch if isinstance(r, dict) and record_key(r, "Id")]
            live = [r for r in batch if not r.get("IsDeleted")]
            merged = [r for r in batch if r.get("IsDeleted") and r.get("MasterRecordId")]
            page.deleted_crm_ids = [str(r["Id"]) for r in batch
                                    if r.get("IsDeleted") and not r.get("MasterRecordId")]
            survivors = self._survivors(live, merged)
            history = self._status_history([str(r["Id"]) for r in live])
            for raw in live:
                try:
                    lead, stages = self.normalise_lead(raw, history.get(str(raw["Id"]), []))
                except MALFORMED as exc:  # a wrong type or missing key costs this record only
                    page.rejects.append(as_reject(exc, f"Lead:{record_id(raw, 'Id')}"))
                    continue
                lead.merged_crm_ids = survivors.get(lead.crm_id, [])
                page.leads.append(lead)
                page.stages.extend(stages)
            page.cursor = _batch_cursor(batch)
            yield page

    def _survivors(self, live: list[dict], merged: list[dict]) -> dict[str, list[str]]:
        """Master id -> absorbed ids. A master not in this page is read so that its lead row
        can carry the merge (the engine links the absorbed lead to it)."""
        out: dict[str, list[str]] = {}
        for r in merged:
            out.setdefault(str(r["MasterRecordId"]), []).append(str(r["Id"]))
        missing = [m for m in out if m not in {str(r["Id"]) for r in live}]
        for chunk in _chunks(missing):
            soql = (f"SELECT {', '.join(dict.fromkeys(self._lead_fields()))} FROM Lead "
                    f"WHERE Id IN ({_quote_ids(chunk)})")
            live.extend(self._query_all(soql))
        return out

    def _status_history(self, lead_ids: list[str]) -> dict[str, list[tuple[str, datetime]]]:
        """Lead id -> [(status, time entered)] from LeadHistory, when the org tracks it."""
        out: dict[str, list[tuple[str, datetime]]] = {}
        if not self._lead_history or not lead_ids:
            return out
        for chunk in _chunks(lead_ids):
            soql = (f"SELECT LeadId, NewValue, CreatedDate FROM LeadHistory WHERE Field = "
                    f"'{self.status_field}' AND LeadId IN ({_quote_ids(chunk)}) "
                    "ORDER BY CreatedDate ASC")
            try:
                rows = self._query_all(soql)
            except SalesforceApiError as exc:
                if exc.code not in ("INVALID_TYPE", "INVALID_FIELD"):
                    raise
                log.info("LeadHistory is not available (%s): lead status times fall back to "
                         "the lead's created/converted/modified dates", exc.code)
                self._lead_history = False
                return {}
            for r in rows:
                when = parse_sf_datetime(r.get("CreatedDate"))
                if when is not None and r.get("NewValue"):
                    out.setdefault(str(r["LeadId"]), []).append((str(r["NewValue"]), when))
        return out

    def normalise_lead(self, raw: dict[str, Any], history: list[tuple[str, datetime]]
                       ) -> tuple[LeadIn, list[StageIn]]:
        """One Lead record -> LeadIn and its status facts. Pure; raises RecordRejected."""
        crm_id = record_key(raw, "Id")
        if not crm_id:
            raise RecordRejected("Lead:?", "record has no Id", _public(raw))
        try:
            created = parse_sf_datetime(raw.get(self.fields.get("created_at", "CreatedDate")))
            modified = parse_sf_datetime(raw.get("SystemModstamp"))
            converted = parse_sf_datetime(raw.get("ConvertedDate"))
        except ValueError as exc:
            raise RecordRejected(f"Lead:{crm_id}", f"unparsable date: {exc}", _public(raw)) from None
        if created is None:
            raise RecordRejected(f"Lead:{crm_id}", "missing CreatedDate", _public(raw))
        lead = LeadIn(crm_id=crm_id, created_at=created, updated_at=modified, object_type="lead")
        for key, field in self.fields.items():
            if key in ("created_at",):
                continue
            value = raw.get(field)
            if key.startswith("consent_"):
                setattr(lead, key, None if value is None else bool(value))
            elif value not in (None, ""):
                setattr(lead, key, str(value))
        status = raw.get(self.status_field)
        lead.current_stage = str(status) if status else None
        lead.attributes = {k: raw.get(k) for k in ("LeadSource", "IsConverted", *self.extra)
                           if raw.get(k) is not None}
        stages = [StageIn(crm_id, self.status_field, value, when) for value, when in history]
        if status and not any(v == status for v, _ in history):
            # No tracked change to the current status: it was set when the lead was created,
            # or (untracked orgs) at conversion / last modification — the best time we have.
            fallback = created if not history else (converted or modified or created)
            if not self._lead_history:
                fallback = converted if raw.get("IsConverted") and converted else created
            stages.append(StageIn(crm_id, self.status_field, str(status), fallback))
        return lead, stages

    # -- opportunities ----------------------------------------------------------------------

    def _fetch_opportunities(self, since: Cursor | None) -> Iterator[Page]:
        stage_meta = self._stage_metadata()
        for batch, total in self._incremental("Opportunity", _OPP_FIELDS, since):
            page = Page(total=total)
            page.rejects += [RecordRejected(f"Opportunity:{record_id(r, 'Id')}", "record has no "
                                            "usable Id") for r in batch
                             if not (isinstance(r, dict) and record_key(r, "Id"))]
            batch = [r for r in batch if isinstance(r, dict) and record_key(r, "Id")]
            live = [r for r in batch if not r.get("IsDeleted")]
            opp_ids = [str(r["Id"]) for r in live]
            owners = self._converted_leads(opp_ids)
            history = self._opportunity_history([o for o in opp_ids if o in owners])
            for raw in live:
                opp_id = str(raw["Id"])
                lead_id = owners.get(opp_id)
                if lead_id is None:
                    self.skipped_opportunities += 1
                    continue
                try:
                    page.stages.extend(self.normalise_opportunity(
                        raw, lead_id, history.get(opp_id, []), stage_meta))
                except MALFORMED as exc:  # a wrong type or missing key costs this record only
                    page.rejects.append(as_reject(exc, f"Opportunity:{opp_id}"))
            page.cursor = _batch_cursor(batch)
            yield page

    def _stage_metadata(self) -> dict[str, tuple[bool, bool]]:
        """Stage label -> (IsClosed, IsWon), from OpportunityStage."""
        try:
            rows = self._query_all("SELECT MasterLabel, ApiName, IsClosed, IsWon FROM OpportunityStage")
        except SalesforceApiError as exc:
            log.info("OpportunityStage not readable (%s): lost stages taken from IsClosed/IsWon "
                     "of the current stage only", exc.code)
            return {}
        meta: dict[str, tuple[bool, bool]] = {}
        for r in rows:
            for key in (r.get("MasterLabel"), r.get("ApiName")):
                if key:
                    meta[str(key)] = (bool(r.get("IsClosed")), bool(r.get("IsWon")))
        return meta

    def _converted_leads(self, opp_ids: list[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for chunk in _chunks(opp_ids):
            soql = ("SELECT Id, ConvertedOpportunityId FROM Lead WHERE ConvertedOpportunityId "
                    f"IN ({_quote_ids(chunk)})")
            for r in self._query_all(soql):
                out[str(r["ConvertedOpportunityId"])] = str(r["Id"])
        return out

    def _opportunity_history(self, opp_ids: list[str]) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for chunk in _chunks(opp_ids):
            soql = ("SELECT OpportunityId, StageName, Amount, CreatedDate FROM OpportunityHistory "
                    f"WHERE OpportunityId IN ({_quote_ids(chunk)}) ORDER BY CreatedDate ASC")
            for r in self._query_all(soql):
                out.setdefault(str(r["OpportunityId"]), []).append(r)
        return out

    def normalise_opportunity(self, raw: dict[str, Any], lead_id: str, history: list[dict],
                              stage_meta: dict[str, tuple[bool, bool]]) -> list[StageIn]:
        """An opportunity and its history rows -> the lead's deal stage facts (first entry of
        each stage wins). Pure; raises RecordRejected."""
        opp_id = str(raw["Id"])
        amount = parse_decimal(raw.get("Amount"))
        first: dict[str, tuple[datetime, Decimal | None]] = {}
        try:
            for h in history:
                when = parse_sf_datetime(h.get("CreatedDate"))
                stage = h.get("StageName")
                if when is not None and stage and stage not in first:
                    first[str(stage)] = (when, parse_decimal(h.get("Amount")))
            current = raw.get("StageName")
            if current and current not in first:
                created = parse_sf_datetime(raw.get("CreatedDate"))
                when = created if not first else parse_sf_datetime(raw.get("SystemModstamp"))
                if when is None:
                    raise RecordRejected(f"Opportunity:{opp_id}", "missing CreatedDate", raw)
                first[str(current)] = (when, amount)
        except ValueError as exc:
            raise RecordRejected(f"Opportunity:{opp_id}", f"unparsable date: {exc}", raw) from None
        out = []
        for stage, (when, stage_amount) in first.items():
            closed, won = stage_meta.get(stage, (False, False))
            if stage == raw.get("StageName") and not stage_meta:
                closed, won = bool(raw.get("IsClosed")), bool(raw.get("IsWon"))
            out.append(StageIn(lead_id, self.stage_field, stage, when, deal_id=opp_id,
                               amount=amount if stage == raw.get("StageName") else stage_amount,
                               is_lost=closed and not won))
        return out




def _public(raw: dict[str, Any]) -> dict[str, Any]:
    """A record minus clear PII, for rejected_record (scrub_payload masks the rest)."""
    return {k: v for k, v in raw.items() if k not in ("Email", "Phone", "MobilePhone", "Name",
                                                       "FirstName", "LastName", "attributes")}


def _batch_cursor(batch: list[dict]) -> Cursor | None:
    """The stream position after a batch ordered by (SystemModstamp, Id): its last row's."""
    if not batch:
        return None
    stamp = parse_sf_datetime(batch[-1].get("SystemModstamp"))
    return Cursor(stamp, str(batch[-1]["Id"])) if stamp is not None else None


SOURCE = SalesforceSource
