"""Contract harness for the CSV source: the "server" is an export file the harness rewrites.

Each mutation rewrites the whole file (to a temporary name, then renamed over it, as an export
job would) and stamps its modification time with the harness clock. Leads carry a creation time
column and one time column per stage ("MQL At", "SQL At", "Won At"): a stage is entered when its
column gets a time.

Not faked, because a file source cannot produce them: "incremental" (the source re-reads the
whole export on every sync, so a sync after 3 changes reads every row, not 3; upserts dedupe),
"delete" and "merge" (an export says neither that a row was deleted nor that two were merged:
a row missing from a new export may just be filtered out), and every HTTP fault and quota.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from tests.crm_harnesses import Faults, Harness

COLUMNS = ("Lead ID", "Created", "Email", "Phone", "Lead Source", "Company size")
STAGES = {"mql": "MQL At", "sql": "SQL At", "won": "Won At"}  # in funnel order


class CsvHarness(Harness):
    kind: ClassVar[str] = "csv"
    supports: ClassVar[frozenset[str]] = frozenset({"stage_history"})

    def __init__(self) -> None:
        super().__init__()
        self._dir: Path | None = None
        self.rows: dict[str, dict[str, str]] = {}
        self._next_id = 5001
        self._rotation = 0

    @property
    def path(self) -> Path:
        assert self._dir is not None, "start() the harness first"
        return self._dir / "leads_export.csv"

    def start(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="leadloop-csv-contract-"))
        self._write()  # the source refuses a missing file: start with an empty export

    def stop(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def settings_sections(self) -> dict[str, Any]:
        return {
            "crm": {"kind": "csv", "lead_stage_property": "stage",
                    "csv": {"path": str(self.path), "id_column": "Lead ID",
                            "created_column": "Created", "stage_columns": dict(STAGES)},
                    "properties": {"email": "Email", "phone": "Phone", "utm_source": "Lead Source"}},
            "stages": [{"name": "SQL", "crm_values": ["sql"], "field": "stage", "macro": True},
                       {"name": "Won", "crm_values": ["won"], "field": "stage", "value": 900.0}],
        }

    def _write(self) -> None:
        """Rewrite the export whole, atomically, with the harness clock as its mtime."""
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*COLUMNS, *STAGES.values()])
            writer.writeheader()
            writer.writerows(self.rows.values())
        stamp = self.clock.now().timestamp()
        os.utime(tmp, (stamp, stamp))
        os.replace(tmp, self.path)

    # -- the CRM's data ---------------------------------------------------------------------

    def seed(self, n: int) -> list[str]:
        now = self.clock.advance().isoformat()
        ids = []
        for _ in range(n):
            lid = str(self._next_id)
            self._next_id += 1
            self.rows[lid] = {"Lead ID": lid, "Created": now, "Email": f"lead{lid}@example.com",
                              "Phone": f"+1 202-555-{int(lid) % 10_000:04d}", "Lead Source": "google",
                              "Company size": "11-50", "MQL At": now, "SQL At": "", "Won At": ""}
            ids.append(lid)
        self._write()
        return ids

    def update(self, n: int) -> list[str]:
        self.clock.advance()
        live = list(self.rows)
        ids = [live[(self._rotation + j) % len(live)] for j in range(n)]
        self._rotation += n
        for lid in ids:
            self.rows[lid]["Company size"] = f"{51 + self._rotation}-200"
        self._write()
        return ids

    def delete(self, k: int) -> list[str]:
        raise NotImplementedError("a CSV export does not say which rows were deleted")

    def advance_stage(self, crm_id: str) -> tuple[str, str]:
        now = self.clock.advance().isoformat()
        row = self.rows[crm_id]
        stage = next((s for s, col in STAGES.items() if not row[col]), None)
        if stage is None:
            raise ValueError(f"lead {crm_id} is already at the last stage")
        row[STAGES[stage]] = now
        self._write()
        return "stage", stage

    def expected_leads(self) -> dict[str, str]:
        return dict.fromkeys(self.rows, "active")

    def expected_stages(self) -> set[tuple[str, str, str]]:
        return {(lid, "stage", s) for lid, row in self.rows.items()
                for s, col in STAGES.items() if row[col]}

    def inject_faults(self, faults: Faults) -> None:
        if faults != Faults():
            raise NotImplementedError("a CSV file has no HTTP faults or quota")


HARNESS = CsvHarness
