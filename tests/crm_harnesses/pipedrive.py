"""Contract harness for the Pipedrive connector over tests/fakes/pipedrive.py.

Pipedrive v2 lists no deleted persons and exposes no merge trail, so this fake does not
produce person deletes or merges (see the connector's docstring)."""

from __future__ import annotations

from typing import Any, ClassVar

from tests.crm_harnesses import Faults, Harness
from tests.fakes.pipedrive import FakePipedrive

GCLID_KEY = "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0"  # a 40-char custom field hash key


class PipedriveHarness(Harness):
    kind: ClassVar[str] = "pipedrive"
    supports: ClassVar[frozenset[str]] = frozenset({
        "incremental", "stage_history", "server_errors", "dropped_connections", "rate_limited",
        "repeated_pages", "daily_quota"})

    def __init__(self) -> None:
        super().__init__()
        self.fake = FakePipedrive(self.clock.now)
        self._deal_of: dict[str, int] = {}
        self._rotation = 0
        self._saved_budget = self.fake.daily_budget

    def start(self) -> None:
        self.fake.start()

    def stop(self) -> None:
        self.fake.stop()

    def env(self) -> dict[str, str]:
        return {"PIPEDRIVE_TOKEN": self.fake.token}

    def settings_sections(self) -> dict[str, Any]:
        return {
            "crm": {"kind": "pipedrive", "base_url": self.fake.base_url, "token_env": "PIPEDRIVE_TOKEN",
                    "page_size": 25, "requests_per_10s": 1000,
                    "properties": {"gclid": GCLID_KEY}},
            "stages": [
                {"name": "Contacted", "crm_values": ["Contact Made"], "field": "stage"},
                {"name": "Proposal", "crm_values": ["Proposal Made"], "field": "stage", "macro": True},
                {"name": "Won", "crm_values": ["won"], "field": "status", "value": "deal_amount"},
            ],
        }

    def seed(self, n: int) -> list[str]:
        self.clock.advance()
        ids = []
        for _ in range(n):
            person = self.fake.add_person()
            pid = person["id"]
            self.fake.touch(self.fake.persons, pid,
                            emails=[{"value": f"p{pid}@example.com", "primary": True, "label": "work"}],
                            phones=[{"value": f"+3725{pid:06d}", "primary": True, "label": "mobile"}],
                            custom_fields={GCLID_KEY: f"gclid-{pid}"})
            self._deal_of[str(pid)] = self.fake.add_deal(pid)["id"]
            ids.append(str(pid))
        return ids

    def update(self, n: int) -> list[str]:
        self.clock.advance()
        live = sorted(self.fake.persons, key=int)
        ids = [live[(self._rotation + j) % len(live)] for j in range(n)]
        self._rotation += n
        for pid in ids:
            self.fake.touch(self.fake.persons, pid, name=f"Renamed {pid}")
        return [str(i) for i in ids]

    def delete(self, k: int) -> list[str]:
        raise NotImplementedError("Pipedrive v2 does not list deleted persons")

    def advance_stage(self, crm_id: str) -> tuple[str, str]:
        self.clock.advance()
        value = self.fake.advance(self._deal_of[crm_id])
        return ("status", "won") if value == "won" else ("stage", value)

    def expected_leads(self) -> dict[str, str]:
        return {str(pid): "active" for pid in self.fake.persons}

    def expected_stages(self) -> set[tuple[str, str, str]]:
        facts = set()
        for did, entered in self.fake.history.items():
            pid = str(self.fake.deals[did]["person_id"])
            facts |= {(pid, "status", v) if v == "won" else (pid, "stage", v) for v in entered}
        return facts

    def inject_faults(self, faults: Faults) -> None:
        self.fake.server_errors += faults.server_errors
        self.fake.dropped_connections += faults.dropped_connections
        self.fake.rate_limited += faults.rate_limited
        self.fake.repeated_pages += faults.repeated_pages
        if faults.daily_quota_exhausted:
            self.fake.tokens_used = self.fake.daily_budget
        elif self.fake.tokens_used >= self.fake.daily_budget:
            self.fake.tokens_used = 0  # a new day

    def requests_served(self) -> int:
        return len(self.fake.server.received)


HARNESS = PipedriveHarness
