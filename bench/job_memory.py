"""Peak memory and time of each job on a large store, each job in a fresh process.

    .venv/bin/python bench/job_memory.py [--leads 1000000] [--db PATH]

Loads N simulated leads (stage history and micro-events included) straight into a SQLite store
(no HTTP: `bench/cycle.py` measures the sync), then runs score (training included), validate,
export (dry run) and report, each as `leadloop.jobs.run_job` in its own child process, and
prints each one's wall time and peak RSS. A fresh process per job shows what the job itself
needs; `bench/cycle.py` shows the peaks of one long process (the daemon's case), where memory
a job freed is not always returned to the system.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
JOBS = ("score", "validate", "export", "report")


def demo_settings(db: Path, out: Path) -> Any:
    """The demo configuration on `db`, writing models and reports under `out`, dry-run export."""
    from leadloop.config import settings_from_dict

    data = tomllib.loads((ROOT / "config" / "demo.toml").read_text())
    data["database"]["url"] = f"sqlite:///{db}"
    for section in data["destinations"].values():
        section.pop("token_env", None)  # dry run: payload files only, nothing validated remotely
    data["model"]["dir"] = str(out / "models")
    data["report"]["out_dir"] = str(out)
    return settings_from_dict(data, source="bench", base_dir=out)


def load_store(n: int, db: Path, out: Path, seed: int = 7) -> float:
    """Write `n` simulated leads into the store at `db`; return the seconds it took."""
    from leadloop.context import Context
    from leadloop.sandbox.simulator import funnel_pages, simulate
    from leadloop.store import make_engine, session_scope
    from leadloop.sync import apply_page

    settings = demo_settings(db, out)
    engine = make_engine(settings.database.url)
    ctx = Context(settings=settings, engine=engine)
    started = time.perf_counter()
    for page in funnel_pages(simulate(n, seed=seed)):
        with session_scope(engine) as session:
            apply_page(session, ctx, "hubspot", "contacts", page)
    engine.dispose()
    return time.perf_counter() - started


def run_one(db: Path, out: Path, job: str) -> None:
    """Child process: run `job` once and print one JSON line."""
    from leadloop.context import Context
    from leadloop.jobs import run_job
    from leadloop.store import make_engine

    settings = demo_settings(db, out)
    ctx = Context(settings=settings, engine=make_engine(settings.database.url), dry_run=True,
                  out_dir=out)
    started = time.perf_counter()
    result = run_job(ctx, job)
    print(json.dumps({
        "job": job, "ok": result.ok, "seconds": round(time.perf_counter() - started, 1),
        "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "counts": {k: v for k, v in result.counts.items()
                   if isinstance(v, int | float | str) and k != "inputs"},
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--leads", type=int, default=1_000_000)
    ap.add_argument("--db", type=Path, help="reuse (or create) the store at this path")
    ap.add_argument("--child", nargs=3, metavar=("DB", "OUT", "JOB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_one(Path(args.child[0]), Path(args.child[1]), args.child[2])
        return
    with tempfile.TemporaryDirectory(prefix="leadloop-jobmem-") as tmpdir:
        out = Path(tmpdir)
        db = args.db or out / "bench.db"
        if not db.exists():
            print(f"loading {args.leads:,} simulated leads ... {load_store(args.leads, db, out):.1f} s",
                  flush=True)
        for job in JOBS:
            line = subprocess.run([sys.executable, __file__, "--child", str(db), str(out), job],
                                  check=True, capture_output=True, text=True).stdout.splitlines()[-1]
            r = json.loads(line)
            print(f"{r['job']:<9} {r['seconds']:8.1f} s  peak {r['peak_mb']:6,} MB  "
                  f"{json.dumps(r['counts'])[:140]}", flush=True)


if __name__ == "__main__":
    main()
