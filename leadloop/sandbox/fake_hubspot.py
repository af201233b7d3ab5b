"""A stateful fake of the HubSpot CRM API on 127.0.0.1, for tests, benchmarks and the demo.

It answers with HubSpot's request and response shapes (see shared/specs/crm_apis.md §1):

- `GET /crm/v3/objects/{contacts|deals}` (and `/crm/objects/<YYYY-MM>/...`): `limit` ≤ 100
  (≤ 50 with `propertiesWithHistory`), opaque `after`, `properties`, `associations`,
  `archived=true` (only archived records, with `archivedAt`).
- `POST .../{type}/search`: filterGroups (OR) of filters (AND) with EQ NEQ GT GTE LT LTE BETWEEN IN
  NOT_IN HAS_PROPERTY NOT_HAS_PROPERTY, only the first sort object honoured (string sorts are
  silently ignored, as HubSpot does), `limit` ≤ 200, numeric-offset `after`, `total`, and the
  10,000-result cap (paging past it is a 400 VALIDATION_ERROR). Archived records never match.
  Optional index lag: records modified in the last `index_lag_seconds` are not searchable yet.
- `POST .../{type}/batch/read` (≤ 100 inputs; 207 with OBJECT_NOT_FOUND errors for unknown ids).
- `GET /crm/v3/pipelines/deals` (stage `metadata` strings `isClosed`, `probability`).
- `POST /crm/v4/associations/{from}/{to}/batch/read` (≤ 1,000 inputs `{id, after?}`; also the date
  version): at most 500 associations per input per response; an input with more gets its own
  `paging.next.after` (opaque), which the client sends back as that input's `after`.
- `POST /oauth/v1/token` (refresh-token grant; access tokens expire after `token_ttl` seconds).

Every property value is a string (or null). Datetimes are ISO-8601 with milliseconds and `Z`;
search filters take epoch milliseconds (or ISO) for them.

Custom contact properties of the sandbox portal (the demo config maps to these names):

| property | holds |
|---|---|
| `ll_<micro>_date`: `ll_guide_download_date`, `ll_pricing_view_date`, `ll_webinar_signup_date`, \
  `ll_newsletter_signup_date`, `ll_careers_page_view_date` | when the micro-conversion happened |
| `ll_gbraid`, `ll_wbraid`, `ll_msclkid`, `ll_meta_lead_id` | click ids HubSpot has no slot for |
| `ll_consent_ad_user_data`, `ll_consent_ad_personalization` | "true" / "false" |
| `ll_utm_source`, `ll_utm_medium`, `ll_utm_campaign` | raw UTM values of the first visit |
| `ll_company_size`, `ll_job_level` | firmographics (with standard `industry`, `country`) |

Standard ones used: `hs_google_click_id`, `hs_facebook_click_id`, `hs_linkedin_click_id`,
`hs_analytics_source` (channel), `hs_analytics_source_data_1` (campaign), `hs_analytics_first_url`,
`lifecyclestage` with `hs_v2_date_entered_<value>`, deal `dealstage` with
`hs_v2_date_entered_<stage id>`, `hs_merged_object_ids` (";"-separated) on merge survivors.

Limits: a rolling window of `requests_per_window` per `window_seconds` (HubSpot: 100 or 190 per
10 s) with `X-HubSpot-RateLimit-*` headers and HubSpot's 429 body (`TEN_SECONDLY_ROLLING`);
search has its own per-second limit ("secondly" 429) and is exempt from the window; a daily
limit answers 429 `DAILY`. Rejected requests do not use up the budget.

Fault knobs: `error_rate` (share of random 5xx), and `inject(...)` counters for the next
requests: server errors, dropped connections, 429s with a short Retry-After, repeated pages
(a paged request answered with the previous page again), an exhausted daily quota.
"""

from __future__ import annotations

import base64
import bisect
import json
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from urllib.parse import parse_qs

from leadloop.sandbox.server import LocalServer, Reply, Request
from leadloop.sandbox.simulator import DEFAULT_PIPELINE, LIFECYCLE, MICRO_CONVERSIONS, Funnel, SimLead

VERSION = r"(?:v3|(?:\d{4}-\d{2}))"
CONTACT_TYPES = ("contacts", "0-1")
DEAL_TYPES = ("deals", "0-3")
SEARCH_CAP = 10_000
ASSOC_PAGE = 500  # associations per input per batch-read response
CONTACT_DEFAULTS = ("createdate", "email", "firstname", "hs_object_id", "lastmodifieddate", "lastname")
DEAL_DEFAULTS = ("amount", "closedate", "createdate", "dealname", "dealstage", "hs_lastmodifieddate",
                 "hs_object_id", "pipeline")
_TIME_PROPS = {"createdate", "lastmodifieddate", "hs_lastmodifieddate", "closedate"}
_MODIFIED_PROPS = ("lastmodifieddate", "hs_lastmodifieddate")


def iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def epoch_ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def micro_property(name: str) -> str:
    """The sandbox portal's contact property holding when micro-conversion `name` happened."""
    return f"ll_{name}_date"


def _contact_properties_of(funnel: Funnel, i: int) -> dict[str, str | None]:
    return contact_properties(funnel.lead(i))


def contact_properties(lead: SimLead) -> dict[str, str | None]:
    """The HubSpot property map of a simulated lead (all values strings)."""
    p: dict[str, str | None] = {
        "email": lead.email, "phone": lead.phone, "firstname": lead.firstname,
        "lastname": lead.lastname, "hs_object_id": lead.crm_id,
        "createdate": iso(lead.created_at), "lastmodifieddate": iso(lead.updated_at),
        "lifecyclestage": lead.lifecyclestage,
        "hs_analytics_source": lead.channel, "hs_analytics_source_data_1": lead.utm_campaign,
        "hs_analytics_first_url": lead.landing_page,
        "hs_google_click_id": lead.gclid, "hs_facebook_click_id": lead.fbclid,
        "hs_linkedin_click_id": lead.li_fat_id, "ll_gbraid": lead.gbraid, "ll_wbraid": lead.wbraid,
        "ll_msclkid": lead.msclkid, "ll_meta_lead_id": lead.meta_lead_id,
        "ll_consent_ad_user_data": str(lead.consent_ad_user_data).lower(),
        "ll_consent_ad_personalization": str(lead.consent_ad_personalization).lower(),
        "ll_utm_source": lead.utm_source, "ll_utm_medium": lead.utm_medium,
        "ll_utm_campaign": lead.utm_campaign, "country": lead.country, "industry": lead.industry,
        "ll_company_size": lead.company_size, "ll_job_level": lead.job_level,
    }
    for value, at in lead.lifecycle:
        p[f"hs_v2_date_entered_{value}"] = iso(at)
    for name, at in lead.micro_events:
        p[micro_property(name)] = iso(at)
    return p


@dataclass(slots=True)
class HsObject:
    """One CRM record. `props` is built from the funnel on first need (memory stays small)."""

    id: str
    created: datetime
    updated: datetime
    props: dict[str, str | None] | None = None
    source: Callable[[], dict[str, str | None]] | None = None
    archived_at: datetime | None = None
    assoc: set[str] = field(default_factory=set)

    def properties(self) -> dict[str, str | None]:
        if self.props is not None:
            return self.props
        assert self.source is not None
        return self.source()

    def own(self) -> dict[str, str | None]:
        """Materialise the properties (before a mutation)."""
        if self.props is None:
            self.props = dict(self.source()) if self.source else {}
            self.source = None
        return self.props


class FakeHubSpot:
    """The fake portal. Use as a context manager; `base_url` points a connector at it."""

    def __init__(
        self,
        funnel: Funnel | None = None,
        *,
        token: str = "pat-na1-sandbox-token",
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        requests_per_window: int | None = 100,
        window_seconds: float = 10.0,
        search_per_second: int | None = 5,
        daily_limit: int | None = 250_000,
        index_lag_seconds: float = 0.0,
        error_rate: float = 0.0,
        retry_after: float | None = 1.0,
        oauth_client: tuple[str, str, str] | None = None,
        token_ttl: float = 1800.0,
        seed: int = 0,
        latency: float = 0.0,
    ) -> None:
        self.server = LocalServer()
        self.latency = latency  # seconds added to each answer: a real API's round trip
        self.tokens = {token}
        self.now = now
        self.requests_per_window = requests_per_window
        self.window_seconds = window_seconds
        self.search_per_second = search_per_second
        self.daily_limit = daily_limit
        self.index_lag_seconds = index_lag_seconds
        self.error_rate = error_rate
        self.retry_after = retry_after
        self.oauth_client = oauth_client  # (client_id, client_secret, refresh_token)
        self.token_ttl = token_ttl
        self._oauth_tokens: dict[str, float] = {}  # access token -> monotonic expiry
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._window: deque[float] = deque()
        self._search_window: deque[float] = deque()
        self.daily_used = 0
        self.rate_limited = 0  # 429s answered (any policy)
        self.records_returned = 0
        self._faults: dict[str, int] = dict.fromkeys(
            ("server_errors", "dropped_connections", "rate_limited", "repeated_pages"), 0)
        self.daily_exhausted = False
        self._last_page: dict[str, Any] = {}
        self._version = 0
        # listings and search results, keyed by the query and the data's version
        self._cache: dict[tuple[Any, ...], list[HsObject]] = {}
        # (type, version) -> modified times (epoch ms) and the objects, both sorted by that time
        self._by_modified: dict[tuple[str, int], tuple[list[int], list[HsObject]]] = {}
        self.contacts: dict[str, HsObject] = {}
        self.deals: dict[str, HsObject] = {}
        self._next_contact = 1
        self._next_deal = 1
        if funnel is not None:
            self.load(funnel)
        self._routes()

    # -- data ----------------------------------------------------------------------------------

    def load(self, funnel: Funnel) -> None:
        """Serve the funnel's leads as contacts and their deals as deals (lazily built)."""
        with self._lock:
            for i in range(funnel.n):
                self._load_one(funnel, i)
            self._changed()

    def _load_one(self, funnel: Funnel, i: int) -> None:
        cols = funnel.cols
        cid = str(100_001 + i)
        created = funnel.time(cols["created"][i])
        updated = funnel.time(cols["updated"][i])
        obj = HsObject(cid, created, updated, source=partial(_contact_properties_of, funnel, i))
        self.contacts[cid] = obj
        self._next_contact = max(self._next_contact, int(cid) + 1)
        if cols["deal:0"][i] != -1:
            lead = funnel.lead(i)
            for k, deal in enumerate(lead.deals):
                last = deal.stages[-1][1]
                d = HsObject(deal.deal_id, deal.created_at, min(last + timedelta(minutes=5),
                             funnel.end), source=partial(self._deal_props_of, funnel, i, k))
                d.assoc.add(cid)
                obj.assoc.add(deal.deal_id)
                self.deals[deal.deal_id] = d
                self._next_deal = max(self._next_deal, int(deal.deal_id) + 1)

    def _deal_props_of(self, funnel: Funnel, i: int, k: int) -> dict[str, str | None]:
        lead = funnel.lead(i)
        deal = lead.deals[k]
        obj = self.deals[deal.deal_id]
        return self.deal_properties(deal.deal_id, deal.stage, deal.amount, deal.currency,
                                    deal.created_at, obj.updated, deal.stages,
                                    f"{lead.lastname} {lead.company_size} deal")

    @staticmethod
    def deal_properties(deal_id: str, stage: str, amount: float | None, currency: str,
                        created: datetime, updated: datetime,
                        history: Iterable[tuple[str, datetime]], name: str) -> dict[str, str | None]:
        st = DEFAULT_PIPELINE.stage(stage)
        p: dict[str, str | None] = {
            "hs_object_id": deal_id, "dealname": name, "pipeline": DEFAULT_PIPELINE.id,
            "dealstage": stage, "amount": None if amount is None else f"{amount:.2f}",
            "deal_currency_code": currency, "createdate": iso(created),
            "hs_lastmodifieddate": iso(updated), "hs_is_closed": str(st.is_closed).lower(),
            "hs_is_closed_won": str(st.is_won).lower(),
            "hs_deal_stage_probability": f"{st.probability:.1f}",
            "closedate": None,
        }
        for sid, at in history:
            p[f"hs_v2_date_entered_{sid}"] = iso(at)
            if DEFAULT_PIPELINE.stage(sid).is_closed:
                p["closedate"] = iso(at)
        return p

    def _changed(self) -> None:
        self._version += 1
        self._cache.clear()
        self._by_modified.clear()

    # -- mutations for tests ---------------------------------------------------------------------

    def add_contact(self, **props: str | None) -> str:
        """Create a contact now; returns its id."""
        with self._lock:
            now = self.now()
            cid = str(self._next_contact)
            self._next_contact += 1
            p: dict[str, str | None] = {"hs_object_id": cid, "createdate": iso(now),
                                        "lastmodifieddate": iso(now), "lifecyclestage": "lead",
                                        "hs_v2_date_entered_lead": iso(now)}
            p.update(props)
            self.contacts[cid] = HsObject(cid, now, now, props=p)
            self._changed()
            return cid

    def update_contact(self, cid: str, **props: str | None) -> None:
        """Set properties and bump `lastmodifieddate`."""
        with self._lock:
            obj = self.contacts[cid]
            obj.own().update(props)
            self._touch(obj, "lastmodifieddate")

    def set_lifecycle(self, cid: str, value: str) -> None:
        with self._lock:
            obj = self.contacts[cid]
            p = obj.own()
            p["lifecyclestage"] = value
            p[f"hs_v2_date_entered_{value}"] = iso(self.now())
            self._touch(obj, "lastmodifieddate")

    def add_deal(self, cid: str, stage: str = "appointmentscheduled", amount: float | None = 1000.0,
                 currency: str = "EUR") -> str:
        with self._lock:
            now = self.now()
            did = str(self._next_deal)
            self._next_deal += 1
            p = self.deal_properties(did, stage, amount, currency, now, now, [(stage, now)], "New deal")
            d = HsObject(did, now, now, props=p, assoc={cid})
            self.deals[did] = d
            self.contacts[cid].assoc.add(did)
            self._changed()
            return did

    def associate(self, did: str, cid: str) -> None:
        """Associate deal `did` with contact `cid` (both directions, as HubSpot does)."""
        with self._lock:
            self.deals[did].assoc.add(cid)
            self.contacts[cid].assoc.add(did)
            self._changed()

    def move_deal(self, did: str, stage: str) -> None:
        with self._lock:
            obj = self.deals[did]
            p = obj.own()
            st = DEFAULT_PIPELINE.stage(stage)
            now = self.now()
            p.update({"dealstage": stage, f"hs_v2_date_entered_{stage}": iso(now),
                      "hs_is_closed": str(st.is_closed).lower(),
                      "hs_is_closed_won": str(st.is_won).lower(),
                      "hs_deal_stage_probability": f"{st.probability:.1f}"})
            if st.is_closed:
                p["closedate"] = iso(now)
            self._touch(obj, "hs_lastmodifieddate")

    def archive(self, cid: str, object_type: str = "contacts") -> None:
        """Archive (delete) a record. Like HubSpot, this does NOT bump its modified date."""
        with self._lock:
            store = self.contacts if object_type == "contacts" else self.deals
            store[cid].archived_at = self.now()
            self._changed()

    def merge(self, survivor: str, absorbed: str) -> None:
        """Merge two contacts: the absorbed id disappears; the survivor lists it in
        `hs_merged_object_ids` and takes over its deals."""
        with self._lock:
            gone = self.contacts.pop(absorbed)
            keep = self.contacts[survivor]
            p = keep.own()
            ids = [x for x in (p.get("hs_merged_object_ids") or "").split(";") if x]
            ids += [absorbed] + [x for x in (gone.properties().get("hs_merged_object_ids") or ""
                                             ).split(";") if x]
            p["hs_merged_object_ids"] = ";".join(ids)
            for did in gone.assoc:
                keep.assoc.add(did)
                deal = self.deals.get(did)
                if deal:
                    deal.assoc.discard(absorbed)
                    deal.assoc.add(survivor)
            self._touch(keep, "lastmodifieddate")

    def _touch(self, obj: HsObject, prop: str) -> None:
        now = self.now()
        obj.updated = max(now, obj.updated + timedelta(milliseconds=1))
        obj.own()[prop] = iso(obj.updated)
        self._changed()

    def inject(self, *, server_errors: int = 0, dropped_connections: int = 0, rate_limited: int = 0,
               repeated_pages: int = 0, daily_exhausted: bool = False) -> None:
        """Misbehave on the next requests (each counter is used up), or exhaust the daily quota."""
        with self._lock:
            self._faults["server_errors"] += server_errors
            self._faults["dropped_connections"] += dropped_connections
            self._faults["rate_limited"] += rate_limited
            self._faults["repeated_pages"] += repeated_pages
            self.daily_exhausted = self.daily_exhausted or daily_exhausted

    # -- server --------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def received(self) -> list[Request]:
        return self.server.received

    def start(self) -> str:
        return self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> FakeHubSpot:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _routes(self) -> None:
        r = self.server.route
        objs = r"(?P<type>contacts|deals|0-1|0-3)"
        for prefix in (r"/crm/v3/objects", rf"/crm/objects/{VERSION}"):
            r("GET", rf"{prefix}/{objs}", self._guard(self._list))
            r("POST", rf"{prefix}/{objs}/search", self._guard(self._search, search=True))
            r("POST", rf"{prefix}/{objs}/batch/read", self._guard(self._batch_read))
            r("GET", rf"{prefix}/{objs}/(?P<id>\d+)", self._guard(self._read_one))
        r("GET", rf"/crm/(?:v3/pipelines|pipelines/{VERSION})/deals", self._guard(self._pipelines))
        for prefix in (r"/crm/v4/associations", rf"/crm/associations/{VERSION}"):
            r("POST", rf"{prefix}/(?P<from>contacts|deals|0-1|0-3)/(?P<to>contacts|deals|0-1|0-3)"
              r"/batch/read", self._guard(self._assoc))
        r("POST", r"/oauth/v1/token", self._token)

    # -- auth, limits, faults --------------------------------------------------------------------

    @staticmethod
    def _error(status: int, message: str, category: str, **extra: Any) -> Reply:
        return Reply(status, {"status": "error", "message": message,
                              "correlationId": str(uuid.uuid4()), "category": category, **extra})

    def _guard(self, handler: Callable[[Request], Reply], *, search: bool = False
               ) -> Callable[[Request], Reply]:
        def serve(req: Request) -> Reply:
            if self.latency:
                time.sleep(self.latency)  # outside the lock, as the network would be
            auth = req.header("authorization") or ""
            token = auth[7:] if auth.lower().startswith("bearer ") else ""
            with self._lock:
                if token in self._oauth_tokens and time.monotonic() > self._oauth_tokens[token]:
                    ago = int(time.monotonic() - self._oauth_tokens[token])
                    return self._error(401, f"The OAuth token used to make this call expired {ago} "
                                       "second(s) ago.", "EXPIRED_AUTHENTICATION")
                if token not in self.tokens and token not in self._oauth_tokens:
                    return self._error(
                        401, "Authentication credentials not found. This API supports OAuth 2.0 "
                        "authentication and you can find more details at "
                        "https://developers.hubspot.com/docs/methods/auth/oauth-overview",
                        "INVALID_AUTHENTICATION")
                limited = self._limit(search)
                if limited is not None:
                    return limited
                if self._faults["dropped_connections"]:
                    self._faults["dropped_connections"] -= 1
                    return Reply(drop_connection=True)
                if self._faults["server_errors"] or (self.error_rate and
                                                     self._rng.random() < self.error_rate):
                    self._faults["server_errors"] = max(0, self._faults["server_errors"] - 1)
                    return Reply(self._rng.choice((500, 502, 503)),
                                 {"status": "error", "message": "internal error",
                                  "correlationId": str(uuid.uuid4()), "category": "INTERNAL_ERROR"})
                reply = handler(req)
                reply.headers.update(self._limit_headers(search))
                return reply
        return serve

    def _limit(self, search: bool) -> Reply | None:
        now = time.monotonic()
        if self.daily_exhausted or (self.daily_limit is not None and self.daily_used >= self.daily_limit):
            self.rate_limited += 1
            midnight = (datetime.now(UTC) + timedelta(days=1)).replace(hour=0, minute=0, second=0,
                                                                        microsecond=0)
            wait = int((midnight - datetime.now(UTC)).total_seconds()) + 1
            reply = self._error(429, "You have reached your daily limit.", "RATE_LIMITS",
                                errorType="RATE_LIMIT", policyName="DAILY")
            reply.body.pop("category")
            reply.headers["Retry-After"] = str(wait)
            reply.headers.update(self._limit_headers(search))
            return reply
        if self._faults["rate_limited"]:
            self._faults["rate_limited"] -= 1
            return self._too_many("TEN_SECONDLY_ROLLING", "ten_secondly_rolling", retry_after=0.05)
        if search:
            if self.search_per_second is not None:
                w = self._search_window
                while w and w[0] <= now - 1.0:
                    w.popleft()
                if len(w) >= self.search_per_second:
                    return self._too_many("SECONDLY", "secondly")
                w.append(now)
        elif self.requests_per_window is not None:
            w = self._window
            while w and w[0] <= now - self.window_seconds:
                w.popleft()
            if len(w) >= self.requests_per_window:
                return self._too_many("TEN_SECONDLY_ROLLING", "ten_secondly_rolling")
            w.append(now)
        self.daily_used += 1
        return None

    def _too_many(self, policy: str, label: str, retry_after: float | None = None) -> Reply:
        self.rate_limited += 1
        body = {"status": "error", "message": f"You have reached your {label} limit.",
                "errorType": "RATE_LIMIT", "correlationId": str(uuid.uuid4()), "policyName": policy}
        headers = self._limit_headers(policy == "SECONDLY")
        wait = retry_after if retry_after is not None else self.retry_after
        if wait is not None:
            headers["Retry-After"] = f"{wait:g}"
        return Reply(429, body, headers)

    def _limit_headers(self, search: bool) -> dict[str, str]:
        h: dict[str, str] = {}
        if self.requests_per_window is not None and not search:
            h["X-HubSpot-RateLimit-Max"] = str(self.requests_per_window)
            h["X-HubSpot-RateLimit-Remaining"] = str(max(0, self.requests_per_window - len(self._window)))
            h["X-HubSpot-RateLimit-Interval-Milliseconds"] = str(int(self.window_seconds * 1000))
        if self.daily_limit is not None:
            h["X-HubSpot-RateLimit-Daily"] = str(self.daily_limit)
            h["X-HubSpot-RateLimit-Daily-Remaining"] = str(max(0, self.daily_limit - self.daily_used))
        return h

    def _token(self, req: Request) -> Reply:
        form = {k: v[0] for k, v in parse_qs(req.body.decode()).items()}
        if (self.oauth_client is None or form.get("grant_type") != "refresh_token"
                or (form.get("client_id"), form.get("client_secret"), form.get("refresh_token"))
                != self.oauth_client):
            return Reply(400, {"status": "BAD_REFRESH_TOKEN", "message": "missing or invalid refresh token",
                               "correlationId": str(uuid.uuid4())})
        token = f"oauth-{uuid.uuid4().hex}"
        with self._lock:
            self._oauth_tokens[token] = time.monotonic() + self.token_ttl
        return Reply(200, {"token_type": "bearer", "refresh_token": self.oauth_client[2],
                           "access_token": token, "expires_in": self.token_ttl})

    # -- reading -------------------------------------------------------------------------------

    def _store(self, type_: str) -> dict[str, HsObject]:
        return self.contacts if type_ in CONTACT_TYPES else self.deals

    def _render(self, obj: HsObject, type_: str, props: list[str] | None,
                history: list[str] | None = None, assoc: list[str] | None = None) -> dict[str, Any]:
        all_props = obj.properties()
        wanted = props or list(CONTACT_DEFAULTS if type_ in CONTACT_TYPES else DEAL_DEFAULTS)
        out: dict[str, Any] = {
            "id": obj.id,
            "properties": {k: all_props.get(k) for k in wanted},
            "createdAt": iso(obj.created), "updatedAt": iso(obj.updated),
            "archived": obj.archived_at is not None,
        }
        if obj.archived_at is not None:
            out["archivedAt"] = iso(obj.archived_at)
        if history:
            out["propertiesWithHistory"] = {k: self._history(all_props, k) for k in history}
        if assoc:
            kind = "contact_to_deal" if type_ in CONTACT_TYPES else "deal_to_contact"
            out["associations"] = {
                a: {"results": [{"id": x, "type": kind} for x in sorted(obj.assoc, key=int)]}
                for a in assoc if a in ("deals", "contacts")}
        self.records_returned += 1
        return out

    @staticmethod
    def _history(props: dict[str, str | None], prop: str) -> list[dict[str, str]]:
        """Newest first, from the `hs_v2_date_entered_*` times of the stage property."""
        if prop not in ("lifecyclestage", "dealstage"):
            value = props.get(prop)
            return [] if value is None else [{"value": value, "timestamp": props.get(
                "lastmodifieddate") or props.get("hs_lastmodifieddate") or "", "sourceType": "CRM_UI"}]
        entries = [(t, k.removeprefix("hs_v2_date_entered_")) for k, t in props.items()
                   if k.startswith("hs_v2_date_entered_") and t]
        return [{"value": v, "timestamp": t, "sourceType": "CRM_UI"}
                for t, v in sorted(entries, reverse=True)]

    @staticmethod
    def _csv(req: Request, name: str) -> list[str] | None:
        values = [x for v in req.query.get(name, []) for x in v.split(",") if x]
        return values or None

    def _list(self, req: Request) -> Reply:
        type_ = req.path_param("type")
        history = self._csv(req, "propertiesWithHistory")
        limit = int(req.arg("limit") or 10)
        max_limit = 50 if history else 100
        if not 1 <= limit <= max_limit:
            return self._error(400, f"limit must be between 1 and {max_limit}", "VALIDATION_ERROR")
        archived = (req.arg("archived") or "false").lower() == "true"
        with self._lock:
            key = ("list", type_, archived, self._version)
            objs = self._cache.get(key)
            if objs is None:
                objs = sorted((o for o in self._store(type_).values()
                               if (o.archived_at is not None) == archived), key=lambda o: int(o.id))
                self._cache[key] = objs
            start = 0
            after = req.arg("after")
            if after:
                try:
                    last = int(base64.urlsafe_b64decode(after.encode()).decode())
                except ValueError:
                    return self._error(400, f"invalid after token {after!r}", "VALIDATION_ERROR")
                start = _bisect_ids(objs, last)
            chunk = objs[start:start + limit]
            body: dict[str, Any] = {"results": [
                self._render(o, type_, self._csv(req, "properties"), history,
                             self._csv(req, "associations")) for o in chunk]}
            if start + limit < len(objs) and chunk:
                token = base64.urlsafe_b64encode(chunk[-1].id.encode()).decode()
                body["paging"] = {"next": {"after": token, "link": f"{req.path}?after={token}"}}
            return self._paged(f"list:{type_}:{archived}", bool(after), body)

    def _paged(self, key: str, continued: bool, body: dict[str, Any]) -> Reply:
        """Serve `body`, or (a repeated-page fault) the previous page of the same kind again."""
        previous = self._last_page.get(key)
        if continued and previous is not None and self._faults["repeated_pages"]:
            self._faults["repeated_pages"] -= 1
            return Reply(200, json.loads(previous))
        self._last_page[key] = json.dumps(body)
        return Reply(200, body)

    def _search(self, req: Request) -> Reply:
        type_ = req.path_param("type")
        body = req.json() or {}
        limit = int(body.get("limit") or 10)
        if not 1 <= limit <= 200:
            return self._error(400, "limit must be between 1 and 200", "VALIDATION_ERROR")
        after = int(body.get("after") or 0)
        if after >= SEARCH_CAP:
            return self._error(400, "There was a problem with the request.", "VALIDATION_ERROR",
                               errors=[{"message": f"paging past {SEARCH_CAP} results is not "
                                        "supported; narrow the query", "code": "INVALID_PAGING"}])
        groups = body.get("filterGroups") or []
        if len(groups) > 5 or any(len(g.get("filters") or []) > 6 for g in groups):
            return self._error(400, "too many filterGroups or filters (max 5 groups x 6 filters)",
                               "VALIDATION_ERROR")
        sorts = [s for s in body.get("sorts") or [] if isinstance(s, dict)][:1]
        with self._lock:
            cutoff = self.now() - timedelta(seconds=self.index_lag_seconds)
            key = ("search", type_, json.dumps(groups, sort_keys=True), json.dumps(sorts),
                   self._version, cutoff if self.index_lag_seconds else None)
            matches = self._cache.get(key)
            if matches is None:
                try:
                    matches = self._match(type_, groups, sorts, cutoff)
                except ValueError as exc:
                    return self._error(400, str(exc), "VALIDATION_ERROR")
                self._cache = {k: v for k, v in self._cache.items() if k[0] != "search"}
                self._cache[key] = matches
            chunk = matches[after:after + limit]
            out: dict[str, Any] = {"total": len(matches), "results": [
                self._render(o, type_, body.get("properties")) for o in chunk]}
            if after + limit < len(matches):
                out["paging"] = {"next": {"after": str(after + limit)}}
            return self._paged(f"search:{type_}", after > 0, out)

    def _value(self, obj: HsObject, prop: str) -> Any:
        if prop in ("lastmodifieddate", "hs_lastmodifieddate"):
            return epoch_ms(obj.updated)
        if prop == "createdate":
            return epoch_ms(obj.created)
        if prop == "hs_object_id":
            return int(obj.id)
        return obj.properties().get(prop)

    def _match(self, type_: str, groups: list[dict], sorts: list[dict], cutoff: datetime
               ) -> list[HsObject]:
        compiled = [[_compile(f) for f in g.get("filters") or []] for g in groups]
        live = [o for o in self._candidates(type_, groups)
                if o.archived_at is None and (not self.index_lag_seconds or o.updated <= cutoff)]
        if compiled:
            live = [o for o in live if any(all(f(self._value(o, f.prop)) for f in g) for g in compiled)]
        if sorts:
            prop = sorts[0].get("propertyName", "")
            desc = sorts[0].get("direction") == "DESCENDING"
            live.sort(key=lambda o: (_key(self._value(o, prop)), int(o.id)), reverse=desc)
        else:
            live.sort(key=lambda o: (o.created, int(o.id)))
        return live

    def _candidates(self, type_: str, groups: list[dict]) -> Iterable[HsObject]:
        """Every object, or, when each filter group bounds the modified date from below (an
        incremental sync's query), only those modified since the lowest bound: bisected in a list
        kept sorted by modified time. HubSpot's search is indexed too; a scan per query made the
        fake, not the connector, the cost of an incremental sync at a million records."""
        bounds = []
        for g in groups:
            lows = [_key(f.get("value"))[1] for f in g.get("filters") or []
                    if f.get("propertyName") in _MODIFIED_PROPS
                    and f.get("operator") in ("GT", "GTE", "EQ", "BETWEEN")
                    and _key(f.get("value"))[0] == 0]
            if not lows:
                return self._store(type_).values()
            bounds.append(max(lows))
        if not bounds:
            return self._store(type_).values()
        key = (type_, self._version)
        if key not in self._by_modified:
            objs = sorted(self._store(type_).values(), key=lambda o: o.updated)
            self._by_modified[key] = ([epoch_ms(o.updated) for o in objs], objs)
        stamps, objs = self._by_modified[key]
        return objs[bisect.bisect_left(stamps, min(bounds)):]

    def _batch_read(self, req: Request) -> Reply:
        type_ = req.path_param("type")
        body = req.json() or {}
        inputs = body.get("inputs") or []
        if len(inputs) > 100:
            return self._error(400, "batch read accepts at most 100 inputs", "VALIDATION_ERROR")
        started = iso(datetime.now(UTC))
        store = self._store(type_)
        results, missing = [], []
        with self._lock:
            for item in inputs:
                obj = store.get(str(item.get("id")))
                if obj is None or obj.archived_at is not None:
                    missing.append(str(item.get("id")))
                else:
                    results.append(self._render(obj, type_, body.get("properties"),
                                                body.get("propertiesWithHistory")))
        out: dict[str, Any] = {"status": "COMPLETE", "results": results, "startedAt": started,
                               "completedAt": iso(datetime.now(UTC))}
        if missing:
            out["numErrors"] = 1
            out["errors"] = [{"status": "error", "category": "OBJECT_NOT_FOUND",
                              "message": "Could not get some records.", "context": {"ids": missing}}]
            return Reply(207, out)
        return Reply(200, out)

    def _read_one(self, req: Request) -> Reply:
        type_ = req.path_param("type")
        with self._lock:
            obj = self._store(type_).get(req.path_param("id"))
            if obj is None or obj.archived_at is not None:
                return self._error(404, "Object not found", "OBJECT_NOT_FOUND")
            return Reply(200, self._render(obj, type_, self._csv(req, "properties"),
                                           self._csv(req, "propertiesWithHistory"),
                                           self._csv(req, "associations")))

    def _pipelines(self, req: Request) -> Reply:
        stamp = "2024-01-01T00:00:00.000Z"
        return Reply(200, {"results": [{
            "id": DEFAULT_PIPELINE.id, "label": DEFAULT_PIPELINE.label, "displayOrder": 0,
            "archived": False, "createdAt": stamp, "updatedAt": stamp,
            "stages": [{"id": s.id, "label": s.label, "displayOrder": s.display_order,
                        "archived": False, "createdAt": stamp, "updatedAt": stamp,
                        "metadata": {"isClosed": str(s.is_closed).lower(),
                                     "probability": f"{s.probability:.1f}"},
                        "writePermissions": "CRM_PERMISSIONS_ENFORCEMENT"}
                       for s in DEFAULT_PIPELINE.stages]}]})

    def _assoc(self, req: Request) -> Reply:
        from_type, to_type = req.path_param("from"), req.path_param("to")
        inputs = (req.json() or {}).get("inputs") or []
        if len(inputs) > 1000:
            return self._error(400, "batch read accepts at most 1000 inputs", "VALIDATION_ERROR")
        type_id = 4 if from_type in CONTACT_TYPES else 3
        store = self._store(from_type)
        target = self._store(to_type)
        results, missing = [], []
        with self._lock:
            for item in inputs:
                obj = store.get(str(item.get("id")))
                if obj is None:
                    missing.append(str(item.get("id")))
                    continue
                to = sorted((x for x in obj.assoc if x in target and target[x].archived_at is None),
                            key=int)
                after = item.get("after")
                if after:
                    try:
                        last = int(base64.urlsafe_b64decode(str(after).encode()).decode())
                    except ValueError:
                        return self._error(400, f"invalid after token {after!r}", "VALIDATION_ERROR")
                    to = [x for x in to if int(x) > last]
                page, more = to[:ASSOC_PAGE], len(to) > ASSOC_PAGE
                if page:
                    result: dict[str, Any] = {"from": {"id": obj.id}, "to": [
                        {"toObjectId": int(x), "associationTypes": [
                            {"category": "HUBSPOT_DEFINED", "typeId": type_id, "label": None}]}
                        for x in page]}
                    if more:  # `paging` only when there is a next page, as HubSpot documents
                        token = base64.urlsafe_b64encode(page[-1].encode()).decode()
                        result["paging"] = {"next": {"after": token}}
                    results.append(result)
        out: dict[str, Any] = {"status": "COMPLETE", "results": results,
                               "startedAt": iso(datetime.now(UTC)), "completedAt": iso(datetime.now(UTC))}
        if missing:
            out["numErrors"] = 1
            out["errors"] = [{"status": "error", "category": "OBJECT_NOT_FOUND",
                              "message": "No associations found", "context": {"fromObjectId": missing}}]
            return Reply(207, out)
        return Reply(200, out)


def _bisect_ids(objs: list[HsObject], last: int) -> int:
    lo, hi = 0, len(objs)
    while lo < hi:
        mid = (lo + hi) // 2
        if int(objs[mid].id) <= last:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _key(value: Any) -> tuple[int, Any]:
    """Sort/compare key: numbers (and datetimes as epoch ms) before strings; None last."""
    if value is None:
        return (2, "")
    if isinstance(value, int | float):
        return (0, float(value))
    s = str(value)
    try:
        return (0, float(s))
    except ValueError:
        pass
    try:
        return (0, float(epoch_ms(datetime.fromisoformat(s.replace("Z", "+00:00")))))
    except ValueError:
        return (1, s.lower())


class _Filter:
    def __init__(self, prop: str, test: Callable[[Any], bool]) -> None:
        self.prop = prop
        self._test = test

    def __call__(self, value: Any) -> bool:
        return self._test(value)


def _compile(f: dict[str, Any]) -> _Filter:
    prop, op = f.get("propertyName"), f.get("operator", "EQ")
    if not prop:
        raise ValueError("every filter needs a propertyName")
    v = _key(f.get("value"))
    if op == "EQ":
        return _Filter(prop, lambda x: x is not None and _key(x) == v)
    if op == "NEQ":
        return _Filter(prop, lambda x: x is None or _key(x) != v)
    if op in ("GT", "GTE", "LT", "LTE"):
        cmp = {"GT": lambda a: a > v, "GTE": lambda a: a >= v, "LT": lambda a: a < v,
               "LTE": lambda a: a <= v}[op]
        return _Filter(prop, lambda x: x is not None and _key(x)[0] == v[0] and cmp(_key(x)))
    if op == "BETWEEN":
        hi = _key(f.get("highValue"))
        return _Filter(prop, lambda x: x is not None and v <= _key(x) <= hi)
    if op in ("IN", "NOT_IN"):
        values = {_key(x) for x in f.get("values") or []}
        if op == "IN":
            return _Filter(prop, lambda x: x is not None and _key(x) in values)
        return _Filter(prop, lambda x: x is None or _key(x) not in values)
    if op == "HAS_PROPERTY":
        return _Filter(prop, lambda x: x not in (None, ""))
    if op == "NOT_HAS_PROPERTY":
        return _Filter(prop, lambda x: x in (None, ""))
    raise ValueError(f"unsupported operator {op!r}")


__all__ = ["LIFECYCLE", "MICRO_CONVERSIONS", "FakeHubSpot", "contact_properties", "micro_property"]
