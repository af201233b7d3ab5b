"""The lead-value report: value by source, micro→macro validation, model card, uploads, guardrails.

`write_reports` is the `report` job (HTML + CSVs + JSON into a directory); `render_report` is the
`leadloop report` command (one format, to a file, a directory or the terminal).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd

from leadloop.context import Context
from leadloop.errors import ConfigError
from leadloop.report.data import VALIDATION_COLUMNS, ReportData, build_report_data

__all__ = ["REPORT_FILES", "build_report_data", "render_report", "report_json", "write_csvs",
           "write_reports"]

REPORT_FILES = ("report.html", "report.json", "validation.csv")  # what users' scripts open

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Column names without ':' and text cells that cannot run as spreadsheet formulas (CRM strings
    such as campaign names are untrusted and these files are opened in Excel)."""
    out = df.rename(columns=lambda c: str(c).replace(":", "_")).copy()
    for col in out.columns:
        if not pd.api.types.is_numeric_dtype(out[col]):
            out[col] = out[col].map(
                lambda v: "'" + v if isinstance(v, str) and v.startswith(_FORMULA_START) else v)
    return out


def _tables(data: ReportData) -> dict[str, pd.DataFrame]:
    tables = {f"lead_value_by_{k}": v for k, v in data.by.items()}
    tables["validation"] = data.validation.reindex(columns=VALIDATION_COLUMNS)
    tables["uploads_by_destination"] = data.uploads
    tables["upload_holds"] = data.holds
    tables["upload_rejections"] = data.rejections
    tables["crm_vs_platform"] = data.crm_vs_platform
    tables["guardrails"] = pd.DataFrame(
        [{"check": g.key, "title": g.title, "status": g.status, "finding": g.sentence}
         for g in data.guardrails], columns=["check", "title", "status", "finding"])
    return tables


def write_csvs(data: ReportData, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, df in _tables(data).items():
        path = out_dir / f"{name}.csv"
        _csv_safe(df).to_csv(path, index=False, float_format="%.6g")
        paths.append(path)
    return paths


def _plain(value: Any) -> Any:
    """JSON-ready: NaN → null, times → ISO 8601, Decimal/numpy → float/int."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, pd.Timestamp | datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if hasattr(value, "item") and not isinstance(value, str):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def report_json(data: ReportData) -> str:
    from leadloop.report.html import headlines, maturity_note, next_steps

    doc = {
        "generated_at": data.generated_at,
        "since": data.since,
        "currency": data.currency,
        "macro_stage": data.macro_stage,
        "won_stage": data.won_stage,
        "summary": asdict(data.summary),
        "headlines": headlines(data),
        "next_steps": next_steps(data),
        "stage_values": [asdict(s) for s in data.stage_values],
        "maturity": {"days_to_qualify_p90": data.maturity_days,
                     "immature_months": data.immature_months, "note": maturity_note(data)},
        "ad_spend": data.spend_summary,
        "notes": data.notes,
        "tables": {k: v.rename(columns=lambda c: str(c).replace(":", "_")).to_dict("records")
                   for k, v in _tables(data).items()},
        "validation_run": data.validation_run,
        "model_card": data.model_card.to_dict() if data.model_card else None,
        "model_note": data.model_note,
    }
    return json.dumps(_plain(doc), indent=2, allow_nan=False)


def _write_html(data: ReportData, path: Path) -> Path:
    from leadloop.report.html import render_html

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(data), encoding="utf-8")
    return path


def write_reports(ctx: Context, out_dir: Path, since: datetime | None = None) -> list[Path]:
    """The `report` job: report.html, report.json and the CSV tables (validation.csv, ...)."""
    data = build_report_data(ctx, since=since)
    out_dir = Path(out_dir)
    paths = [_write_html(data, out_dir / "report.html")]
    json_path = out_dir / "report.json"
    json_path.write_text(report_json(data), encoding="utf-8")
    paths.append(json_path)
    paths.extend(write_csvs(data, out_dir))
    return paths


def render_report(ctx: Context, *, fmt: str, out: Path | None, since: datetime | None,
                  ad_spend: Path | None = None) -> str | None:
    """`leadloop report`: text → the terminal; json → stdout or a file; html/csv → files.
    `ad_spend` (a CSV) overrides `[report] ad_spend`."""
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    data = build_report_data(ctx, since=since, ad_spend=ad_spend)
    default_dir = ctx.settings.resolve_path(ctx.settings.report.out_dir)
    if fmt == "text":
        from leadloop.report.terminal import print_report

        print_report(data)
        return None
    if fmt == "json":
        text = report_json(data)
        if out is None:
            return text
        target = out / "report.json" if out.is_dir() else out
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        return f"wrote {target}"
    if fmt == "html":
        target = out or default_dir
        if target.suffix.lower() not in (".html", ".htm"):
            target = target / "report.html"
        return f"wrote {_write_html(data, target)}"
    if fmt == "csv":
        target = out or default_dir
        if target.suffix.lower() == ".csv":
            raise ConfigError("--out", "the csv format writes several tables: give a directory")
        paths = write_csvs(data, target)
        return f"wrote {len(paths)} CSV files to {target}"
    raise ConfigError("--format", f"unknown format {fmt!r} (html, csv, json or text)")
