"""CSV source: both shared datasets through their example mappings, malformed rows with their
line numbers, encodings and delimiters, chunking, and PII handling."""

from __future__ import annotations

import os
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pytest
from sqlmodel import select

import leadloop.crm.csv as csv_source
from leadloop.config import load_settings
from leadloop.context import Context
from leadloop.crm import build_source
from leadloop.errors import ConfigError
from leadloop.identity import sha256_hex
from leadloop.store import session_scope
from leadloop.sync import sync_source
from leadloop.tables import Lead, LeadEvent, RejectedRecord, StageChange
from tests.conftest import SHARED_DATA

EXAMPLES = Path(__file__).resolve().parents[1] / "config" / "examples"
XED = SHARED_DATA / "x_education_leads" / "Leads.csv"
OLIST = SHARED_DATA / "olist_marketing_funnel"

needs_data = pytest.mark.skipif(not XED.is_file(), reason="shared datasets not present")


def _example_ctx(name: str, engine) -> Context:
    return Context(settings=load_settings(EXAMPLES / name), engine=engine)


def _counts(engine) -> tuple[list[Lead], Counter, Counter, list[RejectedRecord]]:
    with session_scope(engine) as s:
        leads = s.exec(select(Lead)).all()
        stages = Counter(s.exec(select(StageChange.value)).all())
        events = Counter(s.exec(select(LeadEvent.name)).all())
        rejects = s.exec(select(RejectedRecord)).all()
    return leads, stages, events, rejects


@needs_data
def test_x_education_export_loads_completely(engine) -> None:
    truth = pd.read_csv(XED, dtype=str, keep_default_na=False)
    ctx = _example_ctx("x_education.toml", engine)
    counts = sync_source(ctx, build_source(ctx))
    leads, stages, events, rejects = _counts(engine)
    assert not rejects and counts["rejected"] == 0
    assert len(leads) == len(truth) == 9240
    assert stages["Converted"] == int((truth["Converted"] == "1").sum())
    assert events["guide_download"] == int(
        (truth["A free copy of Mastering The Interview"] == "Yes").sum())
    assert events["newsletter_optin"] == int(
        (truth["Receive More Updates About Our Courses"] == "Yes").sum())
    visits = pd.to_numeric(truth["Total Time Spent on Website"], errors="coerce")
    assert events["engaged_visit"] == int((visits >= 600).sum())
    by_id = {lead.crm_id: lead for lead in leads}
    row = truth.iloc[1]
    lead = by_id[row["Prospect ID"]]
    assert lead.utm_source == row["Lead Source"] and lead.country == row["Country"]
    assert "Converted" not in lead.attributes  # the outcome is a stage, not a feature
    assert "Select" not in {v for x in leads for v in x.attributes.values()}
    # A re-read of the whole file changes nothing: upserts dedupe.
    sync_source(ctx, build_source(ctx))
    again, stages2, events2, _ = _counts(engine)
    assert len(again) == len(leads) and stages2 == stages and events2 == events


@needs_data
def test_olist_mqls_joined_with_closed_deals(engine) -> None:
    mqls = pd.read_csv(OLIST / "olist_marketing_qualified_leads_dataset.csv", dtype=str)
    deals = pd.read_csv(OLIST / "olist_closed_deals_dataset.csv", dtype=str)
    won = deals[deals["mql_id"].isin(mqls["mql_id"])]
    ctx = _example_ctx("olist.toml", engine)
    sync_source(ctx, build_source(ctx))
    leads, stages, _, rejects = _counts(engine)
    # One MQL was won before its first contact: kept (lead and stage), and flagged with why.
    first_contact = mqls.set_index("mql_id")["first_contact_date"]
    early = won[won["won_date"].str[:10] < won["mql_id"].map(first_contact)]
    assert len(early) == 1 and [r.payload["lead"] for r in rejects] == list(early["mql_id"])
    assert "before the lead was created" in rejects[0].reason and "kept" in rejects[0].reason
    assert len(leads) == 8000
    assert stages == Counter({"Won": len(won)}) and len(won) == 842
    deal = won.iloc[0]
    with session_scope(engine) as s:
        lead = s.exec(select(Lead).where(Lead.crm_id == deal["mql_id"])).one()
        change = s.exec(select(StageChange).where(StageChange.lead_id == lead.id)).one()
    mql = mqls.set_index("mql_id").loc[deal["mql_id"]]
    assert lead.created_at.date().isoformat() == mql["first_contact_date"]
    assert lead.utm_source == mql["origin"] and lead.landing_page == mql["landing_page_id"]
    assert change.entered_at.strftime("%Y-%m-%d %H:%M:%S") == deal["won_date"]
    assert float(change.amount) == float(deal["declared_monthly_revenue"])
    assert "won_date" not in lead.attributes and "declared_monthly_revenue" not in lead.attributes


def _settings_for(tmp_path: Path, make_settings, path: Path, **csv_extra):
    return make_settings(
        crm={"kind": "csv", "lead_stage_property": "stage",
             "properties": {"email": "Email", "phone": "Phone", "gclid": "GCLID"},
             "csv": {"path": str(path), "id_column": "id", "created_column": "created",
                     "stage_columns": {"Qualified": "qualified_at"}, "label_column": "won",
                     "amount_column": "amount", **csv_extra}},
        stages=[{"name": "Qualified", "crm_values": ["Qualified"], "macro": True}],
        micro_conversions=[{"name": "demo", "property": "demo_requested"}],
    )


HEADER = "id,created,Email,Phone,Name,GCLID,qualified_at,won,amount,demo_requested,plan\n"


def test_malformed_rows_are_rejected_with_their_line_number(tmp_path, make_settings, engine):
    path = tmp_path / "export.csv"
    path.write_text(
        HEADER
        + "1,2026-01-02T10:00:00,a@example.com,+4915112345678,Ann,g1,2026-01-05T09:00:00,yes,120,1,pro\n"
        + "2,2026-01-03,b@example.com,,Bob,,,no,,2026-01-04,free\n"
        + "3,2026-01-03,oops,too,many,fields,here,,,,,,\n"          # line 4: field count
        + ",2026-01-03,c@example.com,,Cy,,,no,,,free\n"            # line 5: no id
        + "6,yesterday,d@example.com,,Di,,,no,,,free\n"            # line 6: bad date
        + "7,2026-01-04,e@example.com,,Ed,,someday,no,,,free\n"    # line 7: bad stage time
        + "8,2026-01-05,f@example.com,,Fe,,,no,abc,,free\n"         # line 8: bad amount
        + "9,2026-01-06,g@example.com,,Gu,,,no,,,free\n",
        encoding="utf-8")
    ctx = Context(settings=_settings_for(tmp_path, make_settings, path), engine=engine)
    counts = sync_source(ctx, build_source(ctx))
    leads, stages, events, rejects = _counts(engine)
    assert sorted(lead.crm_id for lead in leads) == ["1", "2", "9"]
    assert sorted(r.record_ref for r in rejects) == [f"line {n}" for n in (4, 5, 6, 7, 8)]
    assert counts["rejected"] == 5
    assert all("@" not in str(r.payload) and "Ann" not in str(r.payload) for r in rejects)
    assert stages == Counter({"Qualified": 1, "won": 1})
    assert events == Counter({"demo": 2})
    one = next(lead for lead in leads if lead.crm_id == "1")
    assert one.email_sha256 == sha256_hex("a@example.com")
    assert one.phone_e164_sha256 == sha256_hex("+4915112345678")
    assert one.gclid == "g1"
    assert one.attributes == {"plan": "pro", "demo_requested": "1"}  # PII and outcomes dropped


def test_a_resync_of_the_same_export_keeps_each_rejected_record_once(
        tmp_path, make_settings, engine):
    """The daemon re-reads a CSV on every cycle: a malformed line or a flagged stage is kept
    once, taken over by the last run that saw it; a new reason for a record is a new row."""
    path = tmp_path / "export.csv"
    rows = (HEADER
            + "1,2026-01-02,a@example.com,,Ann,,2026-01-01T09:00:00,yes,,,pro\n"  # before created
            + "2,2026-01-03,oops,too,many,fields,here,,,,,,\n"                   # line 3
            + "3,yesterday,d@example.com,,Di,,,no,,,free\n")                      # line 4
    path.write_text(rows, encoding="utf-8")
    ctx = Context(settings=_settings_for(tmp_path, make_settings, path), engine=engine)
    seen = []
    for run in (1, 2):
        ctx.job_run_id = run
        seen.append(sync_source(ctx, build_source(ctx))["rejected"])
    _, _, _, rejects = _counts(engine)
    assert seen == [3, 3]  # each sync still says what it found...
    assert len(rejects) == 3 and {r.job_run_id for r in rejects} == {2}  # ...kept once
    assert sorted(r.record_ref for r in rejects) == ["line 2", "line 3", "line 4"]
    first_seen = {r.record_ref: r.created_at for r in rejects}
    path.write_text(rows.replace("3,yesterday", "3,someday"), encoding="utf-8")  # a new reason
    ctx.job_run_id = 3
    sync_source(ctx, build_source(ctx))
    _, _, _, again = _counts(engine)
    assert len(again) == 4 and sorted(r.job_run_id for r in again) == [2, 3, 3, 3]
    kept = {r.id for r in rejects}
    assert all(r.created_at == first_seen[r.record_ref] for r in again if r.id in kept)
    assert [r.reason for r in again if r.id not in kept] == [
        "lead 3: 'created' value 'someday' is not a date"]


def test_two_records_with_one_key_stay_two_rejects_over_re_reads(engine) -> None:
    """Two leads without an id in one page are two records: both kept, and no more on a re-read."""
    from leadloop.rejects import keep_rejects

    def page(run: int) -> list[RejectedRecord]:
        return [RejectedRecord(job_run_id=run, source="hubspot", object_type="contacts",
                               record_ref="?", reason="no id", payload={"n": i}) for i in (1, 2)]

    for run in (1, 2, 3):
        with session_scope(engine) as s:
            keep_rejects(s, page(run))
    _, _, _, rejects = _counts(engine)
    assert len(rejects) == 2 and {r.job_run_id for r in rejects} == {3}


def test_encoding_and_delimiter_are_detected(tmp_path, make_settings, sqlite_engine):
    path = tmp_path / "export.csv"
    text = HEADER.replace(",", ";") + "1;2026-01-02;;;Zoë Müller;;;no;;;Größe\n"
    path.write_bytes(text.encode("cp1252"))
    ctx = Context(settings=_settings_for(tmp_path, make_settings, path), engine=sqlite_engine)
    sync_source(ctx, build_source(ctx))
    leads, *_ = _counts(sqlite_engine)
    assert [(lead.crm_id, lead.attributes) for lead in leads] == [("1", {"plan": "Größe"})]


def test_large_files_are_read_in_chunks(tmp_path, make_settings, sqlite_engine, monkeypatch):
    monkeypatch.setattr(csv_source, "CHUNK_ROWS", 7)
    path = tmp_path / "export.csv"
    rows = [f"{i},2026-01-02,,,,,,{'yes' if i % 3 == 0 else 'no'},,,free\n" for i in range(50)]
    path.write_text(HEADER + "".join(rows), encoding="utf-8")
    ctx = Context(settings=_settings_for(tmp_path, make_settings, path), engine=sqlite_engine)
    pages = list(build_source(ctx).fetch("rows", None, started_at=ctx.now()))
    assert [len(p.leads) for p in pages] == [7] * 7 + [1]
    assert all(p.cursor is None for p in pages)
    counts = sync_source(ctx, build_source(ctx))
    assert counts["leads"] == 50 and counts["stages"] == 17


def test_mapping_names_a_missing_column(tmp_path, make_settings, sqlite_engine):
    path = tmp_path / "export.csv"
    path.write_text("id,created\n1,2026-01-01\n", encoding="utf-8")
    ctx = Context(settings=_settings_for(tmp_path, make_settings, path), engine=sqlite_engine)
    with pytest.raises(ConfigError, match=r"config key crm\.csv\.\w+: column .* is not in export.csv"):
        list(build_source(ctx).fetch("rows", None, started_at=ctx.now()))


def test_a_newer_export_without_times_moves_no_stored_time(tmp_path, make_settings, engine):
    """Without a time column the file's mtime stands in for created_at, for flag stages and for
    flag events. A re-export (a later mtime) must not move them: unchanged leads stay unchanged
    (no `updated_at` bump for the jobs downstream), no event is added again, and only what is
    new is stamped with the new file's time."""
    path = tmp_path / "export.csv"
    settings = make_settings(
        crm={"kind": "csv", "lead_stage_property": "stage", "properties": {"email": "Email"},
             "csv": {"path": str(path), "id_column": "id", "label_column": "won",
                     "amount_column": "amount", "stage_columns": {"Qualified": "qualified"}}},
        stages=[{"name": "Qualified", "crm_values": ["Qualified"], "macro": True}],
        micro_conversions=[{"name": "demo", "property": "demo_requested"},
                           {"name": "engaged", "expr": "visits >= 600"}],
    )
    header = "id,Email,qualified,won,amount,demo_requested,visits,plan\n"
    t1, t2, t3 = (datetime(2026, 1, d, tzinfo=UTC) for d in (1, 2, 3))

    def sync(rows: str, mtime: datetime, day: int) -> tuple[dict, set, set]:
        path.write_text(header + rows, encoding="utf-8")
        os.utime(path, (mtime.timestamp(), mtime.timestamp()))
        ctx = Context(settings=settings, engine=engine, now=lambda: datetime(2026, 2, day, tzinfo=UTC))
        sync_source(ctx, build_source(ctx))
        with session_scope(engine) as s:
            leads = {lead.id: lead for lead in s.exec(select(Lead)).all()}
            stages = {(leads[c.lead_id].crm_id, c.value, c.entered_at, c.amount)
                      for c in s.exec(select(StageChange)).all()}
            events = [(leads[e.lead_id].crm_id, e.name, e.occurred_at)
                      for e in s.exec(select(LeadEvent)).all()]
        assert len(events) == len(set(events))
        return ({x.crm_id: (x.created_at, x.updated_at, x.attributes["plan"]) for x in leads.values()},
                stages, set(events))

    same = "1,a@example.com,yes,1,120,1,700,pro\n2,b@example.com,no,0,,yes,10,free\n"
    leads1, stages1, events1 = sync(same + "3,c@example.com,,0,,,,free\n", t1, 1)
    day1, day2 = datetime(2026, 2, 1, tzinfo=UTC), datetime(2026, 2, 2, tzinfo=UTC)
    assert leads1 == {"1": (t1, day1, "pro"), "2": (t1, day1, "free"), "3": (t1, day1, "free")}
    assert stages1 == {("1", "Qualified", t1, Decimal(120)), ("1", "won", t1, Decimal(120))}
    assert events1 == {("1", "demo", t1), ("1", "engaged", t1), ("2", "demo", t1)}

    # Re-exported a day later: lead 3 changed (qualified, won, another plan), lead 4 is new.
    changed = "3,c@example.com,yes,1,90,,,pro\n4,d@example.com,yes,0,,yes,900,free\n"
    leads2, stages2, events2 = sync(same + changed, t2, 2)
    assert leads2 == {"1": leads1["1"], "2": leads1["2"], "3": (t1, day2, "pro"),
                      "4": (t2, day2, "free")}
    assert stages2 == stages1 | {("3", "Qualified", t2, Decimal(90)), ("3", "won", t2, Decimal(90)),
                                 ("4", "Qualified", t2, None)}
    assert events2 == events1 | {("4", "demo", t2), ("4", "engaged", t2)}

    # The same rows once more under yet another file time: nothing at all changes.
    assert sync(same + changed, t3, 3) == (leads2, stages2, events2)
