"""Vendor error text is redacted before it is stored: a token that a proxy or WAF echoes back in an
error body reaches neither the store nor the report's HTML, JSON and CSV files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select, text, update

from leadloop.export.engine import run_export
from leadloop.export.outbox import order_id
from leadloop.report import write_reports
from leadloop.sandbox.fake_platforms import FakePlatforms
from leadloop.store import session_scope
from leadloop.tables import Lead, RejectedRecord
from tests.export_helpers import NOW, full_lead
from tests.test_export_outbox import make_ctx

META_TOKEN = "EAAGm0PX4ZCpsBAMETAsecret77"
GOOGLE_TOKEN = "ya29.a0AfH6SMBgoogleSecret42"


def test_a_token_echoed_in_an_error_body_is_never_stored_or_reported(
        sqlite_engine: Any, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("LL_TEST_META_TOKEN", META_TOKEN)
    monkeypatch.setenv("LL_TEST_GDM_TOKEN", GOOGLE_TOKEN)
    for i in range(3):
        full_lead(sqlite_engine, i)
    with session_scope(sqlite_engine) as s:  # a corrupt hash makes Data Manager name events[1]
        s.execute(update(Lead).where(Lead.crm_id == "1001").values(email_google_sha256="z" * 64))  # type: ignore[arg-type]
    with FakePlatforms(now=lambda: NOW) as fakes:
        fakes.echo_token = True
        fakes.reject("meta", order_id("meta", "hubspot", "1002", "Qualified", 0), "INVALID_LEAD")
        ctx = make_ctx(sqlite_engine, fakes, tmp_path, names=("meta", "gdm"),
                       meta={"token_env": "LL_TEST_META_TOKEN"},
                       gdm={"token_env": "LL_TEST_GDM_TOKEN"})
        result = run_export(ctx)
        assert result["rejected"] == 2
        # the fakes really did echo the credentials
        assert any(GOOGLE_TOKEN in str(r.headers) for r in fakes.received("google_data_manager"))
    with session_scope(sqlite_engine) as s:
        reasons = [r.reason for r in s.execute(select(RejectedRecord)).scalars()]
        dump = "\n".join(str(tuple(row)) for table in ("conversion", "rejected_record", "job_run",
                                                      "sync_state")
                         for row in s.execute(text(f"SELECT * FROM {table}")))
    assert any("***" in r for r in reasons)
    out = tmp_path / "report"
    write_reports(ctx, out)
    files = {p.name: p.read_text(errors="replace") for p in out.rglob("*") if p.is_file()}
    assert {"report.html", "report.json", "upload_rejections.csv"} <= set(files)
    assert "INVALID_LEAD" in files["upload_rejections.csv"]
    for where, content in {"store": dump, **files}.items():
        assert META_TOKEN not in content and GOOGLE_TOKEN not in content, where
