"""Poison records and identity in clear: one bad field costs that field or record, never the
page or the sync; identity in columns leadloop does not know is hashed or dropped."""

from __future__ import annotations

import json
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlmodel import select

from leadloop.crm import build_source
from leadloop.crm.base import Cursor, EventIn, LeadIn, Page, StageIn
from leadloop.identity import sha256_hex
from leadloop.store import session_scope
from leadloop.sync import sync_source
from leadloop.tables import Lead, LeadEvent, RejectedRecord, StageChange

T0 = datetime(2026, 11, 1, tzinfo=UTC)
NOW = T0 + timedelta(days=2)


class Scripted:
    name = "scripted"

    def __init__(self, pages: list[Page]) -> None:
        self.pages = pages

    needs_stored_ids = ()

    def streams(self) -> list[str]:
        return ["contacts"]

    def fetch(self, stream: str, since: Cursor | None, *, started_at: datetime,
              stored_ids: AbstractSet[str] = frozenset()) -> Iterator[Page]:
        yield from self.pages


def _lead(crm_id: str, **kw) -> LeadIn:
    kw.setdefault("created_at", T0)
    return LeadIn(crm_id=crm_id, updated_at=T0, **kw)


def _stored(engine) -> tuple[dict[str, Lead], list[StageChange], list[LeadEvent], list[RejectedRecord]]:
    with session_scope(engine) as s:
        return ({x.crm_id: x for x in s.exec(select(Lead)).all()}, s.exec(select(StageChange)).all(),
                s.exec(select(LeadEvent)).all(), s.exec(select(RejectedRecord)).all())


def test_poison_values_cost_only_their_field_or_record(engine, make_context) -> None:
    ctx = make_context(engine)
    ctx.now = lambda: NOW
    amounts = {"snan": Decimal("sNaN"), "nan": Decimal("NaN"), "inf": Decimal("Infinity"),
               "-inf": Decimal("-Infinity"), "huge": Decimal("1e15"), "ok": Decimal("1234.5")}
    page = Page(
        leads=[_lead(name) for name in amounts]
        + [_lead("nul-utm", utm_source="goo\x00gle", utm_medium="cpc"),
           _lead("nul-attr", attributes={"note": "a\x00b", "size": "10"}),
           _lead("surrogate", utm_campaign="x\ud800y"),
           _lead("nul\x00id"),
           _lead("old", created_at=datetime(1989, 12, 31, tzinfo=UTC)),
           _lead("future", created_at=NOW + timedelta(days=30)),
           _lead("naive", created_at=datetime(2026, 1, 1)),
           _lead("float-attr", attributes={"score": float("nan"), "ok": 1.5})],
        stages=[StageIn(name, "dealstage", "closedwon", T0, deal_id=f"d-{name}", amount=a)
                for name, a in amounts.items()]
        + [StageIn("ok", "lifecyclestage", "lead", NOW + timedelta(days=400))],
        events=[EventIn("ok", "pricing_view", T0, value=float("inf")),
                EventIn("ok", "webinar", datetime(1970, 1, 1, tzinfo=UTC))],
        cursor=Cursor(T0, "z"),
    )
    counts = sync_source(ctx, Scripted([page]))
    leads, stages, events, rejects = _stored(engine)
    good = set(amounts) | {"nul-utm", "nul-attr", "surrogate", "float-attr"}
    assert set(leads) == good
    assert counts["leads"] == len(good)
    # every deal stage is kept; only the unusable amount is left out
    by_deal = {s.deal_id: s.amount for s in stages}
    assert by_deal["d-ok"] == Decimal("1234.5")
    assert all(by_deal[f"d-{n}"] is None for n in amounts if n != "ok")
    assert leads["nul-utm"].utm_source is None and leads["nul-utm"].utm_medium == "cpc"
    assert leads["nul-attr"].attributes == {"size": "10"}
    assert leads["surrogate"].utm_campaign is None
    assert leads["float-attr"].attributes == {"ok": 1.5}
    assert [(e.name, e.value) for e in events] == [("pricing_view", None)]
    reasons = " | ".join(r.reason for r in rejects)
    for expected in ("sNaN is not a finite number", "Infinity is not a finite number",
                     "10^14 or more", "utm_source contains a NUL byte", "lone surrogate",
                     "lead id contains a NUL byte", "1989-12-31 is before 1990",
                     "is in the future", "has no time zone", "value is not a finite number",
                     "1970-01-01 is before 1990"):
        assert expected in reasons, expected
    assert counts["rejected"] == len(rejects)


def test_a_value_the_store_still_refuses_costs_only_its_record(engine, make_context,
                                                                monkeypatch) -> None:
    """Past the screening, a page the store refuses is written in halves down to the record."""
    import leadloop.crm.screening as screening

    ctx = make_context(engine)
    ctx.now = lambda: NOW
    monkeypatch.setattr(screening, "checked_amount", lambda value: (value, None))  # no screening
    # what each store refuses: SQLite a signalling NaN, PostgreSQL NUMERIC(18, 4) overflow
    poison = Decimal("sNaN") if engine.dialect.name == "sqlite" else Decimal("1e15")
    page = Page(leads=[_lead(str(i)) for i in range(9)],
                stages=[StageIn(str(i), "dealstage", "closedwon", T0, deal_id=f"d{i}",
                                amount=poison if i == 6 else Decimal(i)) for i in range(9)],
                cursor=Cursor(T0, "9"))
    sync_source(ctx, Scripted([page]))
    leads, stages, _, rejects = _stored(engine)
    assert set(leads) == {str(i) for i in range(9) if i != 6}
    assert {s.deal_id for s in stages} == {f"d{i}" for i in range(9) if i != 6}
    assert {(r.record_ref, r.object_type) for r in rejects} == {("6", "contacts"),
                                                                 ("6", "contacts.stage")}
    assert all("the store refused this record" in r.reason for r in rejects)


def test_identity_in_unknown_columns_is_hashed_or_dropped(engine, make_context) -> None:
    ctx = make_context(engine)
    ctx.now = lambda: NOW
    page = Page(leads=[
        _lead("1", attributes={"Work Email": "Jane.Doe@Example.com", "Mobile Number": "+44 7700 900123",
                               "Contact Name": "Jane Doe", "Company Name": "Acme",
                               "Notes": "call back at jane@example.com", "Do Not Email": "No",
                               "Lead Source": "Google"}),
        _lead("2", email="known@example.com",
              attributes={"Work Email": "other@example.com", "firstName": "Bob",
                          "Backup": "+1 650 555 1212"}),
    ], cursor=Cursor(T0, "2"))
    counts = sync_source(ctx, Scripted([page]))
    leads, _, _, _ = _stored(engine)
    assert leads["1"].attributes == {"Company Name": "Acme", "Do Not Email": "No",
                                     "Lead Source": "Google"}
    assert leads["1"].email_sha256 == sha256_hex("jane.doe@example.com")
    assert leads["1"].phone_e164_sha256 == sha256_hex("+447700900123")
    assert leads["2"].attributes == {}
    assert leads["2"].email_sha256 == sha256_hex("known@example.com")
    summary = counts["identity_in_attributes"]
    assert "Work Email: dropped (an e-mail address), hashed as the lead's e-mail" in summary
    assert "Mobile Number: hashed as the lead's phone" in summary
    assert "Contact Name: dropped (a person's name)" in summary
    assert "Notes: dropped (held an e-mail address)" in summary
    with session_scope(engine) as s:
        dump = json.dumps([x.model_dump(mode="json") for x in s.exec(select(Lead)).all()])
    for clear in ("Jane", "jane", "7700", "Bob", "other@", "555 1212"):
        assert clear not in dump


def _csv_ctx(engine, make_context, tmp_path, path):
    ctx = make_context(engine, crm={"kind": "csv", "csv": {
        "path": str(path), "id_column": "id", "created_column": "created",
        "amount_column": "amount", "stage_columns": {"won": "won"}}})
    ctx.now = lambda: NOW
    return ctx


def test_csv_with_invalid_utf8_after_the_first_megabyte_and_repeated_ids(engine, make_context,
                                                                         tmp_path) -> None:
    path = tmp_path / "export.csv"
    filler = "x" * 200
    rows = [f"{i},2026-10-0{1 + i % 9},{i}.5,yes,{filler}" for i in range(6000)]  # > 1 MB
    body = ("id,created,amount,won,note\n" + "\n".join(rows)).encode()
    assert len(body) > 1 << 20
    tail = (b"\n7000,2026-10-02,1,yes,caf\xe9 latin-1 byte"  # not UTF-8
            b"\n7001,2026-10-02,NaN,yes,fine"
            b"\n7002,1985-01-01,1,yes,too old"
            b"\n7003,2026-10-02,1e15,yes,huge"
            b"\n5,2026-10-03,9,yes,again"  # the same id twice in one export
            b"\n7004,2026-10-02,1,yes,nul\x00byte\n")
    path.write_bytes(body + tail)
    ctx = _csv_ctx(engine, make_context, tmp_path, path)
    counts = sync_source(ctx, build_source(ctx))
    leads, stages, _, rejects = _stored(engine)
    assert len(leads) == 6000 + 3  # 7001 (amount dropped), 7003 (amount dropped), 7004
    assert "7000" not in leads and "7002" not in leads
    reasons = {r.record_ref: r.reason for r in rejects}
    assert "not valid utf-8" in reasons[next(k for k in reasons if k.startswith("line 6002"))]
    assert "before 1990" in reasons["7002"]
    assert "appears more than once in this export" in reasons["5"]
    assert any("10^14" in r.reason for r in rejects)
    assert {s.amount for s in stages if s.lead_id == leads["7001"].id} == {None}
    assert counts["rejected"] == len(rejects)


def test_a_rejected_row_keeps_no_identity_in_clear(engine, make_context, tmp_path) -> None:
    path = tmp_path / "export.csv"
    path.write_text("id,created,amount,won,Work Email,Mobile Number,Contact Name,Lead Source\n"
                    "1,not a date,1,yes,jane@example.com,+44 7700 900123,Jane Doe,Google\n"
                    "2,2026-10-02,1,yes,bob@example.com,+44 7700 900456,Bob Roe,Google\n")
    ctx = _csv_ctx(engine, make_context, tmp_path, path)
    counts = sync_source(ctx, build_source(ctx))
    leads = _stored(engine)[0]
    assert set(leads) == {"2"} and leads["2"].attributes == {"Lead Source": "Google"}
    assert "Contact Name: dropped (a person's name)" in counts["identity_in_attributes"]
    with session_scope(engine) as s:
        kept = json.dumps([r.model_dump(mode="json") for r in s.exec(select(RejectedRecord))])
    assert "not a date" in kept and "Google" in kept
    for clear in ("jane", "7700", "Jane", "Doe", "bob", "Bob"):
        assert clear not in kept


def test_the_encoding_is_chosen_from_the_first_megabyte_only(tmp_path, monkeypatch) -> None:
    from pathlib import Path

    from leadloop.csvio import detect_encoding

    path = tmp_path / "big.csv"
    path.write_bytes(b"id,note\n" + b"1,plain ascii\n" * 200_000 + b"2,caf\xe9\n")
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read the whole file"))
    assert detect_encoding(path) == "utf-8-sig"  # the sample is ASCII; the bad byte is per row
