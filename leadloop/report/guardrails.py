"""Value-bidding guardrails: checks that tell whether the platforms can bid on what we send.

Each check returns pass or warn and one sentence a marketer can act on. They read the outbox
(`Conversion`) and the stage history already loaded into `ReportData`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import pandas as pd

from leadloop.config import Settings
from leadloop.tables import ConversionKind

if TYPE_CHECKING:
    from leadloop.report.data import ReportData

# Click-through conversion windows top out at 90 days (Google, Microsoft, LinkedIn); a stage reached
# later than that cannot be attributed, and a long median delay slows bidding's learning.
MAX_MEDIAN_DELAY_DAYS = 30.0
CLICK_WINDOW_DAYS = 90.0
CLICK_ID_REPEAT_LIMIT = 3
CONSENT_UNKNOWN_LIMIT = 0.10
_LIVE = ("pending", "held", "sent", "failed")


@dataclass(frozen=True)
class Guardrail:
    key: str
    title: str
    status: str  # "pass" | "warn"
    sentence: str

    @property
    def ok(self) -> bool:
        return self.status == "pass"


def _names(pairs: list[tuple[str, str]], limit: int = 4) -> str:
    shown = [f"{d} / {a}" for d, a in pairs[:limit]]
    more = f" and {len(pairs) - limit} more" if len(pairs) > limit else ""
    return ", ".join(shown) + more


def _first_conversions(data: ReportData) -> pd.DataFrame:
    c = data.conversions
    return c[(c["kind"] == ConversionKind.conversion.value) & c["status"].isin(_LIVE)]


def distinct_values(data: ReportData) -> Guardrail:
    """Per destination: value-based bidding learns from the spread of values it receives, so a
    destination receiving one value (every action fixed at the same amount) cannot bid on value."""
    c = _first_conversions(data)
    title = "Values vary"
    if c.empty:
        return Guardrail("distinct_values", title, "warn",
                         "No conversions have been built yet, so no values are being sent.")
    n = c.groupby("destination")["value"].nunique()
    flat = sorted(n[n < 2].index.tolist())
    if flat:
        return Guardrail("distinct_values", title, "warn",
                         f"{', '.join(flat)} receive{'s' if len(flat) == 1 else ''} a single value; "
                         "value-based bidding needs at least two distinct values to tell good leads "
                         "from cheap ones (value a stage at deal_amount or predicted).")
    counts = ", ".join(f"{d} {int(v)}" for d, v in n.items())
    return Guardrail("distinct_values", title, "pass",
                     f"Every destination receives at least two distinct values ({counts}).")


def volume(data: ReportData, minimum: int) -> Guardrail:
    c = _first_conversions(data)
    title = "Enough conversions"
    if c.empty:
        return Guardrail("volume", title, "warn", "No conversions have been built yet.")
    end = min(c["conversion_time"].max(), pd.Timestamp(data.generated_at))
    start = end - timedelta(days=30)
    recent = c[(c["conversion_time"] > start) & (c["conversion_time"] <= end)]
    counts = recent.groupby(["destination", "conversion_action"]).size()
    all_actions = sorted(c.groupby(["destination", "conversion_action"]).size().index.tolist())
    low = [(a, int(counts.get(a, 0))) for a in all_actions if counts.get(a, 0) < minimum]
    period = f"in the 30 days to {end.day} {end:%b %Y}"
    if low:
        worst = ", ".join(f"{d} / {a}: {n}" for (d, a), n in low[:4])
        return Guardrail("volume", title, "warn",
                         f"Fewer than {minimum} conversions {period} for {worst}; bidding on so few "
                         "is noisy — consider an earlier (more frequent) stage.")
    return Guardrail("volume", title, "pass",
                     f"Every conversion action has at least {minimum} conversions {period} "
                     f"(fewest: {int(counts.min())}).")


def delay(data: ReportData, settings: Settings) -> Guardrail:
    title = "Conversion delay"
    uploaded = [s.name for s in settings.stages if s.destinations]
    reach = data.stage_reach[data.stage_reach["stage"].isin(uploaded)]
    if reach.empty:
        return Guardrail("delay", title, "warn", "No lead has reached an uploaded stage yet.")
    reach = reach.reset_index(drop=True)
    created = data.leads["created_at"].reindex(reach["lead_id"]).reset_index(drop=True)
    reach = reach.assign(days=(reach["entered_at"] - created).dt.total_seconds() / 86400.0)
    med = reach.groupby("stage")["days"].median()
    beyond = float((reach["days"] > CLICK_WINDOW_DAYS).mean())
    parts = "; ".join(f"{s} {med[s]:.1f} d" for s in uploaded if s in med)
    slow = [s for s in uploaded if s in med and med[s] > MAX_MEDIAN_DELAY_DAYS]
    tail = f"{beyond:.0%} arrive after the {CLICK_WINDOW_DAYS:.0f}-day click window"
    if slow:
        return Guardrail("delay", title, "warn",
                         f"Median lead-to-stage delay: {parts}; over {MAX_MEDIAN_DELAY_DAYS:.0f} days "
                         f"for {', '.join(slow)} slows bidding's learning, and {tail}.")
    return Guardrail("delay", title, "pass", f"Median lead-to-stage delay: {parts}; {tail}.")


def duplicates(data: ReportData) -> Guardrail:
    title = "Duplicate risk"
    c = data.conversions[data.conversions["kind"] == ConversionKind.conversion.value]
    c = c[c["status"] != "withdrawn"]
    if c.empty:
        return Guardrail("duplicates", title, "pass", "No conversions built yet, so none duplicated.")
    orders = c.groupby(["destination", "lead_id", "stage"])["order_id"].nunique()
    multi_order = int((orders > 1).sum())
    clicks = c[c["click_id"] != 0]  # click ids are hashed when loaded; 0 is none
    per_click = clicks.groupby(["destination", "conversion_action", "click_id"]).size()
    hot = int((per_click > CLICK_ID_REPEAT_LIMIT).sum())
    if multi_order or hot:
        bits = []
        if multi_order:
            bits.append(f"{multi_order} lead/stage pairs were built under more than one order id "
                        "(the platform would count them twice)")
        if hot:
            bits.append(f"{hot} click ids carry more than {CLICK_ID_REPEAT_LIMIT} conversions of "
                        "the same action (shared or recycled click ids)")
        return Guardrail("duplicates", title, "warn", "; ".join(bits).capitalize() + ".")
    return Guardrail("duplicates", title, "pass",
                     "Each lead and stage has one order id, and no click id repeats suspiciously.")


def never_uploaded(data: ReportData, settings: Settings) -> Guardrail:
    title = "Every stage uploads"
    c = data.conversions
    sent = set(zip(c.loc[c["status"] == "sent", "destination"], c.loc[c["status"] == "sent", "stage"],
                   strict=True))
    missing = [(d, s.name) for s in settings.stages for d in s.destinations if (d, s.name) not in sent]
    if missing:
        return Guardrail("never_uploaded", title, "warn",
                         f"Configured but never accepted by the platform: {_names(missing)} — check "
                         "the stage's CRM values, the destination's credentials and the held rows.")
    if not any(s.destinations for s in settings.stages):
        return Guardrail("never_uploaded", title, "warn", "No stage is mapped to a destination.")
    return Guardrail("never_uploaded", title, "pass",
                     "Every configured stage has reached each of its destinations.")


def consent(data: ReportData, settings: Settings) -> Guardrail:
    title = "Consent coverage"
    uploaded = {s.name for s in settings.stages if s.destinations}
    ids = data.stage_reach.loc[data.stage_reach["stage"].isin(uploaded), "lead_id"].unique()
    flags = data.leads["consent_ad_user_data"].reindex(ids)
    if flags.empty:
        return Guardrail("consent", title, "pass", "No lead has reached an uploaded stage yet.")
    granted = float((flags == True).mean())  # noqa: E712 - a tri-state column (True/False/None)
    denied = float((flags == False).mean())  # noqa: E712
    unknown = 1.0 - granted - denied
    sentence = (f"Of the leads reaching an uploaded stage, {granted:.0%} granted ad_user_data, "
                f"{denied:.0%} denied it (sent without user data or held) and {unknown:.0%} are "
                "unknown")
    if unknown > CONSENT_UNKNOWN_LIMIT:
        return Guardrail("consent", title, "warn",
                         sentence + "; map the CRM's consent property so EEA conversions can be sent.")
    return Guardrail("consent", title, "pass", sentence + ".")


def evaluate_guardrails(data: ReportData, settings: Settings) -> list[Guardrail]:
    return [
        distinct_values(data),
        volume(data, settings.report.min_conversions_per_30d),
        delay(data, settings),
        duplicates(data),
        never_uploaded(data, settings),
        consent(data, settings),
    ]
