"""What a job's last output was computed from, so a run on the same inputs can be skipped.

Score, validate and report read the whole store; on a large store with nothing new they would
redo minutes of work to produce the same answer. Each of them records an `inputs` fingerprint in
its `job_run.counts`: a hash of the configuration it depends on and of the store's change marks.
A run whose fingerprint equals that of the job's last successful run is skipped; the fingerprint
includes leadloop's release, so an upgrade reruns each job once.

The marks are cheap (indexed maxima) and move on every write the jobs care about:
- `lead.updated_at` moves when the sync writes a lead that changed, adds or changes its stages or
  events, deletes, merges or erases it (`sync.py`, `erasure.py`);
- `score.scored_at` when a lead is (re)scored;
- `conversion.job_run_id` when the export writes an outbox row (every outbox write stamps its run);
- `validation_result.id` when a validation run stores its rows.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlmodel import col

from leadloop import __version__
from leadloop.tables import Conversion, JobOutcome, JobRun, Lead, Score, ValidationResult


def store_marks(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return {
            "leads": conn.execute(select(func.max(Lead.updated_at))).scalar_one(),
            "scores": conn.execute(select(func.max(Score.scored_at))).scalar_one(),
            "outbox": conn.execute(select(func.max(Conversion.job_run_id))).scalar_one(),
            "validation": conn.execute(select(func.max(ValidationResult.id))).scalar_one(),
        }


def fingerprint(*parts: Any) -> str:
    """A hash of `parts` and of leadloop's release: a new release recomputes what it may compute
    differently, even on an unchanged store."""
    text = json.dumps([__version__, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def last_ok_inputs(engine: Engine, job: str) -> str | None:
    """The `inputs` fingerprint of the last successful (not interrupted) run of `job`."""
    with engine.connect() as conn:
        counts = conn.execute(
            select(col(JobRun.counts)).where(col(JobRun.name) == job,
                                          col(JobRun.outcome) == JobOutcome.ok)
            .order_by(col(JobRun.id).desc()).limit(1)
        ).scalar_one_or_none()
    return (counts or {}).get("inputs")
