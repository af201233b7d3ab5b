"""Engine and session factory, schema creation, and the dialect-aware upsert helpers.

SQLite (WAL mode, the embedded default) and PostgreSQL (psycopg 3) are both first-class:
upserts use each dialect's `INSERT ... ON CONFLICT`, so re-running a page or a job is harmless.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import JSON, Text, cast, event, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, create_engine

from leadloop import tables
from leadloop.errors import ConfigError

# SQLite limits bound parameters per statement; PostgreSQL allows 65,535. Chunk to stay under.
_MAX_PARAMS = 30_000


def normalise_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here (SQLAlchemy's default would be psycopg2)."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.removeprefix("postgres://")
    return url


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """Create the engine and the schema (no migrations yet: `create_all` is idempotent, and
    indexes added since a store was created are created on it)."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(
            url, echo=echo, connect_args={"check_same_thread": False, "timeout": 30}
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

    elif url.startswith("postgresql+psycopg"):
        engine = create_engine(url, echo=echo, pool_pre_ping=True)
    else:
        raise ConfigError("database.url", "must start with sqlite:/// or postgresql://")
    SQLModel.metadata.create_all(engine)
    with engine.begin() as conn:
        for table in SQLModel.metadata.sorted_tables:
            for index in table.indexes:
                index.create(conn, checkfirst=True)
    return engine


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on any exception."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def _insert_for(session: Session, table: Any) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        return sqlite.insert(table)
    if dialect == "postgresql":
        return postgresql.insert(table)
    raise NotImplementedError(dialect)


def _chunks(rows: Sequence[dict[str, Any]]) -> Iterator[Sequence[dict[str, Any]]]:
    if not rows:
        return
    size = max(1, _MAX_PARAMS // max(1, len(rows[0])))
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def _uniform(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Multi-row INSERTs need every row to carry the same keys."""
    rows = list(rows)
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    return [{k: r.get(k) for k in keys} for r in rows]


def upsert(
    session: Session,
    model: type[SQLModel],
    rows: Iterable[dict[str, Any]],
    *,
    conflict: Sequence[str],
    update: Sequence[str] | None = None,
    when_changed: Sequence[str] = (),
) -> None:
    """Insert rows; on a conflict of `conflict` columns update `update` columns (all others
    by default), or do nothing when `update` is empty.

    `when_changed`: an existing row is updated only if one of these columns differs, so a
    record read again unchanged keeps its `updated_at` (and does not look changed to the jobs
    downstream)."""
    rows = _uniform(rows)
    if not rows:
        return
    table = model.__table__  # type: ignore[attr-defined]
    cols = update if update is not None else [k for k in rows[0] if k not in conflict]
    # One statement compiled once and executed with a parameter list: SQLAlchemy batches it
    # ("insertmanyvalues"). A `.values(rows)` statement is recompiled per chunk with one bind
    # per cell, which made a 9,000-row page take seconds.
    stmt = _insert_for(session, table)
    if cols:
        differs = or_(*(_as_text(table.c[c]).is_distinct_from(_as_text(stmt.excluded[c]))
                        for c in when_changed)) if when_changed else None
        stmt = stmt.on_conflict_do_update(
            index_elements=list(conflict), set_={c: stmt.excluded[c] for c in cols}, where=differs
        )
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(conflict))
    for chunk in _chunks(rows):
        session.execute(stmt, list(chunk))


def _as_text(column: Any) -> Any:
    """JSON has no equality operator in PostgreSQL: compare its text instead."""
    return cast(column, Text) if isinstance(column.type, JSON) else column


def insert_ignore(
    session: Session,
    model: type[SQLModel],
    rows: Iterable[dict[str, Any]],
    *,
    conflict: Sequence[str],
) -> None:
    """Insert rows, skipping any that already exist (`ON CONFLICT DO NOTHING`)."""
    upsert(session, model, rows, conflict=conflict, update=[])


def id_chunks(ids: Collection[int] | None, size: int = 5000) -> list[list[int] | None]:
    """`ids` sorted in IN-list sized chunks; `[None]` (meaning: no filter) when `ids` is None."""
    if ids is None:
        return [None]
    ordered = sorted(ids)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def lead_ids(session: Session, source: str, crm_ids: Iterable[str]) -> dict[str, int]:
    """Map CRM ids of one source to our lead ids (only those that exist)."""
    ids = list(dict.fromkeys(crm_ids))
    out: dict[str, int] = {}
    lead = tables.Lead.__table__  # type: ignore[attr-defined]
    for i in range(0, len(ids), 5000):
        part = ids[i : i + 5000]
        stmt = select(lead.c.crm_id, lead.c.id).where(
            lead.c.source == source, lead.c.crm_id.in_(part)
        )
        out.update({crm_id: lead_id for crm_id, lead_id in session.execute(stmt)})
    return out
