"""Migrations: a store made by an earlier release is refused until `leadloop db upgrade`, which
brings it to the current schema without losing a row; the migrations build what tables.py says.

The earlier stores are built from the DDL those releases emitted (tests/old_stores/,
generated from each commit's tables.py), then filled with rows through plain SQL."""

from __future__ import annotations

import re
import threading
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from alembic import op
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import MetaData, create_engine, inspect, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, select

from leadloop import schema, tables
from leadloop.cli import cli
from leadloop.schema import StoreOutdatedError
from leadloop.store import make_engine, normalise_url

STORES = Path(__file__).parent / "old_stores"
PREVIOUS_RELEASE = "eec5278"  # the last release without migrations
FOUNDATION = "732beb8"  # the first release: indexes retired since, others not yet made

T0 = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
T1 = datetime(2026, 3, 9, 16, 0, 15, 250000, tzinfo=UTC)


def _bare_engine(url: str) -> Engine:
    """An engine that neither creates nor checks a schema."""
    return create_engine(normalise_url(url))


def _build_old_store(url: str, release: str) -> None:
    """Create the store `release` would have created, with one row in every table."""
    engine = _bare_engine(url)
    with engine.begin() as conn:
        ddl = (STORES / f"{release}_{engine.dialect.name}.sql").read_text()
        for statement in ddl.split(";\n"):
            statement = re.sub(r"^--.*$", "", statement, flags=re.M).strip()
            if statement:
                conn.execute(text(statement))
        old = MetaData()
        old.reflect(conn)
        for name, rows in _ROWS.items():
            for row in rows:
                conn.execute(old.tables[name].insert(), row)
    engine.dispose()


_ROWS: dict[str, list[dict[str, object]]] = {
    "lead": [
        {"id": 1, "source": "hubspot", "crm_id": "101", "object_type": "contact", "created_at": T0,
         "crm_updated_at": T1, "status": "active", "email_sha256": "a" * 64,
         "email_google_sha256": "b" * 64, "gclid": "Cj0KCQ", "utm_source": "google",
         "consent_ad_user_data": True, "current_stage": "salesqualifiedlead",
         "attributes": {"industry": "retail", "employees": 40}, "ingested_at": T0, "updated_at": T1},
        {"id": 2, "source": "hubspot", "crm_id": "102", "object_type": "contact", "created_at": T1,
         "status": "erased", "attributes": {}, "ingested_at": T1, "updated_at": T1},
    ],
    "lead_event": [{"id": 1, "lead_id": 1, "name": "demo_request", "occurred_at": T0, "value": 1.5}],
    "stage_change": [
        {"id": 1, "lead_id": 1, "field": "dealstage", "value": "closedwon", "entered_at": T1,
         "deal_id": "d-7", "amount": Decimal("1234.5600"), "currency": "EUR", "is_lost": False},
    ],
    "score": [{"id": 1, "lead_id": 1, "model_version": "m1", "probability": 0.25,
               "expected_value": Decimal("25.0000"), "currency": "EUR", "value_band": "high",
               "scored_at": T1}],
    "sync_state": [{"source": "hubspot", "object_type": "contact", "cursor_updated_at": T1,
                    "cursor_id": "102", "last_success_at": T1, "last_job_run_id": 1,
                    "extra": {"lookback_s": 300}}],
    "conversion": [
        {"id": 1, "order_id": "ll-abc", "destination": "google", "lead_id": 1, "stage": "Qualified",
         "revision": 0, "kind": "conversion", "conversion_action": "customers/1/actions/2",
         "conversion_time": T1, "value": Decimal("100.0000"), "currency": "EUR",
         "click_id_kind": "gclid", "click_id": "Cj0KCQ", "status": "sent", "attempts": 1,
         "platform_response": {"ok": True}, "created_at": T1, "sent_at": T1, "job_run_id": 1},
    ],
    "rejected_record": [{"id": 1, "job_run_id": 1, "source": "hubspot", "object_type": "contact",
                         "record_ref": "103", "flow_stage": "ingest", "reason": "no id",
                         "payload": {"email": None}, "created_at": T1}],
    "job_run": [{"id": 1, "name": "sync", "started_at": T0, "finished_at": T1, "outcome": "ok",
                 "counts": {"leads": 2, "runner": "host:42"}}],
    "validation_result": [
        {"id": 1, "job_run_id": 1, "computed_at": T1, "micro": "demo_request", "segment": "all",
         "n": 2, "n_with": 1, "n_without": 1, "macro_with": 1, "macro_without": 0, "lift": 2.0,
         "verdict": "inconclusive", "reason": "too few leads", "role": "micro", "details": {}},
    ],
    "daemon_lease": [{"name": "daemon", "owner": "host:42", "acquired_at": T0, "heartbeat_at": T1,
                      "expires_at": T1}],
    "erasure": [{"id": 1, "requested_at": T1, "selector": "crm_id:hubspot:102", "leads": 1,
                 "counts": {"lead_event": 0}}],
}


def _config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "leadloop.toml"
    path.write_text(
        f'[database]\nurl = "{url}"\n'
        '[crm]\nkind = "hubspot"\nbase_url = "http://127.0.0.1:9"\ntoken_env = "LEADLOOP_TEST_TOKEN"\n'
        '[[stages]]\nname = "Qualified"\ncrm_values = ["salesqualifiedlead"]\nmacro = true\n')
    return path


@pytest.mark.parametrize("release", [PREVIOUS_RELEASE, FOUNDATION])
def test_an_earlier_store_is_refused_then_upgraded_without_losing_a_row(db_url, tmp_path, release):
    _build_old_store(db_url, release)
    config = _config(tmp_path, db_url)

    with pytest.raises(StoreOutdatedError) as refused:
        make_engine(db_url)
    assert refused.value.exit_code == 2
    status = CliRunner().invoke(cli, ["-c", str(config), "status"])
    assert status.exit_code == 2
    lines = [line for line in status.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "leadloop db upgrade" in lines[0], status.output

    upgraded = CliRunner().invoke(cli, ["-c", str(config), "db", "upgrade"])
    assert upgraded.exit_code == 0, upgraded.output
    assert f"to {schema.head_revision()}" in upgraded.output
    again = CliRunner().invoke(cli, ["-c", str(config), "db", "upgrade"])
    assert again.exit_code == 0 and "is current" in again.output

    engine = make_engine(db_url)  # accepted now
    try:
        with engine.connect() as conn:
            for name, rows in _ROWS.items():
                assert conn.execute(text(f"SELECT count(*) FROM {name}")).scalar() == len(rows), name
        with Session(engine) as session:
            lead = session.exec(select(tables.Lead).where(tables.Lead.crm_id == "101")).one()
            assert (lead.created_at, lead.crm_updated_at) == (T0, T1)
            assert lead.status is tables.LeadStatus.active
            assert lead.attributes == {"industry": "retail", "employees": 40}
            assert (lead.email_sha256, lead.gclid, lead.consent_ad_user_data) == ("a" * 64, "Cj0KCQ",
                                                                                   True)
            erased = session.exec(select(tables.Lead).where(tables.Lead.crm_id == "102")).one()
            assert erased.status is tables.LeadStatus.erased
            won = session.exec(select(tables.StageChange)).one()
            assert (won.amount, won.entered_at, won.deal_id) == (Decimal("1234.5600"), T1, "d-7")
            sent = session.exec(select(tables.Conversion)).one()
            assert sent.status is tables.ConversionStatus.sent
            assert (sent.value, sent.platform_response) == (Decimal("100.0000"), {"ok": True})
            run = session.exec(select(tables.JobRun)).one()
            assert run.outcome is tables.JobOutcome.ok and run.counts["runner"] == "host:42"
            state = session.exec(select(tables.SyncState)).one()
            assert (state.cursor_updated_at, state.extra) == (T1, {"lookback_s": 300})
        _assert_schema_matches_tables(engine)
    finally:
        engine.dispose()


def test_the_outbox_watermark_moves_to_its_own_table_with_its_value(db_url, tmp_path):
    """A store at the baseline revision kept the outbox build watermark in `sync_state`: after
    `db upgrade` it is in `outbox_watermark`, so the next export rebuilds only what changed."""
    _build_old_store(db_url, PREVIOUS_RELEASE)
    engine = _bare_engine(db_url)
    with engine.begin() as conn:  # what `db upgrade` to the baseline leaves, with a watermark
        conn.execute(text(f"CREATE TABLE {schema.VERSION_TABLE} (version_num VARCHAR(32) NOT NULL "
                          f"PRIMARY KEY)"))
        conn.execute(text(f"INSERT INTO {schema.VERSION_TABLE} VALUES ('0001_baseline')"))
        old = MetaData()
        old.reflect(conn, only=["sync_state"])
        state = old.tables["sync_state"]
        conn.execute(state.insert(), {"source": "outbox", "object_type": "3f2a9c",
                                      "cursor_updated_at": T1, "last_success_at": T1, "extra": {}})
        conn.execute(state.insert(), {"source": "destination", "object_type": "meta",
                                      "extra": {"paused": {"at": "x"}}})
    engine.dispose()

    upgraded = CliRunner().invoke(cli, ["-c", str(_config(tmp_path, db_url)), "db", "upgrade"])
    assert upgraded.exit_code == 0, upgraded.output
    assert "0001_baseline" in upgraded.output and f"to {schema.head_revision()}" in upgraded.output

    engine = make_engine(db_url)
    try:
        with Session(engine) as session:
            mark = session.get(tables.OutboxWatermark, "3f2a9c")
            assert mark is not None and mark.last_build_started_at == T1
            left = {(s.source, s.object_type) for s in session.exec(select(tables.SyncState))}
            assert left == {("hubspot", "contact"), ("destination", "meta")}
        _assert_schema_matches_tables(engine)
    finally:
        engine.dispose()


def test_superseded_scores_go_and_each_lead_keeps_its_latest(db_url):
    """Stores before 0004 kept a score per lead and model version; the upgrade keeps each lead's
    latest (by `scored_at`, then `id`: what the report and the export read) and nothing else."""
    _build_old_store(db_url, PREVIOUS_RELEASE)
    engine = _bare_engine(db_url)
    with engine.begin() as conn:
        old = MetaData()
        old.reflect(conn, only=["score"])
        conn.execute(old.tables["score"].insert(), [
            {"id": 2, "lead_id": 1, "model_version": "m0", "probability": 0.1, "scored_at": T0},
            {"id": 3, "lead_id": 2, "model_version": "m0", "probability": 0.3, "scored_at": T1},
            {"id": 4, "lead_id": 2, "model_version": "m1", "probability": 0.4, "scored_at": T1},
        ])
    engine.dispose()
    engine = make_engine(db_url, check_schema=False)
    try:
        schema.upgrade(engine)
        with Session(engine) as session:
            kept = {(s.lead_id, s.model_version, s.probability)
                    for s in session.exec(select(tables.Score))}
        _assert_schema_matches_tables(engine)
    finally:
        engine.dispose()
    assert kept == {(1, "m1", 0.25), (2, "m1", 0.4)}


def test_a_store_from_before_the_previous_release_loses_its_retired_indexes(db_url):
    _build_old_store(db_url, FOUNDATION)
    engine = make_engine(db_url, check_schema=False)
    try:
        schema.upgrade(engine)
        indexes = {ix["name"] for name in ("lead", "lead_event", "score", "conversion")
                   for ix in inspect(engine).get_indexes(name)}
    finally:
        engine.dispose()
    assert not indexes & {"ix_lead_source", "ix_lead_utm_source", "ix_lead_event_name",
                          "ix_lead_event_lead_id", "ix_score_lead_id"}
    assert {"ix_lead_erased", "ix_conversion_hold", "ix_conversion_job_run_id",
            "ix_score_scored_at"} <= indexes


def test_a_migration_that_fails_leaves_the_store_as_it_was(db_url, monkeypatch):
    _build_old_store(db_url, FOUNDATION)

    def fail(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(op, "drop_index", fail)  # the baseline's last step
    engine = make_engine(db_url, check_schema=False)
    try:
        with pytest.raises(RuntimeError, match="disk full"):
            schema.upgrade(engine)
        indexes = {ix["name"] for ix in inspect(engine).get_indexes("conversion")}
        with engine.connect() as conn:
            assert schema.stored_revision(conn) is None
    finally:
        engine.dispose()
    assert "ix_conversion_hold" not in indexes  # created before the failure, rolled back


def test_migrations_build_what_tables_py_describes(db_url):
    """Fails when tables.py changes the schema without a revision in leadloop/migrations."""
    engine = make_engine(db_url, check_schema=False)  # empty: nothing created yet
    try:
        before, after = schema.upgrade(engine)
        assert (before, after) == (None, schema.head_revision())
        _assert_schema_matches_tables(engine)
    finally:
        engine.dispose()


def test_head_names_the_newest_migration_script():
    assert schema.scripts_head() == schema.head_revision()


def test_a_new_store_is_created_at_the_newest_revision(db_url):
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            assert schema.stored_revision(conn) == schema.head_revision()
    finally:
        engine.dispose()


def test_commands_starting_together_on_a_new_store_create_it_once(db_url):
    """Nobody sees the tables before their revision (which would read as an outdated store).
    Threads stand in for processes: each opens its own engine and connections."""
    for _ in range(5):
        assert _open_together(db_url, 6) == []
        engine = make_engine(db_url, check_schema=False)
        with engine.begin() as conn:
            assert conn.execute(text(f"SELECT count(*) FROM {schema.VERSION_TABLE}")).scalar() == 1
            SQLModel.metadata.drop_all(conn)
            conn.execute(text(f"DROP TABLE {schema.VERSION_TABLE}"))
        engine.dispose()


def _open_together(url: str, n: int) -> list[Exception]:
    errors: list[Exception] = []
    barrier = threading.Barrier(n)

    def open_store() -> None:
        barrier.wait()
        try:
            make_engine(url).dispose()
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return errors


def test_a_store_upgraded_by_a_newer_release_is_refused(db_url, tmp_path):
    make_engine(db_url).dispose()
    engine = _bare_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {schema.VERSION_TABLE} SET version_num = '9999_from_the_future'"))
    engine.dispose()
    result = CliRunner().invoke(cli, ["-c", str(_config(tmp_path, db_url)), "report"])
    assert result.exit_code == 2
    assert "newer leadloop release" in result.output


def _assert_schema_matches_tables(engine: Engine) -> None:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        differences = [d for d in compare_metadata(context, SQLModel.metadata)
                       if not _is_version_table(d)]
    assert differences == []


def _is_version_table(difference: object) -> bool:
    return (isinstance(difference, tuple) and difference[0] == "remove_table"
            and difference[1].name == schema.VERSION_TABLE)
