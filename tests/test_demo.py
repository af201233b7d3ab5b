"""`leadloop demo` end to end: the files a newcomer is promised, with vendor-shaped payloads."""

from __future__ import annotations

import csv
import json

import pytest
from google.ads import datamanager_v1

from leadloop.demo import run_demo


@pytest.mark.slow
def test_demo_writes_everything_the_readme_promises(tmp_path):
    out = tmp_path / "demo"
    summary = run_demo(out, n_leads=1500, seed=3)
    assert "synced      1500 leads" in summary
    assert (out / "leadloop.db").is_file()
    html = (out / "report.html").read_text()
    assert "<svg" in html and "http://" not in html.split("<body", 1)[1].split("xmlns", 1)[0]
    with (out / "validation.csv").open() as f:
        rows = list(csv.DictReader(f))
    verdicts = {r["micro"]: r["verdict"] for r in rows if r["segment"] == "all"}
    assert verdicts["pricing_view"] == "predictive"
    assert verdicts["careers_page_view"] in ("negative", "no signal", "not enough data")
    assert list((out / "models").glob("*.json")), "model card missing"
    google = sorted((out / "payloads" / "google_data_manager").glob("*.json"))
    assert google, "no Data Manager request bodies"
    for path in google:  # each file is exactly a request body the vendor's own type accepts
        body = json.loads(path.read_text())
        datamanager_v1.IngestEventsRequest.from_json(json.dumps(body), ignore_unknown_fields=False)
        assert 1 <= len(body["events"]) <= 2000
    for path in (out / "payloads" / "meta").glob("*.json"):
        body = json.loads(path.read_text())
        assert "access_token" not in body and 1 <= len(body["data"]) <= 1000
        assert all(e["action_source"] == "system_generated" for e in body["data"])
