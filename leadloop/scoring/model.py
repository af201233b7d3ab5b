"""Train, register and apply the lead-value model; evaluate the same pipeline on a CSV export.

Label: the lead reached the macro stage (or a deeper one) within `[model] horizon_days` of its
creation. Leads younger than the horizon that have not converted yet are left out: they are not
negatives, only undecided. The prediction moment of a labelled lead is its macro time, or the
end of its horizon; features known later are refused (see `features.py`).

Expected value = calibrated P(macro) × the value of one macro conversion (`values.macro_value`:
the stage's fixed value, or for "deal_amount"/"predicted" the mean deal amount observed at the
macro stage, else its default_value, never another stage's).
"""

from __future__ import annotations

import logging
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import or_, select

from leadloop.context import Context
from leadloop.errors import ModelError
from leadloop.progress import track
from leadloop.scoring import registry
from leadloop.scoring.csvframe import frame_from_csv
from leadloop.scoring.evaluate import band_of, evaluate_frame, fit_final
from leadloop.scoring.features import (
    Feature,
    LeadData,
    build_features,
    frame_for,
    load_lead_data,
    resolve_features,
)
from leadloop.store import session_scope, upsert
from leadloop.tables import Lead, LeadStatus, Score
from leadloop.values import first_reached, load_stage_rows, macro_reached_at, macro_value

log = logging.getLogger(__name__)

SCORE_BATCH = 50_000


def label_leads(ctx: Context, data: LeadData, macro_at: pd.Series) -> pd.DataFrame:
    """Per lead: `eligible` (its horizon has passed), `y` (converted within it), `moment`.

    Leads younger than the horizon are left out whether or not they converted yet: the
    unconverted ones are undecided, and keeping only the converted part of a young cohort
    would inflate the conversion rate the model learns (and break its calibration)."""
    horizon = pd.Timedelta(days=ctx.settings.model.horizon_days)
    now = pd.Timestamp(ctx.now())
    created = data.leads["created_at"]
    macro = macro_at.reindex(data.leads.index)
    deadline = created + horizon
    converted = macro.notna() & (macro <= deadline)
    eligible = deadline <= now
    moment = macro.where(converted, deadline)
    return pd.DataFrame({"eligible": eligible, "y": converted.astype(int), "moment": moment})


def _training_set(ctx: Context) -> tuple[LeadData, pd.DataFrame, pd.DataFrame, list[Feature]]:
    data = load_lead_data(ctx.engine, (LeadStatus.active, LeadStatus.deleted))
    stage_rows = load_stage_rows(ctx.engine, ctx.settings)
    macro_at = macro_reached_at(ctx.settings, first_reached(stage_rows))
    labels = label_leads(ctx, data, macro_at)
    return data, labels, stage_rows, resolve_features(ctx.settings, data)


def train_and_register(ctx: Context) -> dict[str, Any]:
    """Train candidates on the store, register the chosen one (or a fallback card)."""
    settings, cfg = ctx.settings, ctx.settings.model
    data, labels, stage_rows, features = _training_set(ctx)
    labelled = labels[labels["eligible"]]
    decided = len(labelled)
    if decided > cfg.max_training_rows:
        # The most recent decided leads: the funnel as it is now, in bounded memory.
        newest = data.leads.loc[labelled.index, "created_at"].nlargest(cfg.max_training_rows).index
        labelled = labelled.loc[labelled.index.isin(newest)]
    n, positives = len(labelled), int(labelled["y"].sum())
    value, value_source = macro_value(settings, stage_rows)
    now = ctx.now()
    card: dict[str, Any] = {
        "version": registry.new_version(settings, now),
        "created_at": now.isoformat(),
        "chosen": None,
        "fallback_reason": None,
        "macro_stage": settings.macro_stage.name,
        "horizon_days": cfg.horizon_days,
        "data_window": {"start": None, "end": None},
        "counts": {"n": n, "positives": positives, "leads_total": len(labels), "decided": decided,
                   "undecided": int((~labels["eligible"]).sum())},
        "features": [f.as_dict() for f in features],
        "metrics": None, "baseline": None, "candidates": None, "split": None,
        "calibration": [], "lift_by_decile": [], "permutation_importance": [],
        "value_bands": [],
        "macro_value": value, "macro_value_source": value_source,
        "currency": settings.macro_stage.currency,
        "library_versions": registry.library_versions(),
        "config_hash": registry.config_hash(settings),
    }
    if n:
        created = data.leads.loc[labelled.index, "created_at"]
        card["data_window"] = {"start": created.min().isoformat(), "end": created.max().isoformat()}
    result = {"leads": n, "positives": positives, "model_version": None, "fallback": None}
    if n < cfg.min_leads or positives < cfg.min_conversions:
        card["fallback_reason"] = (
            f"not enough data: {n} decided leads and {positives} conversions; the minimum is "
            f"[model] min_leads = {cfg.min_leads} and min_conversions = {cfg.min_conversions}")
    else:
        x, _ = build_features(data, features, labelled["moment"])
        y = labelled["y"].to_numpy()
        times = data.leads.loc[labelled.index, "created_at"]
        ev = evaluate_frame(x, y, features, times=times, random_state=cfg.random_state)
        card.update({
            "model": ev.best, "chosen": ev.chosen, "fallback_reason": ev.fallback_reason, "split": ev.split,
            "metrics": ev.metrics, "baseline": ev.baseline, "candidates": ev.candidates,
            "calibration": ev.calibration, "lift_by_decile": ev.lift,
            "permutation_importance": ev.importance,
            "value_bands": ev.bands if cfg.value_bands else [],
        })
        card["counts"]["test"] = ev.n_test
    model = None
    if card["chosen"]:
        model = fit_final(x, y, features, card["chosen"], cfg.random_state)
    version = registry.register(settings, card, model)
    if model is None:
        log.warning("no usable model (%s); the stage-value mapping is used", card["fallback_reason"])
        result["fallback"] = card["fallback_reason"]
    else:
        result["model_version"] = version
        result["roc_auc"] = round(card["metrics"]["roc_auc"], 4)
        result["baseline_roc_auc"] = round(card["baseline"]["roc_auc"], 4)
    return result


def _leads_due(ctx: Context, version: str) -> set[int]:
    """Active leads with no score from `version`, or changed (re-synced, new stage or event)
    since they were scored. Features depend only on the lead's own data, so an unchanged lead's
    score cannot change: skipping it keeps an incremental cycle cheap on a large store."""
    lead, score = Lead.__table__, Score.__table__  # type: ignore[attr-defined]
    stmt = (
        select(lead.c.id)
        .select_from(lead.outerjoin(score, (score.c.lead_id == lead.c.id)
                                    & (score.c.model_version == version)))
        .where(lead.c.status == LeadStatus.active,
               or_(score.c.id.is_(None), lead.c.updated_at > score.c.scored_at))
    )
    with ctx.engine.connect() as conn:
        return {row[0] for row in conn.execute(stmt)}


def score_leads(ctx: Context) -> dict[str, Any]:
    """Score the active leads that are new or changed since the current model scored them
    (training a model first when there is no model card at all); upsert their `Score` rows."""
    settings = ctx.settings
    card = registry.current_card(settings)
    trained = None
    if card is None:
        trained = train_and_register(ctx)
        card = registry.current_card(settings)
    assert card is not None
    if not card.get("chosen"):
        return {"scored": 0, "model_version": None, "fallback": card.get("fallback_reason"),
                **({"trained": trained["leads"]} if trained else {})}
    due = _leads_due(ctx, card["version"])
    if not due:
        return {"scored": 0, "model_version": card["version"], "fallback": None,
                **({"trained": trained["leads"]} if trained else {})}
    model = registry.load_model(settings, card)
    features = [Feature(f["name"], f["kind"], f["known_at"]) for f in card["features"]]
    # A few changed leads: read only those (an IN list); many: one full read is cheaper.
    only = due if len(due) <= 50_000 else None
    data = load_lead_data(ctx.engine, (LeadStatus.active,), ids=only)
    stage_rows = load_stage_rows(ctx.engine, settings, ids=only)
    macro_at = macro_reached_at(settings, first_reached(stage_rows)).reindex(data.leads.index)
    now = pd.Timestamp(ctx.now())
    # a converted lead is scored as of its conversion, like the training examples
    moments = macro_at.where(macro_at.notna() & (macro_at < now), now)
    value = Decimal(str(round(card["macro_value"], 4)))
    currency, version, bands = card["currency"], card["version"], card.get("value_bands") or []
    scored = 0
    ids = data.leads.index[data.leads.index.isin(due)].to_numpy()
    with track("score leads", total=len(ids)) as progress:
        for start in range(0, len(ids), SCORE_BATCH):
            part = moments.loc[ids[start:start + SCORE_BATCH]]
            x, _ = build_features(data, features, part)
            p = model.predict_proba(frame_for(x, features))[:, 1]
            rows = [{"lead_id": int(i), "model_version": version, "probability": float(pi),
                     "expected_value": (Decimal(str(round(float(pi), 6))) * value).quantize(
                         Decimal("0.0001")),
                     "currency": currency, "value_band": band_of(float(pi), bands),
                     "scored_at": ctx.now()}
                    for i, pi in zip(part.index, p, strict=True)]
            with session_scope(ctx.engine) as session:
                upsert(session, Score, rows, conflict=("lead_id", "model_version"))
            scored += len(rows)
            progress.advance(len(rows))
            if ctx.stopping:
                break
    out: dict[str, Any] = {"scored": scored, "model_version": version, "fallback": None}
    if trained:
        out["trained"] = trained["leads"]
    return out


def evaluate_csv(path: str | Path, *, label: str, positive: str | None = None,
                 exclude: list[str] | None = None, time_column: str | None = None,
                 sep: str | None = None) -> dict[str, Any]:
    """`leadloop model evaluate`: the training pipeline's honest figures on a CRM export."""
    frame = frame_from_csv(path, label=label, positive=positive, exclude=list(exclude or []),
                           time_column=time_column, sep=sep)
    if frame.y.sum() < 10 or (len(frame.y) - frame.y.sum()) < 10:
        raise ModelError(f"{Path(path).name}: need at least 10 converted and 10 unconverted rows")
    ev = evaluate_frame(frame.x, frame.y, frame.features, times=frame.times)
    return {
        **{k: round(v, 4) for k, v in ev.metrics.items()},
        "n": ev.n, "positives": ev.positives, "n_test": ev.n_test,
        **{f"baseline_{k}": round(v, 4) for k, v in ev.baseline.items()},
        "model": ev.best, "chosen": ev.chosen, "fallback_reason": ev.fallback_reason, "split": ev.split,
        "candidates_roc_auc": {k: round(v, 4) for k, v in ev.candidates.items()},
        "features": [f.name for f in frame.features],
        "dropped_columns": frame.dropped,
        "calibration": ev.calibration, "lift_by_decile": ev.lift,
        "permutation_importance": ev.importance[:15],
    }
