"""The PostgreSQL upsert path's staging tables (`store._copy_to_staging`): created once per
connection and emptied by each commit, they must never carry one write's rows into another,
whatever ended the transaction between them (commit, rollback, a savepoint's rollback). Run on
both backends: SQLite, which has no staging, must store the same."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import event, update
from sqlalchemy.engine import Engine
from sqlmodel import select

from leadloop.store import session_scope, upsert
from leadloop.tables import Lead

KEY = ("source", "crm_id")


def _lead(crm_id: str, label: str) -> dict[str, Any]:
    return {"source": "hubspot", "crm_id": crm_id, "created_at": datetime(2026, 1, 1, tzinfo=UTC),
            "attributes": {"label": label}}


def _labels(engine: Engine) -> dict[str, str]:
    with session_scope(engine) as session:
        return {lead.crm_id: lead.attributes["label"] for lead in session.exec(select(Lead))}


def _relabel(session: Any, crm_id: str, label: str) -> None:
    session.execute(update(Lead).where(Lead.crm_id == crm_id).values(attributes={"label": label}))


def test_a_second_write_in_one_transaction_does_not_write_the_first_again(engine: Engine) -> None:
    with session_scope(engine) as session:
        upsert(session, Lead, [_lead("a", "first")], conflict=KEY)
        _relabel(session, "a", "changed after the write")
        upsert(session, Lead, [_lead("b", "second")], conflict=KEY)
    assert _labels(engine) == {"a": "changed after the write", "b": "second"}


def test_a_commit_empties_the_staging_table(engine: Engine) -> None:
    with session_scope(engine) as session:
        upsert(session, Lead, [_lead("a", "first")], conflict=KEY)
    with session_scope(engine) as session:
        _relabel(session, "a", "changed later")
    with session_scope(engine) as session:
        upsert(session, Lead, [_lead("b", "second")], conflict=KEY)
    assert _labels(engine) == {"a": "changed later", "b": "second"}


def test_a_rollback_that_undid_the_staging_table_is_followed(engine: Engine) -> None:
    """The first write of a connection creates its staging table; the rollback of that
    transaction drops it again, and the next write must create it anew."""
    with pytest.raises(RuntimeError), session_scope(engine) as session:
        upsert(session, Lead, [_lead("a", "rolled back")], conflict=KEY)
        raise RuntimeError("the page fails after its first write")
    with session_scope(engine) as session:
        upsert(session, Lead, [_lead("b", "kept")], conflict=KEY)
    assert _labels(engine) == {"b": "kept"}


def test_a_savepoints_rollback_keeps_the_rows_written_before_it_out(engine: Engine) -> None:
    with session_scope(engine) as session:
        upsert(session, Lead, [_lead("a", "before the savepoint")], conflict=KEY)
        _relabel(session, "a", "changed before the savepoint")
        savepoint = session.begin_nested()
        upsert(session, Lead, [_lead("b", "undone")], conflict=KEY)
        savepoint.rollback()
        upsert(session, Lead, [_lead("c", "after the savepoint")], conflict=KEY)
    assert _labels(engine) == {"a": "changed before the savepoint", "c": "after the savepoint"}


def test_a_savepoint_that_created_the_staging_table_is_followed(engine: Engine) -> None:
    with session_scope(engine) as session:
        savepoint = session.begin_nested()
        upsert(session, Lead, [_lead("a", "undone")], conflict=KEY)
        savepoint.rollback()
        upsert(session, Lead, [_lead("b", "kept")], conflict=KEY)
    assert _labels(engine) == {"b": "kept"}


@pytest.mark.postgres
def test_later_pages_send_no_create_nor_truncate(engine: Engine) -> None:
    """The point of it: once a connection has its staging table, a transaction's write is its
    COPY and its INSERT, with no statement to create or empty the table."""
    if engine.dialect.name != "postgresql":
        pytest.skip("staging tables are PostgreSQL's")
    sent: list[str] = []
    with session_scope(engine) as session:
        upsert(session, Lead, [_lead("a", "first")], conflict=KEY)
    event.listen(engine, "before_cursor_execute", lambda *a: sent.append(a[2].split()[0]))
    for page in range(3):
        with session_scope(engine) as session:
            upsert(session, Lead, [_lead(f"p{page}", "page")], conflict=KEY)
    assert "CREATE" not in sent and "TRUNCATE" not in sent
    assert sent.count("INSERT") == 3
