"""One self-contained HTML file: inline CSS, inline SVG charts, no script, font or network.

Every string that reaches the page goes through `html.escape` (`_e`): CRM values such as
campaign names and landing pages are untrusted.
"""

from __future__ import annotations

import math
from html import escape
from importlib import resources
from typing import Any

import pandas as pd

from leadloop.report import charts
from leadloop.report.data import ReportData

MAX_ROWS = 25


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def _isnan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def pct(v: Any, digits: int = 1) -> str:
    return "–" if _isnan(v) else f"{float(v) * 100:.{digits}f}%"


def money(v: Any, currency: str = "") -> str:
    if _isnan(v):
        return "–"
    v = float(v)
    text = f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}"
    return f"{currency} {text}".strip()


def integer(v: Any) -> str:
    return "–" if _isnan(v) else f"{int(v):,}"


def num(v: Any, digits: int = 2) -> str:
    return "–" if _isnan(v) else f"{float(v):.{digits}f}"


def pvalue(v: Any) -> str:
    if _isnan(v):
        return "–"
    return "<0.001" if float(v) < 0.001 else f"{float(v):.3f}"


def _rate_ci(rate: Any, low: Any, high: Any) -> str:
    if _isnan(rate):
        return "–"
    return f"{pct(rate)} <span class=ci>[{pct(low)}–{pct(high)}]</span>"


def _badge(text: str) -> str:
    cls = "b-" + "-".join(str(text).lower().split())
    return f'<span class="badge {_e(cls)}">{_e(text)}</span>'


def _table(rows: list[list[str]], header: list[str], text_cols: int = 1, wide: int | None = None
           ) -> str:
    """Cells are already-escaped HTML; the first `text_cols` columns are left-aligned text, and
    column `wide` (a sentence) gets room to read."""
    def cls(i: int) -> str:
        if i == wide:
            return ' class="text wide"'
        return ' class="text"' if i < text_cols else ""

    head = "".join(f"<th{cls(i)}>{_e(h)}</th>" for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows
    )
    return f'<div class="tablewrap"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _chart(svg: str | None, label: str) -> str:
    if not svg:
        return ""
    return f'<figure class="chart" aria-label="{_e(label)}">{svg}</figure>'


def _card(label: str, value: str, sub: str = "", cls: str = "") -> str:
    return (f'<div class="card {cls}"><div class="label">{_e(label)}</div>'
            f'<div class="value">{value}</div><div class="sub">{sub}</div></div>')


# -- sections -------------------------------------------------------------------------------------


def headlines(data: ReportData) -> list[str]:
    """Plain sentences for the top of the report (also used by the terminal and JSON)."""
    s, cur = data.summary, data.currency
    lines: list[str] = []
    src = data.by["source"]
    src = src[src["leads"] >= max(10, 0.02 * max(s["leads"], 1))]
    if not src.empty and s["leads"]:
        by_revenue = s["revenue"] > 0
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


def _summary_section(data: ReportData) -> str:
    s, cur = data.summary, data.currency
    ok = sum(g.ok for g in data.guardrails)
    cards = [
        _card("Leads", integer(s["leads"]),
              _e(f"{s['first_lead']:%Y-%m-%d} → {s['last_lead']:%Y-%m-%d}") if s["leads"] else ""),
        _card(f"Qualified ({data.macro_stage})", integer(s["qualified"]),
              _e(f"{pct(s['qualified_rate'])} of leads") if s["leads"] else ""),
        _card(f"Won ({data.won_stage or 'n/a'})", integer(s["won"]),
              _e(f"{pct(s['won_rate'])} of leads") if s["leads"] else ""),
        _card(f"Revenue ({cur})", _e(money(s["revenue"])),
              _e(f"{money(s['revenue_per_lead'], cur)} per lead") if s["leads"] else ""),
        _card(f"Value accepted ({cur})", _e(money(s["value_uploaded"])),
              _e(f"{s['accepted']:,} conversions accepted")),
        _card("Guardrails", f"{ok}/{len(data.guardrails)}", "pass",
              "ok" if ok == len(data.guardrails) else "warn"),
    ]
    lines = "".join(f"<li>{_e(line)}</li>" for line in headlines(data))
    return (f'<section id="summary"><div class="cards">{"".join(cards)}</div>'
            + (f'<ul class="headlines">{lines}</ul>' if lines else "") + "</section>")


def _value_rows(t: pd.DataFrame, key: str, data: ReportData) -> tuple[list[str], list[list[str]]]:
    cur = data.currency
    micro = [c for c in t.columns if c.startswith("micro:")]
    accepted = [c for c in t.columns if c.startswith("accepted:")]
    header = [key.replace("_", " "), "leads", *[c.split(":", 1)[1] for c in micro], "qualified",
              "qualified rate [95% CI]", "won", "won rate", "revenue", "revenue / lead",
              "mean predicted value", "predicted vs actual", "value accepted",
              *[f"accepted {c.split(':', 1)[1]}" for c in accepted]]
    rows = []
    for _, r in t.head(MAX_ROWS).iterrows():
        rows.append([
            _e(r[key]), integer(r["leads"]), *[integer(r[c]) for c in micro], integer(r["qualified"]),
            _rate_ci(r["qualified_rate"], r["qualified_ci_low"], r["qualified_ci_high"]),
            integer(r["won"]), _rate_ci(r["won_rate"], r["won_ci_low"], r["won_ci_high"]),
            _e(money(r["revenue"], cur)), _e(money(r["revenue_per_lead"])),
            _e(money(r["mean_predicted_value"])),
            f"{pct(r['mean_predicted_probability'])} / {pct(r['actual_rate_scored'])}",
            _e(money(r["value_uploaded"])), *[integer(r[c]) for c in accepted],
        ])
    return header, rows


def _value_section(data: ReportData) -> str:
    src = data.by["source"]
    by_revenue = data.summary["revenue"] > 0
    out = ['<section id="value"><h2>Lead value by source</h2>']
    out.append(_chart(charts.volume_vs_quality(src, "source", data.currency, by_revenue=by_revenue),
                      "volume vs quality by source"))
    out.append(_chart(charts.rate_with_intervals(src, "source", "Qualified rate by source (95 % CI)"),
                      "qualified rate by source"))
    header, rows = _value_rows(src, "source", data)
    out.append(_table(rows, header))
    cal = charts.calibration_by_group(src, "source")
    month = data.by["month"]
    out.append('<div class="row">')
    if len(month):
        out.append(_chart(charts.monthly(month, data.currency), "leads and qualified rate by month"))
    out.append(_chart(cal, "predicted vs actual by source"))
    out.append("</div>")
    for key in ("medium", "campaign", "landing_page", "month"):
        t = data.by[key]
        header, rows = _value_rows(t, key, data)
        more = f" (top {MAX_ROWS} of {len(t)} by leads; all in the CSV)" if len(t) > MAX_ROWS else ""
        out.append(f"<details><summary>By {_e(key.replace('_', ' '))}{_e(more)}</summary>"
                   f"{_table(rows, header)}</details>")
    out.append("</section>")
    return "".join(out)


def _validation_section(data: ReportData) -> str:
    out = ['<section id="validation"><h2>Which micro-conversions predict the macro conversion</h2>']
    v = data.validation
    if v.empty:
        out.append('<p class="note">No validation run yet: run <code>leadloop validate</code>.</p>')
        return "".join(out) + "</section>"
    run = data.validation_run or {}
    out.append(f'<p class="note">Latest run {_e(run.get("computed_at"))}; lift = macro rate with the '
               "micro-conversion ÷ rate without it; q = p-value after Benjamini–Hochberg.</p>")
    out.append(_chart(charts.forest(v), "forest plot of lift by micro-conversion"))
    overall = v[v["segment"] == "all"]
    header = ["micro-conversion", "verdict", "role", "in words", "leads with", "rate with",
              "rate without", "lift [95% CI]", "p", "q", "median days to macro"]
    rows = [[
        _e(r["micro"]), _badge(r["verdict"]), _e(r["role"]), _e(r["reason"]), integer(r["n_with"]),
        pct(r["rate_with"]), pct(r["rate_without"]),
        f"{num(r['lift'])} <span class=ci>[{num(r['lift_ci_low'])}–{num(r['lift_ci_high'])}]</span>",
        pvalue(r["p_value"]), pvalue(r["q_value"]), num(r["median_days_to_macro"], 1),
    ] for _, r in overall.iterrows()]
    out.append(_table(rows, header, text_cols=4, wide=3))
    seg = v[v["segment"] != "all"]
    if not seg.empty:
        rows = [[_e(r["segment"]), _e(r["micro"]), _badge(r["verdict"]), integer(r["n_with"]),
                 f"{num(r['lift'])} <span class=ci>[{num(r['lift_ci_low'])}–"
                 f"{num(r['lift_ci_high'])}]</span>", pvalue(r["q_value"])]
                for _, r in seg.head(200).iterrows()]
        out.append(f"<details><summary>By segment ({len(seg)} rows)</summary>"
                   + _table(rows, ["segment", "micro-conversion", "verdict", "leads with",
                                   "lift [95% CI]", "q"], text_cols=2) + "</details>")
    return "".join(out) + "</section>"


def _model_section(data: ReportData) -> str:
    out = ['<section id="model"><h2>Model card</h2>']
    card = data.model_card
    if data.model_note:
        out.append(f'<p class="note">{_e(data.model_note)}</p>')
    if not card or not card.get("metrics"):
        return "".join(out) + "</section>"
    m, b = card.get("metrics") or {}, card.get("baseline") or {}
    window = card.get("data_window") or {}
    counts = card.get("counts") or {}
    features = card.get("features") or []
    facts = [
        ("version", card.get("version")), ("chosen model", card.get("chosen")),
        ("trained", str(card.get("created_at", ""))[:16].replace("T", " ")),
        ("data window", f"{str(window.get('start', '?'))[:10]} → {str(window.get('end', '?'))[:10]}"),
        ("leads / positives", f"{counts.get('n', '?')} / {counts.get('positives', '?')}"),
        ("features (known at)", ", ".join(f"{f.get('name')} ({f.get('known_at')})" for f in features
                                          if isinstance(f, dict)) or "–"),
        ("config hash", card.get("config_hash")),
    ]
    out.append(_table([[_e(k), _e(v)] for k, v in facts], ["", "value"], text_cols=2))
    metric_rows = [[_e(k), num(m.get(k), 3), num(b.get(k), 3)]
                   for k in ("roc_auc", "pr_auc", "brier", "ece") if k in m]
    out.append(_table(metric_rows, ["metric", "model", "baseline"]))
    out.append('<div class="row">')
    out.append(_chart(charts.calibration_curve(card.get("calibration") or []), "calibration plot"))
    out.append(_chart(charts.lift_by_decile(card.get("lift_by_decile") or []), "lift by decile"))
    out.append("</div>")
    out.append(_chart(charts.top_features(card.get("permutation_importance") or []), "top features"))
    return "".join(out) + "</section>"


def _uploads_section(data: ReportData) -> str:
    cur = data.currency
    out = ['<section id="uploads"><h2>Uploads: built, held, sent, accepted</h2>']
    u = data.uploads
    if u.empty or u["built"].sum() == 0:
        out.append('<p class="note">No conversions built yet.</p>')
    else:
        out.append(_chart(charts.uploads(u), "uploads by destination and status"))
        header = ["destination", "built", "held", "pending", "attempted", "accepted", "rejected",
                  "retrying", "dead-lettered", "withdrawn", "value accepted"]
        rows = [[_e(r["destination"]), integer(r["built"]), integer(r["held"]), integer(r["pending"]),
                 integer(r["attempted"]), integer(r["sent"]), integer(r["rejected"]),
                 integer(r["failed"]), integer(r["dead"]), integer(r["withdrawn"]),
                 _e(money(r["value_accepted"], cur))] for _, r in u.iterrows()]
        out.append(_table(rows, header))
    c = data.crm_vs_platform
    if not c.empty:
        out.append("<h3>CRM against platform</h3>")
        rows = [[_e(r["stage"]), _e(r["destination"] or "(not uploaded)"), _e(r["conversion_action"]),
                 integer(r["crm_leads"]), integer(r["built"]), integer(r["held"]),
                 integer(r["accepted"]), integer(r["rejected"]), integer(r["gap"])]
                for _, r in c.iterrows()]
        out.append(_table(rows, ["stage", "destination", "conversion action", "leads in CRM", "built",
                                 "held", "accepted", "rejected", "CRM − accepted"], text_cols=3))
    if not data.holds.empty:
        out.append("<h3>Held back, by rule</h3>")
        rows = [[_e(r["destination"]), _e(r["hold_rule"]), integer(r["n"])]
                for _, r in data.holds.iterrows()]
        out.append(_table(rows, ["destination", "rule", "conversions"], text_cols=2))
    if not data.rejections.empty:
        out.append("<h3>Rejected and dead-lettered, by platform code</h3>")
        rows = [[_e(r["destination"]), _e(r["status"]), _e(r["platform_code"]), _e(r["message"]),
                 integer(r["n"])] for _, r in data.rejections.iterrows()]
        out.append(_table(rows, ["destination", "status", "code", "platform message", "conversions"],
                          text_cols=4, wide=3))
    return "".join(out) + "</section>"


def _guardrails_section(data: ReportData) -> str:
    items = "".join(f"<li>{_badge(g.status)}<b>{_e(g.title)}</b>{_e(g.sentence)}</li>"
                    for g in data.guardrails)
    return (f'<section id="guardrails"><h2>Value-bidding guardrails</h2>'
            f'<ul class="guardrails">{items}</ul></section>')


def render_html(data: ReportData) -> str:
    css = resources.files("leadloop.report").joinpath("templates/report.css").read_text("utf-8")
    since = f" · leads created since {data.since:%Y-%m-%d}" if data.since else ""
    body = "".join([
        _summary_section(data), _value_section(data), _validation_section(data),
        _guardrails_section(data), _uploads_section(data), _model_section(data),
    ])
    footer = (
        f"<footer><p>Qualified = reached <b>{_e(data.macro_stage)}</b>; won = reached "
        f"<b>{_e(data.won_stage or 'n/a')}</b>; revenue = its deal amounts; intervals are 95 % Wilson "
        "score intervals; predicted value = each lead's latest score; accepted = outbox rows the "
        "platform accepted. Landing pages are shown without query strings. No personal data is "
        "shown.</p></footer>"
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "style-src 'unsafe-inline'; img-src data:\">"
        f"<title>leadloop report {data.generated_at:%Y-%m-%d}</title><style>{css}</style></head>"
        f"<body><main><header><h1>Lead value report</h1><p class=\"meta\">Generated "
        f"{data.generated_at:%Y-%m-%d %H:%M} UTC · currency {_e(data.currency)}{_e(since)}</p></header>"
        f"{body}{footer}</main></body></html>\n"
    )
