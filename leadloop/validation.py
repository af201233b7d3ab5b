"""Which micro-conversions predict the macro conversion, with significance before a verdict.

For every micro-conversion, overall and per segment (`[validation] segment_by`) where the counts
allow: leads with and without it, the macro rate of each group, the lift (rate ratio) with a
95 % CI by the log method, Fisher's exact test when an expected cell count is under 5 (else the
chi-square test with Yates' correction), Benjamini–Hochberg q-values across every test of the
run, the phi coefficient and the median days from micro to macro. On the store, the lift and
test are stratified by the lead's creation month (Mantel–Haenszel rate ratio, Greenland–Robins
CI, Cochran–Mantel–Haenszel test), so a micro-conversion that merely grew in the months the macro
rate grew is not taken for a predictor. Verdicts:

* predictive: q ≤ alpha and lift ≥ 1.5;        role "primary goal" (lift ≥ 2) or "secondary signal"
* weak:       q ≤ alpha and 1 < lift < 1.5;    role "diagnostic only"
* negative:   q ≤ alpha and lift < 1;          role "retire" (it lowers the odds)
* no signal:  q > alpha and a narrow CI around 1, inside 1/1.5–1.5: the data rule out an effect
  worth acting on either way;                  role "retire" (a conversion in name only)
* not enough data: q > alpha with a wider CI (absence of evidence, not evidence of absence), or
  fewer than `min_events` leads with it or converted, or fewer than
  `min_leads_per_group` without it;            role "diagnostic only" (keep watching). The reason
  says about how many leads would settle it: enough for 80 % power to find a lift of 1.5 at
  alpha, with the same share of leads having it and the same base rate.

The population is the same as the model's: leads whose horizon has passed (and whose window,
below, has too). In snapshot mode (an export without creation or conversion times, see
`leadloop.scoring.features.snapshot_reason`) every lead is decided and a micro-conversion counts
when the export holds it: there are no times to window, stratify by or measure gaps with.
Otherwise every lead gets the same observation window: a micro-conversion counts when it
happened within `[validation] window_days` of the lead's creation, whether the lead converted
before that or not. Counting only until each lead's conversion would give converters a shorter
window than non-converters, and a micro-conversion spread over time regardless of conversion
would then look like it lowers the odds. The price is that a micro-conversion that *follows* the
conversion inside the window counts too; the reason says so when most converters with it had it
only after converting.
A trend check asks whether week-over-week growth of a micro-conversion goes with growth of the
macro conversion `trend_lag_weeks` later (Spearman correlation of the weekly changes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

from leadloop.context import Context
from leadloop.csvio import parse_label, read_csv
from leadloop.errors import ConfigError, LeadloopError
from leadloop.expr import ExpressionError
from leadloop.expr import parse as parse_expression
from leadloop.scoring.csvframe import MISSING_VALUES
from leadloop.scoring.features import ATTRIBUTE_PREFIX, load_lead_data, snapshot_reason
from leadloop.store import session_scope
from leadloop.tables import LeadStatus, ValidationResult
from leadloop.values import first_reached, load_stage_rows, macro_reached_at

PREDICTIVE_LIFT = 1.5
PRIMARY_LIFT = 2.0
MIN_TREND_WEEKS = 8
Verdict = Literal["predictive", "weak", "negative", "no signal", "not enough data"]
VERDICTS: tuple[Verdict, ...] = ("predictive", "weak", "negative", "no signal", "not enough data")
Role = Literal["primary goal", "secondary signal", "diagnostic only", "retire"]
TestName = Literal["fisher", "chi-square", "mantel-haenszel"]
TrendVerdict = Literal["moves with macro", "moves against macro", "no relation", "not enough weeks"]
POWER = 0.8  # for "how many leads would settle it"
P_FLOOR = 1e-300  # p-values below this are shown as "< 1e-300" (doubles underflow near 1e-308)
AFTER_MACRO_NOTE = 0.5  # mention when more converters had the micro only after converting


@dataclass(kw_only=True)
class TwoByTwo:
    """Leads with and without a micro-conversion against reaching the macro conversion: the
    counts, the rates, and (when the counts reach the minimums: `enough`) the lift with its
    95 % CI, the test's p-value and phi."""

    n: int
    n_with: int
    n_without: int
    macro_with: int
    macro_without: int
    rate_with: float | None
    rate_without: float | None
    min_events: int
    min_group: int
    enough: bool = False
    lift: float | None = None
    lift_ci_low: float | None = None
    lift_ci_high: float | None = None
    p_value: float | None = None
    phi: float | None = None
    test: TestName | None = None


@dataclass(kw_only=True)
class MicroTest(TwoByTwo):
    """The table of one micro-conversion, overall (`segment` "all") or within a segment value
    (`segment` "column=value"), before the run's q-values and verdicts."""

    micro: str
    segment: str
    median_days_to_macro: float | None = None  # overall rows of a dated run
    after_macro_share: float | None = None  # converters with it who had it only after converting


# The fields `leadloop validate --csv` shows, in its order (its JSON output is a contract).
CSV_ROW_FIELDS = ("micro", "segment", "n", "n_with", "n_without", "macro_with", "macro_without",
                  "rate_with", "rate_without", "lift", "lift_ci_low", "lift_ci_high", "p_value",
                  "q_value", "phi", "test", "verdict", "role", "reason")


@dataclass(kw_only=True)
class ValidationRow(MicroTest):
    """A judged test: its Benjamini–Hochberg q-value across the run (None without a test), the
    verdict, the recommended role and the reason in words."""

    q_value: float | None
    verdict: Verdict
    role: Role
    reason: str

    def csv_row(self) -> dict[str, Any]:
        """The row as `leadloop validate --csv` shows it (`CSV_ROW_FIELDS`)."""
        return {name: getattr(self, name) for name in CSV_ROW_FIELDS}


@dataclass(kw_only=True)
class Trend:
    """Whether weekly growth of a micro-conversion goes with growth of the macro conversion
    `lag_weeks` later (Spearman over `weeks` weekly changes)."""

    lag_weeks: int
    weeks: int
    verdict: TrendVerdict
    spearman_rho: float | None = None
    p_value: float | None = None

    def as_json(self) -> dict[str, Any]:
        """As stored in a validation result's `details["trend"]` (the workbench reads it)."""
        if self.spearman_rho is None:
            return {"lag_weeks": self.lag_weeks, "weeks": self.weeks, "verdict": self.verdict}
        return {"lag_weeks": self.lag_weeks, "weeks": self.weeks, "spearman_rho": self.spearman_rho,
                "p_value": self.p_value, "verdict": self.verdict}


def p_text(p: float | None) -> str:
    """A p- or q-value for people: two significant digits, an upper bound when it underflowed."""
    if p is None:
        return "–"
    return f"< {P_FLOOR:.0e}" if p < P_FLOOR else f"{p:.2g}"


def _q_clause(q: float) -> str:
    text = p_text(q)
    return text if text.startswith("<") else f"= {text}"


def p_json(p: float | None) -> float | str | None:
    """A p- or q-value for JSON: the number, or the string "< 1e-300" when it underflowed (a 0
    would claim certainty the arithmetic does not have)."""
    return p_text(p) if p is not None and p < P_FLOOR else p


def leads_to_settle(n_with: int, n_without: int, macro_with: int, macro_without: int, *,
                    alpha: float, min_events: int = 0, min_group: int = 0) -> int | None:
    """About how many leads (with the same share having the micro-conversion and the same base
    rate) give 80 % power to find a lift of `PREDICTIVE_LIFT` at `alpha`, two-sided, on the log
    rate ratio, and meet the minimum counts; always more than the leads at hand (they did not
    settle it). None when nobody has it or nobody converted: nothing to base it on."""
    n = n_with + n_without
    if n == 0 or n_with == 0 or macro_with + macro_without == 0:
        return None
    share = min(max(n_with / n, 1 / n), 1 - 1 / n) if n > 1 else 0.5
    base = max(macro_without, 0.5) / max(n_without, 1)  # Haldane-style when none converted
    base = min(base, 0.99 / PREDICTIVE_LIFT)
    raised = base * PREDICTIVE_LIFT
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(POWER)
    per_lead = (1 - raised) / (share * raised) + (1 - base) / ((1 - share) * base)
    needed = z * z * per_lead / math.log(PREDICTIVE_LIFT) ** 2
    overall = (macro_with + macro_without) / n
    needed = max(needed, min_events / share, min_group / (1 - share), min_events / overall, n + 1)
    return int(math.ceil(needed / 100) * 100)


def two_by_two(has: np.ndarray, y: np.ndarray, *, min_events: int, min_group: int,
               strata: np.ndarray | None = None) -> TwoByTwo:
    """Counts, rates, lift with its log-method CI, p-value and phi for one micro-conversion.

    With `strata` (the lead's creation month, say) spanning more than one value, the lift is
    the Mantel–Haenszel rate ratio across them with the Greenland–Robins CI, and the p-value
    the Cochran–Mantel–Haenszel test's: when both the share of leads with a micro-conversion
    and the macro rate drift over time, the pooled ratio shows an effect neither has.
    """
    has, y = np.asarray(has, dtype=bool), np.asarray(y, dtype=int)
    n_with, n_without = int(has.sum()), int((~has).sum())
    a, c = int(y[has].sum()), int(y[~has].sum())
    b, d = n_with - a, n_without - c
    row = TwoByTwo(
        n=n_with + n_without, n_with=n_with, n_without=n_without, macro_with=a, macro_without=c,
        rate_with=a / n_with if n_with else None,
        rate_without=c / n_without if n_without else None,
        min_events=min_events, min_group=min_group,
    )
    if n_with < min_events or n_without < min_group or a + c < min_events:
        return row
    row.enough = True
    # Haldane's +0.5 keeps the ratio and its CI finite when a cell is empty
    aa, bb, cc, dd = (v + 0.5 for v in (a, b, c, d)) if 0 in (a, b, c, d) else (a, b, c, d)
    lift = (aa / (aa + bb)) / (cc / (cc + dd))
    se = math.sqrt(1 / aa - 1 / (aa + bb) + 1 / cc - 1 / (cc + dd))
    row.lift = lift
    row.lift_ci_low, row.lift_ci_high = lift * math.exp(-1.96 * se), lift * math.exp(1.96 * se)
    table = np.array([[a, b], [c, d]])
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    if expected.min() < 5:
        row.p_value, row.test = float(stats.fisher_exact(table)[1]), "fisher"
    else:
        row.p_value = float(stats.chi2_contingency(table, correction=True)[1])
        row.test = "chi-square"
    denom = math.sqrt((a + b) * (c + d) * (a + c) * (b + d))
    row.phi = (a * d - b * c) / denom if denom else 0.0
    codes = None if strata is None else pd.factorize(np.asarray(strata))[0]
    if codes is not None and len(codes) and codes.max() > 0:
        adjusted = _mantel_haenszel(has, y, codes)
        if adjusted is not None:
            lift, se, row.p_value = adjusted
            row.lift, row.test = lift, "mantel-haenszel"
            row.lift_ci_low, row.lift_ci_high = (lift * math.exp(-1.96 * se),
                                                 lift * math.exp(1.96 * se))
    return row


def _mantel_haenszel(has: np.ndarray, y: np.ndarray, codes: np.ndarray
                     ) -> tuple[float, float, float] | None:
    """(rate ratio, SE of its log, CMH p-value with continuity correction) across strata (each
    lead's as a code 0..k-1), or None when a stratum-pooled sum is zero (no information to
    adjust with)."""
    k = codes.max() + 1
    n1 = np.bincount(codes, weights=has, minlength=k)
    big_n = np.bincount(codes, minlength=k).astype(float)
    a = np.bincount(codes, weights=has & (y == 1), minlength=k)
    m1 = np.bincount(codes, weights=y, minlength=k)
    n0, c = big_n - n1, m1 - a
    keep = (n1 > 0) & (n0 > 0)
    n1, n0, big_n, a, c, m1 = (v[keep] for v in (n1, n0, big_n, a, c, m1))
    r, s = float((a * n0 / big_n).sum()), float((c * n1 / big_n).sum())
    if r == 0 or s == 0:
        return None
    var_log = float(((m1 * n1 * n0 - a * c * big_n) / big_n ** 2).sum()) / (r * s)
    m0 = big_n - m1
    many = big_n > 1
    var_a = float((n1 * n0 * m1 * m0 / (big_n ** 2 * (big_n - 1)))[many].sum())
    if var_log <= 0 or var_a <= 0:
        return None
    diff = abs(float(a.sum() - (n1 * m1 / big_n).sum()))
    chi = max(diff - 0.5, 0.0) ** 2 / var_a
    return r / s, math.sqrt(var_log), float(stats.chi2.sf(chi, 1))


def judge(rows: list[MicroTest], *, alpha: float, macro_name: str = "the macro conversion"
          ) -> list[ValidationRow]:
    """The rows with BH q-values across every row with a test, and a verdict, role and reason
    each."""
    p_values = [r.p_value for r in rows if r.p_value is not None]
    qs = iter(stats.false_discovery_control(p_values, method="bh") if p_values else ())
    judged = []
    for r in rows:
        q = float(next(qs)) if r.p_value is not None else None
        verdict, role, reason = _verdict(r, q, alpha, macro_name)
        judged.append(ValidationRow(**vars(r), q_value=q, verdict=verdict, role=role,
                                    reason=reason))
    return judged


def _verdict(r: MicroTest, q: float | None, alpha: float, macro: str
             ) -> tuple[Verdict, Role, str]:
    name = r.micro
    settle = leads_to_settle(r.n_with, r.n_without, r.macro_with, r.macro_without,
                             alpha=alpha, min_events=r.min_events, min_group=r.min_group)
    more = (f" About {settle:,} leads like these would settle it (80 % power to find a lift of "
            f"{PREDICTIVE_LIFT}); keep watching." if settle else " Keep watching.")
    if (not r.enough or q is None or r.lift is None or r.lift_ci_low is None
            or r.lift_ci_high is None or r.rate_with is None or r.rate_without is None):
        return ("not enough data", "diagnostic only",
                f"Only {r.n_with} leads with {name} ({r.macro_with} converted) and "
                f"{r.n_without} without: too few to tell.{more}")
    rates = (f"{r.rate_with:.1%} of leads with {name} reach {macro} vs "
             f"{r.rate_without:.1%} without (lift {r.lift:.2f}, 95 % CI "
             f"{r.lift_ci_low:.2f}–{r.lift_ci_high:.2f}, q {_q_clause(q)})")
    after = r.after_macro_share
    note = (f" Most converted leads with it ({after:.0%}) had it only after reaching {macro}: "
            "it may follow the conversion rather than predict it." if after is not None
            and after > AFTER_MACRO_NOTE and r.macro_with else "")
    if q > alpha:
        if r.lift_ci_low > 1 / PREDICTIVE_LIFT and r.lift_ci_high < PREDICTIVE_LIFT:
            return ("no signal", "retire", f"No useful difference: {rates}; the interval excludes "
                    f"lifts above {PREDICTIVE_LIFT} and below {1 / PREDICTIVE_LIFT:.2f}: a conversion "
                    f"in name only.{note}")
        return ("not enough data", "diagnostic only",
                f"Not significant, but the interval is too wide to rule out a lift above "
                f"{PREDICTIVE_LIFT} or below {1 / PREDICTIVE_LIFT:.2f}: {rates}.{more}{note}")
    if r.lift < 1:
        return "negative", "retire", f"It lowers the odds: {rates}.{note}"
    if r.lift < PREDICTIVE_LIFT:
        return "weak", "diagnostic only", f"Significant but small: {rates}.{note}"
    role: Role = "primary goal" if r.lift >= PRIMARY_LIFT else "secondary signal"
    return "predictive", role, f"Predictive: {rates}.{note}"


def analyse(y: np.ndarray, flags: dict[str, np.ndarray], *, min_events: int, min_group: int,
            segments: dict[str, np.ndarray] | None = None,
            days_to_macro: dict[str, np.ndarray] | None = None,
            strata: np.ndarray | None = None) -> list[MicroTest]:
    """Rows (to `judge`) for each micro overall, then within each segment value whose leads
    number at least twice `min_group` and whose test has enough data. `strata`: see
    `two_by_two`."""
    rows = []
    if strata is not None:  # as codes once: every test would sort the labels again
        strata = pd.factorize(np.asarray(strata))[0]
    for name, has in flags.items():
        table = two_by_two(has, y, min_events=min_events, min_group=min_group, strata=strata)
        row = MicroTest(micro=name, segment="all", **vars(table))
        if days_to_macro is not None and name in days_to_macro:
            d = days_to_macro[name]
            d = d[~np.isnan(d)]
            row.median_days_to_macro = float(np.median(d)) if len(d) else None
        rows.append(row)
    for col, values in (segments or {}).items():
        vals = pd.Series(values)
        for value, count in vals.value_counts().items():
            if count < 2 * min_group:
                continue
            m = (vals == value).to_numpy()
            for name, has in flags.items():
                r = two_by_two(has[m], y[m], min_events=min_events, min_group=min_group,
                               strata=None if strata is None else strata[m])
                if r.enough:
                    rows.append(MicroTest(micro=name, segment=f"{col}={value}", **vars(r)))
    return rows


def trend_check(micro_times: pd.Series, macro_times: pd.Series, lag_weeks: int) -> Trend:
    """Spearman correlation between the weekly change of a micro-conversion's count and the
    weekly change of macro conversions `lag_weeks` later."""
    micro_w = micro_times.dropna().dt.tz_convert(None).dt.to_period("W").value_counts()
    macro_w = macro_times.dropna().dt.tz_convert(None).dt.to_period("W").value_counts()
    if micro_w.empty or macro_w.empty:
        return Trend(lag_weeks=lag_weeks, weeks=0, verdict="not enough weeks")
    idx = pd.period_range(min(micro_w.index.min(), macro_w.index.min()),
                          max(micro_w.index.max(), macro_w.index.max()), freq="W")
    # the first and last weeks are partial; drop them
    micro_c = micro_w.reindex(idx, fill_value=0).iloc[1:-1].astype(float)
    macro_c = macro_w.reindex(idx, fill_value=0).iloc[1:-1].astype(float)
    dm, dM = micro_c.diff(), macro_c.diff().shift(-lag_weeks)
    both = pd.concat([dm, dM], axis=1).dropna()
    if len(both) < MIN_TREND_WEEKS or both.iloc[:, 0].nunique() < 3 or both.iloc[:, 1].nunique() < 3:
        return Trend(lag_weeks=lag_weeks, weeks=len(both), verdict="not enough weeks")
    rho, p = stats.spearmanr(both.iloc[:, 0], both.iloc[:, 1])
    verdict: TrendVerdict = ("moves with macro" if p <= 0.05 and rho > 0 else
                             "moves against macro" if p <= 0.05 else "no relation")
    return Trend(lag_weeks=lag_weeks, weeks=len(both), verdict=verdict, spearman_rho=float(rho),
                 p_value=float(p))


# -- the store ------------------------------------------------------------------------------


def run_validation(ctx: Context) -> dict[str, Any]:
    """Analyse the store and write one `ValidationResult` per test of this run."""
    settings, cfg = ctx.settings, ctx.settings.validation
    # Each lead's first macro time is all the stage rows give: read them before the leads and
    # let them go at once, so the two never fill memory together (2.3M rows at 1M leads).
    macro_all = macro_reached_at(settings, first_reached(load_stage_rows(ctx.engine, settings)))
    data = load_lead_data(ctx.engine, (LeadStatus.active, LeadStatus.deleted))
    macro = macro_all.reindex(data.leads.index)
    now = pd.Timestamp(ctx.now())
    created = data.leads["created_at"]
    snapshot = snapshot_reason(settings, data, macro_all) is not None
    if snapshot:
        # Times are stand-ins: every lead is decided and everything counts as the export holds it.
        cutoff = pd.Series(pd.Timestamp.max.tz_localize("UTC"), index=created.index)
        eligible = np.ones(len(created), dtype=bool)
        converted = macro.notna()
    else:
        deadline = created + pd.Timedelta(days=settings.model.horizon_days)
        cutoff = created + pd.Timedelta(days=cfg.window_days)  # the same window for every lead
        eligible = ((deadline <= now) & (cutoff <= now)).to_numpy()
        converted = macro.notna() & (macro <= deadline)
    leads = data.leads[eligible]
    y = converted[eligible].astype(int).to_numpy()
    macro_eligible = macro.reindex(leads.index).where(converted[eligible])
    attrs = data.attributes()[eligible]
    flags: dict[str, np.ndarray] = {}
    days: dict[str, np.ndarray] = {}
    after_macro: dict[str, float | None] = {}
    event_times: dict[str, pd.Series] = {}
    notes: list[str] = []
    for micro in settings.micro_conversions:
        if micro.expr:
            frame = pd.concat([leads.drop(columns=[c for c in leads if c.startswith(ATTRIBUTE_PREFIX)]),
                               attrs], axis=1)
            flags[micro.name] = _eval_stored_flag(frame, micro.expr, micro.name, notes,
                                                  empty_store=data.leads.empty)
            continue
        name = micro.event or micro.name
        ev = data.events[(data.events["name"] == name) & data.events["lead_id"].isin(leads.index)]
        if not snapshot:
            event_times[micro.name] = data.events.loc[data.events["name"] == name, "occurred_at"]
        # compared as datetime arrays (`to_numpy` made object arrays of Timestamps)
        ev = ev[ev["occurred_at"].array < cutoff.reindex(ev["lead_id"]).array]
        first = ev.groupby("lead_id")["occurred_at"].min().reindex(leads.index)
        has = first.notna().to_numpy()
        if micro.property and micro.property in attrs:
            # not `|=`: under pandas 3 (copy-on-write) `to_numpy()` above is a read-only view
            has = has | attrs[micro.property].map(_truthy).to_numpy(dtype=bool)
        flags[micro.name] = has
        if snapshot:
            continue  # no micro-to-macro times in a snapshot
        gap = (macro_eligible - first).dt.total_seconds() / 86400
        before = gap > 0
        days[micro.name] = gap.where(before).to_numpy(dtype=float)
        timed = int(gap.notna().sum())  # converters whose micro in the window has a time
        after_macro[micro.name] = float((~before & gap.notna()).sum() / timed) if timed else None
    segments = {}
    for col in cfg.segment_by:
        if col in leads.columns:
            segments[col] = leads[col].fillna("(none)").astype(str).to_numpy()
        elif col in attrs:
            segments[col] = attrs[col].fillna("(none)").astype(str).to_numpy()
    month = (None if snapshot else
             leads["created_at"].dt.tz_convert(None).dt.to_period("M").astype(str).to_numpy())
    analysed = analyse(y, flags, min_events=cfg.min_events, min_group=cfg.min_leads_per_group,
                       segments=segments, days_to_macro=None if snapshot else days, strata=month)
    for r in analysed:
        if r.segment == "all":
            r.after_macro_share = after_macro.get(r.micro)
    rows = judge(analysed, alpha=cfg.alpha, macro_name=settings.macro_stage.name)
    trends = {name: trend_check(t, macro_all, cfg.trend_lag_weeks) for name, t in event_times.items()}
    computed_at = ctx.now()
    records = []
    for r in rows:
        details: dict[str, Any] = {
            "test": r.test, "window_days": None if snapshot else cfg.window_days,
            "mode": "snapshot" if snapshot else "dated", "after_macro_share": r.after_macro_share}
        if r.segment == "all" and r.micro in trends:
            details["trend"] = trends[r.micro].as_json()
        records.append(ValidationResult(
            job_run_id=ctx.job_run_id, computed_at=computed_at, micro=r.micro,
            segment=r.segment, n=r.n, n_with=r.n_with, n_without=r.n_without,
            macro_with=r.macro_with, macro_without=r.macro_without,
            rate_with=r.rate_with, rate_without=r.rate_without, lift=r.lift,
            lift_ci_low=r.lift_ci_low, lift_ci_high=r.lift_ci_high, p_value=r.p_value,
            q_value=r.q_value, phi=r.phi, median_days_to_macro=r.median_days_to_macro,
            verdict=r.verdict, reason=r.reason, role=r.role, details=details))
    with session_scope(ctx.engine) as session:
        session.add_all(records)
    overall = [r for r in rows if r.segment == "all"]
    counts: dict[str, Any] = {"leads": len(y), "macro": int(y.sum()), "tests": len(rows),
                              "segment_tests": len(rows) - len(overall)}
    if snapshot:
        counts["time_mode"] = "snapshot"
    if notes:
        counts["notes"] = notes
    for v in VERDICTS:
        counts[v.replace(" ", "_")] = sum(r.verdict == v for r in overall)
    return counts


def _truthy(value: Any) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return str(value).strip().lower() not in ("", "0", "false", "no", "n", "none")


def _eval_flag(frame: pd.DataFrame, expr: str, name: str) -> np.ndarray:
    """One bool per row: `expr` in leadloop's expression language (never pandas.eval)."""
    try:
        return parse_expression(expr).evaluate(frame)
    except ExpressionError as exc:
        raise ConfigError(f"micro-conversion {name}", str(exc),
                          hint="column names with spaces go in backticks; the grammar is in "
                               "the README (micro-conversion expressions)") from None


def _eval_stored_flag(frame: pd.DataFrame, expr: str, name: str, notes: list[str], *,
                      empty_store: bool) -> np.ndarray:
    """`_eval_flag` on the store's leads. A lead's attributes hold only the fields it has a value
    for, so a column no stored lead has (an empty store, a field nobody filled in yet) is empty
    for every lead, not a broken expression: the flag is false, and a store that has leads says
    which column had no value (a misspelt name shows up there)."""
    try:
        wanted = parse_expression(expr).column_names()
    except ExpressionError:
        wanted = set()  # `_eval_flag` names the problem
    absent = sorted(wanted - set(map(str, frame.columns)))
    if absent:
        frame = frame.assign(**dict.fromkeys(absent, pd.Series(np.nan, index=frame.index,
                                                                 dtype=object)))
        if not empty_store:
            notes.append(f"micro-conversion {name}: no lead in the store has a value for "
                         + ", ".join(f"'{c}'" for c in absent)
                         + " (check the name against the CRM's fields); counted as absent")
    return _eval_flag(frame, expr, name)


# -- a CSV export ---------------------------------------------------------------------------


def validate_csv(path: str | Path, *, label: str, positive: str | None = None,
                 micros: list[str], sep: str | None = None, alpha: float = 0.05,
                 min_events: int = 10, min_group: int = 30) -> list[ValidationRow]:
    """`leadloop validate --csv`: the same analysis on a CRM export; EXPR is a `leadloop.expr` condition."""
    df = read_csv(path, sep=sep, missing=MISSING_VALUES, dtype=None)
    if label not in df.columns:
        raise LeadloopError(f"label column {label!r} not in {Path(path).name}")
    y = parse_label(df[label].astype("string"), positive).to_numpy()
    flags = {}
    for spec in micros:
        name, sep_, expr = spec.partition("=")
        name, expr = name.strip(), expr.strip()
        if not sep_ or not name or not expr:
            raise LeadloopError(f"--micro {spec!r}: expected NAME=EXPR")
        flags[name] = _eval_flag(df, expr, name)
    return judge(analyse(y, flags, min_events=min_events, min_group=min_group), alpha=alpha,
                 macro_name=label)
