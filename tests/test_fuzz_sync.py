"""Fuzzing the sync with hypothesis: CSV exports (encodings, delimiters, huge fields, control
characters, numbers at every edge) and CRM JSON pages (HubSpot, Salesforce, Pipedrive shapes
with wrong types and missing keys). A sync never raises, stores every good record, and keeps
every bad one with its reason."""

from __future__ import annotations

import csv
import io
import tempfile
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlmodel import select

from leadloop.config import settings_from_dict
from leadloop.context import Context
from leadloop.crm import build_source
from leadloop.crm.base import MALFORMED, Cursor, Page, as_reject, record_id
from leadloop.store import make_engine, session_scope
from leadloop.sync import sync_source
from leadloop.tables import Lead, RejectedRecord
from tests.conftest import BASE_CONFIG

NOW = datetime(2026, 11, 1, tzinfo=UTC)
FUZZ = settings(max_examples=20, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _store(tmp: str) -> Any:
    return make_engine(f"sqlite:///{tmp}/leadloop.db")


def _outcome(engine: Any) -> tuple[set[str], list[RejectedRecord]]:
    with session_scope(engine) as s:
        return set(s.exec(select(Lead.crm_id)).all()), list(s.exec(select(RejectedRecord)).all())


# -- CSV exports ------------------------------------------------------------------------------

GOOD_AMOUNTS = st.sampled_from(["", "0", "12.5", "-3", "99999999999999", "1e-30", "0.0001"])
FIELD_BAD_AMOUNTS = st.sampled_from(["NaN", "sNaN", "Infinity", "-inf", "1e15", "1" * 40])
RECORD_BAD_DATES = st.sampled_from(["1989-12-31", "2999-01-01", "yesterday", "2026-13-01",
                                    "0001-01-01", "9" * 30])


@st.composite
def csv_rows(draw: Any, encoding: str) -> list[dict[str, Any]]:
    alphabet = st.characters(codec=encoding if encoding != "utf-16" else "utf-8",
                             exclude_categories=("Cs",))
    rows = []
    for i in range(draw(st.integers(1, 25))):
        kind = draw(st.sampled_from(["good"] * 5 + ["bad_amount", "nul_note", "bad_date",
                                                     "no_id", "huge_note"]))
        row = {"kind": kind, "id": f"r{i}", "created": f"2025-0{1 + i % 9}-1{i % 10}",
               "amount": draw(GOOD_AMOUNTS), "won": draw(st.sampled_from(["yes", "no", ""])),
               "note": draw(st.text(alphabet, max_size=40))}
        if kind == "bad_amount":  # on the deal's stage row: a lead that won
            row["amount"], row["won"] = draw(FIELD_BAD_AMOUNTS), "yes"
        elif kind == "nul_note":
            row["note"] += "\x00"
        elif kind == "bad_date":
            row["created"] = draw(RECORD_BAD_DATES)
        elif kind == "no_id":
            row["id"] = draw(st.sampled_from(["", "   "]))
        elif kind == "huge_note":
            row["note"] = "x" * 200_000  # past the csv module's field limit
        rows.append(row)
    return rows


@st.composite
def csv_exports(draw: Any) -> tuple[str, str, list[dict[str, Any]]]:
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "cp1252", "latin-1"]))
    delimiter = draw(st.sampled_from([",", ";", "\t", "|"]))
    return encoding, delimiter, draw(csv_rows(encoding))


@given(export=csv_exports())
@settings(FUZZ, max_examples=15)
def test_fuzzed_csv_exports_store_every_good_row_and_keep_every_bad_one(export) -> None:
    encoding, delimiter, rows = export
    with tempfile.TemporaryDirectory() as tmp:
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter=delimiter)
        writer.writerow(["id", "created", "amount", "won", "note"])
        writer.writerows([[r["id"], r["created"], r["amount"], r["won"], r["note"]] for r in rows])
        path = Path(tmp) / "export.csv"
        path.write_bytes(buffer.getvalue().encode(encoding))
        settings_ = settings_from_dict({**BASE_CONFIG, "crm": {"kind": "csv", "csv": {
            "path": str(path), "id_column": "id", "created_column": "created",
            "amount_column": "amount", "delimiter": delimiter, "stage_columns": {"won": "won"}}},
            "model": {"dir": f"{tmp}/models"}}, base_dir=Path(tmp))
        engine = _store(tmp)
        ctx = Context(settings=settings_, engine=engine, now=lambda: NOW)
        try:
            counts = sync_source(ctx, build_source(ctx))
            stored, rejects = _outcome(engine)
        finally:
            engine.dispose()
    kept = {r["id"] for r in rows if r["kind"] in ("good", "bad_amount", "nul_note")}
    assert stored == kept
    refused = [r for r in rows if r["kind"] in ("bad_date", "no_id", "huge_note")]
    field_bad = {r["id"] for r in rows if r["kind"] in ("bad_amount", "nul_note")}
    refs = {r.record_ref for r in rejects}
    assert field_bad <= refs
    assert len(rejects) >= len(refused) + len(field_bad)
    assert all(r.reason for r in rejects)
    assert counts["rejected"] == len(rejects)


# -- CRM JSON pages ---------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6)
WEIRD_TEXT = st.text(st.characters(exclude_categories=()), max_size=20)  # NUL, surrogates, ...
ISO = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2026, 10, 1)).map(
    lambda d: d.isoformat() + "Z")


def _maybe(good: Any, draw: Any) -> Any:
    """The good value, or a wrong type, or nothing at all (a missing key)."""
    return draw(st.one_of(st.just(good), JSON, WEIRD_TEXT))


@st.composite
def records(draw: Any, good_record: Any, corrupt: Any) -> list[tuple[bool, Any]]:
    out = []
    for i in range(draw(st.integers(1, 12))):
        if draw(st.booleans()):
            out.append((True, good_record(i, draw)))
        else:
            out.append((False, corrupt(i, draw)))
    return out


def _hubspot_good(i: int, draw: Any) -> dict[str, Any]:
    return {"id": str(1000 + i), "properties": {
        "createdate": draw(ISO), "lastmodifieddate": draw(ISO), "email": f"p{i}@example.com",
        "hs_google_click_id": draw(st.text("abcXYZ019", min_size=1, max_size=20)),
        "lifecyclestage": draw(st.sampled_from(["lead", "salesqualifiedlead"])),
        f"hs_v2_date_entered_{draw(st.sampled_from(['lead', 'customer']))}": draw(ISO)}}


def _hubspot_bad(i: int, draw: Any) -> Any:
    good = _hubspot_good(i, draw)
    props = good["properties"]
    key = draw(st.sampled_from(["id", "properties", *props]))
    if key == "id":
        good["id"] = draw(JSON | WEIRD_TEXT)
    elif key == "properties":
        good["properties"] = draw(JSON)
    else:
        props[key] = _maybe(None, draw)
    return draw(st.one_of(st.just(good), JSON))


def _salesforce_good(i: int, draw: Any) -> dict[str, Any]:
    return {"Id": f"00Q{i:012d}", "CreatedDate": draw(ISO).replace("Z", "+0000"),
            "SystemModstamp": draw(ISO).replace("Z", "+0000"), "Email": f"p{i}@example.com",
            "Status": draw(st.sampled_from(["Open", "Qualified"])), "LeadSource": "Web",
            "IsConverted": draw(st.booleans())}


def _salesforce_bad(i: int, draw: Any) -> Any:
    good = _salesforce_good(i, draw)
    key = draw(st.sampled_from(sorted(good)))
    good[key] = _maybe(None, draw)
    if draw(st.booleans()):
        del good[key]
    return draw(st.one_of(st.just(good), JSON))


def _pipedrive_good(i: int, draw: Any) -> dict[str, Any]:
    return {"id": 500 + i, "add_time": draw(ISO), "update_time": draw(ISO),
            "emails": [{"value": f"p{i}@example.com", "primary": True}],
            "phones": [{"value": "+1 650 555 1212", "primary": True}], "owner_id": 7}


def _pipedrive_bad(i: int, draw: Any) -> Any:
    good = _pipedrive_good(i, draw)
    key = draw(st.sampled_from(sorted(good)))
    good[key] = _maybe(None, draw)
    return draw(st.one_of(st.just(good), JSON))


class _Pages:
    name = "fuzz"

    def __init__(self, page: Page) -> None:
        self.page = page

    needs_stored_ids = ()

    def streams(self) -> list[str]:
        return ["contacts"]

    def fetch(self, stream: str, since: Cursor | None, *, started_at: datetime,
              stored_ids: AbstractSet[str] = frozenset()) -> Iterator[Page]:
        yield self.page


def _check(kind: str, recs: list[tuple[bool, Any]], page_of: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        crm = {"kind": kind, "token_env": "LEADLOOP_TEST_TOKEN", "base_url": "http://127.0.0.1:1"}
        settings_ = settings_from_dict({**BASE_CONFIG, "crm": crm,
                                        "model": {"dir": f"{tmp}/models"}}, base_dir=Path(tmp))
        engine = _store(tmp)
        ctx = Context(settings=settings_, engine=engine, now=lambda: NOW)
        try:
            source = build_source(ctx)
            page = page_of(source, [raw for _, raw in recs])
            source_name = source.name
            counts = sync_source(ctx, _Pages(page))
            stored, rejects = _outcome(engine)
        finally:
            engine.dispose()
    good_ids = {str(raw.get("id") or raw.get("Id")) for ok, raw in recs if ok}
    assert good_ids <= stored, source_name
    # nothing is dropped silently: every record is stored, or kept as a reject with its reason
    # (records repeating an id are one CRM record read twice, as on overlapping pages)
    assert len(stored) + len(rejects) >= _distinct_records(recs)
    assert counts["rejected"] == len(rejects) and all(r.reason for r in rejects)


def _distinct_records(recs: list[tuple[bool, Any]]) -> int:
    """How many different records `recs` are: one per id given as text or a number (the same id
    twice is one record), one per record without such an id."""
    keys = set()
    for i, (_, raw) in enumerate(recs):
        rid = next((raw[k] for k in ("id", "Id") if k in raw), None) if isinstance(raw, dict) else None
        usable = isinstance(rid, str | int) and not isinstance(rid, bool) and str(rid).strip()
        keys.add(str(rid) if usable else f"record {i}")
    return len(keys)


def _salesforce_page(source: Any, raws: list[Any]) -> Page:
    page = Page()
    for raw in raws:  # as SalesforceSource._fetch_leads converts each record
        try:
            lead, stages = source.normalise_lead(raw, [])
        except MALFORMED as exc:
            page.rejects.append(as_reject(exc, f"Lead:{record_id(raw, 'Id')}"))
            continue
        page.leads.append(lead)
        page.stages.extend(stages)
    return page


def _pipedrive_page(source: Any, raws: list[Any]) -> Page:
    page = Page()
    for raw in raws:  # as PipedriveSource.fetch converts each person
        try:
            page.leads.append(source.normalise_person(raw))
        except MALFORMED as exc:
            page.rejects.append(as_reject(exc, f"person:{record_id(raw)}"))
    return page


@given(recs=records(_hubspot_good, _hubspot_bad))
@FUZZ
def test_fuzzed_hubspot_pages(recs, monkeypatch) -> None:
    monkeypatch.setenv("LEADLOOP_TEST_TOKEN", "fuzz-token")
    _check("hubspot", recs, lambda source, raws: source.contact_page(raws))


@given(recs=records(_salesforce_good, _salesforce_bad))
@FUZZ
def test_fuzzed_salesforce_pages(recs, monkeypatch) -> None:
    monkeypatch.setenv("LEADLOOP_TEST_TOKEN", "fuzz-token")
    _check("salesforce", recs, _salesforce_page)


@given(recs=records(_pipedrive_good, _pipedrive_bad))
@FUZZ
def test_fuzzed_pipedrive_pages(recs, monkeypatch) -> None:
    monkeypatch.setenv("LEADLOOP_TEST_TOKEN", "fuzz-token")
    _check("pipedrive", recs, _pipedrive_page)
