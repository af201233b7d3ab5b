"""Pipedrive connector: API v2 only (the v1 list endpoints are out of support since 2026-08-01).

- Streams `persons` (the leads), then `deals` and `deals_archived` (archived deals left the
  normal list on 2025-07-15), each read with cursor paging (`limit` ≤ 500,
  `additional_data.next_cursor`), `updated_since` and `sort_by=update_time&sort_direction=asc`.
- Auth: the API token in the `x-api-token` header (never in the URL).
- Stage facts per deal, attributed to its person: v2 has no stage history (only
  `stage_change_time`, the last change), so a deal yields its pipeline's first stage at
  `add_time` (deals enter a pipeline at its first stage), its current stage at
  `stage_change_time` (or `add_time`), and won/lost at `won_time`/`lost_time`. Earlier
  intermediate stages are seen when a sync observes them; no v1 flow endpoint is used.
- Rate limits: a client-side token bucket sized from `[crm] requests_per_10s` (burst windows
  are 2 s), slowed further by `x-ratelimit-remaining`/`x-ratelimit-reset`; a 429 with a short
  wait is retried, a 429 for the daily token budget stops the sync (`QuotaExhaustedError`)
  with the time it resets.
- Person custom fields (40-character hash keys) are mapped through `[crm.properties]`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

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
from leadloop.crm.rest import RestApi, TokenAuth, follow_pages
from leadloop.errors import QuotaExhaustedError, RecordRejected
from leadloop.http import RateLimiter, retry_after_seconds

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.pipedrive.com"
MAX_LIMIT = 500
# Lowest api_token plan: 20 requests per 2-second window (= 100 per 10 s).
DEFAULT_REQUESTS_PER_10S = 100.0
_MAX_SHORT_WAIT = 60.0  # a 429 asking for longer than this is the daily budget
_MAX_429_RETRIES = 5
STAGE_FIELD = "stage"
STATUS_FIELD = "status"


def rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> datetime | None:
    """v2 RFC3339 (`2025-01-01T10:20:00Z`); tolerates v1's `2025-01-01 10:20:00` (UTC)."""
    if not value:
        return None
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _primary(items: Any) -> str | None:
    """The primary value of a v2 `emails`/`phones` array (else the first)."""
    if not isinstance(items, list) or not items:
        return None
    chosen = next((i for i in items if isinstance(i, dict) and i.get("primary")), items[0])
    value = chosen.get("value") if isinstance(chosen, dict) else None
    return str(value) if value else None


class PipedriveApi(RestApi):
    """Pipedrive's API v2: the token in the `x-api-token` header (never in the URL); a short 429
    is waited out here, a 429 for the daily token budget is the quota."""

    vendor = "Pipedrive"
    auth_hint = "check that the API token is valid and its user is active"
    auth_statuses = frozenset({401, 403})
    max_throttled = _MAX_429_RETRIES

    def __init__(self, ctx: Context, limiter: RateLimiter) -> None:
        crm = ctx.settings.crm
        self.ctx = ctx
        credentials = TokenAuth(ctx.settings, "crm.token_env", crm.token_env,
                                header="x-api-token", scheme="")
        # 429s are handled here (short waits vs. the daily budget); 5xx by the session.
        session = ctx.http(timeout=(10.0, crm.timeout_seconds),
                           statuses=frozenset({500, 502, 503, 504}))
        super().__init__(session, f"{(crm.base_url or DEFAULT_BASE_URL).rstrip('/')}/api/v2",
                         lambda: credentials, limiter)

    def observe(self, response: requests.Response) -> None:
        """When the burst window is used up, wait for its reset instead of drawing a 429."""
        if response.status_code != 200:
            return
        remaining = _header_float(response, "x-ratelimit-remaining")
        if remaining is not None and remaining <= 0:
            self.sleep(_header_float(response, "x-ratelimit-reset") or 2.0)

    def throttle_wait(self, response: requests.Response) -> float | None:
        if response.status_code != 429:
            return None
        wait = _retry_wait(response)
        return wait if wait is not None else 2.0

    def quota_error(self, response: requests.Response) -> QuotaExhaustedError | None:
        if response.status_code != 429:
            return None
        wait = _retry_wait(response)
        daily = response.headers.get("x-daily-ratelimit-token-remaining") == "0"
        if not (daily or (wait is not None and wait > _MAX_SHORT_WAIT)):
            return None
        resume = self.ctx.now() + timedelta(seconds=wait or 0)
        return QuotaExhaustedError(
            "Pipedrive daily API token budget is exhausted",
            hint=f"the budget resets daily; the sync can resume after "
                 f"{resume.strftime('%Y-%m-%d %H:%M UTC')}")


class PipedriveSource:
    """`CrmSource` for Pipedrive (see module docstring)."""

    def __init__(self, ctx: Context) -> None:
        crm = ctx.settings.crm
        self.ctx = ctx
        self.name = crm.source_name
        rate = crm.requests_per_10s or DEFAULT_REQUESTS_PER_10S
        # Bursts are counted per 2-s window: a bucket of capacity B at rate r sends up to
        # B + 2r in a window, so keep B at a tenth of the window's allowance.
        self.api = PipedriveApi(ctx, RateLimiter(rate, 10.0, burst=max(1.0, rate / 5 * 0.1)))
        self.page_size = min(crm.page_size or MAX_LIMIT, MAX_LIMIT)
        set_props = crm.properties.model_fields_set
        self.properties = {k: getattr(crm.properties, k) for k in set_props
                           if k in (*ATTRIBUTION_FIELDS, "email", "phone")
                           and getattr(crm.properties, k)}
        self.extra = list(crm.extra_properties)
        self._stages: dict[int, dict[str, Any]] | None = None

    needs_stored_ids = ()

    def streams(self) -> Sequence[str]:
        return ("persons", "deals", "deals_archived")

    # -- HTTP -------------------------------------------------------------------------------

    @property
    def requests(self) -> int:
        return self.api.requests

    def _get(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
        return self.api.request("GET", path, params=params)

    def _list(self, path: str, since: Cursor | None) -> Iterator[tuple[list[dict], Cursor | None]]:
        params: dict[str, Any] = {"limit": self.page_size, "sort_by": "update_time",
                                  "sort_direction": "asc"}
        if since is not None:
            params["updated_since"] = rfc3339(since.updated_at)
        if path == "/deals":
            params["status"] = "open,won,lost"
        for body, _ in self._pages(path, params):
            data = body.get("data") or []
            cursor = None
            for rec in reversed(data):
                stamp = parse_time(rec.get("update_time"))
                if stamp is not None:
                    cursor = Cursor(stamp, str(rec.get("id")))
                    break
            yield data, cursor

    def _pages(self, path: str, params: dict[str, Any]) -> Iterator[tuple[dict, str | None]]:
        """Cursor paging (`additional_data.next_cursor`); a replayed page is read again."""
        return follow_pages(
            lambda cursor: self._get(path, {**params, **({"cursor": cursor} if cursor else {})}),
            lambda body: (body.get("additional_data") or {}).get("next_cursor"),
            vendor="Pipedrive", what=path)

    # -- streams ----------------------------------------------------------------------------

    def fetch(self, stream: str, since: Cursor | None, *, started_at: datetime,
              stored_ids: StoredIds = no_stored_ids) -> Iterator[Page]:
        if stream == "persons":
            for data, cursor in self._list("/persons", since):
                page = Page(cursor=cursor)
                for raw in data:
                    try:
                        page.leads.append(self.normalise_person(raw))
                    except MALFORMED as exc:  # a wrong type or missing key costs this record
                        page.rejects.append(as_reject(exc, f"person:{record_id(raw)}"))
                page.deleted_crm_ids = [str(r["id"]) for r in data if isinstance(r, dict)
                                        and r.get("is_deleted") and r.get("id") is not None]
                yield page
        elif stream in ("deals", "deals_archived"):
            stages = self._stage_table()
            path = "/deals" if stream == "deals" else "/deals/archived"
            for data, cursor in self._list(path, since):
                page = Page(cursor=cursor)
                for raw in data:
                    try:
                        page.stages.extend(self.normalise_deal(raw, stages))
                    except MALFORMED as exc:  # a wrong type or missing key costs this record
                        page.rejects.append(as_reject(exc, f"deal:{record_id(raw)}"))
                yield page
        else:
            raise ValueError(f"unknown Pipedrive stream {stream!r}")

    def _stage_table(self) -> dict[int, dict[str, Any]]:
        """Stage id -> stage, with `first` = the first stage of its pipeline."""
        if self._stages is None:
            rows: list[dict] = []
            for body, _ in self._pages("/stages", {"limit": MAX_LIMIT}):
                rows.extend(body.get("data") or [])
            first: dict[Any, dict] = {}
            for s in sorted(rows, key=lambda s: (s.get("pipeline_id"), s.get("order_nr", 0))):
                first.setdefault(s.get("pipeline_id"), s)
            self._stages = {int(s["id"]): {**s, "first": first[s.get("pipeline_id")]} for s in rows}
        return self._stages

    # -- normalisation (pure) ---------------------------------------------------------------

    def _field(self, raw: dict[str, Any], key: str) -> Any:
        custom = raw.get("custom_fields") or {}
        return custom.get(key, raw.get(key))

    def normalise_person(self, raw: dict[str, Any]) -> LeadIn:
        pid = record_key(raw, "id")
        if pid is None:
            raise RecordRejected("person:?", "record has no usable id")
        created = parse_time(raw.get("add_time"))
        if created is None:
            raise RecordRejected(f"person:{pid}", "missing add_time")
        lead = LeadIn(crm_id=str(pid), created_at=created, updated_at=parse_time(raw.get("update_time")),
                      object_type="person", email=_primary(raw.get("emails")),
                      phone=_primary(raw.get("phones")))
        for key, name in self.properties.items():
            value = self._field(raw, name)
            if isinstance(value, dict):  # option / money custom fields carry {"value": ...}
                value = value.get("value")
            if value not in (None, ""):
                setattr(lead, key, str(value))
        lead.attributes = {k: v for k in ("owner_id", "org_id", "label_ids", *self.extra)
                           if (v := self._field(raw, k)) not in (None, "", [])}
        return lead

    def normalise_deal(self, raw: dict[str, Any], stages: dict[int, dict[str, Any]]) -> list[StageIn]:
        did, person = raw.get("id"), raw.get("person_id")
        if person is None or raw.get("is_deleted"):
            return []  # a deal without a person is not a lead's; a deleted deal is no fact
        ref = f"deal:{did}"
        try:
            added = parse_time(raw.get("add_time"))
            changed = parse_time(raw.get("stage_change_time"))
            won, lost = parse_time(raw.get("won_time")), parse_time(raw.get("lost_time"))
        except ValueError as exc:
            raise RecordRejected(ref, f"unparsable time: {exc}") from None
        if added is None:
            raise RecordRejected(ref, "missing add_time")
        stage = stages.get(int(raw.get("stage_id") or 0))
        if stage is None:
            raise RecordRejected(ref, f"unknown stage_id {raw.get('stage_id')}")
        amount = parse_decimal(raw.get("value"))
        currency = raw.get("currency")
        out: dict[tuple[str, str], StageIn] = {}

        def fact(field: str, value: str, when: datetime, is_lost: bool = False) -> None:
            out.setdefault((field, value), StageIn(str(person), field, value, when, deal_id=str(did),
                                                   amount=amount, currency=currency, is_lost=is_lost))

        fact(STAGE_FIELD, str(stage["first"]["name"]), added)
        fact(STAGE_FIELD, str(stage["name"]), changed or added)
        if raw.get("status") == "won" and won:
            fact(STATUS_FIELD, "won", won)
        if raw.get("status") == "lost" and lost:
            fact(STATUS_FIELD, "lost", lost, is_lost=True)
        return list(out.values())


def _retry_wait(response: requests.Response) -> float | None:
    return retry_after_seconds(response) or _header_float(response, "x-ratelimit-reset")


def _header_float(response: requests.Response, name: str) -> float | None:
    try:
        return float(response.headers[name])
    except (KeyError, ValueError):
        return None




SOURCE = PipedriveSource
