"""Benchmark the HubSpot sync (issue #3) against the fake HubSpot on 127.0.0.1.

    .venv/bin/python bench/sync.py            # 100,000 contacts
    .venv/bin/python bench/sync.py --full     # 1,000,000 contacts

The fake enforces a rolling 10-second window and a per-second search limit, set generously
(`--per-10s`, `--search-per-s`) so the run takes minutes, and the connector's client-side limiter is
set to the same plan. Prints records/s, the share of the search limit used, 429s received, peak
memory, and the ratio to the floor: the same search pages fetched and bulk-inserted by the
simplest possible loop (no limiter, no conversion, one table).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import tempfile
import time
from pathlib import Path

import requests

from leadloop.config import settings_from_dict
from leadloop.context import Context
from leadloop.crm.hubspot import HubSpotSource
from leadloop.sandbox.fake_hubspot import FakeHubSpot
from leadloop.sandbox.simulator import simulate
from leadloop.store import make_engine
from leadloop.sync import sync_source

TOKEN = "pat-bench-token-000"


def floor_run(base_url: str, db: Path, properties: list[str]) -> tuple[float, int]:
    """Simplest loop: page the same search (fresh query at the cap), insert rows in bulk."""
    con = sqlite3.connect(db)
    con.execute("create table c (id text primary key, props text)")
    h = {"Authorization": f"Bearer {TOKEN}"}
    started, n, floor_ms = time.perf_counter(), 0, 0
    with requests.Session() as s:
        while True:
            after, last_ms, seen, total = 0, floor_ms, 0, 0
            while True:
                body = {"filterGroups": [{"filters": [{"propertyName": "lastmodifieddate",
                                                       "operator": "GTE", "value": str(floor_ms)}]}],
                        "sorts": [{"propertyName": "lastmodifieddate", "direction": "ASCENDING"}],
                        "properties": properties, "limit": 200, "after": str(after)}
                data = s.post(f"{base_url}/crm/v3/objects/contacts/search", json=body, headers=h).json()
                rows = [(r["id"], json.dumps(r["properties"])) for r in data["results"]]
                con.executemany("insert or replace into c values (?, ?)", rows)
                con.commit()
                n, seen, total = n + len(rows), seen + len(rows), data["total"]
                if rows:
                    last_ms = max(last_ms, int(time.mktime(time.strptime(
                        data["results"][-1]["updatedAt"][:19], "%Y-%m-%dT%H:%M:%S")) * 1000))
                nxt = (data.get("paging") or {}).get("next", {}).get("after")
                if not nxt or int(nxt) >= 10_000:
                    break
                after = int(nxt)
            if seen >= total:
                break
            floor_ms = last_ms
    con.close()
    return time.perf_counter() - started, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--full", action="store_true", help="1,000,000 contacts")
    ap.add_argument("--contacts", type=int, default=None)
    ap.add_argument("--per-10s", type=int, default=2000, help="fake's request limit per 10 s")
    ap.add_argument("--search-per-s", type=int, default=60, help="fake's search limit per second")
    args = ap.parse_args()
    n = args.contacts or (1_000_000 if args.full else 100_000)

    t = time.perf_counter()
    funnel = simulate(n, seed=7)
    print(f"simulate({n:,}): {time.perf_counter() - t:.1f} s")
    fake = FakeHubSpot(funnel, token=TOKEN, requests_per_window=args.per_10s, window_seconds=10.0,
                       search_per_second=args.search_per_s, daily_limit=None)
    with fake, tempfile.TemporaryDirectory() as tmp:


        os.environ["LEADLOOP_BENCH_HUBSPOT_TOKEN"] = TOKEN
        settings = settings_from_dict({
            "crm": {"kind": "hubspot", "base_url": fake.base_url, "token_env": "LEADLOOP_BENCH_HUBSPOT_TOKEN",
                    "requests_per_10s": args.per_10s, "objects": ["contacts"]},
            "stages": [{"name": "SQL", "crm_values": ["salesqualifiedlead"], "macro": True}],
        })
        ctx = Context(settings=settings, engine=make_engine(f"sqlite:///{tmp}/bench.db"))
        source = HubSpotSource(ctx, search_per_second=args.search_per_s)
        t = time.perf_counter()
        totals = sync_source(ctx, source)
        elapsed = time.perf_counter() - t
        searches = sum(r.path.endswith("/search") for r in fake.received)
        print(f"connector: {totals['leads']:,} contacts, {totals['stages']:,} stages in {elapsed:.1f} s "
              f"= {totals['leads'] / elapsed:,.0f} records/s")
        print(f"search requests: {searches} = {searches / elapsed:.1f}/s of {args.search_per_s}/s allowed "
              f"({searches / elapsed / args.search_per_s:.0%} of the limit); 429s: {fake.rate_limited}")
        props = source.contact_properties()
        fake.received.clear()
        fake.search_per_second = None
        floor_s, floor_n = floor_run(fake.base_url, Path(tmp) / "floor.db", props)
        print(f"floor (no limiter, bulk insert): {floor_n:,} rows in {floor_s:.1f} s "
              f"= {floor_n / floor_s:,.0f} rows/s; connector/floor time ratio {elapsed / floor_s:.2f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS (whole process: fake + connector + floor): {peak:,.0f} MB")


if __name__ == "__main__":
    main()
