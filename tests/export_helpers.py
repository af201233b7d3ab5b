"""Store fixtures and settings for the export tests: leads with click ids, stages, scores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy.engine import Engine

from leadloop.identity import hash_email, hash_phone
from leadloop.store import session_scope
from leadloop.tables import Lead, StageChange

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)

ALL_DESTINATIONS = {
    "gdm": {"kind": "google_data_manager", "operating_account_id": "123-456-7890",
            "login_account_id": "9876543210"},
    "gads": {"kind": "google_ads", "customer_id": "1234567890", "login_account_id": "111-222-3333"},
    "meta": {"kind": "meta", "dataset_id": "555000111"},
    "msads": {"kind": "microsoft", "customer_id": "42", "account_id": "4242"},
    "li": {"kind": "linkedin"},
}
ACTIONS = {"gdm": "7001", "gads": "7002", "meta": "Qualified", "msads": "Qualified lead", "li": "9001"}


def settings_sections(urls: dict[str, str], names: tuple[str, ...] = tuple(ALL_DESTINATIONS),
                      **overrides: Any) -> dict[str, Any]:
    dests = {}
    for name in names:
        cfg = dict(ALL_DESTINATIONS[name])
        cfg["base_url"] = urls.get(cfg["kind"], "http://127.0.0.1:1")
        cfg.update(overrides.get(name, {}))
        dests[name] = cfg
    stages = [
        {"name": "Lead", "crm_values": ["lead"], "field": "lifecyclestage", "value": 0.0,
         "currency": "EUR"},
        {"name": "Qualified", "crm_values": ["salesqualifiedlead"], "field": "lifecyclestage",
         "value": 100.0, "currency": "EUR", "macro": True,
         "destinations": {n: ACTIONS[n] for n in names}},
        {"name": "Won", "crm_values": ["closedwon"], "field": "dealstage", "value": "deal_amount",
         "currency": "EUR", "destinations": {n: ACTIONS[n] for n in names if n in ("gads", "msads")}},
    ]
    return {"destinations": dests, "stages": stages}


def add_lead(engine: Engine, crm_id: str, *, created: datetime, sql_at: datetime | None = None,
             won_at: datetime | None = None, amount: str | None = None, email: str | None = None,
             phone: str | None = None, consent: bool | None = True, **clicks: Any) -> int:
    em = emg = ph = phd = None
    if email:
        em, emg = hash_email(email)
    if phone:
        ph, phd = hash_phone(phone)
    with session_scope(engine) as session:
        lead = Lead(source="hubspot", crm_id=crm_id, created_at=created, email_sha256=em,
                    email_google_sha256=emg, phone_e164_sha256=ph, phone_digits_sha256=phd,
                    consent_ad_user_data=consent, consent_ad_personalization=consent, **clicks)
        session.add(lead)
        session.flush()
        lead_id = lead.id
        if sql_at:
            session.add(StageChange(lead_id=lead_id, field="lifecyclestage",
                                    value="salesqualifiedlead", entered_at=sql_at))
        if won_at:
            session.add(StageChange(lead_id=lead_id, field="dealstage", value="closedwon",
                                    entered_at=won_at, deal_id=f"d{crm_id}",
                                    amount=Decimal(amount) if amount else None, currency="EUR"))
    assert lead_id is not None
    return lead_id


def full_lead(engine: Engine, i: int, *, age: timedelta = timedelta(days=2), **kw: Any) -> int:
    """A lead every platform accepts: all click ids, hashes, consent, SQL `age` ago."""
    defaults: dict[str, Any] = dict(
        created=NOW - age - timedelta(days=1), sql_at=NOW - age,
        email=f"person{i}@example.com", phone=f"+1 650 555 {1000 + i:04d}",
        gclid=f"Cj0KCQiA{i:06d}", msclkid=f"msclk{i:08d}", li_fat_id=f"li-{i:08d}",
        meta_lead_id=str(1234567890123000 + i),
    )
    defaults.update(kw)
    return add_lead(engine, f"{1000 + i}", **defaults)
