"""Everything the report shows, read from the store and aggregated with pandas.

The report reads only the store (never the CRM or a platform). Stage names come from the
configured `[[stages]]` mapping applied to the raw `StageChange` rows, so editing the mapping
changes the report without a re-sync.

Definitions used throughout (also printed in the report's footnotes):
- *qualified* = the lead reached the macro stage (`macro = true`);
- *won* = the lead reached the "won" stage: the first stage valued at `deal_amount`, else the
  last configured stage when it comes after the macro stage; *revenue* = the deal amounts of
  that stage (one amount per deal);
- rates are per lead, with 95 % Wilson score intervals;
- *predicted value* is the latest `Score.expected_value` of each lead;
- *uploaded value* / *accepted* count outbox rows the platform accepted (`status = sent`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pandas as pd
from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine
from sqlmodel import col as orm_col  # `col` names a loop variable below

from leadloop.config import Settings, StageConfig
from leadloop.context import Context
from leadloop.frames import read_frame
from leadloop.tables import (
    Conversion,
    ConversionKind,
    Lead,
    LeadEvent,
    LeadStatus,
    Score,
    StageChange,
    ValidationResult,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from leadloop.scoring.card import ModelCard
    from leadloop.values import StageSuggestion

Z95 = 1.959963984540054
DIMENSIONS: dict[str, str] = {
    "source": "utm_source",
    "medium": "utm_medium",
    "campaign": "utm_campaign",
    "landing_page": "landing_page",
    "month": "month",
}
NONE_LABEL = "(none)"
VALIDATION_COLUMNS = [
    "micro", "segment", "n", "n_with", "n_without", "macro_with", "macro_without", "rate_with",
    "rate_without", "lift", "lift_ci_low", "lift_ci_high", "p_value", "q_value", "phi",
    "median_days_to_macro", "verdict", "role", "reason",
]
CONVERSION_STATUSES = ["pending", "held", "sent", "rejected", "failed", "dead", "withdrawn"]


def wilson(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion; (nan, nan) when n == 0."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def clean_landing_page(url: object) -> str | None:
    """Scheme, host and path only: query strings can carry e-mails or tokens (never shown)."""
    if not isinstance(url, str) or not url.strip():
        return None
    parts = urlsplit(url.strip())
    if not parts.netloc:
        return parts.path or None
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", "", ""))


@dataclass
class Summary:
    """The report's headline counts (rates None when there are no leads)."""

    leads: int
    qualified: int
    qualified_rate: float | None
    qualified_ci: tuple[float, float] | None  # 95 % Wilson interval
    won: int
    won_rate: float | None
    revenue: float
    revenue_per_lead: float | None
    scored: int
    value_uploaded: float
    accepted: int  # outbox rows the platforms accepted
    first_lead: pd.Timestamp | None
    last_lead: pd.Timestamp | None


@dataclass
class StageEvidence:
    """One configured stage's evidence (`stage_evidence`): its leads and rate to the macro stage
    (Wilson interval), median days to it, the configured value and the data-driven one."""

    name: str
    macro: bool
    reached: int  # leads that reached it (or a deeper stage)
    rate_to_macro: float
    rate_low: float
    rate_high: float
    median_days: float
    value: float | str  # as configured: an amount, "deal_amount" or "predicted"
    currency: str
    configured: str | float
    destinations: list[str]
    suggested: float | None  # `leadloop stages suggest`, with its 95 % range
    suggested_low: float | None
    suggested_high: float | None
    differs: str  # a sentence when the two differ a lot, else ""


@dataclass
class ReportData:
    """The report's content, independent of the output format."""

    generated_at: datetime
    since: datetime | None
    currency: str
    macro_stage: str
    won_stage: str | None
    micro_names: list[str]
    destinations: list[str]
    summary: Summary
    leads: pd.DataFrame  # one row per lead (internal; never written out: no ids in outputs)
    by: dict[str, pd.DataFrame]
    validation: pd.DataFrame
    validation_run: dict[str, Any] | None
    model_card: ModelCard | None
    model_note: str
    uploads: pd.DataFrame
    holds: pd.DataFrame
    rejections: pd.DataFrame
    crm_vs_platform: pd.DataFrame
    conversions: pd.DataFrame  # internal, for guardrails
    stage_reach: pd.DataFrame  # internal, for guardrails
    guardrails: list[Any] = field(default_factory=list)
    stage_values: list[StageEvidence] = field(default_factory=list)  # evidence per stage
    immature_months: list[str] = field(default_factory=list)  # right-censored: rates still rising
    maturity_days: float = 0.0  # 90 % of leads that qualify do so within this many days
    spend_summary: dict[str, Any] | None = None  # totals when ad spend was given
    notes: list[str] = field(default_factory=list)  # inputs left out, with the reason


# -- reading the store ---------------------------------------------------------------------------


def _frame(engine: Engine | Connection, stmt: Any, columns: list[str], **kw: Any) -> pd.DataFrame:
    """Read on `engine` (a connection of its own), or on a connection inside a transaction."""
    if isinstance(engine, Connection):
        return read_frame(engine, stmt, columns, **kw)
    with engine.connect() as conn:
        return read_frame(conn, stmt, columns, **kw)


def _lead_conditions(since: datetime | None) -> list[Any]:
    """The leads a report covers: active or deleted (merged and erased ones are not leads of
    their own any more), created since `since` when given."""
    cond: list[Any] = [orm_col(Lead.status).in_([LeadStatus.active, LeadStatus.deleted])]
    if since is not None:
        cond.append(orm_col(Lead.created_at) >= since)
    return cond


def _load_leads(engine: Engine, since: datetime | None) -> pd.DataFrame:
    cols = [
        Lead.id, Lead.created_at, Lead.utm_source, Lead.utm_medium, Lead.utm_campaign,
        Lead.landing_page, Lead.consent_ad_user_data, Lead.consent_ad_personalization,
    ]
    stmt = select(*map(orm_col, cols)).where(*_lead_conditions(since))
    df = _frame(engine, stmt, [
        "lead_id", "created_at", "utm_source", "utm_medium", "utm_campaign", "landing_page",
        "consent_ad_user_data", "consent_ad_personalization",
    ], times=["created_at"])
    # Computed once per distinct value, not once per lead: the same few pages and months.
    pages = {u: clean_landing_page(u) for u in df["landing_page"].dropna().unique()}
    # as objects: mapping a column no lead fills gives float NaN, which pandas 3 will not fill
    # with a label (the tables' "(none)" row)
    df["landing_page"] = df["landing_page"].map(pages).astype(object)
    year_month = df["created_at"].dt.year * 100 + df["created_at"].dt.month
    months = {v: f"{v // 100:04d}-{v % 100:02d}" for v in year_month.dropna().unique()}
    df["month"] = year_month.map(months)
    return df


def _stage_matches(stage: StageConfig, fields: pd.Series, values: pd.Series) -> pd.Series:
    """A configured stage matches a raw stage change when the value is one of its CRM values and
    the field is its field (any field when the stage names none)."""
    mask = values.isin(stage.crm_values)
    if stage.field is not None:
        mask &= fields == stage.field
    return mask


def won_stage_name(settings: Settings) -> str | None:
    """The stage counted as *won*: the first valued at deal_amount, else the last configured stage
    if it comes after the macro stage."""
    for s in settings.stages:
        if s.value == "deal_amount":
            return s.name
    names = [s.name for s in settings.stages]
    macro_at = names.index(settings.macro_stage.name)
    return names[-1] if len(names) - 1 > macro_at else None


def _load_stage_reach(engine: Engine, settings: Settings, lead_ids: pd.Series) -> pd.DataFrame:
    """One row per (lead, configured stage): first time reached and revenue (sum over deals)."""
    raw = _frame(
        engine,
        select(*map(orm_col, [StageChange.lead_id, StageChange.field, StageChange.value,
                          StageChange.entered_at, StageChange.deal_id, StageChange.amount,
                          StageChange.is_lost])),
        ["lead_id", "field", "value", "entered_at", "deal_id", "amount", "is_lost"],
        times=["entered_at"], numbers=["amount"], categories=["field", "value"],
        convert=_hash_deal_ids,
    )
    raw = raw[raw["lead_id"].isin(set(lead_ids)) & ~raw["is_lost"].astype(bool)]
    parts = []
    for stage in settings.stages:
        hit = raw[_stage_matches(stage, raw["field"], raw["value"])]
        if hit.empty:
            continue
        per_deal = hit.groupby(["lead_id", "deal_id"], as_index=False).agg(
            entered_at=("entered_at", "min"), amount=("amount", "max"))
        per_lead = per_deal.groupby("lead_id", as_index=False).agg(
            entered_at=("entered_at", "min"), amount=("amount", "sum"))
        per_lead["stage"] = stage.name
        parts.append(per_lead)
    if not parts:
        return pd.DataFrame(columns=["lead_id", "stage", "entered_at", "amount"])
    out = pd.concat(parts, ignore_index=True)
    out["entered_at"] = pd.to_datetime(out["entered_at"], utc=True)
    return out[["lead_id", "stage", "entered_at", "amount"]]


def _hash_deal_ids(part: pd.DataFrame, _shared: Any) -> pd.DataFrame:
    """Deal ids are only grouped on: a 64-bit hash each, not a string per stage change."""
    part["deal_id"] = pd.util.hash_pandas_object(part["deal_id"].fillna(""), index=False).to_numpy()
    return part


def _load_micro_flags(engine: Engine, settings: Settings, lead_ids: pd.Series
                      ) -> tuple[list[str], pd.DataFrame]:
    """Which leads did each micro-conversion. Configured micro-conversions are matched on the
    event name (their `name`, or `event` when set); without configuration every event name
    present is reported."""
    ev = _frame(engine, select(orm_col(LeadEvent.lead_id), orm_col(LeadEvent.name)).distinct(),
                ["lead_id", "name"])
    ev = ev[ev["lead_id"].isin(set(lead_ids))]
    if settings.micro_conversions:
        aliases = {}
        for m in settings.micro_conversions:
            aliases[m.name] = m.name
            if m.event:
                aliases[m.event] = m.name
        ev = ev.assign(name=ev["name"].map(aliases)).dropna(subset=["name"])
        names = [m.name for m in settings.micro_conversions]
    else:
        names = sorted(ev["name"].unique().tolist())
    # groupby().size() counts in C; crosstab's count is a Python call per lead and name
    flags = ev.groupby(["lead_id", "name"]).size().unstack("name", fill_value=0).clip(upper=1) \
        if not ev.empty else pd.DataFrame()
    flags = flags.reindex(columns=names, fill_value=0)
    return names, flags


def _load_scores(engine: Engine) -> pd.DataFrame:
    """Each lead's latest score (the store keeps one per lead)."""
    return _frame(
        engine,
        select(*map(orm_col, [Score.lead_id, Score.probability, Score.expected_value])),
        ["lead_id", "probability", "expected_value"],
        numbers=["probability", "expected_value"],
    )


def load_conversions(engine: Engine | Connection, since: datetime | None) -> pd.DataFrame:
    """The outbox rows of the leads a report covers (see `_lead_conditions`)."""
    cols = ["lead_id", "destination", "stage", "kind", "conversion_action", "conversion_time",
            "value", "status", "hold_rule", "attempts", "platform_code", "last_error", "order_id",
            "click_id"]
    covered = select(Lead.id).where(*_lead_conditions(since))  # type: ignore[call-overload]
    stmt = select(*[getattr(Conversion, c) for c in cols]).where(
        Conversion.lead_id.in_(covered))  # type: ignore[attr-defined]
    return _frame(engine, stmt, cols, times=["conversion_time"], numbers=["value"],
                  categories=["destination", "stage", "kind", "conversion_action", "status",
                              "hold_rule", "platform_code"],
                  convert=_compact_conversions)


def _compact_conversions(part: pd.DataFrame, _shared: Any) -> pd.DataFrame:
    """Enums as their values; order ids and click ids (unique, long, only ever counted) as
    64-bit hashes, 0 for no click id. Kept as strings, a million of them scattered through the
    heap would pin the memory of everything freed around them."""
    for c in ("status", "kind"):  # once per distinct value, not per row
        part[c] = part[c].map({s: getattr(s, "value", s) for s in part[c].unique()})
    part["order_id"] = pd.util.hash_pandas_object(part["order_id"], index=False).to_numpy()
    clicks = part["click_id"].fillna("")
    part["click_id"] = np.where(clicks != "", pd.util.hash_pandas_object(clicks, index=False), 0
                                ).astype(np.uint64)
    return part


def _load_validation(engine: Engine) -> tuple[pd.DataFrame, dict[str, Any] | None]:
    """The rows of the latest validation run (by computed_at), overall segment first."""
    cols = [c for c in VALIDATION_COLUMNS] + ["computed_at", "job_run_id"]
    df = _frame(engine, select(*[getattr(ValidationResult, c) for c in cols]), cols)
    if df.empty:
        return pd.DataFrame(columns=VALIDATION_COLUMNS), None
    latest = df["computed_at"].max()
    run = df[df["computed_at"] == latest]
    run_id = run["job_run_id"].dropna()
    if not run_id.empty:
        run = df[df["job_run_id"] == run_id.max()]
    run = run.assign(_overall=(run["segment"] != "all").astype(int))
    run = run.sort_values(["_overall", "segment", "lift"], ascending=[True, True, False])
    from leadloop.validation import p_json  # scipy: only once there are rows to show

    # as `validate --json` writes them: an underflowed p or q is "< 1e-300", not a certain 0
    for col in ("p_value", "q_value"):
        run[col] = run[col].astype(object).map(lambda v: v if pd.isna(v) else p_json(float(v)))
    info = {"computed_at": latest, "job_run_id": None if run_id.empty else int(run_id.max()),
            "rows": len(run)}
    return run[VALIDATION_COLUMNS].reset_index(drop=True), info


def _model_card(settings: Settings) -> tuple[ModelCard | None, str]:
    try:
        from leadloop.scoring.registry import current_card
    except ImportError:
        return None, "no model trained yet (the scoring module is not installed)"
    card = current_card(settings)
    if not card:
        return None, "no model trained yet: leads are valued with the stage-value mapping"
    if card.chosen is None or card.fallback_reason:
        reason = card.fallback_reason or "no candidate was chosen"
        return card, f"no model in use ({reason}): leads are valued with the stage-value mapping"
    return card, ""


# -- aggregation ---------------------------------------------------------------------------------


def _first_reached(reach: pd.DataFrame) -> pd.DataFrame:
    """Wide: per lead (index), the first time it reached each stage (a column per stage)."""
    if reach.empty:
        return pd.DataFrame(index=pd.Index([], name="lead_id"))
    return reach.pivot_table(index="lead_id", columns="stage", values="entered_at", aggfunc="min")


def _lead_frame(leads: pd.DataFrame, reach: pd.DataFrame, reached: pd.DataFrame,
                micro: pd.DataFrame, scores: pd.DataFrame, conv: pd.DataFrame,
                settings: Settings, won: str | None, destinations: list[str]) -> pd.DataFrame:
    """One row per lead; `reached` is `_first_reached(reach)`."""
    df = leads.set_index("lead_id")
    macro = settings.macro_stage.name
    df["qualified"] = df.index.isin(reached.index[reached[macro].notna()]) \
        if macro in reached else False
    if won and won in reached:
        df["won"] = df.index.isin(reached.index[reached[won].notna()])
        revenue = reach[reach["stage"] == won].set_index("lead_id")["amount"]
        df["revenue"] = revenue.reindex(df.index).fillna(0.0)
    else:
        df["won"] = False
        df["revenue"] = 0.0
    for name in micro.columns:
        df[f"micro:{name}"] = micro[name].reindex(df.index).fillna(0).astype(int)
    sc = scores.set_index("lead_id") if not scores.empty else pd.DataFrame(
        columns=["probability", "expected_value"])
    df["predicted_probability"] = pd.to_numeric(sc["probability"].reindex(df.index), errors="coerce")
    df["predicted_value"] = pd.to_numeric(sc["expected_value"].reindex(df.index), errors="coerce")
    up = conv.loc[(conv["status"] == "sent") & (conv["kind"] == ConversionKind.conversion.value),
                  ["lead_id", "destination", "value"]]
    df["value_uploaded"] = up.groupby("lead_id")["value"].sum().reindex(df.index).fillna(0.0)
    for dest in destinations:
        n = up[up["destination"] == dest].groupby("lead_id").size()
        df[f"accepted:{dest}"] = n.reindex(df.index).fillna(0).astype(int)
    return df


def aggregate(df: pd.DataFrame, column: str, key: str) -> pd.DataFrame:
    """Leads, micro-conversions, qualified/won with Wilson intervals, value and uploads per value
    of `column`, returned with that column named `key`."""
    keyed = df.assign(_key=df[column].fillna(NONE_LABEL).replace("", NONE_LABEL))
    g = keyed.groupby("_key", sort=False)
    out = pd.DataFrame({"leads": g.size()})
    for c in [c for c in df.columns if c.startswith("micro:")]:
        out[c] = g[c].sum()
    out["qualified"] = g["qualified"].sum().astype(int)
    out["won"] = g["won"].sum().astype(int)
    out["revenue"] = g["revenue"].sum()
    out["qualified_rate"] = out["qualified"] / out["leads"]
    ci = [wilson(q, n) for q, n in zip(out["qualified"], out["leads"], strict=True)]
    out["qualified_ci_low"] = [c[0] for c in ci]
    out["qualified_ci_high"] = [c[1] for c in ci]
    out["won_rate"] = out["won"] / out["leads"]
    ci = [wilson(w, n) for w, n in zip(out["won"], out["leads"], strict=True)]
    out["won_ci_low"] = [c[0] for c in ci]
    out["won_ci_high"] = [c[1] for c in ci]
    out["revenue_per_lead"] = out["revenue"] / out["leads"]
    out["scored"] = g["predicted_probability"].count()
    out["mean_predicted_value"] = g["predicted_value"].mean()
    out["mean_predicted_probability"] = g["predicted_probability"].mean()
    # calibration: the qualified rate among scored leads only, next to their mean prediction
    scored = keyed[keyed["predicted_probability"].notna()]
    out["actual_rate_scored"] = scored.groupby("_key")["qualified"].mean()
    out["value_uploaded"] = g["value_uploaded"].sum()
    for c in [c for c in df.columns if c.startswith("accepted:")]:
        out[c] = g[c].sum().astype(int)
    out.index.name = key
    order = ["leads", "revenue"] if key != "month" else None
    out = out.sort_values(order, ascending=False) if order else out.sort_index()
    return out.reset_index()


def _uploads(conv: pd.DataFrame, destinations: list[str]) -> tuple[pd.DataFrame, ...]:
    by_status = conv.groupby(["destination", "status"]).size()
    built = conv.groupby("destination").size()
    attempted = conv.loc[conv["attempts"] > 0].groupby("destination").size()
    sent = conv["status"] == "sent"
    accepted_value = conv.loc[sent, ["destination", "value"]].groupby("destination")["value"].sum()
    rows = []
    for dest in destinations:
        rows.append({
            "destination": dest,
            "built": int(built.get(dest, 0)),
            **{s: int(by_status.get((dest, s), 0)) for s in CONVERSION_STATUSES},
            "attempted": int(attempted.get(dest, 0)),
            "value_accepted": float(accepted_value.get(dest, 0.0)),
        })
    uploads = pd.DataFrame(rows, columns=["destination", "built", *CONVERSION_STATUSES, "attempted",
                                          "value_accepted"])
    held = conv.loc[conv["status"] == "held", ["destination", "hold_rule"]].assign(
        hold_rule=lambda x: x["hold_rule"].astype(object).fillna("(no rule recorded)"))
    holds = held.groupby(["destination", "hold_rule"]).size().rename("n").reset_index() \
        .sort_values("n", ascending=False)
    rej = conv.loc[conv["status"].isin(["rejected", "dead"]),
                   ["destination", "status", "platform_code", "last_error", "order_id"]].assign(
        platform_code=lambda x: x["platform_code"].astype(object).fillna("(none)"),
        last_error=lambda x: x["last_error"].fillna(""))
    rejections = rej.groupby(["destination", "status", "platform_code"]).agg(
        n=("order_id", "size"), message=("last_error", "first")).reset_index() \
        .sort_values("n", ascending=False)
    return uploads, holds, rejections


def _export_facts(uploads: pd.DataFrame, conv: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    """What the exporter knows beyond the row statuses: rows of a request the platform later
    reported as partly failed (Data Manager PARTIAL_SUCCESS: Google says how many events failed,
    not which) are not counted as sent but as `sent_unconfirmed`; and whether each platform can
    restate or retract a sent conversion."""
    from leadloop.export.registry import adjustment_support

    partial = conv.loc[(conv["status"] == "sent") & (conv["platform_code"] == "PARTIAL_SUCCESS")]
    unconfirmed = partial.groupby("destination", observed=True).size()
    value = partial.groupby("destination", observed=True)["value"].sum()
    support = adjustment_support(settings)
    out = uploads.copy()
    out["sent_unconfirmed"] = [int(unconfirmed.get(d, 0)) for d in out["destination"]]
    out["sent"] = out["sent"] - out["sent_unconfirmed"]
    out["value_accepted"] = out["value_accepted"] - [float(value.get(d, 0.0)) for d in out["destination"]]
    for key in ("can_restate", "can_retract"):
        out[key] = [support.get(d, {}).get(key, False) for d in out["destination"]]
    return out


def _crm_vs_platform(settings: Settings, reach: pd.DataFrame, conv: pd.DataFrame) -> pd.DataFrame:
    rows = []
    first = conv.loc[conv["kind"] == ConversionKind.conversion.value, ["destination", "stage", "status"]]
    for stage in settings.stages:
        crm = int((reach["stage"] == stage.name).sum())
        if not stage.destinations:
            rows.append({"stage": stage.name, "destination": "", "conversion_action": "",
                         "crm_leads": crm, "built": 0, "held": 0, "accepted": 0, "rejected": 0,
                         "gap": None})
            continue
        for dest, action in stage.destinations.items():
            c = first[(first["destination"] == dest) & (first["stage"] == stage.name)]
            acc = int((c["status"] == "sent").sum())
            rows.append({"stage": stage.name, "destination": dest, "conversion_action": action,
                         "crm_leads": crm, "built": len(c), "held": int((c["status"] == "held").sum()),
                         "accepted": acc,
                         "rejected": int(c["status"].isin(["rejected", "dead"]).sum()),
                         "gap": crm - acc})
    return pd.DataFrame(rows)


def build_report_data(ctx: Context, since: datetime | None = None,
                      ad_spend: Path | None = None) -> ReportData:
    """Read the store and compute every table of the report (guardrails included). Ad spend
    comes from `ad_spend`, else from `[report] ad_spend` when set."""
    from leadloop.report.guardrails import evaluate_guardrails

    settings = ctx.settings
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    suggestions = stage_suggestions(ctx)  # first: see there
    leads = _load_leads(ctx.engine, since)
    ids = leads["lead_id"]
    reach = _load_stage_reach(ctx.engine, settings, ids)
    micro_names, micro = _load_micro_flags(ctx.engine, settings, ids)
    scores = _load_scores(ctx.engine)
    conv = load_conversions(ctx.engine, since)
    destinations = sorted(set(settings.destinations) | set(conv["destination"].unique()))
    won = won_stage_name(settings)
    first = _first_reached(reach)  # each aggregate once: the lead frame and the stages share it
    df = _lead_frame(leads, reach, first, micro, scores, conv, settings, won, destinations)
    by = {name: aggregate(df, col, name) for name, col in DIMENSIONS.items()}
    validation, run = _load_validation(ctx.engine)
    card, note = _model_card(settings)
    uploads, holds, rejections = _uploads(conv, destinations)
    uploads = _export_facts(uploads, conv, settings)
    currency = settings.macro_stage.currency
    n = len(df)
    q, w = int(df["qualified"].sum()), int(df["won"].sum())
    summary = Summary(
        leads=n,
        qualified=q,
        qualified_rate=q / n if n else None,
        qualified_ci=wilson(q, n) if n else None,
        won=w,
        won_rate=w / n if n else None,
        revenue=float(df["revenue"].sum()),
        revenue_per_lead=float(df["revenue"].sum()) / n if n else None,
        scored=int(df["predicted_probability"].notna().sum()),
        value_uploaded=float(df["value_uploaded"].sum()),
        accepted=int(uploads["sent"].sum()) if not uploads.empty else 0,
        first_lead=df["created_at"].min() if n else None,
        last_lead=df["created_at"].max() if n else None,
    )
    data = ReportData(
        generated_at=ctx.now(), since=since, currency=currency, macro_stage=settings.macro_stage.name,
        won_stage=won, micro_names=micro_names, destinations=destinations, summary=summary,
        leads=df, by=by, validation=validation, validation_run=run, model_card=card,
        model_note=note, uploads=uploads, holds=holds, rejections=rejections,
        crm_vs_platform=_crm_vs_platform(settings, reach, conv), conversions=conv,
        stage_reach=reach,
    )
    data.guardrails = evaluate_guardrails(data, settings)
    reached = _reached_at(settings, first, df.index)
    data.stage_values = stage_evidence(settings, reached, suggestions)
    data.maturity_days, data.immature_months = _maturity(df, reached, settings, by["month"],
                                                         ctx.now())
    if ad_spend is None and settings.report.ad_spend:
        ad_spend = settings.resolve_path(settings.report.ad_spend)
    if ad_spend is not None:
        _apply_spend(data, Path(ad_spend), since)
    return data


# -- evidence per stage, maturity, ad spend -------------------------------------------------------

DIFFERS_RATIO = 1.5  # a configured value this far from the data-driven one (and outside its range)


def _reached_at(settings: Settings, first: pd.DataFrame, lead_ids: pd.Index) -> pd.DataFrame:
    """Wide: per lead, the first time it reached each stage *or any deeper one* (a lead that
    skipped a stage in the CRM has still passed it); `first` is `_first_reached`."""
    names = [s.name for s in settings.stages]
    wide = first.reindex(index=first.index.intersection(lead_ids), columns=names)
    # From the deepest stage up, each stage's time or a deeper one's, whichever is first: as
    # numpy datetimes (`np.fmin` passes over NaT). A row-wise `min` of aware columns went
    # through an object array of Timestamps: the report's peak at 1M leads.
    deeper = np.full(len(wide), np.datetime64("NaT", "us"))
    columns = {}
    for name in reversed(names):
        own = pd.to_datetime(wide[name], utc=True).dt.tz_convert(None).to_numpy("datetime64[us]")
        deeper = np.fmin(own, deeper)
        columns[name] = pd.Series(deeper, index=wide.index).dt.tz_localize(UTC)
    return pd.DataFrame({name: columns[name] for name in names}, index=wide.index)


def stage_suggestions(ctx: Context) -> dict[str, StageSuggestion]:
    """The data-driven value of each stage (`leadloop stages suggest`), by stage name; none when
    working them out fails (evidence without suggestions beats no report, but it is logged).

    The report asks for them before it reads anything else: they read every stage change and
    lead again, and with the report's own frames alive beside that read its peak was ~1.05 GB
    at 1,000,000 leads on PostgreSQL."""
    from leadloop.values import suggest_stage_values

    try:
        suggested, _cohort = suggest_stage_values(ctx.engine, ctx.settings, ctx.now())
    except Exception as exc:
        log.warning("the report shows stage evidence without suggested values: working them out "
                    "failed (%s, a bug: please report it)", type(exc).__name__)
        return {}
    return {s.stage.name: s for s in suggested}


def stage_evidence(settings: Settings, reached: pd.DataFrame,
                   suggestions: dict[str, StageSuggestion]) -> list[StageEvidence]:
    """Per configured stage: leads that reached it, their rate to the macro stage (Wilson
    interval), median days to the macro stage, the configured value, and the data-driven value
    (`stage_suggestions`) with a sentence when the two differ a lot."""
    macro = settings.macro_stage.name
    cur = settings.macro_stage.currency
    out = []
    for stage in settings.stages:
        at = reached[stage.name].dropna() if stage.name in reached else pd.Series(dtype=object)
        n = len(at)
        macro_at = reached.loc[at.index, macro] if n else pd.Series(dtype=object)
        k = int(macro_at.notna().sum())
        delay = (macro_at - at).dropna().dt.total_seconds() / 86400 if n else pd.Series(dtype=float)
        delay = delay[delay >= 0]
        low, high = wilson(k, n)
        sug = suggestions.get(stage.name)
        row: dict[str, Any] = {
            "name": stage.name, "macro": stage.macro, "reached": n,
            "rate_to_macro": k / n if n else math.nan, "rate_low": low, "rate_high": high,
            "median_days": float(delay.median()) if len(delay) else math.nan,
            "value": stage.value, "currency": stage.currency,
            "configured": (f"{stage.currency} {stage.value:,.2f}" if isinstance(stage.value, float)
                           else stage.value),
            "destinations": sorted(stage.destinations),
            "suggested": getattr(sug, "value", None), "suggested_low": getattr(sug, "value_low", None),
            "suggested_high": getattr(sug, "value_high", None), "differs": "",
        }
        if (isinstance(stage.value, float) and row["suggested"] is not None and n >= 30
                and row["suggested_low"] is not None and row["suggested_high"] is not None):
            value, sv = stage.value, float(row["suggested"])
            outside = not (row["suggested_low"] <= value <= row["suggested_high"])
            far = (value == 0 and sv > 0) or (value > 0 and max(value, sv) / max(min(value, sv), 1e-9)
                                              >= DIFFERS_RATIO)
            if outside and far:
                row["differs"] = (
                    f"{stage.name} is configured at {cur} {value:,.0f}; the data say {cur} {sv:,.0f} "
                    f"(95 % range {row['suggested_low']:,.0f}–{row['suggested_high']:,.0f}, "
                    f"from {n:,} leads that reached it).")
        out.append(StageEvidence(**row))
    return out


def _maturity(df: pd.DataFrame, reached: pd.DataFrame, settings: Settings, months: pd.DataFrame,
              now: datetime) -> tuple[float, list[str]]:
    """Days within which 90 % of qualified leads qualified, and the months whose leads have not
    all had that long yet (their rates are right-censored: they will still rise)."""
    if months.empty or not df["qualified"].any():
        return 0.0, []
    macro_at = reached[settings.macro_stage.name].dropna()
    created = df.loc[macro_at.index, "created_at"]
    days = ((macro_at - created).dt.total_seconds() / 86400).clip(lower=0)
    if days.empty:
        return 0.0, []
    d90 = float(days.quantile(0.9))
    cutoff = pd.Timestamp(now) - pd.Timedelta(days=d90)
    immature = []
    for m in months["month"]:
        if m == NONE_LABEL:
            continue
        end = pd.Timestamp(f"{m}-01", tz="UTC") + pd.offsets.MonthBegin(1)
        if end > cutoff:
            immature.append(str(m))
    return d90, immature


def _apply_spend(data: ReportData, path: Path, since: datetime | None) -> None:
    from leadloop.report.spend import add_spend, load_ad_spend

    spend = load_ad_spend(path)
    data.notes.extend(spend.notes)
    rows = spend.rows
    if since is not None:
        rows = rows[rows["month"] >= f"{since:%Y-%m}"]
    by_source = rows.assign(k=rows["source"].str.lower()).groupby("k")["spend"].sum()
    by_campaign = rows.assign(k=rows["campaign"].str.lower()).groupby("k")["spend"].sum()
    data.by["source"] = add_spend(data.by["source"], "source", by_source)
    data.by["campaign"] = add_spend(data.by["campaign"], "campaign", by_campaign)
    known_sources = set(data.by["source"]["source"].astype(str).str.lower())
    known_campaigns = set(data.by["campaign"]["campaign"].astype(str).str.lower())
    unmatched = sorted({r.source or r.campaign for r in rows.itertuples()
                        if (r.source and r.source.lower() not in known_sources)
                        or (not r.source and r.campaign.lower() not in known_campaigns)})
    total = float(rows["spend"].sum())
    s = data.summary
    data.spend_summary = {
        "total": total,
        "cost_per_lead": total / s.leads if s.leads else None,
        "cost_per_qualified": total / s.qualified if s.qualified else None,
        "roas": s.revenue / total if total else None,
        "unmatched": unmatched,
        "file": path.name,
    }
