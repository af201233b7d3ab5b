"""One sender at a time: `export` and `run --once` take the daemon's lease or wait for it, and say
who holds it; the outbox watermark row cannot collide."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlmodel import Session

from leadloop import lease
from leadloop.cli import cli
from leadloop.errors import LeaseHeldError
from leadloop.export.state import advance_watermark
from leadloop.jobs import run_job
from leadloop.sandbox.fake_platforms import FakePlatforms
from leadloop.store import make_engine
from leadloop.tables import ConversionStatus, OutboxWatermark
from tests.export_helpers import NOW, full_lead
from tests.test_export_outbox import make_ctx, rows

TTL = timedelta(seconds=3)


def test_two_exports_started_together_send_each_conversion_once(
        engine: Any, fakes: FakePlatforms, tmp_path: Path) -> None:
    for i in range(30):
        full_lead(engine, i)
    barrier = threading.Barrier(2)
    results: list[Any] = []
    errors: list[BaseException] = []
    # each "process" has its own context and connection pool on the same database
    engines = [make_engine(engine.url.render_as_string(hide_password=False)) for _ in range(2)]

    def export(own: Any) -> None:
        ctx = make_ctx(own, fakes, tmp_path, names=("gads", "li"), gads={"batch_size": 5})
        barrier.wait()
        try:
            with lease.exclusive(ctx.engine, "export", ttl=TTL, wait=True, now=ctx.now,
                                 stop=ctx.stop) as owner:
                assert owner is not None
                results.append(run_job(ctx, "export"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=export, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for e in engines:
        e.dispose()
    assert errors == []
    assert all(r.ok for r in results)
    assert sorted(r.counts["sent"] for r in results) == [0, 60]  # the second found nothing due
    sent = [c["orderId"] for req in fakes.received("google_ads") for c in req.json()["conversions"]]
    assert len(sent) == len(set(sent)) == 30  # no conversion uploaded twice
    assert len([e for req in fakes.received("linkedin") for e in req.json()["elements"]]) == 30
    assert {r.status for r in rows(engine)} == {ConversionStatus.sent}
    assert lease.holder(engine) is None  # both released


def test_export_refuses_while_the_daemon_holds_the_lease_and_names_it(
        sqlite_engine: Any, fakes: FakePlatforms, tmp_path: Path) -> None:
    ctx = make_ctx(sqlite_engine, fakes, tmp_path)
    assert lease.acquire(sqlite_engine, "host-a:4242:daemon", TTL, ctx.now())
    with pytest.raises(LeaseHeldError) as exc, lease.exclusive(
            sqlite_engine, "export", ttl=TTL, wait=False, now=ctx.now, stop=ctx.stop):
        pass
    assert "host-a:4242:daemon" in exc.value.message and "export --wait" in (exc.value.hint or "")
    assert lease.holder(sqlite_engine).owner == "host-a:4242:daemon"  # type: ignore[union-attr]


def test_export_wait_takes_the_lease_once_it_is_released(sqlite_engine: Any, fakes: FakePlatforms,
                                                         tmp_path: Path) -> None:
    ctx = make_ctx(sqlite_engine, fakes, tmp_path)
    assert lease.acquire(sqlite_engine, "daemon-1", TTL, ctx.now())
    threading.Timer(0.5, lease.release, args=(sqlite_engine, "daemon-1")).start()
    with lease.exclusive(sqlite_engine, "export", ttl=TTL, wait=True, now=ctx.now,
                         stop=ctx.stop) as owner:
        assert owner is not None and owner.endswith("(export)")
        assert lease.holder(sqlite_engine).owner == owner  # type: ignore[union-attr]
    assert lease.holder(sqlite_engine) is None


def test_cli_export_and_run_once_say_who_holds_the_lease(tmp_path: Path, monkeypatch: Any) -> None:
    db = tmp_path / "ll.db"
    config = tmp_path / "leadloop.toml"
    config.write_text(f"""
[database]
url = "sqlite:///{db}"
[crm]
kind = "hubspot"
token_env = "LL_TEST_HUBSPOT"
[[stages]]
name = "Qualified"
crm_values = ["salesqualifiedlead"]
macro = true
""")
    monkeypatch.setenv("LL_TEST_HUBSPOT", "x")
    engine = make_engine(f"sqlite:///{db}")
    from leadloop.tables import utcnow

    assert lease.acquire(engine, "host-b:99:daemon", timedelta(minutes=5), utcnow())
    runner = CliRunner()
    for args in (["export"], ["run", "--once"]):
        out = runner.invoke(cli, ["-c", str(config), *args])
        assert out.exit_code == 1, out.output
        assert "held by host-b:99:daemon" in out.output and "--wait" in out.output


def test_the_outbox_watermark_row_cannot_collide(engine: Any) -> None:
    with Session(engine) as first, Session(engine) as second:
        assert advance_watermark(second, "k", NOW) is None
        second.commit()
        # the other builder read no row before this one committed: its insert is a no-op now
        assert advance_watermark(first, "k", NOW + timedelta(minutes=1)) == NOW
        first.commit()
    with Session(engine) as s:
        assert s.get(OutboxWatermark, "k").last_build_started_at == NOW + timedelta(minutes=1)  # type: ignore[union-attr]


def test_a_killed_holder_on_this_host_is_taken_over_at_once(sqlite_engine: Any) -> None:
    import os
    import socket
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer exists
    dead = f"{socket.gethostname()}:{gone.pid}:deadbeef (export)"
    stop = threading.Event()
    assert lease.acquire(sqlite_engine, dead, timedelta(hours=1), NOW)
    with lease.exclusive(sqlite_engine, "export", ttl=TTL, wait=False, now=lambda: NOW,
                         stop=stop) as owner:
        assert owner is not None and owner.startswith(f"{socket.gethostname()}:{os.getpid()}:")
    # a live holder (this very process under another tag) is not taken over
    alive = f"{socket.gethostname()}:{os.getppid()}:cafe (export)"
    assert lease.acquire(sqlite_engine, alive, timedelta(hours=1), NOW)
    with pytest.raises(LeaseHeldError), lease.exclusive(
            sqlite_engine, "export", ttl=TTL, wait=False, now=lambda: NOW, stop=stop):
        pass


def test_an_expired_lease_is_taken_over_only_from_a_holder_that_cannot_be_seen_alive(
        sqlite_engine: Any) -> None:
    """On SQLite a long write (a first export's build) keeps the holder's heartbeat from writing,
    so its lease expires while it works: a command on the same host waits for it instead of
    taking it over. A holder on another host is judged by its expiry alone."""
    import os
    import socket

    stop = threading.Event()
    later = NOW + timedelta(hours=2)
    busy = f"{socket.gethostname()}:{os.getppid()}:cafe (export)"
    assert lease.acquire(sqlite_engine, busy, timedelta(hours=1), NOW)
    with pytest.raises(LeaseHeldError, match="expired"), lease.exclusive(
            sqlite_engine, "export", ttl=TTL, wait=False, now=lambda: later, stop=stop):
        pass
    lease.release(sqlite_engine, busy)
    remote = "another-host.example:4242:beef (export)"
    assert lease.acquire(sqlite_engine, remote, timedelta(hours=1), NOW)
    with lease.exclusive(sqlite_engine, "export", ttl=TTL, wait=False, now=lambda: later,
                         stop=stop) as owner:
        assert owner is not None and lease.holder(sqlite_engine).owner == owner  # type: ignore[union-attr]
