"""One Jinja2 environment for every HTML leadloop writes: the static report and the workbench's
pages (`leadloop serve`) render from the same templates in `leadloop/report/templates/`.

Autoescape is on for every template: CRM values such as campaign names and landing pages are
untrusted. Only the charts (SVG drawn by matplotlib, which escapes its text) and the report's own
CSS are marked safe, in Python, before they reach a template.
"""

from __future__ import annotations

import math
from datetime import date, datetime
from functools import cache
from typing import Any

import jinja2
import pandas as pd
from markupsafe import Markup, escape


def isnan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA or v is pd.NaT


def pct(v: Any, digits: int = 1) -> str:
    return "–" if isnan(v) else f"{float(v) * 100:.{digits}f}%"


def money(v: Any, currency: str = "") -> str:
    if isnan(v):
        return "–"
    v = float(v)
    text = f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}"
    return f"{currency} {text}".strip()


def integer(v: Any) -> str:
    return "–" if isnan(v) else f"{int(v):,}"


def num(v: Any, digits: int = 2) -> str:
    return "–" if isnan(v) else f"{float(v):.{digits}f}"


def pvalue(v: Any) -> str:
    """p and q values for people: "<0.001" below a thousandth; bounds the validator reports as
    text (such as "< 1e-300") are shown as they are."""
    if isinstance(v, str):
        return v
    if isnan(v):
        return "–"
    return "<0.001" if float(v) < 0.001 else f"{float(v):.3f}"


def when(v: Any) -> str:
    """A time for people: "1 Dec 2026 15:03 UTC", never a raw ISO timestamp."""
    if isnan(v) or v == "":
        return "–"
    if isinstance(v, str):
        try:
            v = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            return v
    if isinstance(v, pd.Timestamp):
        v = v.to_pydatetime()
    if isinstance(v, datetime):
        return f"{v.day} {v:%b %Y %H:%M}" + (" UTC" if v.tzinfo else "")
    if isinstance(v, date):
        return f"{v.day} {v:%b %Y}"
    return str(v)


def day(v: Any) -> str:
    """A date for people: "1 Dec 2026"."""
    if isnan(v) or v == "":
        return "–"
    if isinstance(v, str):
        try:
            v = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            return v
    return f"{v.day} {v:%b %Y}"


def rate_ci(rate: Any, low: Any, high: Any) -> Markup:
    if isnan(rate):
        return Markup("–")
    return Markup("{} <span class=ci>[{}–{}]</span>").format(pct(rate), pct(low), pct(high))


def lift_ci(lift: Any, low: Any, high: Any) -> Markup:
    return Markup("{} <span class=ci>[{}–{}]</span>").format(num(lift), num(low), num(high))


def badge(text: Any) -> Markup:
    cls = "b-" + "-".join(str(text).lower().split())
    return Markup('<span class="badge {}">{}</span>').format(cls, text)


def records(df: pd.DataFrame | None, limit: int | None = None) -> list[dict[str, Any]]:
    if df is None or df.empty:
        return []
    return (df.head(limit) if limit else df).to_dict("records")


def svg(markup: str | None) -> Markup:
    """A chart drawn by `leadloop.report.charts` (matplotlib escapes the labels it draws)."""
    return Markup(markup or "")


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader([
            jinja2.PackageLoader("leadloop.report", "templates"),
            jinja2.PackageLoader("leadloop.web", "templates"),
        ]),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(pct=pct, money=money, integer=integer, num=num, pvalue=pvalue, when=when,
                       day=day, badge=badge, svg=svg, records=records)
    env.globals.update(rate_ci=rate_ci, lift_ci=lift_ci, isnan=isnan, escape=escape)
    return env
