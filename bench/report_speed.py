"""Time the report job on a simulated store: `python bench/report_speed.py [N_LEADS]`.

Loads N simulated leads (stage history and micro events included) straight into a SQLite store,
then times `build_report_data` and the full `write_reports` (HTML with charts, JSON, CSVs).
"""

from __future__ import annotations

import sys
import tempfile
import time
import tomllib
from pathlib import Path

from leadloop.config import settings_from_dict
from leadloop.context import Context
from leadloop.crm.base import apply_page
from leadloop.report import build_report_data, write_reports
from leadloop.sandbox.simulator import funnel_pages, simulate
from leadloop.store import make_engine, session_scope


def main(n: int) -> None:
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        data = tomllib.loads((root / "config" / "demo.toml").read_text())
        data["database"]["url"] = f"sqlite:///{tmp}/bench.db"
        settings = settings_from_dict(data, base_dir=Path(tmp))
        engine = make_engine(settings.database.url)
        funnel = simulate(n, seed=7)
        ctx = Context(settings=settings, engine=engine)
        t = time.perf_counter()
        for page in funnel_pages(funnel):
            with session_scope(engine) as session:
                apply_page(session, ctx, "hubspot", "contacts", page)
        print(f"leads={n:,} load_store_s={time.perf_counter() - t:.1f}")
        t = time.perf_counter()
        build_report_data(ctx)
        print(f"build_report_data_s={time.perf_counter() - t:.2f}")
        t = time.perf_counter()
        paths = write_reports(ctx, Path(tmp) / "out")
        size = (Path(tmp) / "out" / "report.html").stat().st_size
        print(f"write_reports_s={time.perf_counter() - t:.2f} files={len(paths)} html_kb={size / 1024:.0f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
