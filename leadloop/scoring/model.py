"""Train, register and apply the lead-value model; evaluate the same pipeline on a CSV export.

Label: the lead reached the macro stage (or a deeper one) within `[model] horizon_days` of its
creation. Leads younger than the horizon are left out of training: they are undecided.

Prediction moment (the same when training and when scoring, so a score means the same thing at
every age): a *landmark* age after creation, `LANDMARK_DAYS` (0, 1, 3, 7, 14, 30, 60 days, those
below the horizon). The model predicts P(converts within the horizon | not converted by the
landmark, features known at the landmark) with `age_days` as a feature. Each decided lead gives
one training row at a landmark drawn at random independently of its outcome, kept when the lead
was still open then (so each landmark's rows are a fair sample of the leads open at that age). A
lead is scored at its latest landmark passed (and before its conversion): its score moves when it
crosses one, and a lead still open after 30 days is scored as one (the former "at conversion or
end of horizon" training, scored "now", put 0.164 on leads whose observed rate was 0.009).

Snapshot mode: an export with no creation time, or whose conversions are stamped at the lead's
creation, records *whether* a lead converted, not when. Its times are stand-ins, so there is no
horizon to wait for and no age: every lead is decided, features are those of the export, the
model is evaluated by cross-validation, and the card says so (`mode`, `mode_reason`). Comparing
stand-in times (a micro-conversion and the label both stamped at the file time) is what made the
X Education model read the label off `micro_guide_download`: the converters' download fell at
their "conversion moment" and was not counted, the others' was.

Expected value = calibrated P(macro) × the value of one macro conversion (`values.macro_value`:
the stage's fixed value, or for "deal_amount"/"predicted" the mean deal amount observed at the
macro stage, else its default_value, never another stage's).
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from sqlalchemy import select

from leadloop.context import Context
from leadloop.errors import ModelError
from leadloop.frames import read_frame
from leadloop.freshness import fingerprint, store_marks
from leadloop.progress import track
from leadloop.scoring import registry
from leadloop.scoring.card import ModelCard
from leadloop.scoring.csvframe import frame_from_csv
from leadloop.scoring.evaluate import bands_of, evaluate_frame, fit_final, fit_steps
from leadloop.scoring.features import (
    AGE_FEATURE,
    Feature,
    LeadData,
    build_features,
    frame_for,
    load_lead_data,
    resolve_features,
    snapshot_reason,
)
from leadloop.scoring.threads import limited_threads
from leadloop.store import session_scope, upsert
from leadloop.tables import Lead, LeadStatus, Score
from leadloop.values import first_reached, load_stage_rows, macro_reached_at, macro_value

log = logging.getLogger(__name__)

SCORE_BATCH = 50_000
LANDMARK_DAYS = (0, 1, 3, 7, 14, 30, 60)
BAD_ORDER = "reached the macro stage before its creation time"


def landmarks(horizon_days: int) -> list[int]:
    """The landmark ages (days after creation) below the horizon."""
    return [a for a in LANDMARK_DAYS if a < horizon_days]


def _days(a: list[int] | np.ndarray) -> pd.TimedeltaIndex:
    return pd.to_timedelta(np.asarray(a, dtype=float), unit="D")


def training_rows(data: LeadData, macro_at: pd.Series, *, now: pd.Timestamp, horizon_days: int,
                  random_state: int, snapshot: bool
                  ) -> tuple[pd.DataFrame, Counter[str], dict[str, int]]:
    """The labelled rows (`y`, `moment`; index lead_id), the rows dropped by reason (bad data),
    and other counts (`decided`, `undecided`, `converted_before_landmark`)."""
    created = data.leads["created_at"]
    macro = macro_at.reindex(data.leads.index)
    if snapshot:
        rows = pd.DataFrame({"y": macro.notna().astype(int), "moment": snapshot_moments(created, now)})
        return rows, Counter(), {"decided": len(rows), "undecided": 0,
                                 "converted_before_landmark": 0}
    horizon = pd.Timedelta(days=horizon_days)
    deadline = created + horizon
    decided = (deadline <= now).to_numpy()
    bad = (macro.notna() & (macro < created)).to_numpy()
    converted = (macro.notna() & (macro <= deadline)).astype(int)
    ages = np.asarray(landmarks(horizon_days))
    rng = np.random.default_rng(random_state)
    moment = created + _days(ages[rng.integers(len(ages), size=len(created))])
    open_then = (macro.isna() | (macro > moment)).to_numpy()
    keep = decided & ~bad & open_then
    dropped = Counter({BAD_ORDER: int((decided & bad).sum())} if (decided & bad).any() else {})
    rows = pd.DataFrame({"y": converted[keep], "moment": moment[keep]})
    return rows, dropped, {"decided": int(decided.sum()), "undecided": int((~decided).sum()),
                           "converted_before_landmark": int((decided & ~bad & ~open_then).sum())}


def snapshot_moments(created: pd.Series, now: pd.Timestamp) -> pd.Series:
    """A snapshot's leads are taken as the export holds them: now (or at creation, for a lead
    stamped in the future by a clock ahead of ours)."""
    return created.where(created > now, now)


def scoring_moments(created: pd.Series, macro: pd.Series, now: pd.Timestamp, ages: list[int]
                    ) -> pd.Series:
    """Each lead's latest landmark passed by `now` and before its conversion (its creation when
    there is none, e.g. a conversion stamped before creation)."""
    limit = (now - created).dt.total_seconds().to_numpy() / 86400.0
    to_macro = (macro.reindex(created.index) - created).dt.total_seconds().to_numpy() / 86400.0
    lm = np.asarray(ages, dtype=float)
    by_now = np.searchsorted(lm, limit, side="right") - 1
    by_macro = np.where(np.isnan(to_macro), len(lm) - 1,
                        np.searchsorted(lm, np.nan_to_num(to_macro), side="left") - 1)
    idx = np.minimum(by_now, by_macro)
    age = np.where(idx >= 0, lm[np.clip(idx, 0, None)], 0.0)
    return created + _days(age)


def _wilson(k: int, n: int) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    z, p = 1.959964, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def calibration_by_age(ages: np.ndarray, y: np.ndarray, p: np.ndarray) -> list[dict[str, Any]]:
    """Per landmark age of the evaluation rows: mean predicted vs observed rate (Wilson 95 %),
    and the ROC AUC among leads of that age (what the lead's own features add: the age itself
    separates young from old leads, which makes the overall AUC higher than any band's)."""
    out = []
    for age in np.unique(ages):
        m = ages == age
        k, n = int(y[m].sum()), int(m.sum())
        low, high = _wilson(k, n)
        auc = float(roc_auc_score(y[m], p[m])) if 0 < k < n else None
        out.append({"band": f"open at {age:g} days", "age_days": float(age), "n": n,
                    "predicted": float(p[m].mean()),
                    "observed": k / n, "observed_ci": [low, high], "roc_auc": auc})
    return out


def auc_at_creation(data: LeadData, macro_at: pd.Series, features: list[Feature], model: Any, *,
                    test_from: pd.Timestamp, now: pd.Timestamp, horizon_days: int
                    ) -> dict[str, Any] | None:
    """The candidate's ROC AUC on every decided lead of the test period, each taken at creation
    (age 0, features known then): P(converts within the horizon) asked when the lead arrives, the
    question a single-snapshot model or a published floor answers. The card's overall AUC pools
    the landmark ages, and the age alone tells a lead still open at 30 days (rarely converts)
    from a new one, which makes it higher than what the lead's own features give."""
    created = data.leads["created_at"]
    macro = macro_at.reindex(data.leads.index)
    deadline = created + pd.Timedelta(days=horizon_days)
    keep = ((created >= test_from) & (deadline <= now) & ~(macro.notna() & (macro < created)))
    y = (macro.notna() & (macro <= deadline))[keep].astype(int).to_numpy()
    if not 0 < y.sum() < len(y):
        return None
    x, _ = build_features(data, features, created[keep])
    p = model.predict_proba(x)[:, 1]
    return {"roc_auc": float(roc_auc_score(y, p)), "n": len(y), "positives": int(y.sum()),
            "test_from": test_from.isoformat()}


def training_inputs(ctx: Context) -> str:
    """What a training read: the model configuration, the store's lead changes, the day (which
    leads are decided moves with the calendar). A fallback card is re-examined when it moves."""
    return fingerprint(registry.config_hash(ctx.settings), store_marks(ctx.engine)["leads"],
                       ctx.now().date().isoformat())


def train_and_register(ctx: Context) -> dict[str, Any]:
    """Train candidates on the store, register the chosen one (or a fallback card)."""
    return _train(ctx)[0]


def _train(ctx: Context) -> tuple[dict[str, Any], LeadData, pd.Series]:
    """`train_and_register`, also returning what it read (leads active and deleted) and each
    lead's first macro time: scoring right after reuses them instead of reading the store
    again. The stage rows themselves (2.3M at 1M leads) go as soon as those two are known:
    held through the training, they were part of the score job's memory peak."""
    settings, cfg = ctx.settings, ctx.settings.model
    inputs = training_inputs(ctx)
    data = load_lead_data(ctx.engine, (LeadStatus.active, LeadStatus.deleted))
    stage_rows = load_stage_rows(ctx.engine, settings)
    macro_at = macro_reached_at(settings, first_reached(stage_rows))
    mode_reason = snapshot_reason(settings, data, macro_at)
    snapshot = mode_reason is not None
    features = resolve_features(settings, data, with_age=not snapshot)
    labelled, dropped, other = training_rows(
        data, macro_at, now=pd.Timestamp(ctx.now()), horizon_days=cfg.horizon_days,
        random_state=cfg.random_state, snapshot=snapshot)
    if len(labelled) > cfg.max_training_rows:
        # The most recent decided leads: the funnel as it is now, in bounded memory.
        newest = data.leads.loc[labelled.index, "created_at"].nlargest(cfg.max_training_rows).index
        labelled = labelled.loc[labelled.index.isin(newest)]
    n, positives = len(labelled), int(labelled["y"].sum())
    value, value_source = macro_value(settings, stage_rows)
    del stage_rows
    now = ctx.now()
    ages = landmarks(cfg.horizon_days)
    card = ModelCard(
        version=registry.new_version(settings, now),
        created_at=now.isoformat(),
        macro_stage=settings.macro_stage.name,
        horizon_days=cfg.horizon_days,
        mode="snapshot" if snapshot else "landmark",
        mode_reason=mode_reason or (
            "creation and conversion times are known: each lead is scored at its latest landmark "
            f"age ({', '.join(map(str, ages))} days) before conversion, with its age as a "
            "feature, exactly as the training rows were taken"),
        landmark_days=[] if snapshot else ages,
        data_window={"start": None, "end": None},
        counts={"n": n, "positives": positives, "leads_total": len(data.leads),
                **other, "dropped": dict(dropped)},
        features=[f.as_dict() for f in features],
        macro_value=value, macro_value_source=value_source,
        currency=settings.macro_stage.currency,
        library_versions=registry.library_versions(),
        config_hash=registry.config_hash(settings),
        inputs=inputs,
    )
    for reason, count in dropped.items():
        log.warning("%d lead(s) left out of training: %s", count, reason)
    if n:
        created = data.leads.loc[labelled.index, "created_at"]
        card.data_window = {"start": created.min().isoformat(), "end": created.max().isoformat()}
    result: dict[str, Any] = {"leads": n, "positives": positives, "model_version": None,
                              "fallback": None}
    model = None
    if n < cfg.min_leads or positives < cfg.min_conversions:
        card.fallback_reason = (
            f"not enough data: {n} decided leads to train on and {positives} conversions; the minimum is "
            f"[model] min_leads = {cfg.min_leads} and min_conversions = {cfg.min_conversions}")
        if other["undecided"]:
            card.fallback_reason += (f" ({other['undecided']} leads are younger than "
                                     f"horizon_days = {cfg.horizon_days} and undecided)")
    else:
        x, _ = build_features(data, features, labelled["moment"])
        y = labelled["y"].to_numpy()
        times = None if snapshot else data.leads.loc[labelled.index, "created_at"]
        with track("train model", total=fit_steps(times is not None) + 1) as progress:
            ev = evaluate_frame(x, y, features, times=times, random_state=cfg.random_state,
                                tracker=progress, threads=cfg.threads)
            if ev.chosen:
                model = fit_final(x, y, features, ev.chosen, ev.calibration_method["method"],
                                  cfg.random_state, cfg.threads)
            progress.advance()
        card.model, card.chosen, card.fallback_reason = ev.best, ev.chosen, ev.fallback_reason
        card.split, card.selection = ev.split, ev.selection
        card.metrics, card.baseline, card.candidates = ev.metrics, ev.baseline, ev.candidates
        card.candidate_metrics = ev.candidate_metrics
        card.calibration_method, card.gate = ev.calibration_method, ev.gate
        card.calibration, card.lift_by_decile = ev.calibration, ev.lift
        card.permutation_importance = ev.importance
        card.suspected_leakage, card.strongest_feature = ev.suspected_leakage, ev.strongest_feature
        card.value_bands = ev.bands if cfg.value_bands else []
        if not snapshot:
            card.calibration_by_age = calibration_by_age(
                x.loc[ev.eval_index, AGE_FEATURE.name].to_numpy(), ev.eval_y, ev.eval_p)
        if not snapshot and ev.model is not None and len(ev.eval_index):
            with limited_threads(cfg.threads):  # its predictions too, not only the fits
                card.metrics_at_creation = auc_at_creation(
                    data, macro_at, features, ev.model,
                    test_from=data.leads.loc[ev.eval_index, "created_at"].min(),
                    now=pd.Timestamp(now), horizon_days=cfg.horizon_days)
        card.counts["test"] = ev.n_test
        for leak in ev.suspected_leakage:
            log.warning("suspected leakage in %s: %s (exclude it with [model] leaky_fields)",
                        leak["feature"], leak["reason"])
    version = registry.register(settings, card, model)
    if model is None or card.metrics is None or card.baseline is None:
        log.warning("no usable model (%s); the stage-value mapping is used", card.fallback_reason)
        result["fallback"] = card.fallback_reason
    else:
        result["model_version"] = version
        result["roc_auc"] = round(card.metrics["roc_auc"], 4)
        result["baseline_roc_auc"] = round(card.baseline["roc_auc"], 4)
    return result, data, macro_at


def _leads_due(ctx: Context, card: ModelCard) -> set[int]:
    """Active leads with no score from the card's model, changed (re-synced, new stage or
    event) since they were scored, or (landmark mode) past a new landmark age since then. A
    lead's score depends only on its own data and its landmark, so any other lead's score
    cannot change: skipping it keeps an incremental cycle cheap on a large store."""
    lead, score = Lead.__table__, Score.__table__  # type: ignore[attr-defined]
    stmt = (
        select(lead.c.id, lead.c.created_at, lead.c.updated_at, score.c.scored_at)
        .select_from(lead.outerjoin(score, (score.c.lead_id == lead.c.id)
                                    & (score.c.model_version == card.version)))
        .where(lead.c.status == LeadStatus.active)
    )
    cols = ["id", "created_at", "updated_at", "scored_at"]
    with ctx.engine.connect() as conn:
        rows = read_frame(conn, stmt, cols, times=cols[1:])
    due = rows["scored_at"].isna() | (rows["updated_at"] > rows["scored_at"])
    ages = np.asarray(card.landmark_days, dtype=float)
    if len(ages):
        def landmark(at: pd.Series) -> np.ndarray:
            return np.searchsorted(ages, (at - rows["created_at"]).dt.total_seconds() / 86400.0,
                                   side="right")

        now = pd.Series(pd.Timestamp(ctx.now()), index=rows.index)
        due |= rows["scored_at"].notna() & (landmark(now) != landmark(rows["scored_at"]))
    return set(rows.loc[due, "id"].astype(int))


def _active_ids(ctx: Context) -> set[int]:
    lead = Lead.__table__  # type: ignore[attr-defined]
    with ctx.engine.connect() as conn:
        return set(conn.execute(select(lead.c.id).where(lead.c.status == LeadStatus.active))
                   .scalars())


def _narrowed(data: LeadData, ids: set[int]) -> LeadData:
    """The leads `ids` (all active: see `_leads_due`) of frames already read, with their
    events; a lead's score depends on its own rows only. When every lead read is due (a model
    just trained: every active lead), the frames are used as they are: copying them put a
    second million-lead frame beside the first."""
    keep = data.leads.index.isin(list(ids))
    if keep.all():
        return data
    return LeadData(leads=data.leads[keep], events=data.events[data.events["lead_id"].isin(list(ids))])


def score_leads(ctx: Context) -> dict[str, Any]:
    """Score the active leads that are new or changed since the current model scored them
    (training a model first when there is no model card, or when the card is a fallback and the
    store or the configuration changed since); upsert their `Score` rows."""
    settings = ctx.settings
    card = registry.current_card(settings)
    trained: dict[str, Any] | None = None
    read: list[Any] = []  # what training read (leads, first macro times), for scoring right after
    if card is None or (not card.chosen and card.inputs != training_inputs(ctx)):
        trained, *read = _train(ctx)
        card = registry.current_card(settings)
    assert card is not None
    if not card.chosen:
        return {"scored": 0, "model_version": None, "fallback": card.fallback_reason,
                **({"trained": trained["leads"]} if trained else {})}
    # Nothing has a score from a model just trained: every active lead is due (the query of
    # `_leads_due`, a join with the score table, would find exactly those).
    due = _active_ids(ctx) if trained else _leads_due(ctx, card)
    if not due:
        return {"scored": 0, "model_version": card.version, "fallback": None,
                **({"trained": trained["leads"]} if trained else {})}
    model = registry.load_model(settings, card)
    features = [Feature(f["name"], f["kind"], f["known_at"])  # type: ignore[arg-type]
                for f in card.features]
    if read:  # just trained: the store as training read it, narrowed to the leads due
        data, macro_all = _narrowed(read[0], due), read[1]
        read.clear()  # the full frames go now, not after scoring
    else:
        # A few changed leads: read only those (an IN list); many: one full read is cheaper.
        only = due if len(due) <= 50_000 else None
        data = load_lead_data(ctx.engine, (LeadStatus.active,), ids=only)
        macro_all = macro_reached_at(settings,
                                     first_reached(load_stage_rows(ctx.engine, settings, ids=only)))
    macro_at = macro_all.reindex(data.leads.index)
    now = pd.Timestamp(ctx.now())
    if card.mode == "snapshot":
        moments = snapshot_moments(data.leads["created_at"], now)
    else:
        moments = scoring_moments(data.leads["created_at"], macro_at, now, card.landmark_days)
    value, cent = Decimal(str(round(card.macro_value, 4))), Decimal("0.0001")
    currency, version, bands = card.currency, card.version, card.value_bands or []
    scored = 0
    ids = data.leads.index[data.leads.index.isin(due)].to_numpy()
    # A batch's scores are written (its own transaction) while the next batch is scored: the
    # database works while the model predicts. One write at a time, in order.
    writing: Future[None] | None = None
    with limited_threads(settings.model.threads), \
            track("score leads", total=len(ids)) as progress, \
            ThreadPoolExecutor(1, thread_name_prefix="score-write") as writer:
        for start in range(0, len(ids), SCORE_BATCH):
            part = moments.loc[ids[start:start + SCORE_BATCH]]
            x, _ = build_features(data, features, part)
            p = model.predict_proba(frame_for(x, features))[:, 1].tolist()
            scored_at = ctx.now()
            rows = [{"lead_id": i, "model_version": version, "probability": pi,
                     "expected_value": (Decimal(str(round(pi, 6))) * value).quantize(cent),
                     "currency": currency, "value_band": band, "scored_at": scored_at}
                    for i, pi, band in zip(part.index.tolist(), p, bands_of(p, bands),
                                           strict=True)]
            if writing is not None:
                writing.result()  # the previous batch is stored (or its error raised here)
            writing = writer.submit(_write_scores, ctx, rows)
            scored += len(rows)
            progress.advance(len(rows))
            if ctx.stopping:
                break
        if writing is not None:
            writing.result()
    out: dict[str, Any] = {"scored": scored, "model_version": version, "fallback": None}
    if trained:
        out["trained"] = trained["leads"]
    return out


def _write_scores(ctx: Context, rows: list[dict[str, Any]]) -> None:
    with session_scope(ctx.engine) as session:
        upsert(session, Score, rows, conflict=("lead_id",))  # a newer version's score replaces


def evaluate_csv(path: str | Path, *, label: str, positive: str | None = None,
                 exclude: list[str] | None = None, time_column: str | None = None,
                 sep: str | None = None, threads: int | None = None) -> dict[str, Any]:
    """`leadloop model evaluate`: the training pipeline's honest figures on a CRM export."""
    frame = frame_from_csv(path, label=label, positive=positive, exclude=list(exclude or []),
                           time_column=time_column, sep=sep)
    if frame.y.sum() < 10 or (len(frame.y) - frame.y.sum()) < 10:
        raise ModelError(f"{Path(path).name}: need at least 10 converted and 10 unconverted rows")
    with track("evaluate", total=fit_steps(frame.times is not None)) as progress:
        ev = evaluate_frame(frame.x, frame.y, frame.features, times=frame.times, tracker=progress,
                            threads=threads)
    return {
        **{k: round(v, 4) for k, v in ev.metrics.items()},
        "candidate_roc_auc": round(ev.candidate_metrics["roc_auc"], 4),
        "candidate_metrics": {k: round(v, 4) for k, v in ev.candidate_metrics.items()},
        "n": ev.n, "positives": ev.positives, "n_test": ev.n_test,
        **{f"baseline_{k}": round(v, 4) for k, v in ev.baseline.items()},
        "model": ev.best, "chosen": ev.chosen, "fallback_reason": ev.fallback_reason,
        "split": ev.split, "selection": ev.selection,
        "calibration_method": ev.calibration_method, "gate": ev.gate,
        "candidates_roc_auc": {k: round(v, 4) for k, v in ev.candidates.items()},
        "features": [f.name for f in frame.features],
        "dropped_columns": frame.dropped,
        "suspected_leakage": ev.suspected_leakage, "strongest_feature": ev.strongest_feature,
        "calibration": ev.calibration, "lift_by_decile": ev.lift,
        "permutation_importance": ev.importance[:15],
    }
