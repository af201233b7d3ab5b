from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from sqlmodel import select

from leadloop.store import insert_ignore, lead_ids, session_scope, upsert
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
