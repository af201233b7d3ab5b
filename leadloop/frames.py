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
    result = conn.execution_options(stream_results=True, yield_per=PARTITION).execute(stmt)
    for rows in result.partitions(PARTITION):
        part = pd.DataFrame(rows, columns=list(columns))
        for name in part.columns:
            if name in times:
                part[name] = pd.to_datetime(part[name], utc=True)
            elif name in numbers:
                part[name] = np.array([np.nan if v is None else float(v) for v in part[name]],
                                      dtype=float)
            elif part[name].dtype == object or pd.api.types.is_string_dtype(part[name]):
                part[name] = shared.column(part[name])
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
