"""Model quality on the real datasets next to the data README's floors, and train/score times
on simulated leads.

    .venv/bin/python bench/model_quality.py [--leads 1000000] [--skip-real]

X Education: pre-contact columns only, stratified 5-fold CV (as the floors were measured).
Olist: origin + landing page, time split at 2018-03-01 (and 5-fold CV for reference).
Simulated: the store-free path of `train_and_register`/`score_leads` (feature build, time-split
evaluation with candidate choice and calibration, final fit, scoring), timed at --leads.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from leadloop.config import settings_from_dict
from leadloop.scoring.evaluate import evaluate_frame, fit_final
from leadloop.scoring.features import Feature, build_features, frame_for, resolve_features
from leadloop.scoring.model import evaluate_csv, landmarks, scoring_moments, training_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo: tests/ helpers
from bench.model_honesty import simulated_frames
from tests.x_education import LABEL, not_pre_contact

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _row(name: str, m: dict, floor: str, seconds: float, candidate: float) -> None:
    print(f"{name:<34} roc_auc {m['roc_auc']:.3f} (candidate {candidate:.3f})  pr_auc "
          f"{m['pr_auc']:.3f}  ece {m['ece']:.3f}  brier {m['brier']:.3f}  | floor {floor}  "
          f"({seconds:.1f} s)")


def real_data() -> None:
    path = DATA / "x_education_leads" / "Leads.csv"
    t = time.perf_counter()
    m = evaluate_csv(path, label=LABEL, exclude=not_pre_contact(path))
    _row(f"X Education pre-contact ({m['model']})", m, "LR 0.865 / HGB 0.873 (5-fold)",
         time.perf_counter() - t, m["candidate_roc_auc"])
    olist = DATA / "olist_marketing_funnel"
    mql = pd.read_csv(olist / "olist_marketing_qualified_leads_dataset.csv")
    deals = pd.read_csv(olist / "olist_closed_deals_dataset.csv")
    feats = [Feature("origin", "category", "created"), Feature("landing_page_id", "category", "created")]
    x, y = frame_for(mql, feats), mql["mql_id"].isin(deals["mql_id"]).astype(int).to_numpy()
    times = pd.to_datetime(mql["first_contact_date"], utc=True)
    t = time.perf_counter()
    ev = evaluate_frame(x, y, feats, times=times, split_at=pd.Timestamp("2018-03-01", tz="UTC"))
    _row(f"Olist time split ({ev.best})", ev.metrics, "LR 0.667 / HGB 0.653 (time split)",
         time.perf_counter() - t, ev.candidate_metrics["roc_auc"])
    t = time.perf_counter()
    ev = evaluate_frame(x, y, feats)
    _row(f"Olist 5-fold ({ev.best})", ev.metrics, "LR 0.682 / HGB 0.668 (5-fold)",
         time.perf_counter() - t, ev.candidate_metrics["roc_auc"])


def simulated(n: int) -> None:
    t = time.perf_counter()
    data, macro_s, end = simulated_frames(n)
    leads = data.leads
    print(f"simulate + frame {n:,} leads: {time.perf_counter() - t:.1f} s")

    settings = settings_from_dict({
        "crm": {"kind": "hubspot"},
        "stages": [{"name": "SQL", "crm_values": ["salesqualifiedlead"], "macro": True}],
        "micro_conversions": [{"name": m, "event": m} for m in
                              ("guide_download", "pricing_view", "webinar_signup",
                               "newsletter_signup", "careers_page_view")],
    })
    rows_, _, _ = training_rows(data, macro_s, now=pd.Timestamp(end), horizon_days=90,
                                random_state=0, snapshot=False)
    moment = rows_["moment"]
    t = time.perf_counter()
    feats = resolve_features(settings, data)
    x, _ = build_features(data, feats, moment)
    y = rows_["y"].to_numpy()
    t_feat = time.perf_counter() - t
    t = time.perf_counter()
    ev = evaluate_frame(x, y, feats, times=leads.loc[moment.index, "created_at"])
    t_eval = time.perf_counter() - t
    t = time.perf_counter()
    model = fit_final(x, y, feats, ev.best, ev.calibration_method["method"])
    t_fit = time.perf_counter() - t
    t = time.perf_counter()
    now = scoring_moments(leads["created_at"], macro_s, pd.Timestamp(end), landmarks(90))
    xs, _ = build_features(data, feats, now)
    p = model.predict_proba(frame_for(xs, feats))[:, 1]
    t_score = time.perf_counter() - t
    print(f"train on {len(y):,} decided leads at landmark ages ({int(y.sum()):,} converted): "
          f"features {t_feat:.1f} s, evaluation (choice + calibration + test) {t_eval:.1f} s, "
          f"final fit {t_fit:.1f} s; chosen {ev.best}, calibration "
          f"{ev.calibration_method['method']}")
    print(f"  simulated holdout: roc_auc {ev.metrics['roc_auc']:.3f} (candidate "
          f"{ev.candidate_metrics['roc_auc']:.3f}) pr_auc {ev.metrics['pr_auc']:.3f} ece "
          f"{ev.metrics['ece']:.3f} (baseline roc_auc {ev.baseline['roc_auc']:.3f})")
    print(f"score {len(p):,} leads (features + predict): {t_score:.1f} s "
          f"({len(p) / t_score:,.0f} leads/s); mean p {np.mean(p):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leads", type=int, default=1_000_000)
    parser.add_argument("--skip-real", action="store_true")
    args = parser.parse_args()
    if not args.skip_real:
        real_data()
    simulated(args.leads)


if __name__ == "__main__":
    main()
