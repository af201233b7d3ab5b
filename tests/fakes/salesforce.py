"""A stateful fake Salesforce org on 127.0.0.1: OAuth token endpoint, SOQL query/queryAll with
query locators, history objects, the daily request allocation, and injectable faults.

It understands the SOQL subset leadloop sends: `SELECT f, ... FROM Obj [WHERE c AND c ...]
[ORDER BY f [ASC], ...] [LIMIT n]` with conditions `F >= <datetime>`, `F = 'x'` and
`F IN ('a', ...)`. Unknown objects answer INVALID_TYPE, unknown fields INVALID_FIELD, as the
real API does. Payload shapes follow shared/specs/crm_apis.md §2.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from leadloop.sandbox.server import Reply, Request
from tests.fakes.base import FakeServer

API = "v66.0"
_SELECT = re.compile(
    r"^SELECT\s+(?P<fields>.+?)\s+FROM\s+(?P<obj>\w+)"
    r"(?:\s+WHERE\s+(?P<where>.+?))?(?:\s+ORDER BY\s+(?P<order>.+?))?(?:\s+LIMIT\s+(?P<limit>\d+))?$",
    re.S | re.I,
)
_COND = re.compile(r"^(?P<f>\w+)\s*(?P<op>>=|<=|=|>|<|IN)\s*(?P<v>.+)$", re.I)
_DT_LITERAL = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")

# Fields each sObject has in this fake org (custom fields included).
SCHEMA: dict[str, set[str]] = {
    "Lead": {"Id", "Status", "IsConverted", "ConvertedDate", "ConvertedOpportunityId",
             "CreatedDate", "LastModifiedDate", "SystemModstamp", "IsDeleted", "MasterRecordId",
             "Email", "Phone", "LeadSource", "GCLID__c", "utm_campaign__c", "Company"},
    "Opportunity": {"Id", "StageName", "Amount", "IsClosed", "IsWon", "CloseDate", "CreatedDate",
                    "SystemModstamp", "IsDeleted", "LastModifiedDate"},
    "OpportunityHistory": {"Id", "OpportunityId", "StageName", "Amount", "CreatedDate",
                           "SystemModstamp", "IsDeleted"},
    "LeadHistory": {"Id", "LeadId", "Field", "OldValue", "NewValue", "CreatedDate", "IsDeleted"},
    "OpportunityStage": {"Id", "MasterLabel", "ApiName", "IsClosed", "IsWon", "IsActive",
                         "SortOrder", "DefaultProbability"},
}
STAGES = [("Prospecting", False, False), ("Qualification", False, False),
          ("Closed Won", True, True), ("Closed Lost", True, False)]


def sf_time(value: datetime) -> str:
    """Salesforce's response format: `2026-11-01T10:00:00.000+0000`."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000+0000")


def _error(status: int, code: str, message: str) -> Reply:
    return Reply(status, [{"message": message, "errorCode": code, "fields": []}])


@dataclass
class _Locator:
    token: str
    rows: list[dict]
    position: int
    batch: int
    last_batch: list[dict] = field(default_factory=list)


class FakeSalesforce(FakeServer):
    """The org's data plus the HTTP server. Times come from `clock()` (aware UTC)."""

    def __init__(self, clock: Callable[[], datetime], *, client_id: str = "3MVG9fake",
                 client_secret: str = "fake-client-secret", refresh_token: str = "5Aep-fake-refresh",
                 daily_limit: int = 15000, lead_history: bool = True) -> None:
        super().__init__(clock)
        self.client_id, self.client_secret, self.refresh_token = client_id, client_secret, refresh_token
        self.daily_limit = daily_limit
        self.api_usage = 0
        self.lead_history_enabled = lead_history
        self.tables: dict[str, dict[str, dict]] = {name: {} for name in SCHEMA}
        for i, (label, closed, won) in enumerate(STAGES):
            self.tables["OpportunityStage"][f"01J{i:012d}"] = {
                "Id": f"01J{i:012d}", "MasterLabel": label, "ApiName": label, "IsClosed": closed,
                "IsWon": won, "IsActive": True, "SortOrder": i, "DefaultProbability": 10 * i}
        self.tokens: set[str] = set()
        self._token_seq = itertools.count(1)
        self.locators: dict[str, _Locator] = {}
        self.locators_die_on_refresh = False
        self.queries: list[str] = []
        self.records_served = 0
        self.server.route("POST", r"/services/oauth2/token", self._token)
        self.server.route("GET", rf"/services/data/{API}/(query|queryAll)", self._query)
        self.server.route("GET", rf"/services/data/{API}/query/(?P<loc>[\w-]+)", self._more)

    # -- data helpers (used by harnesses and tests) -----------------------------------------

    def new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):015d}"

    def insert(self, sobject: str, **fields: Any) -> dict:
        with self._lock:
            now = sf_time(self.clock())
            row = {"Id": self.new_id({"Lead": "00Q", "Opportunity": "006"}.get(sobject, "017")),
                   "CreatedDate": now, "SystemModstamp": now, "LastModifiedDate": now,
                   "IsDeleted": False, **fields}
            self.tables[sobject][row["Id"]] = row
            if sobject == "Lead" and self.lead_history_enabled and row.get("Status"):
                self._history("LeadHistory", LeadId=row["Id"], Field="Status", OldValue=None,
                              NewValue=row["Status"])
            if sobject == "Opportunity":
                self._history("OpportunityHistory", OpportunityId=row["Id"],
                              StageName=row["StageName"], Amount=row.get("Amount"))
            return row

    def _history(self, sobject: str, **fields: Any) -> None:
        now = sf_time(self.clock())
        hid = self.new_id("017")
        self.tables[sobject][hid] = {"Id": hid, "CreatedDate": now, "SystemModstamp": now,
                                     "IsDeleted": False, **fields}

    def modify(self, sobject: str, record_id: str, **fields: Any) -> dict:
        with self._lock:
            row = self.tables[sobject][record_id]
            now = sf_time(self.clock())
            if sobject == "Lead" and "Status" in fields and self.lead_history_enabled:
                self._history("LeadHistory", LeadId=record_id, Field="Status",
                              OldValue=row.get("Status"), NewValue=fields["Status"])
            if sobject == "Opportunity" and "StageName" in fields:
                self._history("OpportunityHistory", OpportunityId=record_id,
                              StageName=fields["StageName"], Amount=fields.get("Amount", row.get("Amount")))
            row.update(fields, SystemModstamp=now, LastModifiedDate=now)
            return row

    def delete(self, sobject: str, record_id: str, master: str | None = None) -> None:
        fields: dict[str, Any] = {"IsDeleted": True}
        if master:
            fields["MasterRecordId"] = master
        self.modify(sobject, record_id, **fields)

    def merge(self, survivor: str, absorbed: str) -> None:
        """Salesforce merge: the master is updated, the others are deleted with MasterRecordId."""
        self.modify("Lead", survivor)
        self.delete("Lead", absorbed, master=survivor)

    def convert(self, lead_id: str, stage: str = "Prospecting", amount: float | None = None) -> str:
        opp = self.insert("Opportunity", StageName=stage, Amount=amount, IsClosed=False, IsWon=False,
                          CloseDate=self.clock().date().isoformat())
        self.modify("Lead", lead_id, IsConverted=True, Status="Closed - Converted",
                    ConvertedDate=self.clock().date().isoformat(), ConvertedOpportunityId=opp["Id"])
        return str(opp["Id"])

    def expire_tokens(self) -> None:
        self.tokens.clear()

    # -- HTTP -------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Sforce-Limit-Info": f"api-usage={self.api_usage}/{self.daily_limit}"}

    def _server_error(self) -> Reply:
        return _error(503, "SERVER_UNAVAILABLE", "Server temporarily unavailable")

    def _token(self, req: Request) -> Reply:
        form = {k: v[0] for k, v in _form(req.body).items()}
        if form.get("client_id") != self.client_id or form.get("client_secret") != self.client_secret:
            return Reply(400, {"error": "invalid_client", "error_description": "invalid client credentials"})
        grant = form.get("grant_type")
        if grant == "refresh_token" and form.get("refresh_token") != self.refresh_token:
            return Reply(400, {"error": "invalid_grant", "error_description": "expired access/refresh token"})
        if grant not in ("refresh_token", "client_credentials"):
            return Reply(400, {"error": "unsupported_grant_type",
                               "error_description": "grant type not supported"})
        token = f"00Dfake!AQ{next(self._token_seq):06d}token"
        if self.locators_die_on_refresh:
            self.locators.clear()
        self.tokens.add(token)
        return Reply(200, {"access_token": token, "instance_url": self.base_url,
                           "id": f"{self.base_url}/id/00Dfake/005fake", "token_type": "Bearer",
                           "issued_at": str(int(self.clock().timestamp() * 1000)),
                           "signature": "fake-signature", "scope": "api refresh_token"})

    def _auth(self, req: Request) -> tuple[str | None, Reply | None]:
        auth = req.header("Authorization") or ""
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            return None, _error(401, "INVALID_SESSION_ID", "Session expired or invalid")
        with self._lock:
            if self.api_usage >= self.daily_limit:
                return None, Reply(403, [{"message": "TotalRequests Limit exceeded.",
                                          "errorCode": "REQUEST_LIMIT_EXCEEDED"}], self._headers())
            self.api_usage += 1
        return token, None

    def _admit(self, req: Request) -> tuple[str | None, Reply | None]:
        """An injected fault first, then the session check: (token, None) or (None, reply)."""
        if (fault := self._take_fault()) is not None:
            return None, fault
        return self._auth(req)

    def _query(self, req: Request) -> Reply:
        token, err = self._admit(req)
        if err is not None:
            return err
        soql = req.arg("q") or ""
        self.queries.append(soql)
        try:
            rows = self._run(soql, all_rows=req.path.endswith("queryAll"))
        except _SoqlError as exc:
            return _error(400, exc.code, exc.message)
        batch = 2000
        opts = req.header("Sforce-Query-Options") or ""
        if m := re.search(r"batchSize=(\d+)", opts):
            batch = max(200, min(2000, int(m.group(1))))
        loc = _Locator(token or "", rows, 0, batch)
        return self._serve(loc, f"01g{next(self._ids):015d}")

    def _more(self, req: Request) -> Reply:
        _, err = self._admit(req)
        if err is not None:
            return err
        loc_id = req.match.group("loc").rsplit("-", 1)[0] if req.match else ""
        loc = self.locators.get(loc_id)
        if loc is None:
            return _error(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
        return self._serve(loc, loc_id)

    def _serve(self, loc: _Locator, loc_id: str) -> Reply:
        with self._lock:
            if self.repeated_pages and loc.last_batch:
                self.repeated_pages -= 1
                chunk = loc.last_batch  # the server replays the previous batch
            else:
                chunk = loc.rows[loc.position : loc.position + loc.batch]
                loc.position += len(chunk)
                loc.last_batch = chunk
            done = loc.position >= len(loc.rows)
            body: dict[str, Any] = {"totalSize": len(loc.rows), "done": done, "records": chunk}
            if done:
                self.locators.pop(loc_id, None)
            else:
                self.locators[loc_id] = loc
                body["nextRecordsUrl"] = f"/services/data/{API}/query/{loc_id}-{loc.position}"
            self.records_served += len(chunk)
            return Reply(200, body, self._headers())

    # -- SOQL -------------------------------------------------------------------------------

    def _run(self, soql: str, *, all_rows: bool) -> list[dict]:
        m = _SELECT.match(soql.strip())
        if not m:
            raise _SoqlError("MALFORMED_QUERY", "unexpected token")
        obj = m.group("obj")
        if obj not in SCHEMA or (obj == "LeadHistory" and not self.lead_history_enabled):
            raise _SoqlError("INVALID_TYPE", f"sObject type '{obj}' is not supported.")
        fields = [f.strip() for f in m.group("fields").split(",")]
        for f in fields:
            if f not in SCHEMA[obj]:
                raise _SoqlError("INVALID_FIELD", f"No such column '{f}' on entity '{obj}'.")
        conds = [self._cond(obj, c) for c in re.split(r"\s+AND\s+", m.group("where") or "", flags=re.I) if c]
        with self._lock:
            rows = [r for r in self.tables[obj].values()
                    if (all_rows or not r.get("IsDeleted")) and all(c(r) for c in conds)]
        if m.group("order"):
            keys = [o.split()[0] for o in m.group("order").split(",")]
            rows.sort(key=lambda r: tuple(str(r.get(k) or "") for k in keys))
        if m.group("limit"):
            rows = rows[: int(m.group("limit"))]
        out = []
        for r in rows:
            rec = {"attributes": {"type": obj, "url": f"/services/data/{API}/sobjects/{obj}/{r['Id']}"}}
            rec.update({f: r.get(f) for f in fields})
            out.append(rec)
        return out

    def _cond(self, obj: str, text: str) -> Callable[[dict], bool]:
        m = _COND.match(text.strip())
        if not m:
            raise _SoqlError("MALFORMED_QUERY", f"unexpected condition {text!r}")
        name, op, value = m.group("f"), m.group("op").upper(), m.group("v").strip()
        if name not in SCHEMA[obj]:
            raise _SoqlError("INVALID_FIELD", f"No such column '{name}' on entity '{obj}'.")
        if op == "IN":
            values = set(re.findall(r"'([^']*)'", value))
            return lambda r: str(r.get(name)) in values
        if value.startswith("'"):
            literal = value.strip("'")
            return lambda r: str(r.get(name)) == literal
        if not _DT_LITERAL.match(value):
            # e.g. "+0000" turned into a space by bad URL encoding
            raise _SoqlError("MALFORMED_QUERY", f"invalid datetime literal {value!r}")
        bound = datetime.fromisoformat(value.replace("Z", "+00:00"))

        def compare(r: dict) -> bool:
            have = r.get(name)
            if not have:
                return False
            t = datetime.fromisoformat(have)
            return {">=": t >= bound, ">": t > bound, "<=": t <= bound, "<": t < bound,
                    "=": t == bound}[op]

        return compare


class _SoqlError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _form(body: bytes) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for part in body.decode().split("&"):
        if "=" in part:
            k, v = part.split("=", 1)
            out.setdefault(unquote(k.replace("+", " ")), []).append(unquote(v.replace("+", " ")))
    return out
