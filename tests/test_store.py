from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from sqlalchemy import text
from sqlmodel import select

from leadloop.store import (
    analyze_unanalyzed,
    insert_ignore,
    lead_ids,
    session_scope,
    upsert,
)
from leadloop.tables import Conversion, Lead, StageChange


def _lead(crm_id: str, **kw):
    return {"source": "hubspot", "crm_id": crm_id, "created_at": datetime(2026, 1, 1, tzinfo=UTC),
            "attributes": {}, **kw}


def test_upsert_is_keyed_by_source_and_crm_id(engine):
    with session_scope(engine) as s:
        upsert(s, Lead, [_lead("1", gclid="a"), _lead("2")], conflict=("source", "crm_id"))
    with session_scope(engine) as s:
        upsert(s, Lead, [_lead("1", gclid="b")], conflict=("source", "crm_id"))
        upsert(s, Lead, [{**_lead("1"), "source": "salesforce"}], conflict=("source", "crm_id"))
    with session_scope(engine) as s:
        rows = s.exec(select(Lead).order_by(Lead.source, Lead.crm_id)).all()
        assert [(r.source, r.crm_id, r.gclid) for r in rows] == [
            ("hubspot", "1", "b"), ("hubspot", "2", None), ("salesforce", "1", None)]
        assert set(lead_ids(s, "hubspot", ["1", "2", "404"])) == {"1", "2"}


def test_times_come_back_aware_utc_and_money_exact(engine):
    cet = timezone(timedelta(hours=1))
    with session_scope(engine) as s:
        upsert(s, Lead, [_lead("1", created_at=datetime(2026, 3, 1, 12, 0, tzinfo=cet))],
               conflict=("source", "crm_id"))
        lead_id = lead_ids(s, "hubspot", ["1"])["1"]
        s.add(StageChange(lead_id=lead_id, field="dealstage", value="closedwon",
                          entered_at=datetime(2026, 3, 2, tzinfo=UTC), amount=Decimal("1234.56")))
    with session_scope(engine) as s:
        lead = s.exec(select(Lead)).one()
        assert lead.created_at == datetime(2026, 3, 1, 11, 0, tzinfo=UTC)
        assert lead.created_at.tzinfo is not None
        assert s.exec(select(StageChange)).one().amount == Decimal("1234.56")


def test_naive_datetimes_are_refused(engine):
    with pytest.raises(Exception, match="naive datetime"), session_scope(engine) as s:
        upsert(s, Lead, [_lead("1", created_at=datetime(2026, 1, 1))], conflict=("source", "crm_id"))


def test_outbox_order_id_and_natural_key_are_unique(engine):
    with session_scope(engine) as s:
        upsert(s, Lead, [_lead("1")], conflict=("source", "crm_id"))
        lead_id = lead_ids(s, "hubspot", ["1"])["1"]
    row = {"order_id": "o-1", "destination": "meta", "lead_id": lead_id, "stage": "Qualified",
           "revision": 0, "conversion_action": "Qualified", "platform_response": {},
           "conversion_time": datetime(2026, 3, 1, tzinfo=UTC)}
    with session_scope(engine) as s:
        insert_ignore(s, Conversion, [row], conflict=("order_id",))
        insert_ignore(s, Conversion, [row], conflict=("order_id",))
    with session_scope(engine) as s:
        assert len(s.exec(select(Conversion)).all()) == 1


def test_a_batch_repeating_a_key_counts_once_like_rows_inserted_in_turn(engine):
    """PostgreSQL inserts a batch in one statement, which may not touch a row twice: a repeated
    key must behave as it did row by row (the last wins an update; the first stays otherwise)."""
    with session_scope(engine) as s:
        upsert(s, Lead, [_lead("1", gclid="first"), _lead("2"), _lead("1", gclid="last")],
               conflict=("source", "crm_id"))
    with session_scope(engine) as s:
        lead_id = lead_ids(s, "hubspot", ["1"])["1"]
        insert_ignore(s, StageChange, [
            {"lead_id": lead_id, "field": "f", "value": "v", "deal_id": "", "amount": Decimal(1),
             "entered_at": datetime(2026, 3, 1, tzinfo=UTC)},
            {"lead_id": lead_id, "field": "f", "value": "v", "deal_id": "", "amount": Decimal(2),
             "entered_at": datetime(2026, 3, 2, tzinfo=UTC)},
        ], conflict=("lead_id", "field", "value", "deal_id"))
    with session_scope(engine) as s:
        assert s.exec(select(Lead.gclid).where(Lead.crm_id == "1")).one() == "last"
        assert s.exec(select(StageChange.amount)).all() == [Decimal(1)]


def test_bulk_writes_keep_types_and_fill_python_side_defaults(engine):
    """The PostgreSQL path copies rows past SQLAlchemy: each type must still be bound as an
    INSERT would bind it, and columns left out get their model defaults."""
    cet = timezone(timedelta(hours=1))
    with session_scope(engine) as s:
        upsert(s, Lead, [_lead("1", created_at=datetime(2026, 3, 1, 12, tzinfo=cet),
                               attributes={"industry": "Software", "seats": 12, "ok": True},
                               consent_ad_user_data=False, current_stage="MQL")],
               conflict=("source", "crm_id"))
        lead_id = lead_ids(s, "hubspot", ["1"])["1"]
        upsert(s, StageChange, [{"lead_id": lead_id, "field": "dealstage", "value": "won",
                                 "entered_at": datetime(2026, 3, 2, tzinfo=UTC),
                                 "amount": Decimal("1234.56"), "currency": "EUR"}],
               conflict=("lead_id", "field", "value", "deal_id"))
    with session_scope(engine) as s:
        lead = s.exec(select(Lead)).one()
        assert lead.created_at == datetime(2026, 3, 1, 11, tzinfo=UTC)
        assert lead.attributes == {"industry": "Software", "seats": 12, "ok": True}
        assert lead.consent_ad_user_data is False and lead.consent_ad_personalization is None
        assert lead.status == "active" and lead.object_type == "contact"  # model defaults
        assert lead.ingested_at.tzinfo is not None and lead.updated_at.tzinfo is not None
        stage = s.exec(select(StageChange)).one()
        assert (stage.amount, stage.currency, stage.deal_id, stage.is_lost) == (
            Decimal("1234.56"), "EUR", "", False)


def test_two_batches_into_one_table_in_one_transaction_do_not_mix(engine):
    with session_scope(engine) as s:
        upsert(s, Lead, [_lead("1"), _lead("2")], conflict=("source", "crm_id"))
        upsert(s, Lead, [_lead("3")], conflict=("source", "crm_id"), update=["gclid"])
        upsert(s, Lead, [_lead("2", gclid="g")], conflict=("source", "crm_id"), update=["gclid"])
    with session_scope(engine) as s:
        rows = s.exec(select(Lead.crm_id, Lead.gclid).order_by(Lead.crm_id)).all()
        assert rows == [("1", None), ("2", "g"), ("3", None)]


def test_a_failed_batch_rolls_back_and_the_next_transaction_starts_clean(engine):
    with pytest.raises(Exception, match="naive datetime"), session_scope(engine) as s:
        upsert(s, Lead, [_lead("1"), _lead("2", created_at=datetime(2026, 1, 1))],
               conflict=("source", "crm_id"))
    with session_scope(engine) as s:
        upsert(s, Lead, [_lead("3")], conflict=("source", "crm_id"))
    with session_scope(engine) as s:
        assert s.exec(select(Lead.crm_id)).all() == ["3"]


def test_tables_never_analysed_get_statistics_once(engine):
    with session_scope(engine) as s:
        upsert(s, Lead, [_lead(str(i)) for i in range(300)], conflict=("source", "crm_id"))
    first = analyze_unanalyzed(engine, (Lead, StageChange))
    if engine.dialect.name == "sqlite":
        assert first == []  # SQLite plans by rule; nothing to do
        return
    assert sorted(first) == ["lead", "stage_change"]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT reltuples FROM pg_class WHERE relname = 'lead'")).scalar() == 300
    assert analyze_unanalyzed(engine, (Lead, StageChange)) == []
