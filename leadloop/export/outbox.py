"""Build and refresh the outbox (`conversion` rows) from the store.

One row per (destination, lead, stage, revision). Its `order_id` is a content hash of
(destination, source, crm_id, stage, revision), so however often this runs, crashes half-way or
runs in two processes at once, a conversion only ever has one id: rows are inserted with
`ON CONFLICT DO NOTHING`, and the platforms deduplicate on the same id.

Which CRM facts make a conversion (`[[stages]]` in the config):

- a stage matches `StageChange` rows whose value is one of `crm_values` in `field`; without
  `field`, both the CRM's lead stage property (lead rows) and its deal stage property (deal rows)
  are searched. The earliest entry per lead is the conversion; its time is `entered_at`.
- value: a fixed number; `"deal_amount"` (that deal's amount, else `default_value`, else the row
  is held with `no_value`); `"predicted"` (the lead's latest score's expected value, else held
  with `no_score`).

After a row was sent it is never edited; later truth becomes a new revision (for destinations
that take that kind of adjustment): `retraction` when the lead was deleted or merged away, or the
deal that made a deal-stage conversion was later closed lost; `restatement` when a fixed or
deal-amount value changed. Predicted values are not restated: a re-scored model is not new
information about the conversion. Rows not yet sent simply follow the store (refreshed, or
withdrawn when the lead is gone).

A value that is not a finite number within the stage's `min_value`..`max_value` (negative, NaN,
infinite, a typo of 1e308) is never sent: the row is held with `value_out_of_range` (and stores no
value) until the CRM has a sane one; a sent conversion is not restated to such a value.

The export passes each destination's platform rules to the build (`build(..., rules=...)`): a
row is inserted or refreshed already held or pending, decided from the lead and stage facts the
build holds, instead of every unsent row being read back and updated after it (at 100,000 leads
that pass cost more than the build). Rows the build does not look at are listed for the caller
to check (`Build.unchecked`).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any

import numpy as np
from sqlalchemy import Select, and_, bindparam, func, or_, select, union, update
from sqlmodel import Session

from leadloop.config import Settings, StageConfig
from leadloop.export import transitions
from leadloop.export.base import OutRow
from leadloop.export.registry import click_preference
from leadloop.store import among, bind_values, executemany, upsert_columns
from leadloop.tables import (
    Conversion,
    ConversionKind,
    ConversionStatus,
    Lead,
    LeadStatus,
    Score,
    StageChange,
)

UNSENT = (ConversionStatus.pending, ConversionStatus.held, ConversionStatus.failed)
BUILD_RULES = frozenset({"no_score", "no_value", "value_out_of_range"})  # decided by the outbox
ALL_ADJUSTMENTS = frozenset({ConversionKind.restatement.value, ConversionKind.retraction.value})
_CENT = Decimal("0.01")
_INSERT_CHUNK = 10_000  # new rows are written as they are built, in the same transaction: bounded memory
_LEAD_CHUNK = 50_000  # lead ids per build step
_KEYED_LEADS = 5_000  # changed leads of a step up to which they are read by their ids
Scope = Callable[[Any], Any]  # a column of lead ids -> the condition that keeps this step's leads
Decide = Callable[[OutRow, datetime], "str | None"]  # a destination's hold rule (`hold_rule`)
CHECKED = (ConversionStatus.pending, ConversionStatus.held)  # the statuses platform rules decide
# Enum members read once (an enum attribute costs a lookup per row of the build loop)
_ACTIVE, _CONVERSION = LeadStatus.active, ConversionKind.conversion.value
_HELD, _PENDING = ConversionStatus.held, ConversionStatus.pending
# What a lead contributes to an `OutRow`, in the dataclass's order (its last fields).
_ROW_FIELDS = tuple(f.name for f in fields(OutRow))
LEAD_FIELDS = _ROW_FIELDS[_ROW_FIELDS.index("crm_id"):]


def order_id(destination: str, source: str, crm_id: str, stage: str, revision: int) -> str:
    """Deterministic, PII-free id (32 hex chars) shared by us and the platform for dedup."""
    key = "\x1f".join((destination, source, crm_id, stage, str(revision)))
    return hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass(slots=True)
class _Fact:
    entered_at: datetime
    amount: Decimal | None
    currency: str | None
    deal_id: str
    lost_after: bool = False


@dataclass(slots=True)
class _Lead:
    source: str
    crm_id: str
    status: str
    row: tuple[Any, ...]  # its `LEAD_FIELDS` values (click ids, hashes, consent), for an `OutRow`


@dataclass
class Build:
    """What a build did: its counts, and per destination the unsent rows it did not decide the
    platform rules of (rows of a stage no longer mapped to the destination, older revisions);
    every other pending or held row of the leads it built was decided while building."""

    counts: dict[str, int]
    unchecked: dict[str, list[int]] = field(default_factory=dict)


def changed_leads(since: datetime) -> Select[Any]:
    """Ids of leads re-synced, given a new stage or event, erased, or re-scored at or after
    `since`: the only leads whose conversions can have changed since a build at `since`."""
    lead = Lead.__table__  # type: ignore[attr-defined]
    score = Score.__table__  # type: ignore[attr-defined]
    return union(
        select(lead.c.id).where(lead.c.updated_at >= since),
        select(score.c.lead_id).where(score.c.scored_at >= since),
    )  # type: ignore[return-value]


def _stage_facts(session: Session, settings: Settings, stage: StageConfig, scope: Scope
                 ) -> dict[int, _Fact]:
    crm = settings.crm
    sc = StageChange.__table__  # type: ignore[attr-defined]
    if stage.field:
        cond = sc.c.field == stage.field
    else:
        cond = or_(and_(sc.c.field == crm.lead_stage_property, sc.c.deal_id == ""),
                   and_(sc.c.field == crm.deal_stage_property, sc.c.deal_id != ""))
    facts: dict[int, _Fact] = {}
    rows = _fetch(session,
        select(sc.c.lead_id, sc.c.entered_at, sc.c.amount, sc.c.currency, sc.c.deal_id)
        .where(cond, sc.c.value.in_(stage.crm_values), scope(sc.c.lead_id))
        .order_by(sc.c.lead_id, sc.c.entered_at)
    )
    for lead_id, entered_at, amount, currency, deal_id in rows:
        if lead_id not in facts:
            facts[lead_id] = _Fact(entered_at, amount, currency, deal_id)
    deal_facts = {f.deal_id: lid for lid, f in facts.items() if f.deal_id}
    if deal_facts:
        lost = _fetch(session, select(sc.c.lead_id, sc.c.deal_id, sc.c.entered_at).where(
            sc.c.is_lost.is_(True), scope(sc.c.lead_id)))
        for lead_id, deal_id, entered_at in lost:
            fact = facts.get(lead_id)
            if fact and fact.deal_id == deal_id and entered_at >= fact.entered_at:
                fact.lost_after = True
    return facts


def _latest_scores(session: Session, scope: Scope) -> dict[int, tuple[Decimal | None, str | None]]:
    """Each lead's latest expected value and its currency (the store keeps one score per lead)."""
    stmt = select(Score.lead_id, Score.expected_value, Score.currency  # type: ignore[call-overload]
                  ).where(scope(Score.lead_id))
    return {lead_id: (ev, cur) for lead_id, ev, cur in _fetch(session, stmt)}


def _in_bounds(stage: StageConfig, value: Decimal | None) -> bool:
    if value is None:
        return True
    value = Decimal(value)
    low, high = _bounds(stage.min_value, stage.max_value)
    return value.is_finite() and low <= value <= high


@lru_cache(maxsize=64)
def _bounds(low: float, high: float) -> tuple[Decimal, Decimal]:
    return Decimal(str(low)), Decimal(str(high))


def _value(stage: StageConfig, fact: _Fact, scores: dict[int, Any], lead_id: int
           ) -> tuple[Decimal | None, str, str | None]:
    """(value, currency, build hold rule); an out-of-range value is dropped and held."""
    value, currency, hold = _raw_value(stage, fact, scores, lead_id)
    if not _in_bounds(stage, value):
        return None, currency, "value_out_of_range"
    return value, currency, hold


def _raw_value(stage: StageConfig, fact: _Fact, scores: dict[int, Any], lead_id: int
               ) -> tuple[Decimal | None, str, str | None]:
    if stage.value == "deal_amount":
        amount = fact.amount
        if amount is None and stage.default_value is not None:
            amount = Decimal(str(stage.default_value))
        currency = (fact.currency or stage.currency).upper()
        return amount, currency, None if amount is not None else "no_value"
    if stage.value == "predicted":
        ev, cur = scores.get(lead_id, (None, None))
        return ev, (cur or stage.currency).upper(), None if ev is not None else "no_score"
    return Decimal(str(stage.value)), stage.currency, None


def _changed(a: Decimal | None, b: Decimal | None) -> bool:
    if a is None or b is None:
        return a is not b
    return abs(Decimal(a) - Decimal(b)) >= _CENT


def build_outbox(session: Session, settings: Settings, destinations: dict[str, bool | frozenset[str]],
                 now: datetime, job_run_id: int | None = None,
                 changed_since: datetime | None = None) -> dict[str, int]:
    """Insert new conversions and revisions, refresh or withdraw unsent ones; the counts (see
    `build`). Platform rules are left to the caller: new rows are pending unless the build
    itself holds them."""
    return build(session, settings, destinations, now, job_run_id, changed_since).counts


def build(session: Session, settings: Settings, destinations: dict[str, bool | frozenset[str]],
          now: datetime, job_run_id: int | None = None, changed_since: datetime | None = None,
          rules: dict[str, Decide] | None = None) -> Build:
    """Insert new conversions and revisions, refresh or withdraw unsent ones.

    `destinations` maps each enabled destination name to the adjustments it takes (a set of
    "restatement"/"retraction"; True means both, False none). With
    `changed_since`, only leads changed since then are looked at (see `changed_leads`); the
    result is the same as a full build when the previous build ran at `changed_since`.
    Leads are taken in ranges of `_LEAD_CHUNK` ids, so memory stays flat with the store's size.

    With `rules` (destination name -> its hold rule at `now`), each pending or held row the
    build writes or looks at is held or released by its destination's platform rules as it is
    built, from the lead and stage facts in hand, instead of being read back afterwards; rows
    held by the build itself (`BUILD_RULES`) are not platform-checked, as before. The rows it
    did not decide are in `Build.unchecked`.
    Counts: built (new rows), revisions, refreshed, withdrawn.
    """
    result = Build(dict.fromkeys(("built", "revisions", "refreshed", "withdrawn"), 0))
    stages = [s for s in settings.stages if any(d in destinations for d in s.destinations)]
    if not stages:
        return result
    for scope in _steps(session, changed_since):
        _build_part(session, settings, stages, destinations, now, job_run_id, scope, result, rules)
    return result


def _steps(session: Session, changed_since: datetime | None) -> Iterator[Scope]:
    """The build's steps: the leads in ranges of `_LEAD_CHUNK` ids. With `changed_since`, only
    the ranges holding changed leads, each narrowed to them: by their ids when they are few
    (every read of the step is then keyed), else by the changed-leads query. Narrowing every
    range by that query alone read each range's conversions through the index, which made an
    incremental build of a few hundred changed leads cost a pass over a million-lead outbox."""
    lead = Lead.__table__  # type: ignore[attr-defined]
    # min and max apart: SQLite reads the whole index for both in one statement
    low = session.execute(select(func.min(lead.c.id))).scalar()
    if low is None:
        return
    if changed_since is None:
        high = session.execute(select(func.max(lead.c.id))).scalar_one()
        for start in range(low, high + 1, _LEAD_CHUNK):
            yield _in_range(start)
        return
    changed = changed_leads(changed_since)
    ids = np.fromiter(session.execute(changed).scalars(), dtype=np.int64)
    ids.sort()
    steps = (ids - low) // _LEAD_CHUNK
    for part in np.split(ids, np.flatnonzero(np.diff(steps)) + 1) if ids.size else []:
        if part.size <= _KEYED_LEADS:
            yield _among(session, part.tolist())
        else:
            yield _in_range(low + int(part[0] - low) // _LEAD_CHUNK * _LEAD_CHUNK, changed)


def _in_range(start: int, changed: Any = None) -> Scope:
    """The step of the leads from id `start`; only the `changed` ones when given."""
    def scope(column: Any) -> Any:
        in_range = column.between(start, start + _LEAD_CHUNK - 1)
        return in_range if changed is None else and_(in_range, column.in_(changed))
    return scope


def _among(session: Session, lead_ids: list[int]) -> Scope:
    """The step of these leads."""
    return lambda column: among(session, column, lead_ids)


def _build_part(session: Session, settings: Settings, stages: list[StageConfig],
                destinations: dict[str, bool | frozenset[str]], now: datetime, job_run_id: int | None,
                scope: Scope, result: Build, rules: dict[str, Decide] | None) -> None:
    """`build` for the leads in `scope`; adds to `result`."""
    counts = result.counts
    scores = _latest_scores(session, scope) if any(s.value == "predicted" for s in stages) else {}
    facts = {s.name: _stage_facts(session, settings, s, scope) for s in stages}

    conv = Conversion.__table__  # type: ignore[attr-defined]
    existing: dict[tuple[str, int, str], list[Any]] = defaultdict(list)
    cols = ("id", "order_id", "destination", "lead_id", "stage", "revision", "kind", "status",
            "conversion_action", "conversion_time", "value", "currency", "click_id_kind",
            "click_id", "hold_rule", "created_at")
    for row in session.execute(
        select(*[conv.c[c] for c in cols])
        .where(conv.c.destination.in_(list(destinations)), scope(conv.c.lead_id))
        .order_by(conv.c.revision)
    ).all():
        existing[(row.destination, row.lead_id, row.stage)].append(row)

    leads = _load_leads(session, scope)
    visited: set[tuple[str, int, str]] = set()  # keys with existing rows that were built

    new = _NewRows(now, job_run_id)
    updates: list[dict[str, Any]] = []
    for stage in stages:
        stage_facts = facts[stage.name]
        values: dict[int, tuple[Decimal | None, str, str | None]] = {}  # the same for every destination
        for dest, action in stage.destinations.items():
            if dest not in destinations:
                continue
            clicks = [(name, LEAD_FIELDS.index(name))
                      for name in click_preference(settings.destination_kind(dest))]
            takes = destinations[dest]
            adjustable = ALL_ADJUSTMENTS if takes is True else (takes or frozenset())
            decide = rules.get(dest) if rules is not None else None
            keys = set(stage_facts) | {k[1] for k in existing if k[0] == dest and k[2] == stage.name}
            for lead_id in keys:
                lead = leads.get(lead_id)
                if lead is None:
                    continue
                fact = stage_facts.get(lead_id)
                gone = lead.status != _ACTIVE
                retract = gone or fact is None or fact.lost_after
                value, currency, hold = (None, stage.currency, None)
                if fact is not None:
                    known = values.get(lead_id)
                    if known is None:
                        known = values[lead_id] = _value(stage, fact, scores, lead_id)
                    value, currency, hold = known
                click_kind, click_id = _click(clicks, lead.row)
                rows = existing.get((dest, lead_id, stage.name))
                if not rows:
                    if retract:
                        continue
                    assert fact is not None
                    oid = order_id(dest, lead.source, lead.crm_id, stage.name, 0)
                    stored_currency = currency if value is not None else None
                    rule = hold
                    if decide is not None and hold is None:
                        rule = decide(OutRow(0, oid, oid, _CONVERSION, 0,
                                             stage.name, action, fact.entered_at, value,
                                             stored_currency, now, *lead.row), now)
                    new.add(session, oid, dest, lead_id, stage.name, 0, _CONVERSION, action,
                            fact.entered_at, value, stored_currency, click_kind, click_id,
                            _HELD if rule else _PENDING, rule)
                    counts["built"] += 1
                    continue
                visited.add((dest, lead_id, stage.name))
                latest = rows[-1]
                sent = [r for r in rows if r.status == ConversionStatus.sent]
                last_sent = sent[-1] if sent else None
                wanted = None
                if last_sent is not None and adjustable:
                    wanted = _adjustment(stage, last_sent, retract, value)
                    if wanted is not None and wanted[0] not in adjustable:
                        wanted = None  # e.g. Data Manager restates but cannot retract
                if latest.status in UNSENT:
                    if last_sent is None:
                        if retract:
                            updates.append(_withdraw(latest, "lead gone or stage no longer true"))
                            counts["withdrawn"] += 1
                            continue
                        assert fact is not None
                        change = _refresh(latest, action, fact.entered_at, value, currency, hold,
                                          click_kind, click_id)
                    elif wanted is None:
                        updates.append(_withdraw(latest, "adjustment no longer needed"))
                        counts["withdrawn"] += 1
                        continue
                    else:
                        change = _refresh(latest, latest.conversion_action,
                                          latest.conversion_time, wanted[1],
                                          currency if wanted[1] is not None else None, None,
                                          click_kind, click_id)
                        if latest.kind != wanted[0]:
                            change = {**(change or {"id": latest.id}), "kind": wanted[0]}
                    if change:
                        counts["refreshed"] += 1
                    if decide is not None:
                        change = _checked(decide, now, latest, change, lead,
                                          order_id(dest, lead.source, lead.crm_id, stage.name, 0))
                    if change:
                        updates.append(change)
                elif latest.status == ConversionStatus.sent and wanted is not None:
                    first = rows[0]
                    rev = latest.revision + 1
                    oid = order_id(dest, lead.source, lead.crm_id, stage.name, rev)
                    stored_currency = currency if wanted[1] is not None else None
                    rule = None
                    if decide is not None:
                        rule = decide(OutRow(0, oid, first.order_id, wanted[0], rev, stage.name,
                                             first.conversion_action, first.conversion_time,
                                             wanted[1], stored_currency, now, *lead.row), now)
                    new.add(session, oid, dest, lead_id, stage.name, rev, wanted[0],
                            first.conversion_action, first.conversion_time, wanted[1],
                            stored_currency, click_kind, click_id,
                            _HELD if rule else _PENDING, rule)
                    counts["revisions"] += 1
    new.flush(session)
    bulk_update(session, updates, job_run_id)
    if rules is not None:
        for key, key_rows in existing.items():
            # the latest row of a key built above was decided; any other unsent row was not
            undecided = key_rows[:-1] if key in visited else key_rows
            result.unchecked.setdefault(key[0], []).extend(
                r.id for r in undecided if r.status in CHECKED)


def _checked(decide: Decide, now: datetime, latest: Any, change: dict[str, Any] | None,
             lead: _Lead, first_order_id: str) -> dict[str, Any] | None:
    """`change` of unsent row `latest`, with the status and hold its platform rules give the
    row as changed (what a rule check reading the row back would write); a row held by the
    build itself or waiting for a retry is left to the build and the send."""
    now_row = {**latest._mapping, **(change or {})}
    if now_row["status"] not in CHECKED or now_row["hold_rule"] in BUILD_RULES:
        return change
    kind = now_row["kind"]
    row = OutRow(latest.id, latest.order_id,
                 latest.order_id if latest.revision == 0 else first_order_id,
                 str(kind.value if hasattr(kind, "value") else kind), latest.revision,
                 latest.stage, now_row["conversion_action"], now_row["conversion_time"],
                 now_row["value"], now_row["currency"], latest.created_at, *lead.row)
    rule_change = transitions.rule_change(latest.id, now_row["hold_rule"], decide(row, now))
    if rule_change is None:
        return change
    return {**(change or {}), **rule_change}


class _NewRows:
    """New outbox rows, inserted every `_INSERT_CHUNK` rows in the build's transaction (bounded
    memory) column by column. The columns all new rows share are bound once."""

    COLUMNS = ("order_id", "destination", "lead_id", "stage", "revision", "kind",
               "conversion_action", "conversion_time", "value", "currency", "click_id_kind",
               "click_id", "status", "hold_rule")

    def __init__(self, now: datetime, job_run_id: int | None) -> None:
        self.rows: list[tuple[Any, ...]] = []
        self.shared = {"attempts": 0, "platform_response": {}, "created_at": now,
                       "job_run_id": job_run_id}
        # driver-ready values by column, kept across chunks of this build step: a stage's time
        # comes back for each of its destinations, chunks apart
        self.memos: dict[str, dict[Any, Any]] = {name: {} for name in self.COLUMNS}

    def add(self, session: Session, *values: Any) -> None:
        """One row: its values in `COLUMNS` order."""
        self.rows.append(values)
        if len(self.rows) >= _INSERT_CHUNK:
            self.flush(session)

    def flush(self, session: Session) -> None:
        if self.rows:
            columns = dict(zip(self.COLUMNS, map(list, zip(*self.rows, strict=True)), strict=True))
            _insert_new(session, columns, self.shared, self.memos)
        self.rows.clear()


def _insert_new(session: Session, columns: dict[str, list[Any]], shared: dict[str, Any],
                memos: dict[str, dict[Any, Any]]) -> None:
    """Insert new outbox rows (`columns`, plus the values every row has in `shared`), skipping
    an order id already there (`ON CONFLICT DO NOTHING`), written column by column
    (`store.upsert_columns`; `memos`: each column's values converted so far)."""
    upsert_columns(session, Conversion, columns, shared=shared, conflict=("order_id",), update=(),
                   memos=memos)


def _adjustment(stage: StageConfig, last_sent: Any, retract: bool, value: Decimal | None
                ) -> tuple[str, Decimal | None] | None:
    if last_sent.kind == ConversionKind.retraction:
        return None
    if retract:
        return ConversionKind.retraction.value, None
    if stage.value != "predicted" and value is not None and _changed(value, last_sent.value):
        return ConversionKind.restatement.value, value
    return None


def _withdraw(row: Any, reason: str) -> dict[str, Any]:
    return {"id": row.id, "status": ConversionStatus.withdrawn, "last_error": reason}


def _refresh(row: Any, action: str, when: datetime, value: Decimal | None, currency: str | None,
             hold: str | None, click_kind: str | None, click_id: str | None) -> dict[str, Any] | None:
    change: dict[str, Any] = {}
    if row.conversion_action != action:
        change["conversion_action"] = action
    if row.conversion_time != when:
        change["conversion_time"] = when
    if _changed(value, row.value):
        change["value"] = value
    want_currency = currency if value is not None else None
    if row.currency != want_currency:
        change["currency"] = want_currency
    if (row.click_id_kind, row.click_id) != (click_kind, click_id):
        change["click_id_kind"], change["click_id"] = click_kind, click_id
    if hold and row.hold_rule != hold:
        change["status"], change["hold_rule"] = ConversionStatus.held, hold
    elif not hold and row.hold_rule in BUILD_RULES:
        change["status"], change["hold_rule"] = ConversionStatus.pending, None
    return {"id": row.id, **change} if change else None


def _click(clicks: list[tuple[str, int]], row: tuple[Any, ...]) -> tuple[str | None, str | None]:
    """The first click id of `clicks` (name, its index in a lead's `row`) the lead has."""
    for name, i in clicks:
        if row[i]:
            return name, row[i]
    return None, None


def _load_leads(session: Session, scope: Scope) -> dict[int, _Lead]:
    """The leads in `scope`, with what each contributes to an `OutRow`."""
    lead = Lead.__table__  # type: ignore[attr-defined]
    row_cols = [lead.c.created_at if n == "lead_created_at" else lead.c[n] for n in LEAD_FIELDS]
    stmt = select(lead.c.id, lead.c.source, lead.c.crm_id, lead.c.status, *row_cols
                  ).where(scope(lead.c.id))
    return {row[0]: _Lead(row[1], row[2], row[3], row[4:]) for row in _fetch(session, stmt)}


def _fetch(session: Session, stmt: Any) -> list[tuple[Any, ...]]:
    """All rows of `stmt` as tuples holding what SQLAlchemy's rows would (each column's type
    conversion: aware UTC times, enums, booleans, decimals), with each distinct value of a
    column converted once and no `Row` object per row: about 3x faster on the outbox's wide
    reads of 100,000s of rows. For columns of scalar values (not JSON)."""
    result = session.connection().execute(stmt)
    try:
        description = result.cursor.description
        raw = result.cursor.fetchall()
    finally:
        result.close()
    dialect = session.get_bind().dialect
    converters: list[tuple[int, Callable[[Any], Any], dict[Any, Any]]] = []
    for i, (column, described) in enumerate(zip(stmt.selected_columns, description, strict=True)):
        process = column.type.dialect_impl(dialect).result_processor(dialect, described[1])
        if process is not None:
            converters.append((i, process, {}))
    if not converters:
        return list(raw)
    out = []
    for row in raw:
        values = list(row)
        for i, process, memo in converters:
            value = values[i]
            if value is not None:
                done = memo.get(value, _MISSING)
                if done is _MISSING:
                    done = memo[value] = process(value)
                values[i] = done
        out.append(tuple(values))
    return out


def bulk_update(session: Session, updates: list[dict[str, Any]], job_run_id: int | None
                 ) -> None:
    """Update outbox rows by id, stamping each with the job run that wrote it (the report's
    change mark, see `freshness.py`): one driver-level executemany per set of columns and chunk
    (the ORM's bulk update by primary key spent ~50 µs a row building parameters), as a
    prepared statement on PostgreSQL (`_prepared`)."""
    by_keys: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for u in updates:
        by_keys[tuple(sorted(k for k in u if k != "id"))].append(u)
    conv = Conversion.__table__  # type: ignore[attr-defined]
    for keys, group in by_keys.items():
        stmt = update(conv).where(conv.c.id == bindparam("row_id")).values(
            {k: bindparam(f"v_{k}") for k in (*keys, "job_run_id")})
        for i in range(0, len(group), _INSERT_CHUNK):
            part = group[i : i + _INSERT_CHUNK]
            columns = {f"v_{k}": bind_values(session, conv.c[k], [u[k] for u in part]) for k in keys}
            columns["v_job_run_id"] = [job_run_id] * len(part)
            columns["row_id"] = [u["id"] for u in part]
            with _prepared(session):
                executemany(session, stmt, columns)


# Whether `bulk_update` prepares its statement on PostgreSQL (bench/outbox_update.py turns it off
# to measure the difference).
PREPARED_UPDATES = True


@contextmanager
def _prepared(session: Session) -> Iterator[None]:
    """On PostgreSQL, the statements run inside are prepared on the server from their first run.
    `make_engine` turns psycopg's prepares off (a plan made for a nearly empty table could
    stay); an UPDATE by primary key has one plan whatever the table holds, and prepared, the
    server parses and plans it once per chunk instead of once per row: 25-35 % faster
    (bench/outbox_update.py)."""
    if not PREPARED_UPDATES or session.get_bind().dialect.name != "postgresql":
        yield
        return
    driver: Any = session.connection().connection.driver_connection
    was = driver.prepare_threshold
    driver.prepare_threshold = 0
    try:
        yield
    finally:
        driver.prepare_threshold = was


_MISSING = object()


def load_rows(session: Session, destination: str, statuses: Sequence[ConversionStatus],
              *, due_before: datetime | None = None, where: Any = None) -> list[OutRow]:
    """Outbox rows of one destination joined with their lead, oldest first, narrowed by an
    extra `where` clause when given."""
    conv = Conversion.__table__  # type: ignore[attr-defined]
    lead = Lead.__table__  # type: ignore[attr-defined]
    cond = [conv.c.destination == destination, conv.c.status.in_([s.value for s in statuses])]
    if where is not None:
        cond.append(where)
    if due_before is not None:
        cond.append(or_(conv.c.next_attempt_at.is_(None), conv.c.next_attempt_at <= due_before))
    stmt = (
        select(conv.c.id, conv.c.order_id, conv.c.kind, conv.c.revision, conv.c.stage,
               conv.c.conversion_action, conv.c.conversion_time, conv.c.value, conv.c.currency,
               conv.c.created_at, lead.c.source, lead.c.crm_id,
               lead.c.created_at.label("lead_created_at"), lead.c.gclid, lead.c.gbraid,
               lead.c.wbraid, lead.c.msclkid, lead.c.li_fat_id, lead.c.meta_lead_id,
               lead.c.email_sha256, lead.c.email_google_sha256, lead.c.phone_e164_sha256,
               lead.c.phone_digits_sha256, lead.c.consent_ad_user_data,
               lead.c.consent_ad_personalization)
        .join(lead, lead.c.id == conv.c.lead_id)
        .where(*cond)
        .order_by(conv.c.id)
    )
    out = []
    names = [str(c.key) for c in stmt.selected_columns]
    for r in _fetch(session, stmt):
        m = dict(zip(names, r, strict=True))
        source = m.pop("source")
        kind = m["kind"]
        m["kind"] = str(kind.value if hasattr(kind, "value") else kind)
        m["original_order_id"] = (
            m["order_id"] if m["revision"] == 0
            else order_id(destination, source, m["crm_id"], m["stage"], 0)
        )
        out.append(OutRow(**m))
    return out
