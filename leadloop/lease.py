"""The single-instance lease: one daemon per database.

One row in `daemon_lease` (name "daemon") says who runs the schedule. Taking it is a single
`INSERT ... ON CONFLICT (name) DO UPDATE ... WHERE <expired or ours> RETURNING owner`, which both
SQLite (3.35+) and PostgreSQL execute atomically: of two daemons racing for a free or expired
lease exactly one gets a row back. The holder renews the expiry with a heartbeat; a holder that
crashed stops renewing, and once `expires_at` has passed anyone may take the lease over.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Engine

from leadloop.store import _insert_for, session_scope
from leadloop.tables import DaemonLease

LEASE_NAME = "daemon"


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


def acquire(engine: Engine, owner: str, ttl: timedelta, now: datetime) -> bool:
    """Take the lease if it is free, expired or already ours. Atomic on SQLite and PostgreSQL."""
    table = DaemonLease.__table__  # type: ignore[attr-defined]
    expires = now + ttl
    with session_scope(engine) as session:
        stmt = _insert_for(session, table).values(
            name=LEASE_NAME, owner=owner, acquired_at=now, heartbeat_at=now, expires_at=expires
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


def renew(engine: Engine, owner: str, ttl: timedelta, now: datetime) -> bool:
    """Heartbeat: push the expiry forward. False when the lease is no longer ours (it expired
    while we stalled and another daemon took it over): the caller must stop."""
    table = DaemonLease.__table__  # type: ignore[attr-defined]
    with session_scope(engine) as session:
        result = session.execute(
            update(table)
            .where(table.c.name == LEASE_NAME, table.c.owner == owner)
            .values(heartbeat_at=now, expires_at=now + ttl)
        )
        return (result.rowcount or 0) == 1


def release(engine: Engine, owner: str) -> bool:
    """Give the lease up (only if it is ours), so the next daemon can start at once."""
    table = DaemonLease.__table__  # type: ignore[attr-defined]
    with session_scope(engine) as session:
        result = session.execute(
            delete(table).where(table.c.name == LEASE_NAME, table.c.owner == owner)
        )
        return (result.rowcount or 0) == 1


def holder(engine: Engine) -> LeaseInfo | None:
    """The current lease row (possibly expired), or None when no daemon ever held it."""
    table = DaemonLease.__table__  # type: ignore[attr-defined]
    with session_scope(engine) as session:
        row = session.execute(
            select(table.c.owner, table.c.acquired_at, table.c.heartbeat_at, table.c.expires_at)
            .where(table.c.name == LEASE_NAME)
        ).first()
    return LeaseInfo(*row) if row else None
