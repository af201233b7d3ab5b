"""Keeping rejects stays cheap as they pile up: the lookup of those already kept, made for each
synced page with a reject, goes through the (source, record_ref) index, not a scan."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import event

from leadloop.rejects import keep_rejects
from leadloop.store import make_engine, session_scope
from leadloop.tables import RejectedRecord

NOW = datetime(2026, 5, 4, tzinfo=UTC)


def _reject(ref: str) -> RejectedRecord:
    return RejectedRecord(source="hubspot", object_type="contact", record_ref=ref,
                          reason="no createdate", payload={}, created_at=NOW)


def test_the_lookup_of_kept_rejects_uses_its_index(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'rejects.db'}")
    try:
        with session_scope(engine) as session:
            keep_rejects(session, [_reject(str(i)) for i in range(500)])
        lookups: list[tuple[str, Any]] = []

        def seen(_conn: Any, _cursor: Any, sql: str, params: Any, *_: Any) -> None:
            if sql.lstrip().upper().startswith("SELECT") and "rejected_record" in sql:
                lookups.append((sql, params))

        event.listen(engine, "before_cursor_execute", seen)
        with session_scope(engine) as session:
            keep_rejects(session, [_reject("7"), _reject("new")])
        event.remove(engine, "before_cursor_execute", seen)
        with engine.connect() as conn:
            plans = [" ".join(str(row[-1]) for row in conn.exec_driver_sql(
                f"EXPLAIN QUERY PLAN {sql}", params)) for sql, params in lookups]
            kept = conn.exec_driver_sql("SELECT count(*) FROM rejected_record").scalar()
    finally:
        engine.dispose()
    assert lookups and all("USING INDEX ix_rejected_record_ref" in plan for plan in plans), plans
    assert kept == 501  # "7" was kept already: moved to this run, not added again
