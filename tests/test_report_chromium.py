"""The HTML report in a real browser: headless Chromium, no network, no console messages, every chart
drawn with a nonzero size; the screenshot is kept under tests/artifacts/ (gitignored).

Two loads: the report exactly as written (its CSP forbids scripts; any console message — a CSP
violation, a blocked fetch, a parse error — fails the test, and the screenshot is taken), and an
instrumented copy whose appended script writes each chart's laid-out size into the DOM for
`--dump-dom` to return.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from leadloop.context import Context
from leadloop.report import write_reports
from tests.test_report_fixture import NOW, REPORT_SECTIONS, populate

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND",
    "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
]
MEASURE = """<script>
window.addEventListener('load', () => {
  const charts = [...document.querySelectorAll('svg')].map(s => {
    const r = s.getBoundingClientRect();
    return {w: r.width, h: r.height, shapes: s.querySelectorAll('path, text, use').length};
  });
  const pre = document.createElement('pre');
  pre.id = 'layout';
  pre.textContent = JSON.stringify({charts, height: document.documentElement.scrollHeight});
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists()
                                        else None)
    if path:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but chromium is not installed (Debian package `chromium`)")
    pytest.skip("chromium not installed (apt-get install chromium)")


def _run(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(sqlite_engine: Engine,
                                             make_context: Callable[..., Context],
                                             tmp_path: Path) -> None:
    browser = _chromium()
    populate(sqlite_engine)
    ctx = make_context(sqlite_engine, **REPORT_SECTIONS)
    ctx.now = lambda: NOW
    write_reports(ctx, tmp_path / "out")
    report = tmp_path / "out" / "report.html"
    html = report.read_text(encoding="utf-8")
    n_svg = html.count("<svg")
    assert n_svg >= 6

    # 1) measure the laid-out charts in an instrumented copy (the report itself allows no script)
    probe = tmp_path / "probe.html"
    probe.write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", html)
                     .replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    dom = _run(browser, tmp_path / "profile-probe", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="layout">(.*?)</pre>', dom.stdout, re.S)
    assert found, f"no layout from chromium (rc={dom.returncode}): {dom.stderr[-2000:]}"
    layout = json.loads(found.group(1).replace("&quot;", '"'))
    charts = layout["charts"]
    assert len(charts) == n_svg
    for i, c in enumerate(charts):
        assert c["w"] > 100 and c["h"] > 80, f"chart {i} not drawn: {c}"
        assert c["shapes"] > 10, f"chart {i} is empty: {c}"

    # 2) the report as written: screenshot, and no console message of any kind
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    height = min(int(layout["height"]) + 40, 16000)
    run = _run(browser, tmp_path / "profile-shot", f"--window-size=1280,{height}",
               f"--screenshot={shot}", report.as_uri())
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], "console messages:\n" + "\n".join(console)
    assert shot.is_file() and shot.stat().st_size > 50_000, run.stderr[-2000:]
    shutil.copy(report, ARTIFACTS / "report.html")
