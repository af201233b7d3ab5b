"""Fault tests (issue #8): kill -9 during export, a misbehaving CRM, fuzzed config and CSV input,
and no secret or clear PII anywhere after a full run. Loopback only, bounded in count and time."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlmodel import select

from leadloop.config import load_settings, settings_from_dict
from leadloop.context import Context
from leadloop.crm import build_source
from leadloop.crm.hubspot import HubSpotSource
from leadloop.errors import LeadloopError
from leadloop.http import make_session
from leadloop.sandbox.fake_hubspot import FakeHubSpot
from leadloop.sandbox.fake_platforms import FakePlatforms
from leadloop.sandbox.simulator import simulate
from leadloop.store import make_engine, session_scope
from leadloop.sync import sync_source
from leadloop.tables import Conversion, ConversionStatus, Lead, LeadEvent, RejectedRecord, StageChange
from tests.daemon_helpers import gdm_stage, ingested_ids
from tests.export_helpers import add_lead

ROOT = Path(__file__).resolve().parents[1]

# -- crash during export: kill -9 at random points, restart, nothing lost or doubled --------------

CRASH_TOKEN = "dm-crash-token-7f3a9c"
CRASH_CONFIG = """
[database]
url = "sqlite:///{db}"

[crm]
kind = "hubspot"
base_url = "http://127.0.0.1:1"
{stage}

[model]
dir = "{tmp}/models"
"""

# A zygote: imports leadloop once, then forks one `leadloop -c CFG export` per line on stdin.
# Each child is exactly the CLI (`leadloop.cli.main`) with its own engine; only the interpreter
# start-up (~1-3 s on a busy 2-core machine) is shared, which makes 100 kills affordable in CI.
ZYGOTE = textwrap.dedent("""
    import os, sys
    import leadloop.cli, leadloop.jobs, leadloop.export, leadloop.export.google_data_manager
    import leadloop.store, leadloop.config
    cfg, log = sys.argv[1], sys.argv[2]
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.argv = ["leadloop", "-c", cfg, "export"]
            code = 0
            try:
                leadloop.cli.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                import traceback; traceback.print_exc(); code = 3
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(status, flush=True)
""")


class Zygote:
    def __init__(self, cfg: Path, log: Path) -> None:
        env = {**os.environ, "LEADLOOP_CRASH_TOKEN": CRASH_TOKEN}
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(cfg), str(log)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=ROOT)

    def start(self) -> int:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def wait(self) -> int:
        """The child's raw wait status (signal number in the low bits when killed)."""
        assert self.proc.stdout
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # the zygote reaps its child at once, so an exited pid is gone
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_kill_9_during_export_100_times_loses_nothing_and_sends_each_conversion_once(
        tmp_path: Path) -> None:
    kills_wanted, batch, n_leads = 100, 2, 1000
    db = tmp_path / "crash.db"
    engine = make_engine(f"sqlite:///{db}")
    now = datetime.now(UTC).replace(microsecond=0)
    for i in range(n_leads):
        add_lead(engine, f"{5000 + i}", created=now - timedelta(days=3), sql_at=now - timedelta(days=2),
                 email=f"crash{i}@example.com", gclid=f"Cj0KCQiAcrash{i:05d}")
    engine.dispose()
    rng = random.Random(8)
    with FakePlatforms(require_token=CRASH_TOKEN) as platforms:
        cfg = tmp_path / "crash.toml"
        stage = gdm_stage(stage="Qualified", value=100.0, destination="gdm", customer="7001",
                          url=platforms.urls["google_data_manager"], token_env="LEADLOOP_CRASH_TOKEN",
                          batch_size=batch)
        cfg.write_text(CRASH_CONFIG.format(db=db, stage=stage, tmp=tmp_path))
        zygote = Zygote(cfg, tmp_path / "export.log")
        kills, in_flight = 0, 0
        try:
            for _ in range(kills_wanted):
                before = len(platforms.received("google_data_manager"))
                pid = zygote.start()
                # wait for this run's k-th request (k random: 1-3), then kill at a random moment
                # soon after: while sending, while committing a batch, or between two batches.
                # Counting requests (not time) keeps enough work left for 100 kills on any machine.
                k, deadline = rng.randint(1, 3), time.monotonic() + 20
                while (len(platforms.received("google_data_manager")) < before + k
                       and _alive(pid) and time.monotonic() < deadline):
                    time.sleep(0.001)
                time.sleep(rng.uniform(0.0, 0.01))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                status = zygote.wait()
                if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                    kills += 1
                    in_flight += 1
            # one last run left alone finishes the job
            zygote.start()
            final = zygote.wait()
        finally:
            zygote.close()
        log = (tmp_path / "export.log").read_text()
        assert "Traceback" not in log
        assert os.WIFEXITED(final) and os.WEXITSTATUS(final) == 0, log[-2000:]
        assert kills >= 90, f"only {kills} runs were killed mid-way"

        engine = make_engine(f"sqlite:///{db}")
        with session_scope(engine) as s:
            rows = s.exec(select(Conversion)).all()
        engine.dispose()
        order_ids = {r.order_id for r in rows}
        assert len(rows) == len(order_ids) == n_leads
        assert Counter(r.status for r in rows) == {ConversionStatus.sent: n_leads}
        ledger = platforms.ledgers["google_data_manager"]
        assert set(ledger) == order_ids  # every conversion, once per order id, none missing
        # a re-send happens only for the batch in flight when its process died
        sent = ingested_ids(platforms)
        assert set(sent) == order_ids
        resent = sum(sent.values()) - len(sent)
        assert resent <= in_flight * batch, (resent, in_flight)


# -- CRM faults: 5 % 5xx, 429 bursts, dropped connections, repeated pages -----------------------

HS_TOKEN = "pat-na1-faults-SECRET-0a1b2c3d"
HS_ENV = "LEADLOOP_FAULTS_HUBSPOT_TOKEN"


def _hs_ctx(engine: Any, make_settings: Any, base_url: str) -> Context:
    settings = make_settings(crm={"kind": "hubspot", "base_url": base_url, "token_env": HS_ENV,
                                  "lookback_minutes": 10, "requests_per_10s": 100000})
    return Context(settings=settings, engine=engine,
                   http_factory=lambda **kw: make_session(**{**kw, "backoff_factor": 0.0,
                                                             "timeout": (2.0, 5.0)}))


def _dump(engine: Any) -> tuple[list, list, list]:
    with session_scope(engine) as s:
        leads = sorted((lead.crm_id, lead.status, lead.created_at, lead.email_sha256, lead.gclid,
                        lead.utm_source, json.dumps(lead.attributes, sort_keys=True))
                       for lead in s.exec(select(Lead)).all())
        by_id = {lead.id: lead.crm_id for lead in s.exec(select(Lead)).all()}
        stages = sorted((by_id[c.lead_id], c.field, c.value, c.entered_at, c.deal_id, str(c.amount))
                        for c in s.exec(select(StageChange)).all())
        events = sorted((by_id[e.lead_id], e.name, e.occurred_at) for e in s.exec(select(LeadEvent)).all())
    return leads, stages, events


@pytest.fixture
def hs_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HS_ENV, HS_TOKEN)


def test_crm_faults_leave_the_store_equal_to_the_source(tmp_path, make_settings, hs_env) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    funnel = simulate(3000, seed=11, end=now)
    clean_engine = make_engine(f"sqlite:///{tmp_path / 'clean.db'}")
    faulty_engine = make_engine(f"sqlite:///{tmp_path / 'faulty.db'}")
    with FakeHubSpot(funnel, token=HS_TOKEN, requests_per_window=None, search_per_second=None) as hs:
        ctx = _hs_ctx(clean_engine, make_settings, hs.base_url)
        sync_source(ctx, HubSpotSource(ctx, search_per_second=1e6))
    stop, injected = threading.Event(), [0, 0, 0]
    with FakeHubSpot(funnel, token=HS_TOKEN, requests_per_window=None, search_per_second=None,
                     error_rate=0.05, seed=5) as hs:

        def misbehave() -> None:
            """Every ~3 requests one more fault: a 429 burst, a dropped connection or a page
            served twice, spread over the whole sync (on top of the fake's random 5 % 5xx)."""
            kinds = ({"rate_limited": 3}, {"dropped_connections": 1}, {"repeated_pages": 1})
            mark, k = 0, 0
            while not stop.wait(0.005):
                if len(hs.received) >= mark + 3:
                    mark = len(hs.received)
                    hs.inject(**kinds[k % 3])
                    injected[k % 3] += 1
                    k += 1

        t = threading.Thread(target=misbehave, daemon=True)
        t.start()
        try:
            ctx = _hs_ctx(faulty_engine, make_settings, hs.base_url)
            sync_source(ctx, HubSpotSource(ctx, search_per_second=1e6))
        finally:
            stop.set()
            t.join()
        answered_429 = hs.rate_limited
        source_ids = {cid for cid, obj in hs.contacts.items() if obj.archived_at is None}
    assert answered_429 > 0 and min(injected) >= 2  # the faults really happened
    with session_scope(faulty_engine) as s:
        stored = set(s.exec(select(Lead.crm_id)).all())
        rejected = set(s.exec(select(RejectedRecord.record_ref)
                              .where(RejectedRecord.object_type == "contacts")).all())
    # every source contact is stored or kept as a rejected record with its reason; nothing else
    assert stored | rejected == source_ids and not stored & rejected
    clean, faulty = _dump(clean_engine), _dump(faulty_engine)
    assert len(clean[0]) == 3000
    assert faulty == clean
    clean_engine.dispose()
    faulty_engine.dispose()


# -- bad input: fuzzed config and CSV never raise anything but LeadloopError ----------------------

VALID_CONFIG: dict[str, Any] = {
    "database": {"url": "sqlite:///x.db"},
    "crm": {"kind": "hubspot", "base_url": "http://127.0.0.1:1", "token_env": "HS_TOKEN",
            "lookback_minutes": 10},
    "stages": [
        {"name": "Lead", "crm_values": ["lead"], "value": 0.0, "currency": "EUR"},
        {"name": "SQL", "crm_values": ["salesqualifiedlead"], "value": 100.0, "macro": True,
         "destinations": {"meta": "SQL"}},
    ],
    "micro_conversions": [{"name": "demo", "property": "demo_date"}],
    "destinations": {"meta": {"dataset_id": "1", "token_env": "META_TOKEN", "batch_size": 100}},
    "schedule": {"sync": "15m", "export": "0 * * * *"},
}

junk = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
    st.text(max_size=20), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


PATHS = _paths(VALID_CONFIG)


def _mutated(path: tuple, value: Any, delete: bool) -> dict:
    data = json.loads(json.dumps(VALID_CONFIG))
    node = data
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), value=junk, delete=st.booleans())
def test_fuzzed_config_is_accepted_or_refused_with_its_key(path, value, delete) -> None:
    data = _mutated(path, value, delete)
    try:
        settings_from_dict(data)
    except LeadloopError as exc:
        # the message points at the config key that is wrong (or at the section it is missing from)
        keys = [str(k) for k in path if not isinstance(k, int)]
        assert any(k in exc.message for k in keys) or "stage" in exc.message, exc.message
        assert "Traceback" not in exc.message


@settings(max_examples=60, deadline=None)
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_fuzzed_config_file_is_refused_without_a_traceback(tmp_path_factory, raw) -> None:
    path = tmp_path_factory.mktemp("cfg") / "leadloop.toml"
    path.write_bytes(raw)
    with pytest.raises(LeadloopError) as info:
        load_settings(path)
    assert str(path.name) in info.value.message or "config" in info.value.message.lower()


CSV_HEADER = ["id", "created", "Email", "Phone", "qualified_at", "won", "amount", "plan"]
cell = st.one_of(
    st.sampled_from(["", "1", "2026-01-02", "2026-01-02T10:00:00", "yes", "no", "12.5", "x@example.com",
                     "+4915112345678", "NA", "Select", "yesterday", "-3", "1e309", "\"", ",", "\n"]),
    st.text(max_size=8),
)
csv_row = st.lists(cell, min_size=6, max_size=10)


def _csv_line(cells: list[str]) -> str:
    out = []
    for c in cells:
        if any(ch in c for ch in ',"\n\r'):
            c = '"' + c.replace('"', '""') + '"'
        out.append(c)
    return ",".join(out)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(rows=st.lists(csv_row, min_size=1, max_size=12))
def test_fuzzed_csv_rows_are_loaded_or_kept_with_their_reason(tmp_path_factory, make_settings, rows
                                                               ) -> None:
    tmp = tmp_path_factory.mktemp("csv")
    path = tmp / "export.csv"
    path.write_text(",".join(CSV_HEADER) + "\n" + "\n".join(_csv_line(r) for r in rows) + "\n",
                    encoding="utf-8")
    engine = make_engine(f"sqlite:///{tmp / 'csv.db'}")
    settings_ = make_settings(crm={
        "kind": "csv", "lead_stage_property": "stage",
        "properties": {"email": "Email", "phone": "Phone"},
        "csv": {"path": str(path), "id_column": "id", "created_column": "created",
                "stage_columns": {"Qualified": "qualified_at"}, "label_column": "won",
                "amount_column": "amount"}})
    ctx = Context(settings=settings_, engine=engine)
    try:
        counts = sync_source(ctx, build_source(ctx))
    except LeadloopError as exc:  # a file-level problem (e.g. undecodable): clear, no traceback
        assert "export.csv" in exc.message or "crm.csv" in exc.message, exc.message
        return
    finally:
        engine.dispose()
    engine = make_engine(f"sqlite:///{tmp / 'csv.db'}")
    with session_scope(engine) as s:
        leads = s.exec(select(Lead)).all()
        rejects = s.exec(select(RejectedRecord)).all()
    engine.dispose()
    assert counts["rejected"] == len(rejects)
    lead_ids = {lead.crm_id for lead in leads}
    row_rejects = [r for r in rejects if not r.object_type.endswith(".identity")]
    for r in rejects:
        if r in row_rejects:
            assert re.fullmatch(r"line \d+", r.record_ref), r.record_ref
        else:  # an unusable e-mail/phone: the lead is stored without it, the reject names the lead
            assert r.record_ref in lead_ids and "lead kept" in r.reason
        assert r.reason
        assert "x@example.com" not in json.dumps(r.payload, default=str)
    # every data line is either a lead (possibly several lines for one id) or a kept rejection
    assert len(lead_ids) + len(row_rejects) <= len(rows)
    assert leads or rejects


# -- secrets and PII: nothing in clear after a full demo run -------------------------------------


def _db_text(db: Path) -> str:
    con = sqlite3.connect(db)
    try:
        return "\n".join(con.iterdump())
    finally:
        con.close()


def _files_text(out: Path) -> Iterator[tuple[Path, str]]:
    for p in out.rglob("*"):
        if p.is_file() and p.suffix in (".html", ".csv", ".json", ".txt", ".md", ".log", ".jsonl"):
            yield p, p.read_text(encoding="utf-8", errors="replace")


@pytest.mark.slow
def test_no_secret_or_clear_pii_after_a_full_demo_run(tmp_path, capfd, monkeypatch) -> None:
    """What leadloop writes: its own log handler at DEBUG (urllib3's request lines included, with
    Meta's `?access_token=`), the database, the reports and the payload files."""
    import logging

    from leadloop.demo import run_demo
    from leadloop.logs import setup_logging

    for name in ("LEADLOOP_SANDBOX_HUBSPOT_TOKEN", "LEADLOOP_SANDBOX_GOOGLE_TOKEN",
                 "LEADLOOP_SANDBOX_META_TOKEN"):
        monkeypatch.delenv(name, raising=False)  # the demo sets fresh ones; restored afterwards
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging("DEBUG", "text")
    logging.getLogger("urllib3").setLevel(logging.DEBUG)
    n, seed = 1200, 7
    try:
        summary = run_demo(tmp_path, n_leads=n, seed=seed)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("urllib3").setLevel(logging.NOTSET)
    secrets = {os.environ[k] for k in ("LEADLOOP_SANDBOX_HUBSPOT_TOKEN", "LEADLOOP_SANDBOX_GOOGLE_TOKEN",
                                       "LEADLOOP_SANDBOX_META_TOKEN")}
    funnel = simulate(n, seed=seed)
    emails = {lead.email.lower() for lead in funnel.leads if "@" in lead.email}
    phones = {lead.phone for lead in funnel.leads if lead.phone}
    digits = {re.sub(r"\D", "", p) for p in phones}
    assert len(emails) > 1000 and len(phones) > 50
    out, err = capfd.readouterr()
    assert "access_token=***" in err  # the request lines were logged, masked
    places = {"logs": out + err + summary, "database": _db_text(tmp_path / "leadloop.db")}
    places.update({str(p.relative_to(tmp_path)): t for p, t in _files_text(tmp_path)})
    assert any(k.startswith("payloads") for k in places)
    for where, body in places.items():
        low = body.lower()
        for s in secrets:
            assert s not in body, f"a secret appears in {where}"
        leaked = [e for e in re.findall(r"[\w.+-]+@[\w-]+\.[\w.]+", low) if e in emails]
        assert not leaked, f"clear e-mail in {where}: {leaked[:1]}"
        assert not any(p in body for p in phones), f"clear phone in {where}"
        found = set(re.findall(r"(?<![0-9a-f])\+?1?(\d{10})(?![0-9a-f])", low))
        assert not {d for d in digits if d[-10:] in found}, f"phone digits in {where}"
    # the payloads do carry hashed identifiers (the run matched users, just not in clear)
    payload_text = "".join(t for k, t in places.items() if k.startswith("payloads"))
    assert re.search(r'"[0-9a-f]{64}"', payload_text)
