"""CSV source: any CRM export, read through the `[crm.csv]` column mapping.

One stream, "rows". The file is re-read whole on every sync (no cursor: upserts dedupe), in
chunks of `CHUNK_ROWS` rows, one `Page` per chunk, so a large export never sits in memory.
Rows are read with the stdlib `csv` reader because it knows each record's line number: a
malformed row (wrong field count, no id, an unparsable date) becomes a `RecordRejected`
naming `line N`, and the rest of the file goes on.

Mapping (see `config.CsvMapping`):
- `id_column` -> crm_id; `created_column` (+ `created_format`) -> created_at. Exports without a
  time column (time mode "snapshot", `Settings.snapshot_export`) get the file's modification
  time, marked `time_estimated`: it is only when we first learned of the lead, so a newer export
  (a later file time) does not move a stored one. The label and every flag stage or
  micro-conversion of such a lead carry the same stand-in time, also marked `time_estimated`.
- Stage facts are `StageIn(field="stage", value=<key>)`: each `stage_columns` key whose column
  holds a time (entered then) or a truthy flag (entered at created_at, a stand-in when that is),
  and the label column's name when its value is one of `positive_values`. `amount_column` is
  the deals' amount.
- `[crm.properties]` names the attribution columns (only columns present in the file are used);
  `[[micro_conversions]]` with `property` (a truthy or date column) or `expr` (a `leadloop.expr`
  condition over the chunk, numbers parsed) become `lead_event` rows.
- Every other column goes into `LeadIn.attributes`, except clear PII (e-mail, phone, names:
  hashed first when mapped, then dropped) and the stage/label/amount columns (outcomes).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import pandas as pd

from leadloop.config import CsvMapping
from leadloop.context import Context
from leadloop.crm.base import (
    ATTRIBUTION_FIELDS,
    Cursor,
    EventIn,
    LeadIn,
    Page,
    StageIn,
    StoredIds,
    no_stored_ids,
)
from leadloop.csvio import detect_delimiter, detect_encoding, read_csv, undecodable
from leadloop.errors import ConfigError, RecordRejected
from leadloop.expr import ExpressionError
from leadloop.expr import parse as parse_expression

log = logging.getLogger(__name__)

CHUNK_ROWS = 5000
STAGE_FIELD = "stage"
_TRUTHY = frozenset({"1", "1.0", "yes", "y", "true", "t", "x", "on"})
_PII_COLUMNS = frozenset({"email", "e-mail", "email address", "phone", "phone number", "mobile",
                          "mobilephone", "mobile phone", "name", "full name", "first name",
                          "last name", "firstname", "lastname", "first_name", "last_name"})


class CsvSource:
    """`CrmSource` over a CSV export (see module docstring)."""

    def __init__(self, ctx: Context) -> None:
        crm = ctx.settings.crm
        if crm.csv is None:
            raise ConfigError("crm.csv", "is required for kind = 'csv'")
        self.ctx = ctx
        self.name = crm.source_name
        self.mapping: CsvMapping = crm.csv
        self.path = ctx.settings.resolve_path(self.mapping.path)
        if not self.path.is_file():
            raise ConfigError("crm.csv.path", f"file not found: {self.path}")
        self.encoding = self.mapping.encoding or detect_encoding(self.path)
        self.delimiter = self.mapping.delimiter or detect_delimiter(self.path, self.encoding)
        self.missing = set(self.mapping.missing_values)
        self.positive = {v.strip().lower() for v in self.mapping.positive_values}
        self.micro = ctx.settings.micro_conversions
        self.explicit_props = crm.properties.model_fields_set
        self.properties = crm.properties
        self.joined = self._read_join()

    needs_stored_ids = ()

    def streams(self) -> Sequence[str]:
        return ("rows",)

    # -- reading ----------------------------------------------------------------------------

    def _read_join(self) -> dict[str, dict[str, str]]:
        join = self.mapping.join
        if join is None:
            return {}
        path = self.ctx.settings.resolve_path(join.path)
        frame = read_csv(path, missing=list(self.missing))
        if join.on not in frame.columns:
            raise ConfigError("crm.csv.join.on", f"column {join.on!r} is not in {path.name}")
        cols = join.columns or [c for c in frame.columns if c != join.on]
        unknown = [c for c in cols if c not in frame.columns]
        if unknown:
            raise ConfigError("crm.csv.join.columns", f"not in {path.name}: {unknown}")
        frame = frame.drop_duplicates(join.on, keep="last").set_index(join.on)[cols]
        return {str(k): {c: v for c, v in row.items() if isinstance(v, str)}
                for k, row in frame.iterrows()}

    def _check_header(self, header: list[str]) -> None:
        m = self.mapping
        needed = {"crm.csv.id_column": m.id_column, "crm.csv.created_column": m.created_column,
                  "crm.csv.label_column": m.label_column, "crm.csv.amount_column": m.amount_column}
        needed.update({f"crm.csv.stage_columns.{k}": v for k, v in m.stage_columns.items()})
        for key in (*ATTRIBUTION_FIELDS, "email", "phone"):
            if key in self.explicit_props and getattr(self.properties, key):
                needed[f"crm.properties.{key}"] = getattr(self.properties, key)
        for i, mc in enumerate(self.micro):
            if mc.property:
                needed[f"micro_conversions[{i}].property"] = mc.property
        available = set(header) | {c for row in list(self.joined.values())[:1] for c in row}
        if self.mapping.join is not None:
            available |= set(self.mapping.join.columns)
        for key, col in needed.items():
            if col and col not in available:
                raise ConfigError(key, f"column {col!r} is not in {self.path.name}")

    def _rows(self) -> Iterator[tuple[int, dict[str, str] | None, str | None]]:
        """(line number, row or None, problem) for every record of the file."""
        # A byte the encoding refuses (the sample that chose it ends after 1 MB) becomes an
        # escape, and costs only its record.
        with self.path.open(encoding=self.encoding, errors="surrogateescape", newline="") as f:
            reader = csv.reader(f, delimiter=self.delimiter)
            try:
                header = next(reader)
            except StopIteration:
                return
            header = [h.strip() for h in header]
            self._check_header(header)
            while True:
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    yield reader.line_num, None, f"unreadable CSV record: {exc}"
                    continue
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue  # blank line
                if len(fields) != len(header):
                    yield (reader.line_num, None,
                           f"expected {len(header)} fields, found {len(fields)}")
                    continue
                bad = [h for h, v in zip(header, fields, strict=True) if undecodable(v)]
                if bad:
                    yield (reader.line_num, None, f"bytes that are not valid {self.encoding} "
                           f"in column {bad[0]!r}")
                    continue
                yield reader.line_num, dict(zip(header, fields, strict=True)), None

    def fetch(self, stream: str, since: Cursor | None, *, started_at: datetime,
              stored_ids: StoredIds = no_stored_ids) -> Iterator[Page]:
        if stream != "rows":
            raise ValueError(f"unknown CSV stream {stream!r}")
        file_time = datetime.fromtimestamp(self.path.stat().st_mtime, UTC)
        chunk: list[tuple[int, dict[str, str]]] = []
        page = Page()
        for line, row, problem in self._rows():
            if row is None:
                page.rejects.append(RecordRejected(f"line {line}", problem or "malformed row"))
                continue
            chunk.append((line, row))
            if len(chunk) >= CHUNK_ROWS:
                yield self._page(chunk, page, file_time)
                chunk, page = [], Page()
        if chunk or page.rejects:
            yield self._page(chunk, page, file_time)

    # -- mapping ----------------------------------------------------------------------------

    def _clean(self, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        return None if value in self.missing or value == "" else value

    def _page(self, chunk: list[tuple[int, dict[str, str]]], page: Page, file_time: datetime) -> Page:
        joined_rows = []
        for line, row in chunk:
            rid = self._clean(row.get(self.mapping.id_column))
            extra = self.joined.get(rid or "", {})
            joined_rows.append((line, {**row, **extra}))
        frame = self._frame([r for _, r in joined_rows])
        expr_hits = self._expr_hits(frame)
        for idx, (line, row) in enumerate(joined_rows):
            try:
                lead, stages, events = self.normalise(row, file_time, line)
            except RecordRejected as exc:
                page.rejects.append(exc)
                continue
            page.rejects.extend(_stages_before_creation(lead, stages, line))
            for name, hits in expr_hits.items():
                if hits[idx]:
                    events.append(EventIn(lead.crm_id, name, lead.created_at,
                                          time_estimated=lead.time_estimated))
            page.leads.append(lead)
            page.stages.extend(stages)
            page.events.extend(events)
        return page

    def _frame(self, rows: list[dict[str, str]]) -> pd.DataFrame:
        """The chunk as a DataFrame for `expr` micro-conversions: missing markers -> NaN,
        numeric columns as numbers."""
        frame = pd.DataFrame(rows, dtype=object)
        if frame.empty or not any(m.expr for m in self.micro):
            return frame
        frame = frame.apply(lambda col: col.map(self._clean))
        for col in frame.columns:
            numbers = pd.to_numeric(frame[col], errors="coerce")
            if numbers.notna().sum() == frame[col].notna().sum():
                frame[col] = numbers
        return frame

    def _expr_hits(self, frame: pd.DataFrame) -> dict[str, list[bool]]:
        out: dict[str, list[bool]] = {}
        for i, mc in enumerate(self.micro):
            if not mc.expr or frame.empty:
                continue
            try:
                mask = parse_expression(mc.expr).evaluate(frame)
            except ExpressionError as exc:
                raise ConfigError(f"micro_conversions[{i}].expr", str(exc)) from None
            out[mc.name] = mask.tolist()
        return out

    def _time(self, value: str, fmt: str | None) -> datetime:
        parsed = datetime.strptime(value, fmt) if fmt else datetime.fromisoformat(value)
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)

    def _column(self, key: str) -> str | None:
        name = getattr(self.properties, key)
        return name or None

    def normalise(self, row: dict[str, str], file_time: datetime, line: int
                  ) -> tuple[LeadIn, list[StageIn], list[EventIn]]:
        """One joined row -> lead, stage facts, events. Pure; raises RecordRejected."""
        m = self.mapping
        ref = f"line {line}"
        crm_id = self._clean(row.get(m.id_column))
        if not crm_id:
            raise RecordRejected(ref, f"no value in id column {m.id_column!r}", _public(row))
        created = file_time
        if m.created_column:
            raw_created = self._clean(row.get(m.created_column))
            if raw_created is None:
                raise RecordRejected(ref, f"lead {crm_id}: no value in {m.created_column!r}",
                                     _public(row))
            try:
                created = self._time(raw_created, m.created_format)
            except ValueError:
                raise RecordRejected(ref, f"lead {crm_id}: {m.created_column!r} value "
                                     f"{raw_created!r} is not a date", _public(row)) from None
        estimated = not m.created_column  # the file time stands in for the creation time
        lead = LeadIn(crm_id=crm_id, created_at=created, updated_at=None, object_type="row",
                      time_estimated=estimated)
        used = {m.id_column, m.created_column, m.label_column, m.amount_column,
                *m.stage_columns.values()}
        for key in ("email", "phone", *ATTRIBUTION_FIELDS):
            col = self._column(key)
            if col and col in row:
                used.add(col)
                setattr(lead, key, self._clean(row[col]))
        amount = None
        if m.amount_column:
            raw_amount = self._clean(row.get(m.amount_column))
            try:
                amount = Decimal(raw_amount) if raw_amount else None
            except InvalidOperation:
                raise RecordRejected(ref, f"lead {crm_id}: amount {raw_amount!r} is not a number",
                                     _public(row)) from None
        stages: list[StageIn] = []
        for stage, col in m.stage_columns.items():
            value = self._clean(row.get(col))
            if value is None or value.lower() in ("0", "0.0", "no", "n", "false", "f"):
                continue
            if value.lower() in _TRUTHY:
                when, when_estimated = created, estimated
            else:
                when_estimated = False
                try:
                    when = self._time(value, None)
                except ValueError:
                    raise RecordRejected(ref, f"lead {crm_id}: stage column {col!r} holds "
                                         f"{value!r}, neither a date nor a flag", _public(row)) from None
            stages.append(StageIn(crm_id, STAGE_FIELD, stage, when, amount=amount,
                                  time_estimated=when_estimated))
            lead.current_stage = stage
        if m.label_column:
            label = (self._clean(row.get(m.label_column)) or "").lower()
            if label in self.positive:
                stages.append(StageIn(crm_id, STAGE_FIELD, m.label_column, created, amount=amount,
                                      time_estimated=estimated))
                lead.current_stage = lead.current_stage or m.label_column
        events = []
        for mc in self.micro:
            if not mc.property:
                continue
            value = self._clean(row.get(mc.property))
            if value is None or value.lower() in ("0", "0.0", "no", "n", "false", "f"):
                continue
            if value.lower() in _TRUTHY:
                events.append(EventIn(crm_id, mc.name, created, time_estimated=estimated))
                continue
            try:
                events.append(EventIn(crm_id, mc.name, self._time(value, None)))
            except ValueError:
                raise RecordRejected(ref, f"lead {crm_id}: micro-conversion column "
                                     f"{mc.property!r} holds {value!r}, neither a date nor a "
                                     "flag", _public(row)) from None
        lead.attributes = {
            k: v for k, raw in row.items()
            if k not in used and k.strip().lower() not in _PII_COLUMNS
            and (v := self._clean(raw)) is not None
        }
        return lead, stages, events


def _stages_before_creation(lead: LeadIn, stages: list[StageIn], line: int) -> list[RecordRejected]:
    """Flags each dated stage entered before its lead was created. The lead and the stage are
    kept (the export holds the conversion as `before_lead_created`); the rejected_record row says
    why, so the inconsistency is reported rather than silently learned from."""
    return [
        RecordRejected(f"line {line}", f"lead {lead.crm_id}: stage {s.value!r} entered "
                       f"{s.entered_at.isoformat()}, before the lead was created "
                       f"({lead.created_at.isoformat()}); kept, flagged as inconsistent (the export "
                       "holds it, and it is no evidence for the model)",
                       {"lead": lead.crm_id, "stage": s.value})
        for s in stages if not s.time_estimated and s.entered_at < lead.created_at
    ]


def _public(row: dict[str, str]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k.strip().lower() not in _PII_COLUMNS}



SOURCE = CsvSource
