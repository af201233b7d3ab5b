"""The incremental cycle on a large store: sync with nothing new, then an export dry run (#17).

    .venv/bin/python bench/incremental.py --leads 1000000 --db /tmp/incr-1m.db [--repeat 3]
        [--profile] [--statements] [--postgres]

A first run loads N simulated leads straight into the SQLite store at `--db` (as
`bench/job_memory.py` does, no HTTP), sets each HubSpot stream's cursor to the funnel's end (as a
finished backfill leaves it), and runs one real export against platforms that accept every row,
so the outbox is built and sent (none of this is timed). Later runs reuse the store.

Each repeat then times, on that store, what `bench/cycle.py`'s incremental cycle does: a sync from
the fake HubSpot (same funnel, served by a child process without limits; it re-reads the
look-back window and finds nothing changed) and an export dry run. `--profile` prints the
top functions of each under cProfile; `--statements` the SQL statements that took longest, with
SQLite's query plan of each. With `--postgres` the store is `LEADLOOP_BENCH_POSTGRES_URL`
instead (loaded when it has no leads; `--db` then only names nothing) and the plans are
PostgreSQL's `EXPLAIN ANALYZE`.
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing as mp
import os
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import event, select

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from cycle import TOKEN, TOKEN_ENV, _first_export, _settings  # noqa: E402

from leadloop.context import Context  # noqa: E402
from leadloop.crm.hubspot import HubSpotSource  # noqa: E402
from leadloop.jobs import record_run, run_job  # noqa: E402
from leadloop.store import make_engine, session_scope  # noqa: E402
from leadloop.sync import apply_page, sync_source  # noqa: E402
from leadloop.tables import SyncState  # noqa: E402

STREAMS = ("contacts", "deals", "contacts_archived", "deals_archived")


def _serve(n: int, seed: int, end: datetime, conn: Any) -> None:
    """Child process: the same funnel served by the fake HubSpot, without limits."""
    from leadloop.sandbox.fake_hubspot import FakeHubSpot
    from leadloop.sandbox.simulator import simulate

    fake = FakeHubSpot(simulate(n, seed=seed, end=end), token=TOKEN, requests_per_window=None,
                       search_per_second=None, daily_limit=None)
    with fake:
        conn.send(fake.base_url)
        conn.recv()


def _load(ctx: Context, n: int, seed: int, end: datetime) -> None:
    from leadloop.sandbox.simulator import funnel_pages, simulate

    t = time.perf_counter()
    for page in funnel_pages(simulate(n, seed=seed, end=end)):
        with session_scope(ctx.engine) as session:
            apply_page(session, ctx, "hubspot", "contacts", page)
    with session_scope(ctx.engine) as session:
        for stream in STREAMS:
            session.add(SyncState(source="hubspot", object_type=stream, cursor_updated_at=end,
                                  cursor_id="", last_success_at=end))
    print(f"loaded {n:,} leads in {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    sent = _first_export(ctx)
    print(f"first real export (every row accepted) and report: {sent:,} rows sent in "
          f"{time.perf_counter() - t:.0f} s", flush=True)


class _Statements:
    """Total time per distinct SQL statement while on."""

    def __init__(self, engine: Any) -> None:
        self.on = False
        self.total: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        self.params: dict[str, Any] = {}
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, conn: Any, cursor: Any, stmt: str, params: Any, context: Any,
                many: bool) -> None:
        conn.info["t0"] = time.perf_counter()

    def _after(self, conn: Any, cursor: Any, stmt: str, params: Any, context: Any,
               many: bool) -> None:
        if self.on:
            entry = self.total[stmt]
            entry[0] += time.perf_counter() - conn.info["t0"]
            entry[1] += 1
            if not many:
                self.params.setdefault(stmt, params)

    def report(self, engine: Any, top: int = 8) -> None:
        for stmt, (seconds, calls) in sorted(self.total.items(), key=lambda kv: -kv[1][0])[:top]:
            print(f"   {seconds:7.3f} s {calls:4d}x  {' '.join(stmt.split())[:300]}")
            if stmt.lstrip().upper().startswith("SELECT") and stmt in self.params:
                explain = ("EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite"
                           else "EXPLAIN ANALYZE ")
                with engine.connect() as conn:
                    plan = conn.exec_driver_sql(explain + stmt, self.params[stmt]).all()
                for row in plan:
                    print(f"{'':22}{row[-1]}")
        self.total.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--leads", type=int, default=200_000)
    ap.add_argument("--db", type=Path, required=True, help="the SQLite store (loaded if absent)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--statements", action="store_true")
    ap.add_argument("--postgres", action="store_true")
    args = ap.parse_args()

    if args.postgres:
        db_url = os.environ["LEADLOOP_BENCH_POSTGRES_URL"]
        with session_scope(make_engine(db_url)) as session:
            fresh = session.execute(select(SyncState.object_type)).first() is None
    else:
        fresh = not args.db.exists()
        db_url = f"sqlite:///{args.db.resolve()}"
    if fresh:
        end = datetime.now(UTC).replace(microsecond=0)
    else:
        with session_scope(make_engine(db_url)) as session:
            end = session.execute(select(SyncState.cursor_updated_at).where(
                SyncState.object_type == "contacts")).scalar_one()
    parent, child = mp.get_context("fork").Pipe()
    server = mp.get_context("fork").Process(target=_serve, args=(args.leads, args.seed, end, child))
    server.start()
    base_url = parent.recv()
    os.environ[TOKEN_ENV] = TOKEN
    with tempfile.TemporaryDirectory(prefix="leadloop-incr-") as tmpdir:
        tmp = Path(tmpdir)
        ctx = Context(settings=_settings(base_url, db_url, tmp), engine=make_engine(db_url),
                      dry_run=True, out_dir=tmp)
        if fresh:
            _load(ctx, args.leads, args.seed, end)
        statements = _Statements(ctx.engine) if args.statements else None
        stages = {
            "sync": lambda: record_run(ctx, "sync", lambda c: sync_source(
                c, HubSpotSource(c, search_per_second=1e6))),
            "export (dry run)": lambda: run_job(ctx, "export"),
        }
        print(f"store {db_url.rsplit('/', 1)[-1]} ({args.leads:,} leads), funnel end {end.isoformat()}")
        for i in range(args.repeat):
            for name, run in stages.items():
                profiler = cProfile.Profile() if args.profile and i == args.repeat - 1 else None
                if statements is not None:
                    statements.on = i == args.repeat - 1
                t = time.perf_counter()
                if profiler is not None:
                    profiler.enable()
                result = run()
                if profiler is not None:
                    profiler.disable()
                seconds = time.perf_counter() - t
                if not result.ok:
                    raise SystemExit(f"{name} failed: {result.error}")
                brief = {k: v for k, v in result.counts.items()
                         if isinstance(v, int) and k in ("pages", "leads", "stages", "events",
                                                         "built", "held", "due", "written")}
                print(f"   {name:<17} {seconds:6.3f} s  {brief}", flush=True)
                if profiler is not None:
                    pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
                if statements is not None and statements.on:
                    statements.report(ctx.engine)
        ctx.engine.dispose()
    parent.send("stop")
    server.join()


if __name__ == "__main__":
    main()
