"""The single-instance lease: one daemon per database.

One row in `daemon_lease` (name "daemon") says who runs the schedule. Taking it is a single
`INSERT ... ON CONFLICT (name) DO UPDATE ... WHERE <expired or ours> RETURNING owner`, which both
SQLite (3.35+) and PostgreSQL execute atomically: of two daemons racing for a free or expired
lease exactly one gets a row back. The holder renews the expiry with a heartbeat; a holder that
crashed stops renewing, and once `expires_at` has passed anyone may take the lease over.

One sender at a time: every command that writes the outbox or talks to an ad platform outside the
daemon (`export`, `run --once`) holds the same lease for its duration (`exclusive`), renewing it
from a heartbeat thread, so it never runs beside the daemon or another such command. Without
`--wait` it refuses at once and says who holds the lease; with `--wait` it waits for it. A
holder on the same host whose process is gone (killed with SIGKILL) is taken over at once instead
of waiting for its lease to expire; one on the same host whose process is alive is never taken
over, even once its lease has expired (on SQLite a long write, such as a first export's build,
keeps its heartbeat from writing while it works).

A second, shorter lease (name "outbox") is held for the duration of each export, wherever it runs
(the daemon's job, `export`, `export --dry-run`, `run --once`), and by `forget`, which waits for
it: an erasure never lands while a batch holding that person's hashes is in flight or while a
payload file is being written after the erasure rewrote the folder.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from leadloop.errors import LeaseHeldError
from leadloop.processes import gone_on_this_host
from leadloop.store import insert_for, session_scope
from leadloop.tables import DaemonLease

LEASE_NAME = "daemon"
OUTBOX_LEASE = "outbox"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseInfo:
    owner: str
    acquired_at: datetime
    heartbeat_at: datetime
    expires_at: datetime

    def expired(self, now: datetime) -> bool:
        return self.expires_at <= now

    def describe(self, now: datetime) -> str:
        state = "expired" if self.expired(now) else "held"
        return (
            f"{self.owner} ({state}; since {self.acquired_at:%Y-%m-%d %H:%M:%S}Z, last heartbeat "
            f"{(now - self.heartbeat_at).total_seconds():.0f}s ago, expires "
            f"{self.expires_at:%Y-%m-%d %H:%M:%S}Z)"
        )


def make_owner() -> str:
    """A name that tells an operator where the holder runs: host, pid and a random tag."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def acquire(engine: Engine, owner: str, ttl: timedelta, now: datetime,
            name: str = LEASE_NAME) -> bool:
    """Take the lease if it is free, expired or already ours. Atomic on SQLite and PostgreSQL."""
    table = DaemonLease.__table__  # type: ignore[attr-defined]
    expires = now + ttl
    with session_scope(engine) as session:
        stmt = insert_for(session, table).values(
            name=name, owner=owner, acquired_at=now, heartbeat_at=now, expires_at=expires
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["name"],
            set_={
                "owner": stmt.excluded.owner,
                "acquired_at": stmt.excluded.acquired_at,
                "heartbeat_at": stmt.excluded.heartbeat_at,
                "expires_at": stmt.excluded.expires_at,
            },
            where=(table.c.expires_at <= now) | (table.c.owner == owner),
        ).returning(table.c.owner)
        won = session.execute(stmt).scalar_one_or_none()
    return won == owner


def renew(engine: Engine, owner: str, ttl: timedelta, now: datetime,
          name: str = LEASE_NAME) -> bool:
    """Heartbeat: push the expiry forward. False when the lease is no longer ours (it expired
    while we stalled and another daemon took it over): the caller must stop."""
    table = DaemonLease.__table__  # type: ignore[attr-defined]
    with session_scope(engine) as session:
        result = session.connection().execute(  # a CursorResult: it has the rowcount
            update(table)
            .where(table.c.name == name, table.c.owner == owner)
            .values(heartbeat_at=now, expires_at=now + ttl)
        )
        return (result.rowcount or 0) == 1


def release(engine: Engine, owner: str, name: str = LEASE_NAME) -> bool:
    """Give the lease up (only if it is ours), so the next daemon can start at once."""
    table = DaemonLease.__table__  # type: ignore[attr-defined]
    with session_scope(engine) as session:
        result = session.connection().execute(
            delete(table).where(table.c.name == name, table.c.owner == owner)
        )
        return (result.rowcount or 0) == 1


def holder(engine: Engine, name: str = LEASE_NAME) -> LeaseInfo | None:
    """The current lease row (possibly expired), or None when no daemon ever held it."""
    table = DaemonLease.__table__  # type: ignore[attr-defined]
    with session_scope(engine) as session:
        row = session.execute(
            select(table.c.owner, table.c.acquired_at, table.c.heartbeat_at, table.c.expires_at)
            .where(table.c.name == name)
        ).first()
    return LeaseInfo(*row) if row else None


def blocked_by_live_holder(engine: Engine, name: str, now: datetime) -> bool:
    """True when the lease has expired but its holder runs on this host and is alive: it could
    not renew (a long SQLite write holds the store, or it stalled) and is still working, so it
    is not taken over. Holders on other hosts cannot be checked: their expiry is the rule."""
    info = holder(engine, name)
    if info is None or not info.expired(now):
        return False
    host, _, rest = info.owner.partition(":")
    return gone_on_this_host(host, rest.partition(":")[0]) is False


def _dead_here(owner: str) -> bool:
    """True when `owner` (see `make_owner`) ran on this host and its process no longer exists: a
    holder killed with SIGKILL, whose lease need not be waited out."""
    host, _, rest = owner.partition(":")
    return gone_on_this_host(host, rest.partition(":")[0]) is True


def _busy(exc: Exception) -> bool:
    """True for SQLite's answer while another connection writes ("database is locked")."""
    return isinstance(exc, OperationalError) and "locked" in str(exc.orig)


@contextmanager
def exclusive(engine: Engine, purpose: str, *, ttl: timedelta, wait: bool,
              now: Callable[[], datetime], stop: threading.Event,
              name: str = LEASE_NAME) -> Iterator[str | None]:
    """Hold the database's lease while a command (`purpose`, e.g. "export") runs.

    Refuses with `LeaseHeldError` naming the holder when the lease is live and `wait` is False;
    otherwise polls until it is free, and yields None (do nothing) if `stop` is set meanwhile;
    else yields the owner name it holds the lease under. A heartbeat thread renews the lease every third of
    `ttl`; if it is lost anyway (the process stalled past `ttl`), `stop` is set so the command
    ends after its batch in flight. The lease is released on exit."""
    owner = f"{make_owner()} ({purpose})"
    poll = max(0.2, min(5.0, ttl.total_seconds() / 3))
    announced = False
    while blocked_by_live_holder(engine, name, now()) or not acquire(
            engine, owner, ttl, now(), name):
        info = holder(engine, name)
        if info is None:
            continue  # released between our two statements
        if _dead_here(info.owner):
            log.warning("taking over the lease of %s: that process on this host is gone", info.owner)
            release(engine, info.owner, name)
            continue
        if not wait:
            raise LeaseHeldError(
                f"{purpose} needs the lease on this database, held by {info.describe(now())}",
                hint=f"wait for it with `{purpose} --wait`, or stop the holder first (a crashed "
                f"holder's lease expires after [schedule] lease_seconds = {ttl.total_seconds():.0f})")
        if not announced:
            log.info("%s is waiting for the lease held by %s", purpose, info.describe(now()))
            announced = True
        if stop.wait(poll):
            yield None
            return
    done = threading.Event()

    def heartbeat() -> None:
        failing = False
        while not done.wait(0.5 if failing else ttl.total_seconds() / 3):
            try:
                if not renew(engine, owner, ttl, now(), name):
                    log.error("%s lost the lease; stopping after the batch in flight", purpose)
                    stop.set()
                    return
                failing = False
            except Exception as exc:
                # The database is unreachable, or (SQLite) a long write of this very command
                # holds it: retry at once, so the renewal is queued for the moment it frees.
                # A write in progress is how a large first export works on SQLite, not a fault:
                # said at info, so nobody chases it (other holders wait for this one while its
                # process is alive, `blocked_by_live_holder`).
                if not failing:
                    if _busy(exc):
                        log.info("lease heartbeat of %s waits for a write in progress to end "
                                 "(the database is busy); retrying", purpose)
                    else:
                        log.warning("lease heartbeat of %s cannot write yet (%s); retrying",
                                    purpose, type(exc).__name__)
                failing = True

    beat = threading.Thread(target=heartbeat, name=f"leadloop-lease-{purpose}", daemon=True)
    beat.start()
    try:
        yield owner
    finally:
        done.set()
        beat.join()
        release(engine, owner, name)


def outbox_lease(engine: Engine, purpose: str, *, ttl: timedelta, now: Callable[[], datetime],
                 stop: threading.Event) -> AbstractContextManager[str | None]:
    """Hold the "outbox" lease while `purpose` (an export, or `forget`) runs, waiting for the
    holder; yields None if `stop` is set while waiting."""
    return exclusive(engine, purpose, ttl=ttl, wait=True, now=now, stop=stop, name=OUTBOX_LEASE)
