"""What sync and export tell the user beyond counts: a `crm_values` entry that matched nothing
(with the values the CRM does have), records flagged, and an export with nowhere to go."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from leadloop.cli import cli
from leadloop.crm.base import LeadIn, Page, StageIn
from leadloop.crm.stage_check import unmatched_crm_values
from leadloop.export.outbox import order_id
from leadloop.jobs import run_job
from leadloop.sandbox.fake_platforms import FakePlatforms
from leadloop.store import session_scope
from leadloop.sync import apply_page
from tests.export_helpers import full_lead
from tests.test_export_outbox import make_ctx

T0 = datetime(2024, 3, 1, tzinfo=UTC)


def _csv_config(tmp_path: Path, won_values: str, destinations: str = "") -> Path:
    (tmp_path / "leads.csv").write_text(
        "id,created,won_at\n"
        "1,2024-01-01T00:00:00,2024-02-01T00:00:00\n"
        "2,2024-01-02T00:00:00,\n"
        "3,2024-01-03T00:00:00,\n")
    config = tmp_path / "leadloop.toml"
    config.write_text(f"""
[crm]
kind = "csv"
lead_stage_property = "stage"
[crm.csv]
path = "leads.csv"
id_column = "id"
created_column = "created"
stage_columns = {{ Won = "won_at" }}
[[stages]]
name = "Won"
crm_values = {won_values}
macro = true
value = 1.0
{destinations}
[model]
dir = "models"
""")
    return config


def test_sync_names_a_crm_value_that_matched_nothing_and_the_values_there_are(tmp_path):
    config = _csv_config(tmp_path, '["Won", "won"]')
    result = CliRunner().invoke(cli, ["-c", str(config), "sync"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if "note:" in line]
    assert len(notes) == 1, result.output
    assert "stages[0].crm_values: 'won' (stage 'Won') matched no stage change in 'stage'" in notes[0]
    assert "the CRM has 'Won'" in notes[0]


def test_no_warning_when_every_value_matches(tmp_path):
    config = _csv_config(tmp_path, '["Won"]')
    result = CliRunner().invoke(cli, ["-c", str(config), "sync"])
    assert result.exit_code == 0 and "note:" not in result.output, result.output


def test_the_check_reads_the_store_so_it_holds_for_every_connector(sqlite_engine, make_context):
    """HubSpot-shaped stage rows (lifecycle and deal stages) in the store, as any connector
    writes them: the typo in a deal-stage value is named, with the values in that field."""
    ctx = make_context(sqlite_engine, stages=[
        {"name": "Qualified", "crm_values": ["salesqualifiedlead"], "field": "lifecyclestage",
         "macro": True},
        {"name": "Won", "crm_values": ["closedwon", "closed_won"], "field": "dealstage"},
        {"name": "Demo", "crm_values": ["demo"]},  # no field: both stage properties searched
    ])
    page = Page(leads=[LeadIn("c1", T0), LeadIn("c2", T0)], stages=[
        StageIn("c1", "lifecyclestage", "salesqualifiedlead", T0),
        StageIn("c1", "dealstage", "closedwon", T0, deal_id="d1"),
        StageIn("c2", "dealstage", "appointmentscheduled", T0, deal_id="d2"),
    ])
    with session_scope(sqlite_engine) as session:
        apply_page(session, ctx, "hubspot", "contacts", page)
    notes = unmatched_crm_values(sqlite_engine, ctx.settings)
    assert len(notes) == 2, notes
    assert notes[0].startswith("stages[1].crm_values: 'closed_won' (stage 'Won') matched no "
                               "stage change in 'dealstage'")
    assert "'appointmentscheduled'" in notes[0] and "'closedwon'" in notes[0]
    assert notes[1].startswith("stages[2].crm_values: 'demo'")
    assert "'lifecyclestage' or 'dealstage'" in notes[1]


def test_export_with_no_destination_says_so(tmp_path):
    config = _csv_config(tmp_path, '["Won"]')
    runner = CliRunner()
    runner.invoke(cli, ["-c", str(config), "sync"])
    result = runner.invoke(cli, ["-c", str(config), "export"])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("export"))
    assert line.split()[1] == "skipped", line
    assert "no destination to export to: the config has no [destinations.<name>] section" in line


def test_export_that_can_send_nothing_says_why(tmp_path):
    config = _csv_config(tmp_path, '["Won"]', destinations="""
destinations = { files = "Won" }
[destinations.files]
kind = "csv_files"
output_dir = "uploads"
""")
    runner = CliRunner()
    runner.invoke(cli, ["-c", str(config), "sync"])
    result = runner.invoke(cli, ["-c", str(config), "export"])
    assert result.exit_code == 0, result.output
    assert "held=1" in result.output
    assert ("note: files: nothing uploaded this run; 1 conversion(s) held by platform rules"
            in result.output), result.output


def test_export_whose_due_rows_were_refused_does_not_blame_the_hold_rules(
        engine: Any, fakes: FakePlatforms, tmp_path: Path) -> None:
    """Every due row refused by the platform is a rejection (counted, kept with its code), not
    a destination that got nothing because platform rules hold every conversion."""
    full_lead(engine, 1)
    full_lead(engine, 2, gclid=None, gbraid=None, wbraid=None, email=None, phone=None)  # held
    fakes.reject("google_ads", order_id("gads", "hubspot", "1001", "Qualified", 0),
                 "UNPARSEABLE_GCLID")
    result = run_job(make_ctx(engine, fakes, tmp_path, names=("gads",)), "export")
    assert (result.counts["sent"], result.counts["rejected"]) == (0, 1), result.counts
    assert result.counts["held"] >= 1
    assert "notes" not in result.counts, result.counts["notes"]
