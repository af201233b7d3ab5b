"""The single-instance lease on SQLite and PostgreSQL: exclusive, renewable, expiring."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy.engine import Engine

from leadloop import lease

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TTL = timedelta(seconds=30)


def test_second_owner_is_refused_while_the_lease_is_live(engine: Engine) -> None:
    assert lease.acquire(engine, "a", TTL, T0)
    assert not lease.acquire(engine, "b", TTL, T0 + timedelta(seconds=29))
    info = lease.holder(engine)
    assert info is not None and info.owner == "a"
    assert info.expires_at == T0 + TTL
    assert "a (held" in info.describe(T0 + timedelta(seconds=5))


def test_holder_can_reacquire_and_heartbeat_extends_the_lease(engine: Engine) -> None:
    assert lease.acquire(engine, "a", TTL, T0)
    assert lease.acquire(engine, "a", TTL, T0 + timedelta(seconds=10))
    assert lease.renew(engine, "a", TTL, T0 + timedelta(seconds=25))
    # without the heartbeat this would have expired at T0+40s
    assert not lease.acquire(engine, "b", TTL, T0 + timedelta(seconds=50))
    assert not lease.renew(engine, "b", TTL, T0 + timedelta(seconds=50))


def test_crashed_holders_lease_expires_and_can_be_taken_over(engine: Engine) -> None:
    assert lease.acquire(engine, "crashed", TTL, T0)
    later = T0 + TTL + timedelta(seconds=1)
    assert lease.holder(engine).expired(later)  # type: ignore[union-attr]
    assert lease.acquire(engine, "b", TTL, later)
    assert lease.holder(engine).owner == "b"  # type: ignore[union-attr]
    # the old holder wakes up: it has lost the lease and must notice
    assert not lease.renew(engine, "crashed", TTL, later)
    assert not lease.release(engine, "crashed")
    assert lease.holder(engine).owner == "b"  # type: ignore[union-attr]


def test_release_frees_the_lease_at_once(engine: Engine) -> None:
    assert lease.acquire(engine, "a", TTL, T0)
    assert lease.release(engine, "a")
    assert lease.holder(engine) is None
    assert lease.acquire(engine, "b", TTL, T0 + timedelta(seconds=1))


def test_racing_daemons_get_exactly_one_lease(engine: Engine) -> None:
    owners = [f"d{i}" for i in range(8)]
    won: list[str] = []
    barrier = threading.Barrier(len(owners))

    def contend(owner: str) -> None:
        barrier.wait()
        if lease.acquire(engine, owner, TTL, T0):
            won.append(owner)

    threads = [threading.Thread(target=contend, args=(o,)) for o in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert lease.holder(engine).owner == won[0]  # type: ignore[union-attr]


def test_a_heartbeat_held_off_by_a_write_in_progress_says_so_at_info_and_renews_after(
        sqlite_engine: Engine, caplog) -> None:
    """On SQLite a long write (a first export's build) holds the file: the heartbeat cannot
    renew until it ends. That is how the command works, not a fault: logged at info, no
    warning, and the lease is renewed once the write ends."""
    import logging
    import sqlite3
    import time

    from sqlalchemy import create_engine

    path = sqlite_engine.url.database
    impatient = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.05})
    stop = threading.Event()
    caplog.set_level(logging.INFO, logger="leadloop.lease")
    with lease.exclusive(impatient, "export", ttl=timedelta(seconds=0.6), wait=False,
                         now=lambda: datetime.now(UTC), stop=stop) as owner:
        first = lease.holder(sqlite_engine)
        writer = sqlite3.connect(path, timeout=5)
        writer.execute("BEGIN IMMEDIATE")  # the write in progress
        time.sleep(0.6)
        writer.rollback()
        writer.close()
        freed = datetime.now(UTC)
        deadline = time.monotonic() + 10
        while True:  # the next retry renews it (every 0.5 s while failing)
            renewed = lease.holder(sqlite_engine)
            if (renewed is not None and renewed.heartbeat_at >= freed) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    impatient.dispose()
    assert owner is not None and first is not None and renewed is not None
    assert renewed.owner == owner and renewed.heartbeat_at >= freed
    assert not stop.is_set()
    waits = [r for r in caplog.records if "waits for a write in progress" in r.getMessage()]
    assert waits and all(r.levelno == logging.INFO for r in waits)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
