"""`export --dry-run` changes nothing: every table holds the same rows before and after, even when
the configuration changed in a way a real export would act on (a mapping typo withdrawing rows)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from sqlalchemy import select, update
from sqlmodel import SQLModel

from leadloop.cli import cli
from leadloop.export.engine import run_export
from leadloop.jobs import run_job
from leadloop.sandbox.fake_platforms import FakePlatforms
from leadloop.store import session_scope
from leadloop.tables import JobRun, StageChange
from tests.export_helpers import NOW, full_lead
from tests.test_export_outbox import make_ctx


def snapshot(engine: Any) -> dict[str, list[str]]:
    """Every row of every table, as sorted JSON lines."""
    out = {}
    with session_scope(engine) as session:
        for table in SQLModel.metadata.sorted_tables:
            out[table.name] = sorted(json.dumps(dict(r._mapping), default=str, sort_keys=True)
                                     for r in session.execute(select(table)))
    return out


def test_dry_run_leaves_every_table_as_it_was(engine: Any, fakes: FakePlatforms,
                                              tmp_path: Path) -> None:
    for i in range(6):
        full_lead(engine, i, won_at=NOW - timedelta(days=2), amount="500")
    full_lead(engine, 7, meta_lead_id=None)  # held at Meta: unsent, so a typo withdraws it
    ctx = make_ctx(engine, fakes, tmp_path, names=("gads", "meta"))
    run_export(ctx)  # a real export: sent rows, a watermark, job-less counts
    # things a real export would now act on: a value change (restatement), a new lead, and a
    # stage mapping typo that would withdraw every unsent row of that stage
    with session_scope(engine) as s:
        s.execute(update(StageChange).where(StageChange.value == "closedwon")  # type: ignore[arg-type]
                  .values(amount=900))
    full_lead(engine, 50)
    typo = make_ctx(engine, fakes, tmp_path, names=("gads", "meta"))
    typo.settings.stages[1].crm_values[0] = "salesqualifiedleed"
    typo.dry_run, typo.out_dir = True, tmp_path / "out"
    before = snapshot(engine)
    result = run_export(typo)
    assert result["withdrawn"] == 1 and result["revisions"] > 0  # it did compute the work…
    assert snapshot(engine) == before  # …and changed nothing
    assert list((tmp_path / "out" / "payloads").rglob("*.json"))


def test_cli_dry_run_records_no_job_run(sqlite_engine: Any, tmp_path: Path, monkeypatch: Any) -> None:
    db = sqlite_engine.url.database
    config = tmp_path / "leadloop.toml"
    config.write_text(f"""
[database]
url = "sqlite:///{db}"
[crm]
kind = "hubspot"
token_env = "LL_TEST_HUBSPOT"
[destinations.files]
kind = "csv_files"
output_dir = "{tmp_path / 'files'}"
[[stages]]
name = "Qualified"
crm_values = ["salesqualifiedlead"]
macro = true
value = 10.0
destinations = {{ files = "Qualified lead" }}
""")
    monkeypatch.setenv("LL_TEST_HUBSPOT", "x")
    full_lead(sqlite_engine, 1)
    before = snapshot(sqlite_engine)
    out = CliRunner().invoke(cli, ["-c", str(config), "export", "--dry-run", "--out",
                                   str(tmp_path / "d")])
    assert out.exit_code == 0, out.output
    assert snapshot(sqlite_engine) == before
    with session_scope(sqlite_engine) as s:
        assert s.execute(select(JobRun)).first() is None
    assert not (tmp_path / "files").exists()


def test_dry_run_with_due_rows_does_not_say_every_conversion_is_held(
        engine: Any, fakes: FakePlatforms, tmp_path: Path) -> None:
    """A dry run sends nothing, but the due rows went to payload files: the note that says a
    destination got nothing because platform rules hold every conversion must not appear."""
    full_lead(engine, 1)  # due at Google Ads
    full_lead(engine, 2, gclid=None, gbraid=None, wbraid=None, email=None, phone=None)  # held
    ctx = make_ctx(engine, fakes, tmp_path, names=("gads",))
    ctx.dry_run, ctx.out_dir = True, tmp_path / "out"
    result = run_job(ctx, "export")
    per = result.counts["destinations"]["gads"]
    assert per["held"] >= 1 and per["due"] >= 1 and per["written"] == per["due"], per
    assert "notes" not in result.counts, result.counts["notes"]
    assert list((tmp_path / "out" / "payloads" / "gads").glob("*.json"))
