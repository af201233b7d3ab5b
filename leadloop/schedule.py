"""Schedules of the jobs: `[schedule]` entries as APScheduler triggers, when each job is next
due, and which jobs the daemon schedules on its own. Shared by the daemon and `leadloop status`
(which shows next runs without importing the daemon)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import func, select
from sqlmodel import col

from leadloop.config import Settings, parse_schedule
from leadloop.context import Context
from leadloop.errors import ConfigError
from leadloop.store import session_scope
from leadloop.tables import JobRun

_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _day(token: str) -> int:
    if token[:3] in _DAYS:
        return _DAYS.index(token[:3])
    day = int(token)
    if not 0 <= day <= 7:
        raise ValueError(f"day of week {token!r} is not 0-7")
    return day


def cron_day_of_week(field: str) -> str:
    """Translate a crontab day-of-week field into APScheduler 3's terms.

    In crontab 0 (and 7) is Sunday and 1 is Monday; APScheduler 3's `from_crontab` reads digits
    as 0 = Monday, so "0 3 * * 1" would run on Tuesdays. Expanding the field into day names
    ("mon,wed,fri") keeps the crontab meaning, ranges and steps included.
    """
    if field in ("*", "?"):
        return "*"
    days: set[int] = set()
    for part in field.lower().split(","):
        span, _, step = part.partition("/")
        if span in ("*", "?"):
            lo, hi = 0, 6
        elif "-" in span:
            first, last = span.split("-", 1)
            lo, hi = _day(first), _day(last)
        else:
            lo = _day(span)
            hi = 6 if step else lo
        if lo > hi:
            raise ValueError(f"day-of-week range {span!r} runs backwards")
        days.update(d % 7 for d in range(lo, hi + 1, int(step) if step else 1))
    return ",".join(_DAYS[d] for d in sorted(days))


def build_trigger(spec: str, key: str = "schedule") -> BaseTrigger:
    """An APScheduler trigger for an interval ("30s", "6h") or a 5-field crontab line, in UTC.

    Raises `ConfigError` naming `key` when the cron fields are out of range.
    """
    parsed = parse_schedule(spec)
    if isinstance(parsed, timedelta):
        return IntervalTrigger(seconds=parsed.total_seconds(), timezone=UTC)
    minute, hour, day, month, dow = parsed.split()
    try:
        return CronTrigger(minute=minute, hour=hour, day=day, month=month,
                           day_of_week=cron_day_of_week(dow), timezone=UTC)
    except ValueError as exc:
        raise ConfigError(key, f"{spec!r} is not a valid cron expression: {exc}") from None


def first_run_time(spec: str, last_started: datetime | None, now: datetime) -> datetime | None:
    """When a job is next due: for an interval, one interval after its last start (now if that is
    past or it never ran); for a cron, its next fire time from now."""
    parsed = parse_schedule(spec)
    if isinstance(parsed, timedelta):
        if last_started is None:
            return now
        return max(now, last_started + parsed)
    return build_trigger(spec).get_next_fire_time(None, now)


def scheduled_jobs(settings: Settings) -> dict[str, str]:
    """Job name -> schedule of the jobs the daemon schedules on their own (see module doc)."""
    jobs = settings.schedule.jobs()
    if "sync" in jobs and jobs.get("export") == jobs["sync"]:
        del jobs["export"]
    return jobs


def last_starts(ctx: Context) -> dict[str, datetime]:
    """The last recorded start of each job, from `job_run`."""
    with session_scope(ctx.engine) as session:
        rows = session.execute(
            select(col(JobRun.name), func.max(col(JobRun.started_at))).group_by(col(JobRun.name))
        ).all()
    return dict(rows)
