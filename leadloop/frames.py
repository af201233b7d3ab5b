"""Query results as compact pandas frames, in bounded memory.

A million-lead store read with `.all()` and `pd.DataFrame(rows)` holds every row twice as Python
objects (the row tuples, then the object columns), each string its own object: gigabytes for
what the jobs then reduce to counts. `read_frame` streams the result in partitions, converts each
partition at once (times to datetime64, numbers to float64) and shares repeated strings (a UTM
source, a stage name, an error message) between rows, so a column of repeated text costs a
pointer per row.

It reads the driver's rows itself, column by column, instead of SQLAlchemy's rows: SQLAlchemy
runs each value through its type's result processor one row at a time (an enum member looked up,
a 0/1 made a bool, a time parsed, a number made a Decimal), about half of a large read. Here a
column's processor runs once per distinct value where values repeat, times and numbers skip it
(pandas and numpy convert the driver's values a column at a time), JSON arrives as text decoded a
partition at a time, and strings are shared by hashing in C (`pd.factorize`) rather than by a
Python call per value. The cyclic garbage collector waits while a read runs.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
from pandas.api.types import infer_dtype
from sqlalchemy import (
    ARRAY,
    JSON,
    BigInteger,
    DateTime,
    PickleType,
    Select,
    Text,
    TypeDecorator,
    cast,
    extract,
)
from sqlalchemy.engine import Connection, CursorResult, Dialect

PARTITION = 20_000
ID_LIKE = 10_000  # distinct strings in one column of a partition (see `SharedStrings.column`)

# Kinds of column (`infer_dtype`, missing values skipped) that hold neither text nor containers.
_PLAIN_KINDS = frozenset({"empty", "integer", "floating", "mixed-integer-float", "decimal",
                          "boolean", "datetime", "datetime64", "date", "time", "timedelta",
                          "bytes", "complex"})
# Whose driver values repeat, so their processor runs once per distinct value.
_HASHED_KINDS = frozenset({"string", "integer", "boolean"})
# Types whose processed values are mutable: each row gets its own.
_MUTABLE_TYPES = (JSON, ARRAY, PickleType)

Process = Callable[[Any], Any]


class SharedStrings:
    """Hands back one object per distinct string value (like `sys.intern`, scoped to a read)."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._seen.setdefault(value, value)
        return value

    def column(self, values: Sequence[Any] | pd.Series | np.ndarray) -> Any:
        """`values` with each string replaced by its shared object (a list, or an object array
        when every value is text or missing: pandas makes the same column of either).

        Ids (over ID_LIKE distinct strings in `values`: order ids, click ids) are shared among
        `values` only: kept for the whole read, a million of them would stay alive after a
        `convert` step had reduced them to hashes, and looking each up costs more than it
        saves."""
        if infer_dtype(values, skipna=True) != "string":
            return [self(v) for v in values]
        arr = np.asarray(values, dtype=object)
        codes, uniques = pd.factorize(arr)
        out = _lookup(codes, uniques if len(uniques) > ID_LIKE else [self(u) for u in uniques])
        missing = codes < 0
        if missing.any():
            out[missing] = arr[missing]  # None or NaN, as it came
        return out


Convert = Callable[[pd.DataFrame, SharedStrings], pd.DataFrame]


def _lookup(codes: np.ndarray, table: Sequence[Any], missing: Any = None) -> np.ndarray:
    """`table[code]` for each code, `missing` for code -1, as an object array (C-level take)."""
    values = np.empty(len(table) + 1, dtype=object)
    for i, value in enumerate(table):  # one per distinct value; never broadcast a sequence
        values[i] = value
    values[-1] = missing
    return values[codes]


def _processed(values: Sequence[Any], process: Process, kind: str, per_value: bool) -> Any:
    """`values` through the type's result processor: once per distinct value where that is
    the same thing (hashable driver values, immutable results), else once per value."""
    if per_value or kind not in _HASHED_KINDS:
        return [process(v) for v in values]
    codes, uniques = pd.factorize(np.asarray(values, dtype=object))
    return _lookup(codes, [process(u) for u in uniques], process(None))


def _column(values: Sequence[Any], process: Process | None, per_value: bool,
            shared: SharedStrings) -> pd.Series:
    """One column of driver values as a Series: processed, strings shared, dtype inferred."""
    kind = infer_dtype(values, skipna=True)
    if process is not None:
        values = _processed(values, process, kind, per_value)
        kind = infer_dtype(values, skipna=True)
    if kind == "string" or (kind not in _PLAIN_KINDS and any(isinstance(v, str) for v in values)):
        return pd.Series(shared.column(values))
    if kind not in _PLAIN_KINDS and any(isinstance(v, dict | list) for v in values):
        return pd.Series(values, dtype=object)
    return pd.Series(list(values))


def _times(values: Sequence[Any]) -> pd.Series:
    first = next((v for v in values if v is not None), None)
    if isinstance(first, datetime) and first.tzinfo is not None:
        # PostgreSQL's: aware, all in the session's zone, which pandas takes as one array at a
        # time (`to_datetime` looks at each value's zone: three times slower)
        try:
            index = pd.DatetimeIndex(values)
        except ValueError:  # zones differ
            pass
        else:
            return pd.Series(index.tz_convert(UTC))
    # SQLite's text (naive UTC, as UTCDateTime writes it) parsed at once, or mixed zones
    raw = pd.Series(values, dtype=object)
    return pd.to_datetime(raw, utc=True, format="ISO8601" if isinstance(first, str) else None)


def _numbers(values: Sequence[Any]) -> pd.Series:
    # Decimal (PostgreSQL's numeric), float or int; numpy makes None NaN. SQLite's floats skip
    # the Numeric processor's detour through a 4-place Decimal: the stored float already is the
    # double nearest its 4-place value, so the detour gives it back unchanged.
    return pd.Series(np.array(values, dtype=float))


def _reader(name: str, type_: Any, type_code: Any, dialect: Dialect, shared: SharedStrings, *,
            times: Sequence[str], numbers: Sequence[str], json_text: set[str]
            ) -> Callable[[Sequence[Any]], pd.Series]:
    """How column `name` of `type_` is made a Series, given its driver's type code."""
    if name in times:
        return _times
    if name in numbers:
        return _numbers
    if name in json_text:
        return lambda values: _column(_json_texts(values), None, False, shared)
    process = type_.dialect_impl(dialect).result_processor(dialect, type_code)
    per_value = isinstance(type_, _MUTABLE_TYPES)
    return lambda values: _column(values, process, per_value, shared)


def _selected_for_reading(stmt: Any, columns: Sequence[str], times: Sequence[str],
                          dialect: Dialect) -> tuple[Any, set[str], set[str]]:
    """`stmt` with some columns selected in a shape cheaper to read, and which: JSON as text,
    for `_json_texts` (psycopg would decode each value in Python, SQLite's JSON type each
    through a processor; not when the engine has a JSON deserializer of its own, whose type
    then decodes); on PostgreSQL, times as integer microseconds since the epoch, for `_micros`
    (psycopg made each an aware datetime, which pandas then converted one by one: about 2 s a
    million, against 0.05 s from integers)."""
    if not isinstance(stmt, Select):
        return stmt, set(), set()
    selected = list(stmt.selected_columns)
    json_text: set[str] = set()
    if not getattr(dialect, "_json_deserializer", None):
        json_text = {n for c, n in zip(selected, columns, strict=True) if isinstance(c.type, JSON)}
    micros: set[str] = set()
    if dialect.name == "postgresql":
        micros = {n for c, n in zip(selected, columns, strict=True)
                  if n in times and _is_aware_time(c.type)}
    if not json_text and not micros:
        return stmt, json_text, micros
    shaped = [cast(c, Text).label(n) if n in json_text
              else cast(extract("epoch", c) * 1_000_000, BigInteger).label(n) if n in micros
              else c for c, n in zip(selected, columns, strict=True)]
    return stmt.with_only_columns(*shaped, maintain_column_froms=True), json_text, micros


def _is_aware_time(type_: Any) -> bool:
    impl = type_.impl if isinstance(type_, TypeDecorator) else type_
    return isinstance(impl, DateTime) and bool(impl.timezone)


def _micros(values: Sequence[Any]) -> pd.Series:
    """Times given as integer microseconds since the epoch (None: missing). A partition with
    none is read as `_times` reads it, so both backends give it the same dtype."""
    micros = pd.array(values, dtype="Int64")
    if micros.isna().all():
        return _times(values)
    return pd.Series(pd.to_datetime(micros, unit="us", utc=True))


def _json_texts(values: Sequence[Any]) -> list[Any]:
    """JSON texts decoded in one `json.loads` of them all (the C scanner once, instead of a
    Python call per value); NULL and JSON null are None, as the JSON type returns them."""
    return json.loads("[" + ",".join(["null" if v is None else v for v in values]) + "]")


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector during a read: every row is a new tuple, and the
    collector's passes over them (and over the whole heap, as they pile up) took a quarter to a
    third of the read; the rows hold no reference cycles for it to find."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _raw_partitions(result: CursorResult[Any]) -> Iterator[list[tuple[Any, ...]]]:
    """The driver's rows of `result`, PARTITION at a time, without SQLAlchemy's per-row
    processing: from the DBAPI cursor through the result's fetch strategy, which holds the row
    it read ahead on a server-side cursor and closes the result when the rows run out."""
    while rows := result._fetchmany_impl(PARTITION):
        yield rows


def read_frame(conn: Connection, stmt: Any, columns: Sequence[str], *,
               times: Sequence[str] = (), numbers: Sequence[str] = (),
               categories: Sequence[str] = (), convert: Convert | None = None) -> pd.DataFrame:
    """Run `stmt` and return its rows as a frame with `columns`.

    `times` become datetime64[ns, UTC]; `numbers` (Decimal or None) float64 with NaN; other
    object columns share their repeated strings. `convert`, when given, reshapes each partition
    further (e.g. to drop a wide column once it has been reduced). `categories` (after
    `convert`) become pandas categoricals: a byte or two per row for a column of a few values."""
    shared = SharedStrings()
    parts = []
    dialect = conn.dialect
    stmt, json_text, micros = _selected_for_reading(stmt, columns, times, dialect)
    # A server-side cursor on PostgreSQL (rows come PARTITION at a time, not all into the
    # client's memory); SQLite's cursor steps through the result anyway. An option of this
    # statement's, not of `conn`, which the caller may go on using.
    result = conn.execute(stmt, execution_options={
        "stream_results": dialect.supports_server_side_cursors})
    with result, _collector_paused():
        readers = [_micros if name in micros else
                   _reader(name, col.type, desc[1], dialect, shared, times=times,
                           numbers=numbers, json_text=json_text)
                   for name, col, desc in zip(columns, stmt.selected_columns,
                                              result.cursor.description, strict=True)]
        for rows in _raw_partitions(result):
            # column by column from the row tuples, each converted as it is built
            part = pd.DataFrame({name: read(values) for name, read, values
                                 in zip(columns, readers, zip(*rows, strict=True), strict=True)})
            del rows
            part = convert(part, shared) if convert else part
            for name in categories:
                part[name] = part[name].astype("category")
            parts.append(part)
    if not parts:
        empty = pd.DataFrame(columns=list(columns))
        for name in times:
            empty[name] = pd.to_datetime(empty[name], utc=True)
        return convert(empty, shared) if convert else empty
    for name in categories:  # one category list for all partitions, so concat keeps the dtype
        levels = sorted({v for part in parts for v in part[name].cat.categories}, key=str)
        for part in parts:
            part[name] = part[name].cat.set_categories(levels)
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
