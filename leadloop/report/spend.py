"""Ad spend for cost per lead, cost per qualified lead and return on ad spend (ROAS).

The input is a CSV with one row per (month, source, campaign): `[report] ad_spend` in the config
or `--ad-spend PATH` on the command line. Columns are matched by name, case-insensitively, and
the headers of the platforms' own exports are understood too:

| meaning  | accepted headers |
| -------- | ---------------- |
| month    | month, date, day, reporting starts, period (YYYY-MM, or a date: its month is used) |
| source   | source, utm_source, platform (optional; default: every source) |
| campaign | campaign, campaign name, utm_campaign (optional) |
| spend    | spend, cost, amount spent, amount spent (…) (a number; thousands separators allowed) |

A row that cannot be read is left out and named in `notes`; the rest is used.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pandas as pd

from leadloop.errors import ConfigError

_HEADERS = {
    "month": ("month", "date", "day", "reporting starts", "period"),
    "source": ("source", "utm_source", "platform"),
    "campaign": ("campaign", "campaign name", "utm_campaign"),
    "spend": ("spend", "cost", "amount spent"),
}
_MONTH = re.compile(r"^(\d{4})-(\d{1,2})")


@dataclass
class AdSpend:
    rows: pd.DataFrame  # month (YYYY-MM), source, campaign, spend
    notes: list[str] = field(default_factory=list)


def _column(headers: Sequence[str], meaning: str) -> str | None:
    lowered = {h.strip().lower(): h for h in headers}
    for name in _HEADERS[meaning]:
        if name in lowered:
            return lowered[name]
    if meaning == "spend":  # "Amount spent (USD)", "Cost (EUR)"
        for low, h in lowered.items():
            if low.startswith(("amount spent", "cost", "spend")):
                return h
    return None


def _month(text: str) -> str | None:
    text = text.strip()
    m = _MONTH.match(text)
    if m and 1 <= int(m.group(2)) <= 12:
        return f"{int(m.group(1)):04d}-{int(m.group(2)):02d}"
    for fmt in ("%b %Y", "%B %Y", "%m/%d/%Y", "%d/%m/%Y", "%d.%m.%Y"):
        try:
            return datetime.strptime(text, fmt).strftime("%Y-%m")
        except ValueError:
            continue
    return None


def _amount(text: str) -> float | None:
    cleaned = re.sub(r"[^\d.\-]", "", text.replace(",", ""))
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if value >= 0 else None


def load_ad_spend(path: Path, key: str = "report.ad_spend") -> AdSpend:
    """Read an ad-spend CSV (see the module doc). A missing file or a file without a month or
    spend column is a config error naming `key`; a bad row is skipped and noted."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    reader = csv.DictReader(text.splitlines())
    headers = reader.fieldnames or []
    cols = {m: _column(headers, m) for m in _HEADERS}
    missing = [m for m in ("month", "spend") if cols[m] is None]
    if missing:
        raise ConfigError(key, f"{path.name} has no {' or '.join(missing)} column "
                          f"(columns: {', '.join(headers) or 'none'})")
    rows, notes = [], []
    for line, rec in enumerate(reader, start=2):
        month = _month(rec.get(cols["month"]) or "")
        spend = _amount(rec.get(cols["spend"]) or "")
        if month is None or spend is None:
            what = "month" if month is None else "spend"
            notes.append(f"{path.name} line {line} left out: unreadable {what}")
            continue
        rows.append({
            "month": month,
            "source": (rec.get(cols["source"]) or "").strip() if cols["source"] else "",
            "campaign": (rec.get(cols["campaign"]) or "").strip() if cols["campaign"] else "",
            "spend": spend,
        })
    return AdSpend(pd.DataFrame(rows, columns=["month", "source", "campaign", "spend"]), notes)


def add_spend(table: pd.DataFrame, key: str, spend: pd.Series) -> pd.DataFrame:
    """Spend, cost per lead, cost per qualified lead and ROAS (revenue ÷ spend) per row of a
    lead-value table; `spend` is indexed by the lower-cased value of `key`."""
    out = table.copy()
    out["spend"] = out[key].astype(str).str.lower().map(spend).astype(float)
    out["cost_per_lead"] = out["spend"] / out["leads"].where(out["leads"] > 0)
    out["cost_per_qualified"] = out["spend"] / out["qualified"].where(out["qualified"] > 0)
    out["roas"] = out["revenue"] / out["spend"].where(out["spend"] > 0)
    return out
