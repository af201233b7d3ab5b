"""Contract harness for the Salesforce connector over tests/fakes/salesforce.py."""

from __future__ import annotations

from typing import Any, ClassVar

from tests.crm_harnesses import Faults, Harness
from tests.fakes.salesforce import STAGES, FakeSalesforce

_OPEN = "Open - Not Contacted"
_STAGE_ORDER = [s for s, _, _ in STAGES]


class SalesforceHarness(Harness):
    kind: ClassVar[str] = "salesforce"
    supports: ClassVar[frozenset[str]] = frozenset({
        "incremental", "delete", "merge", "stage_history", "server_errors",
        "dropped_connections", "repeated_pages", "daily_quota"})

    def __init__(self) -> None:
        super().__init__()
        self.fake = FakeSalesforce(self.clock.now)
        self._n = 0
        self._rotation = 0

    def start(self) -> None:
        self.fake.start()

    def stop(self) -> None:
        self.fake.stop()

    def env(self) -> dict[str, str]:
        return {"SF_CLIENT_ID": self.fake.client_id, "SF_CLIENT_SECRET": self.fake.client_secret,
                "SF_REFRESH_TOKEN": self.fake.refresh_token}

    def settings_sections(self) -> dict[str, Any]:
        return {
            "crm": {"kind": "salesforce", "auth_flow": "refresh_token",
                    "token_url": f"{self.fake.base_url}/services/oauth2/token",
                    "client_id_env": "SF_CLIENT_ID", "client_secret_env": "SF_CLIENT_SECRET",
                    "refresh_token_env": "SF_REFRESH_TOKEN", "page_size": 200,
                    "properties": {"gclid": "GCLID__c", "utm_campaign": "utm_campaign__c"}},
            "stages": [
                {"name": "Lead", "crm_values": [_OPEN], "field": "Status"},
                {"name": "Converted", "crm_values": ["Closed - Converted"], "field": "Status",
                 "macro": True, "value": 50.0},
                {"name": "Won", "crm_values": ["Closed Won"], "field": "StageName",
                 "value": "deal_amount"},
            ],
        }

    def seed(self, n: int) -> list[str]:
        self.clock.advance()
        ids = []
        for _ in range(n):
            self._n += 1
            row = self.fake.insert(
                "Lead", Status=_OPEN, Email=f"lead{self._n}@example.com",
                Phone=f"+1 650 555 {self._n % 10000:04d}", LeadSource="Web",
                GCLID__c=f"gclid-{self._n}", utm_campaign__c="autumn", Company=f"Co {self._n}",
                IsConverted=False)
            ids.append(str(row["Id"]))
        return ids

    def _live(self) -> list[str]:
        return [i for i, r in self.fake.tables["Lead"].items() if not r["IsDeleted"]]

    def update(self, n: int) -> list[str]:
        self.clock.advance()
        live = self._live()
        ids = [live[(self._rotation + j) % len(live)] for j in range(n)]
        self._rotation += n
        for i in ids:
            self.fake.modify("Lead", i, Company="Renamed Inc")
        return ids

    def delete(self, k: int) -> list[str]:
        self.clock.advance()
        ids = self._live()[-k:]
        for i in ids:
            self.fake.delete("Lead", i)
        return ids

    def merge(self, survivor: str, absorbed: str) -> None:
        self.clock.advance()
        self.fake.merge(survivor, absorbed)

    def advance_stage(self, crm_id: str) -> tuple[str, str]:
        self.clock.advance()
        lead = self.fake.tables["Lead"][crm_id]
        if not lead.get("IsConverted"):
            self.fake.convert(crm_id, "Prospecting", amount=1200.0)
            return ("StageName", "Prospecting")
        opp_id = lead["ConvertedOpportunityId"]
        stage = self.fake.tables["Opportunity"][opp_id]["StageName"]
        nxt = _STAGE_ORDER[min(_STAGE_ORDER.index(stage) + 1, 2)]
        closed = nxt.startswith("Closed")
        self.fake.modify("Opportunity", opp_id, StageName=nxt, IsClosed=closed,
                         IsWon=nxt == "Closed Won")
        return ("StageName", nxt)

    def expected_leads(self) -> dict[str, str]:
        out = {}
        for i, r in self.fake.tables["Lead"].items():
            if r["IsDeleted"]:
                out[i] = "merged" if r.get("MasterRecordId") else "deleted"
            else:
                out[i] = "active"
        return out

    def expected_stages(self) -> set[tuple[str, str, str]]:
        live = {i for i, s in self.expected_leads().items() if s == "active"}
        facts = {(h["LeadId"], "Status", h["NewValue"])
                 for h in self.fake.tables["LeadHistory"].values() if h["LeadId"] in live}
        owner = {r["ConvertedOpportunityId"]: i for i, r in self.fake.tables["Lead"].items()
                 if r.get("ConvertedOpportunityId") and i in live}
        facts |= {(owner[h["OpportunityId"]], "StageName", h["StageName"])
                  for h in self.fake.tables["OpportunityHistory"].values()
                  if h["OpportunityId"] in owner}
        return facts

    def inject_faults(self, faults: Faults) -> None:
        self.fake.server_errors += faults.server_errors
        self.fake.dropped_connections += faults.dropped_connections
        self.fake.repeated_pages += faults.repeated_pages
        if faults.daily_quota_exhausted:
            self.fake.api_usage = self.fake.daily_limit
        elif self.fake.api_usage >= self.fake.daily_limit:
            self.fake.api_usage = 0  # the rolling window moved on

    def requests_served(self) -> int:
        return len(self.fake.server.received)


HARNESS = SalesforceHarness
