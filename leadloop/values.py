"""Stage-to-value mapping: reading configured stages out of the store, and data-driven values.

The store keeps the CRM's raw stage history (`StageChange.field`, `.value`); the `[[stages]]`
mapping is applied here, when reading, so people can edit the mapping without a re-sync.

A configured stage matches a `StageChange` row when
  * the row's `field` equals the stage's `field`, or, when the stage names no field, either of the
    CRM's stage properties (`[crm] lead_stage_property` or `deal_stage_property`), and
  * the row's `value` is one of the stage's `crm_values`.
A lead "reached" a stage at the earliest `entered_at` of its matching rows.

The "won" stage is the last stage of the `[[stages]]` list (the list runs down the funnel, e.g.
Lead → Qualified → Won); its deal amounts are the observed won values.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

import pandas as pd
from sqlalchemy import select
from sqlalchemy.engine import Engine

from leadloop.config import Settings, StageConfig
from leadloop.context import Context
from leadloop.frames import read_frame
from leadloop.store import id_chunks
from leadloop.tables import Lead, LeadStatus, StageChange, table_of

log = logging.getLogger(__name__)

STAGE_COLUMNS = ["lead_id", "stage", "entered_at", "amount", "currency", "deal_id", "is_lost"]


def stage_keys(settings: Settings) -> dict[tuple[str, str], list[str]]:
    """Map (CRM field, CRM value) to the configured stage names it means (see module doc)."""
    default_fields = (settings.crm.lead_stage_property, settings.crm.deal_stage_property)
    keys: dict[tuple[str, str], list[str]] = {}
    for stage in settings.stages:
        fields = (stage.field,) if stage.field else default_fields
        for f in fields:
            for v in stage.crm_values:
                keys.setdefault((f, v), []).append(stage.name)
    return keys


RAW_STAGE_COLUMNS = ["lead_id", "field", "value", "entered_at", "amount", "currency", "deal_id",
                     "is_lost"]


def map_stage_rows(settings: Settings, raw: pd.DataFrame) -> pd.DataFrame:
    """Turn raw stage changes (`RAW_STAGE_COLUMNS`) into one row per (lead, configured stage,
    deal) occurrence; unmatched rows are dropped."""
    keys = pd.DataFrame([(f, v, name) for (f, v), names in stage_keys(settings).items()
                         for name in names], columns=["field", "value", "stage"])
    frame = raw.merge(keys, on=["field", "value"], how="inner")
    frame["amount"] = pd.to_numeric(frame["amount"], errors="coerce").astype(float)
    frame["is_lost"] = frame["is_lost"].astype(bool)
    frame["entered_at"] = pd.to_datetime(frame["entered_at"], utc=True)
    return frame[STAGE_COLUMNS].reset_index(drop=True)


def load_stage_rows(engine: Engine, settings: Settings, ids: Collection[int] | None = None
                    ) -> pd.DataFrame:
    """Every configured-stage occurrence in the store, of leads `ids` only when given (see
    `map_stage_rows`). Read in partitions, so memory follows the matched rows only."""
    sc = table_of(StageChange)
    fields = sorted({f for f, _ in stage_keys(settings)})
    parts = []
    with engine.connect() as conn:
        for part in id_chunks(ids):
            stmt = select(*[sc.c[c] for c in RAW_STAGE_COLUMNS]).where(sc.c.field.in_(fields))
            if part is not None:
                stmt = stmt.where(sc.c.lead_id.in_(part))
            parts.append(read_frame(conn, stmt, RAW_STAGE_COLUMNS, times=["entered_at"],
                                    numbers=["amount"],
                                    convert=lambda raw, _: map_stage_rows(settings, raw)))
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def first_reached(stage_rows: pd.DataFrame) -> pd.DataFrame:
    """Wide frame: index lead_id, one column per stage with the first time it was reached."""
    if stage_rows.empty:
        return pd.DataFrame(index=pd.Index([], name="lead_id"))
    return stage_rows.groupby(["lead_id", "stage"])["entered_at"].min().unstack("stage")


def stages_at_or_after(settings: Settings, name: str) -> list[str]:
    """The stage `name` and every stage listed after it (deeper in the funnel)."""
    names = [s.name for s in settings.stages]
    return names[names.index(name):]


def macro_reached_at(settings: Settings, reached: pd.DataFrame) -> pd.Series:
    """First time each lead reached the macro stage, or any deeper stage (a lead that skipped
    a stage in the CRM has still passed it). NaT when never."""
    cols = [c for c in stages_at_or_after(settings, settings.macro_stage.name) if c in reached]
    if not cols:
        return pd.Series(pd.NaT, index=reached.index, dtype="datetime64[ns, UTC]")
    return reached[cols].min(axis=1)


def won_stage(settings: Settings) -> StageConfig:
    return settings.stages[-1]


def won_values(settings: Settings, stage_rows: pd.DataFrame) -> pd.Series:
    """Observed won value per won lead: the sum of its won deals' amounts (NaN if none known)."""
    won = stage_rows[(stage_rows["stage"] == won_stage(settings).name) & ~stage_rows["is_lost"]]
    per_deal = won.groupby(["lead_id", "deal_id"])["amount"].max()
    return per_deal.groupby(level="lead_id").sum(min_count=1)


def mean_stage_amount(stage_rows: pd.DataFrame, stage: str) -> float | None:
    """Mean deal amount recorded at `stage` (one per lead and deal), or None when none."""
    rows = stage_rows[(stage_rows["stage"] == stage) & stage_rows["amount"].notna()]
    if rows.empty:
        return None
    return float(rows.groupby(["lead_id", "deal_id"])["amount"].max().mean())


def macro_value(settings: Settings, stage_rows: pd.DataFrame) -> tuple[float, str]:
    """The money value of one macro conversion, and how it was obtained.

    A fixed `value` is used as is. For "deal_amount" or "predicted" the mean deal amount
    observed at the macro stage itself is used; when none was observed there, the stage's
    `default_value`, else 0, and the reason says so. Another stage's amounts (the won value,
    say) are never used: a won deal is worth more than a qualified lead, and expected value =
    P(macro) × this value would come out several times too high.
    """
    stage = settings.macro_stage
    if isinstance(stage.value, float):
        return stage.value, "fixed stage value"
    observed = mean_stage_amount(stage_rows, stage.name)
    if observed is not None:
        return observed, f"mean deal amount observed at {stage.name}"
    if stage.default_value is not None:
        log.warning("no deal amounts observed at the macro stage %r: its default_value %s is used",
                    stage.name, stage.default_value)
        return stage.default_value, f"stage default_value (no deal amounts observed at {stage.name})"
    log.warning("no deal amounts observed at the macro stage %r and no default_value: expected "
                "value is 0 (set default_value on that [[stages]] entry)", stage.name)
    return 0.0, (f"no deal amounts observed at {stage.name} and no default_value: expected value "
                 "is 0 until one is set")


# -- suggestions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StageSuggestion:
    stage: StageConfig
    reached: int
    won: int
    p_won: float
    p_low: float
    p_high: float
    mean_won_value: float | None
    value: float | None
    value_low: float | None
    value_high: float | None


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (sensible for small n and k = 0 or n)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class SuggestionCohort:
    """The leads the suggestions count: created at least `horizon_days` before `now`."""

    now: datetime
    horizon_days: int
    leads: int  # old enough: counted
    younger: int  # left out: they may not have reached their stages yet

    @property
    def created_before(self) -> datetime:
        return self.now - timedelta(days=self.horizon_days)


def suggest_stage_values(engine: Engine, settings: Settings, now: datetime
                         ) -> tuple[list[StageSuggestion], SuggestionCohort]:
    """For each stage: P(eventually won | reached stage) × mean won value, with intervals.

    Only leads older than `[model] horizon_days` count (the model's cohort): a lead created
    last week has had no time to reach a later stage or be won, and counting it would pull
    every suggested value down. The interval combines the Wilson interval of the win rate with
    a normal interval of the mean won value (a lower and upper product, conservative). Leads
    that are deleted, merged or erased are left out.
    """
    horizon = settings.model.horizon_days
    lead = table_of(Lead)
    with engine.connect() as conn:
        leads = read_frame(conn, select(lead.c.id, lead.c.created_at).where(
            lead.c.status.in_([LeadStatus.active, LeadStatus.deleted])), ["id", "created_at"],
            times=["created_at"])
    old_enough = (leads["created_at"] <= pd.Timestamp(now) - pd.Timedelta(days=horizon)).to_numpy()
    cohort = SuggestionCohort(now=now, horizon_days=horizon, leads=int(old_enough.sum()),
                              younger=int((~old_enough).sum()))
    old_ids = leads["id"].to_numpy()[old_enough]
    del leads
    stage_rows = load_stage_rows(engine, settings)
    stage_rows = stage_rows[stage_rows["lead_id"].isin(old_ids)]
    reached = first_reached(stage_rows)
    won_name = won_stage(settings).name
    won = (reached[won_name].notna() if won_name in reached
           else pd.Series(False, index=reached.index))
    values = won_values(settings, stage_rows).dropna()
    mean_won = float(values.mean()) if len(values) else None
    won_low: float | None
    won_high: float | None
    if mean_won is not None and len(values) > 1:
        half = 1.96 * float(values.std(ddof=1)) / math.sqrt(len(values))
        won_low, won_high = max(0.0, mean_won - half), mean_won + half
    else:
        won_low = won_high = mean_won
    out = []
    for stage in settings.stages:
        # reaching a deeper stage implies passing this one
        cols = [c for c in stages_at_or_after(settings, stage.name) if c in reached]
        at = reached[cols].notna().any(axis=1) if cols else won & False
        n, k = int(at.sum()), int((at & won).sum())
        p = k / n if n else 0.0
        lo, hi = wilson_interval(k, n)
        out.append(StageSuggestion(
            stage=stage, reached=n, won=k, p_won=p, p_low=lo, p_high=hi, mean_won_value=mean_won,
            value=p * mean_won if mean_won is not None and n else None,
            value_low=lo * won_low if won_low is not None and n else None,
            value_high=hi * won_high if won_high is not None and n else None,
        ))
    return out, cohort


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _current(stage: StageConfig) -> str:
    return _toml_str(stage.value) if isinstance(stage.value, str) else f"{stage.value:.2f}"


def format_suggestions_toml(suggestions: list[StageSuggestion], won_name: str,
                            cohort: SuggestionCohort) -> str:
    lines = [
        "# Suggested stage values: P(eventually won | reached stage) × mean won value,",
        f"# from the stage history in the store (won = reached {won_name!r}).",
        f"# Cohort: {cohort.leads:,} leads created on or before "
        f"{cohort.created_before:%Y-%m-%d %H:%M} UTC, older than the {cohort.horizon_days}-day",
        f"# horizon (as the model uses); {cohort.younger:,} younger leads left out: they may not "
        "have reached a stage yet.",
        "# Paste over your [[stages]]; the interval is a 95 % range for the value.",
        "",
    ]
    for s in suggestions:
        st = s.stage
        lines.append("[[stages]]")
        lines.append(f"name = {_toml_str(st.name)}")
        lines.append("crm_values = [" + ", ".join(_toml_str(v) for v in st.crm_values) + "]")
        if st.field:
            lines.append(f"field = {_toml_str(st.field)}")
        if st.macro:
            lines.append("macro = true")
        counts = f"{s.won} of {s.reached} leads that reached it won"
        if s.value is None:
            why = ("no won amounts in the cohort yet" if s.mean_won_value is None
                   else "no lead of the cohort reached it yet")
            lines.append(f"value = {_current(st)}  # kept ({why}; {counts})")
        else:
            figures = (f"{s.value:.2f} (95 % range {s.value_low:.2f}–{s.value_high:.2f}): {counts}, "
                       f"p = {s.p_won:.3f} ({s.p_low:.3f}–{s.p_high:.3f}) × mean won "
                       f"{s.mean_won_value:.2f}")
            if isinstance(st.value, str):
                # a per-deal rule carries more information than any average: keep it
                lines.append(f"value = {_current(st)}  # kept; data-driven average {figures}")
            else:
                lines.append(f"value = {s.value:.2f}  # {figures}")
        lines.append(f"currency = {_toml_str(st.currency)}")
        if st.destinations:
            pairs = ", ".join(f"{k} = {_toml_str(v)}" for k, v in st.destinations.items())
            lines.append(f"destinations = {{ {pairs} }}")
        lines.append("")
    return "\n".join(lines)


def suggest_stage_values_toml(ctx: Context) -> str:
    """`leadloop stages suggest`: ready-to-paste TOML for the `[[stages]]` mapping."""
    suggestions, cohort = suggest_stage_values(ctx.engine, ctx.settings, ctx.now())
    return format_suggestions_toml(suggestions, won_stage(ctx.settings).name, cohort)
