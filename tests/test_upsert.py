"""`store.upsert` binds rows itself (column by column, one driver executemany on SQLite): the rows
it stores must be exactly those SQLAlchemy stored when it bound each row, for every column kind
(times, enums, JSON, numbers, booleans, None) and option (omitted columns' defaults, `update`,
`update=[]`, `when_changed`, keys repeated in a batch, rows with different keys).

The oracle is the former SQLite path, kept here: SQLAlchemy's executemany of the same
INSERT ... ON CONFLICT with a parameter dict per row. Both write the same batches into two stores
and the stored values are compared as SQLite holds them (text of times, 0/1, JSON text)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pandas as pd
import pytest
from sqlalchemy import or_
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, select

from leadloop.store import (
    _bind_processor,
    _sqlite_utc_text,
    _uniform,
    make_engine,
    session_scope,
    upsert,
)
from leadloop.tables import (
    Conversion,
    ConversionKind,
    ConversionStatus,
    Lead,
    LeadEvent,
    LeadStatus,
    RejectedRecord,
    Score,
    StageChange,
    SyncState,
    UTCDateTime,
)

NOW = datetime(2026, 5, 4, 3, 2, 1, 123456, tzinfo=UTC)
CET = timezone(timedelta(hours=1))
BERLIN = ZoneInfo("Europe/Berlin")


@pytest.fixture(autouse=True)
def _fixed_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """Time defaults (`utcnow`) return one instant, so the two stores can be compared."""
    for table in SQLModel.metadata.tables.values():
        for c in table.columns:
            if isinstance(c.type, UTCDateTime) and c.default is not None:
                monkeypatch.setattr(c.default, "arg", lambda _ctx: NOW)


def _sqlalchemy_upsert(session: Session, model: type[SQLModel], rows: Sequence[dict[str, Any]],
                       *, conflict: Sequence[str], update: Sequence[str] | None = None,
                       when_changed: Sequence[str] = ()) -> None:
    """The former SQLite path of `upsert`: SQLAlchemy binds each row."""
    rows = _uniform(rows)
    if not rows:
        return
    table = model.__table__  # type: ignore[attr-defined]
    cols = update if update is not None else [k for k in rows[0] if k not in conflict]
    by_key: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = tuple(row.get(c) for c in conflict)
        if cols or key not in by_key:
            by_key[key] = row
    insert = sqlite.insert(table)
    if cols:
        differs = or_(*(table.c[c].is_distinct_from(insert.excluded[c]) for c in when_changed)
                      ) if when_changed else None
        stmt = insert.on_conflict_do_update(
            index_elements=list(conflict), set_={c: insert.excluded[c] for c in cols}, where=differs)
    else:
        stmt = insert.on_conflict_do_nothing(index_elements=list(conflict))
    session.execute(stmt, list(by_key.values()))


def _lead(crm_id: str, **kw: Any) -> dict[str, Any]:
    return {"source": "hubspot", "crm_id": crm_id, "created_at": datetime(2026, 1, 1, tzinfo=UTC),
            **kw}


def _batches() -> Iterator[tuple[type[SQLModel], list[dict[str, Any]], dict[str, Any]]]:
    """(model, rows, upsert options) in the order written; later ones update earlier rows."""
    lead_key = {"conflict": ("source", "crm_id")}
    # new leads with every column left out that has a default
    yield Lead, [_lead("1"), _lead("9", created_at=datetime(2026, 2, 1, 0, 0, 1, tzinfo=CET))
                 ], lead_key
    # times in several zones, with microseconds and the two instants of Berlin's repeated hour
    # (equal wall times, `fold` apart); enums as members and as text; JSON of several shapes
    every = {"crm_updated_at": None, "status": LeadStatus.active, "gclid": None,
             "consent_ad_user_data": None, "consent_ad_personalization": None, "attributes": {},
             "object_type": "contact", "ingested_at": NOW, "updated_at": NOW}
    yield Lead, [
        _lead("2", **{**every, "created_at": datetime(2026, 3, 1, 12, 0, 0, 999999, tzinfo=CET),
                      "attributes": {"industry": "Software", "seats": 12, "ok": True, "r": 1.0,
                                     "nested": {"list": [1, "two", None, False]},
                                     "text": "Zürich ✓"}}),
        _lead("3", **{**every, "created_at": datetime(2026, 10, 25, 2, 30, tzinfo=BERLIN),
                      "crm_updated_at": datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=BERLIN),
                      "status": LeadStatus.deleted, "consent_ad_user_data": True,
                      "consent_ad_personalization": False}),
        _lead("4", **{**every, "created_at": datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=BERLIN),
                      "crm_updated_at": datetime(2026, 10, 25, 2, 30, tzinfo=BERLIN),
                      "status": "merged", "gclid": "g-4", "attributes": [1, 2]}),
        _lead("5", **{**every, "attributes": None, "object_type": "deal",
                      "ingested_at": NOW - timedelta(days=1),
                      "updated_at": NOW - timedelta(days=1)}),
    ], lead_key
    # JSON scalars that are equal in Python but not in JSON, in one batch
    yield Lead, [_lead("j1", attributes=1), _lead("j2", attributes=True),
                 _lead("j3", attributes=1.0), _lead("j4", attributes="1")], lead_key
    # the sync's update: a repeated key (the last wins), an unchanged row left alone, changed
    # rows updated, a new row; updated_at is written only where a compared column differs
    when = ["created_at", "status", "gclid", "attributes", "consent_ad_user_data"]
    yield Lead, [
        _lead("1", status=LeadStatus.active, gclid=None, attributes={},
              consent_ad_user_data=None, updated_at=NOW),
        _lead("2", created_at=datetime(2026, 3, 1, 11, 0, 0, 999999, tzinfo=UTC),
              status=LeadStatus.active, gclid="first", attributes={}, consent_ad_user_data=None,
              updated_at=NOW),
        _lead("2", created_at=datetime(2026, 3, 1, 11, 0, 0, 999999, tzinfo=UTC),
              status="active", gclid="last", attributes={"b": 1, "a": 2},
              consent_ad_user_data=False, updated_at=NOW),
        _lead("6", status=LeadStatus.active, gclid=None, attributes={},
              consent_ad_user_data=None, updated_at=NOW),
    ], {**lead_key, "update": [*when, "updated_at"], "when_changed": when}
    # update of chosen columns only; rows whose keys differ (the missing ones bind NULL)
    yield Lead, [_lead("3", gclid="g-3"), {**_lead("4"), "utm_source": "google"}, _lead("7")], {
        **lead_key, "update": ["gclid", "utm_source"]}
    # update=[]: insert what is new, never touch what exists; a repeated key keeps the first
    yield Lead, [_lead("1", gclid="ignored"), _lead("8", gclid="first"),
                 _lead("8", gclid="second")], {**lead_key, "update": []}
    stage_key = {"conflict": ("lead_id", "field", "value", "deal_id")}
    yield StageChange, [  # deal_id and is_lost left to their defaults
        {"lead_id": 1, "field": "dealstage", "value": "won", "entered_at": NOW,
         "amount": Decimal("1234.5600"), "currency": "EUR"}], stage_key
    yield StageChange, [
        {"lead_id": 1, "field": "dealstage", "value": "won", "entered_at": NOW, "deal_id": "d1",
         "amount": Decimal("-0.00"), "currency": None, "is_lost": True},
        {"lead_id": 2, "field": "lifecyclestage", "value": "sql", "entered_at": NOW,
         "deal_id": "d2", "amount": 12, "currency": "USD", "is_lost": 0},
        {"lead_id": 3, "field": "dealstage", "value": "won", "entered_at": NOW, "deal_id": "d3",
         "amount": 0.1, "currency": "USD", "is_lost": 1},
        {"lead_id": 4, "field": "dealstage", "value": "won", "entered_at": NOW, "deal_id": "d4",
         "amount": Decimal("12345678.9012"), "currency": "USD", "is_lost": False},
        {"lead_id": 5, "field": "dealstage", "value": "won", "entered_at": NOW, "deal_id": "d5",
         "amount": None, "currency": None, "is_lost": False},
    ], {**stage_key}
    yield StageChange, [
        {"lead_id": 1, "field": "dealstage", "value": "won", "deal_id": "d1",
         "entered_at": NOW + timedelta(hours=1), "amount": Decimal("1.1"), "currency": "EUR",
         "is_lost": False},
        {"lead_id": 1, "field": "dealstage", "value": "won", "deal_id": "d1",
         "entered_at": NOW + timedelta(hours=2), "amount": Decimal("1.10"), "currency": "EUR",
         "is_lost": False},
        {"lead_id": 2, "field": "lifecyclestage", "value": "sql", "deal_id": "d2",
         "entered_at": NOW, "amount": Decimal(7), "currency": "USD", "is_lost": False},
    ], {**stage_key, "update": ["amount", "currency", "is_lost"]}
    yield LeadEvent, [
        {"lead_id": 1, "name": "demo", "occurred_at": NOW, "value": None},
        {"lead_id": 1, "name": "demo", "occurred_at": NOW.astimezone(CET), "value": 2.5},
        {"lead_id": 2, "name": "demo", "occurred_at": NOW, "value": 3},
    ], {"conflict": ("lead_id", "name", "occurred_at"), "update": []}
    yield Score, [
        {"lead_id": 1, "model_version": "m1", "probability": 0.25,
         "expected_value": Decimal("12.3456"), "currency": "EUR", "value_band": "high"},
        {"lead_id": 2, "model_version": "m1", "probability": 1, "expected_value": None,
         "currency": None, "value_band": None},
    ], {"conflict": ("lead_id",)}
    yield Score, [  # a newer model's score replaces the lead's
        {"lead_id": 1, "model_version": "m2", "probability": 0.5,
         "expected_value": Decimal("1"), "currency": "EUR", "value_band": "low",
         "scored_at": NOW + timedelta(days=1)},
    ], {"conflict": ("lead_id",)}
    yield Conversion, [  # status, kind, revision, attempts and created_at by default
        {"order_id": "o-1", "destination": "meta", "lead_id": 1, "stage": "Won",
         "conversion_action": "Won", "conversion_time": NOW, "value": Decimal("10.5"),
         "currency": "EUR", "platform_response": {}}], {"conflict": ("order_id",), "update": []}
    given = {"destination": "meta", "stage": "Won", "conversion_action": "Won", "revision": 0,
             "conversion_time": NOW, "platform_response": {}, "attempts": 0, "sent_at": None,
             "next_attempt_at": None, "hold_rule": None, "created_at": NOW}
    yield Conversion, [
        {**given, "order_id": "o-2", "lead_id": 2, "revision": 1,
         "kind": ConversionKind.restatement, "status": "held", "hold_rule": "no_click",
         "conversion_time": NOW.astimezone(CET), "attempts": 2,
         "platform_response": {"errors": [{"code": 190, "message": "ünïcode"}]}},
        {**given, "order_id": "o-3", "destination": "google", "lead_id": 3, "kind": "retraction",
         "status": ConversionStatus.sent, "sent_at": NOW},
        {**given, "order_id": "o-3", "lead_id": 4, "kind": "conversion",
         "status": ConversionStatus.pending},
    ], {"conflict": ("order_id",), "update": []}
    yield RejectedRecord, [
        {"source": "hubspot", "object_type": "contact", "record_ref": "r1", "reason": "bad",
         "payload": {"email": "[redacted]", "n": 1}}], {"conflict": ("id",), "update": []}
    yield RejectedRecord, [
        {"source": "hubspot", "object_type": "contact", "record_ref": "r2", "reason": "bad",
         "payload": {}, "flow_stage": "export", "job_run_id": 7},
    ], {"conflict": ("id",), "update": []}
    yield SyncState, [
        {"source": "hubspot", "object_type": "contacts", "cursor_updated_at": NOW,
         "cursor_id": "9", "extra": {"after": "x"}},
        {"source": "hubspot", "object_type": "deals"},
    ], {"conflict": ("source", "object_type")}
    yield SyncState, [{"source": "hubspot", "object_type": "deals", "last_job_run_id": 3,
                       "extra": {"k": [1]}}], {"conflict": ("source", "object_type")}


_TABLES = ("lead", "stage_change", "lead_event", "score", "conversion", "rejected_record",
           "sync_state")


def _stored(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the written tables as SQLite holds it, with each value's storage class."""
    with engine.connect() as conn:
        return {name: [tuple((type(v).__name__, v) for v in row) for row in conn.exec_driver_sql(
                    f"SELECT * FROM {name} ORDER BY 1, 2")] for name in _TABLES}


def _write_all(engine: Engine, write: Any) -> None:
    for model, rows, options in _batches():
        with session_scope(engine) as session:
            write(session, model, rows, **options)


def test_upsert_stores_what_sqlalchemy_stored_binding_each_row(tmp_path: Path) -> None:
    ours, oracle = (make_engine(f"sqlite:///{tmp_path / name}.db") for name in ("ours", "oracle"))
    try:
        _write_all(ours, upsert)
        _write_all(oracle, _sqlalchemy_upsert)
        got, want = _stored(ours), _stored(oracle)
    finally:
        ours.dispose()
        oracle.dispose()
    assert {name: len(rows) for name, rows in got.items()} == {
        "lead": 13, "stage_change": 6, "lead_event": 2, "score": 2, "conversion": 3,
        "rejected_record": 2, "sync_state": 2}
    for name in _TABLES:
        assert got[name] == want[name], name


def test_both_dialects_read_back_the_same_rows(engine: Engine, tmp_path: Path) -> None:
    """PostgreSQL's path (COPY through a staging table) stores what SQLite's does."""
    reference = make_engine(f"sqlite:///{tmp_path / 'reference'}.db")
    try:
        _write_all(reference, upsert)
        want = _read_back(reference)
    finally:
        reference.dispose()
    _write_all(engine, upsert)
    assert _read_back(engine) == want


def _read_back(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """The written rows as SQLAlchemy reads them back (aware times, Decimal, parsed JSON,
    enums), without ids (PostgreSQL's sequences skip numbers)."""
    out = {}
    with engine.connect() as conn:
        for model in (Lead, StageChange, LeadEvent, Score, Conversion, RejectedRecord, SyncState):
            table = model.__table__  # type: ignore[attr-defined]
            rows = [{k: v for k, v in row.items() if k != "id"}
                    for row in conn.execute(select(table)).mappings()]
            out[table.name] = sorted(rows, key=repr)
    return out


def test_utc_times_on_sqlite_bind_as_the_type_binds_them(tmp_path: Path) -> None:
    """`_sqlite_utc_text` writes SQLite's DATETIME text itself: the same text as the type's
    own binding for every kind of time (zones, folds, microseconds, first and last years),
    the same error for a naive one, and anything not a plain datetime left to the type."""
    engine = make_engine(f"sqlite:///{tmp_path / 'times'}.db")
    try:
        column = Lead.__table__.c.created_at  # type: ignore[attr-defined]
        fast = _bind_processor(column.type, engine.dialect)
        process = column.type.dialect_impl(engine.dialect).bind_processor(engine.dialect)
    finally:
        engine.dispose()
    assert fast.func is _sqlite_utc_text
    rng = random.Random(17)
    zones = [UTC, CET, BERLIN, ZoneInfo("America/New_York"), ZoneInfo("Asia/Kolkata"),
             timezone(timedelta(hours=-12)), timezone(timedelta(hours=14, minutes=-1))]
    times = [datetime(2, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
             datetime(1000, 1, 1, 12, tzinfo=CET), datetime(2026, 1, 1, tzinfo=UTC),
             datetime(2026, 10, 25, 2, 30, tzinfo=BERLIN),
             datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=BERLIN)]
    for _ in range(5000):
        instant = datetime(1, 1, 2, tzinfo=UTC) + timedelta(
            seconds=rng.randrange(0, 315_000_000_000), microseconds=rng.choice(
                [0, rng.randrange(1_000_000)]))
        times.append(instant.astimezone(rng.choice(zones)).replace(fold=rng.randint(0, 1)))
    assert [fast(t) for t in times] == [process(t) for t in times]
    assert fast(pd.Timestamp("2026-03-01 12:00:00.5", tz="CET")) == "2026-03-01 11:00:00.500000"
    assert fast(None) is None
    with pytest.raises(ValueError, match="naive datetime"):
        fast(datetime(2026, 1, 1))
