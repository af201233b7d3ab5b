"""Operations under hostile conditions: bad database URLs, killed runs, slow clients, file modes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlmodel import select

from leadloop.cli import cli
from leadloop.metrics import DaemonMetrics, HealthServer
from leadloop.status import collect_status
from leadloop.store import session_scope
from leadloop.tables import JobOutcome, JobRun

from .conftest import POSTGRES_URL

CONFIG = textwrap.dedent("""
    [database]
    url = "{url}"
    [crm]
    kind = "csv"
    [crm.csv]
    path = "leads.csv"
    id_column = "id"
    [[stages]]
    name = "won"
    crm_values = ["won"]
    macro = true
    value = 1.0
""")


def _status(tmp_path: Path, url: str):
    (tmp_path / "leads.csv").write_text("id\n1\n")
    config = tmp_path / "leadloop.toml"
    config.write_text(CONFIG.format(url=url))
    return CliRunner().invoke(cli, ["-c", str(config), "status"])


@pytest.mark.parametrize(("url", "problem"), [
    ("sqlite:///", "names no file"),
    ("sqlite://", "three slashes"),
    ("sqlite:///:memory:", "names no file"),
    ("sqlite://x.db", "three slashes"),
    ("sqlite:///{tmp}/missing/folder/x.db", "does not exist"),
    ("sqlite:///{tmp}", "is a folder"),
    ("mysql://x/y", "must start with"),
    ("postgresql://u@127.0.0.1:notaport/db", "database.url"),
])
def test_a_bad_database_url_is_one_line_and_exit_2(tmp_path, url: str, problem: str) -> None:
    result = _status(tmp_path, url.format(tmp=tmp_path))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if "database.url" in line]
    assert len(errors) == 1 and problem in errors[0]
    assert "Traceback" not in result.output and len(result.output.splitlines()) <= 3


def test_an_unreachable_server_is_one_line_and_exit_1(tmp_path) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = _status(tmp_path, f"postgresql://leadloop:s3cret-pw@127.0.0.1:{port}/leadloop")
    assert result.exit_code == 1, result.output
    assert "database.url: cannot reach" in result.output and "s3cret-pw" not in result.output
    assert "Traceback" not in result.output and len(result.output.splitlines()) <= 3


@pytest.mark.postgres
@pytest.mark.skipif(not POSTGRES_URL, reason="LEADLOOP_TEST_POSTGRES_URL not set")
@pytest.mark.parametrize("change", ["role", "database"])
def test_a_wrong_role_or_database_is_a_config_error(tmp_path, change: str) -> None:
    from sqlalchemy.engine import make_url

    url = make_url(POSTGRES_URL)
    url = url.set(username="no_such_role_x") if change == "role" else url.set(
        database="no_such_database_x")
    result = _status(tmp_path, url.render_as_string(hide_password=False))
    assert result.exit_code == 2, result.output
    assert "database.url" in result.output and "does not exist" in result.output
    assert len(result.output.splitlines()) <= 3


# -- killed runs ------------------------------------------------------------------------------

_KILLED_JOB = """
import sys, time
from leadloop.config import settings_from_dict
from leadloop.context import Context
from leadloop.jobs import record_run
from leadloop.store import make_engine
settings = settings_from_dict({"crm": {"kind": "csv", "csv": {"path": "x.csv", "id_column": "id"}},
    "stages": [{"name": "won", "crm_values": ["won"], "macro": True, "value": 1}]})
ctx = Context(settings=settings, engine=make_engine(sys.argv[1]))
def body(ctx):
    print("started", flush=True)
    time.sleep(120)
record_run(ctx, "sync", body)
"""


def test_a_killed_run_is_reported_interrupted_and_status_exits_1(tmp_path, sqlite_engine,
                                                                 make_context) -> None:
    url = str(sqlite_engine.url)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_JOB, url], stdout=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    try:
        assert proc.stdout.readline().strip() == "started"
        ctx = make_context(sqlite_engine, database={"url": url})
        assert collect_status(ctx)["interrupted_jobs"] == []  # still alive: running
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.stdout.close()
    data = collect_status(ctx)
    assert data["interrupted_jobs"] == ["sync"]
    assert data["jobs"]["sync"]["last_run"]["outcome"] == "interrupted"
    assert f":{proc.pid} ended without recording an outcome" in data["jobs"]["sync"]["last_run"]["error"]
    config = tmp_path / "leadloop.toml"
    (tmp_path / "leads.csv").write_text("id\n1\n")
    config.write_text(CONFIG.format(url=url))
    result = CliRunner().invoke(cli, ["-c", str(config), "status"])
    assert result.exit_code == 1 and "INTERRUPTED" in result.output
    # the next run of the job records the killed one as interrupted for good
    from leadloop.jobs import record_run

    record_run(ctx, "sync", lambda c: {"ok": 1})
    with session_scope(sqlite_engine) as s:
        outcomes = [r.outcome for r in s.exec(select(JobRun).order_by(JobRun.id))]
    assert outcomes == [JobOutcome.interrupted, JobOutcome.ok]
    assert collect_status(ctx)["interrupted_jobs"] == []


def test_a_running_row_nobody_runs_is_interrupted(sqlite_engine, make_context) -> None:
    ctx = make_context(sqlite_engine)
    with session_scope(sqlite_engine) as s:  # as an older leadloop left it: no runner
        s.add(JobRun(name="export", started_at=ctx.now()))
    assert collect_status(ctx)["interrupted_jobs"] == ["export"]


# -- the health server ------------------------------------------------------------------------


def test_slow_clients_hold_a_bounded_number_of_threads_for_a_bounded_time(sqlite_engine) -> None:
    server = HealthServer("127.0.0.1", 0, DaemonMetrics(sqlite_engine), lambda: (True, "ok"),
                          max_connections=4, idle_timeout=0.5, deadline=2.0).start()
    before = threading.active_count()
    clients = []
    try:
        for _ in range(100):  # connect, then say nothing (or half a request line)
            c = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            c.sendall(b"GET /heal")
            clients.append(c)
        peak = threading.active_count()
        assert peak - before <= 4 + 1
        assert server.connections <= 4
        started = time.monotonic()
        for c in clients:  # every one is closed by the server: idle timeout, or refused at once
            c.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                assert c.recv(1024) == b""
        while server.connections and time.monotonic() - started < 4:
            time.sleep(0.05)  # a thread releases its slot just after closing its socket
        assert server.connections == 0 and time.monotonic() - started < 4
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as r:
            assert r.status == 200
    finally:
        for c in clients:
            c.close()
        server.stop()


def test_a_trickling_client_is_cut_at_the_deadline(sqlite_engine) -> None:
    server = HealthServer("127.0.0.1", 0, DaemonMetrics(sqlite_engine), lambda: (True, "ok"),
                          max_connections=2, idle_timeout=0.5, deadline=1.0).start()
    try:
        c = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        started = time.monotonic()
        with pytest.raises(OSError):  # one header byte per 0.3 s: never idle, but never done
            for _ in range(40):
                c.sendall(b"X")
                time.sleep(0.3)
        assert time.monotonic() - started < 4
        c.close()
    finally:
        server.stop()


def test_the_cli_writes_owner_only_files(tmp_path) -> None:
    csv = tmp_path / "leads.csv"
    csv.write_text("id,created\n1,2026-01-01\n")
    config = tmp_path / "leadloop.toml"
    config.write_text(CONFIG.format(url=f"sqlite:///{tmp_path}/store.db").replace(
        'id_column = "id"', 'id_column = "id"\ncreated_column = "created"'))
    env = {**os.environ, "LEADLOOP_CONFIG": str(config)}
    subprocess.run([str(Path(sys.executable).parent / "leadloop"), "sync"], env=env,
                   check=True, capture_output=True, cwd=tmp_path)
    for path in tmp_path.glob("store.db*"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
