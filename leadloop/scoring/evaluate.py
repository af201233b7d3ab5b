"""Candidates, time-aware evaluation, calibration and the metrics of a model card.

Pure functions over a feature frame `x`, a 0/1 label `y` and optionally creation times; the
store-facing jobs (`model.py`) and the CSV evaluation share them, so `leadloop model evaluate`
measures exactly what the daemon trains.

Protocol:
* with times: the latest `test_fraction` of leads (or those from `split_at` on) are the test
  set; the candidate is chosen on the latest 20 % of the training part, then refitted,
  calibrated, and measured once on the test set;
* without times: stratified 5-fold CV, out-of-fold predictions.
The chosen model must beat the DummyClassifier baseline on the test predictions by
`MIN_AUC_GAIN` ROC AUC and have a lower Brier score, or there is no model (fallback).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.inspection import permutation_importance
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

from leadloop.scoring.features import Feature

MIN_AUC_GAIN = 0.02
SELECTION_MAX_ROWS = 200_000  # candidate choice on a sample: the ranking is stable long before
IMPORTANCE_MAX_ROWS = 5_000
CV_FOLDS = 5
BANDS = (("A", 0.10), ("B", 0.20), ("C", 0.30), ("D", 0.40))  # top 10 %, next 20 %, ...


def make_candidates(features: list[Feature], random_state: int = 0) -> dict[str, Pipeline]:
    """HistGradientBoosting with native categoricals and a scaled one-hot LogisticRegression."""
    cats = [f.name for f in features if f.kind == "category"]
    nums = [f.name for f in features if f.kind == "numeric"]
    # HGB takes at most 255 bins per feature: rare categories are pooled, unseen ones → missing
    ordinal = OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1,
                             min_frequency=5, max_categories=250, dtype=np.float64)
    hgb_prep = ColumnTransformer([("cat", ordinal, cats), ("num", "passthrough", nums)],
                                 sparse_threshold=0.0)
    hgb = HistGradientBoostingClassifier(
        categorical_features=np.array([True] * len(cats) + [False] * len(nums)),
        learning_rate=0.05, max_iter=400, max_leaf_nodes=31, min_samples_leaf=40,
        l2_regularization=1.0, early_stopping=True, validation_fraction=0.15,
        n_iter_no_change=20, random_state=random_state,
    )
    onehot = OneHotEncoder(handle_unknown="infrequent_if_exist", min_frequency=5)
    num_pipe = make_pipeline(SimpleImputer(strategy="median", add_indicator=True,
                                           keep_empty_features=True), StandardScaler())
    lr_prep = ColumnTransformer([("cat", onehot, cats), ("num", num_pipe, nums)])
    lr = LogisticRegression(C=0.5, max_iter=2000)
    return {
        "hist_gradient_boosting": Pipeline([("prep", hgb_prep), ("model", hgb)]),
        "logistic_regression": Pipeline([("prep", lr_prep), ("model", lr)]),
    }


def calibrated(estimator: Pipeline, n_rows: int) -> CalibratedClassifierCV:
    """Isotonic when there is plenty of data (it needs it), Platt scaling otherwise."""
    method = "isotonic" if n_rows >= 5000 else "sigmoid"
    return CalibratedClassifierCV(estimator, method=method, cv=3)


# -- metrics --------------------------------------------------------------------------------


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: |predicted − observed| per equal-width bin, weighted by size."""
    idx = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() * abs(p[m].mean() - y[m].mean())
    return float(total / len(y))


def binary_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    both = len(np.unique(y)) == 2
    return {
        "roc_auc": float(roc_auc_score(y, p)) if both else float("nan"),
        "pr_auc": float(average_precision_score(y, p)) if both else float("nan"),
        "brier": float(brier_score_loss(y, p)),
        "ece": ece(y, p),
    }


def calibration_table(y: np.ndarray, p: np.ndarray, bins: int = 10) -> list[dict[str, Any]]:
    idx = np.minimum((p * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        m = idx == b
        if m.any():
            rows.append({"bin": f"{b / bins:.1f}-{(b + 1) / bins:.1f}",
                         "predicted": float(p[m].mean()), "observed": float(y[m].mean()),
                         "n": int(m.sum())})
    return rows


def lift_by_decile(y: np.ndarray, p: np.ndarray) -> list[dict[str, Any]]:
    """Decile 1 = the 10 % of leads the model rates highest."""
    order = np.argsort(-p, kind="stable")
    overall = y.mean() if len(y) else 0.0
    rows = []
    for d, part in enumerate(np.array_split(order, 10), start=1):
        if len(part) == 0:
            continue
        rate = float(y[part].mean())
        rows.append({"decile": d, "n": len(part), "rate": rate,
                     "lift": rate / overall if overall else float("nan")})
    return rows


def value_bands(y: np.ndarray, p: np.ndarray) -> list[dict[str, Any]]:
    """Bands from the test predictions: A = top 10 %, B = next 20 %, C = next 30 %, D = rest."""
    order = np.argsort(-p, kind="stable")
    rows, start = [], 0
    for band, share in BANDS:
        stop = len(p) if band == BANDS[-1][0] else start + round(share * len(p))
        part = order[start:stop]
        if len(part):
            rows.append({"band": band, "min_probability": float(p[part].min()),
                         "share": share, "observed_rate": float(y[part].mean()),
                         "n": len(part)})
        start = stop
    return rows


def band_of(probability: float, bands: list[dict[str, Any]]) -> str | None:
    for b in bands:
        if probability >= b["min_probability"]:
            return str(b["band"])
    return str(bands[-1]["band"]) if bands else None


# -- evaluation -----------------------------------------------------------------------------


@dataclass
class Evaluation:
    n: int
    positives: int
    split: str
    chosen: str | None
    candidates: dict[str, float]
    metrics: dict[str, float]
    baseline: dict[str, float]
    calibration: list[dict[str, Any]] = field(default_factory=list)
    lift: list[dict[str, Any]] = field(default_factory=list)
    bands: list[dict[str, Any]] = field(default_factory=list)
    importance: list[dict[str, Any]] = field(default_factory=list)
    fallback_reason: str | None = None
    n_test: int = 0
    best: str = ""  # the candidate measured (chosen only if it beat the baseline)


def _sample(n: int, cap: int, seed: int) -> np.ndarray:
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))


def _auc(model: Pipeline, x_fit: pd.DataFrame, y_fit: np.ndarray, x_val: pd.DataFrame,
         y_val: np.ndarray) -> float:
    model.fit(x_fit, y_fit)
    return float(roc_auc_score(y_val, model.predict_proba(x_val)[:, 1]))


def _importance(model: Any, x: pd.DataFrame, y: np.ndarray, seed: int) -> list[dict[str, Any]]:
    if len(np.unique(y)) < 2:
        return []
    idx = _sample(len(x), IMPORTANCE_MAX_ROWS, seed)
    res = permutation_importance(model, x.iloc[idx], y[idx], scoring="roc_auc", n_repeats=3,
                                 random_state=seed)
    rows = [{"feature": c, "importance": float(m)}
            for c, m in zip(x.columns, res.importances_mean, strict=True)]
    return sorted(rows, key=lambda r: -r["importance"])


def evaluate_frame(
    x: pd.DataFrame,
    y: np.ndarray,
    features: list[Feature],
    *,
    times: pd.Series | None = None,
    split_at: pd.Timestamp | None = None,
    test_fraction: float = 0.2,
    random_state: int = 0,
    importance: bool = True,
) -> Evaluation:
    """Choose a candidate, calibrate it and measure it against the baseline (see module doc)."""
    y = np.asarray(y, dtype=int)
    n, positives = len(y), int(y.sum())
    candidates = make_candidates(features, random_state)
    if times is not None:
        order = np.argsort(pd.to_datetime(times, utc=True).to_numpy(), kind="stable")
        x, y = x.iloc[order], y[order]
        sorted_times = pd.to_datetime(times, utc=True).iloc[order]
        cut = int((sorted_times < split_at).sum()) if split_at is not None else round(n * (1 - test_fraction))
        split = f"time-ordered: train on leads before {sorted_times.iloc[cut]:%Y-%m-%d}, test on the rest"
        x_tr, y_tr, x_te, y_te = x.iloc[:cut], y[:cut], x.iloc[cut:], y[cut:]
        inner = round(len(y_tr) * 0.8)
        sel = _sample(inner, SELECTION_MAX_ROWS, random_state)
        scores = {name: _auc(m, x_tr.iloc[sel], y_tr[sel], x_tr.iloc[inner:], y_tr[inner:])
                  for name, m in candidates.items()}
        chosen = max(scores, key=lambda k: scores[k])
        model = calibrated(candidates[chosen], len(y_tr)).fit(x_tr, y_tr)
        p = model.predict_proba(x_te)[:, 1]
        base = DummyClassifier(strategy="prior").fit(x_tr, y_tr).predict_proba(x_te)[:, 1]
        y_eval = y_te
        imp = _importance(model, x_te, y_te, random_state) if importance else []
    else:
        split = f"stratified {CV_FOLDS}-fold cross-validation"
        skf = StratifiedKFold(CV_FOLDS, shuffle=True, random_state=random_state)
        scores = {}
        for name, m in candidates.items():
            oof = cross_val_predict(m, x, y, cv=skf, method="predict_proba")[:, 1]
            scores[name] = float(roc_auc_score(y, oof))
        chosen = max(scores, key=lambda k: scores[k])
        model = calibrated(candidates[chosen], int(n * (1 - 1 / CV_FOLDS)))
        p = cross_val_predict(model, x, y, cv=skf, method="predict_proba")[:, 1]
        base = cross_val_predict(DummyClassifier(strategy="prior"), x, y, cv=skf,
                                 method="predict_proba")[:, 1]
        y_eval = y
        imp = []
        if importance:
            tr, te = next(skf.split(x, y))
            fitted = calibrated(candidates[chosen], len(tr)).fit(x.iloc[tr], y[tr])
            imp = _importance(fitted, x.iloc[te], y[te], random_state)
    metrics, baseline = binary_metrics(y_eval, p), binary_metrics(y_eval, base)
    reason = None
    if not metrics["roc_auc"] >= baseline["roc_auc"] + MIN_AUC_GAIN:
        reason = (f"{chosen} ROC AUC {metrics['roc_auc']:.3f} does not beat the baseline "
                  f"{baseline['roc_auc']:.3f} by {MIN_AUC_GAIN}")
    elif not metrics["brier"] < baseline["brier"]:
        reason = (f"{chosen} Brier score {metrics['brier']:.4f} is not better than the "
                  f"baseline's {baseline['brier']:.4f}")
    return Evaluation(
        n=n, positives=positives, split=split, chosen=None if reason else chosen,
        candidates=scores, metrics=metrics, baseline=baseline,
        calibration=calibration_table(y_eval, p), lift=lift_by_decile(y_eval, p),
        bands=value_bands(y_eval, p), importance=imp, fallback_reason=reason,
        n_test=len(y_eval), best=chosen,
    )


def fit_final(x: pd.DataFrame, y: np.ndarray, features: list[Feature], chosen: str,
              random_state: int = 0) -> CalibratedClassifierCV:
    """The registered model: the chosen candidate, calibrated, fitted on every labelled lead."""
    model = make_candidates(features, random_state)[chosen]
    return calibrated(model, len(y)).fit(x, np.asarray(y, dtype=int))
