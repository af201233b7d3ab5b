"""The sync engine: writes a connector's pages to the store (the contract is `leadloop.crm.base`).

`sync_source()` reads each stream of a `CrmSource` from its cursor and applies each page in one
transaction together with the stream's cursor, so a crash loses at most the page in flight and a
re-run repeats it harmlessly (every write is an upsert). Pages are screened
(`leadloop.crm.screening`) in the reader thread while the previous page is written; a page the
store still refuses is written in halves down to the record at fault, which is kept as a reject.

Cursor rules (see DESIGN.md): the stored cursor is the highest (modified time, id) of the pages
stored so far, never moved past the time the sync started (records edited during the sync are read
again next time) and never moved backwards; each run re-reads from `cursor - lookback` to cover
the CRM's search-index lag, and the upserts deduplicate what is read twice.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Sequence
from collections.abc import Set as AbstractSet
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from operator import attrgetter
from typing import Any, Literal, Protocol, TypedDict, TypeVar, get_args

import psycopg
from sqlalchemy import select, update
from sqlalchemy.exc import InterfaceError, OperationalError, StatementError
from sqlmodel import Session, col

from leadloop.context import Context
from leadloop.crm.base import (
    ATTRIBUTION_FIELDS,
    CrmSource,
    Cursor,
    LeadIn,
    Page,
    no_stored_ids,
)
from leadloop.crm.screening import PiiActions, Problem, clean_text, duplicate_ids, screen_page
from leadloop.erasure import drop_erased
from leadloop.identity import HashedIdentity, hash_identity
from leadloop.prefetch import prefetched
from leadloop.progress import track
from leadloop.redact import redact_text, scrub_payload
from leadloop.rejects import keep_rejects
from leadloop.store import (
    among,
    analyze_unanalyzed,
    insert_ignore,
    lead_ids,
    lead_ids_ingested_at,
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
    table_of,
    utcnow,
)

log = logging.getLogger(__name__)


class Reject(Protocol):
    """Keep a record of the page as a reject (`kind`: its object type, the page's by default)."""

    def __call__(self, ref: str, reason: str, payload: dict[str, Any] | None = None,
                 kind: str = ...) -> None: ...


class PageCounts(TypedDict, total=False):
    """What writing a page did; a sync's counts are their sums (and `pages`). A page the store
    refused record by record counts only `rejected`."""

    leads: int  # leads written (new, changed or re-read)
    stages: int  # stage rows read
    events: int  # events read
    rejected: int  # records kept in rejected_record
    deleted: int  # leads marked deleted
    merged: int  # leads linked to the record they were merged into
    withdrawn: int  # unsent conversions of deleted or merged leads withdrawn
    deals_deleted: int  # stage rows dropped with their deleted deal


PageCount = Literal["leads", "stages", "events", "rejected", "deleted", "merged", "withdrawn",
                    "deals_deleted"]
PAGE_COUNTS: tuple[PageCount, ...] = get_args(PageCount)


def _add_counts(total: PageCounts | dict[str, Any], part: PageCounts) -> None:
    """Add the counts of `part` to `total`, key by key."""
    for key in PAGE_COUNTS:
        if key in part:
            total[key] = total.get(key, 0) + part[key]


# (lead id, field, value, deal id): a stage row's key
StageKey = tuple[int, str, str, str]
# (entered_at, amount, currency, is_lost) of a stored stage row
StoredStage = tuple[datetime, Decimal | None, str | None, bool]

_CHUNK = 5000  # values per IN list
_T = TypeVar("_T")


def _chunks(values: Sequence[_T]) -> Iterator[list[_T]]:
    """`values` in IN-list sized parts."""
    for i in range(0, len(values), _CHUNK):
        yield list(values[i : i + _CHUNK])


def _lead_row(source: str, lead: LeadIn, region: str, now: datetime, identities: Identities
              ) -> tuple[dict[str, Any], list[str]]:
    identity, problems = (identities.get((lead.email, lead.phone))
                          or hash_identity(lead.email, lead.phone, region))
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
    row.update(zip(ATTRIBUTION_FIELDS, _attribution(lead), strict=True))
    return row, problems


_attribution = attrgetter(*ATTRIBUTION_FIELDS)  # a lead's values of them, in their order

# A lead's (e-mail, phone) -> its hashed identity and what could not be hashed
Identities = dict[tuple[str | None, str | None], tuple[HashedIdentity, list[str]]]


def _hashed_identities(leads: Sequence[LeadIn], region: str) -> Identities:
    """The hashed identity of each (e-mail, phone) of `leads`. The sync works them out in its
    reader thread, while the previous page is written: phone parsing was the largest part of
    the writing thread's own work (3.4 of 30 s at 100,000 leads), and much of the writing
    is SQLite's, which lets other Python threads run."""
    out: Identities = {}
    for lead in leads:
        pair = (lead.email, lead.phone)
        if pair not in out:
            out[pair] = hash_identity(lead.email, lead.phone, region)
    return out


def _withdraw_unsent(session: Session, lead_ids_: Sequence[int], reason: str) -> int:
    """Pending conversions of leads that are gone can no longer be true: withdraw them."""
    if not lead_ids_:
        return 0
    result = session.connection().execute(  # a CursorResult: it has the rowcount
        update(Conversion)
        .where(
            among(session, Conversion.lead_id, lead_ids_),
            col(Conversion.status).in_(
                [ConversionStatus.pending, ConversionStatus.held, ConversionStatus.failed]
            ),
        )
        .values(status=ConversionStatus.withdrawn, last_error=reason)
    )
    return result.rowcount or 0


def _forget_deals(session: Session, source: str, deal_ids: Sequence[str], now: datetime) -> int:
    """A deal deleted in the CRM no longer puts its leads in its stages: drop those stage rows
    and mark the leads changed, so the outbox withdraws unsent conversions and retracts sent ones."""
    sc = table_of(StageChange)
    lead = table_of(Lead)
    forgotten = 0
    for part in _chunks(deal_ids):
        owned = select(lead.c.id).where(lead.c.source == source)
        affected = [row[0] for row in session.execute(
            select(sc.c.lead_id).distinct().where(among(session, sc.c.deal_id, part),
                                                   sc.c.lead_id.in_(owned)))]
        if not affected:
            continue
        result = session.connection().execute(  # a CursorResult: it has the rowcount
            sc.delete().where(among(session, sc.c.deal_id, part),
                              among(session, sc.c.lead_id, affected)))
        forgotten += result.rowcount or 0
        session.execute(update(lead).where(among(session, lead.c.id, affected)).values(updated_at=now))
    return forgotten


def _stored_stages(session: Session, lead_ids_: set[int]) -> dict[StageKey, StoredStage]:
    """The stored stage rows of these leads."""
    sc = table_of(StageChange)
    out: dict[StageKey, StoredStage] = {}
    for part in _chunks(sorted(lead_ids_)):
        for r in session.execute(
            select(sc.c.lead_id, sc.c.field, sc.c.value, sc.c.deal_id, sc.c.entered_at, sc.c.amount,
                   sc.c.currency, sc.c.is_lost).where(among(session, sc.c.lead_id, part))
        ):
            out[(r[0], r[1], r[2], r[3])] = (r[4], r[5], r[6], bool(r[7]))
    return out


def _stage_differs(row: dict[str, Any], old: StoredStage | None, stand_in: bool) -> bool:
    """Whether `row` differs from its stored row `old` (None: not stored)."""
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
    ev = table_of(LeadEvent)
    known: set[tuple[int, str, datetime]] = set()
    for part in _chunks(sorted(lead_ids_)):
        known.update((r[0], r[1], r[2]) for r in session.execute(
            select(ev.c.lead_id, ev.c.name, ev.c.occurred_at).where(among(session, ev.c.lead_id, part))))
    return known


def apply_page(
    session: Session, ctx: Context, source: str, object_type: str, page: Page, *,
    pii: PiiActions | None = None, duplicates: Sequence[str] = (),
    screened: Sequence[Problem] | None = None, identities: Identities | None = None,
) -> PageCounts:
    """Write one page: upsert leads, mark deletes and merges, add stages and events, keep
    rejects. Runs inside the caller's transaction; returns counts.

    The page is screened first (`leadloop.crm.screening`): values the store cannot hold cost
    only their field or record, and identity found in attributes is hashed or dropped (`pii`
    collects which). `duplicates`: CRM ids this export already gave, reported here.
    `screened`: the page was screened already (by the sync's reader thread); its problems.
    `identities`: its leads' identities hashed already (`_hashed_identities`); those it does
    not hold are hashed here."""
    now = ctx.now()
    if screened is None:
        page, problems, found_pii = screen_page(page, now)
        if pii is not None:
            pii.merge(found_pii)
    else:
        problems = list(screened)
    page = drop_erased(session, source, page)  # `leadloop forget` outlives the CRM record
    counts = PageCounts(leads=0, stages=0, events=0, rejected=0, deleted=0, merged=0, withdrawn=0,
                        deals_deleted=0)
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
    region = ctx.settings.crm.default_region
    written = _write_leads(session, source, object_type, page.leads, region, now, reject,
                           identities or {})
    counts["leads"] = len(written)

    referenced = {s.crm_id for s in page.stages} | {e.crm_id for e in page.events}
    merged_pairs = [(lead.crm_id, m) for lead in page.leads for m in lead.merged_crm_ids]
    # `created`: the leads this page stored first. They have no stage or event rows yet (their
    # foreign key needs the lead first), so theirs are not read to compare, nor are the leads
    # marked changed (written with updated_at = now): on a backfill, where every lead of a page
    # is new, that is a keyed read of stages, one of events and an UPDATE less a page (1.4-1.8 ms
    # for 200 leads, SQLite, 100,000 leads stored). Known by `ingested_at`, which only the page
    # that creates a lead writes: a lead another sync created meanwhile is compared as before.
    # Only the page's own leads count, should an earlier page have had the same clock reading.
    ids, ingested_now = lead_ids_ingested_at(
        session,
        source,
        referenced
        | written
        | set(page.deleted_crm_ids)
        | {m for _, m in merged_pairs},
        now,
    )
    created = {ids[c] for c in written if c in ids} & ingested_now
    counts["merged"], withdrawn = _mark_merged(session, ids, merged_pairs, now)
    counts["withdrawn"] += withdrawn
    counts["deleted"], withdrawn = _mark_deleted(session, ids, page.deleted_crm_ids, now)
    counts["withdrawn"] += withdrawn
    if page.deleted_deal_ids:
        counts["deals_deleted"] = _forget_deals(session, source, page.deleted_deal_ids, now)

    counts["stages"], stage_leads = _write_stages(session, ids, page, reject, created)
    counts["events"], event_leads = _write_events(session, ids, page, reject, created)
    _mark_changed(session, (stage_leads | event_leads) - created, now)

    for r in page.rejects:
        reject(r.record_ref, r.reason, r.payload)
    keep_rejects(session, rejects)  # a re-read of the same export adds no copies
    counts["rejected"] = len(rejects)
    return counts


def _write_leads(session: Session, source: str, object_type: str, leads: Sequence[LeadIn],
                 region: str, now: datetime, reject: Reject, identities: Identities
                 ) -> set[str]:
    """Upsert the page's leads (identity hashed); returns their CRM ids."""
    rows = []
    estimated = {lead.crm_id: lead.time_estimated for lead in leads}  # the later row wins
    for lead in leads:
        row, problems = _lead_row(source, lead, region, now, identities)
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
    return {r["crm_id"] for r in rows}


def _mark_merged(session: Session, ids: dict[str, int], merged_pairs: Sequence[tuple[str, str]],
                 now: datetime) -> tuple[int, int]:
    """Link each absorbed lead to its survivor; returns (merged, conversions withdrawn)."""
    if not merged_pairs:
        return 0, 0
    absorbed = [(ids[m], ids[s]) for s, m in merged_pairs if m in ids and s in ids]
    for absorbed_id, survivor_id in absorbed:
        session.execute(
            update(Lead)
            .where(col(Lead.id) == absorbed_id)
            .values(status=LeadStatus.merged, merged_into_id=survivor_id, updated_at=now)
        )
    withdrawn = _withdraw_unsent(
        session, [a for a, _ in absorbed], "lead merged into another CRM record"
    )
    return len(absorbed), withdrawn


def _mark_deleted(session: Session, ids: dict[str, int], deleted_crm_ids: Sequence[str],
                  now: datetime) -> tuple[int, int]:
    """Mark leads deleted in the CRM; returns (deleted, conversions withdrawn)."""
    gone = [ids[c] for c in deleted_crm_ids if c in ids]
    if not gone:
        return 0, 0
    session.execute(
        update(Lead)
        .where(among(session, Lead.id, gone))
        .values(status=LeadStatus.deleted, updated_at=now)
    )
    return len(gone), _withdraw_unsent(session, gone, "lead deleted or archived in the CRM")


def _write_stages(session: Session, ids: dict[str, int], page: Page, reject: Reject,
                  created: set[int]) -> tuple[int, set[int]]:
    """Write the page's stage rows that are new or differ; returns (stage rows read, ids of
    the leads whose stages changed). A stage of a lead not synced is kept as a reject. The
    leads `created` by this page have no stored rows to compare with."""
    # one entry per stage row's key, the last read winning: its row and whether its time is
    # a stand-in
    stage_rows: dict[StageKey, tuple[dict[str, Any], bool]] = {}
    for s in page.stages:
        lead_id = ids.get(s.crm_id)
        if lead_id is None:
            reject(f"{s.deal_id or s.crm_id}", f"stage {s.field}={s.value}: lead {s.crm_id} "
                   "is not synced", {"lead": s.crm_id, "field": s.field, "value": s.value})
            continue
        stage_rows[(lead_id, s.field, s.value, s.deal_id)] = ({
            "lead_id": lead_id, "field": s.field, "value": s.value, "entered_at": s.entered_at,
            "deal_id": s.deal_id, "amount": s.amount, "currency": s.currency,
            "is_lost": s.is_lost,
        }, s.time_estimated)
    # Only stage rows that are new or differ are written. They are compared here rather than
    # found with RETURNING, which made psycopg re-parse a long multi-row statement per page.
    stored = _stored_stages(session, {key[0] for key in stage_rows} - created)
    parts: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for key, (row, stand_in) in stage_rows.items():
        if _stage_differs(row, stored.get(key), stand_in):
            parts[stand_in].append(row)
    changed_stages = []
    for stand_in, part in parts.items():
        # A stand-in entered_at is kept once stored: only the deal's facts may change.
        stage_cols = ["amount", "currency", "is_lost"] if stand_in else [
            "entered_at", "amount", "currency", "is_lost"]
        upsert(session, StageChange, part, conflict=("lead_id", "field", "value", "deal_id"),
               update=stage_cols)
        changed_stages += part
    return len(stage_rows), {r["lead_id"] for r in changed_stages}


def _write_events(session: Session, ids: dict[str, int], page: Page, reject: Reject,
                  created: set[int]) -> tuple[int, set[int]]:
    """Add the page's events the leads do not have yet; returns (events read, ids of the leads
    that got one). An event of a lead not synced is kept as a reject. The leads `created` by
    this page have no stored events."""
    event_rows: list[dict[str, Any]] = []
    stand_in_events: list[dict[str, Any]] = []
    for e in page.events:
        lead_id = ids.get(e.crm_id)
        if lead_id is None:
            reject(e.crm_id, f"event {e.name}: lead {e.crm_id} is not synced", {"event": e.name})
            continue
        (stand_in_events if e.time_estimated else event_rows).append(
            {"lead_id": lead_id, "name": e.name, "occurred_at": e.occurred_at, "value": e.value})
    known = _stored_events(session, {r["lead_id"] for r in event_rows + stand_in_events} - created)
    new_events = [r for r in event_rows if (r["lead_id"], r["name"], r["occurred_at"]) not in known]
    if stand_in_events:
        # A stand-in time would differ on every re-read: an event the lead already has (under
        # any time) is not added again.
        named = {(lead_id, name) for lead_id, name, _ in known}
        new_events += [r for r in stand_in_events if (r["lead_id"], r["name"]) not in named]
    insert_ignore(session, LeadEvent, new_events, conflict=("lead_id", "name", "occurred_at"))
    return len(event_rows) + len(stand_in_events), {r["lead_id"] for r in new_events}


def _mark_changed(session: Session, lead_ids_: set[int], now: datetime) -> None:
    """A new or changed stage or event changes what the lead is worth: mark the lead changed
    for the jobs downstream."""
    for part in _chunks(sorted(lead_ids_)):
        session.execute(
            update(Lead).where(among(session, Lead.id, part),
                               col(Lead.updated_at) != now)  # leads this page wrote already are marked
            .values(updated_at=now)
        )


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
    run = _Run(ctx, source, ctx.now())
    for stream in source.streams():
        since = _begin_stream(ctx, source.name, stream, run.started_at)
        if not _sync_stream(run, stream, since):
            break
        _finish_stream(ctx, source.name, stream)
    return _with_pii_summary(run.totals, run.pii)


@dataclass
class _Run:
    """One sync of a source: what it has counted so far."""

    ctx: Context
    source: CrmSource
    started_at: datetime
    totals: dict[str, Any] = field(default_factory=lambda: {"pages": 0})
    pii: PiiActions = field(default_factory=PiiActions)
    analyzed: bool = False  # statistics of new tables taken (once a backfill is under way)

    def add(self, counts: PageCounts) -> None:
        self.totals["pages"] += 1
        _add_counts(self.totals, counts)
        if not self.analyzed and self.totals.get("leads", 0) >= _ANALYZE_AFTER_LEADS:
            self.analyzed = True
            if fresh := analyze_unanalyzed(self.ctx.engine, (Lead, StageChange, LeadEvent)):
                log.info("took statistics of the new tables %s", ", ".join(fresh))


def _begin_stream(ctx: Context, source: str, stream: str, started_at: datetime) -> Cursor | None:
    """Record the stream's start; returns where to read from (None: backfill)."""
    lookback = timedelta(minutes=ctx.settings.crm.lookback_minutes)
    with session_scope(ctx.engine) as session:
        state = session.get(SyncState, (source, stream)) or SyncState(
            source=source, object_type=stream
        )
        state.last_started_at = started_at
        state.last_job_run_id = ctx.job_run_id
        session.add(state)
        since = (
            Cursor(state.cursor_updated_at - lookback, "")
            if state.cursor_updated_at is not None
            else None
        )
    log.info("sync %s/%s from %s", source, stream,
             since.updated_at.isoformat() if since else "the beginning (backfill)")
    return since


def _sync_stream(run: _Run, stream: str, since: Cursor | None) -> bool:
    """Read and store one stream page by page; False when a stop was requested."""
    ctx, source = run.ctx, run.source
    # The next page is read while this one is written: reading waits on the CRM, writing
    # on the database, and the two overlap.
    # Pages are screened (and their identities hashed) in the reader thread too, while the
    # previous one is written.
    # The connector reads in its own thread and never touches the store: what it needs to
    # know of the store is handed over as a lookup that reads with its own sessions.
    stored = (_StoredLeads(ctx, source.name, read_all=since is None)
              if stream in source.needs_stored_ids else no_stored_ids)
    fetched = source.fetch(stream, since, started_at=run.started_at, stored_ids=stored)
    pages = prefetched(_screened(ctx, fetched), name=f"sync-{source.name}-{stream}")
    seen: set[str] = set()  # CRM ids of a whole-export stream (a CSV file) read so far
    with track(f"sync {source.name} {stream}") as progress, closing(pages):
        for page, problems, found_pii, identities in pages:
            run.pii.merge(found_pii)
            repeated = duplicate_ids(page.leads, seen) if page.cursor is None else []
            run.add(_store_page(ctx, source.name, stream, page, run.started_at, repeated,
                                problems, identities))
            if page.total is not None:
                progress.set_total(page.total)
            progress.advance(len(page.leads) or page.size)
            if ctx.stopping:
                log.info("stop requested: sync ends after a committed page")
                return False
    return True


def _finish_stream(ctx: Context, source: str, stream: str) -> None:
    with session_scope(ctx.engine) as session:
        state = session.get(SyncState, (source, stream))
        if state is not None:
            state.last_success_at = utcnow()
            session.add(state)


class _StoredLeads:
    """Which CRM ids are stored as leads of `source` (a connector's `StoredIds`). A backfill
    asks about most of the leads, so they are read all at once, here; an incremental sync asks
    about a few hundred, each page's with one keyed read (reading every CRM id of a million-lead
    store cost most of an incremental sync). Called from the reader thread: its own sessions."""

    def __init__(self, ctx: Context, source: str, *, read_all: bool) -> None:
        self.engine, self.source = ctx.engine, source
        self.every: frozenset[str] | None = None
        if read_all:
            with session_scope(ctx.engine) as session:
                self.every = frozenset(session.execute(
                    select(col(Lead.crm_id)).where(col(Lead.source) == source)).scalars())

    def __call__(self, crm_ids: Collection[str]) -> AbstractSet[str]:
        if self.every is not None:
            return self.every.intersection(crm_ids)
        with session_scope(self.engine) as session:
            return lead_ids(session, self.source, crm_ids).keys()


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
              ) -> Iterator[tuple[Page, list[Problem], PiiActions, Identities]]:
    region = ctx.settings.crm.default_region
    try:
        for page in pages:
            screened, problems, found_pii = screen_page(page, ctx.now())
            yield screened, problems, found_pii, _hashed_identities(screened.leads, region)
    finally:
        close = getattr(pages, "close", None)
        if close is not None:
            close()


def _store_page(ctx: Context, source: str, stream: str, page: Page, started_at: datetime,
                duplicates: Sequence[str], problems: Sequence[Problem],
                identities: Identities) -> PageCounts:
    """Write a page with its cursor in one transaction. When the store refuses it, the page is
    written in halves (each a transaction; the cursor moves with the last), down to the single
    record it refuses, which is kept in `rejected_record`: one poison record costs itself."""
    try:
        with session_scope(ctx.engine) as session:
            counts = apply_page(session, ctx, source, stream, page, duplicates=duplicates,
                                screened=problems, identities=identities)
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
    totals = PageCounts()
    for part in parts:
        _add_counts(totals, _store_page(ctx, source, stream, part, started_at, duplicates,
                                        problems, identities))
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
                    problem: str, problems: Sequence[Problem]) -> PageCounts:
    """Keep the records of a page the store refused as rejects (with the problems screening
    found in them), and move the cursor past them."""
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
    return PageCounts(rejected=len(refs))


def _advance_stream(session: Session, source: str, stream: str, cursor: Cursor | None,
                    started_at: datetime) -> None:
    state = session.get_one(SyncState, (source, stream))
    _advance(state, cursor, started_at)
    session.add(state)
