"""A stateful fake Pipedrive API v2 on 127.0.0.1: persons, deals, archived deals, stages and
pipelines with cursor paging, `updated_since`, the `x-api-token` header, a 2-second burst
window with `x-ratelimit-*` headers, a daily token budget (spec `x-token-cost`), and
injectable faults. Shapes follow shared/specs/crm_apis.md §3."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from leadloop.sandbox.server import Reply, Request
from tests.fakes.base import FakeServer

TOKEN_COST = {"/persons": 10, "/deals": 10, "/deals/archived": 10, "/stages": 5, "/pipelines": 5}
STAGES = [(1, "Lead In", 1), (2, "Contact Made", 2), (3, "Proposal Made", 3), (4, "Negotiations", 4)]


def pd_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fail(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, {"success": False, "error": message, "error_info": "See the docs",
                          "data": None, "additional_data": None}, headers or {})


class FakePipedrive(FakeServer):
    def __init__(self, clock: Callable[[], datetime], *, token: str = "pd-fake-api-token-123",
                 burst: int = 40, daily_budget: int = 30_000) -> None:
        super().__init__(clock)
        self.token = token
        self.burst = burst
        self.daily_budget = daily_budget
        self.tokens_used = 0
        self._window: list[float] = []
        self.persons: dict[int, dict] = {}
        self.deals: dict[int, dict] = {}
        self.history: dict[int, list[str]] = {}  # deal id -> stage names entered (truth)
        self.stages = [{"id": i, "order_nr": o, "name": n, "pipeline_id": 1, "deal_probability": 10 * o,
                        "is_deleted": False, "add_time": "2025-01-01T00:00:00Z",
                        "update_time": "2025-01-01T00:00:00Z"} for i, n, o in STAGES]
        self.rate_limited = 0
        self.throttled = 0
        for path in TOKEN_COST:
            self.server.route("GET", f"/api/v2{path}", self._handler(path))

    # -- data -------------------------------------------------------------------------------

    def add_person(self, **fields: Any) -> dict:
        with self._lock:
            now = pd_time(self.clock())
            pid = next(self._ids)
            row = {"id": pid, "name": f"Person {pid}", "first_name": "Person", "last_name": str(pid),
                   "owner_id": 7, "org_id": None, "add_time": now, "update_time": now,
                   "emails": [], "phones": [], "is_deleted": False, "label_ids": [],
                   "custom_fields": {}, **fields}
            self.persons[pid] = row
            return row

    def add_deal(self, person_id: int, value: float = 1000.0) -> dict:
        with self._lock:
            now = pd_time(self.clock())
            did = next(self._ids)
            row = {"id": did, "title": f"Deal {did}", "value": value, "currency": "EUR", "stage_id": 1,
                   "pipeline_id": 1, "status": "open", "probability": None, "add_time": now,
                   "update_time": now, "stage_change_time": None, "won_time": None, "lost_time": None,
                   "close_time": None, "expected_close_date": None, "person_id": person_id,
                   "org_id": None, "owner_id": 7, "is_deleted": False, "is_archived": False,
                   "lost_reason": None, "origin": "API", "channel": None, "label_ids": [],
                   "custom_fields": {}}
            self.deals[did] = row
            self.history[did] = [STAGES[0][1]]
            return row

    def touch(self, table: dict[int, dict], rid: int, **fields: Any) -> None:
        with self._lock:
            table[rid].update(fields, update_time=pd_time(self.clock()))

    def advance(self, did: int) -> str:
        deal = self.deals[did]
        now = pd_time(self.clock())
        if deal["stage_id"] < len(STAGES):
            stage_id = deal["stage_id"] + 1
            self.touch(self.deals, did, stage_id=stage_id, stage_change_time=now)
            self.history[did].append(STAGES[stage_id - 1][1])
            return STAGES[stage_id - 1][1]
        self.touch(self.deals, did, status="won", won_time=now, close_time=now)
        self.history[did].append("won")
        return "won"

    # -- HTTP -------------------------------------------------------------------------------

    def _server_error(self) -> Reply:
        return _fail(502, "Bad gateway")

    def _limits(self) -> dict[str, str]:
        now = time.monotonic()
        self._window = [t for t in self._window if now - t < 2.0]
        return {"x-ratelimit-limit": str(self.burst),
                "x-ratelimit-remaining": str(max(0, self.burst - len(self._window))),
                "x-ratelimit-reset": "2",
                "x-daily-ratelimit-token-remaining": str(max(0, self.daily_budget - self.tokens_used))}

    def _handler(self, path: str) -> Callable[[Request], Reply]:
        def handle(req: Request) -> Reply:
            with self._lock:
                if (fault := self._take_fault()) is not None:
                    return fault
                if req.header("x-api-token") != self.token:
                    return _fail(401, "Unauthorized")
                headers = self._limits()
                if self.tokens_used + TOKEN_COST[path] > self.daily_budget:
                    midnight = 86400 - int(self.clock().timestamp()) % 86400
                    return _fail(429, "Daily token budget exceeded",
                                 {**headers, "Retry-After": str(midnight),
                                  "x-daily-ratelimit-token-remaining": "0"})
                if self.rate_limited or len(self._window) >= self.burst:
                    self.rate_limited = max(0, self.rate_limited - 1)
                    self.throttled += 1
                    return _fail(429, "Request over limit", {**headers, "Retry-After": "0.05"})
                self._window.append(time.monotonic())
                self.tokens_used += TOKEN_COST[path]
                body = self._page(path, req)
                return Reply(200, body, self._limits())

        return handle

    def _page(self, path: str, req: Request) -> dict[str, Any]:
        if path in ("/stages", "/pipelines"):
            data = self.stages if path == "/stages" else [
                {"id": 1, "name": "Sales", "order_nr": 1, "is_selected": True, "is_deleted": False,
                 "is_deal_probability_enabled": False, "add_time": "2025-01-01T00:00:00Z",
                 "update_time": "2025-01-01T00:00:00Z"}]
            return {"success": True, "data": data, "additional_data": {"next_cursor": None}}
        if path == "/persons":
            rows = [r for r in self.persons.values() if not r["is_deleted"]]
        elif path == "/deals":
            statuses = set((req.arg("status") or "open,won,lost").split(","))
            rows = [r for r in self.deals.values() if not r["is_archived"] and r["status"] in statuses]
        else:
            rows = [r for r in self.deals.values() if r["is_archived"]]
        since = req.arg("updated_since")
        if since:
            rows = [r for r in rows if r["update_time"] >= since]
        rows.sort(key=lambda r: (r["update_time"], r["id"]))
        limit = min(int(req.arg("limit") or 100), 500)
        start = 0
        if cursor := req.arg("cursor"):
            after = json.loads(base64.urlsafe_b64decode(cursor.encode()))
            start = next((i for i, r in enumerate(rows)
                          if (r["update_time"], r["id"]) > (after[0], after[1])), len(rows))
            if self.repeated_pages:
                self.repeated_pages -= 1
                start = max(0, start - limit)  # the server replays the previous page
        chunk = rows[start : start + limit]
        nxt = None
        if start + limit < len(rows) and chunk:
            last = chunk[-1]
            nxt = base64.urlsafe_b64encode(json.dumps([last["update_time"], last["id"]]).encode()).decode()
        return {"success": True, "data": [dict(r) for r in chunk], "additional_data": {"next_cursor": nxt}}
