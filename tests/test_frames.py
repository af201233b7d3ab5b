"""`read_frame` reads the driver's rows itself: its frames must equal the ones made from
SQLAlchemy's own (processed) rows, column kind by column kind, on SQLite and PostgreSQL."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import String, Table, create_engine, literal, select, text, type_coerce
from sqlalchemy.engine import Connection, Engine

import leadloop.report.data as report_data
import leadloop.scoring.features as features
import leadloop.scoring.model as model
import leadloop.values as values
from leadloop import frames
from leadloop.frames import SharedStrings, read_frame
from leadloop.store import session_scope
from leadloop.tables import (
    Conversion,
    ConversionKind,
    ConversionStatus,
    Lead,
    LeadStatus,
    Score,
    StageChange,
    ValidationResult,
    table_of,
)
from tests.scoring_helpers import demo_context, load_funnel

SMALL_PARTITION = 7  # several partitions from a few dozen rows


def _reference_frame(conn: Connection, stmt: Any, columns: Sequence[str], *,
                     times: Sequence[str] = (), numbers: Sequence[str] = (),
                     categories: Sequence[str] = (),
                     convert: Callable[..., pd.DataFrame] | None = None) -> pd.DataFrame:
    """The frame as the previous `read_frame` made it: SQLAlchemy's rows, each value processed
    by its type, shared string by string, times as text when SQLite keeps them so."""
    shared = SharedStrings()
    if times:
        stmt = stmt.with_only_columns(*[
            type_coerce(c, String).label(n) if n in times else c
            for c, n in zip(stmt.selected_columns, columns, strict=True)],
            maintain_column_froms=True)

    def column(vals: tuple[Any, ...], name: str) -> pd.Series:
        if name in times:
            text_ = isinstance(next((v for v in vals if v is not None), None), str)
            return pd.to_datetime(pd.Series(vals, dtype=object), utc=True,
                                  format="ISO8601" if text_ else None)
        if name in numbers:
            return pd.Series(np.array([np.nan if v is None else float(v) for v in vals]))
        if any(isinstance(v, str) for v in vals):
            return pd.Series([shared(v) for v in vals])
        if any(isinstance(v, dict | list) for v in vals):
            return pd.Series(vals, dtype=object)
        return pd.Series(list(vals))

    parts = []
    result = conn.execution_options(stream_results=True).execute(stmt)
    for rows in result.partitions(SMALL_PARTITION):
        cols = zip(columns, zip(*rows, strict=True), strict=True)
        part = pd.DataFrame({n: column(v, n) for n, v in cols})
        part = convert(part, shared) if convert else part
        for name in categories:
            part[name] = part[name].astype("category")
        parts.append(part)
    if not parts:
        empty = pd.DataFrame(columns=list(columns))
        for name in times:
            empty[name] = pd.to_datetime(empty[name], utc=True)
        return convert(empty, shared) if convert else empty
    for name in categories:
        levels = sorted({v for p in parts for v in p[name].cat.categories}, key=str)
        for p in parts:
            p[name] = p[name].cat.set_categories(levels)
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def _assert_same(new: pd.DataFrame, ref: pd.DataFrame, shared: bool = True) -> None:
    pd.testing.assert_frame_equal(new, ref, check_exact=True)
    assert list(new.dtypes) == list(ref.dtypes)
    for name in new.columns if shared else ():  # each distinct string is one object, across partitions too
        if new[name].dtype == object or pd.api.types.is_string_dtype(new[name].dtype):
            text_ = [v for v in new[name] if isinstance(v, str)]
            assert len({id(v) for v in text_}) == len(set(text_)), name
        elif isinstance(new[name].dtype, pd.CategoricalDtype):
            ref_levels = list(ref[name].cat.categories)
            assert list(new[name].cat.categories) == ref_levels, name


@pytest.fixture
def small_partitions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frames, "PARTITION", SMALL_PARTITION)


T0 = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
SOURCES = ["google", "facebook", None, "linkedin", "Zürich-newsletter"]
ATTRIBUTES: list[dict[str, Any]] = [
    {"industry": "saas", "employees": 12, "score": 1.5, "vip": True, "tags": ["a", "b"],
     "nothing": None},
    {},
    {"industry": "retail", "employees": None, "nested": {"k": "v"}},
    {"industry": "saas", "city": "Zürich", "employees": 3},
]
AMOUNTS = [Decimal("1234.5678"), None, Decimal("0.1"), Decimal("99999999.9999"), Decimal("0")]


def _fill(engine: Engine, n: int = 30) -> None:
    """Leads, stage changes, scores and conversions with every kind of column the store has:
    repeated and unique text, NULLs, enums, JSON, booleans, Decimals, floats, times."""
    with session_scope(engine) as s:
        leads = [Lead(
            source="hubspot", crm_id=f"c{i}", created_at=T0 + timedelta(hours=7 * i, microseconds=i),
            crm_updated_at=None if i % 3 else T0 + timedelta(days=i),
            status=list(LeadStatus)[i % 4] if i % 5 else LeadStatus.active,
            gclid=f"gclid-{i}" if i % 2 else None, fbc=None if i % 4 else "fb.1.2",
            utm_source=SOURCES[i % len(SOURCES)], utm_medium="cpc" if i % 3 else None,
            landing_page=f"https://example.com/p{i % 4}?x={i}", country="DE",
            consent_ad_user_data=[True, False, None][i % 3], consent_ad_personalization=None,
            attributes=ATTRIBUTES[i % len(ATTRIBUTES)],
        ) for i in range(n)]
        s.add_all(leads)
        s.flush()
        for i, lead in enumerate(leads):
            assert lead.id is not None
            for j, value in enumerate(["mql", "sql", "closedwon"][: 1 + i % 3]):
                s.add(StageChange(lead_id=lead.id, field="lifecyclestage" if j < 2 else "dealstage",
                                  value=value, entered_at=lead.created_at + timedelta(days=j),
                                  deal_id="" if j < 2 else f"d{i}", amount=AMOUNTS[(i + j) % 5],
                                  currency="EUR" if j == 2 else None, is_lost=bool(i % 7 == 0)))
            s.add(Score(lead_id=lead.id, model_version="v1", probability=i / n,
                        expected_value=AMOUNTS[i % 5], scored_at=T0 + timedelta(days=i)))
            s.add(Conversion(
                order_id=f"o{i}", destination=["google", "meta"][i % 2], lead_id=lead.id,
                stage="sql", kind=list(ConversionKind)[i % 3], conversion_action="act",
                conversion_time=lead.created_at, value=AMOUNTS[i % 5],
                click_id=lead.gclid, status=list(ConversionStatus)[i % 7],
                hold_rule="no_click_id" if i % 7 == 1 else None,
                platform_response={"ok": i % 2 == 0, "n": i} if i % 3 else {}))
        s.add(ValidationResult(micro="demo", segment="all", n=10, n_with=4, n_without=6,
                               macro_with=2, macro_without=1, lift=1.5, details={"x": [1, 2]},
                               computed_at=T0, verdict="predictive", reason="", role="micro"))


def _time_columns(table: Table) -> list[str]:
    return [c.name for c in table.c if type(c.type).__name__ == "UTCDateTime"]


def _number_columns(table: Table) -> list[str]:
    return [c.name for c in table.c if type(c.type).__name__ == "Numeric"]


@pytest.mark.parametrize("model_", [Lead, StageChange, Score, Conversion, ValidationResult])
@pytest.mark.parametrize("declared", [True, False], ids=["times-numbers", "as-typed"])
def test_every_column_of_a_table_reads_as_sqlalchemy_rows_would(
        engine: Engine, small_partitions: None, model_: Any, declared: bool) -> None:
    _fill(engine)
    table = table_of(model_)
    columns = [c.name for c in table.c]
    kw: dict[str, Any] = ({"times": _time_columns(table), "numbers": _number_columns(table)}
                          if declared else {})
    stmt = select(*table.c).order_by(table.c.id)
    with engine.connect() as conn:
        new = read_frame(conn, stmt, columns, **kw)
        ref = _reference_frame(conn, stmt, columns, **kw)
    assert len(new) > SMALL_PARTITION or model_ is ValidationResult
    _assert_same(new, ref)


def test_expressions_labels_and_categories(engine: Engine, small_partitions: None) -> None:
    """`is_not(None)` labels (0/1 on SQLite), `type_coerce`d columns, literals, computed
    numbers, categories spanning partitions, and a `convert` step."""
    _fill(engine)
    lead = table_of(Lead)
    stmt = select(lead.c.id, lead.c.gclid.is_not(None).label("has_gclid"),
                  type_coerce(lead.c.crm_id, String).label("crm_text"),
                  (lead.c.id * 2).label("double"), literal("x").label("lit"),
                  lead.c.status, lead.c.utm_source, lead.c.created_at).order_by(lead.c.id)
    columns = ["id", "has_gclid", "crm_text", "double", "lit", "status", "utm_source",
               "created_at"]

    def convert(part: pd.DataFrame, shared: SharedStrings) -> pd.DataFrame:
        part["source_upper"] = shared.column(part["utm_source"].str.upper())
        return part

    kw: dict[str, Any] = {"times": ["created_at"], "categories": ["status", "utm_source"],
                          "convert": convert}
    with engine.connect() as conn:
        new = read_frame(conn, stmt, columns, **kw)
        ref = _reference_frame(conn, stmt, columns, **kw)
    _assert_same(new, ref)
    assert new["has_gclid"].dtype == bool and new["has_gclid"].sum() == 15


def test_an_empty_result_keeps_the_columns_and_time_dtypes(engine: Engine) -> None:
    lead = table_of(Lead)
    stmt = select(lead.c.id, lead.c.created_at, lead.c.attributes)
    with engine.connect() as conn:
        new = read_frame(conn, stmt, ["id", "created_at", "attributes"], times=["created_at"])
        ref = _reference_frame(conn, stmt, ["id", "created_at", "attributes"],
                               times=["created_at"])
    _assert_same(new, ref)
    assert str(new["created_at"].dtype).startswith("datetime64")


def _with_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (features, values, report_data, model):
        monkeypatch.setattr(module, "read_frame", _reference_frame)


def test_the_jobs_loaders_read_the_same_frames(engine: Engine, tmp_path: Path,
                                               small_partitions: None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The frames scoring, validation, values and the report read from a simulated funnel."""
    ctx = demo_context(engine, tmp_path)
    load_funnel(ctx, 40)
    _fill(engine, 10)
    settings = ctx.settings

    def loaders() -> dict[str, Any]:
        data = features.load_lead_data(engine, (LeadStatus.active, LeadStatus.deleted))
        leads = report_data._load_leads(engine, None)
        return {
            "leads": data.leads, "events": data.events, "report_leads": leads,
            "stage_rows": values.load_stage_rows(engine, settings),
            "stage_reach": report_data._load_stage_reach(engine, settings, leads["lead_id"]),
            "micro": report_data._load_micro_flags(engine, settings, leads["lead_id"])[1],
            "scores": report_data._load_scores(engine),
            "conversions": report_data.load_conversions(engine, None),
            "validation": report_data._load_validation(engine)[0],
        }

    new = loaders()
    _with_reference(monkeypatch)
    ref = loaders()
    assert len(new["leads"]) > 40 and len(new["stage_rows"]) > SMALL_PARTITION
    assert any(c.startswith(features.ATTRIBUTE_PREFIX) for c in new["leads"].columns)
    for name, frame in new.items():  # (the loaders make strings of their own: not shared)
        _assert_same(frame, ref[name], shared=False)


def test_postgres_streams_through_a_server_side_cursor(engine: Engine, small_partitions: None
                                                       ) -> None:
    """A million-lead read must not land in the client at once: on PostgreSQL the rows come
    from a server-side cursor, open while the first partitions are converted."""
    if engine.dialect.name != "postgresql":
        pytest.skip("server-side cursors are PostgreSQL's")
    _fill(engine)
    lead = table_of(Lead)
    count = text("SELECT count(*) FROM pg_cursors")
    open_cursors = []
    with engine.connect() as conn:
        def convert(part: pd.DataFrame, _shared: SharedStrings) -> pd.DataFrame:
            open_cursors.append(conn.execute(count).scalar())
            return part

        before = conn.execute(count).scalar()
        frame = read_frame(conn, select(lead.c.id), ["id"], convert=convert)
        after = conn.execute(count).scalar()
    assert len(frame) == 30 and len(open_cursors) == 5
    assert open_cursors[0] == before + 1 and after == before


def test_the_garbage_collector_is_back_on_after_a_read_even_a_failed_one(engine: Engine) -> None:
    assert gc.isenabled()
    lead = table_of(Lead)
    with engine.connect() as conn:
        read_frame(conn, select(lead.c.id), ["id"])
        assert gc.isenabled()
        with pytest.raises(ValueError):  # two names for one column
            read_frame(conn, select(lead.c.id), ["id", "extra"])
    assert gc.isenabled()


def test_shared_strings_column_keeps_missing_values_and_shares_text() -> None:
    shared = SharedStrings()
    a, b = "".join(["sa", "as"]), "".join(["saa", "s"])
    out = shared.column(pd.Series([a, None, b, np.nan], dtype=object))
    assert out[0] is out[2] and out[1] is None and np.isnan(out[3])
    assert shared.column([1, True, a])[2] is a  # not text only: value by value, 1 stays 1
    assert shared.column([1, True, a])[:2] == [1, True]


def test_ids_are_shared_within_a_partition_only() -> None:
    """A column of over ID_LIKE distinct strings is not remembered for the rest of the read."""
    shared = SharedStrings()
    ids = [f"order-{i}" for i in range(frames.ID_LIKE + 1)]
    out = shared.column([*ids, "".join(["order-", "0"])])
    assert out[-1] is out[0] and list(out) == [*ids, "order-0"]
    assert shared("".join(["order-", "1"])) is not out[1]
    few = shared.column(["".join(["utm", "x"]) for _ in range(3)])
    assert shared("".join(["utm", "x"])) is few[0]


def test_driver_times_in_one_zone_or_several_become_utc() -> None:
    """PostgreSQL hands back aware datetimes in the session's zone (not always UTC)."""
    berlin = ZoneInfo("Europe/Berlin")
    one_zone = (datetime(2026, 3, 29, 1, 30, tzinfo=berlin), None,
                datetime(2026, 3, 29, 3, 30, 0, 7, tzinfo=berlin))
    mixed = (one_zone[0], datetime(2026, 3, 29, 1, 30, tzinfo=UTC))
    for vals in (one_zone, mixed):
        new = frames._times(vals)
        pd.testing.assert_series_equal(
            new, pd.to_datetime(pd.Series(vals, dtype=object), utc=True), check_exact=True)
        assert new.dt.tz == UTC


def test_an_engine_with_its_own_json_deserializer_keeps_it(engine: Engine,
                                                           small_partitions: None) -> None:
    """JSON columns are read as text and decoded at once only with the default `json.loads`;
    an engine given a deserializer decodes through it, each row getting its own object."""
    _fill(engine)
    own = create_engine(engine.url.render_as_string(hide_password=False),
                        json_deserializer=lambda text_: {"decoded": json.loads(text_)})
    lead = table_of(Lead)
    stmt = select(lead.c.id, lead.c.attributes).order_by(lead.c.id)
    try:
        with own.connect() as conn:
            new = read_frame(conn, stmt, ["id", "attributes"])
            ref = _reference_frame(conn, stmt, ["id", "attributes"])
    finally:
        own.dispose()
    _assert_same(new, ref)
    assert new["attributes"][0] == {"decoded": ATTRIBUTES[0]}
    assert new["attributes"][0] is not new["attributes"][len(ATTRIBUTES)]  # same text, own dict
