"""The connector contract and the engine that writes connector pages to the store.

A connector (`CrmSource`) only reads the CRM and turns records into `LeadIn`, `StageIn` and
`EventIn` values grouped in `Page`s; it never touches the database. `sync_source()` applies each
page in one transaction together with the stream's cursor, so a crash loses at most the page in
flight and a re-run repeats it harmlessly (every write is an upsert).

Cursor rules (see DESIGN.md): the stored cursor is the highest (modified time, id) of the pages
stored so far, never moved past the time the sync started (records edited during the sync are read
again next time) and never moved backwards; each run re-reads from `cursor - lookback` to cover
the CRM's search-index lag, and the upserts deduplicate what is read twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Protocol

import psycopg
from sqlalchemy import update
from sqlalchemy.exc import InterfaceError, OperationalError, StatementError
from sqlmodel import Session, select

from leadloop.context import Context
from leadloop.errors import RecordRejected
from leadloop.identity import hash_identity
from leadloop.prefetch import prefetched
from leadloop.progress import track
from leadloop.redact import redact_text, scrub_payload
from leadloop.rejects import keep_rejects
from leadloop.store import (
    among,
    analyze_unanalyzed,
    id_chunks,
    insert_ignore,
    lead_ids,
    session_scope,
    upsert,
)
from leadloop.tables import (
    Conversion,
    ConversionStatus,
    Lead,
    LeadEvent,
    LeadStatus,
    RejectedRecord,
    StageChange,
    SyncState,
    utcnow,
)

if TYPE_CHECKING:
    from leadloop.crm.screening import PiiActions, Problem

log = logging.getLogger(__name__)

ATTRIBUTION_FIELDS = (
    "gclid",
    "gbraid",
    "wbraid",
    "fbclid",
    "fbc",
    "msclkid",
    "li_fat_id",
    "meta_lead_id",
    "utm_source",
    "utm_medium",
    "utm_campaign",
    "landing_page",
    "country",
)


@dataclass(frozen=True, order=True, slots=True)
class Cursor:
    """A position in a stream: modified time, then id as the tie-break."""

    updated_at: datetime
    id: str = ""


@dataclass(slots=True)
class LeadIn:
    """A lead as a connector reads it. `email`/`phone` are clear text here, in memory only:
    the engine hashes them and drops the clear values before anything is written."""

    crm_id: str
    created_at: datetime
    updated_at: datetime | None = None
    object_type: str = "contact"
    email: str | None = None
    phone: str | None = None
    gclid: str | None = None
    gbraid: str | None = None
    wbraid: str | None = None
    fbclid: str | None = None
    fbc: str | None = None
    msclkid: str | None = None
    li_fat_id: str | None = None
    meta_lead_id: str | None = None
    utm_source: str | None = None
    utm_medium: str | None = None
    utm_campaign: str | None = None
    landing_page: str | None = None
    country: str | None = None
    consent_ad_user_data: bool | None = None
    consent_ad_personalization: bool | None = None
    current_stage: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    merged_crm_ids: list[str] = field(default_factory=list)  # ids absorbed into this lead
    # `created_at` is a stand-in (e.g. a CSV export's file time), not the CRM's own: only an
    # estimate of when we first learned of the lead, so once stored it does not move.
    time_estimated: bool = False


@dataclass(slots=True)
class StageIn:
    """The time lead `crm_id` (or its deal `deal_id`) entered CRM value `value` of `field`."""

    crm_id: str
    field: str
    value: str
    entered_at: datetime
    deal_id: str = ""
    amount: Decimal | None = None
    currency: str | None = None
    is_lost: bool = False
    time_estimated: bool = False  # `entered_at` is a stand-in: a stored row keeps its own


@dataclass(slots=True)
class EventIn:
    crm_id: str
    name: str
    occurred_at: datetime
    value: float | None = None
    # `occurred_at` is a stand-in: the event is skipped when the lead already has one so named
    time_estimated: bool = False


@dataclass(slots=True)
class Page:
    """What one fetch step yields. `cursor` is the stream position after this page (None when
    the stream is not incremental, e.g. a full re-read of pipelines or a CSV file)."""

    leads: list[LeadIn] = field(default_factory=list)
    stages: list[StageIn] = field(default_factory=list)
    events: list[EventIn] = field(default_factory=list)
    rejects: list[RecordRejected] = field(default_factory=list)
    deleted_crm_ids: list[str] = field(default_factory=list)
    deleted_deal_ids: list[str] = field(default_factory=list)  # deals deleted/archived in the CRM
    cursor: Cursor | None = None
    total: int | None = None  # the source's own count, when it tells one (for progress)

    @property
    def size(self) -> int:
        return len(self.leads) + len(self.stages) + len(self.events) + len(self.rejects)


class CrmSource(Protocol):
    """A CRM connector. Implementations live in `leadloop/crm/<kind>.py`."""

    name: str  # the source name stored on each lead

    def streams(self) -> Sequence[str]:
        """Stream names in the order they must be synced (leads before what refers to them)."""
        ...

    def fetch(self, stream: str, since: Cursor | None, *, started_at: datetime) -> Iterator[Page]:
        """Yield pages of records modified at or after `since` (None: backfill everything)."""
        ...


# What converting one malformed CRM record raises (a wrong type, a missing key, a number or
# date out of range): connectors catch these per record and keep the record as a reject.
MALFORMED = (RecordRejected, KeyError, IndexError, TypeError, ValueError, AttributeError,
             ArithmeticError, OSError)


def as_reject(exc: Exception, ref: Any) -> RecordRejected:
    """`exc`, raised converting the record `ref`, as the reject that keeps it."""
    if isinstance(exc, RecordRejected):
        return exc
    return RecordRejected(str(ref)[:200], f"malformed record: {type(exc).__name__}: "
                          f"{str(exc)[:200]}")


def record_id(raw: Any, key: str = "id") -> str:
    """A raw record's id for a message, whatever its shape."""
    return str(raw.get(key, "?")) if isinstance(raw, dict) else "?"


def record_key(raw: dict[str, Any], key: str) -> str | None:
    """A raw record's id as text, or None when it is missing or not an id (a list, a bool,
    null): `str(None)` would file every such record under one lead "None"."""
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return str(value).strip() or None


def parse_decimal(value: Any) -> Decimal | None:
    """A CRM amount (number or string) as Decimal; None when empty or not a number."""
    if value in (None, ""):
        return None
    try:
        return Decimal(str(value))
    except (InvalidOperation, ValueError, TypeError):
        return None


# -- the engine -------------------------------------------------------------------------------


def _lead_row(source: str, lead: LeadIn, region: str, now: datetime) -> tuple[dict, list[str]]:
    identity, problems = hash_identity(lead.email, lead.phone, region)
    row: dict[str, Any] = {
        "source": source,
        "crm_id": lead.crm_id,
        "object_type": lead.object_type,
        "created_at": lead.created_at,
        "crm_updated_at": lead.updated_at,
        "status": LeadStatus.active,
        "consent_ad_user_data": lead.consent_ad_user_data,
        "consent_ad_personalization": lead.consent_ad_personalization,
        "current_stage": lead.current_stage,
        "attributes": lead.attributes,
        "ingested_at": now,
        "updated_at": now,
        **identity.as_columns(),
    }
    for name in ATTRIBUTION_FIELDS:
        row[name] = getattr(lead, name)
    return row, problems


def _withdraw_unsent(session: Session, lead_ids_: Sequence[int], reason: str) -> int:
    """Pending conversions of leads that are gone can no longer be true: withdraw them."""
    if not lead_ids_:
        return 0
    result = session.execute(
        update(Conversion)
        .where(
            among(session, Conversion.lead_id, lead_ids_),
            Conversion.status.in_(  # type: ignore[attr-defined]
                [ConversionStatus.pending, ConversionStatus.held, ConversionStatus.failed]
            ),
        )
        .values(status=ConversionStatus.withdrawn, last_error=reason)
    )
    return result.rowcount or 0


def _forget_deals(session: Session, source: str, deal_ids: Sequence[str], now: datetime) -> int:
    """A deal deleted in the CRM no longer puts its leads in its stages: drop those stage rows
    and mark the leads changed, so the outbox withdraws unsent conversions and retracts sent ones."""
    sc = StageChange.__table__  # type: ignore[attr-defined]
    lead = Lead.__table__  # type: ignore[attr-defined]
    forgotten = 0
    for i in range(0, len(deal_ids), 5000):
        part = list(deal_ids[i : i + 5000])
        owned = select(lead.c.id).where(lead.c.source == source)
        affected = [row[0] for row in session.execute(
            select(sc.c.lead_id).distinct().where(among(session, sc.c.deal_id, part),
                                                   sc.c.lead_id.in_(owned)))]
        if not affected:
            continue
        result = session.execute(
            sc.delete().where(among(session, sc.c.deal_id, part),
                              among(session, sc.c.lead_id, affected)))
        forgotten += result.rowcount or 0
        session.execute(update(lead).where(among(session, lead.c.id, affected)).values(updated_at=now))
    return forgotten


def _stored_stages(session: Session, lead_ids_: set[int]) -> dict[tuple, tuple]:
    """(lead id, field, value, deal id) -> (entered_at, amount, currency, is_lost) as stored."""
    sc = StageChange.__table__  # type: ignore[attr-defined]
    out: dict[tuple, tuple] = {}
    for part in id_chunks(lead_ids_):
        for r in session.execute(
            select(sc.c.lead_id, sc.c.field, sc.c.value, sc.c.deal_id, sc.c.entered_at, sc.c.amount,
                   sc.c.currency, sc.c.is_lost).where(among(session, sc.c.lead_id, part))
        ):
            out[(r[0], r[1], r[2], r[3])] = (r[4], r[5], r[6], bool(r[7]))
    return out


def _stage_differs(row: dict[str, Any], stored: dict[tuple, tuple], stand_in: bool) -> bool:
    old = stored.get((row["lead_id"], row["field"], row["value"], row["deal_id"]))
    if old is None:
        return True
    entered_at, amount, currency, is_lost = old
    if not stand_in and entered_at != row["entered_at"]:
        return True
    new_amount = row["amount"]
    if (amount is None) != (new_amount is None) or (
            amount is not None and abs(float(amount) - float(new_amount)) > 1e-6):
        return True
    return currency != row["currency"] or is_lost != bool(row["is_lost"])


def _stored_events(session: Session, lead_ids_: set[int]) -> set[tuple[int, str, datetime]]:
    """The (lead id, event name, time) of every stored event of these leads."""
    ev = LeadEvent.__table__  # type: ignore[attr-defined]
    known: set[tuple[int, str, datetime]] = set()
    for part in id_chunks(lead_ids_):
        known.update((r[0], r[1], r[2]) for r in session.execute(
            select(ev.c.lead_id, ev.c.name, ev.c.occurred_at).where(among(session, ev.c.lead_id, part))))
    return known


def apply_page(
    session: Session, ctx: Context, source: str, object_type: str, page: Page, *,
    pii: PiiActions | None = None, duplicates: Sequence[str] = (),
    screened: Sequence[Problem] | None = None,
) -> dict[str, int]:
    """Write one page: upsert leads, mark deletes and merges, add stages and events, keep
    rejects. Runs inside the caller's transaction; returns counts.

    The page is screened first (`leadloop.crm.screening`): values the store cannot hold cost
    only their field or record, and identity found in attributes is hashed or dropped (`pii`
    collects which). `duplicates`: CRM ids this export already gave, reported here.
    `screened`: the page was screened already (by the sync's reader thread); its problems."""
    from leadloop.crm.screening import screen_page
    from leadloop.erasure import drop_erased

    now = ctx.now()
    if screened is None:
        page, problems, found_pii = screen_page(page, now)
        if pii is not None:
            pii.merge(found_pii)
    else:
        problems = list(screened)
    page = drop_erased(session, source, page)  # `leadloop forget` outlives the CRM record
    region = ctx.settings.crm.default_region
    counts = dict.fromkeys(
        ("leads", "stages", "events", "rejected", "deleted", "merged", "withdrawn",
         "deals_deleted"), 0
    )
    rejects: list[RejectedRecord] = []

    def reject(ref: str, reason: str, payload: dict | None = None, kind: str = object_type) -> None:
        rejects.append(
            RejectedRecord(
                job_run_id=ctx.job_run_id,
                source=source,
                object_type=kind,
                record_ref=ref,
                flow_stage="ingest",
                reason=reason,
                payload=scrub_payload(payload or {}),
                created_at=now,
            )
        )

    for problem in problems:
        reject(problem.ref, problem.reason, problem.payload, kind=f"{object_type}{problem.kind}")
    for crm_id in dict.fromkeys(duplicates):
        reject(crm_id, f"CRM id {crm_id} appears more than once in this export; the last one "
               "read is kept", kind=f"{object_type}.duplicate")
    rows = []
    estimated = {lead.crm_id: lead.time_estimated for lead in page.leads}  # the later row wins
    for lead in page.leads:
        row, problems = _lead_row(source, lead, region, now)
        rows.append(row)
        for problem in problems:
            # The lead is kept; only the unusable identifier is left out.
            reject(lead.crm_id, f"{problem}; lead kept without it", kind=f"{object_type}.identity")
    # Later rows for the same id win (a page can repeat a record the server re-sent).
    rows = list({r["crm_id"]: r for r in rows}.values())
    columns = [k for k in (rows[0] if rows else {}) if k not in ("source", "crm_id", "ingested_at")]
    # A record re-read unchanged (the look-back window, a repeated page) is left alone, so it
    # does not look changed to scoring, validation, export and the report. A stand-in
    # created_at is neither written over nor compared: an existing lead keeps its own.
    for stand_in in (False, True):
        cols = [c for c in columns if not (stand_in and c == "created_at")]
        part = [r for r in rows if estimated[r["crm_id"]] is stand_in]
        upsert(session, Lead, part, conflict=("source", "crm_id"), update=cols,
               when_changed=[c for c in cols if c != "updated_at"])
    counts["leads"] = len(rows)

    referenced = {s.crm_id for s in page.stages} | {e.crm_id for e in page.events}
    merged_pairs = [(lead.crm_id, m) for lead in page.leads for m in lead.merged_crm_ids]
    ids = lead_ids(
        session,
        source,
        referenced
        | {r["crm_id"] for r in rows}
        | set(page.deleted_crm_ids)
        | {m for _, m in merged_pairs},
    )

    if merged_pairs:
        absorbed = [(ids[m], ids[s]) for s, m in merged_pairs if m in ids and s in ids]
        for absorbed_id, survivor_id in absorbed:
            session.execute(
                update(Lead)
                .where(Lead.id == absorbed_id)  # type: ignore[arg-type]
                .values(status=LeadStatus.merged, merged_into_id=survivor_id, updated_at=now)
            )
        counts["merged"] = len(absorbed)
        counts["withdrawn"] += _withdraw_unsent(
            session, [a for a, _ in absorbed], "lead merged into another CRM record"
        )

    gone = [ids[c] for c in page.deleted_crm_ids if c in ids]
    if gone:
        session.execute(
            update(Lead)
            .where(among(session, Lead.id, gone))
            .values(status=LeadStatus.deleted, updated_at=now)
        )
        counts["deleted"] = len(gone)
        counts["withdrawn"] += _withdraw_unsent(session, gone, "lead deleted or archived in the CRM")

    if page.deleted_deal_ids:
        counts["deals_deleted"] = _forget_deals(session, source, page.deleted_deal_ids, now)

    stage_rows = []
    stage_estimated: dict[tuple, bool] = {}
    for s in page.stages:
        lead_id = ids.get(s.crm_id)
        if lead_id is None:
            reject(f"{s.deal_id or s.crm_id}", f"stage {s.field}={s.value}: lead {s.crm_id} "
                   "is not synced", {"lead": s.crm_id, "field": s.field, "value": s.value})
            continue
        stage_rows.append({
            "lead_id": lead_id, "field": s.field, "value": s.value, "entered_at": s.entered_at,
            "deal_id": s.deal_id, "amount": s.amount, "currency": s.currency,
            "is_lost": s.is_lost,
        })
        stage_estimated[(lead_id, s.field, s.value, s.deal_id)] = s.time_estimated
    stage_rows = list({(r["lead_id"], r["field"], r["value"], r["deal_id"]): r
                       for r in stage_rows}.values())
    # Only stage rows that are new or differ are written. They are compared here rather than
    # found with RETURNING, which made psycopg re-parse a long multi-row statement per page.
    stored = _stored_stages(session, {r["lead_id"] for r in stage_rows})
    changed_stages = []
    for stand_in in (False, True):
        # A stand-in entered_at is kept once stored: only the deal's facts may change.
        stage_cols = ["amount", "currency", "is_lost"] if stand_in else [
            "entered_at", "amount", "currency", "is_lost"]
        part = [r for r in stage_rows
                if stage_estimated[(r["lead_id"], r["field"], r["value"], r["deal_id"])] is stand_in
                and _stage_differs(r, stored, stand_in)]
        upsert(session, StageChange, part, conflict=("lead_id", "field", "value", "deal_id"),
               update=stage_cols)
        changed_stages += part
    counts["stages"] = len(stage_rows)

    event_rows = []
    stand_in_events = []
    for e in page.events:
        lead_id = ids.get(e.crm_id)
        if lead_id is None:
            reject(e.crm_id, f"event {e.name}: lead {e.crm_id} is not synced", {"event": e.name})
            continue
        (stand_in_events if e.time_estimated else event_rows).append(
            {"lead_id": lead_id, "name": e.name, "occurred_at": e.occurred_at, "value": e.value})
    counts["events"] = len(event_rows) + len(stand_in_events)
    known = _stored_events(session, {r["lead_id"] for r in event_rows + stand_in_events})
    new_events = [r for r in event_rows if (r["lead_id"], r["name"], r["occurred_at"]) not in known]
    if stand_in_events:
        # A stand-in time would differ on every re-read: an event the lead already has (under
        # any time) is not added again.
        named = {(lead_id, name) for lead_id, name, _ in known}
        new_events += [r for r in stand_in_events if (r["lead_id"], r["name"]) not in named]
    insert_ignore(session, LeadEvent, new_events, conflict=("lead_id", "name", "occurred_at"))

    # A new or changed stage or event changes what the lead is worth: mark the lead changed for
    # the jobs downstream.
    touched_ids = sorted({r["lead_id"] for r in changed_stages} | {r["lead_id"] for r in new_events})
    for i in range(0, len(touched_ids), 5000):
        session.execute(
            update(Lead).where(among(session, Lead.id, touched_ids[i : i + 5000]),
                               Lead.updated_at != now)  # leads this page wrote already are marked
            .values(updated_at=now)
        )

    for r in page.rejects:
        reject(r.record_ref, r.reason, r.payload)
    keep_rejects(session, rejects)  # a re-read of the same export adds no copies
    counts["rejected"] = len(rejects)
    return counts


def _advance(state: SyncState, cursor: Cursor | None, started_at: datetime) -> None:
    if cursor is None:
        return
    capped = min(cursor, Cursor(started_at, ""))
    current = (
        Cursor(state.cursor_updated_at, state.cursor_id or "")
        if state.cursor_updated_at is not None
        else None
    )
    if current is None or capped > current:
        state.cursor_updated_at, state.cursor_id = capped.updated_at, capped.id


# Leads a sync writes before it has PostgreSQL take statistics of tables that have none yet.
_ANALYZE_AFTER_LEADS = 5_000


def sync_source(ctx: Context, source: CrmSource) -> dict[str, Any]:
    """Sync every stream of `source` into the store. Returns summed counts.

    Stops between pages when the context's stop event is set (graceful shutdown).
    """
    from leadloop.crm.screening import PiiActions, duplicate_ids

    totals: dict[str, Any] = {"pages": 0}
    pii = PiiActions()
    analyzed = False
    started_at = ctx.now()
    lookback = timedelta(minutes=ctx.settings.crm.lookback_minutes)
    for stream in source.streams():
        with session_scope(ctx.engine) as session:
            state = session.get(SyncState, (source.name, stream)) or SyncState(
                source=source.name, object_type=stream
            )
            state.last_started_at = started_at
            state.last_job_run_id = ctx.job_run_id
            session.add(state)
            since = (
                Cursor(state.cursor_updated_at - lookback, "")
                if state.cursor_updated_at is not None
                else None
            )
        log.info("sync %s/%s from %s", source.name, stream,
                 since.updated_at.isoformat() if since else "the beginning (backfill)")
        # The next page is read while this one is written: reading waits on the CRM, writing
        # on the database, and the two overlap.
        # Pages are screened in the reader thread too, while the previous one is written.
        pages = prefetched(_screened(ctx, source.fetch(stream, since, started_at=started_at)),
                           name=f"sync-{source.name}-{stream}")
        seen: set[str] = set()  # CRM ids of a whole-export stream (a CSV file) read so far
        with track(f"sync {source.name} {stream}") as progress, closing(pages):
            for page, problems, found_pii in pages:
                pii.merge(found_pii)
                repeated = duplicate_ids(page.leads, seen) if page.cursor is None else []
                counts = _store_page(ctx, source.name, stream, page, started_at, repeated,
                                     problems)
                totals["pages"] += 1
                for key, n in counts.items():
                    totals[key] = totals.get(key, 0) + n
                if not analyzed and totals.get("leads", 0) >= _ANALYZE_AFTER_LEADS:
                    analyzed = True
                    if fresh := analyze_unanalyzed(ctx.engine, (Lead, StageChange, LeadEvent)):
                        log.info("took statistics of the new tables %s", ", ".join(fresh))
                if page.total is not None:
                    progress.set_total(page.total)
                progress.advance(len(page.leads) or page.size)
                if ctx.stopping:
                    log.info("stop requested: sync ends after a committed page")
                    return _with_pii_summary(totals, pii)
        with session_scope(ctx.engine) as session:
            state = session.get(SyncState, (source.name, stream))
            if state is not None:
                state.last_success_at = utcnow()
                session.add(state)
    return _with_pii_summary(totals, pii)


def _with_pii_summary(totals: dict[str, Any], pii: PiiActions) -> dict[str, Any]:
    """The sync's counts, and which columns held identity and what was done with it."""
    if pii.by_column:
        totals["identity_in_attributes"] = pii.summary()
        log.warning("identity found in unmapped columns, never stored in clear: %s",
                    pii.summary())
    return totals


# What the store raises for a value it cannot hold (a driver's data error, a bind processor's
# ValueError): the page is then written in halves until the record at fault is found.
_REFUSED = (StatementError, psycopg.DataError, psycopg.ProgrammingError, psycopg.IntegrityError,
            ValueError, OverflowError)
_UNREACHABLE = (OperationalError, InterfaceError, psycopg.OperationalError,
                psycopg.InterfaceError)


def _screened(ctx: Context, pages: Iterator[Page]
              ) -> Iterator[tuple[Page, list[Problem], PiiActions]]:
    from leadloop.crm.screening import screen_page

    try:
        for page in pages:
            yield screen_page(page, ctx.now())
    finally:
        close = getattr(pages, "close", None)
        if close is not None:
            close()


def _store_page(ctx: Context, source: str, stream: str, page: Page, started_at: datetime,
                duplicates: Sequence[str], problems: Sequence[Problem]) -> dict[str, int]:
    """Write a page with its cursor in one transaction. When the store refuses it, the page is
    written in halves (each a transaction; the cursor moves with the last), down to the single
    record it refuses, which is kept in `rejected_record`: one poison record costs itself."""
    try:
        with session_scope(ctx.engine) as session:
            counts = apply_page(session, ctx, source, stream, page, duplicates=duplicates,
                                screened=problems)
            _advance_stream(session, source, stream, page.cursor, started_at)
        return counts
    except _UNREACHABLE:
        raise
    except _REFUSED as exc:
        cause = getattr(exc, "orig", None) or exc
        problem = redact_text(f"{type(cause).__name__}: "
                              + (str(cause).strip().splitlines() or [""])[0][:300])
    parts = _halves(page)
    if parts is None:
        return _refuse_records(ctx, source, stream, page, started_at, problem, problems)
    log.warning("the store refused a page of %s/%s (%s): writing it in halves", source, stream,
                problem)
    totals: dict[str, int] = {}
    for part in parts:
        for key, n in _store_page(ctx, source, stream, part, started_at, duplicates,
                                  problems).items():
            totals[key] = totals.get(key, 0) + n
        duplicates, problems = (), ()  # reported with the first half
    return totals


def _halves(page: Page) -> tuple[Page, Page] | None:
    """The page in two, each lead with its own stages and events; the second carries the
    cursor. None when it holds one record group only."""
    groups: dict[str, Page] = {}
    for kind in ("leads", "stages", "events"):
        for item in getattr(page, kind):
            getattr(groups.setdefault(str(item.crm_id), Page()), kind).append(item)
    rest = Page(rejects=page.rejects, deleted_crm_ids=page.deleted_crm_ids,
                deleted_deal_ids=page.deleted_deal_ids)
    units = [*groups.values(), *([rest] if rest.size or rest.deleted_crm_ids
                                 or rest.deleted_deal_ids else [])]
    if len(units) <= 1:
        return None
    middle = len(units) // 2
    first, second = Page(), Page(cursor=page.cursor, total=page.total)
    for target, chunk in ((first, units[:middle]), (second, units[middle:])):
        for unit in chunk:
            for kind in ("leads", "stages", "events", "rejects", "deleted_crm_ids",
                         "deleted_deal_ids"):
                getattr(target, kind).extend(getattr(unit, kind))
    return first, second


def _refuse_records(ctx: Context, source: str, stream: str, page: Page, started_at: datetime,
                    problem: str, problems: Sequence[Problem]) -> dict[str, int]:
    """Keep the records of a page the store refused as rejects (with the problems screening
    found in them), and move the cursor past them."""
    from leadloop.crm.screening import clean_text

    reason = f"the store refused this record ({problem}); record refused"
    refs = [(str(x.crm_id), kind, reason) for kind, items in (
        ("", page.leads), (".stage", page.stages), (".event", page.events)) for x in items]
    refs += [(r.record_ref, "", r.reason) for r in page.rejects]
    refs += [(p.ref, p.kind, p.reason) for p in problems]
    with session_scope(ctx.engine) as session:
        keep_rejects(session, [RejectedRecord(
            job_run_id=ctx.job_run_id, source=source, object_type=f"{stream}{kind}",
            record_ref=clean_text(ref)[:200], flow_stage="ingest", reason=clean_text(why),
            payload={}, created_at=ctx.now()) for ref, kind, why in refs])
        _advance_stream(session, source, stream, page.cursor, started_at)
    log.warning("the store refused %d record(s) of %s/%s: %s", len(refs), source, stream, problem)
    return {"rejected": len(refs)}


def _advance_stream(session: Session, source: str, stream: str, cursor: Cursor | None,
                    started_at: datetime) -> None:
    state = session.exec(
        select(SyncState).where(SyncState.source == source, SyncState.object_type == stream)
    ).one()
    _advance(state, cursor, started_at)
    session.add(state)
