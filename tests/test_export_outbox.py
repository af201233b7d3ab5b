"""The outbox: deterministic order ids, idempotent builds, revisions, rules and outcomes."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlmodel import Session, select

from leadloop.config import settings_from_dict
from leadloop.context import Context
from leadloop.export.engine import run_export
from leadloop.export.outbox import order_id
from leadloop.http import make_session
from leadloop.sandbox.fake_platforms import FakePlatforms
from leadloop.store import session_scope
from leadloop.tables import (
    Conversion,
    ConversionStatus,
    Lead,
    LeadStatus,
    RejectedRecord,
    Score,
    StageChange,
)
from tests.conftest import BASE_CONFIG
from tests.export_helpers import NOW, add_lead, full_lead, settings_sections


def make_ctx(engine: Any, fakes: FakePlatforms, tmp_path: Path, names: tuple[str, ...] = ("gads",),
             clock: Any = None, **overrides: Any) -> Context:
    sections = settings_sections(fakes.urls, names, **overrides)
    settings = settings_from_dict({**BASE_CONFIG, **sections}, base_dir=tmp_path)
    return Context(settings=settings, engine=engine, now=clock or (lambda: NOW),
                   http_factory=partial(make_session, retries=0))


def rows(engine: Any) -> list[Conversion]:
    with Session(engine) as s:
        return list(s.exec(select(Conversion).order_by(Conversion.id)))  # type: ignore[arg-type]


def test_order_id_is_deterministic_and_pii_free() -> None:
    a = order_id("gads", "hubspot", "1001", "Qualified", 0)
    assert a == order_id("gads", "hubspot", "1001", "Qualified", 0)
    assert a != order_id("gads", "hubspot", "1001", "Qualified", 1)
    assert a != order_id("meta", "hubspot", "1001", "Qualified", 0)
    assert len(a) == 32 and int(a, 16) >= 0


def test_rerun_builds_nothing_new_and_sends_once(engine: Any, fakes: FakePlatforms,
                                                  tmp_path: Path) -> None:
    for i in range(3):
        full_lead(engine, i)
    ctx = make_ctx(engine, fakes, tmp_path)
    first = run_export(ctx)
    assert first["built"] == 3 and first["sent"] == 3
    second = run_export(ctx)
    assert second["built"] == 0 and second["sent"] == 0 and second["requests"] == 0
    assert len(rows(engine)) == 3
    assert len(fakes.received("google_ads")) == 1
    assert {r.order_id for r in rows(engine)} == set(fakes.ledgers["google_ads"])


def test_crash_between_send_and_commit_never_makes_a_second_order_id(
        engine: Any, fakes: FakePlatforms, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(4):
        full_lead(engine, i)
    ctx = make_ctx(engine, fakes, tmp_path)
    from leadloop.export import engine as export

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("power cut after the platform answered")

    monkeypatch.setattr(export, "apply_results", crash)
    with pytest.raises(RuntimeError):
        run_export(ctx)
    assert all(r.status == ConversionStatus.pending for r in rows(engine))
    monkeypatch.undo()
    result = run_export(ctx)
    # The platform saw the same four order ids twice and answered "already exists" the 2nd time.
    assert result["sent"] == 4 and result["built"] == 0
    sent = rows(engine)
    assert {r.platform_code for r in sent} == {"CLICK_CONVERSION_ALREADY_EXISTS"}
    assert len({r.order_id for r in sent}) == 4 == len(fakes.ledgers["google_ads"])
    bodies = [req.json() for req in fakes.received("google_ads")]
    assert [c["orderId"] for c in bodies[0]["conversions"]] == \
        [c["orderId"] for c in bodies[1]["conversions"]]


def test_two_builders_at_once_insert_one_row(engine: Any, fakes: FakePlatforms,
                                             tmp_path: Path) -> None:
    from leadloop.export.outbox import build_outbox

    full_lead(engine, 1)
    ctx = make_ctx(engine, fakes, tmp_path)
    with Session(engine) as s1, Session(engine) as s2:
        build_outbox(s1, ctx.settings, {"gads": True}, NOW)
        s1.commit()
        build_outbox(s2, ctx.settings, {"gads": True}, NOW)
        s2.commit()
    assert len(rows(engine)) == 1


def test_value_change_after_send_becomes_restatement_then_retraction(
        engine: Any, fakes: FakePlatforms, tmp_path: Path) -> None:
    lead_id = full_lead(engine, 1, age=timedelta(days=3), won_at=NOW - timedelta(days=3),
                        amount="1000")
    ctx = make_ctx(engine, fakes, tmp_path)
    assert run_export(ctx)["sent"] == 2  # Qualified + Won
    with session_scope(engine) as s:
        s.execute(update(StageChange).where(StageChange.value == "closedwon")  # type: ignore[arg-type]
                  .values(amount=Decimal("1500")))
    result = run_export(ctx)
    assert result["revisions"] == 1 and result["sent"] == 1
    restated = [r for r in rows(engine) if r.revision == 1]
    assert restated[0].kind == "restatement" and restated[0].value == Decimal("1500")
    adj = fakes.adjustments["google_ads"][-1]
    assert adj["adjustmentType"] == "RESTATEMENT"
    assert adj["orderId"] == order_id("gads", "hubspot", "1001", "Won", 0)
    assert adj["restatementValue"] == {"adjustedValue": 1500.0, "currencyCode": "EUR"}
    # The deal is closed lost afterwards: the won conversion is retracted.
    with session_scope(engine) as s:
        s.add(StageChange(lead_id=lead_id, field="dealstage", value="closedlost", deal_id="d1001",
                          entered_at=NOW - timedelta(days=2), is_lost=True))
    result = run_export(ctx)
    assert result["revisions"] == 1
    assert fakes.adjustments["google_ads"][-1]["adjustmentType"] == "RETRACTION"
    assert "restatementValue" not in fakes.adjustments["google_ads"][-1]
    assert run_export(ctx)["revisions"] == 0  # a retraction is final
    won = [r for r in rows(engine) if r.stage == "Won"]
    assert [(r.revision, r.kind, r.status) for r in won] == [
        (0, "conversion", "sent"), (1, "restatement", "sent"), (2, "retraction", "sent")]


def test_deleted_lead_after_send_is_retracted_and_unsent_is_withdrawn(
        engine: Any, fakes: FakePlatforms, tmp_path: Path) -> None:
    sent_lead = full_lead(engine, 1, age=timedelta(days=3))
    unsent_lead = full_lead(engine, 2, age=timedelta(days=3), gclid=None, email=None, phone=None)
    ctx = make_ctx(engine, fakes, tmp_path)
    run_export(ctx)
    with session_scope(engine) as s:
        s.execute(update(Lead).where(Lead.id.in_([sent_lead, unsent_lead]))  # type: ignore[union-attr]
                  .values(status=LeadStatus.deleted))
    result = run_export(ctx)
    assert result["revisions"] == 1 and result["withdrawn"] == 1
    by_lead = {(r.lead_id, r.revision): r for r in rows(engine)}
    assert by_lead[(sent_lead, 1)].kind == "retraction"
    assert by_lead[(unsent_lead, 0)].status == ConversionStatus.withdrawn


def test_destination_without_adjustments_gets_no_revisions(engine: Any, fakes: FakePlatforms,
                                                           tmp_path: Path) -> None:
    lead_id = full_lead(engine, 1)
    ctx = make_ctx(engine, fakes, tmp_path, names=("meta",))
    run_export(ctx)
    with session_scope(engine) as s:
        s.execute(update(Lead).where(Lead.id == lead_id).values(status=LeadStatus.merged))  # type: ignore[arg-type]
    assert run_export(ctx)["revisions"] == 0


@pytest.mark.parametrize(("name", "kw", "rule"), [
    ("gads", {"gclid": None, "email": None, "phone": None}, "no_click_id"),
    ("gads", {"consent": False}, "consent_denied"),
    ("meta", {"meta_lead_id": None}, "no_meta_lead_id"),
    ("meta", {"age": timedelta(days=8)}, "event_too_old"),
    ("msads", {"msclkid": None}, "no_click_id"),
    ("msads", {"age": timedelta(days=91)}, "event_too_old"),
    ("li", {"li_fat_id": None, "email": None}, "no_linkedin_id"),
    ("gdm", {"sql_at": NOW + timedelta(hours=1)}, "in_future"),
])
def test_rules_hold_rows_with_their_reason(sqlite_engine: Any, fakes: FakePlatforms, tmp_path: Path,
                                           name: str, kw: dict, rule: str) -> None:
    full_lead(sqlite_engine, 1, **kw)
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=(name,))
    result = run_export(ctx)
    assert result["held"] == 1 and result["sent"] == 0
    (row,) = rows(sqlite_engine)
    assert (row.status, row.hold_rule) == (ConversionStatus.held, rule)
    assert fakes.received(ALL_KIND[name]) == []


ALL_KIND = {"gads": "google_ads", "gdm": "google_data_manager", "meta": "meta",
            "msads": "microsoft", "li": "linkedin"}


def test_held_row_is_released_when_the_data_arrives(sqlite_engine: Any, fakes: FakePlatforms,
                                                    tmp_path: Path) -> None:
    lead_id = full_lead(sqlite_engine, 1, gclid=None, email=None, phone=None)
    ctx = make_ctx(sqlite_engine, fakes, tmp_path)
    assert run_export(ctx)["held"] == 1
    with session_scope(sqlite_engine) as s:
        s.execute(update(Lead).where(Lead.id == lead_id).values(gclid="Cj0late"))  # type: ignore[arg-type]
    result = run_export(ctx)
    assert result["held"] == 0 and result["sent"] == 1
    assert rows(sqlite_engine)[0].click_id == "Cj0late"


def test_google_adjustment_waits_24h(sqlite_engine: Any, fakes: FakePlatforms, tmp_path: Path) -> None:
    full_lead(sqlite_engine, 1, age=timedelta(hours=3), won_at=NOW - timedelta(hours=3), amount="10")
    ctx = make_ctx(sqlite_engine, fakes, tmp_path)
    run_export(ctx)
    with session_scope(sqlite_engine) as s:
        s.execute(update(StageChange).values(amount=Decimal("20")))
    assert run_export(ctx)["held"] == 1
    (adj,) = [r for r in rows(sqlite_engine) if r.revision == 1]
    assert adj.hold_rule == "adjustment_too_recent"


def test_predicted_value_waits_for_a_score(sqlite_engine: Any, fakes: FakePlatforms,
                                           tmp_path: Path) -> None:
    lead_id = full_lead(sqlite_engine, 1)
    sections = settings_sections(fakes.urls, ("gads",))
    sections["stages"][1]["value"] = "predicted"
    settings = settings_from_dict({**BASE_CONFIG, **sections}, base_dir=tmp_path)
    ctx = Context(settings=settings, engine=sqlite_engine, now=lambda: NOW,
                  http_factory=partial(make_session, retries=0))
    run_export(ctx)
    assert rows(sqlite_engine)[0].hold_rule == "no_score"
    with session_scope(sqlite_engine) as s:
        s.add(Score(lead_id=lead_id, model_version="m1", probability=0.4,
                    expected_value=Decimal("123.45"), currency="EUR", scored_at=NOW))
    assert run_export(ctx)["sent"] == 1
    assert fakes.ledgers["google_ads"][rows(sqlite_engine)[0].order_id]["conversionValue"] == 123.45


def test_per_row_outcomes_rejected_retry_and_duplicate(engine: Any, fakes: FakePlatforms,
                                                       tmp_path: Path) -> None:
    for i in range(3):
        full_lead(engine, i)
    ctx = make_ctx(engine, fakes, tmp_path)
    oid = [order_id("gads", "hubspot", f"{1000 + i}", "Qualified", 0) for i in range(3)]
    fakes.reject("google_ads", oid[0], "UNPARSEABLE_GCLID")
    fakes.reject("google_ads", oid[1], "TOO_RECENT_EVENT")
    result = run_export(ctx)
    assert (result["sent"], result["rejected"], result["failed"]) == (1, 1, 1)
    by = {r.order_id: r for r in rows(engine)}
    assert by[oid[0]].status == ConversionStatus.rejected
    assert by[oid[0]].platform_code == "UNPARSEABLE_GCLID"
    assert by[oid[1]].status == ConversionStatus.failed
    assert by[oid[1]].next_attempt_at == NOW + timedelta(hours=6)
    with Session(engine) as s:
        rec = s.exec(select(RejectedRecord)).one()
    assert rec.flow_stage == "export" and rec.record_ref == oid[0]
    assert "UNPARSEABLE_GCLID" in rec.reason
    # not due yet: nothing is sent; six hours later it goes out
    assert run_export(ctx)["requests"] == 0
    del fakes._row_errors["google_ads"][oid[1]]
    later = make_ctx(engine, fakes, tmp_path, clock=lambda: NOW + timedelta(hours=6, minutes=1))
    assert run_export(later)["sent"] == 1


def test_transient_failures_back_off_then_dead_letter(sqlite_engine: Any, fakes: FakePlatforms,
                                                      tmp_path: Path) -> None:
    full_lead(sqlite_engine, 1)
    clock = [NOW]
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, clock=lambda: clock[0],
                   gads={"max_attempts": 3})
    for attempt in range(3):
        fakes.fail_next("google_ads", "503")
        result = run_export(ctx)
        (row,) = rows(sqlite_engine)
        assert row.attempts == attempt + 1
        if attempt < 2:
            assert result["failed"] == 1 and row.next_attempt_at is not None
            clock[0] = row.next_attempt_at + timedelta(seconds=1)
    assert result["dead"] == 1 and row.status == ConversionStatus.dead


def test_429_retry_after_sets_next_attempt(sqlite_engine: Any, fakes: FakePlatforms,
                                           tmp_path: Path) -> None:
    full_lead(sqlite_engine, 1)
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("meta",))
    fakes.fail_next("meta", "429", retry_after=90)
    assert run_export(ctx)["failed"] == 1
    assert rows(sqlite_engine)[0].next_attempt_at == NOW + timedelta(seconds=90)


def test_http_session_rides_through_one_429(sqlite_engine: Any, fakes: FakePlatforms,
                                            tmp_path: Path) -> None:
    full_lead(sqlite_engine, 1)
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("li",))
    ctx.http_factory = partial(make_session, retries=2, backoff_factor=0)
    fakes.fail_next("linkedin", "429", retry_after=0)
    assert run_export(ctx)["sent"] == 1
    assert len(fakes.received("linkedin")) == 2


def test_fast_fail_is_bisected_to_the_bad_row(sqlite_engine: Any, fakes: FakePlatforms,
                                              tmp_path: Path) -> None:
    for i in range(8):
        full_lead(sqlite_engine, i)
    bad = order_id("meta", "hubspot", "1005", "Qualified", 0)
    fakes.reject("meta", bad, "INVALID_LEAD_ID")
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("meta",))
    result = run_export(ctx)
    assert (result["sent"], result["rejected"]) == (7, 1)
    assert result["requests"] <= 1 + 2 * 3  # log2(8) levels of halving
    by = {r.order_id: r for r in rows(sqlite_engine)}
    assert by[bad].status == ConversionStatus.rejected and by[bad].platform_code == "100/2804053"


def test_data_manager_names_the_bad_event(sqlite_engine: Any, fakes: FakePlatforms,
                                          tmp_path: Path) -> None:
    for i in range(3):
        full_lead(sqlite_engine, i)
    with session_scope(sqlite_engine) as s:  # a corrupt hash reaches the payload
        s.execute(update(Lead).where(Lead.crm_id == "1001").values(email_google_sha256="z" * 64))  # type: ignore[arg-type]
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("gdm",))
    result = run_export(ctx)
    # the fast-fail names events[1]: that row is rejected, the other two re-sent in one request
    assert (result["sent"], result["rejected"], result["requests"]) == (2, 1, 2)
    by = {r.lead_id: r for r in rows(sqlite_engine)}
    assert by[2].platform_code == "INVALID_HEX_ENCODING"
    assert "events[1].user_data" in (by[2].last_error or "")


def test_data_manager_diagnostics_are_stored(sqlite_engine: Any, fakes: FakePlatforms,
                                             tmp_path: Path) -> None:
    for i in range(2):
        full_lead(sqlite_engine, i)
    fakes.reject("google_data_manager", order_id("gdm", "hubspot", "1000", "Qualified", 0),
                 "PROCESSING_ERROR_REASON_INVALID_GCLID")
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("gdm",))
    result = run_export(ctx)
    assert result["destinations"]["gdm"]["diagnosed"] == 1
    for row in rows(sqlite_engine):
        assert row.status == ConversionStatus.sent and row.platform_code == "PARTIAL_SUCCESS"
        assert row.platform_response["diagnostics"]["errorCounts"] == {
            "PROCESSING_ERROR_REASON_INVALID_GCLID": 1}


def test_auth_failure_stops_one_destination_not_the_others(sqlite_engine: Any, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from leadloop.errors import FatalDestinationError

    monkeypatch.setenv("LL_TEST_META_TOKEN", "wrong-token")
    with FakePlatforms(now=lambda: NOW, require_token="right-token") as fakes:
        full_lead(sqlite_engine, 1)
        monkeypatch.setenv("LL_TEST_LI_TOKEN", "right-token")
        ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("meta", "li"),
                       meta={"token_env": "LL_TEST_META_TOKEN"}, li={"token_env": "LL_TEST_LI_TOKEN"})
        with pytest.raises(FatalDestinationError) as exc:
            run_export(ctx)
        assert "wrong-token" not in str(exc.value) and "190" in str(exc.value)
        status = {r.destination: r.status for r in rows(sqlite_engine)}
        assert status == {"meta": ConversionStatus.pending, "li": ConversionStatus.sent}
        assert all("wrong-token" not in (r.last_error or "") for r in rows(sqlite_engine))


def test_dry_run_writes_payloads_and_sends_nothing(sqlite_engine: Any, fakes: FakePlatforms,
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                   ) -> None:
    for i in range(3):
        full_lead(sqlite_engine, i)
    monkeypatch.setenv("LL_TEST_GADS_TOKEN", "tok-123456")
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("gads", "meta"),
                   gads={"token_env": "LL_TEST_GADS_TOKEN"}, meta={"token_env": "LL_TEST_GADS_TOKEN"})
    ctx.dry_run, ctx.out_dir = True, tmp_path / "out"
    result = run_export(ctx)
    assert result["sent"] == 0
    assert all(r.status == ConversionStatus.pending for r in rows(sqlite_engine))
    # Google Ads has validate-only and credentials: it was asked to validate; Meta got nothing.
    (req,) = fakes.received("google_ads")
    assert req.json()["validateOnly"] is True
    assert fakes.received("meta") == [] and fakes.ledgers["google_ads"] == {}
    files = sorted((tmp_path / "out" / "payloads").rglob("*.json"))
    assert [f.relative_to(tmp_path / "out" / "payloads").as_posix() for f in files] == [
        "gads/0001.json", "meta/0001.json"]
    for f in files:
        assert "tok-123456" not in f.read_text()
    assert result["destinations"]["gads"]["validated"] == 3


def test_batches_respect_the_platform_maximum(sqlite_engine: Any, fakes: FakePlatforms,
                                              tmp_path: Path) -> None:
    for i in range(7):
        full_lead(sqlite_engine, i)
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("msads",), msads={"batch_size": 3})
    result = run_export(ctx)
    assert result["sent"] == 7 and result["requests"] == 3
    assert [len(r.json()["OfflineConversions"]) for r in fakes.received("microsoft")] == [3, 3, 1]


def test_stop_between_batches(sqlite_engine: Any, fakes: FakePlatforms, tmp_path: Path) -> None:
    for i in range(6):
        full_lead(sqlite_engine, i)
    ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("li",), li={"batch_size": 2})
    original = ctx.http_factory

    def factory(**kw: Any) -> Any:
        session = original(**kw)
        send = session.post

        def post(*a: Any, **k: Any) -> Any:
            ctx.stop.set()  # SIGTERM arrives while the first batch is in flight
            return send(*a, **k)

        session.post = post  # type: ignore[method-assign]
        return session

    ctx.http_factory = factory
    result = run_export(ctx)
    assert result["sent"] == 2
    assert sum(r.status == ConversionStatus.pending for r in rows(sqlite_engine)) == 4


def test_add_lead_helper_without_stage_builds_nothing(sqlite_engine: Any, fakes: FakePlatforms,
                                                      tmp_path: Path) -> None:
    add_lead(sqlite_engine, "x1", created=NOW - timedelta(days=1), gclid="abc")
    assert run_export(make_ctx(sqlite_engine, fakes, tmp_path))["built"] == 0


def test_rows_inserted_in_chunks_are_stored_once(engine: Any, fakes: FakePlatforms,
                                                 tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """New rows are inserted in chunks: with chunks of 2 rows, 7 leads give every row once."""
    from leadloop.export import outbox

    monkeypatch.setattr(outbox, "_INSERT_CHUNK", 2)
    for i in range(7):
        full_lead(engine, i)
    ctx = make_ctx(engine, fakes, tmp_path)
    with Session(engine) as s:
        counts = outbox.build_outbox(s, ctx.settings, {"gads": True}, NOW)
        s.commit()
    stored = rows(engine)
    assert counts["built"] == 7 and len(stored) == 7
    assert len({r.order_id for r in stored}) == 7
