"""Figures behind the model's honesty fixes (issues #13 and #19): calibration, the gate, lead
age, and what `model evaluate` costs.

    .venv/bin/python bench/model_honesty.py [--part calibration|gate|age|cost|all] [--seeds 20]

* calibration: ROC AUC of the uncalibrated candidate, of the former calibration
  (`CalibratedClassifierCV(cv=3)`, unshuffled, inside shuffled 5-fold CV) and of the shipped
  model, with ECE and log loss, on X Education (pre-contact), Olist and time-ordered rows
  with drift;
* gate: how often pure noise at the minimum size (1,000 leads, ~12 % converted) gets a model
  under the former rule (point margin: AUC ≥ baseline + 0.02 and a lower Brier) and the new one
  (intervals), and how often a planted signal passes;
* age: on a simulated funnel, mean predicted vs observed conversion of leads still open at each
  age, for the former training (features at conversion or at the end of the horizon, scored at
  the lead's age) and the landmark training;
* cost: CPU seconds of `model evaluate` on X Education (all columns but Tags, as in the issue),
  and where they go (cProfile), with 1 and with 2 threads.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.calibration import CalibratedClassifierCV
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from threadpoolctl import threadpool_limits

from leadloop.config import settings_from_dict
from leadloop.sandbox.simulator import lead_in, simulate
from leadloop.scoring.calibration import clipped_log_loss
from leadloop.scoring.csvframe import frame_from_csv
from leadloop.scoring.evaluate import binary_metrics, evaluate_frame, fit_final, make_candidates
from leadloop.scoring.features import Feature, LeadData, build_features, frame_for, resolve_features
from leadloop.scoring.model import evaluate_csv, landmarks, training_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo: tests/ helpers
from tests.x_education import LABEL, not_pre_contact

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
XED = DATA / "x_education_leads" / "Leads.csv"
OLIST = DATA / "olist_marketing_funnel"


def _former_calibration(x: pd.DataFrame, y: np.ndarray, feats: list[Feature], name: str
                        ) -> np.ndarray:
    method = "isotonic" if len(y) * 0.8 >= 5000 else "sigmoid"
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    model = CalibratedClassifierCV(make_candidates(feats)[name], method=method, cv=3)
    return cross_val_predict(model, x, y, cv=folds, method="predict_proba")[:, 1]


def _drifting(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray, list[Feature]]:
    rng = np.random.default_rng(seed)
    t = np.sort(rng.random(n))
    source = rng.choice(["a", "b"], n)
    visits = rng.normal(size=n)
    period = np.where(t < 1 / 3, 1.0, np.where(t < 2 / 3, 0.0, -1.0))
    logit = -1.0 + 1.2 * visits + np.where(source == "a", 2.0, -2.0) * period
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    feats = [Feature("source", "category", "created"), Feature("visits", "numeric", "created")]
    return pd.DataFrame({"source": source, "visits": visits}), y, feats


def calibration_part() -> None:
    print("calibration (5-fold out-of-fold): candidate | former calibration | shipped")
    cases = []
    frame = frame_from_csv(XED, label=LABEL, exclude=not_pre_contact(XED))
    cases.append(("X Education pre-contact", frame.x, frame.y, frame.features))
    mql = pd.read_csv(OLIST / "olist_marketing_qualified_leads_dataset.csv")
    deals = pd.read_csv(OLIST / "olist_closed_deals_dataset.csv")
    feats = [Feature("origin", "category", "created"),
             Feature("landing_page_id", "category", "created")]
    mql = mql.sort_values("first_contact_date")  # as a store or an export is read: time order
    cases.append(("Olist (rows in time order)", frame_for(mql, feats),
                  mql["mql_id"].isin(deals["mql_id"]).astype(int).to_numpy(), feats))
    for seed in (1, 2):
        cases.append((f"drifting synthetic, seed {seed}", *_drifting(3000, seed)))
    for name, x, y, feats in cases:
        with threadpool_limits(1):
            ev = evaluate_frame(x, y, feats, importance=False, threads=1)
            former = _former_calibration(x, y, feats, ev.best)
        old = binary_metrics(y, former)
        c, m = ev.candidate_metrics, ev.metrics
        print(f"  {name:<32} {ev.best:<24} AUC {c['roc_auc']:.3f} | {old['roc_auc']:.3f} | "
              f"{m['roc_auc']:.3f}   ECE {c['ece']:.3f} | {old['ece']:.3f} | {m['ece']:.3f}   "
              f"log loss {c['log_loss']:.4f} | {clipped_log_loss(y, former):.4f} | "
              f"{m['log_loss']:.4f}   shipped {ev.calibration_method['method']}")


def _noise_or_signal(n: int, seed: int, signal: float) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = pd.DataFrame({"source": rng.choice(list("abcdef"), n), "visits": rng.normal(size=n)})
    logit = -2.0 + signal * x["visits"].to_numpy()
    return x, (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)


def gate_part(seeds: int) -> None:
    feats = [Feature("source", "category", "created"), Feature("visits", "numeric", "created")]
    for label, signal in (("pure noise", 0.0), ("planted signal 0.3", 0.3),
                          ("planted signal 0.8", 0.8)):
        former = new = 0
        t = time.process_time()
        for seed in range(seeds):
            ev = evaluate_frame(*_noise_or_signal(1000, seed, signal), feats, importance=False,
                                threads=1)
            former += (ev.metrics["roc_auc"] >= ev.baseline["roc_auc"] + 0.02
                       and ev.metrics["brier"] < ev.baseline["brier"])
            new += ev.chosen is not None
        print(f"gate, {label:<20} 1,000 leads: a model in {former}/{seeds} runs under the former "
              f"rule, {new}/{seeds} under the intervals ({time.process_time() - t:.1f} CPU s)")


def simulated_frames(n: int) -> tuple[LeadData, pd.Series, datetime]:
    """The simulator's funnel (seed 7, ending 2026-10-01) as model frames, with each lead's
    first macro time (sales qualified)."""
    end = datetime(2026, 10, 1, tzinfo=UTC)
    funnel = simulate(n, seed=7, end=end)
    rows, events, macro = [], [], {}
    for i, lead in enumerate(funnel.leads):
        li = lead_in(lead)
        rows.append({"lead_id": i, "created_at": li.created_at, "attributes": li.attributes,
                     **{k: getattr(li, k) for k in ("utm_source", "utm_medium", "utm_campaign",
                        "landing_page", "country", "gclid", "gbraid", "wbraid", "fbclid", "fbc",
                        "meta_lead_id", "msclkid", "li_fat_id")}})
        events += [(i, name, at) for name, at in lead.micro_events]
        first = [at for v, at in lead.lifecycle if v == "salesqualifiedlead"]
        if first:
            macro[i] = first[0]
    leads = pd.DataFrame(rows).set_index("lead_id")
    leads["created_at"] = pd.to_datetime(leads["created_at"], utc=True)
    ev_frame = pd.DataFrame(events, columns=["lead_id", "name", "occurred_at"])
    ev_frame["occurred_at"] = pd.to_datetime(ev_frame["occurred_at"], utc=True)
    macro_s = pd.to_datetime(pd.Series(macro, dtype=object), utc=True).reindex(leads.index)
    return LeadData(leads=leads, events=ev_frame), macro_s, end


def age_part(n: int) -> None:
    data, macro, end = simulated_frames(n)
    settings = settings_from_dict({
        "crm": {"kind": "hubspot"},
        "stages": [{"name": "SQL", "crm_values": ["salesqualifiedlead"], "macro": True}],
        "micro_conversions": [{"name": m, "event": m} for m in
                              ("guide_download", "pricing_view", "webinar_signup",
                               "newsletter_signup", "careers_page_view")],
    })
    created = data.leads["created_at"]
    deadline = created + pd.Timedelta(days=90)
    decided = deadline <= pd.Timestamp(end)
    converted = macro.notna() & (macro <= deadline)
    # the former training: features at conversion or at the end of the horizon, no age
    old_feats = resolve_features(settings, data, with_age=False)
    moment = macro.where(converted, deadline)[decided]
    x_old, _ = build_features(data, old_feats, moment)
    old_model = fit_final(x_old, converted[decided].astype(int).to_numpy(), old_feats,
                          "hist_gradient_boosting", threads=1)
    # the landmark training
    feats = resolve_features(settings, data)
    rows, _, _ = training_rows(data, macro, now=pd.Timestamp(end), horizon_days=90,
                               random_state=0, snapshot=False)
    x_new, _ = build_features(data, feats, rows["moment"])
    ev = evaluate_frame(x_new, rows["y"].to_numpy(), feats, importance=False, threads=1,
                        times=created.loc[rows.index])
    new_model = fit_final(x_new, rows["y"].to_numpy(), feats, ev.best,
                          ev.calibration_method["method"], threads=1)
    print(f"age: {int(decided.sum()):,} decided simulated leads; leads still open at each age, "
          "mean predicted (former | landmark) vs observed conversion within 90 days")
    for age in landmarks(90):
        at = created + pd.Timedelta(days=age)
        open_then = decided & (macro.isna() | (macro > at))
        ids = open_then[open_then].index
        moments = at.loc[ids]
        p_old = old_model.predict_proba(frame_for(build_features(data, old_feats, moments)[0],
                                                  old_feats))[:, 1]
        p_new = new_model.predict_proba(frame_for(build_features(data, feats, moments)[0],
                                                  feats))[:, 1]
        observed = converted.loc[ids].mean()
        print(f"  open at {age:>2} d: n {len(ids):>6,}  predicted {p_old.mean():.3f} | "
              f"{p_new.mean():.3f}  observed {observed:.3f}")


def cost_part() -> None:
    for threads in (1, 2):
        t, w = time.process_time(), time.perf_counter()
        profile = cProfile.Profile()
        profile.enable()
        m = evaluate_csv(XED, label=LABEL, exclude=["Tags"], threads=threads)
        profile.disable()
        cpu, wall = time.process_time() - t, time.perf_counter() - w
        print(f"cost: model evaluate X Education --exclude Tags, {threads} thread(s): "
              f"{cpu:.1f} CPU s, {wall:.1f} s wall; roc_auc {m['roc_auc']} (candidate "
              f"{m['candidate_roc_auc']}), {len(m['suspected_leakage'])} suspects")
        stats = pstats.Stats(profile)
        wanted = {("csvframe", "frame_from_csv"): "read the CSV",
                  ("leakage", "suspected_leakage"): "leakage checks",
                  ("evaluate", "_auc"): "candidate selection fits (inner splits)",
                  ("evaluate", "_nested_cv"): "nested CV: selection + outer fits",
                  ("calibration", "choose_method"): "calibration comparison",
                  ("evaluate", "_importance"): "permutation importance"}
        for (path, _, func), row in stats.stats.items():  # type: ignore[attr-defined]
            what = wanted.get((Path(path).stem, func))
            if what and "leadloop" in path:
                print(f"    {what:<40} {row[3]:6.1f} s cumulative")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all",
                        choices=["calibration", "gate", "age", "cost", "all"])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--leads", type=int, default=20_000, help="simulated leads for --part age")
    args = parser.parse_args()
    if args.part in ("calibration", "all"):
        calibration_part()
    if args.part in ("gate", "all"):
        gate_part(args.seeds)
    if args.part in ("age", "all"):
        age_part(args.leads)
    if args.part in ("cost", "all"):
        cost_part()


if __name__ == "__main__":
    main()
