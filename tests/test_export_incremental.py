"""The export job looks only at leads changed since its last build, with the same result."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import delete, event, text
from sqlmodel import Session, func, select

from leadloop.crm.base import Page, StageIn
from leadloop.export.engine import run_export
from leadloop.export.outbox import build_outbox
from leadloop.sandbox.fake_platforms import FakePlatforms
from leadloop.store import session_scope
from leadloop.sync import apply_page
from leadloop.tables import Conversion, Lead, OutboxWatermark
from tests.scoring_helpers import SIM_END, demo_context, load_funnel


def _count(engine) -> int:
    with Session(engine) as s:
        return s.exec(select(func.count()).select_from(Conversion)).one()


def _sandbox_context(engine, tmp_path, monkeypatch, platforms: FakePlatforms):
    """The demo configuration exporting to the fake Google Data Manager and Meta."""
    monkeypatch.setenv("LEADLOOP_SANDBOX_GOOGLE_TOKEN", "t0ken-g")
    monkeypatch.setenv("LEADLOOP_SANDBOX_META_TOKEN", "t0ken-m")
    return demo_context(engine, tmp_path, destinations={
        "google_data_manager": {"base_url": platforms.urls["google_data_manager"],
                                "operating_account_id": "1234567890",
                                "token_env": "LEADLOOP_SANDBOX_GOOGLE_TOKEN"},
        "meta": {"base_url": platforms.urls["meta"], "dataset_id": "100000000000001",
                 "token_env": "LEADLOOP_SANDBOX_META_TOKEN"}})


def test_incremental_export_equals_a_full_build(sqlite_engine, tmp_path, monkeypatch):
    with FakePlatforms(now=lambda: SIM_END) as platforms:
        ctx = _sandbox_context(sqlite_engine, tmp_path, monkeypatch, platforms)
        load_funnel(ctx, 600)
        first = run_export(ctx)
        assert first["built"] > 0
        total = _count(sqlite_engine)

        ctx.now = lambda: SIM_END + timedelta(minutes=5)
        again = run_export(ctx)  # nothing changed: nothing built, nothing sent
        assert (again["built"], again["sent"], again["refreshed"]) == (0, 0, 0)
        assert again["held"] == first["held"]

        # one lead reaches the macro stage: exactly its conversions are built
        with Session(sqlite_engine) as s:
            crm_id = s.exec(select(Lead.crm_id).where(Lead.current_stage == "lead")).first()
        with session_scope(sqlite_engine) as session:
            apply_page(session, ctx, "hubspot", "contacts", Page(stages=[
                StageIn(crm_id, "lifecyclestage", "salesqualifiedlead", SIM_END)]))
        ctx.now = lambda: SIM_END + timedelta(minutes=10)
        third = run_export(ctx)
        assert third["built"] == 2  # Sales qualified -> Google and Meta
        assert _count(sqlite_engine) == total + 2

    # a full build over the same store now finds nothing left to do
    with session_scope(sqlite_engine) as session:
        full = build_outbox(session, ctx.settings, {"google_data_manager": False, "meta": False},
                            ctx.now())
    assert (full["built"], full["revisions"], full["refreshed"], full["withdrawn"]) == (0, 0, 0, 0)


def test_a_build_in_small_lead_ranges_equals_one_in_a_single_range(tmp_path, monkeypatch):
    """The outbox is built range by range of lead ids (bounded memory): the ranges must not
    change what is built."""
    from leadloop.export import outbox
    from leadloop.store import make_engine

    def build(name: str, chunk: int) -> list[tuple]:
        monkeypatch.setattr(outbox, "_LEAD_CHUNK", chunk)
        engine = make_engine(f"sqlite:///{tmp_path / name}.db")
        ctx = demo_context(engine, tmp_path)
        load_funnel(ctx, 300)
        with session_scope(engine) as session:
            build_outbox(session, ctx.settings, {"google_data_manager": False, "meta": False},
                         SIM_END)
        with Session(engine) as s:
            rows = s.exec(select(Conversion.order_id, Conversion.status, Conversion.value,
                                 Conversion.hold_rule).order_by(Conversion.order_id)).all()
        engine.dispose()
        return [tuple(r) for r in rows]

    small, whole = build("small", 7), build("whole", 1_000_000)
    assert small == whole and len(whole) > 100


@pytest.mark.parametrize("keyed", [0, 5_000])
def test_an_incremental_build_narrowed_by_ids_or_by_query_leaves_a_full_build_nothing(
        tmp_path, monkeypatch, keyed):
    """The changed leads of a build step are read by their ids when few (`_KEYED_LEADS`), else
    through the changed-leads query: either way the build does all a full build would."""
    from leadloop.export import outbox
    from leadloop.store import make_engine

    monkeypatch.setattr(outbox, "_LEAD_CHUNK", 40)
    monkeypatch.setattr(outbox, "_KEYED_LEADS", keyed)
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    ctx = demo_context(engine, tmp_path)
    load_funnel(ctx, 300)
    destinations: dict[str, bool | frozenset[str]] = {"google_data_manager": False, "meta": False}
    with session_scope(engine) as session:
        build_outbox(session, ctx.settings, destinations, SIM_END)
    with Session(engine) as s:
        crm_ids = s.exec(select(Lead.crm_id).where(Lead.current_stage == "lead")).all()[::3]
    later = SIM_END + timedelta(minutes=10)
    ctx.now = lambda: later
    with session_scope(engine) as session:
        apply_page(session, ctx, "hubspot", "contacts", Page(stages=[
            StageIn(c, "lifecyclestage", "salesqualifiedlead", SIM_END) for c in crm_ids]))
    with session_scope(engine) as session:
        incremental = build_outbox(session, ctx.settings, destinations, later,
                                   changed_since=SIM_END + timedelta(minutes=5))
    assert incremental["built"] == 2 * len(crm_ids) > 20  # Sales qualified -> Google and Meta
    with session_scope(engine) as session:
        full = build_outbox(session, ctx.settings, destinations, later)
    assert (full["built"], full["revisions"], full["refreshed"], full["withdrawn"]) == (0, 0, 0, 0)
    engine.dispose()


def test_an_export_that_wrote_many_rows_leaves_the_outbox_vacuumed(engine, tmp_path, monkeypatch):
    """PostgreSQL: after a bulk write no page of `conversion` is all-visible until a vacuum, and
    every run's count of held rows then visits the heap row by row; the run that wrote many
    rows vacuums the table at its end (SQLite has nothing to vacuum). Fewer rows: no vacuum."""
    import leadloop.export.engine as export_engine

    statements: list[str] = []
    event.listen(engine, "before_cursor_execute",
                 lambda _c, _cur, sql, *_a: statements.append(sql))
    with FakePlatforms(now=lambda: SIM_END) as platforms:
        ctx = _sandbox_context(engine, tmp_path, monkeypatch, platforms)
        load_funnel(ctx, 300)
        monkeypatch.setattr(export_engine, "VACUUM_AFTER_ROWS", 10**9)
        assert run_export(ctx)["built"] > 0
        assert not [s for s in statements if s.startswith("VACUUM")]
        with session_scope(engine) as session:  # the next run builds the rows again
            session.execute(delete(Conversion))
            session.execute(delete(OutboxWatermark))
        monkeypatch.setattr(export_engine, "VACUUM_AFTER_ROWS", 1)
        assert run_export(ctx)["built"] > 0
    vacuums = [s for s in statements if s.startswith("VACUUM")]
    if engine.dialect.name != "postgresql":
        assert vacuums == []
        return
    assert vacuums == ["VACUUM (ANALYZE) conversion"]
    with engine.connect() as conn:
        pages, visible = conn.execute(text(
            "SELECT relpages, relallvisible FROM pg_class WHERE relname = 'conversion'")).one()
    assert pages > 0 and visible == pages
