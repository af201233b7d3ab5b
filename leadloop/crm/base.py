"""The connector contract: what a CRM connector yields, and helpers for writing one.

A connector (`CrmSource`) only reads the CRM and turns records into `LeadIn`, `StageIn` and
`EventIn` values grouped in `Page`s; it never touches the database. The engine that writes the
pages to the store, with the stream's cursor, is `leadloop.sync`; the shared HTTP layer for REST
CRMs is `leadloop.crm.rest`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

from leadloop.errors import RecordRejected

# Ad-platform click and lead ids: they identify a person's click (so `forget` clears them).
CLICK_ID_FIELDS = ("gclid", "gbraid", "wbraid", "fbclid", "fbc", "msclkid", "li_fat_id",
                   "meta_lead_id")
ATTRIBUTION_FIELDS = (
    *CLICK_ID_FIELDS,
    "utm_source",
    "utm_medium",
    "utm_campaign",
    "landing_page",
    "country",
)


@dataclass(frozen=True, order=True, slots=True)
class Cursor:
    """A position in a stream: modified time, then id as the tie-break."""

    updated_at: datetime
    id: str = ""


@dataclass(slots=True)
class LeadIn:
    """A lead as a connector reads it. `email`/`phone` are clear text here, in memory only:
    the engine hashes them and drops the clear values before anything is written."""

    crm_id: str
    created_at: datetime
    updated_at: datetime | None = None
    object_type: str = "contact"
    email: str | None = None
    phone: str | None = None
    gclid: str | None = None
    gbraid: str | None = None
    wbraid: str | None = None
    fbclid: str | None = None
    fbc: str | None = None
    msclkid: str | None = None
    li_fat_id: str | None = None
    meta_lead_id: str | None = None
    utm_source: str | None = None
    utm_medium: str | None = None
    utm_campaign: str | None = None
    landing_page: str | None = None
    country: str | None = None
    consent_ad_user_data: bool | None = None
    consent_ad_personalization: bool | None = None
    current_stage: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    merged_crm_ids: list[str] = field(default_factory=list)  # ids absorbed into this lead
    # `created_at` is a stand-in (e.g. a CSV export's file time), not the CRM's own: only an
    # estimate of when we first learned of the lead, so once stored it does not move.
    time_estimated: bool = False


@dataclass(slots=True)
class StageIn:
    """The time lead `crm_id` (or its deal `deal_id`) entered CRM value `value` of `field`."""

    crm_id: str
    field: str
    value: str
    entered_at: datetime
    deal_id: str = ""
    amount: Decimal | None = None
    currency: str | None = None
    is_lost: bool = False
    time_estimated: bool = False  # `entered_at` is a stand-in: a stored row keeps its own


@dataclass(slots=True)
class EventIn:
    crm_id: str
    name: str
    occurred_at: datetime
    value: float | None = None
    # `occurred_at` is a stand-in: the event is skipped when the lead already has one so named
    time_estimated: bool = False


@dataclass(slots=True)
class Page:
    """What one fetch step yields. `cursor` is the stream position after this page (None when
    the stream is not incremental, e.g. a full re-read of pipelines or a CSV file)."""

    leads: list[LeadIn] = field(default_factory=list)
    stages: list[StageIn] = field(default_factory=list)
    events: list[EventIn] = field(default_factory=list)
    rejects: list[RecordRejected] = field(default_factory=list)
    deleted_crm_ids: list[str] = field(default_factory=list)
    deleted_deal_ids: list[str] = field(default_factory=list)  # deals deleted/archived in the CRM
    cursor: Cursor | None = None
    total: int | None = None  # the source's own count, when it tells one (for progress)

    @property
    def size(self) -> int:
        return len(self.leads) + len(self.stages) + len(self.events) + len(self.rejects)


class StoredIds(Protocol):
    """Which of `crm_ids` the store holds as leads of this source. The engine gives it to a
    `needs_stored_ids` stream's `fetch`; it may be called from the thread that reads the CRM
    (the engine answers it with its own connection: the connector never touches the store)."""

    def __call__(self, crm_ids: Collection[str]) -> AbstractSet[str]: ...


def no_stored_ids(crm_ids: Collection[str]) -> AbstractSet[str]:
    """The `StoredIds` of a stream that does not ask (`needs_stored_ids` does not list it)."""
    return frozenset()


class CrmSource(Protocol):
    """A CRM connector. Implementations live in `leadloop/crm/<kind>.py`."""

    name: str  # the source name stored on each lead
    # Streams whose records refer to leads an earlier sync may have stored (HubSpot deals name
    # contacts): for these the engine passes `fetch` a `StoredIds` lookup of the stored leads.
    needs_stored_ids: Collection[str]

    def streams(self) -> Sequence[str]:
        """Stream names in the order they must be synced (leads before what refers to them)."""
        ...

    def fetch(self, stream: str, since: Cursor | None, *, started_at: datetime,
              stored_ids: StoredIds = no_stored_ids) -> Iterator[Page]:
        """Yield pages of records modified at or after `since` (None: backfill everything).
        `stored_ids`: which CRM ids the store holds as this source's leads, for
        `needs_stored_ids` streams (none for the others)."""
        ...


# What converting one malformed CRM record raises (a wrong type, a missing key, a number or
# date out of range): connectors catch these per record and keep the record as a reject.
MALFORMED = (RecordRejected, KeyError, IndexError, TypeError, ValueError, AttributeError,
             ArithmeticError, OSError)


def as_reject(exc: Exception, ref: Any) -> RecordRejected:
    """`exc`, raised converting the record `ref`, as the reject that keeps it."""
    if isinstance(exc, RecordRejected):
        return exc
    return RecordRejected(str(ref)[:200], f"malformed record: {type(exc).__name__}: "
                          f"{str(exc)[:200]}")


def record_id(raw: Any, key: str = "id") -> str:
    """A raw record's id for a message, whatever its shape."""
    return str(raw.get(key, "?")) if isinstance(raw, dict) else "?"


def record_key(raw: dict[str, Any], key: str) -> str | None:
    """A raw record's id as text, or None when it is missing or not an id (a list, a bool,
    null): `str(None)` would file every such record under one lead "None"."""
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return str(value).strip() or None


def parse_decimal(value: Any) -> Decimal | None:
    """A CRM amount (number or string) as Decimal; None when empty or not a number."""
    if value in (None, ""):
        return None
    try:
        return Decimal(str(value))
    except (InvalidOperation, ValueError, TypeError):
        return None
