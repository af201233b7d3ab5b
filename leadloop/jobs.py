"""The jobs of one cycle, as plain functions over the store: sync, score, validate, export,
retrain, report. The CLI calls them once; the daemon calls them on a schedule.

Each run is recorded in `job_run` (start, end, outcome, counts, error) for `leadloop status`.
A `LeadloopError` inside a job fails that job cleanly (recorded, exit code 1 at the CLI); any
other exception is recorded too and re-raised, because it is a bug.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from leadloop.context import Context, JobResult
from leadloop.errors import LeadloopError
from leadloop.redact import redact_text
from leadloop.store import session_scope
from leadloop.tables import JobOutcome, JobRun, Lead

log = logging.getLogger("leadloop.jobs")

CYCLE = ("sync", "score", "validate", "export", "report")


def _record(ctx: Context, name: str, body: Callable[[Context], dict[str, Any]]) -> JobResult:
    with session_scope(ctx.engine) as session:
        run = JobRun(name=name, started_at=ctx.now())
        session.add(run)
        session.flush()
        run_id = run.id
    previous, ctx.job_run_id = ctx.job_run_id, run_id
    result = JobResult(name=name)
    outcome, error = JobOutcome.ok, None
    try:
        result.counts = body(ctx) or {}
        if ctx.stopping:
            outcome = JobOutcome.interrupted
    except LeadloopError as exc:
        outcome, error = JobOutcome.failed, exc.message + (f" ({exc.hint})" if exc.hint else "")
        result.ok, result.error = False, error
        log.error("job %s failed: %s", name, error)
    except BaseException as exc:
        outcome, error = JobOutcome.failed, f"internal error: {type(exc).__name__}: {exc}"
        _finish(ctx, run_id, outcome, result.counts, error)
        ctx.job_run_id = previous
        raise
    _finish(ctx, run_id, outcome, result.counts, error)
    ctx.job_run_id = previous
    log.info("job %s %s %s", name, outcome.value, result.counts, extra={"job": name,
             "counts": result.counts})
    return result


def _finish(ctx: Context, run_id: int | None, outcome: JobOutcome, counts: dict, error: str | None
            ) -> None:
    with session_scope(ctx.engine) as session:
        run = session.get(JobRun, run_id)
        if run is not None:
            run.finished_at, run.outcome, run.counts = ctx.now(), outcome, counts
            run.error = redact_text(error) if error else None  # status shows it; no secrets
            session.add(run)


# -- job bodies: each imports its area lazily so one area's heavy imports stay off the others --


def _sync(ctx: Context) -> dict[str, Any]:
    from leadloop.crm import build_source
    from leadloop.crm.base import sync_source

    return sync_source(ctx, build_source(ctx))


def _score(ctx: Context) -> dict[str, Any]:
    from leadloop.scoring.model import score_leads

    return score_leads(ctx)


def _retrain(ctx: Context) -> dict[str, Any]:
    from leadloop.scoring.model import train_and_register

    return train_and_register(ctx)


def _unchanged_since_last_ok(ctx: Context, name: str) -> bool:
    """True when no lead changed (sync bumps `lead.updated_at` for new data, stages and events)
    since the start of the last successful run of job `name`."""
    with session_scope(ctx.engine) as session:
        last_ok = session.execute(
            select(func.max(JobRun.started_at)).where(
                JobRun.name == name, JobRun.outcome == JobOutcome.ok)
        ).scalar_one()
        if last_ok is None:
            return False
        changed = session.execute(select(func.max(Lead.updated_at))).scalar_one()
    return changed is None or changed < last_ok


def _validate(ctx: Context) -> dict[str, Any]:
    from leadloop.validation import run_validation

    # The analysis reads only leads, their events and stages: same data, same answer.
    if _unchanged_since_last_ok(ctx, "validate"):
        return {"skipped": "no lead changed since the last validation"}
    return run_validation(ctx)


def _export(ctx: Context) -> dict[str, Any]:
    from leadloop.export import run_export

    return run_export(ctx)


def _report(ctx: Context) -> dict[str, Any]:
    from leadloop.report import write_reports

    out = ctx.out_dir or ctx.settings.resolve_path(ctx.settings.report.out_dir)
    paths = write_reports(ctx, Path(out))
    return {"files": [str(p) for p in paths]}


JOBS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "sync": _sync,
    "score": _score,
    "retrain": _retrain,
    "validate": _validate,
    "export": _export,
    "report": _report,
}


def run_job(ctx: Context, name: str) -> JobResult:
    return _record(ctx, name, JOBS[name])


def run_cycle(ctx: Context, names: tuple[str, ...] = CYCLE) -> list[JobResult]:
    """One full cycle in order. A failed sync does not stop the rest: scoring, validation and
    export still work on what the store already holds."""
    results = []
    for name in names:
        if ctx.stopping:
            break
        results.append(run_job(ctx, name))
    return results
