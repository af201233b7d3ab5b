"""The HTML report: `render_html` fills `templates/report.html` (shared with `leadloop serve`'s
pages) from a view of `ReportData`: charts, readable labels, the "do this next" list.

Autoescape is on for every template (see `templating.py`): CRM values such as campaign names and
landing pages are untrusted.
"""

from __future__ import annotations

from importlib import resources
from typing import Any
from urllib.parse import urlencode

import pandas as pd

from leadloop.report import charts
from leadloop.report.data import ReportData
from leadloop.report.templating import day, environment, integer, money, num, pct, pvalue, when
from leadloop.scoring.card import ModelCard

__all__ = ["HOLD_RULES", "MAX_ROWS", "headlines", "integer", "maturity_note", "money", "next_steps",
           "num", "pct", "pvalue", "render_html", "report_css", "report_view", "rule_text"]

MAX_ROWS = 25

# What each hold rule means and what to do about it, in a marketer's words.
HOLD_RULES: dict[str, tuple[str, str]] = {  # "<n> conversions <meaning>: <action>."
    "no_click_id": ("have no click id or hashed identity the platform can match",
                    "map the click id property in [crm.properties] (gclid, msclkid, …)"),
    "no_meta_lead_id": ("have no Meta lead id", "map the lead id property ([crm.properties] "
                        "meta_lead_id) to the field your Meta lead forms fill"),
    "no_linkedin_id": ("have no LinkedIn click id or hashed e-mail",
                       "map [crm.properties] li_fat_id, or keep send_user_data on"),
    "event_too_old": ("are older than the platform accepts (Meta 7 days, Microsoft and LinkedIn 90)",
                      "run the export more often so stages are sent while they are fresh"),
    "click_too_old": ("come from a click older than Google's 90-day click window",
                      "upload an earlier stage that happens within 90 days of the click"),
    "consent_denied": ("are of people who denied ad-user-data consent",
                       "nothing to do: holding them is correct"),
    "no_value": ("have no value (the deal has no amount and the stage no default_value)",
                 "set default_value on the stage"),
    "no_score": ("have no score yet, on a stage valued at 'predicted'", "run `leadloop score`"),
    "no_currency": ("have a value without a currency", "set currency on the stage"),
    "in_future": ("have a stage time in the future", "check the CRM's clock and time zone"),
    "before_lead_created": ("have a stage time before the lead was created",
                            "check the stage history in the CRM"),
    "adjustment_too_recent": ("are adjustments less than a day after their conversion",
                              "nothing to do: they go out tomorrow"),
    "adjustment_window_passed": ("are adjustments after Google's 54-day window",
                                 "nothing to do: Google no longer accepts them"),
    "value_out_of_range": ("have a value far outside this stage's usual range",
                           "check the deal amount in the CRM, or the stage value"),
}


def rule_text(rule: Any) -> str:
    meaning = HOLD_RULES.get(str(rule))
    return meaning[0] if meaning else ""


# -- sentences ------------------------------------------------------------------------------------


def headlines(data: ReportData) -> list[str]:
    """Plain sentences for the top of the report (also used by the terminal and JSON)."""
    s, cur = data.summary, data.currency
    lines: list[str] = []
    src = data.by["source"]
    src = src[src["leads"] >= max(10, 0.02 * max(s.leads, 1))]
    if not src.empty and s.leads:
        by_revenue = s.revenue > 0
        metric = "revenue_per_lead" if by_revenue else "qualified_rate"
        best = src.sort_values(metric, ascending=False).iloc[0]
        vol = src.sort_values("leads", ascending=False).iloc[0]
        shown = (lambda r: f"{money(r['revenue_per_lead'], cur)} per lead") if by_revenue else (
            lambda r: f"{pct(r['qualified_rate'])} qualified")
        lines.append(f"Most valuable source: {best['source']} ({shown(best)}, "
                     f"{int(best['leads']):,} leads).")
        if vol["source"] != best["source"]:
            lines.append(f"Most volume: {vol['source']} ({int(vol['leads']):,} leads, {shown(vol)}).")
    v = data.validation
    if not v.empty:
        overall = v[v["segment"] == "all"]
        tally = overall["verdict"].value_counts()
        parts = [f"{n} {verdict}" for verdict, n in tally.items()]
        lines.append(f"Micro-conversions: {', '.join(parts)}.")
        neg = overall[overall["verdict"] == "negative"]["micro"].tolist()
        if neg:
            lines.append(f"Lowers the odds: {', '.join(neg)} — do not optimise toward it.")
    warns = [g for g in data.guardrails if not g.ok]
    if warns:
        lines.append(f"Guardrail warnings: {', '.join(g.title for g in warns)}.")
    return lines


def next_steps(data: ReportData, limit: int = 8) -> list[dict[str, str]]:
    """The "do this next" list: concrete actions, the biggest first. Each step has a title, a
    detail sentence, and the workbench page (`leadloop serve`) where it is done."""
    steps: list[tuple[float, dict[str, str]]] = []

    def add(weight: float, title: str, detail: str, link: str, link_text: str) -> None:
        steps.append((weight, {"title": title, "detail": detail, "link": link,
                               "link_text": link_text}))

    u = data.uploads.set_index("destination") if not data.uploads.empty else pd.DataFrame()
    for dest, rules in data.holds.groupby("destination", observed=True) if not data.holds.empty else []:
        held = int(rules["n"].sum())
        built = int(u.loc[dest, "built"]) if dest in u.index else held
        if not built or held / built < 0.2:
            continue
        top = rules.sort_values("n", ascending=False).iloc[0]
        meaning, action = HOLD_RULES.get(str(top["hold_rule"]),
                                         (f"held by the rule {top['hold_rule']}", ""))
        add(held, f"{dest}: {held:,} of {built:,} conversions held.",
            f"{int(top['n']):,} {meaning}" + (f": {action}." if action else "."),
            f"/uploads?{urlencode({'destination': dest, 'status': 'held'})}", "see the held rows")
    if not u.empty:
        for dest, row in u.iterrows():
            if row["dead"]:
                n = int(row["dead"])
                add(n, f"{dest}: {n:,} conversion{'s' if n != 1 else ''} dead-lettered.",
                    "They failed every retry; fix the cause shown with them, then retry them.",
                    f"/uploads?{urlencode({'destination': dest, 'status': 'dead'})}", "retry dead rows")
    v = data.validation
    if not v.empty:
        overall = v[v["segment"] == "all"]
        for _, r in overall[overall["verdict"] == "negative"].iterrows():
            add(500 + r["n_with"], f"Stop optimising toward {r['micro']}.",
                f"It lowers the odds of reaching {data.macro_stage} (lift {num(r['lift'])}).",
                "/micro-conversions", "set its role")
        for _, r in overall[overall["verdict"] == "no signal"].iterrows():
            add(200 + r["n_with"], f"Retire {r['micro']} as a goal.",
                f"It is a conversion in name only: no link to {data.macro_stage}.",
                "/micro-conversions", "set its role")
    for st in data.stage_values:
        if st.differs:
            add(400, f"Review the value of {st.name}.", st.differs, "/stages", "edit it")
    for g in data.guardrails:
        if not g.ok:
            add(100, f"{g.title}:", g.sentence, "/stages", "stage mapping")
    if data.model_note:
        add(50, "Lead values come from the stage mapping.", data.model_note[:1].upper()
            + data.model_note[1:] + ".", "/status", "model card")
    steps.sort(key=lambda s: -s[0])
    return [s for _, s in steps[:limit]]


def _stage_label(kind: str, stage: str | None) -> str:
    """"Won (Closed won)", but "Won" alone when the stage is called that (never "WON (WON)")."""
    if not stage:
        return f"{kind} (n/a)"
    return kind if stage.strip().lower() == kind.lower() else f"{kind} ({stage})"


# -- the view -------------------------------------------------------------------------------------


_CARD_SHOWN = frozenset({
    "version", "chosen", "created_at", "data_window", "counts", "features", "config_hash", "metrics",
    "baseline", "calibration", "lift_by_decile", "permutation_importance", "fallback_reason",
    "suspected_leakage", "candidate_metrics", "candidate", "calibration_by_age_band",
    "calibration_by_age",
})


def _card_view(card: ModelCard | None) -> dict[str, Any] | None:
    """The model card's facts for people; fields newer cards add (mode, suspected leakage,
    candidate metrics, calibration by age band) are shown when present, and the ones older
    cards named otherwise (`candidate`, `calibration_by_age_band`) too."""
    if not card or not card.metrics:
        return None
    m, b, older = card.metrics, card.baseline or {}, card.extra
    cand = card.candidate_metrics or (older.get("candidate") or {}).get("metrics") or {}
    window = card.data_window or {}
    counts = card.counts or {}
    features = card.features or []
    facts: list[tuple[str, Any]] = [
        ("version", card.version), ("chosen model", card.chosen),
        ("trained", when(card.created_at)),
        ("data window", f"{day(window.get('start'))} → {day(window.get('end'))}"),
        ("leads / positives", f"{counts.get('n', '?')} / {counts.get('positives', '?')}"),
        ("features (known at)", ", ".join(f"{f.get('name')} ({f.get('known_at')})" for f in features
                                          if isinstance(f, dict)) or "–"),
        ("config hash", card.config_hash),
    ]
    for key, value in card.to_dict().items():  # scalar fields newer cards add (mode, AUCs, …)
        if key not in _CARD_SHOWN and isinstance(value, str | int | float | bool) and value != "":
            facts.append((key.replace("_", " "), num(value, 3) if isinstance(value, float) else value))
    leak: Any = card.suspected_leakage  # older cards: True, or a mapping
    if leak is True:
        leak = "yes (see the model card's JSON)"
    if isinstance(leak, list | tuple):
        leak = ", ".join(str(x.get("feature", x) if isinstance(x, dict) else x) for x in leak)
    elif isinstance(leak, dict):
        leak = ", ".join(f"{k}: {v}" for k, v in leak.items())
    bands = older.get("calibration_by_age_band") or card.calibration_by_age or []
    bands = [{"band": r.get("band", r.get("age_band", r.get("age", ""))), "n": r.get("n"),
              "predicted": r.get("predicted", r.get("mean_predicted")),
              "observed": r.get("observed", r.get("observed_rate"))}
             for r in bands if isinstance(r, dict)]
    return {
        "facts": facts,
        "metrics": [(k, m.get(k), b.get(k), cand.get(k)) for k in ("roc_auc", "pr_auc", "brier", "ece")
                    if k in m],
        "has_candidate": bool(cand),
        "leakage": str(leak) if leak else "",
        "age_bands": bands,
    }


def maturity_note(data: ReportData) -> str:
    if not data.immature_months:
        return ""
    months = ", ".join(data.immature_months)
    return (f"Not yet mature: {months}. 90 % of leads that reach {data.macro_stage} do so within "
            f"{data.maturity_days:.0f} days of creation, and leads created in these months have not "
            "all had that long, so their rates will still rise (right-censoring).")


def report_view(data: ReportData) -> dict[str, Any]:
    """Everything the section templates show beyond `ReportData` itself."""
    src = data.by["source"]
    month = data.by["month"]
    by_revenue = data.summary.revenue > 0
    card = data.model_card
    v = data.validation
    has_card = bool(card and card.metrics)
    return {
        "labels": {"qualified": _stage_label("Qualified", data.macro_stage),
                   "won": _stage_label("Won", data.won_stage)},
        "headlines": headlines(data),
        "next_steps": next_steps(data),
        "guardrails_ok": sum(g.ok for g in data.guardrails),
        "max_rows": MAX_ROWS,
        "immature_months": set(data.immature_months),
        "maturity_note": maturity_note(data),
        "stages": data.stage_values,
        "spend": data.spend_summary,
        "overall": v[v["segment"] == "all"] if not v.empty else v,
        "segments": v[v["segment"] != "all"] if not v.empty else v,
        "card": _card_view(data.model_card),
        "rule_text": rule_text,
        "charts": {
            "volume": charts.volume_vs_quality(src, "source", data.currency, by_revenue=by_revenue),
            "rate": charts.rate_with_intervals(src, "source", "Qualified rate by source (95 % CI)"),
            "monthly": charts.monthly(month, data.currency, maturing=set(data.immature_months))
            if len(month) else None,
            "calibration": charts.calibration_by_group(src, "source"),
            "forest": charts.forest(v) if not v.empty else None,
            "uploads": charts.uploads(data.uploads)
            if not data.uploads.empty and data.uploads["built"].sum() else None,
            "calibration_curve": charts.calibration_curve(card.calibration or [])
            if card and has_card else None,
            "lift_by_decile": charts.lift_by_decile(card.lift_by_decile or [])
            if card and has_card else None,
            "top_features": charts.top_features(card.permutation_importance or [])
            if card and has_card else None,
        },
    }


def report_css() -> str:
    return resources.files("leadloop.report").joinpath("templates/report.css").read_text("utf-8")


def render_html(data: ReportData) -> str:
    """One self-contained HTML file: inline CSS and SVG charts, no script, font or network."""
    template = environment().get_template("report.html")
    return template.render(data=data, view=report_view(data), css=report_css(), standalone=True,
                           links=False) + "\n"
