"""A CRM export (CSV) → feature frame, label and optional times, for `leadloop model evaluate`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from leadloop.csvio import parse_label, read_csv
from leadloop.errors import LeadloopError
from leadloop.scoring.features import Feature, frame_for

# Missing markers of CRM exports; "Select" is an untouched dropdown.
MISSING_VALUES = ["", "Select", "NA", "N/A", "nan", "NaN", "null", "NULL"]


@dataclass
class CsvFrame:
    x: pd.DataFrame
    y: np.ndarray
    features: list[Feature]
    times: pd.Series | None
    dropped: dict[str, str]  # column -> why it was not used


def _numeric(values: pd.Series) -> bool:
    present = values.dropna()
    return not present.empty and bool(pd.to_numeric(present, errors="coerce").notna().mean() >= 0.98)


def frame_from_csv(path: str | Path, *, label: str, positive: str | None = None,
                   exclude: list[str] | None = None, time_column: str | None = None,
                   sep: str | None = None) -> CsvFrame:
    """Read an export; every column except the label, `exclude` and id-like ones is a feature
    known at creation (the caller excludes what sales fills in later)."""
    df = read_csv(path, sep=sep, missing=MISSING_VALUES)
    missing = [c for c in [label, *(exclude or []), *([time_column] if time_column else [])]
               if c not in df.columns]
    if missing:
        raise LeadloopError(f"column(s) {missing} not in {Path(path).name}; "
                            f"it has {list(df.columns)[:20]}")
    y = parse_label(df[label], positive).to_numpy()
    times = None
    if time_column:
        times = pd.to_datetime(df[time_column], utc=True, errors="coerce")
        if times.isna().mean() > 0.05:
            raise LeadloopError(f"--time column {time_column!r}: over 5 % of values are not dates")
        keep = times.notna().to_numpy()
        df, y, times = df[keep], y[keep], times[keep]
    dropped: dict[str, str] = {c: "excluded" for c in exclude or []}
    features: list[Feature] = []
    for col in df.columns:
        if col in (label, time_column) or col in dropped:
            continue
        values = df[col]
        present = values.dropna()
        if present.empty or present.nunique() < 2:
            dropped[col] = "constant or empty"
            continue
        if _numeric(values):
            unique_ints = present.nunique() == len(present) and not present.str.contains(r"\.").any()
            if unique_ints and len(present) > 50:
                dropped[col] = "an id (unique integer per row)"
                continue
            features.append(Feature(col, "numeric", "created"))
        else:
            if present.nunique() > 0.5 * len(present) and len(present) > 50:
                dropped[col] = "an id or free text (mostly unique values)"
                continue
            features.append(Feature(col, "category", "created"))
    if not features:
        raise LeadloopError(f"{Path(path).name}: no usable feature columns left")
    if len(np.unique(y)) < 2:
        raise LeadloopError(f"label {label!r} has a single class; nothing to learn")
    x = frame_for(df.reset_index(drop=True), features)
    return CsvFrame(x=x, y=y, features=features,
                    times=times.reset_index(drop=True) if times is not None else None,
                    dropped=dropped)
