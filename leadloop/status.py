"""`leadloop status`: what the daemon did, what it will do next, and what the outbox holds.

`collect_status` returns plain JSON-able data (for `--json` and monitors), shaped by the
`StatusReport` TypedDict (its keys are the `--json` contract); `format_status` renders it for
people. `failed_jobs` lists the jobs whose *last* run failed; the CLI exits 1
when it is not empty, so a monitor can alert on the exit code alone.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, TypedDict

from sqlalchemy import func, select
from sqlmodel import col

from leadloop import lease
from leadloop.context import Context
from leadloop.jobs import JOBS, RUNNER_KEY, runner_gone
from leadloop.schedule import first_run_time, last_starts, scheduled_jobs
from leadloop.store import session_scope
from leadloop.tables import Conversion, ConversionStatus, JobOutcome, JobRun

STATUSES = [s.value for s in ConversionStatus]


class LastRun(TypedDict):
    started_at: str | None
    finished_at: str | None
    seconds: float | None
    outcome: str  # a JobOutcome value
    counts: dict[str, Any]  # the job's own counts, as it recorded them
    error: str | None


class JobStatus(TypedDict):
    schedule: str | None
    next_run: str | None
    last_run: LastRun | None


class DaemonStatus(TypedDict):
    owner: str
    live: bool
    acquired_at: str | None
    heartbeat_at: str | None
    expires_at: str | None


class DestinationAlert(TypedDict):
    destination: str
    level: Literal["paused", "warning"]  # "paused": `status` exits 1
    code: str
    message: str


class StatusReport(TypedDict):
    """What `leadloop status --json` prints (times as ISO-8601 UTC with a Z)."""

    generated_at: str | None
    daemon: DaemonStatus | None
    jobs: dict[str, JobStatus]
    conversions: dict[str, dict[str, int]]  # destination -> conversion status -> rows
    destination_alerts: list[DestinationAlert]
    failed_jobs: list[str]  # jobs whose last run failed
    interrupted_jobs: list[str]  # jobs whose last run was killed or crashed


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds").replace("+00:00", "Z") if value else None


def _last_runs(ctx: Context) -> dict[str, JobRun]:
    with session_scope(ctx.engine) as session:
        latest = select(func.max(JobRun.id)).group_by(JobRun.name).scalar_subquery()
        runs = session.execute(select(JobRun).where(JobRun.id.in_(latest))).scalars()  # type: ignore[union-attr]
        return {run.name: run for run in runs}


def _conversions(ctx: Context) -> dict[str, dict[str, int]]:
    out = {name: dict.fromkeys(STATUSES, 0) for name in ctx.settings.destinations}
    with session_scope(ctx.engine) as session:
        rows = session.execute(
            select(col(Conversion.destination), col(Conversion.status), func.count())
            .group_by(Conversion.destination, Conversion.status)
        ).all()
    for destination, status, n in rows:
        out.setdefault(destination, dict.fromkeys(STATUSES, 0))[str(status.value)] = n
    return out


def collect_status(ctx: Context) -> StatusReport:
    """Last run and next run of each job, conversions per destination and status, the lease."""
    now = ctx.now()
    runs = _last_runs(ctx)
    starts = last_starts(ctx)
    schedule = ctx.settings.schedule.jobs()
    own = scheduled_jobs(ctx.settings)
    info = lease.holder(ctx.engine)
    crashed = {name: why for name, run in runs.items() if (why := interrupted_reason(run, info, now))}
    jobs: dict[str, JobStatus] = {}
    for name in [*JOBS, *sorted(set(runs) - set(JOBS))]:
        run = runs.get(name)
        spec = schedule.get(name)
        next_run = first_run_time(own[name], starts.get(name), now) if name in own else None
        if name == "export" and "sync" in schedule:  # chained after each sync (see daemon.py)
            sync_next = first_run_time(schedule["sync"], starts.get("sync"), now)
            next_run = min(filter(None, [next_run, sync_next]))
        jobs[name] = {
            "schedule": spec,
            "next_run": _iso(next_run),
            "last_run": None if run is None else {
                "started_at": _iso(run.started_at),
                "finished_at": _iso(run.finished_at),
                "seconds": round((run.finished_at - run.started_at).total_seconds(), 3)
                if run.finished_at else None,
                "outcome": "interrupted" if name in crashed else run.outcome.value,
                "counts": run.counts,
                "error": crashed.get(name, run.error),
            },
        }
    return {
        "generated_at": _iso(now),
        "daemon": None if info is None else {
            "owner": info.owner,
            "live": not info.expired(now),
            "acquired_at": _iso(info.acquired_at),
            "heartbeat_at": _iso(info.heartbeat_at),
            "expires_at": _iso(info.expires_at),
        },
        "jobs": jobs,
        "conversions": _conversions(ctx),
        "destination_alerts": destination_alerts(ctx),
        "failed_jobs": sorted(n for n, r in runs.items() if r.outcome == JobOutcome.failed),
        "interrupted_jobs": sorted(crashed),
    }


def interrupted_reason(run: JobRun, info: lease.LeaseInfo | None, now: datetime) -> str | None:
    """Why a run still marked running is not running any more (killed, crashed), or None.

    The run records the host and pid that runs it: on this host the pid tells; a daemon's
    runs elsewhere end with its lease; a run without a runner (an older version) is stale when
    no daemon holds the lease."""
    if run.outcome != JobOutcome.running:
        return None
    runner = (run.counts or {}).get(RUNNER_KEY)
    gone = runner_gone(runner)
    daemon_live = info is not None and not info.expired(now)
    if gone:
        return f"interrupted: the process {runner} ended without recording an outcome"
    if gone is None and not runner and not daemon_live:
        return "interrupted: still marked running, and no daemon holds the lease"
    if (gone is None and runner and info is not None and info.expired(now)
            and info.owner.startswith(f"{runner}:")):
        return f"interrupted: the daemon {info.owner} stopped renewing its lease"
    return None


def _counts_text(counts: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items() if not isinstance(v, list | dict))


def format_status(data: StatusReport) -> str:
    """A readable summary of `collect_status` output."""
    lines = [f"leadloop status at {data['generated_at']}"]
    d = data["daemon"]
    if d is None:
        lines.append("daemon:  not running (no lease was ever taken)")
    elif d["live"]:
        lines.append(f"daemon:  running as {d['owner']} (since {d['acquired_at']}, "
                     f"heartbeat {d['heartbeat_at']})")
    else:
        lines.append(f"daemon:  not running (lease of {d['owner']} expired {d['expires_at']})")
    lines += ["", f"{'job':<9} {'schedule':<12} {'last start':<21} {'secs':>7}  {'outcome':<11} "
              f"{'next run':<21} counts"]
    for name, job in data["jobs"].items():
        run = job["last_run"]
        secs = run["seconds"] if run else None
        started = (run["started_at"] if run else None) or "never"
        lines.append(
            f"{name:<9} {job['schedule'] or '-':<12} {started:<21} "
            f"{'' if secs is None else f'{secs:.1f}':>7}  {run['outcome'] if run else '-':<11} "
            f"{job['next_run'] or '-':<21} {_counts_text((run['counts'] if run else None) or {})}"
            .rstrip()
        )
        if run and run["error"]:
            lines.append(f"{'':<9} error: {run['error']}")
    lines.append("")
    if data["conversions"]:
        lines.append(f"{'conversions':<20}" + "".join(f"{s:>10}" for s in STATUSES))
        for dest, by_status in data["conversions"].items():
            lines.append(f"{dest:<20}" + "".join(f"{by_status[s]:>10}" for s in STATUSES))
    else:
        lines.append("conversions: no destinations configured")
    for alert in data.get("destination_alerts") or []:
        lines.append(f"{alert['level'].upper()} {alert['destination']}: {alert['message']}")
    if data["failed_jobs"]:
        lines += ["", f"FAILED (last run): {', '.join(data['failed_jobs'])}"]
    if data.get("interrupted_jobs"):
        lines += ["", f"INTERRUPTED (last run killed or crashed): {', '.join(data['interrupted_jobs'])}"]
    return "\n".join(lines)


TOKEN_WARN_DAYS = 14


def destination_alerts(ctx: Context) -> list[DestinationAlert]:
    """What needs a person, per destination: a pause by the platform (level "paused", with the
    fix in one sentence; `status` exits 1), a LinkedIn-Version within 60 days of its sunset, and
    credentials within 14 days of their known expiry (level "warning")."""
    from leadloop.export.engine import destination_states
    from leadloop.export.registry import DESTINATIONS

    now = ctx.now()
    per = destination_states(ctx)
    alerts: list[DestinationAlert] = []
    for name, cfg in ctx.settings.destinations.items():
        if not cfg.enabled:
            continue
        paused = (per.get(name) or {}).get("paused")
        if paused:
            alerts.append({"destination": name, "level": "paused", "code": paused["code"],
                           "message": f"paused by the platform ({paused['code']}): {paused['fix']}; "
                                      "its conversions stay due and the next run retries"})
        alerts += [{"destination": name, "level": "warning", "code": code, "message": message}
                   for code, message in DESTINATIONS[cfg.kind].setup_warnings(name, cfg, now.date())]
        expiries = [(cfg.token_expires_on, "token_expires_on")]
        known = (per.get(name) or {}).get("refresh_token_expires_at")
        if known:
            expiries.append((datetime.fromisoformat(known).date(), "the refresh token"))
        for when, what in expiries:
            if when is not None and (when - now.date()).days <= TOKEN_WARN_DAYS:
                alerts.append({"destination": name, "level": "warning", "code": "TOKEN_EXPIRY",
                               "message": f"credentials expire on {when.isoformat()} ({what}): renew "
                                          f"them before then"})
    return alerts
