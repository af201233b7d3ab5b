"""Manual-import files, for accounts whose API access is not approved yet.

`file_platform` picks the template: Google's offline click import (a `Parameters:TimeZone=` line,
then `Google Click ID,Conversion Name,Conversion Time,Conversion Value,Conversion Currency`, times
as `yyyy-MM-dd HH:mm:ss` in that zone), Microsoft's equivalent (`Microsoft Click ID` first),
Meta's CRM fields (`lead_id,event_name,event_time,value,currency`, Unix seconds) and LinkedIn's
(`SHA256 Email,LinkedIn First Party Ads Tracking UUID,...`, epoch ms). One file per batch in the
destination's `output_dir`; rows written are marked sent with platform code `file`.

The files are opened by people in spreadsheets, and their cells come from the CRM: click ids are
checked against each platform's format before a row is written (`invalid_click_id` holds it, see
`platform_hold`), and any cell that a spreadsheet would read as a formula (`=`, `+`, `-`, `@`, tab,
carriage return first) is written with a leading `'`, as the report's CSVs are.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Literal
from zoneinfo import ZoneInfo

from pydantic import Field

from leadloop.errors import FatalDestinationError
from leadloop.export.base import (
    BaseDestination,
    DestinationSettings,
    OutRow,
    RowResult,
    unix_millis,
    unix_seconds,
)
from leadloop.export.consent import user_data_allowed
from leadloop.export.google_data_manager import DataManagerDestination
from leadloop.export.linkedin import LinkedInDestination
from leadloop.export.meta import MetaDestination
from leadloop.export.microsoft import MicrosoftDestination
from leadloop.export.rules import window

HEADERS = {
    "google": ["Google Click ID", "Conversion Name", "Conversion Time", "Conversion Value",
               "Conversion Currency"],
    "microsoft": ["Microsoft Click ID", "Conversion Name", "Conversion Time", "Conversion Value",
                  "Conversion Currency"],
    "meta": ["lead_id", "event_name", "event_time", "value", "currency"],
    "linkedin": ["SHA256 Email", "LinkedIn First Party Ads Tracking UUID", "Conversion Name",
                 "Event Time", "Value", "Currency"],
}


# Whose rules and click id a file of each template follows.
PLATFORMS: dict[str, type[BaseDestination]] = {
    "google": DataManagerDestination, "meta": MetaDestination,
    "microsoft": MicrosoftDestination, "linkedin": LinkedInDestination,
}


class CsvFilesSettings(DestinationSettings):
    kind: Literal["csv_files"] = "csv_files"
    output_dir: str | None = None
    timezone: str = "UTC"
    file_platform: Literal["google", "meta", "microsoft", "linkedin"] = Field(
        "google", description="whose manual-import template to write")

    def anchored(self, against: Callable[[str], str]) -> DestinationSettings:
        if not self.output_dir:
            return self
        return self.model_copy(update={"output_dir": against(self.output_dir)})

    def file_dirs(self) -> list[str]:
        return [self.output_dir] if self.output_dir else []


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def inert(cell: str) -> str:
    """`cell` as text a spreadsheet shows but never evaluates."""
    return f"'{cell}" if cell.startswith(_FORMULA_START) else cell


def _num(row: OutRow) -> str:
    return "" if row.value is None else f"{float(row.value):.2f}"


class CsvFilesDestination(BaseDestination):
    kind: ClassVar[str] = "csv_files"
    config_model: ClassVar[type[DestinationSettings]] = CsvFilesSettings
    platform_max: ClassVar[int] = 100_000
    # The outbox keeps one click id per row; a file takes its template's (`file_platform`).
    click_ids: ClassVar[tuple[str, ...]] = ("gclid", "msclkid", "li_fat_id", "meta_lead_id")

    def platform_hold(self, row: OutRow, now: datetime, user_data: bool) -> str | None:
        """The template platform's own rule, plus a click id of the platform's shape (a CRM
        field must not become a spreadsheet formula or break the import). Google's click-import
        template has a Google Click ID column only (no braids, no hashes)."""
        platform = PLATFORMS[self.cfg.file_platform]
        click = platform.click_ids[0]
        value = getattr(row, click)
        if value and platform.click_format and not platform.click_format.match(value):
            return "invalid_click_id"
        if self.cfg.file_platform == "google" and row.kind == "conversion" and not row.gclid:
            return "no_click_id"
        return platform.rule(row, now, user_data,
                             window(platform.window_days, self.cfg.conversion_window_days))

    def _time(self, row: OutRow) -> str:
        return row.conversion_time.astimezone(ZoneInfo(self.cfg.timezone)).strftime("%Y-%m-%d %H:%M:%S")

    def _line(self, platform: str, row: OutRow) -> list[str]:
        if platform == "google":
            return [row.gclid or "", row.conversion_action, self._time(row), _num(row), row.currency or ""]
        if platform == "microsoft":
            return [row.msclkid or "", row.conversion_action, self._time(row), _num(row),
                    row.currency or ""]
        if platform == "meta":
            return [row.meta_lead_id or "", row.conversion_action,
                    str(unix_seconds(row.conversion_time)), _num(row), (row.currency or "").lower()]
        email = row.email_sha256 if user_data_allowed(row, self.cfg.send_user_data) else ""
        return [email or "", row.li_fat_id or "", row.conversion_action,
                str(unix_millis(row.conversion_time)), _num(row), row.currency or ""]

    def build_payload(self, rows: Sequence[OutRow]) -> dict[str, Any]:
        platform = self.cfg.file_platform
        preamble = [f"Parameters:TimeZone={self.cfg.timezone}"] if platform in ("google", "microsoft") else []
        return {"platform": platform, "preamble": preamble, "header": HEADERS[platform],
                "rows": [self._line(platform, r) for r in rows],
                "order_ids": [r.order_id for r in rows]}

    def render(self, payload: dict[str, Any]) -> str:
        buf = io.StringIO()
        for line in payload["preamble"]:
            buf.write(line + "\r\n")
        writer = csv.writer(buf, lineterminator="\r\n")
        writer.writerow(payload["header"])
        writer.writerows([inert(str(cell)) for cell in row] for row in payload["rows"])
        return buf.getvalue()

    def send(self, payload: dict[str, Any], rows: Sequence[OutRow]) -> list[RowResult]:
        if not self.cfg.output_dir:
            raise FatalDestinationError(f"config key destinations.{self.name}.output_dir: is "
                                        "required for csv_files (where the import files go)")
        out = Path(self._resolve(self.cfg.output_dir))
        out.mkdir(parents=True, exist_ok=True)
        stamp = self._clock().strftime("%Y%m%dT%H%M%SZ")
        n = len(list(out.glob(f"{self.name}-{stamp}-*.csv"))) + 1
        path = out / f"{self.name}-{stamp}-{n:03d}.csv"
        path.write_text(self.render(payload), encoding="utf-8", newline="")
        return [RowResult(r.order_id, "sent", "file", None, response={"file": path.name},
                          request_id=path.name) for r in rows]
