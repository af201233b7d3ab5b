"""The store's schema version: a new store is created at the newest revision, an older one is
refused until `leadloop db upgrade` has migrated it (Alembic, scripts in leadloop/migrations).

A revision is added whenever `tables.py` changes the schema (tests/test_migrations.py fails
until the migrations produce what `tables.py` describes).

Alembic (about 0.1 s to import) is imported only to create, migrate or judge a store that is
not at `migrations.HEAD`: opening a current store, what every command does, needs none of it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import SQLModel

from leadloop import tables  # noqa: F401  (its models fill SQLModel.metadata)
from leadloop.errors import LeadloopError
from leadloop.migrations import HEAD

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

MIGRATIONS = Path(__file__).with_name("migrations")
VERSION_TABLE = "alembic_version"
# Alembic narrates each step at INFO (plugins, context, revisions); leadloop says in one line
# what `db upgrade` did, and a new store's creation is not news.
logging.getLogger("alembic").setLevel(logging.WARNING)


class StoreOutdatedError(LeadloopError):
    """The store was made by an earlier release (or a newer one): it needs `leadloop db upgrade`
    (or that newer release) before anything reads or writes it."""

    exit_code = 2


def _config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _scripts() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config())


def head_revision() -> str:
    """The newest revision this release knows."""
    return HEAD


def scripts_head() -> str | None:
    """The newest revision in leadloop/migrations/versions (what `HEAD` must say)."""
    return _scripts().get_current_head()


def _known_revisions() -> set[str]:
    return {script.revision for script in _scripts().walk_revisions()}


def stored_revision(connection: Connection) -> str | None:
    """The store's revision; None for an empty database or one made before migrations."""
    if not inspect(connection).has_table(VERSION_TABLE):
        return None
    return connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()


def _is_empty(connection: Connection) -> bool:
    """No table of leadloop's yet (an `alembic_version` table alone does not count)."""
    names = set(inspect(connection).get_table_names())
    return not names & set(SQLModel.metadata.tables)


def ensure_current(engine: Engine, where: str) -> None:
    """Create a new store at the newest revision; refuse one that is not at it.

    `where` names the store in the message (the URL without its password)."""
    revision = _create_if_empty(engine)
    if revision == head_revision():
        return
    if revision is not None and revision not in _known_revisions():
        raise StoreOutdatedError(f"the store {where} was upgraded by a newer leadloop release "
                                 f"(schema revision {revision}); use that release or newer")
    raise StoreOutdatedError(f"the store {where} was made by an earlier leadloop release: run "
                             "`leadloop db upgrade` to bring it to this release's schema")


def _create_if_empty(engine: Engine) -> str | None:
    """The store's revision, after creating the schema of a new (empty) store at the newest.

    Another process sees a new store whole or not at all, never tables without their revision:
    the creation is one transaction (PostgreSQL and SQLite both have transactional DDL), taken
    under PostgreSQL's advisory lock, or SQLite's write lock up front, so that two processes
    starting on one new store create it once. Only an empty SQLite store takes the write lock:
    a store in use would make the check wait for a writer."""
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite" and _is_empty(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        _lock(conn)
        if _is_empty(conn):
            from alembic import command

            SQLModel.metadata.create_all(conn)
            command.stamp(_config(conn), "head", purge=True)
        revision = stored_revision(conn)
        conn.commit()
    return revision


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Migrate the store to the newest revision, in one transaction; returns (revision before,
    revision after). A store made before migrations has no revision: the baseline adopts it."""
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # else its DDL would run outside it
        _lock(conn)
        before = stored_revision(conn)
        if before is not None and before not in _known_revisions():
            raise StoreOutdatedError(f"the store's schema revision {before} is newer than this "
                                     "leadloop release knows; use that release or newer")
        from alembic import command

        command.upgrade(_config(conn), "head")
        after = stored_revision(conn)
        conn.commit()
    assert after is not None
    return before, after


def _lock(conn: Connection) -> None:
    """PostgreSQL: one process at a time creates or migrates a store (the lock ends with the
    transaction). SQLite serialises writers itself."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('leadloop schema'))"))
