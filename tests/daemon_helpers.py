"""What the tests that run leadloop as a subprocess against the sandbox platforms share: the
config block of a macro stage uploaded to Google Data Manager, and the transaction ids the fake
platform really received."""

from __future__ import annotations

from collections import Counter

from leadloop.sandbox.fake_platforms import FakePlatforms


def gdm_stage(*, stage: str, value: float, destination: str, customer: str, url: str,
              token_env: str, batch_size: int) -> str:
    """TOML: one macro stage (HubSpot lifecycle `salesqualifiedlead`) and the Google Data
    Manager destination at `url` it uploads to."""
    return f"""
[[stages]]
name = "{stage}"
crm_values = ["salesqualifiedlead"]
field = "lifecyclestage"
macro = true
value = {value}
destinations = {{ {destination} = "{customer}" }}

[destinations.{destination}]
kind = "google_data_manager"
base_url = "{url}"
operating_account_id = "1234567890"
token_env = "{token_env}"
batch_size = {batch_size}
"""


def ingested_ids(platforms: FakePlatforms) -> Counter[str]:
    """Every transaction id the fake received in a real (not validate-only) ingest request."""
    seen: Counter[str] = Counter()
    for req in platforms.received("google_data_manager"):
        if req.method == "POST":
            body = req.json() or {}
            if not body.get("validateOnly"):
                seen.update(ev["transactionId"] for ev in body.get("events", []))
    return seen
