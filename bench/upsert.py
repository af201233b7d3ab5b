"""Benchmark: `store.upsert` on SQLite as the sync and the score job call it (issue #17).

    .venv/bin/python bench/upsert.py [--leads 100000] [--rounds 2] [--db postgresql://...]
    /an/older/checkout/.venv/bin/python /an/older/checkout/bench/upsert.py   # other code

A new SQLite store per round by default; `--db` a PostgreSQL scratch database instead, whose
leadloop tables are dropped and made again each round.

The cycle's figures move by ±30 % on a shared machine; this times only the writes, with rows
built beforehand (not timed), shaped as the sync and the score job write them:
- `leads`: the sync's lead rows (29 columns: hashes, attribution, JSON attributes, four times)
  page by page, 200 a page, each page a transaction, upserted with the sync's options (every
  column but the key updated when one of them differs);
- `leads again`: the same pages read again unchanged (the look-back window): nothing is written;
- `stages`: three stage rows per lead (time, amount, deal), page by page;
- `scores`: one Score row per lead, in the score job's batches.
Prints wall and CPU seconds per write and round.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sqlalchemy import text
from sqlmodel import SQLModel

from leadloop.schema import VERSION_TABLE
from leadloop.scoring.model import SCORE_BATCH
from leadloop.store import lead_ids, make_engine, session_scope, upsert
from leadloop.tables import Lead, LeadStatus, Score, StageChange

PAGE = 200
CLICK_AND_UTM = ("gclid", "gbraid", "wbraid", "fbclid", "fbc", "msclkid", "li_fat_id",
                 "meta_lead_id", "utm_source", "utm_medium", "utm_campaign", "landing_page",
                 "country")


def _lead_rows(n: int, now: datetime, rng: random.Random) -> list[dict[str, Any]]:
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    rows = []
    for i in range(n):
        created = t0 + timedelta(seconds=rng.randrange(30_000_000))
        row: dict[str, Any] = {
            "source": "hubspot", "crm_id": str(1000 + i), "object_type": "contact",
            "created_at": created, "crm_updated_at": created + timedelta(days=rng.randrange(30)),
            "status": LeadStatus.active, "consent_ad_user_data": rng.choice([True, False, None]),
            "consent_ad_personalization": rng.choice([True, None]),
            "current_stage": rng.choice(["lead", "marketingqualifiedlead", "customer"]),
            "attributes": {"industry": rng.choice(["Software", "Retail", "Health"]),
                           "employees": rng.randrange(1, 5000), "source_form": f"form-{i % 7}"},
            "ingested_at": now, "updated_at": now,
            "email_sha256": f"{rng.getrandbits(256):064x}",
            "email_google_sha256": f"{rng.getrandbits(256):064x}",
            "phone_e164_sha256": f"{rng.getrandbits(256):064x}" if i % 5 < 3 else None,
            "phone_digits_sha256": f"{rng.getrandbits(256):064x}" if i % 5 < 3 else None,
        }
        for name in CLICK_AND_UTM:
            row[name] = (f"{name}-{rng.getrandbits(40):x}" if rng.random() < 0.3 else None)
        rows.append(row)
    return rows


def _stage_rows(ids: list[int], rng: random.Random) -> list[dict[str, Any]]:
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    rows = []
    for lead_id in ids:
        for field, value in (("lifecyclestage", "lead"), ("lifecyclestage", "salesqualifiedlead"),
                             ("dealstage", "closedwon")):
            deal = f"d{lead_id}" if field == "dealstage" else ""
            rows.append({"lead_id": lead_id, "field": field, "value": value,
                         "entered_at": t0 + timedelta(seconds=rng.randrange(30_000_000)),
                         "deal_id": deal, "amount": Decimal(rng.randrange(100, 99_999)) if deal
                         else None, "currency": "EUR" if deal else None, "is_lost": False})
    return rows


def _timed(label: str, write: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    wall, cpu = time.perf_counter(), time.process_time()
    write(*args, **kwargs)
    print(f"  {label:12} {time.perf_counter() - wall:6.2f} s wall {time.process_time() - cpu:6.2f}"
          " s CPU", flush=True)


def _in_pages(engine: Any, model: Any, rows: list[dict[str, Any]], size: int = PAGE,
              **options: Any) -> None:
    for start in range(0, len(rows), size):
        with session_scope(engine) as session:
            upsert(session, model, rows[start:start + size], **options)


def _new_store(url: str) -> Any:
    if url.startswith("postgresql"):
        engine = make_engine(url, check_schema=False)
        SQLModel.metadata.drop_all(engine)
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {VERSION_TABLE}"))
        engine.dispose()
    return make_engine(url)


def _round(url: str, leads: list[dict[str, Any]], rng: random.Random, now: datetime) -> None:
    engine = _new_store(url)
    columns = [k for k in leads[0] if k not in ("source", "crm_id", "ingested_at")]
    lead_options = {"conflict": ("source", "crm_id"), "update": columns,
                    "when_changed": [c for c in columns if c != "updated_at"]}
    _timed("leads", _in_pages, engine, Lead, leads, **lead_options)
    _timed("leads again", _in_pages, engine, Lead, leads, **lead_options)
    with session_scope(engine) as session:
        ids = list(lead_ids(session, "hubspot", [r["crm_id"] for r in leads]).values())
    _timed("stages", _in_pages, engine, StageChange, _stage_rows(ids, rng),
           conflict=("lead_id", "field", "value", "deal_id"),
           update=["entered_at", "amount", "currency", "is_lost"])
    scores = [{"lead_id": i, "model_version": "bench", "probability": p,
               "expected_value": (Decimal(str(round(p, 6))) * 250).quantize(Decimal("0.0001")),
               "currency": "EUR", "value_band": "high" if p > 0.5 else "low", "scored_at": now}
              for i, p in ((i, rng.random()) for i in ids)]
    _timed("scores", _in_pages, engine, Score, scores, SCORE_BATCH,
           conflict=("lead_id", "model_version"))
    engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--leads", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--db", help="a PostgreSQL scratch database (default: a new SQLite file)")
    args = ap.parse_args()
    rng = random.Random(17)
    now = datetime.now(UTC)
    leads = _lead_rows(args.leads, now, rng)
    for round_ in range(1, args.rounds + 1):
        print(f"round {round_}, {args.leads:,} leads", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            _round(args.db or f"sqlite:///{Path(tmp) / 'upsert.db'}", leads, rng, now)


if __name__ == "__main__":
    main()
