"""HubSpot CRM connector: contacts, deals, deal pipelines, contact↔deal associations.

Streams, in order:

- `contacts`: the search API, filtered `lastmodifieddate GTE <since>` and sorted by it ascending
  (ONE sort object; `hs_lastmodifieddate` would silently misbehave on contacts), 200 per page.
  HubSpot refuses to page past 10,000 results of one query, so before reaching the cap the
  connector starts a FRESH query from the last seen modified time; if more than 10,000 records
  share that one timestamp it walks them by `hs_object_id` instead. The first run (no cursor)
  backfills everything the same way. Each contact gives a `LeadIn` (attribution from
  `[crm.properties]`, survivors' `hs_merged_object_ids` as `merged_crm_ids`), its lifecycle stage
  times (`hs_v2_date_entered_<value>` → StageIn field "lifecyclestage") and micro-conversions
  (`[[micro_conversions]]` with `property`: a date → an event then; another truthy value → an
  event at the contact's creation).
- `deals`: the same search on `hs_lastmodifieddate`. Stage ids come from `GET pipelines/deals`
  (metadata strings `isClosed`/`probability`: closed at 0.0 = lost), stage times from
  `hs_v2_date_entered_<stage id>`; each deal's stages are attributed to its associated contacts
  (v4 associations batch read, ≤ 1,000 ids, following each deal's own `paging.next.after` past
  500 contacts). Contacts the store does not hold yet (the engine passes the ids it holds)
  are batch-read into the same page, so no stage is rejected for a missing lead.
- `contacts_archived`: archived contacts never appear in search and do not bump their modified
  date, so the list endpoint with `archived=true` is read in full each run → `deleted_crm_ids`.
- `deals_archived`: the same for deals → `deleted_deal_ids`; the engine drops their stages, so
  their conversions are withdrawn (unsent) or retracted (sent).

Limits: a client-side token bucket keeps requests under `crm.requests_per_10s` (default 100, the
Free/Starter plan) and search under 5/s, so a sync runs near the allowed rate without drawing
429s. 429/5xx/dropped connections are retried by the shared session (honouring Retry-After); a
DAILY 429 stops the sync with `QuotaExhaustedError`; 401 names the token's environment variable.
A page the server repeats (same cursor back) is detected and read again, never yielded twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import requests

from leadloop.context import Context
from leadloop.crm.base import (
    ATTRIBUTION_FIELDS,
    MALFORMED,
    Cursor,
    EventIn,
    LeadIn,
    Page,
    StageIn,
    StoredIds,
    as_reject,
    no_stored_ids,
    record_id,
    record_key,
)
from leadloop.crm.rest import (
    MAX_REPEATS,
    Auth,
    OAuthAuth,
    RestApi,
    TokenAuth,
    follow_pages,
    json_body,
)
from leadloop.errors import FatalSourceError, QuotaExhaustedError, RecordRejected, RetriableSourceError
from leadloop.http import RateLimiter, retry_after_seconds
from leadloop.oauth import OAuthTokenProvider

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.hubapi.com"
SEARCH_PAGE = 200
LIST_PAGE = 100
BATCH_READ_MAX = 100
ASSOC_BATCH_MAX = 1000
SEARCH_CAP = 10_000
LIFECYCLE_VALUES = ("subscriber", "lead", "marketingqualifiedlead", "salesqualifiedlead",
                    "opportunity", "customer", "evangelist", "other")
_TRUE = {"true", "yes", "1", "y", "on"}
_FALSE = {"false", "no", "0", "n", "off", ""}


@dataclass(frozen=True)
class DealStage:
    id: str
    label: str
    is_closed: bool
    probability: float | None

    @property
    def is_lost(self) -> bool:
        return self.is_closed and self.probability == 0.0

    @property
    def is_won(self) -> bool:
        return self.is_closed and self.probability == 1.0


def parse_time(value: Any) -> datetime | None:
    """HubSpot times: ISO-8601 (with Z), a date, or epoch milliseconds. None when empty."""
    if value is None or value == "":
        return None
    return parse_given_time(value)


def parse_given_time(value: Any) -> datetime:
    """A HubSpot time that is there (see `parse_time`); ValueError when it is not a time."""
    s = str(value).strip()
    if s.isdigit():
        return datetime.fromtimestamp(int(s) / 1000, UTC)
    dt = datetime.fromisoformat(s)  # Python 3.11 reads the trailing Z
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _ms(t: datetime) -> str:
    return str(int(t.timestamp() * 1000))


def _bool(value: Any) -> bool | None:
    if value is None:
        return None
    s = str(value).strip().lower()
    return True if s in _TRUE else False if s in _FALSE else None


def _paged(fetch: Any, what: str) -> Iterator[tuple[dict[str, Any], str | None]]:
    """HubSpot's paging: `paging.next.after`, a page known again by its records' ids."""
    return follow_pages(fetch, lambda data: (data.get("paging") or {}).get("next", {}).get("after"),
                        vendor="HubSpot", what=what,
                        same_records=lambda data: [r["id"] for r in data.get("results", [])])


class HubSpotApi(RestApi):
    """HubSpot's REST API: a private-app token or an OAuth refresh token; a 429 of the DAILY
    policy is the quota."""

    vendor = "HubSpot"
    auth_hint = ("check that the token is valid and has the crm.objects.contacts.read and "
                 "crm.objects.deals.read scopes")
    ok_statuses = frozenset({200, 207})

    def __init__(self, ctx: Context, limiter: RateLimiter) -> None:
        crm = ctx.settings.crm
        self.ctx = ctx
        timeout = (min(10.0, crm.timeout_seconds), crm.timeout_seconds)
        super().__init__(ctx.http(timeout=timeout), crm.base_url or DEFAULT_BASE_URL,
                         self._credentials, limiter)

    def _credentials(self) -> Auth:
        s, crm = self.ctx.settings, self.ctx.settings.crm
        if crm.auth_flow != "refresh_token":
            return TokenAuth(s, "crm.token_env", crm.token_env)
        provider = OAuthTokenProvider(
            self.session, crm.token_url or f"{self.base_url}/oauth/v1/token",
            s.secret("crm.client_id_env", crm.client_id_env).get_secret_value(),
            s.secret("crm.client_secret_env", crm.client_secret_env).get_secret_value(),
            s.secret("crm.refresh_token_env", crm.refresh_token_env).get_secret_value(),
        )
        return OAuthAuth(provider, f"the OAuth app in {crm.client_id_env}/{crm.refresh_token_env}")

    def error_code(self, response: requests.Response) -> str:
        body = json_body(response)
        return str(body.get("category") or "") if isinstance(body, dict) else ""

    def quota_error(self, response: requests.Response) -> QuotaExhaustedError | None:
        body = json_body(response)
        if response.status_code != 429 or not (isinstance(body, dict)
                                                and body.get("policyName") == "DAILY"):
            return None
        wait = retry_after_seconds(response)
        when = (f"at {(self.ctx.now() + timedelta(seconds=wait)).isoformat(timespec='minutes')}"
                if wait else "at midnight in the HubSpot account's time zone")
        return QuotaExhaustedError(
            f"HubSpot daily API limit reached (X-HubSpot-RateLimit-Daily="
            f"{response.headers.get('X-HubSpot-RateLimit-Daily', '?')}); it resets {when}",
            hint="the next sync resumes from the stored cursor")


class HubSpotSource:
    """`CrmSource` for HubSpot (see the module doc)."""

    def __init__(self, ctx: Context, *, rate_window_seconds: float = 10.0,
                 search_per_second: float = 5.0) -> None:
        self.ctx = ctx
        crm = ctx.settings.crm
        self.crm = crm
        self.name = crm.source_name
        self.version = crm.api_version or "v3"
        allowed = crm.requests_per_10s or 100.0
        # burst + rate * window must stay under the plan's window limit: 95 % of it, burst 2 %
        limiter = RateLimiter(0.95 * allowed, rate_window_seconds, burst=max(1.0, 0.02 * allowed))
        self.search_limiter = RateLimiter(0.95 * search_per_second, 1.0, burst=1.0)
        self.api = HubSpotApi(ctx, limiter)
        self._stages: dict[str, DealStage] | None = None
        self._stored_ids: StoredIds = no_stored_ids  # which contacts the store holds (the engine's)
        self._stored: set[str] = set()  # contacts this sync's deal pages carry: stored with them

    # -- streams -------------------------------------------------------------------------------

    needs_stored_ids = ("deals",)  # a deal's contacts not yet stored are read with its page

    def streams(self) -> Sequence[str]:
        out: list[str] = [o for o in ("contacts", "deals") if o in self.crm.objects]
        if "contacts" in out:
            out.append("contacts_archived")
        if "deals" in out:
            out.append("deals_archived")
        return out

    def fetch(self, stream: str, since: Cursor | None, *, started_at: datetime,
              stored_ids: StoredIds = no_stored_ids) -> Iterator[Page]:
        if stream == "contacts":
            yield from self._search_pages("contacts", "lastmodifieddate", since, self.contact_page)
        elif stream == "deals":
            self._stored_ids, self._stored = stored_ids, set()
            yield from self._search_pages("deals", "hs_lastmodifieddate", since, self._deal_page)
        elif stream == "contacts_archived":
            yield from self._archived_pages()
        elif stream == "deals_archived":
            yield from self._archived_deal_pages()
        else:
            raise FatalSourceError(f"HubSpot has no stream {stream!r} (config key crm.objects)")

    # -- HTTP ----------------------------------------------------------------------------------

    @property
    def requests(self) -> int:
        return self.api.requests

    def _path(self, kind: str, rest: str) -> str:
        """`kind` is objects | pipelines | associations; handles v3/v4 vs date versions."""
        if self.version.startswith("v"):
            if kind == "associations":
                return f"/crm/v4/associations/{rest}"
            return f"/crm/{self.version}/{kind}/{rest}"
        return f"/crm/{kind}/{self.version}/{rest}"

    def _call(self, method: str, path: str, *, params: dict | None = None, body: dict | None = None,
              search: bool = False) -> dict[str, Any]:
        return self.api.request(method, path, params=params, body=body,
                                limiter=self.search_limiter if search else None)

    # -- pipelines and associations ------------------------------------------------------------

    def deal_stages(self) -> dict[str, DealStage]:
        """Every deal stage of every pipeline, by stage id (metadata strings parsed)."""
        if self._stages is None:
            data = self._call("GET", self._path("pipelines", "deals"))
            stages: dict[str, DealStage] = {}
            for pipeline in data.get("results", []):
                for s in pipeline.get("stages", []):
                    meta = s.get("metadata") or {}
                    try:
                        prob = float(meta["probability"]) if meta.get("probability") else None
                    except ValueError:
                        prob = None
                    stages[str(s["id"])] = DealStage(str(s["id"]), s.get("label", ""),
                                                     _bool(meta.get("isClosed")) is True, prob)
            self._stages = stages
        return self._stages

    def associated(self, from_type: str, to_type: str, ids: Sequence[str]) -> dict[str, list[str]]:
        """Every `to_type` id associated with each of `ids` (v4 batch read, ≤ 1,000 inputs).

        HubSpot returns at most 500 associations per input per response; an input with more gets
        its own `paging.next.after`, sent back next to its id. Follow-ups are batched like first
        reads. Ids come back once each even if the server repeats a page."""
        path = self._path("associations", f"{from_type}/{to_type}/batch/read")
        out: dict[str, dict[str, None]] = {}  # insertion-ordered sets
        pending: list[dict[str, str]] = [{"id": i} for i in ids]
        repeats = 0
        while pending:
            chunk, pending = pending[:ASSOC_BATCH_MAX], pending[ASSOC_BATCH_MAX:]
            sent_after = {item["id"]: item.get("after") for item in chunk}
            data = self._call("POST", path, body={"inputs": chunk})
            for r in data.get("results", []):
                fid = str(r["from"]["id"])
                out.setdefault(fid, {}).update(dict.fromkeys(str(t["toObjectId"]) for t in r.get("to", [])))
                nxt = ((r.get("paging") or {}).get("next") or {}).get("after")
                if nxt and nxt == sent_after.get(fid):
                    repeats += 1
                    if repeats > MAX_REPEATS:
                        raise RetriableSourceError(
                            f"HubSpot kept repeating the {from_type}→{to_type} associations of {fid}")
                    log.warning("HubSpot repeated an associations page of %s %s", from_type, fid)
                if nxt:
                    pending.append({"id": fid, "after": nxt})
        return {fid: list(to) for fid, to in out.items()}

    # -- properties ----------------------------------------------------------------------------

    def _micro(self) -> list[tuple[str, str]]:
        return [(m.name, m.property) for m in self.ctx.settings.micro_conversions if m.property]

    def contact_properties(self) -> list[str]:
        p = self.crm.properties
        names = {getattr(p, f) for f in type(p).model_fields} - {None}
        stage_field = self.crm.lead_stage_property
        values = set(LIFECYCLE_VALUES) | {v for s in self.ctx.settings.stages
                                          if (s.field or stage_field) == stage_field for v in s.crm_values}
        names |= {"createdate", "lastmodifieddate", "hs_object_id", "hs_merged_object_ids", stage_field}
        names |= {f"hs_v2_date_entered_{v}" for v in values}
        names |= {prop for _, prop in self._micro()} | set(self.crm.extra_properties)
        return sorted(n for n in names if n)

    def deal_properties(self) -> list[str]:
        names = {"dealname", "amount", "deal_currency_code", "pipeline", self.crm.deal_stage_property,
                 "createdate", "hs_lastmodifieddate", "hs_object_id"}
        names |= {f"hs_v2_date_entered_{sid}" for sid in self.deal_stages()}
        return sorted(names)

    # -- search paging (with the 10k cap) ------------------------------------------------------

    def _search_pages(self, object_type: str, modified: str, since: Cursor | None, convert: Any
                      ) -> Iterator[Page]:
        properties = self.contact_properties() if object_type == "contacts" else self.deal_properties()
        floor = since.updated_at if since else None
        strict = False  # True: modified > floor (after an id walk finished that timestamp)
        total: int | None = None
        while True:
            filters = []
            if floor is not None:
                filters.append({"propertyName": modified, "operator": "GT" if strict else "GTE",
                                "value": _ms(floor)})
            request = {"filterGroups": [{"filters": filters}] if filters else [],
                       "sorts": [{"propertyName": modified, "direction": "ASCENDING"}],
                       "properties": properties, "limit": SEARCH_PAGE}
            last: tuple[datetime, str] | None = None
            first: datetime | None = None
            seen, query_total = 0, 0
            for results, query_total in self._search_query(object_type, request):
                if total is None:
                    total = query_total
                seen += len(results)
                page = convert(results)
                page.total = total
                yield page
                for r in results:
                    t = parse_time(r["properties"].get(modified)) or parse_time(r.get("updatedAt"))
                    if t is not None and (last is None or (t, int(r["id"])) > (last[0], int(last[1]))):
                        last = (t, r["id"])
                    if t is not None and (first is None or t < first):
                        first = t
            if seen >= query_total or last is None:
                return  # the query ended below the cap: everything was read
            if last[0] == first:
                # > 10k records share one timestamp: walk them by id, then go on strictly after it
                yield from self._id_walk(object_type, modified, last[0], properties, convert, total)
                floor, strict = last[0], True
            else:
                floor, strict = last[0], False
            log.info("HubSpot %s: 10k search cap reached; fresh query from %s", object_type,
                     floor.isoformat())

    def _id_walk(self, object_type: str, modified: str, at: datetime, properties: list[str],
                 convert: Any, total: int | None) -> Iterator[Page]:
        after_id = 0
        while True:
            request = {"filterGroups": [{"filters": [
                {"propertyName": modified, "operator": "EQ", "value": _ms(at)},
                {"propertyName": "hs_object_id", "operator": "GT", "value": str(after_id)}]}],
                "sorts": [{"propertyName": "hs_object_id", "direction": "ASCENDING"}],
                "properties": properties, "limit": SEARCH_PAGE}
            seen, query_total = 0, 0
            for results, n in self._search_query(object_type, request):
                seen, query_total = seen + len(results), n
                page = convert(results)
                page.total = total
                yield page
                after_id = max([after_id, *(int(r["id"]) for r in results)])
            if seen >= query_total:
                return

    def _search_query(self, object_type: str, request: dict[str, Any]
                      ) -> Iterator[tuple[list[dict], int]]:
        """One query's pages, stopping before the 10k cap; repeated pages are re-read."""
        path = self._path("objects", f"{object_type}/search")

        def fetch(after: str | None) -> dict[str, Any]:
            body = dict(request, after=after) if after else request
            return self._call("POST", path, body=body, search=True)

        for data, nxt in _paged(fetch, "search"):
            yield data.get("results", []), int(data.get("total") or 0)
            if nxt and int(nxt) + SEARCH_PAGE > SEARCH_CAP:
                return

    def _list_pages(self, object_type: str, params: dict[str, Any]) -> Iterator[list[dict]]:
        path = self._path("objects", object_type)

        def fetch(after: str | None) -> dict[str, Any]:
            return self._call("GET", path, params={**params, **({"after": after} if after else {})})

        for data, _ in _paged(fetch, "list"):
            yield data.get("results", [])

    def _archived_pages(self) -> Iterator[Page]:
        params = {"archived": "true", "limit": LIST_PAGE, "properties": "hs_object_id"}
        for results in self._list_pages("contacts", params):
            yield Page(deleted_crm_ids=[str(r["id"]) for r in results])

    def _archived_deal_pages(self) -> Iterator[Page]:
        params = {"archived": "true", "limit": LIST_PAGE, "properties": "hs_object_id"}
        for results in self._list_pages("deals", params):
            yield Page(deleted_deal_ids=[str(r["id"]) for r in results])

    # -- conversion ----------------------------------------------------------------------------

    def contact_page(self, results: Iterable[dict]) -> Page:
        """Search or batch-read results -> a page of leads, stage times and micro-conversions;
        a malformed record costs only itself (kept as a reject). Pure."""
        page = Page()
        for r in results:
            try:
                self._add_contact(page, r)
            except MALFORMED as exc:  # a wrong type or missing key costs this record only
                page.rejects.append(as_reject(exc, record_id(r)))
        if page.leads:
            top = max(page.leads, key=lambda lead: (
                lead.updated_at, int(lead.crm_id) if lead.crm_id.isdigit() else -1))
            page.cursor = Cursor(top.updated_at or top.created_at, top.crm_id)
        return page

    def _add_contact(self, page: Page, r: dict[str, Any]) -> None:
        props: dict[str, Any] = r.get("properties") or {}
        cid = record_key(r, "id")
        if cid is None:
            page.rejects.append(RecordRejected("contact:?", f"record has no usable id: "
                                               f"{str(r.get('id'))[:40]!r}"))
            return
        p = self.crm.properties
        times: dict[str, datetime | None] = {}
        for key, fallback in ((p.created_at or "createdate", "createdAt"),
                              ("lastmodifieddate", "updatedAt")):
            try:
                times[key] = parse_time(props.get(key)) or parse_time(r.get(fallback))
            except ValueError:
                page.rejects.append(RecordRejected(
                    cid, f"contact property {key} is not a date: {str(props.get(key))[:40]!r}",
                    {key: props.get(key)}))
                return
        created, updated = times[p.created_at or "createdate"], times["lastmodifieddate"]
        if created is None:
            page.rejects.append(RecordRejected(cid, "contact has no createdate"))
            return
        lead = LeadIn(crm_id=cid, created_at=created, updated_at=updated or created)
        lead.email = props.get(p.email) if p.email else None
        lead.phone = props.get(p.phone) if p.phone else None
        for name in ATTRIBUTION_FIELDS:
            prop = getattr(p, name, None)
            value = props.get(prop) if prop else None
            setattr(lead, name, value if value not in ("",) else None)
        lead.consent_ad_user_data = _bool(props.get(p.consent_ad_user_data)) if p.consent_ad_user_data \
            else None
        lead.consent_ad_personalization = (_bool(props.get(p.consent_ad_personalization))
                                           if p.consent_ad_personalization else None)
        stage_field = self.crm.lead_stage_property
        lead.current_stage = props.get(stage_field)
        lead.attributes = {k: props.get(k) for k in self.crm.extra_properties if props.get(k) is not None}
        lead.merged_crm_ids = [x.strip() for x in (props.get("hs_merged_object_ids") or "").split(";")
                               if x.strip() and x.strip() != cid]
        page.leads.append(lead)
        for key, value in props.items():
            if key.startswith("hs_v2_date_entered_") and value:
                stage = key.removeprefix("hs_v2_date_entered_")
                try:
                    at = parse_given_time(value)
                except ValueError:
                    page.rejects.append(RecordRejected(cid, f"unparsable {key}: {value!r}"))
                    continue
                page.stages.append(StageIn(cid, stage_field, stage, at))
        for name, prop in self._micro():
            value = props.get(prop)
            if value in (None, "") or _bool(value) is False:
                continue
            try:
                at = parse_given_time(value) if _bool(value) is None else created
            except ValueError:
                at = created  # a truthy non-date value: it happened, time unknown
            page.events.append(EventIn(cid, name, at))

    def _deal_page(self, results: Sequence[dict]) -> Page:
        page = Page()
        usable = [r for r in results if isinstance(r, dict) and record_key(r, "id")]
        page.rejects += [RecordRejected(f"deal:{record_id(r)}", "deal record has no usable id")
                         for r in results if not (isinstance(r, dict) and record_key(r, "id"))]
        results = usable
        stages = self.deal_stages()
        stage_prop = self.crm.deal_stage_property
        contacts = self.associated("deals", "contacts", [str(r["id"]) for r in results])
        needed = sorted({c for ids in contacts.values() for c in ids}, key=int)
        unread = [c for c in needed if c not in self._stored]
        stored = self._stored_ids(unread) if unread else frozenset()
        missing = [c for c in unread if c not in stored]
        for lo in range(0, len(missing), BATCH_READ_MAX):
            data = self._call("POST", self._path("objects", "contacts/batch/read"), body={
                "inputs": [{"id": c} for c in missing[lo:lo + BATCH_READ_MAX]],
                "properties": self.contact_properties()})
            for r in data.get("results", []):
                self._add_contact(page, r)
        self._stored |= {lead.crm_id for lead in page.leads}  # stored with this page
        latest: tuple[datetime, int] | None = None
        for r in results:
            did = str(r["id"])
            props = r.get("properties") or {}
            try:
                updated = parse_time(props.get("hs_lastmodifieddate")) or parse_time(r.get("updatedAt"))
                amount = Decimal(props["amount"]) if props.get("amount") not in (None, "") else None
            except (ValueError, InvalidOperation) as exc:
                page.rejects.append(RecordRejected(did, f"deal has an unparsable field: {exc}"))
                continue
            if updated is not None and (latest is None or (updated, int(did)) > latest):
                latest = (updated, int(did))
            owners = contacts.get(did, [])
            if not owners:
                page.rejects.append(RecordRejected(did, "deal has no associated contact",
                                                   {"dealstage": props.get(stage_prop)}))
                continue
            currency = props.get("deal_currency_code") or None
            for key, value in props.items():
                if not (key.startswith("hs_v2_date_entered_") and value):
                    continue
                sid = key.removeprefix("hs_v2_date_entered_")
                try:
                    at = parse_given_time(value)
                except ValueError:
                    page.rejects.append(RecordRejected(did, f"unparsable {key}: {value!r}"))
                    continue
                stage = stages.get(sid)
                for cid in owners:
                    page.stages.append(StageIn(cid, stage_prop, sid, at, did, amount, currency,
                                               bool(stage and stage.is_lost)))
        if latest is not None:
            page.cursor = Cursor(latest[0], str(latest[1]))
        return page


SOURCE = HubSpotSource
