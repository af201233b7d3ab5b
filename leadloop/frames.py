"""Query results as compact pandas frames, in bounded memory.

A million-lead store read with `.all()` and `pd.DataFrame(rows)` holds every row twice as Python
objects (the row tuples, then the object columns), each string its own object: gigabytes for
what the jobs then reduce to counts. `read_frame` streams the result in partitions, converts each
partition at once (times to datetime64, numbers to float64) and shares repeated strings (a UTM
source, a stage name, an error message) between rows, so a column of repeated text costs a
pointer per row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Select, String, type_coerce
from sqlalchemy.engine import Connection

PARTITION = 20_000


class SharedStrings:
    """Hands back one object per distinct string value (like `sys.intern`, scoped to a read)."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._seen.setdefault(value, value)
        return value

    def column(self, values: Iterable[Any]) -> list[Any]:
        return [self(v) for v in values]


Convert = Callable[[pd.DataFrame, SharedStrings], pd.DataFrame]


def _column(values: tuple[Any, ...], is_time: bool, is_number: bool, shared: SharedStrings
            ) -> pd.Series:
    if is_time:
        raw = pd.Series(values, dtype=object)
        text = isinstance(next((v for v in values if v is not None), None), str)
        # SQLite's text (naive UTC, as UTCDateTime writes it) parsed at once, or the driver's times
        return pd.to_datetime(raw, utc=True, format="ISO8601" if text else None)
    if is_number:
        return pd.Series(np.array([np.nan if v is None else float(v) for v in values], dtype=float))
    if any(isinstance(v, str) for v in values):
        return pd.Series(shared.column(values))
    return pd.Series(values, dtype=object) if any(
        isinstance(v, dict | list) for v in values) else pd.Series(list(values))


def _times_unprocessed(stmt: Any, columns: Sequence[str], times: Sequence[str]) -> Any:
    """`stmt` with its `times` columns read as the driver returns them: on SQLite, text that
    pandas parses a partition at a time, instead of one timezone-aware datetime object made per
    value and then converted again (a third of the read time)."""
    if not times or not isinstance(stmt, Select):
        return stmt
    selected = list(stmt.selected_columns)
    coerced = [type_coerce(c, String).label(name) if name in times else c
               for c, name in zip(selected, columns, strict=True)]
    return stmt.with_only_columns(*coerced, maintain_column_froms=True)


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
    stmt = _times_unprocessed(stmt, columns, times)
    result = conn.execution_options(stream_results=True, yield_per=PARTITION).execute(stmt)
    for rows in result.partitions(PARTITION):
        # Column by column from the row tuples, each converted as it is built.
        raw = dict(zip(columns, zip(*rows, strict=True), strict=True))
        del rows
        part = pd.DataFrame({name: _column(raw.pop(name), name in times, name in numbers, shared)
                             for name in columns})
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
