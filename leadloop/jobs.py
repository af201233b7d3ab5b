"""The jobs of one cycle, as plain functions over the store: sync, score, validate, export,
retrain, report. The CLI calls them once; the daemon calls them on a schedule.

Each run is recorded in `job_run` (start, end, outcome, counts, error) for `leadloop status`.
A `LeadloopError` inside a job fails that job cleanly (recorded, exit code 1 at the CLI); any
other exception is recorded too and re-raised, because it is a bug.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

from sqlmodel import select

from leadloop.context import Context, JobResult
from leadloop.errors import LeadloopError
from leadloop.memory import release_freed_memory
from leadloop.processes import gone_on_this_host
from leadloop.redact import redact_text
from leadloop.store import session_scope
from leadloop.tables import JobOutcome, JobRun

log = logging.getLogger("leadloop.jobs")

CYCLE = ("sync", "score", "validate", "export", "report")


def record_run(ctx: Context, name: str, body: Callable[[Context], dict[str, Any]]) -> JobResult:
    """Run `body` as job `name`, recorded in `job_run` (`run_job` for the jobs by name)."""
    mark_interrupted(ctx, name)
    with session_scope(ctx.engine) as session:
        run = JobRun(name=name, started_at=ctx.now(), counts={RUNNER_KEY: this_runner()})
        session.add(run)
        session.flush()
        run_id = run.id
    previous, ctx.job_run_id = ctx.job_run_id, run_id
    result = JobResult(name=name)
    outcome, error = JobOutcome.ok, None
    try:
        result.counts = body(ctx) or {}
        if ctx.out_dir and name in WRITES_FILES:  # `leadloop forget` erases there too
            result.counts.setdefault(OUT_DIR_KEY, str(Path(ctx.out_dir).resolve()))
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
    finally:
        release_freed_memory()  # a daemon should not idle on the last job's peak
    _finish(ctx, run_id, outcome, result.counts, error)
    ctx.job_run_id = previous
    log.info("job %s %s %s", name, outcome.value, result.counts, extra={"job": name,
             "counts": result.counts})
    return result


WRITES_FILES = ("export", "report")  # jobs that write lead data to a folder given at run time
OUT_DIR_KEY = "out_dir"  # counts of a run that wrote files to a folder given at run time
RUNNER_KEY = "runner"  # counts of a running job_run: "host:pid" of the process running it


def this_runner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def runner_gone(runner: str | None) -> bool | None:
    """Whether the process that recorded a running job_run has ended: True or False when it
    ran on this host, None when that cannot be told from here (another host, no runner)."""
    host, _, pid = (runner or "").rpartition(":")
    return gone_on_this_host(host, pid)


def mark_interrupted(ctx: Context, name: str) -> int:
    """Record as interrupted the runs of job `name` still marked running whose process on this
    host has ended (SIGKILL, OOM, power loss): they will never record an outcome themselves.
    Runs of other jobs stay as they are until their own next run: `status` reports them."""
    with session_scope(ctx.engine) as session:
        stale = [run for run in session.exec(select(JobRun).where(
            JobRun.name == name, JobRun.outcome == JobOutcome.running)).all()
            if runner_gone((run.counts or {}).get(RUNNER_KEY))]
        for run in stale:
            run.outcome = JobOutcome.interrupted
            run.error = (f"interrupted: the process {run.counts[RUNNER_KEY]} ended without "
                         "recording an outcome (killed or crashed)")
            session.add(run)
    return len(stale)


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
    from leadloop.crm.stage_check import unmatched_crm_values
    from leadloop.sync import sync_source

    counts: dict[str, Any] = dict(sync_source(ctx, build_source(ctx)))
    if ctx.settings.snapshot_export:
        counts["time_mode"] = "snapshot"  # no creation times: see Settings.snapshot_export
    notes = unmatched_crm_values(ctx.engine, ctx.settings)
    if counts.get("rejected"):
        notes.append(_rejected_note(ctx, counts["rejected"]))
    return _with_notes(counts, "sync", notes)


def _with_notes(counts: dict[str, Any], job: str, notes: list[str]) -> dict[str, Any]:
    """Notes are logged as warnings and kept in the run's counts (the CLI prints them)."""
    for note in notes:
        log.warning("%s: %s", job, note, extra={"job": job})
    return {**counts, "notes": notes} if notes else counts


def _rejected_note(ctx: Context, n: int, shown: int = 3) -> str:
    """The first few records this sync rejected or flagged, with their reasons."""
    from sqlmodel import select

    from leadloop.tables import RejectedRecord

    with session_scope(ctx.engine) as session:
        first = session.exec(select(RejectedRecord).where(
            RejectedRecord.job_run_id == ctx.job_run_id).order_by(
            RejectedRecord.id).limit(shown)).all()  # type: ignore[arg-type]
        examples = "; ".join(f"{r.record_ref}: {r.reason}" for r in first)
    return (f"{n} record(s) rejected or flagged, each kept in the rejected_record table with its "
            f"reason" + (f", e.g. {examples}" if examples else ""))


def _score(ctx: Context) -> dict[str, Any]:
    from leadloop.freshness import fingerprint, last_ok_inputs, store_marks
    from leadloop.scoring.registry import current_card

    # A lead's score depends on its own data, its landmark age and the model: same leads, same
    # day, same model, same scores.
    leads = [store_marks(ctx.engine)["leads"], ctx.now().date().isoformat()]
    card = current_card(ctx.settings)
    if card is not None and card.chosen:
        inputs = fingerprint(card.version, leads)
        if inputs == last_ok_inputs(ctx.engine, "score"):
            return {"skipped": "no lead changed since the last scoring with this model",
                    "model_version": card.version, "inputs": inputs}
    from leadloop.scoring.model import score_leads  # scikit-learn: only when there is work

    counts = score_leads(ctx)
    if counts.get("model_version"):
        counts["inputs"] = fingerprint(counts["model_version"], leads)
    return counts


def _retrain(ctx: Context) -> dict[str, Any]:
    from leadloop.scoring.model import train_and_register

    return train_and_register(ctx)


def _validate(ctx: Context) -> dict[str, Any]:
    from leadloop.freshness import fingerprint, last_ok_inputs, store_marks

    # The analysis reads only leads, their events and stages, under this configuration. Which
    # leads are decided (past their horizon) moves with the calendar: re-run at least daily.
    s = ctx.settings
    inputs = fingerprint(
        [m.model_dump(mode="json") for m in s.micro_conversions],
        [st.model_dump(mode="json") for st in s.stages],
        s.validation.model_dump(mode="json"), s.model.horizon_days,
        ctx.now().date().isoformat(), store_marks(ctx.engine)["leads"])
    if inputs == last_ok_inputs(ctx.engine, "validate"):
        return {"skipped": "no lead changed since the last validation", "inputs": inputs}
    from leadloop.validation import run_validation  # scipy: only when there is work

    counts = run_validation(ctx)
    notes = counts.pop("notes", [])
    return _with_notes({**counts, "inputs": inputs}, "validate", notes)


def export_under_lease(ctx: Context) -> dict[str, Any]:
    """`run_export` holding the outbox lease, so that `forget` never erases a person while a
    batch or payload file with their hashes is in flight (see `leadloop.lease`)."""
    from leadloop.export.engine import run_export
    from leadloop.lease import outbox_lease

    ttl = timedelta(seconds=ctx.settings.schedule.lease_seconds)
    with outbox_lease(ctx.engine, "export", ttl=ttl, now=ctx.now, stop=ctx.stop) as owner:
        if owner is None:
            return {"skipped": "stopped while waiting for `forget` to finish"}
        return run_export(ctx)


def _export(ctx: Context) -> dict[str, Any]:
    enabled = [n for n, d in ctx.settings.destinations.items() if d.enabled]
    if not enabled:
        why = ("every [destinations.<name>] section has enabled = false"
               if ctx.settings.destinations else "the config has no [destinations.<name>] section")
        return {"skipped": f"no destination to export to: {why} (see config/leadloop.example.toml; "
                           "kind = \"csv_files\" writes manual-import files)"}
    counts = export_under_lease(ctx)
    per_destination = cast(dict[str, dict[str, Any]], counts.get("destinations", {}))
    # Only when every conversion is held: a dry run sends nothing either, but writes the due
    # ones to payload files, and rows the platform refused are counted as rejected.
    notes = [_nothing_sent_note(name, per) for name, per in per_destination.items()
             if not per.get("due") and per.get("held") and "error" not in per]
    return _with_notes(counts, "export", notes)


def _nothing_sent_note(destination: str, per: dict[str, Any]) -> str:
    """Why a destination received nothing: every conversion is held by a platform rule."""
    return (f"{destination}: nothing uploaded this run; {per['held']} conversion(s) held by "
            "platform rules (upload_holds.csv in the report counts each rule; `no_click_id`: the "
            "CRM data has no click id, e-mail or phone this platform can match)")


def _report(ctx: Context) -> dict[str, Any]:
    from leadloop.freshness import fingerprint, last_ok_inputs, store_marks
    from leadloop.report import REPORT_FILES, write_reports
    from leadloop.scoring.registry import current_card

    out = Path(ctx.out_dir or ctx.settings.resolve_path(ctx.settings.report.out_dir))
    card = current_card(ctx.settings)
    inputs = fingerprint(ctx.settings.model_dump(mode="json"), store_marks(ctx.engine),
                         card.version if card else None, str(out.resolve()))
    if inputs == last_ok_inputs(ctx.engine, "report") and all(
            (out / name).exists() for name in REPORT_FILES):
        return {"skipped": "nothing the report shows changed since it was written",
                "inputs": inputs}
    paths = write_reports(ctx, out)
    return {"files": [str(p) for p in paths], "inputs": inputs}


JOBS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "sync": _sync,
    "score": _score,
    "retrain": _retrain,
    "validate": _validate,
    "export": _export,
    "report": _report,
}


def run_job(ctx: Context, name: str) -> JobResult:
    return record_run(ctx, name, JOBS[name])


def run_cycle(ctx: Context, names: tuple[str, ...] = CYCLE) -> list[JobResult]:
    """One full cycle in order. A failed sync does not stop the rest: scoring, validation and
    export still work on what the store already holds."""
    results = []
    for name in names:
        if ctx.stopping:
            break
        results.append(run_job(ctx, name))
    return results
