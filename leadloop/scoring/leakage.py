"""Leakage detection: columns that look filled in after the outcome was known.

Two checks per feature column, each cheap and model-free:

* single-feature ROC AUC: the column alone, target-encoded with cross-fitting (numbers binned in
  quantiles, missing as its own value), separates the classes. At `SINGLE_AUC_SUSPECT` or above
  no lead-side field of a real funnel does that; an outcome recorded by sales does (X Education's
  `Tags`: 0.92);
* missingness ROC AUC: whether the field is empty tracks the label (sales fill a field in only
  for the leads they worked). At `MISSING_AUC_SUSPECT` or above it is reported.

The result is a list for the model card and `model evaluate --json` (`suspected_leakage`, one
entry per column with its reason). Nothing is excluded automatically: `[model] leaky_fields`
(or `model evaluate --exclude`) is the way to exclude a column once a person has looked.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from leadloop.scoring.features import MISSING

SINGLE_AUC_SUSPECT = 0.90
MISSING_AUC_SUSPECT = 0.65
MAX_ROWS = 50_000
_BINS = 20
_SMOOTHING = 10.0


def _keys(col: pd.Series) -> pd.Series:
    """A column as group keys: categories as they are, numbers in quantile bins."""
    if pd.api.types.is_numeric_dtype(col) and col.nunique(dropna=True) > _BINS:
        binned = pd.qcut(col, _BINS, labels=False, duplicates="drop")
        return binned.astype("float").fillna(-1.0).astype(str)
    return col.astype("string").fillna(MISSING).astype(str)


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    a = float(roc_auc_score(y, s))
    return max(a, 1.0 - a)


def single_feature_auc(col: pd.Series, y: np.ndarray, seed: int) -> float:
    """ROC AUC of the column alone (cross-fitted smoothed target encoding)."""
    codes, uniques = pd.factorize(_keys(col).to_numpy())
    out = np.empty(len(y))
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    for fit_idx, apply_idx in folds.split(codes.reshape(-1, 1), y):
        prior = y[fit_idx].mean()
        # per key: its positives and rows among the fit rows (bincount: exact integer sums)
        positives = np.bincount(codes[fit_idx], weights=y[fit_idx], minlength=len(uniques))
        rows = np.bincount(codes[fit_idx], minlength=len(uniques))
        encoded = (positives + prior * _SMOOTHING) / (rows + _SMOOTHING)
        seen = rows[codes[apply_idx]] > 0
        out[apply_idx] = np.where(seen, encoded[codes[apply_idx]], prior)
    return _auc(y, out)


def _missing(col: pd.Series) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(col):
        return col.isna().to_numpy()
    return (col.isna() | (col.astype("string") == MISSING)).to_numpy()


def suspected_leakage(x: pd.DataFrame, y: np.ndarray, seed: int = 0
                      ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """One entry per suspect column (`feature`, `reason`, the two AUCs measured), and the column
    that separates the classes best on its own (`feature`, `single_feature_auc`)."""
    y = np.asarray(y, dtype=int)
    if len(np.unique(y)) < 2 or x.shape[1] == 0:
        return [], None
    if len(y) > MAX_ROWS:
        idx = np.sort(np.random.default_rng(seed).choice(len(y), MAX_ROWS, replace=False))
        x, y = x.iloc[idx], y[idx]
    out, strongest = [], None
    for name in x.columns:
        col = x[name]
        missing = _missing(col)
        missing_auc = _auc(y, missing.astype(float)) if 0 < missing.sum() < len(y) else 0.5
        single = single_feature_auc(col, y, seed)
        if strongest is None or single > strongest["single_feature_auc"]:
            strongest = {"feature": name, "single_feature_auc": round(single, 4)}
        reasons = []
        if single >= SINGLE_AUC_SUSPECT:
            reasons.append(f"alone it separates the classes (single-feature ROC AUC {single:.3f} "
                           f"≥ {SINGLE_AUC_SUSPECT})")
        if missing_auc >= MISSING_AUC_SUSPECT:
            reasons.append(f"whether it is empty tracks the label (missingness ROC AUC "
                           f"{missing_auc:.3f} ≥ {MISSING_AUC_SUSPECT})")
        if reasons:
            out.append({"feature": name, "reason": "; ".join(reasons),
                        "single_feature_auc": round(single, 4),
                        "missingness_auc": round(missing_auc, 4)})
    out.sort(key=lambda r: -max(r["single_feature_auc"], r["missingness_auc"]))
    return out, strongest
