"""The report in a terminal: rich tables, the same numbers as the HTML."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from leadloop.report.data import ReportData
from leadloop.report.html import headlines, integer, maturity_note, money, next_steps, num, pct, pvalue

VERDICT_STYLES = {"predictive": "green", "weak": "yellow", "negative": "red", "no signal": "dim",
                  "not enough data": "dim"}


def _lift(r: dict[str, Any]) -> str:
    return f"{num(r.get('lift'))} [{num(r.get('lift_ci_low'))}–{num(r.get('lift_ci_high'))}]"


def validation_table(rows: list[dict[str, Any]], title: str = "Micro → macro validation") -> Table:
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("micro", overflow="fold")
    for col in ("n with", "rate with", "rate without", "lift [95% CI]", "p", "q"):
        table.add_column(col, justify="right")
    table.add_column("verdict", min_width=len("not enough data"), no_wrap=True)
    for r in rows:
        verdict = str(r.get("verdict", ""))
        table.add_row(Text(str(r.get("micro", ""))), integer(r.get("n_with")), pct(r.get("rate_with")),
                      pct(r.get("rate_without")), _lift(r), pvalue(r.get("p_value")),
                      pvalue(r.get("q_value")), Text(verdict, style=VERDICT_STYLES.get(verdict, "")))
    return table


def print_validation_rows(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    """Print `validate_csv` rows (micro, n_with, rates, lift [CI], p, q, verdict) as a table."""
    console = console or Console()
    console.print(validation_table(rows))
    for r in rows:
        if r.get("reason"):
            console.print(Text(f"  {r['micro']}: {r['reason']}", style="dim"))


def print_report(data: ReportData, console: Console | None = None) -> None:
    """The whole report as rich tables (`leadloop report --format text`)."""
    console = console or Console()
    s, cur = data.summary, data.currency
    console.rule("[bold]Lead value report")
    console.print(
        f"{integer(s.leads)} leads · {integer(s.qualified)} qualified ({pct(s.qualified_rate)})"
        f" · {integer(s.won)} won · revenue {money(s.revenue, cur)}"
        f" · value accepted {money(s.value_uploaded, cur)} ({s.accepted:,} conversions)",
        markup=False, highlight=False)
    for line in headlines(data):
        console.print(Text(f"• {line}"))
    steps = next_steps(data)
    if steps:
        console.print(Text("Do this next", style="bold"))
        for i, step in enumerate(steps, 1):
            console.print(Text(f"{i}. {step['title']} {step['detail']}"))
    note = maturity_note(data)
    if note:
        console.print(Text(note, style="dim"))

    src = Table(title="Lead value by source", title_justify="left", header_style="bold")
    for col in ["source", "leads", "qualified", "rate [95% CI]", "won", "revenue", "rev/lead",
                "pred. value", "pred/actual", "accepted"]:
        src.add_column(col, justify="left" if col == "source" else "right")
    for _, r in data.by["source"].head(20).iterrows():
        src.add_row(Text(str(r["source"])), integer(r["leads"]), integer(r["qualified"]),
                    f"{pct(r['qualified_rate'])} [{pct(r['qualified_ci_low'])}–"
                    f"{pct(r['qualified_ci_high'])}]", integer(r["won"]), money(r["revenue"]),
                    money(r["revenue_per_lead"]), money(r["mean_predicted_value"]),
                    f"{pct(r['mean_predicted_probability'])}/{pct(r['actual_rate_scored'])}",
                    money(r["value_uploaded"]))
    console.print(src)

    v = data.validation
    if v.empty:
        console.print("No validation run yet.", style="dim")
    else:
        console.print(validation_table(v[v["segment"] == "all"].to_dict("records")))

    g = Table(title="Value-bidding guardrails", title_justify="left", header_style="bold",
              show_lines=False)
    g.add_column("check")
    g.add_column("")
    g.add_column("finding", overflow="fold")
    for item in data.guardrails:
        g.add_row(item.title, Text(item.status, style="green" if item.ok else "yellow"),
                  Text(item.sentence))
    console.print(g)

    if not data.uploads.empty:
        u = Table(title="Uploads by destination", title_justify="left", header_style="bold")
        for col in ["destination", "built", "held", "pending", "accepted", "rejected", "retrying",
                    "dead", "value accepted"]:
            u.add_column(col, justify="left" if col == "destination" else "right")
        for _, r in data.uploads.iterrows():
            u.add_row(Text(str(r["destination"])), integer(r["built"]), integer(r["held"]),
                      integer(r["pending"]), integer(r["sent"]), integer(r["rejected"]),
                      integer(r["failed"]), integer(r["dead"]), money(r["value_accepted"], cur))
        console.print(u)

    card = data.model_card
    if card and card.metrics:
        m = card.metrics
        console.print(f"Model {card.version} ({card.chosen}): ROC AUC "
                      f"{num(m.get('roc_auc'), 3)}, PR AUC {num(m.get('pr_auc'), 3)}, Brier "
                      f"{num(m.get('brier'), 3)}, ECE {num(m.get('ece'), 3)}", markup=False)
    else:
        console.print(data.model_note or "No model.", style="dim", markup=False)
