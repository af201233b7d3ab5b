"""A small store whose report numbers are computed by hand in tests/test_report.py.

Sources: google (L1–L4), facebook (L5–L10), none (L11). Qualified: L1, L2, L5. Won: L1 (1,000).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy.engine import Engine

from leadloop.store import session_scope
from leadloop.tables import (
    Conversion,
    ConversionStatus,
    Lead,
    LeadEvent,
    Score,
    StageChange,
    ValidationResult,
)

T0 = datetime(2025, 1, 10, tzinfo=UTC)
NOW = datetime(2025, 3, 5, tzinfo=UTC)
HOSTILE_CAMPAIGN = '<script>alert("x")</script>'

REPORT_SECTIONS: dict[str, Any] = {
    "destinations": {"google": {"kind": "google_data_manager"}, "meta": {"kind": "meta"}},
    "micro_conversions": [{"name": "pricing_view", "event": "pricing_view"},
                          {"name": "newsletter_signup", "event": "newsletter_signup"}],
    "stages": [
        {"name": "Lead", "crm_values": ["lead"], "field": "lifecyclestage", "value": 0.0,
         "currency": "EUR"},
        {"name": "Qualified", "crm_values": ["salesqualifiedlead"], "field": "lifecyclestage",
         "value": 100.0, "currency": "EUR", "macro": True,
         "destinations": {"google": "qualified_lead", "meta": "QualifiedLead"}},
        {"name": "Won", "crm_values": ["closedwon"], "field": "dealstage", "value": "deal_amount",
         "currency": "EUR", "destinations": {"google": "won_deal"}},
    ],
}


def _lead(i: int, source: str | None, created: datetime, **kw: Any) -> Lead:
    return Lead(source="hubspot", crm_id=str(i), created_at=created, utm_source=source,
                utm_medium=kw.pop("medium", "cpc"), utm_campaign=kw.pop("campaign", "brand"),
                landing_page=kw.pop("landing_page", "https://example.com/demo"), **kw)


def populate(engine: Engine) -> dict[str, int]:
    """Insert the fixture; returns crm_id → lead id."""
    jan, feb = T0, T0 + timedelta(days=31)
    leads = [
        _lead(1, "google", jan, consent_ad_user_data=True, gclid="g-1",
              landing_page="https://example.com/demo?email=someone@example.com&utm_source=x"),
        _lead(2, "google", jan, consent_ad_user_data=False, gclid="g-2"),
        _lead(3, "google", feb, campaign=HOSTILE_CAMPAIGN),
        _lead(4, "google", feb, campaign="=HYPERLINK(\"http://evil\")"),
        _lead(5, "facebook", feb, medium="paid_social", campaign="leadform"),
        *[_lead(i, "facebook", feb, medium="paid_social", campaign="leadform") for i in range(6, 11)],
        _lead(11, None, jan, medium=None, campaign=None, landing_page=None),
    ]
    with session_scope(engine) as s:
        s.add_all(leads)
        s.flush()
        ids = {lead.crm_id: int(lead.id) for lead in leads}  # type: ignore[arg-type]
        lid = ids.__getitem__

        def stage(crm: str, field: str, value: str, days: float, **kw: Any) -> StageChange:
            created = next(x.created_at for x in leads if x.crm_id == crm)
            return StageChange(lead_id=lid(crm), field=field, value=value,
                               entered_at=created + timedelta(days=days), **kw)

        s.add_all([
            stage("1", "lifecyclestage", "lead", 0),
            stage("1", "lifecyclestage", "salesqualifiedlead", 5),
            stage("1", "dealstage", "closedwon", 40, deal_id="d1", amount=Decimal("1000")),
            stage("2", "lifecyclestage", "salesqualifiedlead", 10),
            stage("2", "dealstage", "closedlost", 30, deal_id="d2", amount=Decimal("500"),
                  is_lost=True),
            stage("5", "lifecyclestage", "salesqualifiedlead", 20),
            # a "closedwon" on the lead property is not the Won stage (wrong field)
            stage("6", "lifecyclestage", "closedwon", 3),
        ])
        s.add_all([
            LeadEvent(lead_id=lid("1"), name="pricing_view", occurred_at=jan + timedelta(days=1)),
            LeadEvent(lead_id=lid("1"), name="pricing_view", occurred_at=jan + timedelta(days=2)),
            LeadEvent(lead_id=lid("2"), name="pricing_view", occurred_at=jan + timedelta(days=1)),
            LeadEvent(lead_id=lid("4"), name="newsletter_signup", occurred_at=feb),
            LeadEvent(lead_id=lid("6"), name="newsletter_signup", occurred_at=feb),
            LeadEvent(lead_id=lid("7"), name="newsletter_signup", occurred_at=feb),
            LeadEvent(lead_id=lid("7"), name="page_view", occurred_at=feb),
        ])
        s.add_all([
            Score(lead_id=lid("1"), model_version="v1", probability=0.8,
                  expected_value=Decimal("80"), scored_at=feb),
            Score(lead_id=lid("2"), model_version="v1", probability=0.6,
                  expected_value=Decimal("60"), scored_at=feb),
            Score(lead_id=lid("3"), model_version="v1", probability=0.2,
                  expected_value=Decimal("20"), scored_at=feb),
            Score(lead_id=lid("4"), model_version="v1", probability=0.2,
                  expected_value=Decimal("20"), scored_at=feb),
        ])

        def conv(crm: str, dest: str, stg: str, action: str, value: str, status: ConversionStatus,
                 days: float, **kw: Any) -> Conversion:
            created = next(x.created_at for x in leads if x.crm_id == crm)
            return Conversion(order_id=f"{dest}-{crm}-{stg}", destination=dest, lead_id=lid(crm),
                              stage=stg, conversion_action=action, value=Decimal(value),
                              currency="EUR", status=status,
                              conversion_time=created + timedelta(days=days), **kw)

        s.add_all([
            conv("1", "google", "Qualified", "qualified_lead", "100", ConversionStatus.sent, 5,
                 attempts=1, click_id="g-1"),
            conv("1", "meta", "Qualified", "QualifiedLead", "100", ConversionStatus.sent, 5,
                 attempts=1),
            conv("1", "google", "Won", "won_deal", "1000", ConversionStatus.sent, 40, attempts=1,
                 click_id="g-1"),
            conv("2", "google", "Qualified", "qualified_lead", "100", ConversionStatus.rejected, 10,
                 attempts=1, platform_code="INVALID_CLICK_ID", last_error="click id not found"),
            conv("2", "meta", "Qualified", "QualifiedLead", "100", ConversionStatus.held, 10,
                 hold_rule="meta_event_older_than_7_days"),
            conv("5", "meta", "Qualified", "QualifiedLead", "100", ConversionStatus.sent, 20,
                 attempts=1),
            conv("5", "google", "Qualified", "qualified_lead", "100", ConversionStatus.dead, 20,
                 attempts=8, platform_code="UNAVAILABLE", last_error="503 from platform"),
        ])
        old = datetime(2025, 2, 1, tzinfo=UTC)
        new = datetime(2025, 2, 20, tzinfo=UTC)

        def vr(at: datetime, run: int, micro: str, segment: str, lift: float, verdict: str
               ) -> ValidationResult:
            return ValidationResult(
                job_run_id=run, computed_at=at, micro=micro, segment=segment, n=11, n_with=3,
                n_without=8, macro_with=2, macro_without=1, rate_with=2 / 3, rate_without=1 / 8,
                lift=lift, lift_ci_low=lift / 2, lift_ci_high=lift * 2, p_value=0.04, q_value=0.08,
                phi=0.4, median_days_to_macro=6.5, verdict=verdict,
                reason=f"{micro} reason <b>", role="secondary signal")

        s.add_all([
            vr(old, 1, "pricing_view", "all", 9.0, "weak"),
            vr(new, 2, "pricing_view", "all", 5.33, "predictive"),
            vr(new, 2, "newsletter_signup", "all", 0.5, "negative"),
            vr(new, 2, "pricing_view", "utm_source=google", 2.0, "not enough data"),
        ])
    return ids
