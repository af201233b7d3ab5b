"""Engine and session factory, schema creation, and the dialect-aware upsert helpers.

SQLite (WAL mode, the embedded default) and PostgreSQL (psycopg 3) are both first-class:
upserts use each dialect's `INSERT ... ON CONFLICT`, so re-running a page or a job is harmless.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache, partial
from itertools import repeat
from operator import is_, itemgetter
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import (
    JSON,
    Boolean,
    Numeric,
    String,
    Text,
    any_,
    bindparam,
    cast,
    column,
    event,
    null,
    or_,
    select,
    text,
)
from sqlalchemy import table as table_clause
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError
from sqlalchemy.pool import Pool
from sqlalchemy.types import TypeDecorator
from sqlmodel import Session, SQLModel, create_engine

from leadloop import schema, tables
from leadloop.config import check_database_url
from leadloop.errors import ConfigError, LeadloopError


def normalise_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here (SQLAlchemy's default would be psycopg2)."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.removeprefix("postgres://")
    return url


def make_engine(url: str, *, echo: bool = False, check_schema: bool = True) -> Engine:
    """Create the engine; create a new store's schema, and refuse a store made by an earlier
    release until `leadloop db upgrade` has migrated it (`check_schema=False`: that command).

    A URL that cannot work is a `ConfigError` naming `database.url` (exit 2); a PostgreSQL
    server that cannot be reached is one `LeadloopError` line (exit 1). A new SQLite file is
    created readable by its owner only (its WAL and shared-memory files take its mode)."""
    try:
        check_database_url(url)
        parsed = make_url(normalise_url(url))
    except (ValueError, ArgumentError) as exc:
        raise ConfigError("database.url", str(exc).splitlines()[0]) from None
    if parsed.drivername.startswith("sqlite"):
        _create_private_sqlite_file(Path(parsed.database or ""))
        engine = create_engine(
            parsed, echo=echo, connect_args={"check_same_thread": False, "timeout": 30}
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            _enable_wal(cur)
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            # deleted content is zeroed, not left in free pages (`leadloop forget`)
            cur.execute("PRAGMA secure_delete=ON")
            cur.close()

    elif parsed.drivername == "postgresql+psycopg":
        # No server-side prepared statements: PostgreSQL may keep one generic plan for a
        # prepared statement, and one first planned while a table was nearly empty (a new
        # store's backfill) kept its sequential scan as the table grew: at 20,000 leads the
        # sync's CRM-id lookup took 75 ms a page instead of 4 ms. Planning each time is cheap
        # next to the batch statements leadloop runs.
        engine = create_engine(parsed, echo=echo, pool_pre_ping=True,
                               connect_args={"prepare_threshold": None,
                                             "connect_timeout": _CONNECT_TIMEOUT_S})
    else:
        raise ConfigError("database.url", "must start with sqlite:/// or postgresql://")
    try:
        if check_schema:
            schema.ensure_current(engine, parsed.render_as_string(hide_password=True))
        else:
            engine.connect().close()
    except (OperationalError, InterfaceError) as exc:
        engine.dispose()
        raise _connection_error(parsed, exc) from None
    except LeadloopError:
        engine.dispose()
        raise
    return engine


_CONNECT_TIMEOUT_S = 10
_WAL_SWITCH_TIMEOUT_S = 30.0


def _enable_wal(cur: Any) -> None:
    """Put the file in WAL mode (persistent: later connections find it set and only read it).

    The switch needs the file to itself, and SQLite answers "database is locked" at once,
    without waiting out its busy timeout, when another connection is opening the same new file
    (several commands started together on a new store): retry until the timeout."""
    deadline = time.monotonic() + _WAL_SWITCH_TIMEOUT_S
    pause = 0.005
    while True:
        try:
            if cur.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.2)
# Words of a PostgreSQL connection error that mean the URL is wrong (a config error), not
# that the server is down: role or database missing, password refused.
_CONFIG_PROBLEMS = ("does not exist", "authentication failed", "no password supplied",
                    "permission denied", "password", "not permitted", "pg_hba.conf")


def _create_private_sqlite_file(path: Path) -> None:
    """Check the SQLite file's folder exists, and create a new file as 0600."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigError("database.url", f"the folder {str(folder)!r} of the SQLite file does "
                          "not exist")
    if path.is_dir():
        raise ConfigError("database.url", f"{str(path)!r} is a folder, not a database file")
    try:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    except OSError as exc:
        raise ConfigError("database.url", f"cannot create {str(path)!r}: {exc.strerror}") from None


def _connection_error(url: URL, exc: Exception) -> LeadloopError:
    """One line for a store that cannot be opened; the URL is shown without its password."""
    orig = getattr(exc, "orig", None) or exc
    detail = " ".join(str(orig).split()).removeprefix("connection failed: ")
    where = url.render_as_string(hide_password=True)
    if url.drivername.startswith("sqlite") or any(w in detail for w in _CONFIG_PROBLEMS):
        return ConfigError("database.url", f"cannot open {where}: {detail}")
    return LeadloopError(f"database.url: cannot reach the database server of {where}: {detail}",
                         hint="is PostgreSQL running and reachable from here?")


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


def insert_for(session: Session, table: Any) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        return sqlite.insert(table)
    if dialect == "postgresql":
        return postgresql.insert(table)
    raise NotImplementedError(dialect)


def _uniform(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Multi-row INSERTs need every row to carry the same keys."""
    rows = list(rows)
    if not rows:
        return rows
    first = rows[0].keys()
    if all(map(first.__eq__, map(dict.keys, rows))):
        return rows
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
    by default), or do nothing when `update` is empty. Rows repeating a key count once: the
    last one when updating, the first one when not (as if each were inserted in turn).

    `when_changed`: an existing row is updated only if one of these columns differs, so a
    record read again unchanged keeps its `updated_at` (and does not look changed to the jobs
    downstream)."""
    rows = _uniform(rows)
    if not rows:
        return
    cols = update if update is not None else [k for k in rows[0] if k not in conflict]
    rows = _one_per_key(rows, conflict, last=bool(cols))
    keys = list(rows[0])
    upsert_columns(session, model, dict(zip(keys, _by_column(rows, keys), strict=True)),
                   conflict=conflict, update=cols, when_changed=when_changed)


def upsert_columns(
    session: Session,
    model: type[SQLModel],
    columns: dict[str, list[Any]],
    *,
    shared: dict[str, Any] | None = None,
    conflict: Sequence[str],
    update: Sequence[str],
    when_changed: Sequence[str] = (),
    memos: dict[str, dict[Any, Any]] | None = None,
) -> None:
    """`upsert` of rows given column by column: `columns` maps a column to its value in each
    row (at most one row per key of `conflict`), `shared` a column to the value every row has.
    `memos`: per column, its values converted so far (`bind_values`), for a caller writing
    several chunks.

    The values are converted column by column (SQLAlchemy's own executemany built a parameter
    dict per row and ran each value through its column's bind processing: more time than the
    database spent writing) and sent in bulk: on SQLite one executemany of the driver; on
    PostgreSQL a COPY into a staging table and one INSERT ... SELECT from it (one statement of
    arrays through `unnest` cost more in psycopg's array dumping than it saved in round trips:
    100k sync 32.5-39.1 s against 30.7-33.9 s)."""
    table = model.__table__  # type: ignore[attr-defined]
    n = len(next(iter(columns.values())))
    if not n:
        return
    shared = dict(shared or {})
    shared.update(_omitted_defaults(table, [*columns, *shared]))
    memos = memos or {}
    bound = {f"v_{k}": bind_values(session, table.c[k], values, memos.get(k))
             for k, values in columns.items()}
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        # The shared values are parameters of the INSERT, not columns of every COPY row: the
        # outbox's new rows each dumped the same `{}` and time again (1M: ~10 s of the build).
        stmt = _upsert_statement(table, dialect, tuple(columns), tuple(conflict), tuple(update),
                                 tuple(when_changed), tuple(shared))
        _copy_to_staging(session, table, bound)
        session.execute(stmt, {f"s_{k}": value for k, value in shared.items()})
    else:
        bound.update({f"v_{k}": bind_values(session, table.c[k], [value]) * n
                      for k, value in shared.items()})
        stmt = _upsert_statement(table, dialect, (*columns, *shared), tuple(conflict),
                                 tuple(update), tuple(when_changed))
        executemany(session, stmt, bound)


def _one_per_key(rows: list[dict[str, Any]], conflict: Sequence[str], *, last: bool
                 ) -> list[dict[str, Any]]:
    """`rows` with one row per key of the `conflict` columns, in the order the keys first
    come: the key's last row (`last`) or its first."""
    given = [c for c in conflict if c in rows[0]]  # a column left out takes one default
    key_of: Any = itemgetter(*given) if given else (lambda _row: ())
    keys = list(map(key_of, rows))
    if len(set(keys)) == len(rows):
        return rows
    if last:
        return list(dict(zip(keys, rows, strict=True)).values())
    firsts: dict[Any, dict[str, Any]] = {}
    for key, row in zip(keys, rows, strict=True):
        firsts.setdefault(key, row)
    return list(firsts.values())


def _by_column(rows: list[dict[str, Any]], keys: list[str]) -> list[list[Any]]:
    """The values of `rows` (dicts holding `keys`), one list per key."""
    if len(keys) == 1:
        return [[row[keys[0]] for row in rows]]
    return list(map(list, zip(*map(itemgetter(*keys), rows), strict=True)))


def _omitted_defaults(table: Any, keys: Collection[str]) -> dict[str, Any]:
    """The Python-side defaults of the columns `keys` leaves out, as an INSERT would fill them
    (a callable called once: every row of one write gets the same time)."""
    defaults = {c.name: c.default for c in table.columns
                if c.name not in keys and c.default is not None and not c.primary_key}
    return {name: d.arg if d.is_scalar else d.arg(None) for name, d in defaults.items()}


@lru_cache(maxsize=64)
def _upsert_statement(table: Any, dialect: str, names: tuple[str, ...], conflict: tuple[str, ...],
                      cols: tuple[str, ...], when_changed: tuple[str, ...],
                      constants: tuple[str, ...] = ()) -> Any:
    """The INSERT ... ON CONFLICT statement, built once per shape (building it per page cost
    more than running it) of the columns `names`: on PostgreSQL inserted from the staging table
    of that name, with the columns `constants` the same in every row, bound once as `s_<name>`;
    on SQLite bound as `v_<name>` (see `executemany`)."""
    insert = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    if dialect == "postgresql":
        source = table_clause(_staging_name(table), *(column(n) for n in names))
        fixed = [cast(bindparam(f"s_{n}", type_=table.c[n].type), table.c[n].type)
                 for n in constants]
        insert = insert.from_select([*names, *constants], select(*source.c, *fixed))
    else:
        insert = insert.values({n: bindparam(f"v_{n}") for n in names})
    if not cols:
        return insert.on_conflict_do_nothing(index_elements=list(conflict))
    differs = or_(*(_as_text(table.c[c]).is_distinct_from(_as_text(insert.excluded[c]))
                    for c in when_changed)) if when_changed else None
    return insert.on_conflict_do_update(
        index_elements=list(conflict), set_={c: insert.excluded[c] for c in cols}, where=differs)


def bind_values(session: Session, column: Any, values: list[Any],
                memo: dict[Any, Any] | None = None) -> list[Any]:
    """`values` of `column` as the driver takes them: what SQLAlchemy's bind processing of the
    column's type makes of each (UTC times, enums, JSON, numbers; None included: JSON binds it
    as `null`).

    Text, enum, boolean and number columns repeat a few values over many rows: each distinct
    value is processed once (`memo`: those done so far, kept by a caller writing several
    chunks), equal values binding equally in these types. Not times (equal wall times of a
    zone's repeated hour are different instants) nor JSON (1, 1.0 and True are equal but
    serialise apart): those are processed value by value."""
    dialect = session.get_bind().dialect
    process = _bind_processor(column.type, dialect)
    if process is None:
        return values
    base = column.type.impl_instance if isinstance(column.type, TypeDecorator) else column.type
    if not isinstance(base, String | Boolean | Numeric):
        if values and all(map(is_, values, repeat(values[0]))):  # a write's time, say
            return [process(values[0])] * len(values)
        return list(map(process, values))
    if memo is None:
        memo = {}
    try:
        new = set(values).difference(memo)
    except TypeError:  # an unhashable value
        return list(map(process, values))
    for v in new:
        memo[v] = process(v)
    return list(map(memo.__getitem__, values))


@lru_cache(maxsize=256)
def _bind_processor(type_: Any, dialect: Any) -> Any:
    """The type's bind processing on `dialect` (None: values pass as they are); made once, not
    per call (a sync's page writes dozens of columns several times). UTC times on SQLite by
    `_sqlite_utc_text`."""
    impl = type_.dialect_impl(dialect)
    process = impl.bind_processor(dialect)
    if (isinstance(type_, tables.UTCDateTime) and isinstance(impl, TypeDecorator)
            and isinstance(impl.impl_instance, sqlite.DATETIME)
            and impl.impl_instance._storage_format == sqlite.DATETIME._storage_format):
        return partial(_sqlite_utc_text, process=process)
    return process


def _sqlite_utc_text(value: Any, process: Any) -> Any:
    """What `tables.UTCDateTime`'s binding on SQLite (`process`) makes of `value`: an aware
    datetime's UTC time as SQLite's DATETIME text (its default format, which is ISO 8601 with
    a space and microseconds), written by `datetime.isoformat` instead of a %-format of seven
    fields (half the time; a sync binds 500,000 times). Anything else goes to `process` (which
    refuses a naive time)."""
    if value.__class__ is datetime and value.tzinfo is not None:
        return value.astimezone(UTC).isoformat(" ", "microseconds")[:26]  # less "+00:00"
    return process(value)


def executemany(session: Session, stmt: Any, columns: dict[str, list[Any]]) -> None:
    """Run `stmt` once per row of `columns` (bind name -> driver-ready values, see
    `bind_values`) in one executemany of the driver, with no per-row work in SQLAlchemy."""
    sql, order = _compiled(stmt, session.get_bind().dialect)
    if order is not None:
        params: list[Any] = list(zip(*(columns[n] for n in order), strict=True))
    else:
        names = list(columns)
        params = [dict(zip(names, row, strict=True)) for row in zip(*columns.values(), strict=True)]
    if params:
        session.connection().exec_driver_sql(sql, params)


@lru_cache(maxsize=64)
def _compiled(stmt: Any, dialect: Any) -> tuple[str, tuple[str, ...] | None]:
    """`stmt`'s SQL for `dialect` and, for a positional paramstyle, its bind names in order
    (compiled once for the statements `_upsert_statement` keeps)."""
    compiled = stmt.compile(dialect=dialect)
    return str(compiled), tuple(compiled.positiontup) if compiled.positional else None


def _staging_name(table: Any) -> str:
    return f"staging_{table.name}"


def _copy_to_staging(session: Session, table: Any, bound: dict[str, list[Any]]) -> None:
    """PostgreSQL: COPY the rows (`v_<column>` -> its values, as `bind_values` makes them) into
    a temporary table shaped like `table`, to be inserted from with one set-based statement.
    Per-row INSERTs spent more time in the drivers (binding, pipelining) than the server spent
    writing: about 80 µs a row, against a few for COPY.

    The staging table is created once per connection, `ON COMMIT DELETE ROWS`: each commit
    empties it in place, so it is emptied by statement (TRUNCATE) only when written twice in one
    transaction. A sync page wrote three tables, each with a CREATE ... IF NOT EXISTS and a
    TRUNCATE (a new file and a catalog row each time): six of its twenty round trips. What the
    connection holds is tracked in its `info` (the listeners below)."""
    names = [k.removeprefix("v_") for k in bound]
    name = _staging_name(table)
    conn = session.connection()
    created = conn.info.setdefault(_STAGING_CREATED, set())
    written = conn.info.setdefault(_STAGING_WRITTEN, set())
    if name not in created:
        session.execute(text(f"CREATE TEMPORARY TABLE IF NOT EXISTS {name} ON COMMIT DELETE ROWS "
                             f"AS SELECT * FROM {table.name} WITH NO DATA"))
        created.add(name)
    if name in written:  # rows of an earlier write in this transaction are still there
        session.execute(text(f"TRUNCATE {name}"))
    written.add(name)
    cursor = conn.connection.cursor()
    with cursor.copy(f"COPY {name} ({', '.join(names)}) FROM STDIN") as copy:
        for values in zip(*bound.values(), strict=True):
            copy.write_row(values)


_STAGING_CREATED = "leadloop_staging_created"  # staging tables this connection has
_STAGING_WRITTEN = "leadloop_staging_written"  # ... written in its open transaction


# Each connection's record of its staging tables (`_copy_to_staging`) is kept true for every
# engine: a commit empties them; a rollback may also undo their creation (so may a savepoint's,
# which leaves the rows written before it); a connection the pool rolls back with a
# transaction still open (not through its Connection) is forgotten whole.


@event.listens_for(Engine, "commit")
def _staging_committed(conn: Any) -> None:
    conn.info.pop(_STAGING_WRITTEN, None)


@event.listens_for(Engine, "rollback")
def _staging_rolled_back(conn: Any) -> None:
    conn.info.pop(_STAGING_WRITTEN, None)
    conn.info.pop(_STAGING_CREATED, None)


@event.listens_for(Engine, "rollback_savepoint")
def _staging_savepoint_rolled_back(conn: Any, _name: Any, _context: Any) -> None:
    conn.info.pop(_STAGING_CREATED, None)


@event.listens_for(Pool, "reset")
def _staging_reset(dbapi_conn: Any, record: Any, state: Any) -> None:
    # The pool rolls back every connection it takes back, most with nothing open (committed).
    status = getattr(getattr(dbapi_conn, "info", None), "transaction_status", None)
    if not state.transaction_was_reset and status != psycopg.pq.TransactionStatus.IDLE:
        record.info.pop(_STAGING_WRITTEN, None)
        record.info.pop(_STAGING_CREATED, None)


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


def analyze_unanalyzed(engine: Engine, models: Sequence[type[SQLModel]]) -> list[str]:
    """PostgreSQL: ANALYZE those of these tables that have never been analysed; returns them.

    A new store has no statistics until autovacuum's first pass, a minute or more into a
    backfill. Without them the planner guessed that `source = 'hubspot'` matches 0.5 % of the
    leads and read all of them for each page's CRM-id lookup (30 ms a page at 100,000 leads,
    against 2 ms through the whole key). Statistics taken once the table is a few thousand
    rows big keep their proportions as it grows. No-op on SQLite."""
    if engine.dialect.name != "postgresql":
        return []
    names = [m.__table__.name for m in models]  # type: ignore[attr-defined]
    with engine.begin() as conn:
        fresh = list(conn.execute(
            text("SELECT relname FROM pg_class WHERE relname = ANY(:names) AND reltuples < 0"
                 " AND relkind = 'r' AND pg_table_is_visible(oid)"), {"names": names}).scalars())
        if fresh:
            conn.execute(text("ANALYZE " + ", ".join(fresh)))
    return fresh


def among(session: Session, column: Any, values: Collection[Any]) -> Any:
    """`column IN values`. On PostgreSQL as `= ANY(array)`, one parameter: an IN list is one
    bind parameter per value, which SQLAlchemy renders and psycopg parses anew per statement,
    and that cost more than the lookup itself (5 s of a 100,000-lead sync)."""
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam(None, list(values), type_=postgresql.ARRAY(column.type)))
    return column.in_(values)


def lead_ids(session: Session, source: str, crm_ids: Iterable[str]) -> dict[str, int]:
    """Map CRM ids of one source to our lead ids (only those that exist)."""
    return {crm_id: lead_id for crm_id, lead_id, _ in _lead_keys(session, source, crm_ids)}


def lead_ids_ingested_at(session: Session, source: str, crm_ids: Iterable[str], at: datetime
                         ) -> tuple[dict[str, int], set[int]]:
    """`lead_ids`, and the ids of those leads first stored at `at` (a sync page's time: the
    leads that page created, whatever another writer did meanwhile), in the same read."""
    ids: dict[str, int] = {}
    created: set[int] = set()
    for crm_id, lead_id, new in _lead_keys(session, source, crm_ids, ingested_at=at):
        ids[crm_id] = lead_id
        if new:
            created.add(lead_id)
    return ids, created


def _lead_keys(session: Session, source: str, crm_ids: Iterable[str], *,
               ingested_at: datetime | None = None) -> Iterator[tuple[str, int, Any]]:
    """(CRM id, lead id, whether first stored at `ingested_at`). The database compares the
    times: reading each back as a datetime cost 1.1-1.4 ms a page of 200, more than the reads
    it saves. The time is not in the (source, crm_id) index: each row is one table lookup more
    (~0.5 ms a page)."""
    ids = list(dict.fromkeys(crm_ids))
    lead = tables.Lead.__table__  # type: ignore[attr-defined]
    new = lead.c.ingested_at == ingested_at if ingested_at is not None else null()
    for i in range(0, len(ids), 5000):
        stmt = select(lead.c.crm_id, lead.c.id, new).where(
            lead.c.source == source, among(session, lead.c.crm_id, ids[i : i + 5000]))
        yield from session.execute(stmt)
