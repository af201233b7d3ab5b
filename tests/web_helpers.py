"""A config file with comments, a store with sent conversions, and a running workbench: shared by
the workbench tests (`test_web.py`, and `test_web_browser.py` in a real Chromium)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from leadloop.config import load_settings
from leadloop.context import Context
from leadloop.http import make_session
from leadloop.sandbox.fake_platforms import FakePlatforms
from tests.export_helpers import NOW, full_lead

CONFIG_TEXT = """\
# leadloop config for the workbench tests.
# Comments like this one must survive a save from the web page.

[database]
url = "{db_url}"

[crm]
kind = "hubspot"
base_url = "http://127.0.0.1:1"
token_env = "LEADLOOP_TEST_TOKEN"

# The stage-to-value mapping.
[[stages]]
name = "Lead"
crm_values = ["lead"]
field = "lifecyclestage"
value = 0.0  # a raw lead is worth nothing yet
currency = "EUR"

[[stages]]
name = "Qualified"
crm_values = ["salesqualifiedlead"]
field = "lifecyclestage"
macro = true
value = 100.0  # agreed with sales in Q3
currency = "EUR"
destinations = {{ gads = "7002", msads = "Qualified lead" }}

[[stages]]
name = "Won"
crm_values = ["closedwon"]
field = "dealstage"
value = "deal_amount"
currency = "EUR"

[[micro_conversions]]
name = "pricing_view"
event = "pricing_view"

[destinations.gads]
kind = "google_ads"
base_url = "{gads}"
customer_id = "1234567890"
login_account_id = "111-222-3333"

[destinations.msads]
kind = "microsoft"
base_url = "{msads}"
customer_id = "42"
account_id = "4242"

[model]
dir = "{tmp}/models"

[report]
out_dir = "{tmp}/reports"
"""


def write_config(tmp_path: Path, db_url: str, urls: dict[str, str]) -> Path:
    path = tmp_path / "leadloop.toml"
    path.write_text(CONFIG_TEXT.format(db_url=db_url, tmp=tmp_path,
                                       gads=urls.get("google_ads", "http://127.0.0.1:1"),
                                       msads=urls.get("microsoft", "http://127.0.0.1:1")))
    return path


def export_context(path: Path, engine: Engine) -> Context:
    """The exporter as the daemon would run it on this config file, on the tests' clock."""
    return Context(settings=load_settings(path), engine=engine, now=lambda: NOW,
                   http_factory=partial(make_session, retries=0), config_path=path)


def sent_store(engine: Engine, path: Path, n: int = 4) -> Context:
    """`n` qualified leads every platform accepts, exported once (all sent)."""
    from leadloop.export.engine import run_export

    for i in range(n):
        full_lead(engine, i, age=timedelta(days=3))
    ctx = export_context(path, engine)
    result = run_export(ctx)
    assert result["sent"] == 2 * n, result
    return ctx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_workbench(path: Path, **kw: Any) -> Iterator[str]:
    """`leadloop serve` in a thread on a free loopback port; yields its base URL."""
    import uvicorn

    from leadloop.web import create_app

    port = free_port()
    app = create_app(path, host="127.0.0.1", port=port, **kw)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the workbench did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def platforms() -> Iterator[FakePlatforms]:
    with FakePlatforms(now=lambda: NOW) as fakes:
        yield fakes
