"""The workbench (`leadloop serve`) without a browser: security checks, saving, preview, daemon
pick-up, and the report additions shared with its pages. The browser run is test_web_browser.py."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy.engine import Engine
from starlette.testclient import TestClient

from leadloop.cli import cli
from leadloop.daemon import Daemon
from leadloop.export.engine import run_export
from leadloop.scoring.card import ModelCard
from leadloop.web import create_app
from leadloop.web.configedit import history_dir, read_log
from tests.web_helpers import export_context, platforms, sent_store, write_config

BASE = "http://127.0.0.1:8765"


@pytest.fixture
def fakes() -> Any:
    with platforms() as f:
        yield f


@pytest.fixture
def config(tmp_path: Path, sqlite_engine: Engine, fakes: Any) -> Path:
    return write_config(tmp_path, sqlite_engine.url.render_as_string(), fakes.urls)


def client(path: Path, **kw: Any) -> TestClient:
    return TestClient(create_app(path, host="127.0.0.1", port=8765, **kw), base_url=BASE,
                      follow_redirects=False)


def csrf_of(page: str) -> tuple[str, str]:
    token = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    version = re.search(r'name="version" value="([0-9a-f]+)"', page)
    assert token and version
    return token.group(1), version.group(1)


def stage_form(csrf: str, version: str, value: str, action: str = "save", **extra: str
               ) -> dict[str, str]:
    return {"csrf": csrf, "version": version, "stage": "1", "value": value, "dest_gads": "7002",
            "dest_msads": "Qualified lead", "macro": "on", "action": action, **extra}


def test_every_page_renders_with_a_strict_csp(config: Path, sqlite_engine: Engine) -> None:
    sent_store(sqlite_engine, config)
    c = client(config)
    for path in ("/", "/stages", "/micro-conversions", "/uploads", "/status"):
        r = c.get(path)
        assert r.status_code == 200, (path, r.text[:500])
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp  # no script at all
        assert "<script" not in r.text and not re.search(r'(src|href|action)="(https?:)?//', r.text)
    assert c.get("/static/web.css").status_code == 200


def test_writes_need_the_csrf_token_and_a_same_origin_origin(config: Path,
                                                             sqlite_engine: Engine) -> None:
    before = config.read_bytes()
    c = client(config)
    csrf, version = csrf_of(c.get("/stages").text)
    same = {"origin": BASE}
    no_token = stage_form("", version, "250")
    assert c.post("/stages", data=no_token, headers=same).status_code == 403
    wrong = stage_form("0" * 64, version, "250")
    assert c.post("/stages", data=wrong, headers=same).status_code == 403
    good = stage_form(csrf, version, "250")
    assert c.post("/stages", data=good).status_code == 403  # no Origin
    assert c.post("/stages", data=good, headers={"origin": "http://evil.example"}).status_code == 403
    assert c.post("/uploads/retry", data={"destination": "gads"}, headers=same).status_code == 403
    assert config.read_bytes() == before and not history_dir(config).exists()
    # A page reached under another name (DNS rebinding) is refused outright.
    assert c.get("/stages", headers={"host": "evil.example:8765"}).status_code == 403
    r = c.post("/stages", data=good, headers=same)
    assert r.status_code == 303 and "250.0" in config.read_text()


def test_save_keeps_comments_backs_up_and_records_who_and_what(config: Path,
                                                                sqlite_engine: Engine) -> None:
    original = config.read_text()
    c = client(config)
    csrf, version = csrf_of(c.get("/stages").text)
    r = c.post("/stages", data=stage_form(csrf, version, "250"), headers={"origin": BASE})
    assert r.status_code == 303
    text = config.read_text()
    assert "# Comments like this one must survive a save from the web page." in text
    assert "value = 250.0  # agreed with sales in Q3" in text
    assert text.replace("250.0", "100.0") == original  # nothing else moved
    assert tomllib.loads(text)["stages"][1]["value"] == 250.0
    backups = sorted(history_dir(config).glob("leadloop-*.toml"))
    assert len(backups) == 1 and backups[0].read_text() == original
    (record,) = read_log(config)
    assert record["user"] and record["at"].endswith("Z")
    assert record["changes"] == [{"key": "stages[1].value", "before": 100.0, "after": 250.0}]
    page = c.get("/stages").text
    assert "stages[1].value" in page and record["user"] in page
    # the same form again is stale: the file changed since it was rendered
    r = c.post("/stages", data=stage_form(csrf, version, "300"), headers={"origin": BASE})
    assert r.status_code == 422 and "changed since this page was loaded" in r.text
    assert "value = 250.0" in config.read_text()


def test_a_bad_value_is_shown_next_to_its_field_and_nothing_is_written(config: Path,
                                                                        sqlite_engine: Engine) -> None:
    before = config.read_bytes()
    c = client(config)
    csrf, version = csrf_of(c.get("/stages").text)
    for value, message in (("-5", "must be &gt;= 0"), ("lots", "Input should be")):
        r = c.post("/stages", data=stage_form(csrf, version, value), headers={"origin": BASE})
        assert r.status_code == 422
        err = re.search(r'id="error-1-value">([^<]*)<', r.text)
        assert err and message in err.group(1), r.text[-3000:]
    # unmarking the only macro stage breaks a cross-check: shown at the top, nothing written
    form = stage_form(csrf, version, "100")
    del form["macro"]
    r = c.post("/stages", data=form, headers={"origin": BASE})
    assert r.status_code == 422 and "one stage must have macro = true" in r.text
    assert config.read_bytes() == before


@pytest.mark.postgres
def test_preview_counts_what_the_next_export_sends(tmp_path: Path, engine: Engine,
                                                   fakes: Any) -> None:
    config = write_config(tmp_path, engine.url.render_as_string(hide_password=False), fakes.urls)
    sent_store(engine, config, n=3)
    c = client(config)
    csrf, version = csrf_of(c.get("/stages").text)
    before = config.read_bytes()
    r = c.post("/stages", data=stage_form(csrf, version, "250", action="preview"),
               headers={"origin": BASE})
    assert r.status_code == 200 and config.read_bytes() == before
    assert re.findall(r'<td data-effect="restatements">(\d+)', r.text) == ["3", "3"]
    assert re.findall(r'<td data-effect="retractions">(\d+)', r.text) == ["0", "0"]
    assert "Guardrails after the change" in r.text and 'id="save-1"' in r.text
    r = c.post("/stages", data=stage_form(csrf, version, "250"), headers={"origin": BASE})
    assert r.status_code == 303
    result = run_export(export_context(config, engine))
    assert result["revisions"] == 6 and result["sent"] == 6
    restated = [a for a in fakes.adjustments["google_ads"] if a["adjustmentType"] == "RESTATEMENT"]
    assert len(restated) == 3 and {a["restatementValue"]["adjustedValue"] for a in restated} == {250.0}


def test_roles_and_retry_dead_rows(config: Path, sqlite_engine: Engine) -> None:
    from sqlalchemy import select, update

    from leadloop.store import session_scope
    from leadloop.tables import Conversion, ConversionStatus

    sent_store(sqlite_engine, config, n=2)
    with session_scope(sqlite_engine) as s:
        s.execute(update(Conversion).where(Conversion.destination == "msads")  # type: ignore[arg-type]
                  .values(status=ConversionStatus.dead, attempts=8, last_error="boom"))
    c = client(config)
    page = c.get("/uploads?destination=msads&status=dead").text
    assert "Retry 2 dead rows to msads" in page and "boom" in page
    csrf, _ = csrf_of(c.get("/stages").text)
    r = c.post("/uploads/retry", data={"csrf": csrf, "destination": "msads"},
               headers={"origin": BASE})
    assert r.status_code == 303 and "retried=2" in r.headers["location"]
    with session_scope(sqlite_engine) as s:
        statuses = {(row.status, row.attempts) for row in s.execute(
            select(Conversion.status, Conversion.attempts).where(Conversion.destination == "msads"))}
    assert statuses == {(ConversionStatus.pending, 0)}
    assert read_log(config)[0]["what"] == "retry 2 dead conversions to msads"
    page = c.get("/micro-conversions").text
    assert "No validation run yet" in page


def test_another_host_needs_the_token(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(config, host="0.0.0.0", port=8765, token="s3cret-token")
    c = TestClient(app, base_url="http://192.0.2.10:8765", follow_redirects=False)
    r = c.get("/")
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert c.post("/stages", data={}).status_code == 403
    assert c.get("/", headers={"authorization": "Bearer s3cret-token"}).status_code == 200
    r = c.post("/login", data={"token": "wrong"}, headers={"origin": "http://192.0.2.10:8765"})
    assert r.status_code == 401
    r = c.post("/login", data={"token": "s3cret-token"}, headers={"origin": "http://192.0.2.10:8765"})
    assert r.status_code == 303 and "s3cret-token" not in r.headers["set-cookie"]
    assert c.get("/status").status_code == 200  # the session cookie now
    runner = CliRunner()
    res = runner.invoke(cli, ["-c", str(config), "serve", "--host", "0.0.0.0"])
    assert res.exit_code == 2 and "--token-env" in res.output
    monkeypatch.delenv("WB_TOKEN", raising=False)
    res = runner.invoke(cli, ["-c", str(config), "serve", "--host", "0.0.0.0", "--token-env",
                              "WB_TOKEN"])
    assert res.exit_code == 2 and "WB_TOKEN" in res.output


def test_the_daemon_applies_a_saved_change_at_its_next_job(config: Path,
                                                           sqlite_engine: Engine) -> None:
    ctx = export_context(config, sqlite_engine)
    daemon = Daemon(ctx, owner="test")
    text = config.read_text().replace("value = 100.0", "value = 175.0")
    config.write_text(text)
    daemon._reload_config()
    assert daemon.ctx.settings.stage("Qualified").value == 175.0
    config.write_text(text.replace("value = 175.0", "value = -1.0"))  # invalid: kept as it was
    daemon._reload_config()
    assert daemon.ctx.settings.stage("Qualified").value == 175.0


def test_report_has_next_steps_readable_labels_and_spend(sqlite_engine: Engine,
                                                         make_context: Any, tmp_path: Path) -> None:
    from leadloop.report import write_reports
    from tests.test_report_fixture import NOW, REPORT_SECTIONS, populate

    populate(sqlite_engine)
    spend = tmp_path / "spend.csv"
    spend.write_text("Month,Source,Campaign,Cost (EUR)\n2025-01,google,brand,\"1,000.00\"\n"
                     "2025-02,facebook,leadform,300\n2025-02,bing,x,50\nbad,google,brand,1\n")
    sections = {**REPORT_SECTIONS, "report": {"out_dir": str(tmp_path), "ad_spend": str(spend)}}
    ctx = make_context(sqlite_engine, **sections)
    ctx.now = lambda: NOW
    write_reports(ctx, tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text()
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "Do this next" in page and doc["next_steps"]
    assert "Won (Won)" not in page and "WON (WON)" not in page
    assert not re.search(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d", page)  # no raw timestamps
    assert "right-censoring" in page and doc["maturity"]["immature_months"]
    assert doc["ad_spend"]["total"] == 1350.0 and doc["ad_spend"]["unmatched"] == ["bing"]
    google = next(r for r in doc["tables"]["lead_value_by_source"] if r["source"] == "google")
    assert google["spend"] == 1000.0 and google["cost_per_lead"] == 250.0
    assert google["roas"] == pytest.approx(1000.0 / 1000.0)
    assert any("line 5 left out" in n for n in doc["notes"])
    assert "cost / qualified" in page and "ROAS" in page


def test_the_demo_ends_with_the_command_that_opens_the_workbench_on_its_output(
        tmp_path: Path) -> None:
    from leadloop.config import load_settings
    from leadloop.demo import WORKBENCH_CONFIG, _summary, _write_workbench_config

    path = _write_workbench_config(tmp_path)
    settings = load_settings(path)
    assert settings.database.url == f"sqlite:///{(tmp_path / 'leadloop.db').resolve()}"
    assert "# The stage-to-value mapping." in path.read_text()  # demo.toml's comments kept
    last = _summary(tmp_path, {}, {}, 1.0).splitlines()[-1]
    assert f"leadloop -c {tmp_path / WORKBENCH_CONFIG} serve" in last
    assert client(path).get("/").status_code == 200  # an empty store still renders


def test_model_card_fields_of_newer_cards_are_shown_when_present(
        sqlite_engine: Engine, make_context: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    from leadloop.report import write_reports
    from tests.test_report_fixture import REPORT_SECTIONS, populate

    card = {
        "version": "m-2", "chosen": "hgb", "created_at": "2025-02-28T00:00:00+00:00",
        "mode": "candidate only", "suspected_leakage": ["attr_deal_owner"],
        "metrics": {"roc_auc": 0.81}, "baseline": {"roc_auc": 0.5},
        "candidate_metrics": {"roc_auc": 0.93}, "shipped_auc": 0.81,
        "calibration_by_age_band": [{"band": "0–30 days", "n": 40, "predicted": 0.2,
                                     "observed": 0.1}],
    }
    fake = types.ModuleType("leadloop.scoring.registry")
    fake.current_card = lambda settings: ModelCard.from_dict(card)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "leadloop.scoring.registry", fake)
    populate(sqlite_engine)
    write_reports(make_context(sqlite_engine, **REPORT_SECTIONS), tmp_path)
    page = (tmp_path / "report.html").read_text()
    for text in ("candidate only", "Suspected leakage: attr_deal_owner", "0.930", "shipped auc",
                 "Calibration by lead age", "0–30 days", "28 Feb 2025"):
        assert text in page, text


def test_a_micro_conversion_role_is_saved_in_the_toml(config: Path, sqlite_engine: Engine) -> None:
    from tests.test_report_fixture import populate

    populate(sqlite_engine)  # has a validation run with pricing_view
    c = client(config)
    page = c.get("/micro-conversions").text
    assert 'id="role-pricing_view"' in page and "recommended role" in page
    csrf, version = csrf_of(page)
    r = c.post("/micro-conversions", data={"csrf": csrf, "version": version,
                                           "role_pricing_view": "primary goal"},
               headers={"origin": BASE})
    assert r.status_code == 303
    doc = tomllib.loads(config.read_text())
    assert doc["micro_conversions"][0]["role"] == "primary goal"
    assert "# The stage-to-value mapping." in config.read_text()
    assert read_log(config)[0]["changes"] == [
        {"key": "micro_conversions[0].role", "before": None, "after": "primary goal"}]
    page = c.get("/micro-conversions").text
    assert '<option value="primary goal" selected>' in page


def test_report_takes_ad_spend_from_the_command_line(config: Path, sqlite_engine: Engine,
                                                     tmp_path: Path) -> None:
    from tests.test_report_fixture import populate

    populate(sqlite_engine)
    spend = tmp_path / "meta-export.csv"  # a platform's export: no source column
    spend.write_text("Reporting starts,Campaign name,Amount spent (USD)\n"
                     "2025-02-01,leadform,300.00\n")
    res = CliRunner().invoke(cli, ["-c", str(config), "report", "--format", "json",
                                   "--ad-spend", str(spend)])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["ad_spend"]["total"] == 300.0
    leadform = next(r for r in doc["tables"]["lead_value_by_campaign"] if r["campaign"] == "leadform")
    assert leadform["spend"] == 300.0
    assert leadform["cost_per_lead"] == pytest.approx(300.0 / leadform["leads"])
    assert "--token-env NAME" in CliRunner().invoke(cli, ["serve", "--help"]).output
