"""Time the report job on a simulated store: `python bench/report_speed.py [N_LEADS]`.

Loads N simulated leads (stage history and micro events included) straight into a SQLite store,
then times `build_report_data` and the full `write_reports` (HTML with charts, JSON, CSVs).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from job_memory import demo_settings, load_store

from leadloop.context import Context
from leadloop.report import build_report_data, write_reports
from leadloop.store import make_engine


def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        db = tmp / "bench.db"
        print(f"leads={n:,} load_store_s={load_store(n, db, tmp):.1f}")
        settings = demo_settings(db, tmp)
        ctx = Context(settings=settings, engine=make_engine(settings.database.url))
        t = time.perf_counter()
        build_report_data(ctx)
        print(f"build_report_data_s={time.perf_counter() - t:.2f}")
        t = time.perf_counter()
        paths = write_reports(ctx, tmp / "out")
        size = (tmp / "out" / "report.html").stat().st_size
        print(f"write_reports_s={time.perf_counter() - t:.2f} files={len(paths)} html_kb={size / 1024:.0f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
