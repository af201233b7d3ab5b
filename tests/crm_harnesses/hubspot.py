"""Contract-suite harness for the HubSpot connector, on `leadloop.sandbox.fake_hubspot`."""

from __future__ import annotations

from typing import Any, ClassVar

from leadloop.sandbox.fake_hubspot import FakeHubSpot
from tests.crm_harnesses import Faults, Harness

TOKEN = "pat-na1-contract-suite-token"
ENV = "LEADLOOP_TEST_HUBSPOT_TOKEN"
LIFECYCLE = ("lead", "marketingqualifiedlead", "salesqualifiedlead", "opportunity", "customer")


class HubSpotHarness(Harness):
    kind: ClassVar[str] = "hubspot"
    supports: ClassVar[frozenset[str]] = frozenset({
        "incremental", "delete", "merge", "stage_history", "server_errors", "dropped_connections",
        "rate_limited", "repeated_pages", "daily_quota"})

    def __init__(self) -> None:
        super().__init__()
        self.fake = FakeHubSpot(token=TOKEN, now=self.clock.now, requests_per_window=None,
                                search_per_second=None, daily_limit=None)
        self._merged: set[str] = set()
        self._updated: set[str] = set()

    def start(self) -> None:
        self.fake.start()

    def stop(self) -> None:
        self.fake.stop()

    def env(self) -> dict[str, str]:
        return {ENV: TOKEN}

    def settings_sections(self) -> dict[str, Any]:
        return {
            "crm": {"kind": "hubspot", "base_url": self.fake.base_url, "token_env": ENV,
                    "lookback_minutes": 10, "requests_per_10s": 10_000, "objects": ["contacts"]},
            "stages": [{"name": "SQL", "crm_values": ["salesqualifiedlead"], "field": "lifecyclestage",
                        "macro": True}],
        }

    def _live(self) -> list[str]:
        return sorted((c for c, o in self.fake.contacts.items() if o.archived_at is None), key=int)

    def seed(self, n: int) -> list[str]:
        self.clock.advance()
        return [self.fake.add_contact(email=f"lead{i}.{self.clock.now():%H%M}@example.com",
                                      phone=f"+1 202-555-01{i % 100:02d}") for i in range(n)]

    def update(self, n: int) -> list[str]:
        self.clock.advance()
        ids = [c for c in self._live() if c not in self._updated][:n]
        for c in ids:
            self.fake.update_contact(c, industry="software")
            self._updated.add(c)
        return ids

    def delete(self, k: int) -> list[str]:
        self.clock.advance()
        ids = self._live()[:k]
        for c in ids:
            self.fake.archive(c)
        return ids

    def merge(self, survivor: str, absorbed: str) -> None:
        self.clock.advance()
        self.fake.merge(survivor, absorbed)
        self._merged.add(absorbed)

    def advance_stage(self, crm_id: str) -> tuple[str, str]:
        self.clock.advance()
        current = self.fake.contacts[crm_id].properties().get("lifecyclestage") or "lead"
        value = LIFECYCLE[min(LIFECYCLE.index(current) + 1, len(LIFECYCLE) - 1)]
        self.fake.set_lifecycle(crm_id, value)
        return "lifecyclestage", value

    def expected_leads(self) -> dict[str, str]:
        out = {c: ("deleted" if o.archived_at is not None else "active")
               for c, o in self.fake.contacts.items()}
        out.update(dict.fromkeys(self._merged, "merged"))
        return out

    def expected_stages(self) -> set[tuple[str, str, str]]:
        return {(c, "lifecyclestage", k.removeprefix("hs_v2_date_entered_"))
                for c, o in self.fake.contacts.items() if o.archived_at is None
                for k, v in o.properties().items() if k.startswith("hs_v2_date_entered_") and v}

    def inject_faults(self, faults: Faults) -> None:
        self.fake.daily_exhausted = faults.daily_quota_exhausted
        self.fake.inject(server_errors=faults.server_errors,
                         dropped_connections=faults.dropped_connections,
                         rate_limited=faults.rate_limited, repeated_pages=faults.repeated_pages)

    def requests_served(self) -> int:
        return len(self.fake.received)

    def records_served(self) -> int:
        n, self.fake.records_returned = self.fake.records_returned, 0
        return n


HARNESS = HubSpotHarness
