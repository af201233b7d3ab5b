"""Benchmark one full leadloop cycle at scale (issue #8): sync, score, validate, export, report.

    .venv/bin/python bench/cycle.py --leads 100000 --db sqlite
    .venv/bin/python bench/cycle.py --leads 1000000 --db postgres   # uses leadloop_bench_g

The sandbox funnel is served by the fake HubSpot in a CHILD process, so the peak RSS printed for
leadloop is leadloop's own (the fake's is printed apart). The fake runs with no rate limits and
the connector's client-side limiters are opened just as wide: the bench measures leadloop, not
HubSpot's request budget (bench/sync.py measures sync under a real plan's limits).

Stages are the jobs the CLI and the daemon run (`leadloop.jobs`, recorded in job_run, with their
skip-when-unchanged rules), on the demo's configuration (config/demo.toml: four stages, five
micro-conversions, Google Data Manager + Meta). Export is a dry run (payload files written under a
temporary directory, nothing sent). Peak RSS is measured per stage (VmHWM, reset before each),
and so is the CPU time of leadloop's process (all its threads): a stage whose CPU time is near its
wall time is bound by leadloop's own work, not by waiting on the fake or the database.

The floor is the simplest loop that does the same I/O as the sync: the very requests the connector
made, replayed with `requests` against the same fake, each page's results bulk-inserted with
`executemany` into one key/JSON table. The ratio printed is sync time / floor time.

`--latency-ms` delays each of the fake's answers as a real CRM's round trip would (the floor's
requests too): the sync reads the next page while it writes this one, so it pays the latency
once per page where the floor pays it on top of its writes.

`--runs N` runs the whole bench N times, each in a fresh process (imports, fake and store new,
as a first cycle meets them), and prints each run's ratios and their median: on a machine whose
speed moves by a fifth within the hour, one run's ratio moves with it (the same code's 100k
first cycle read 2.38x and 3.32x back to back).

A second cycle then runs with nothing changed in the CRM (the incremental case), timed per stage.
Before it, the export runs once for real against platforms that accept every row (not timed): a
dry run leaves the store as it was, so without it the second dry run would build the whole outbox
and every payload file again, which is what a dry run is for but not what a running daemon does.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psycopg
import requests
from sqlmodel import SQLModel

from leadloop.config import settings_from_dict
from leadloop.context import Context
from leadloop.crm.hubspot import HubSpotSource
from leadloop.export.base import RowResult
from leadloop.export.registry import DESTINATIONS
from leadloop.jobs import record_run, run_job
from leadloop.store import make_engine
from leadloop.sync import sync_source

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "pat-bench-cycle-token"
TOKEN_ENV = "LEADLOOP_BENCH_HUBSPOT_TOKEN"
PG_URL = os.environ.get("LEADLOOP_BENCH_POSTGRES_URL",
                        "postgresql://postgres@127.0.0.1:54329/leadloop_bench_g")
Call = tuple[str, str, bytes]  # method, path?query, body


def _serve(n: int, seed: int, conn: Any, latency: float = 0.0) -> None:
    """Child process: simulate the funnel, serve it without limits (each answer `latency`
    seconds late), answer control messages."""
    from leadloop.sandbox.fake_hubspot import FakeHubSpot
    from leadloop.sandbox.simulator import simulate

    t = time.perf_counter()
    funnel = simulate(n, seed=seed, end=datetime.now(UTC).replace(microsecond=0))
    fake = FakeHubSpot(funnel, token=TOKEN, requests_per_window=None, search_per_second=None,
                       daily_limit=None, latency=latency)
    with fake:
        conn.send((fake.base_url, time.perf_counter() - t))
        while True:
            msg = conn.recv()
            if msg == "calls":
                conn.send([(r.method, r.path + ("?" + urlencode(r.query, doseq=True) if r.query else ""),
                            r.body) for r in fake.received])
            elif msg == "clear":
                fake.received.clear()
                conn.send(True)
            else:
                break


def _settings(base_url: str, db_url: str, out: Path) -> Any:
    data = tomllib.loads((ROOT / "config" / "demo.toml").read_text())
    data["database"]["url"] = db_url
    data["crm"].update(base_url=base_url, token_env=TOKEN_ENV, requests_per_10s=1e7,
                       daily_request_limit=None)
    data["crm"] = {k: v for k, v in data["crm"].items() if v is not None}
    for section in data["destinations"].values():
        section.pop("token_env", None)  # dry run: payload files only, nothing validated remotely
    data["model"]["dir"] = str(out / "models")
    data["report"]["out_dir"] = str(out)
    return settings_from_dict(data, source="bench/cycle.py", base_dir=ROOT / "config")


def _reset_postgres() -> None:
    engine = make_engine(PG_URL, check_schema=False)
    SQLModel.metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
    engine.dispose()


def _stages(ctx: Context) -> list[tuple[str, Callable[[], Any]]]:
    return [
        ("sync", lambda: record_run(ctx, "sync", lambda c: sync_source(
            c, HubSpotSource(c, search_per_second=1e6)))),
        ("score", lambda: run_job(ctx, "score")),
        ("validate", lambda: run_job(ctx, "validate")),
        ("export (dry run)", lambda: run_job(ctx, "export")),
        ("report", lambda: run_job(ctx, "report")),
    ]


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux: clear_refs 5), per stage."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cycle(ctx: Context, label: str) -> tuple[dict[str, float], dict[str, float]]:
    times: dict[str, float] = {}
    peaks: dict[str, float] = {}
    print(f"-- {label}")
    for name, run in _stages(ctx):
        _reset_peak()
        t, cpu = time.perf_counter(), time.process_time()
        result = run()
        times[name], peaks[name] = time.perf_counter() - t, _peak_mb()
        cpu = time.process_time() - cpu
        if not result.ok:
            raise SystemExit(f"{name} failed: {result.error}")
        brief = {k: v for k, v in result.counts.items() if isinstance(v, int | float | str)
                 and k not in ("files", "inputs")}
        print(f"   {name:<17} {times[name]:8.1f} s  cpu {cpu:6.1f} s  peak {peaks[name]:6.0f} MB   "
              f"{json.dumps(brief, default=str)[:150]}")
    print(f"   {'total':<17} {sum(times.values()):8.1f} s  peak {max(peaks.values()):6.0f} MB")
    return times, peaks


def _first_export(ctx: Context) -> int:
    """What a real first cycle leaves behind: the outbox built and committed, its due rows sent,
    the report showing them. The dry run changes nothing in the store, so the bench runs the
    export once more, for real, against platforms that accept every row (each destination's
    `send` answers "sent"), then the report; returns the rows sent."""
    def accept(self: Any, payload: dict[str, Any], rows: Any) -> list[RowResult]:
        return [RowResult(r.order_id, "sent") for r in rows]

    real = {cls: cls.send for cls in DESTINATIONS.values()}
    for cls in real:
        cls.send = accept  # type: ignore[method-assign]
    ctx.dry_run = False
    try:
        result = run_job(ctx, "export")
    finally:
        ctx.dry_run = True
        for cls, send in real.items():
            cls.send = send  # type: ignore[method-assign]
    if not result.ok:
        raise SystemExit(f"first real export failed: {result.error}")
    report = run_job(ctx, "report")  # as the daemon's first cycle would, showing those sends
    if not report.ok:
        raise SystemExit(f"report after the first real export failed: {report.error}")
    return int(result.counts.get("sent", 0))


def floor_run(calls: list[Call], base_url: str, db: str, tmp: Path) -> tuple[float, int, float]:
    """Replay the connector's requests with plain `requests`; executemany each page's results.
    Wall time, rows stored, and this process's CPU time spent on it."""
    if db == "sqlite":
        con: Any = sqlite3.connect(tmp / "floor.db")
        con.execute("create table page_row (kind text, id text, body text, primary key (kind, id))")
        sql = "insert or replace into page_row values (?, ?, ?)"
    else:
        con = psycopg.connect(PG_URL)
        con.execute("drop table if exists floor_page_row")
        con.execute("create table floor_page_row (kind text, id text, body text, primary key (kind, id))")
        sql = ("insert into floor_page_row values (%s, %s, %s) on conflict (kind, id) "
               "do update set body = excluded.body")
    h = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    started, cpu, rows_in = time.perf_counter(), time.process_time(), 0
    with requests.Session() as s:
        for method, path, body in calls:
            data = s.request(method, base_url + path, data=body or None, headers=h).json()
            kind = path.split("?")[0]
            rows = [(kind, str(r.get("id") or r.get("from", {}).get("id")), json.dumps(r))
                    for r in data.get("results", [])]
            if rows:
                con.cursor().executemany(sql, rows)
            con.commit()
            rows_in += len(rows)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    if db == "postgres":
        con.execute("drop table floor_page_row")
        con.commit()
    con.close()
    return elapsed, rows_in, cpu


RESULT = "cycle-result "  # the line a run prints last, for `--runs`


def repeated(argv: list[str], runs: int) -> None:
    """Run the bench `runs` times, each in a fresh process, and print the median ratios."""
    results = []
    for i in range(1, runs + 1):
        print(f"== run {i} of {runs}", flush=True)
        proc = subprocess.run([sys.executable, __file__, *argv], stdout=subprocess.PIPE,
                              text=True, check=True)
        lines = proc.stdout.splitlines()
        print("\n".join(line for line in lines if not line.startswith(RESULT)), flush=True)
        results.append(json.loads(next(line for line in lines if line.startswith(RESULT))
                                  .removeprefix(RESULT)))
    print(f"== {runs} runs: first cycle / floor, sync / floor, first cycle, floor, peak RSS")
    for i, r in enumerate(results, start=1):
        print(f"   run {i}: {r['cycle_ratio']:.2f}  {r['sync_ratio']:.2f}  {r['cycle_s']:7.1f} s "
              f"{r['floor_s']:7.1f} s  {r['peak_mb']:6.0f} MB")
    print(f"   median: {statistics.median(r['cycle_ratio'] for r in results):.2f}  "
          f"{statistics.median(r['sync_ratio'] for r in results):.2f}  "
          f"{statistics.median(r['cycle_s'] for r in results):7.1f} s "
          f"{statistics.median(r['floor_s'] for r in results):7.1f} s  "
          f"{max(r['peak_mb'] for r in results):6.0f} MB (highest)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--leads", type=int, default=100_000)
    ap.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--latency-ms", type=float, default=0.0,
                    help="add this to each of the fake's answers, as a real CRM's round trip "
                         "would (the floor pays it too)")
    ap.add_argument("--runs", type=int, default=1,
                    help="run the bench this many times, each in a fresh process, and print "
                         "each run's ratios and their median")
    args = ap.parse_args()
    if args.runs > 1:
        argv = sys.argv[1:]
        at = argv.index("--runs") if "--runs" in argv else None
        if at is None:  # given as --runs=N
            argv = [a for a in argv if not a.startswith("--runs=")]
        else:
            del argv[at:at + 2]
        repeated(argv, args.runs)
        return

    parent, child = mp.get_context("fork").Pipe()
    server = mp.get_context("fork").Process(target=_serve,
                                         args=(args.leads, args.seed, child, args.latency_ms / 1000))
    server.start()
    base_url, sim_s = parent.recv()
    print(f"leads {args.leads:,}  db {args.db}  cores {os.cpu_count()}  "
          f"latency {args.latency_ms:g} ms  "
          f"(fake HubSpot in pid {server.pid}, funnel simulated and loaded in {sim_s:.1f} s)")
    os.environ[TOKEN_ENV] = TOKEN
    with tempfile.TemporaryDirectory(prefix="leadloop-bench-") as tmpdir:
        tmp = Path(tmpdir)
        if args.db == "postgres":
            _reset_postgres()
            db_url = PG_URL
        else:
            db_url = f"sqlite:///{tmp / 'bench.db'}"
        settings = _settings(base_url, db_url, tmp)
        ctx = Context(settings=settings, engine=make_engine(db_url), dry_run=True, out_dir=tmp)
        first, first_peaks = _cycle(ctx, "first cycle (empty store)")
        parent.send("calls")
        calls: list[Call] = parent.recv()
        parent.send("clear")
        parent.recv()
        t = time.perf_counter()
        delivered = _first_export(ctx)
        print(f"-- real first export (platforms accepting every row) and report: outbox committed, "
              f"{delivered:,} rows sent, {time.perf_counter() - t:.1f} s (not counted)")
        second, second_peaks = _cycle(ctx, "incremental cycle (nothing changed in the CRM)")
        parent.send("calls")
        n_incr = len(parent.recv())
        floor_s, floor_rows, floor_cpu = floor_run(calls, base_url, args.db, tmp)
        ctx.engine.dispose()
        if args.db == "postgres":
            _reset_postgres()
    parent.send("stop")
    server.join()
    fake_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"floor: {len(calls):,} requests replayed, {floor_rows:,} rows executemany'd in {floor_s:.1f} s "
          f"(cpu {floor_cpu:.1f} s in this process, the rest waiting on the fake or the database); "
          f"sync/floor = {first['sync'] / floor_s:.2f}; first cycle/floor = "
          f"{sum(first.values()) / floor_s:.2f}")
    print(f"incremental sync made {n_incr} requests; incremental cycle "
          f"{sum(second.values()):.2f} s (sync {second['sync']:.2f} s)")
    print(f"peak RSS leadloop process: {max(first_peaks.values()):,.0f} MB first cycle "
          f"({max(first_peaks, key=first_peaks.__getitem__)}), "
          f"{max(second_peaks.values()):,.0f} MB incremental; fake HubSpot child: {fake_peak:,.0f} MB")
    print(RESULT + json.dumps({"cycle_ratio": sum(first.values()) / floor_s,
                               "sync_ratio": first["sync"] / floor_s,
                               "cycle_s": sum(first.values()), "floor_s": floor_s,
                               "peak_mb": max(first_peaks.values())}), flush=True)


if __name__ == "__main__":
    main()
