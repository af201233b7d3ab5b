"""The harness interface every CRM connector implements for the contract suite.

`tests/test_crm_contract.py` runs one suite over every harness in `HARNESSES`: first sync,
incremental sync (changes only), deletes, merges, stage history, rate limits and faults, and
asserts record counts (nothing lost, nothing doubled). A harness owns a fake CRM (a real HTTP
server on 127.0.0.1, or a file for CSV) and a `FakeClock` shared by the fake and the
`Context`, so "modified since" and the sync's look-back are deterministic.

To add a connector: write `tests/crm_harnesses/<kind>.py` with a class that subclasses
`Harness`, named `HARNESS` at the end of the module.

Conventions every harness follows:

- Lead ids handed out by `seed()` are the CRM's own ids (what `Lead.crm_id` will hold).
- Every mutating call (`seed`, `update`, `delete`, `merge`, `advance_stage`) first moves the
  clock forward by `STEP` so that its records are modified strictly after the previous sync.
- `expected_leads()` is the ground truth the store must match after a sync: CRM id ->
  expected `LeadStatus` value ("active", "deleted", "merged").
- `expected_stages()` is the set of (crm_id, field, value) stage facts the store must hold.
- `inject_faults(faults)` arms the fake: the next requests misbehave as described, then the
  fake answers normally again; `inject_faults(Faults())` restores an exhausted daily quota.
  Harnesses that cannot fake a fault kind say so in `supports`.
"""

from __future__ import annotations

import abc
import pkgutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import import_module
from typing import Any, ClassVar

from sqlalchemy.engine import Engine

from leadloop.context import Context

STEP = timedelta(hours=1)
EPOCH = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


class FakeClock:
    """A settable UTC clock shared by a fake server and the Context (`ctx.now`)."""

    def __init__(self, start: datetime = EPOCH) -> None:
        self._now = start

    def now(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta = STEP) -> datetime:
        self._now += delta
        return self._now


@dataclass(frozen=True)
class Faults:
    """Misbehaviour for the fake to serve on its next requests (each counter is used up)."""

    server_errors: int = 0  # answer 500/503 this many times
    dropped_connections: int = 0  # close the socket without answering
    rate_limited: int = 0  # answer 429 with a short Retry-After
    repeated_pages: int = 0  # serve an already-served page again (a replayed cursor)
    daily_quota_exhausted: bool = False  # every request fails: the daily budget is gone


class Harness(abc.ABC):
    """One fake CRM plus the settings that point a connector at it."""

    #: config `crm.kind` of the connector under test
    kind: ClassVar[str]
    #: fault kinds / behaviours this fake can produce: subset of
    #: {"incremental", "delete", "merge", "stage_history", "server_errors",
    #:  "dropped_connections", "rate_limited", "repeated_pages", "daily_quota"}
    supports: ClassVar[frozenset[str]]

    def __init__(self) -> None:
        self.clock = FakeClock()

    # -- lifecycle --------------------------------------------------------------------------

    @abc.abstractmethod
    def start(self) -> None:
        """Start the fake (bind its server to 127.0.0.1 on an ephemeral port)."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop the fake and release its port or files."""

    @abc.abstractmethod
    def settings_sections(self) -> dict[str, Any]:
        """Config sections (at least `crm` and `stages`) that point the connector at the fake.
        Secrets go into the environment via `env()`."""

    def env(self) -> dict[str, str]:
        """Environment variables (secrets) the connector reads; set by the suite."""
        return {}

    def make_context(self, engine: Engine, make_settings: Any) -> Context:
        """A Context on `engine` whose clock is the harness clock. `make_settings` is the
        conftest fixture (keyword sections -> Settings)."""
        settings = make_settings(**self.settings_sections())
        return Context(settings=settings, engine=engine, now=self.clock.now,
                       http_factory=self.http_factory)

    def http_factory(self, **kwargs: Any) -> Any:
        """Sessions with fast backoff, so fault tests run in milliseconds."""
        from leadloop.http import make_session

        kwargs.setdefault("backoff_factor", 0.0)
        kwargs.setdefault("timeout", (2.0, 5.0))
        return make_session(**kwargs)

    # -- the CRM's data ---------------------------------------------------------------------

    @abc.abstractmethod
    def seed(self, n: int) -> list[str]:
        """Create `n` leads (each with at least one stage fact); return their CRM ids."""

    @abc.abstractmethod
    def update(self, n: int) -> list[str]:
        """Modify `n` live leads (a non-identity field), taking them in rotation so that
        consecutive calls touch different leads; return their ids."""

    @abc.abstractmethod
    def delete(self, k: int) -> list[str]:
        """Delete or archive `k` live leads the CRM way; return their ids."""

    def merge(self, survivor: str, absorbed: str) -> None:
        """Merge `absorbed` into `survivor` the CRM way (only if "merge" in supports)."""
        raise NotImplementedError(f"{self.kind} harness does not fake merges")

    @abc.abstractmethod
    def advance_stage(self, crm_id: str) -> tuple[str, str]:
        """Move the lead (or its deal) one stage further; return the (field, value) entered."""

    @abc.abstractmethod
    def expected_leads(self) -> dict[str, str]:
        """CRM id -> expected lead status ("active" | "deleted" | "merged")."""

    @abc.abstractmethod
    def expected_stages(self) -> set[tuple[str, str, str]]:
        """(crm_id, field, value) stage facts of every lead that is not deleted."""

    # -- faults and observations ------------------------------------------------------------

    @abc.abstractmethod
    def inject_faults(self, faults: Faults) -> None:
        """Arm the fake with `faults` for its next requests; `Faults()` restores the quota."""

    def requests_served(self) -> int:
        """How many requests the fake answered (for "changes only" and rate-limit checks)."""
        return 0

    def records_served(self) -> int:
        """How many lead records the fake returned since the last call (then resets)."""
        return 0


# One harness module per CRM kind (`tests/crm_harnesses/<kind>.py`, its class named `HARNESS`),
# imported lazily so one fake's imports never break another's tests.
HARNESSES: tuple[str, ...] = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)))


def load_harness(kind: str) -> Harness:
    harness: Harness = import_module(f"{__name__}.{kind}").HARNESS()
    return harness
