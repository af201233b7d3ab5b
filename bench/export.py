"""Benchmark: N conversions across every API destination against the local fake platforms.

Prints, per destination, requests made vs the minimum ceil(N / platform max), and overall the
build time, send time, and peak RSS of the process (the fakes run in it too). Usage:

    .venv/bin/python bench/export.py [--leads 20000] [--db sqlite|postgresql://...]

Each lead qualifies once and every destination gets one conversion per lead, so the number of
conversions is leads x 5 (100,000 with the default 20,000 leads).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.engine import Engine

from leadloop.config import settings_from_dict
from leadloop.context import Context
from leadloop.export.engine import run_export
from leadloop.identity import sha256_hex
from leadloop.sandbox.fake_platforms import FakePlatforms
from leadloop.store import insert_ignore, make_engine, session_scope
from leadloop.tables import Lead, StageChange

NOW_OFFSET = timedelta(days=2)


def load(engine: Engine, n: int, now: datetime) -> None:
    leads, stages = [], []
    for i in range(n):
        created = now - NOW_OFFSET - timedelta(days=1)
        leads.append({
            "source": "hubspot", "crm_id": str(10_000 + i), "created_at": created,
            "email_sha256": sha256_hex(f"p{i}@example.com"),
            "email_google_sha256": sha256_hex(f"p{i}@example.com"),
            "phone_e164_sha256": sha256_hex(f"+1650555{i:07d}"),
            "phone_digits_sha256": sha256_hex(f"1650555{i:07d}"),
            "gclid": f"Cj0KCQiA{i:08d}", "msclkid": f"ms{i:010d}", "li_fat_id": f"li-{i:010d}",
            "meta_lead_id": str(1_234_567_890_000_000 + i), "consent_ad_user_data": True,
            "consent_ad_personalization": True, "attributes": {},
        })
    with session_scope(engine) as session:
        insert_ignore(session, Lead, leads, conflict=("source", "crm_id"))
    with session_scope(engine) as session:
        ids = dict(session.execute(Lead.__table__.select().with_only_columns(  # type: ignore[attr-defined]
            Lead.crm_id, Lead.id)).all())
        for lead_id in ids.values():
            stages.append({"lead_id": lead_id, "field": "lifecyclestage",
                           "value": "salesqualifiedlead", "entered_at": now - NOW_OFFSET,
                           "deal_id": "", "is_lost": False})
        insert_ignore(session, StageChange, stages, conflict=("lead_id", "field", "value", "deal_id"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leads", type=int, default=20_000)
    parser.add_argument("--db", default="sqlite")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="leadloop-bench-"))
    url = f"sqlite:///{tmp / 'bench.db'}" if args.db == "sqlite" else args.db
    engine = make_engine(url)
    from leadloop.tables import utcnow

    now = utcnow()
    with FakePlatforms(now=lambda: now) as fakes:
        dests = {
            "gdm": {"kind": "google_data_manager", "operating_account_id": "1234567890",
                    "requests_per_minute": 100_000},
            "gads": {"kind": "google_ads", "customer_id": "1234567890"},
            "meta": {"kind": "meta", "dataset_id": "555000111"},
            "msads": {"kind": "microsoft"},
            "li": {"kind": "linkedin"},
        }
        for cfg in dests.values():
            cfg["base_url"] = fakes.urls[cfg["kind"]]
        actions = {"gdm": "7001", "gads": "7002", "meta": "Qualified", "msads": "SQL", "li": "9001"}
        settings = settings_from_dict({
            "crm": {"kind": "hubspot"}, "destinations": dests,
            "stages": [{"name": "Qualified", "crm_values": ["salesqualifiedlead"],
                        "field": "lifecyclestage", "value": 100.0, "currency": "EUR",
                        "macro": True, "destinations": actions}],
        }, base_dir=tmp)
        t0 = time.perf_counter()
        load(engine, args.leads, now)
        t_load = time.perf_counter() - t0
        ctx = Context(settings=settings, engine=engine, now=lambda: now)
        t0 = time.perf_counter()
        result = run_export(ctx)
        t_export = time.perf_counter() - t0
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        again = run_export(ctx)
        t_rerun = time.perf_counter() - t0
    total = sum(d["due"] for d in result["destinations"].values())
    print(f"store: {url.split('://')[0]}, leads: {args.leads:,}, conversions: {total:,}")
    print(f"{'destination':<12}{'sent':>10}{'requests':>10}{'minimum':>10}")
    for name, d in result["destinations"].items():
        print(f"{name:<12}{d.get('sent', 0):>10,}{d.get('requests', 0):>10}{d['min_requests']:>10}")
    print(f"load store: {t_load:.1f} s; export (build + rules + send): {t_export:.1f} s "
          f"({total / t_export:,.0f} conversions/s); re-run (nothing due): {t_rerun:.1f} s, "
          f"sent {again['sent']}")
    print(f"peak RSS (store load + export + fake servers): {peak_kib / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
