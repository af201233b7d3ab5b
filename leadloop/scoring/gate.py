"""The model gate: a model is used only when it beats the baseline beyond the noise.

Two intervals are tested on the evaluation predictions (the time-split test set, or the
out-of-fold predictions of cross-validation):

* the ROC AUC gain over the baseline, with DeLong's variance for two correlated AUCs on the
  same rows (Sun & Xu's fast algorithm): its one-sided 95 % lower bound must be above 0, and the
  gain itself must reach `MIN_AUC_GAIN` (a smaller gain is not worth a model even when real);
* the Brier skill score 1 − Brier(model) / Brier(baseline), with a delta-method standard error:
  its one-sided 95 % lower bound must be above 0 (the probabilities beat the base rate).

The card keeps each figure with its 90 % two-sided interval, whose lower end is that bound.

A point margin without an interval let 5 of 20 pure-noise datasets at the minimum size through.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata

MIN_AUC_GAIN = 0.02
Z_ONE_SIDED_95 = 1.644854


def _structural(scores: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong's structural components (per positive, per negative) of one predictor."""
    pos, neg = scores[y == 1], scores[y == 0]
    m, n = len(pos), len(neg)
    tx, ty = rankdata(pos), rankdata(neg)
    tz = rankdata(np.concatenate([pos, neg]))
    auc = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:m] - tx) / n  # per positive: share of negatives ranked below it
    v01 = 1.0 - (tz[m:] - ty) / m  # per negative: share of positives ranked above it
    return float(auc), v10, v01


def delong_gain(y: np.ndarray, p: np.ndarray, base: np.ndarray) -> tuple[float, float, float]:
    """(AUC(p) − AUC(base), its standard error, AUC(p)) on the same rows."""
    y = np.asarray(y, dtype=int)
    auc_a, a10, a01 = _structural(np.asarray(p, float), y)
    auc_b, b10, b01 = _structural(np.asarray(base, float), y)
    m, n = len(a10), len(a01)
    s10 = np.cov(np.vstack([a10, b10])) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(np.vstack([a01, b01])) if n > 1 else np.zeros((2, 2))
    cov = s10 / m + s01 / n
    var = max(float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]), 0.0)
    return auc_a - auc_b, var ** 0.5, auc_a


def brier_skill(y: np.ndarray, p: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    """Brier skill score and its delta-method standard error."""
    y = np.asarray(y, dtype=float)
    a, b = (np.asarray(p, float) - y) ** 2, (np.asarray(base, float) - y) ** 2
    mean_b = b.mean()
    if mean_b <= 0:
        return 0.0, 0.0
    ratio = a.mean() / mean_b
    se = float(np.std(a - ratio * b, ddof=1) / (mean_b * np.sqrt(len(y)))) if len(y) > 1 else 0.0
    return float(1.0 - ratio), se


def gate(y: np.ndarray, p: np.ndarray, base: np.ndarray, name: str
         ) -> tuple[dict[str, Any], str | None]:
    """What was tested (for the model card) and the reason to fall back, or None to pass."""
    gain, gain_se, _ = delong_gain(y, p, base)
    bss, bss_se = brier_skill(y, p, base)
    z = Z_ONE_SIDED_95
    gain_ci = (gain - z * gain_se, gain + z * gain_se)
    bss_ci = (bss - z * bss_se, bss + z * bss_se)
    tested = {
        "rule": (f"one-sided 95 % lower bound of the ROC AUC gain over the baseline (DeLong) "
                 f"above 0 and the gain at least {MIN_AUC_GAIN}; one-sided 95 % lower bound of "
                 "the Brier skill score (delta method) above 0; intervals shown are 90 % "
                 "two-sided"),
        "auc_gain": gain, "auc_gain_ci": list(gain_ci),
        "brier_skill": bss, "brier_skill_ci": list(bss_ci),
    }
    reason = None
    if not gain_ci[0] > 0:
        reason = (f"{name} ROC AUC gain over the baseline {gain:+.3f} (90 % CI {gain_ci[0]:+.3f}"
                  f" to {gain_ci[1]:+.3f}) is not surely above 0")
    elif not gain >= MIN_AUC_GAIN:
        reason = (f"{name} ROC AUC gain over the baseline {gain:+.3f} is below the "
                  f"{MIN_AUC_GAIN} worth a model")
    elif not bss_ci[0] > 0:
        reason = (f"{name} Brier skill score {bss:+.3f} (90 % CI {bss_ci[0]:+.3f} to "
                  f"{bss_ci[1]:+.3f}) is not surely above 0: its probabilities do not beat the "
                  "base rate")
    tested["passed"] = reason is None
    return tested, reason
