"""The workbench in a real browser: Playwright drives Debian's Chromium (`executable_path`, no
browser download). Edit a stage value, see the preview, save, check the TOML (comments kept) and
the next export's restatements; a write without the CSRF token is refused. A screenshot of each
page at 1280 px wide goes to the test's output folder (tmp_path/screens)."""

from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from leadloop.export.engine import run_export
from tests.web_helpers import export_context, platforms, running_workbench, sent_store, write_config

PAGES = {"overview": "/", "stages": "/stages", "micro-conversions": "/micro-conversions",
         "uploads": "/uploads", "status": "/status"}


def chromium_path() -> str:
    path = shutil.which("chromium") or next(
        (p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)
    if path:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but chromium is not installed (Debian package `chromium`)")
    pytest.skip("chromium not installed (apt-get install chromium)")


@pytest.fixture
def browser() -> Any:
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = chromium_path()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield b
        b.close()


def screenshots(page: Any, base: str, out: Path) -> list[Path]:
    """Every page at 1280 px wide, full height; no console message of any kind on the way."""
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    for name, path in PAGES.items():
        page.goto(base + path)
        shot = out / f"{name}.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        shots.append(shot)
    return shots


@pytest.mark.slow
def test_edit_preview_save_and_the_next_export_restates(browser: Any, tmp_path: Path,
                                                        sqlite_engine: Engine) -> None:
    with platforms() as fakes:
        config = write_config(tmp_path, str(sqlite_engine.url), fakes.urls)
        sent_store(sqlite_engine, config, n=3)
        with running_workbench(config) as base:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            console: list[str] = []
            page.on("console", lambda msg: console.append(msg.text))
            page.on("pageerror", lambda exc: console.append(str(exc)))
            screenshots(page, base, tmp_path / "screens")

            page.goto(base + "/stages")
            page.fill("#value-1", "250")
            page.click("#preview-1")
            preview = page.locator("#preview-result")
            preview.wait_for()
            cells = preview.locator('td[data-effect="restatements"]').all_inner_texts()
            assert [c.split()[0] for c in cells] == ["3", "3"]
            assert "+3 from this change" in cells[0]
            assert "Guardrails after the change" in preview.inner_text()
            assert tomllib.loads(config.read_text())["stages"][1]["value"] == 100.0  # not yet
            page.screenshot(path=str(tmp_path / "screens" / "stages-preview.png"), full_page=True)
            page.click("#save-1")
            page.wait_for_url("**/stages?saved=1*")
            assert "Saved." in page.inner_text("body")
            assert "stages[1].value" in page.inner_text("#history")

            text = config.read_text()
            assert "# Comments like this one must survive a save from the web page." in text
            assert "value = 250.0  # agreed with sales in Q3" in text
            result = run_export(export_context(config, sqlite_engine))
            assert result["revisions"] == 6 and result["sent"] == 6
            restated = [a for a in fakes.adjustments["google_ads"]
                        if a["adjustmentType"] == "RESTATEMENT"]
            assert {a["restatementValue"]["adjustedValue"] for a in restated} == {250.0}
            assert len(restated) == 3

            assert console == [], console  # no CSP violation, no script error, no failed load

            # A write without the page's CSRF token (a forged form) is refused; nothing changes.
            before = config.read_bytes()
            page.goto(base + "/stages")
            page.evaluate("document.querySelector('#stage-1 input[name=csrf]').remove()")
            page.fill("#value-1", "999")
            with page.expect_response(lambda resp: resp.request.method == "POST") as answer:
                page.click("#preview-1")
            assert answer.value.status == 403 and "Nothing was changed" in page.inner_text("body")
            r = page.request.post(base + "/stages", headers={"origin": base}, form={
                "stage": "1", "value": "999", "dest_gads": "7002", "dest_msads": "Qualified lead",
                "macro": "on", "action": "save", "version": "x"})
            assert r.status == 403 and "CSRF" in r.text()
            assert config.read_bytes() == before
            page.close()
