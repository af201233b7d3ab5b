"""The report's charts as inline SVG strings (matplotlib `Figure` objects, no pyplot state, so
charts can be drawn from any thread; text is kept as SVG text).

Labels come from the CRM and are untrusted: mathtext parsing is off (a `$` in a campaign name
stays a `$`) and matplotlib's SVG writer escapes text. Each chart gets its own hash salt so the
element ids of several inline SVGs in one page never collide.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter, PercentFormatter

# one palette for the whole report (also used by the HTML's CSS)
INK = "#1f2933"
MUTED = "#7b8794"
GRID = "#e4e7eb"
BLUE = "#2563eb"
TEAL = "#0d9488"
AMBER = "#d97706"
RED = "#dc2626"
GREY = "#9aa5b1"
VERDICT_COLOURS = {
    "predictive": TEAL,
    "weak": AMBER,
    "negative": RED,
    "no signal": GREY,
    "not enough data": "#cbd2d9",
}
STATUS_COLOURS = {
    "sent": TEAL, "pending": BLUE, "held": AMBER, "failed": "#f59e0b", "rejected": RED,
    "dead": "#7f1d1d", "withdrawn": GREY,
}

_STYLE: dict[Any, Any] = {  # matplotlib types its keys as a literal of every rc name
    "svg.fonttype": "none",
    "text.parse_math": False,
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"],
    "font.size": 9.5,
    "axes.edgecolor": GRID,
    "axes.labelcolor": INK,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.titlecolor": INK,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": GRID,
    "grid.linewidth": 0.8,
    "xtick.color": MUTED,
    "ytick.color": MUTED,
    "xtick.labelcolor": INK,
    "ytick.labelcolor": INK,
    "legend.frameon": False,
}


def _svg(fig: Figure, salt: str) -> str:
    buf = io.StringIO()
    with rc_context({"svg.hashsalt": salt, **_STYLE}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    start = text.find("<svg")
    return text[start:]


def _figure(width: float = 7.2, height: float = 3.6) -> tuple[Figure, Any]:
    with rc_context(_STYLE):
        fig = Figure(figsize=(width, height))
        ax = fig.subplots()
    return fig, ax


def _short(label: Any, n: int = 28) -> str:
    s = str(label)
    return s if len(s) <= n else s[: n - 1] + "…"


def _money(currency: str) -> FuncFormatter:
    def fmt(v: float, _pos: int) -> str:
        if abs(v) >= 1_000_000:
            return f"{v / 1_000_000:.1f}M"
        if abs(v) >= 10_000:
            return f"{v / 1000:.0f}k"
        return f"{v:,.0f}"

    return FuncFormatter(fmt)


def volume_vs_quality(table: pd.DataFrame, key: str, currency: str, *, by_revenue: bool) -> str:
    """x = leads, y = revenue (or qualified rate) per lead, bubble area = revenue."""
    with rc_context(_STYLE):
        fig, ax = _figure(7.2, 4.2)
        t = table[table["leads"] > 0]
        y = t["revenue_per_lead"] if by_revenue else t["qualified_rate"]
        size_base = t["revenue"] if by_revenue and t["revenue"].sum() > 0 else t["qualified"]
        sizes = 60 + 1400 * (size_base / max(float(size_base.max()), 1e-9))
        median_y = float(np.median(y)) if len(y) else 0.0
        colours = [TEAL if v >= median_y else AMBER for v in y]
        ax.scatter(t["leads"], y, s=sizes, c=colours, alpha=0.55, edgecolors="white", linewidths=1.2)
        for (_, row), yy in zip(t.iterrows(), y, strict=True):
            ax.annotate(_short(row[key], 22), (row["leads"], yy), xytext=(0, 0),
                        textcoords="offset points", ha="center", va="center", fontsize=8.5, color=INK)
        ax.axhline(median_y, color=MUTED, lw=0.8, ls="--")
        ax.set_xlabel("leads (volume)")
        if by_revenue:
            ax.set_ylabel(f"revenue per lead ({currency})")
            ax.yaxis.set_major_formatter(_money(currency))
            ax.set_title("Volume vs quality: who brings value, who brings volume")
        else:
            ax.set_ylabel("qualified rate")
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            ax.set_title("Volume vs quality: who brings qualified leads")
        ax.margins(0.18)
        ax.set_ylim(bottom=0)
        ax.set_xlim(left=0)
        ax.text(1.0, -0.16, "bubble area = revenue" if by_revenue else "bubble area = qualified leads",
                transform=ax.transAxes, ha="right", fontsize=8, color=MUTED)
    return _svg(fig, f"vq-{key}")


def rate_with_intervals(table: pd.DataFrame, key: str, title: str, limit: int = 12) -> str:
    """Horizontal bars of the qualified rate with Wilson 95 % intervals, overall rate as a line."""
    with rc_context(_STYLE):
        t = table.head(limit).iloc[::-1]
        fig, ax = _figure(7.2, max(2.2, 0.34 * len(t) + 1.0))
        pos = np.arange(len(t))
        ax.barh(pos, t["qualified_rate"], color=BLUE, alpha=0.85, height=0.62)
        err = np.vstack([t["qualified_rate"] - t["qualified_ci_low"],
                         t["qualified_ci_high"] - t["qualified_rate"]])
        ax.errorbar(t["qualified_rate"], pos, xerr=np.nan_to_num(err), fmt="none", ecolor=INK,
                    elinewidth=1, capsize=3)
        overall = table["qualified"].sum() / max(table["leads"].sum(), 1)
        ax.axvline(overall, color=AMBER, lw=1.2, ls="--", label=f"overall {overall:.1%}")
        ax.set_yticks(pos, [f"{_short(k)}  (n={n:,})" for k, n in zip(t[key], t["leads"], strict=True)])
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.grid(axis="y", visible=False)
        ax.set_title(title)
        ax.legend(loc="lower right", fontsize=8)
    return _svg(fig, f"rate-{key}")


def monthly(table: pd.DataFrame, currency: str, maturing: set[str] | None = None) -> str:
    """Leads per month (bars) and the qualified rate (line, right axis); months whose leads have
    not all had time to qualify (`maturing`) are hatched and their rates drawn dashed."""
    maturing = maturing or set()
    with rc_context(_STYLE):
        fig, ax = _figure(7.2, 3.2)
        t = table.sort_values("month")
        pos = np.arange(len(t))
        young = np.array([str(m) in maturing for m in t["month"]])
        ax.bar(pos[~young], t["leads"].to_numpy()[~young], color=BLUE, alpha=0.35, label="leads")
        if young.any():
            ax.bar(pos[young], t["leads"].to_numpy()[young], color=BLUE, alpha=0.15, hatch="///",
                   edgecolor=BLUE, lw=0, label="not yet mature")
        ax.set_ylabel("leads")
        ax.set_xticks(pos, [str(m) for m in t["month"]], rotation=45 if len(t) > 8 else 0, ha="right"
                      if len(t) > 8 else "center")
        ax2 = ax.twinx()
        rate = t["qualified_rate"].to_numpy()
        mature_end = int(np.argmax(young)) if young.any() else len(t)
        ax2.plot(pos[:mature_end], rate[:mature_end], color=TEAL, marker="o", lw=2,
                 label="qualified rate")
        if young.any():
            start = max(mature_end - 1, 0)
            ax2.plot(pos[start:], rate[start:], color=TEAL, marker="o", lw=1.5, ls="--",
                     mfc="white")
            ax.legend(loc="upper left", fontsize=8)
        ax2.fill_between(pos, t["qualified_ci_low"], t["qualified_ci_high"], color=TEAL, alpha=0.15)
        ax2.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax2.set_ylim(bottom=0)
        ax2.grid(False)
        ax2.spines["right"].set_visible(True)
        ax2.set_ylabel("qualified rate", color=TEAL)
        ax.set_title("Leads and qualified rate by month of creation")
        ax.grid(axis="x", visible=False)
    return _svg(fig, "monthly")


def calibration_by_group(table: pd.DataFrame, key: str) -> str | None:
    """Mean predicted probability vs the observed qualified rate per group (scored leads)."""
    t = table.dropna(subset=["mean_predicted_probability", "actual_rate_scored"])
    t = t[t["scored"] > 0]
    if t.empty:
        return None
    with rc_context(_STYLE):
        fig, ax = _figure(5.0, 4.0)
        top = float(max(t["mean_predicted_probability"].max(), t["actual_rate_scored"].max()) * 1.15)
        ax.plot([0, top], [0, top], color=MUTED, lw=1, ls="--", label="perfectly calibrated")
        sizes = 30 + 400 * t["scored"] / t["scored"].max()
        ax.scatter(t["mean_predicted_probability"], t["actual_rate_scored"], s=sizes, color=BLUE,
                   alpha=0.6, edgecolors="white")
        for _, row in t.head(10).iterrows():
            ax.annotate(_short(row[key], 18), (row["mean_predicted_probability"],
                                               row["actual_rate_scored"]),
                        xytext=(6, 4), textcoords="offset points", fontsize=8, color=INK)
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("actual qualified rate")
        ax.set_title(f"Predicted vs actual by {key.replace('_', ' ')}")
        ax.legend(loc="upper left", fontsize=8)
    return _svg(fig, f"calgroup-{key}")


def forest(validation: pd.DataFrame) -> str | None:
    """Lift of each micro-conversion with its 95 % CI, coloured by verdict (log scale)."""
    t = validation[validation["segment"] == "all"].dropna(subset=["lift"])
    t = t[t["lift"] > 0]
    if t.empty:
        return None
    with rc_context(_STYLE):
        t = t.sort_values("lift")
        fig, ax = _figure(7.2, max(2.2, 0.42 * len(t) + 1.1))
        pos = np.arange(len(t))
        low = t["lift_ci_low"].fillna(t["lift"]).clip(lower=1e-3)
        high = t["lift_ci_high"].fillna(t["lift"])
        colours = [VERDICT_COLOURS.get(str(v), GREY) for v in t["verdict"]]
        ax.hlines(pos, low, high, colors=colours, lw=2.4)
        ax.scatter(t["lift"], pos, color=colours, s=60, zorder=3, edgecolors="white")
        ax.axvline(1.0, color=INK, lw=1)
        ax.set_xscale("log")
        lo, hi = float(low.min()), float(high.max())
        left, right = min(lo, 0.8) / 1.3, max(hi, 1.25) * 1.3
        ticks = [t for t in (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64) if left <= t <= right]
        ax.set_xticks(ticks, [f"{t:g}×" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks(pos, [f"{_short(m, 24)} — {v}" for m, v in zip(t["micro"], t["verdict"],
                                                                    strict=True)])
        ax.grid(axis="y", visible=False)
        ax.set_xlabel("lift on the macro conversion rate (95 % CI, log scale)")
        ax.set_title("Which micro-conversions predict the macro conversion")
        ax.set_xlim(left, right)
    return _svg(fig, "forest")


def calibration_curve(points: Sequence[dict[str, Any]]) -> str | None:
    pts = [p for p in points if p.get("predicted") is not None and p.get("observed") is not None]
    if not pts:
        return None
    with rc_context(_STYLE):
        fig, ax = _figure(4.6, 3.8)
        pred = [float(p["predicted"]) for p in pts]
        obs = [float(p["observed"]) for p in pts]
        top = max([*pred, *obs, 0.05]) * 1.1
        ax.plot([0, top], [0, top], color=MUTED, lw=1, ls="--", label="perfect")
        ax.plot(pred, obs, color=BLUE, marker="o", lw=2, label="model")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_xlabel("predicted probability")
        ax.set_ylabel("observed rate")
        ax.set_title("Calibration (held-out leads)")
        ax.legend(loc="upper left", fontsize=8)
    return _svg(fig, "calibration")


def lift_by_decile(rows: Sequence[dict[str, Any]]) -> str | None:
    rows = [r for r in rows if r.get("lift") is not None]
    if not rows:
        return None
    with rc_context(_STYLE):
        fig, ax = _figure(4.6, 3.8)
        deciles = [int(r["decile"]) for r in rows]
        lifts = [float(r["lift"]) for r in rows]
        ax.bar([str(d) for d in deciles], lifts,
               color=[TEAL if v >= 1 else AMBER for v in lifts], alpha=0.9)
        ax.axhline(1.0, color=INK, lw=1)
        ax.set_xlabel("score decile (1 = highest scores)")
        ax.set_ylabel("lift over the average rate")
        ax.set_title("Lift by decile")
        ax.grid(axis="x", visible=False)
    return _svg(fig, "deciles")


def top_features(rows: Sequence[dict[str, Any]], limit: int = 10) -> str | None:
    rows = sorted([r for r in rows if r.get("importance") is not None],
                  key=lambda r: float(r["importance"]), reverse=True)[:limit]
    if not rows:
        return None
    with rc_context(_STYLE):
        rows = rows[::-1]
        fig, ax = _figure(7.2, max(2.2, 0.32 * len(rows) + 1.0))
        ax.barh([_short(r["feature"], 30) for r in rows], [float(r["importance"]) for r in rows],
                color=BLUE, alpha=0.85, height=0.6)
        ax.set_xlabel("permutation importance (drop in score when shuffled)")
        ax.set_title("Top features")
        ax.grid(axis="y", visible=False)
    return _svg(fig, "features")


def uploads(table: pd.DataFrame) -> str | None:
    """Stacked bars per destination: conversions by outbox status."""
    if table.empty or table["built"].sum() == 0:
        return None
    statuses = [s for s in STATUS_COLOURS if s in table.columns and table[s].sum() > 0]
    with rc_context(_STYLE):
        t = table.iloc[::-1]
        fig, ax = _figure(7.2, max(1.8, 0.5 * len(t) + 1.2))
        left = np.zeros(len(t))
        for s in statuses:
            vals = t[s].to_numpy(dtype=float)
            ax.barh(t["destination"], vals, left=left, color=STATUS_COLOURS[s], label=s, height=0.55)
            left += vals
        ax.set_xlabel("conversions")
        ax.set_title("Uploads by destination and status")
        ax.grid(axis="y", visible=False)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=len(statuses), fontsize=8)
    return _svg(fig, "uploads")
