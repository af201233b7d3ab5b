"""`leadloop forget`: a person's identity, events, scores and unsent conversions go; the
erasure is recorded without the clear e-mail; other people are untouched; a re-sync does not
bring the person back."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from leadloop import erasure, lease
from leadloop.context import Context
from leadloop.crm.base import EventIn, LeadIn, Page, StageIn
from leadloop.erasure import forget_person
from leadloop.errors import LeadloopError
from leadloop.identity import hash_identity
from leadloop.scoring.card import ModelCard
from leadloop.store import session_scope
from leadloop.sync import apply_page
from leadloop.tables import (
    Conversion,
    ConversionStatus,
    Erasure,
    Lead,
    LeadEvent,
    LeadStatus,
    RejectedRecord,
    Score,
    StageChange,
)

T0 = datetime(2026, 2, 1, 9, 0, tzinfo=UTC)


def add_person(session: Session, crm_id: str, email: str, *, merged_into: int | None = None) -> int:
    identity, _ = hash_identity(email, "+1 650 555 1212")
    lead = Lead(source="hubspot", crm_id=crm_id, created_at=T0, gclid=f"gclid-{crm_id}",
                fbc=f"fb.1.1.{crm_id}", landing_page=f"https://x.test/?e={crm_id}",
                utm_source="google", attributes={"jobtitle": "CTO"},
                merged_into_id=merged_into, **identity.as_columns())
    session.add(lead)
    session.flush()
    assert lead.id is not None
    session.add(LeadEvent(lead_id=lead.id, name="demo_request", occurred_at=T0))
    session.add(Score(lead_id=lead.id, model_version="m1", probability=0.4))
    session.add(StageChange(lead_id=lead.id, field="lifecyclestage", value="salesqualifiedlead",
                            entered_at=T0 + timedelta(days=2)))
    for i, status in enumerate(ConversionStatus):
        session.add(Conversion(
            order_id=f"{crm_id}-{status.value}", destination="google_ads", lead_id=lead.id,
            stage=f"S{i}", conversion_action="a", conversion_time=T0, value=Decimal(100),
            currency="EUR", click_id_kind="gclid", click_id=f"gclid-{crm_id}", status=status,
        ))
    session.add(RejectedRecord(source="hubspot", object_type="contact.identity", record_ref=crm_id,
                               reason="phone: bad"))
    return lead.id


@pytest.fixture
def people(engine: Engine) -> dict[str, int]:
    with session_scope(engine) as session:
        ann = add_person(session, "101", "Ann.Lee+ads@gmail.com")
        old = add_person(session, "99", "ann.lee@gmail.com", merged_into=ann)
        bob = add_person(session, "202", "bob@example.org")
    return {"ann": ann, "ann_old": old, "bob": bob}


def rows(engine: Engine, model: type, **where: object) -> list:
    with session_scope(engine) as session:
        stmt = select(model)
        for key, value in where.items():
            stmt = stmt.where(getattr(model, key) == value)
        return list(session.exec(stmt))


def assert_erased(engine: Engine, lead_id: int) -> None:
    lead = rows(engine, Lead, id=lead_id)[0]
    assert lead.status == LeadStatus.erased
    assert lead.email_sha256 is lead.email_google_sha256 is lead.phone_e164_sha256 is None
    assert lead.gclid is lead.fbc is lead.landing_page is None and lead.attributes == {}
    assert lead.utm_source == "google"  # non-personal attribution stays for the statistics
    assert rows(engine, LeadEvent, lead_id=lead_id) == []
    assert rows(engine, Score, lead_id=lead_id) == []
    assert [c.status for c in rows(engine, Conversion, lead_id=lead_id)] == [ConversionStatus.sent]
    assert len(rows(engine, StageChange, lead_id=lead_id)) == 1


def assert_untouched(engine: Engine, lead_id: int) -> None:
    lead = rows(engine, Lead, id=lead_id)[0]
    assert lead.status == LeadStatus.active and lead.email_sha256 and lead.gclid
    assert len(rows(engine, LeadEvent, lead_id=lead_id)) == 1
    assert len(rows(engine, Conversion, lead_id=lead_id)) == len(ConversionStatus)


def test_forget_by_email_erases_the_person_and_merged_records(
    engine: Engine, make_context: Callable[..., Context], people: dict[str, int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    ctx = make_context(engine)
    # Google's Gmail rule: dots and +tags name the same mailbox
    summary = forget_person(ctx, email="  ANNLEE@gmail.com ", crm_id=None)
    assert summary.startswith("erased 2 lead(s) for e-mail sha256 ")
    assert "2 events, 2 scores, 12 unsent conversions and 2 rejected records deleted" in summary
    assert "2 conversion(s) already sent to ad platforms are kept" in summary
    assert "annlee" not in summary.lower()
    assert_erased(engine, people["ann"])
    assert_erased(engine, people["ann_old"])
    assert_untouched(engine, people["bob"])
    assert [r.record_ref for r in rows(engine, RejectedRecord)] == ["202"]
    (erasure,) = rows(engine, Erasure)
    # only a keyed hash: the identifier hash the platforms share is not kept
    assert erasure.selector.startswith("email:hmac-sha256:") and len(erasure.selector) == 18 + 64
    assert erasure.leads == 2 and erasure.counts["conversions_deleted"] == 12
    assert "annlee" not in caplog.text.lower()


def test_forget_by_crm_id(engine: Engine, make_context: Callable[..., Context],
                          people: dict[str, int]) -> None:
    summary = forget_person(make_context(engine), email=None, crm_id="202")
    assert summary.startswith("erased 1 lead(s) for hubspot record 202")
    assert_erased(engine, people["bob"])
    assert_untouched(engine, people["ann"])
    assert rows(engine, Erasure)[0].selector.startswith("crm_id:hubspot:hmac-sha256:")


def test_forget_waits_for_the_export_in_flight(engine: Engine, make_context: Callable[..., Context],
                                              people: dict[str, int]) -> None:
    """An export holds the outbox lease while its batch (with the person's hashes) is in
    flight: the erasure lands after it, never under it. The daemon's own lease does not count."""
    ctx = make_context(engine)
    assert lease.acquire(engine, "the daemon", timedelta(minutes=5), ctx.now())
    done = threading.Event()
    result: list[str] = []

    def forget() -> None:
        result.append(forget_person(ctx, email=None, crm_id="202"))
        done.set()

    ttl = timedelta(seconds=ctx.settings.schedule.lease_seconds)
    with lease.outbox_lease(engine, "export", ttl=ttl, now=ctx.now, stop=ctx.stop) as owner:
        assert owner is not None
        waiting = threading.Thread(target=forget, daemon=True)
        waiting.start()
        assert not done.wait(1.0)
        assert_untouched(engine, people["bob"])
        assert lease.holder(engine, lease.OUTBOX_LEASE).owner == owner
    assert done.wait(20)
    assert result[0].startswith("erased 1 lead(s)")
    assert_erased(engine, people["bob"])
    assert lease.holder(engine, lease.OUTBOX_LEASE) is None  # forget gave it back


def test_no_match_is_still_recorded(engine: Engine, make_context: Callable[..., Context],
                                    people: dict[str, int]) -> None:
    summary = forget_person(make_context(engine), email="nobody@example.org", crm_id=None)
    assert summary.startswith("no lead matched")
    assert rows(engine, Erasure)[0].leads == 0
    assert_untouched(engine, people["bob"])


def test_bad_selector_is_a_clear_error(engine: Engine, make_context: Callable[..., Context]) -> None:
    ctx = make_context(engine)
    with pytest.raises(LeadloopError, match="--email: e-mail is not of the form"):
        forget_person(ctx, email="not-an-address", crm_id=None)
    with pytest.raises(LeadloopError, match="exactly one"):
        forget_person(ctx, email="a@b.co", crm_id="1")


def test_a_later_sync_does_not_bring_the_person_back(
    engine: Engine, make_context: Callable[..., Context], people: dict[str, int]
) -> None:
    ctx = make_context(engine)
    forget_person(ctx, email=None, crm_id="101")
    page = Page(
        leads=[LeadIn(crm_id="101", created_at=T0, email="ann.lee@gmail.com", gclid="g-new"),
               LeadIn(crm_id="303", created_at=T0, email="cy@example.org")],
        stages=[StageIn(crm_id="101", field="lifecyclestage", value="customer", entered_at=T0)],
        events=[EventIn(crm_id="101", name="webinar", occurred_at=T0)],
    )
    with session_scope(engine) as session:
        counts = apply_page(session, ctx, "hubspot", "contacts", page)
    assert counts["leads"] == 1 and counts["rejected"] == 0
    assert_erased(engine, people["ann"])
    assert rows(engine, Lead, crm_id="303")[0].email_sha256


def test_a_sync_page_reads_erased_ids_only_while_the_source_has_an_erasure(
    engine: Engine, make_context: Callable[..., Context], people: dict[str, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Most stores have no erasure: a page's ids are looked up among erased leads only when
    the source has one, and an erasure made between two pages holds from the next page on."""
    keyed_reads: list[int] = []
    real_among = erasure.among
    monkeypatch.setattr(erasure, "among", lambda *a: keyed_reads.append(1) or real_among(*a))
    ctx = make_context(engine)
    page = Page(leads=[LeadIn(crm_id="101", created_at=T0, email="ann.lee@gmail.com")])
    with session_scope(engine) as session:
        session.add(Lead(source="salesforce", crm_id="101", created_at=T0,
                         status=LeadStatus.erased))  # another source's erasure does not count
    with session_scope(engine) as session:
        assert apply_page(session, ctx, "hubspot", "contacts", page)["leads"] == 1
    assert keyed_reads == []
    forget_person(ctx, email=None, crm_id="101")
    with session_scope(engine) as session:
        assert apply_page(session, ctx, "hubspot", "contacts", page)["leads"] == 0
    assert keyed_reads == [1]
    ann = rows(engine, Lead, id=people["ann"])[0]
    assert ann.status == LeadStatus.erased and ann.email_sha256 is None


def test_forget_leaves_no_trace_in_any_file_leadloop_wrote(tmp_path, monkeypatch) -> None:
    """Payload files of an earlier dry run, a model trained before attributes were screened,
    the SQLite file and its log: grep every file for the person afterwards."""
    import numpy as np
    import pandas as pd

    from leadloop.config import settings_from_dict
    from leadloop.identity import hash_email, hash_phone
    from leadloop.jobs import run_job
    from leadloop.sandbox.fake_platforms import FakePlatforms
    from leadloop.scoring import registry
    from leadloop.scoring.evaluate import fit_final
    from leadloop.scoring.features import Feature
    from leadloop.store import make_engine
    from tests.conftest import BASE_CONFIG
    from tests.export_helpers import NOW, full_lead, settings_sections

    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    for i in range(4):
        full_lead(engine, i)
    person, phone = "person1@example.com", "+1 650 555 1001"
    traces = {*hash_email(person), *hash_phone(phone), person}
    monkeypatch.setenv("LL_TEST_GADS_TOKEN", "tok-123456")
    with FakePlatforms(now=lambda: NOW) as fakes:
        sections = settings_sections(fakes.urls, ("gdm", "meta"),
                                     gdm={"token_env": "LL_TEST_GADS_TOKEN"})
        settings = settings_from_dict({**BASE_CONFIG, **sections,
                                       "model": {"dir": str(tmp_path / "models")},
                                       "report": {"out_dir": str(tmp_path / "reports")}},
                                      base_dir=tmp_path)
        ctx = Context(settings=settings, engine=engine, now=lambda: NOW, dry_run=True,
                      out_dir=tmp_path / "dry-run")
        run_job(ctx, "export")
    # a model from before attributes were screened: an e-mail column as a category
    rng = np.random.default_rng(0)
    x = pd.DataFrame({"utm_source": [person if i % 7 == 0 else f"s{i % 3}" for i in range(300)],
                      "visits": rng.integers(0, 9, 300).astype(float)})
    y = (rng.random(300) < 0.3).astype(int)
    feats = [Feature("utm_source", "category", "created"), Feature("visits", "numeric", "created")]
    registry.register(settings, ModelCard("old", created_at="2026-01-01", chosen="lr",
                                          library_versions=registry.library_versions()),
                      fit_final(x, y, feats, "logistic_regression"))

    def files_holding(needles: set[str]) -> set[str]:
        found = set()
        for path in tmp_path.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                if any(n.encode() in data for n in needles):
                    found.add(path.relative_to(tmp_path).as_posix())
                elif path.suffix == ".skops":
                    import zipfile
                    with zipfile.ZipFile(path) as z:
                        if any(n.encode() in z.read(m) for m in z.namelist() for n in needles):
                            found.add(path.relative_to(tmp_path).as_posix())
        return found

    before = files_holding(traces)
    assert any(p.startswith("dry-run/payloads/") for p in before)
    assert "models/old.skops" in before
    assert {"store.db", "store.db-wal"} & before
    later = Context(settings=settings, engine=engine, now=lambda: NOW)  # a later `forget` run
    summary = forget_person(later, email=person, crm_id=None)
    assert "model(s) removed" in summary
    engine.dispose()
    assert files_holding(traces) == set()
    others = {*hash_email("person2@example.com")}
    assert any(p.startswith("dry-run/payloads/") for p in files_holding(others))
    card = registry.load_card(settings, "old")
    assert card.artifact is None and "leadloop forget" in (card.fallback_reason or "")
