"""Screen a connector's page before the store sees it: poison values and identity in clear.

CRM fields and CSV exports are written by other people, and one value the database refuses (a
signalling-NaN or 10^15 amount, a NUL byte or a lone surrogate in text, a naive or out-of-range
time) used to fail the page's transaction, and with it every sync after. Here each value is
checked against what the store can hold and what is plausible; a bad field costs only that
field (the record is kept without it), a bad key field (id, time) costs only that record, and
each is reported with its reason (`rejected_record`).

Identity-like content in attributes leadloop does not know (a `Work Email`, `Mobile Number` or
`Contact Name` column, an e-mail address inside a note) is never stored in clear: an e-mail or
phone becomes the lead's hashed identity when it has none (hashed at ingestion like the mapped
ones), anything else identity-like is dropped. `PiiActions` tells the sync summary which.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from leadloop.crm.base import ATTRIBUTION_FIELDS, EventIn, LeadIn, Page, StageIn
from leadloop.identity import PiiKind, identity_kind

EARLIEST = datetime(1990, 1, 1, tzinfo=UTC)  # no CRM record of a lead is older
FUTURE_SLACK = timedelta(days=1)  # clocks and time zones: a day ahead is still "now"
MAX_AMOUNT = Decimal(10) ** 14  # the store's money columns are NUMERIC(18, 4)
MAX_TEXT = 100_000  # characters in one stored text field
_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")  # NUL (PostgreSQL refuses it), lone surrogates
_TEXT_FIELDS = ("email", "phone", *ATTRIBUTION_FIELDS, "current_stage")


@dataclass(slots=True)
class Problem:
    """One field dropped or one record refused: stored as a `rejected_record`."""

    ref: str
    reason: str
    kind: str  # object type suffix: "" (the record itself), ".field", ".stage", ".event"
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class PiiActions:
    """Column -> what was done with identity-like content found in it."""

    by_column: dict[str, set[str]] = field(default_factory=dict)

    def add(self, column: str, action: str) -> None:
        self.by_column.setdefault(column, set()).add(action)

    def merge(self, other: PiiActions) -> None:
        for column, actions in other.by_column.items():
            self.by_column.setdefault(column, set()).update(actions)

    def summary(self) -> str:
        """`Work Email: hashed as the lead's e-mail; Contact Name: dropped (person name)`."""
        return "; ".join(f"{c}: {', '.join(sorted(a))}" for c, a in sorted(self.by_column.items()))


def text_problem(value: Any) -> str | None:
    """Why a value cannot be stored as text, or None."""
    if type(value) is str and value.isascii() and "\x00" not in value and len(value) <= MAX_TEXT:
        return None  # the common case, decided without a regular expression
    if not isinstance(value, str):
        return f"is a {type(value).__name__}, not text"
    if "\x00" in value:
        return "contains a NUL byte"
    if _BAD_TEXT.search(value):
        return "contains bytes that are not valid text (a lone surrogate)"
    if len(value) > MAX_TEXT:
        return f"is longer than {MAX_TEXT} characters"
    return None


def clean_text(value: Any) -> Any:
    """`value` (JSON-like) with unstorable text made storable, for reject payloads only."""
    if isinstance(value, str):
        return _BAD_TEXT.sub("\ufffd", value[:1000])
    if isinstance(value, dict):
        return {clean_text(str(k)): clean_text(v) for k, v in list(value.items())[:200]}
    if isinstance(value, list | tuple):
        return [clean_text(v) for v in value[:200]]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    return clean_text(str(value))


def public_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """A rejected record as it may be kept: storable, and without identity in clear (the value
    of a `Work Email`, `Mobile Number` or `Contact Name` field, at any depth, is removed)."""
    out: dict[str, Any] = {}
    for key, value in payload.items():
        if isinstance(value, dict):
            out[key] = public_payload(value)
        else:
            out[key] = value if identity_kind(str(key), value) is None else "<removed>"
    return clean_text(out)


def time_problem(value: Any, now: datetime) -> str | None:
    if not isinstance(value, datetime):
        return f"is a {type(value).__name__}, not a time"
    if value.tzinfo is None:
        return "has no time zone"
    if value < EARLIEST:
        return f"{value:%Y-%m-%d} is before {EARLIEST:%Y}"
    if value > now + FUTURE_SLACK:
        return f"{value:%Y-%m-%d} is in the future"
    return None


def checked_amount(value: Any) -> tuple[Decimal | None, str | None]:
    """(amount, problem): an amount the store can hold, or None and why not."""
    if value is None:
        return None, None
    if isinstance(value, bool):
        return None, "is not a number"
    try:
        amount = value if isinstance(value, Decimal) else Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None, "is not a number"
    if not amount.is_finite():  # NaN, sNaN, ±Infinity
        return None, f"{value} is not a finite number"
    if abs(amount) >= MAX_AMOUNT:
        return None, "is 10^14 or more, beyond what the store holds"
    return amount, None


def _json_value(value: Any, depth: int = 0) -> tuple[Any, str | None]:
    """An attribute value the store's JSON can hold, or why not."""
    if value is None or isinstance(value, bool | int):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
            return None, "is an integer too large to store"
        return value, None
    if isinstance(value, float):
        return (value, None) if math.isfinite(value) else (None, f"{value} is not a finite number")
    if isinstance(value, Decimal):
        number, problem = checked_amount(value)
        return (None if number is None else float(number)), problem
    if isinstance(value, str):
        return value, text_problem(value)
    if depth < 3 and isinstance(value, list | tuple):
        items = [_json_value(v, depth + 1) for v in value]
        bad = next((p for _, p in items if p), None)
        return ([v for v, _ in items], None) if bad is None else (None, bad)
    if depth < 3 and isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if text_problem(k):
                return None, "has a key that is not text"
            out[k], bad = _json_value(v, depth + 1)
            if bad:
                return None, bad
        return out, None
    return None, f"is a {type(value).__name__}, which cannot be stored"


def screen_page(page: Page, now: datetime) -> tuple[Page, list[Problem], PiiActions]:
    """The page with every value the store can hold; the problems found; PII actions."""
    problems: list[Problem] = []
    pii = PiiActions()
    leads = [lead for lead in (_screen_lead(x, now, problems, pii) for x in page.leads) if lead]
    stages = [s for s in (_screen_stage(x, now, problems) for x in page.stages) if s]
    events = [e for e in (_screen_event(x, now, problems) for x in page.events) if e]
    deleted = [c for c in page.deleted_crm_ids if isinstance(c, str) and not text_problem(c)]
    deleted_deals = [c for c in page.deleted_deal_ids if isinstance(c, str) and not text_problem(c)]
    rejects = page.rejects
    for r in rejects:  # a connector's reject quotes the record: keep it storable
        r.record_ref = clean_text(str(r.record_ref))
        r.reason = clean_text(str(r.reason))
        r.payload = public_payload(r.payload) if isinstance(r.payload, dict) else {}
    return (replace(page, leads=leads, stages=stages, events=events, rejects=rejects,
                    deleted_crm_ids=deleted, deleted_deal_ids=deleted_deals), problems, pii)


def _ref(value: Any) -> str:
    return clean_text(str(value))[:200]


def _screen_lead(lead: LeadIn, now: datetime, problems: list[Problem], pii: PiiActions
                 ) -> LeadIn | None:
    if isinstance(lead.crm_id, int) and not isinstance(lead.crm_id, bool):
        lead.crm_id = str(lead.crm_id)
    if (why := text_problem(lead.crm_id)) or not lead.crm_id.strip():
        problems.append(Problem(_ref(lead.crm_id), f"lead id {why or 'is empty'}; record "
                                "refused", "", _lead_payload(lead)))
        return None
    if why := time_problem(lead.created_at, now):
        problems.append(Problem(lead.crm_id, f"lead {lead.crm_id}: created time {why}; record "
                                "refused", "", _lead_payload(lead)))
        return None
    dropped: list[str] = []
    if lead.updated_at is not None and (why := time_problem(lead.updated_at, now + FUTURE_SLACK)):
        lead.updated_at = None
        dropped.append(f"updated time {why}")
    for name in _TEXT_FIELDS:
        value = getattr(lead, name)
        if value is None or (type(value) is str and value.isascii() and "\x00" not in value
                             and len(value) <= MAX_TEXT):
            continue
        if isinstance(value, int | float) and not isinstance(value, bool) and name != "email":
            value = str(value)
            setattr(lead, name, value)
        if why := text_problem(value):
            setattr(lead, name, None)
            dropped.append(f"{name} {why}")
    for name in ("consent_ad_user_data", "consent_ad_personalization"):
        if getattr(lead, name) is not None and not isinstance(getattr(lead, name), bool):
            setattr(lead, name, None)
            dropped.append(f"{name} is not true/false")
    if isinstance(lead.object_type, str) and text_problem(lead.object_type):
        lead.object_type = "contact"
    if not isinstance(lead.merged_crm_ids, list):
        lead.merged_crm_ids = []
    lead.merged_crm_ids = [str(m) for m in lead.merged_crm_ids
                           if isinstance(m, str | int) and not text_problem(str(m))]
    lead.attributes = _screen_attributes(lead, dropped, pii)
    if dropped:
        problems.append(Problem(lead.crm_id, f"lead {lead.crm_id}: " + "; ".join(dropped)
                                + "; lead kept without those fields", ".field"))
    return lead


def _screen_attributes(lead: LeadIn, dropped: list[str], pii: PiiActions) -> dict[str, Any]:
    if not isinstance(lead.attributes, dict):
        dropped.append("attributes are not a mapping")
        return {}
    out: dict[str, Any] = {}
    for key, raw in lead.attributes.items():
        if text_problem(key):
            dropped.append("an attribute name that is not text")
            continue
        value, why = _json_value(raw)
        if why:
            dropped.append(f"attribute {key!r} {why}")
            continue
        kind = identity_kind(key, value)
        if kind is None:
            out[key] = value
            continue
        pii.add(key, _take_identity(lead, kind, value))
    return out


def _take_identity(lead: LeadIn, kind: PiiKind, value: Any) -> str:
    """Use an e-mail or phone found in an attribute as the lead's (hashed) identity when the
    lead has none; otherwise it is dropped. Returns what was done, for the summary."""
    text = value.strip() if isinstance(value, str) else ""
    if kind == "email" and text and not lead.email:
        lead.email = text
        return "hashed as the lead's e-mail"
    if kind == "phone" and text and not lead.phone:
        lead.phone = text
        return "hashed as the lead's phone"
    return {"email": "dropped (an e-mail address)", "phone": "dropped (a phone number)",
            "name": "dropped (a person's name)", "contains_email": "dropped (held an e-mail "
            "address)"}[kind]


def _screen_stage(stage: StageIn, now: datetime, problems: list[Problem]) -> StageIn | None:
    ref = _ref(stage.deal_id or stage.crm_id)
    for name in ("crm_id", "field", "value", "deal_id"):
        value = getattr(stage, name)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(stage, name, value := str(value))
        if why := text_problem(value):
            problems.append(Problem(ref, f"stage record: {name} {why}; record refused", ".stage"))
            return None
    if why := time_problem(stage.entered_at, now):
        problems.append(Problem(ref, f"stage {stage.field}={stage.value} of {stage.crm_id}: "
                                f"entered time {why}; record refused", ".stage",
                                {"lead": stage.crm_id, "field": stage.field, "value": stage.value}))
        return None
    dropped = []
    amount, why = checked_amount(stage.amount)
    if why:
        dropped.append(f"amount {why}")
    stage.amount = amount
    if stage.currency is not None and (why := text_problem(stage.currency)):
        stage.currency = None
        dropped.append(f"currency {why}")
    if not isinstance(stage.is_lost, bool):
        stage.is_lost = bool(stage.is_lost) if isinstance(stage.is_lost, int) else False
    if dropped:
        problems.append(Problem(ref, f"stage {stage.field}={stage.value} of {stage.crm_id}: "
                                + "; ".join(dropped) + "; stage kept without it", ".field"))
    return stage


def _screen_event(event: EventIn, now: datetime, problems: list[Problem]) -> EventIn | None:
    for name in ("crm_id", "name"):
        value = getattr(event, name)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(event, name, value := str(value))
        if why := text_problem(value):
            problems.append(Problem(_ref(event.crm_id), f"event record: {name} {why}; record "
                                    "refused", ".event"))
            return None
    if why := time_problem(event.occurred_at, now):
        problems.append(Problem(event.crm_id, f"event {event.name} of {event.crm_id}: time "
                                f"{why}; record refused", ".event", {"event": event.name}))
        return None
    if event.value is not None:
        number = event.value if isinstance(event.value, int | float) and not isinstance(
            event.value, bool) else None
        if number is None or not math.isfinite(number) or abs(number) >= 1e14:
            problems.append(Problem(event.crm_id, f"event {event.name} of {event.crm_id}: value "
                                    "is not a finite number below 10^14; event kept without it",
                                    ".field"))
            event.value = None
    return event


def _lead_payload(lead: LeadIn) -> dict[str, Any]:
    """What a refused lead record is kept as: its non-identity fields."""
    payload: dict[str, Any] = {"crm_id": lead.crm_id, "created_at": str(lead.created_at)}
    payload.update({n: getattr(lead, n) for n in ATTRIBUTION_FIELDS if getattr(lead, n)})
    if isinstance(lead.attributes, dict):
        payload["attributes"] = {k: v for k, v in lead.attributes.items()
                                 if isinstance(k, str) and identity_kind(k, v) is None}
    return clean_text(payload)


def duplicate_ids(leads: Iterable[LeadIn], seen: set[str]) -> list[str]:
    """CRM ids of `leads` already in `seen` (which learns the rest)."""
    repeated = []
    for lead in leads:
        if lead.crm_id in seen:
            repeated.append(lead.crm_id)
        else:
            seen.add(lead.crm_id)
    return repeated
