"""Benchmark: the outbox's bulk UPDATE by id on PostgreSQL, with and without a server-side
prepared statement (issue #17).

`make_engine` turns psycopg's prepared statements off (`prepare_threshold=None`, see
`store.make_engine`): a generic plan made while a table was nearly empty could stay. The outbox's
updates by id (`outbox.bulk_update`: results of a sent batch, refreshed rows, holds) are one
`executemany` per chunk, so each row's UPDATE is parsed and planned by the server. This loads N
leads with one conversion each per destination (as `bench/export.py`), builds the outbox, then
updates every row as a sent batch's results would (status, attempts, code, response, ...), in a
transaction that is rolled back, alternating: not prepared (as every other statement runs) and
prepared (`outbox.PREPARED_UPDATES`, as leadloop runs it). Prints rows/s of each, per round.

    .venv/bin/python bench/outbox_update.py --db postgresql://... [--leads 20000] [--rounds 3]

The database's leadloop tables are dropped and created again: give it a scratch database.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlmodel import Session, SQLModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo: bench/ helpers
from bench.export import load
from leadloop.config import settings_from_dict
from leadloop.export import outbox
from leadloop.export.outbox import build_outbox, bulk_update
from leadloop.store import make_engine, session_scope
from leadloop.tables import Conversion, ConversionStatus, utcnow


def _updates(session: Session, now: Any) -> list[dict[str, Any]]:
    ids = session.execute(select(Conversion.id)).scalars().all()  # type: ignore[call-overload]
    return [{"id": i, "attempts": 1, "platform_code": "OK", "request_id": f"req-{i // 1000}",
             "status": ConversionStatus.sent, "sent_at": now, "last_error": None,
             "next_attempt_at": None, "platform_response": {}} for i in ids]


def _timed(engine: Any, updates: list[dict[str, Any]], prepare: bool) -> float:
    outbox.PREPARED_UPDATES = prepare
    with Session(engine) as session:
        try:
            t = time.perf_counter()
            bulk_update(session, updates, job_run_id=1)
            session.flush()
            return time.perf_counter() - t
        finally:
            session.rollback()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="a scratch PostgreSQL database URL")
    parser.add_argument("--leads", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    engine = make_engine(args.db, check_schema=False)
    SQLModel.metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
    engine.dispose()
    engine = make_engine(args.db)
    now = utcnow()
    load(engine, args.leads, now)
    settings = settings_from_dict({
        "crm": {"kind": "hubspot"},
        "destinations": {"gdm": {"kind": "google_data_manager", "operating_account_id": "1"},
                         "meta": {"kind": "meta", "dataset_id": "1"}},
        "stages": [{"name": "Qualified", "crm_values": ["salesqualifiedlead"],
                    "field": "lifecyclestage", "value": 100.0, "currency": "EUR", "macro": True,
                    "destinations": {"gdm": "7001", "meta": "Qualified"}}],
    })
    with session_scope(engine) as session:
        build_outbox(session, settings, {"gdm": False, "meta": False}, now)
    with Session(engine) as session:
        updates = _updates(session, now + timedelta(minutes=1))
    print(f"{len(updates):,} outbox rows updated by id, each round rolled back")
    for r in range(args.rounds):
        for prepare in (False, True):
            s = _timed(engine, updates, prepare)
            print(f"round {r + 1}: prepares {'on ' if prepare else 'off'} {s:6.2f} s "
                  f"{len(updates) / s:10,.0f} rows/s", flush=True)
    engine.dispose()


if __name__ == "__main__":
    main()
