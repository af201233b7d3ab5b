"""The store's tables (SQLModel). Times are timezone-aware UTC; money is Decimal.

No clear email or phone is ever stored: `Lead` keeps only normalised SHA-256 hashes, one per
normalisation rule the platforms use (Google hashes E.164 with the `+` and folds Gmail dots/plus
tags; Meta hashes digits only and plain lower-cased email).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Index, Numeric, Table, UniqueConstraint, text
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def table_of(model: type[SQLModel]) -> Table:
    """The Core table of a table model, for Core statements (columns as `.c.name`)."""
    table = model.__table__  # type: ignore[attr-defined]  # set by SQLModel, not declared to mypy
    assert isinstance(table, Table), f"{model.__name__} is not a table model"
    return table


class UTCDateTime(TypeDecorator[datetime]):
    """Stores aware datetimes as UTC and always returns them aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} reached the store; times must be UTC-aware")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _ts(nullable: bool = True, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=nullable, index=index))


def _ts_required(index: bool = False) -> Any:
    return Field(sa_column=Column(UTCDateTime(), nullable=False, index=index))


def _money() -> Any:
    return Field(default=None, sa_column=Column(Numeric(18, 4), nullable=True))


def _json() -> Any:
    return Field(default_factory=dict, sa_column=Column(JSON, nullable=False, default=dict))


def _ts_now(index: bool = False) -> Any:
    """Set to now when omitted, also by bulk (Core) inserts that skip the model defaults."""
    return Field(
        default_factory=utcnow,
        sa_column=Column(UTCDateTime(), nullable=False, default=utcnow, index=index),
    )


class LeadStatus(enum.StrEnum):
    active = "active"
    deleted = "deleted"  # archived/deleted in the CRM
    merged = "merged"  # absorbed into another lead (`merged_into_id`)
    erased = "erased"  # GDPR erasure: identity and events removed


class Lead(SQLModel, table=True):
    __tablename__ = "lead"
    __table_args__ = (
        UniqueConstraint("source", "crm_id", name="uq_lead_source_crm_id"),
        # Every synced page asks which of its records were erased: a partial index holds only
        # those few, so the answer costs no probe of the whole key.
        Index("ix_lead_erased", "source", "crm_id", postgresql_where=text("status = 'erased'"),
              sqlite_where=text("status = 'erased'")),
    )

    id: int | None = Field(default=None, primary_key=True)
    # No index of its own: lookups by source use the unique (source, crm_id) index. One on
    # source alone misled PostgreSQL before a new store had statistics (see store.make_engine).
    source: str
    crm_id: str
    object_type: str = "contact"
    created_at: datetime = _ts_required(index=True)
    crm_updated_at: datetime | None = _ts()
    status: LeadStatus = LeadStatus.active
    merged_into_id: int | None = Field(default=None, foreign_key="lead.id")
    # identity: hashes only (see module docstring)
    email_sha256: str | None = None  # trim + lowercase (Meta, LinkedIn, Microsoft)
    email_google_sha256: str | None = None  # + Gmail dot/plus folding (Google)
    phone_e164_sha256: str | None = None  # "+16505551212" (Google, Microsoft)
    phone_digits_sha256: str | None = None  # "16505551212" (Meta)
    # attribution
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
    current_stage: str | None = None  # raw CRM value of the lead's stage property
    attributes: dict[str, Any] = _json()  # other non-PII CRM fields, for features and reports
    ingested_at: datetime = _ts_now()
    updated_at: datetime = _ts_now(index=True)


class LeadEvent(SQLModel, table=True):
    """A micro-conversion or other activity of a lead."""

    __tablename__ = "lead_event"
    __table_args__ = (
        UniqueConstraint("lead_id", "name", "occurred_at", name="uq_lead_event"),
    )

    id: int | None = Field(default=None, primary_key=True)
    lead_id: int = Field(foreign_key="lead.id")  # indexed first in uq_lead_event
    name: str
    occurred_at: datetime = _ts_required()
    value: float | None = None


class StageChange(SQLModel, table=True):
    """The time a lead (or one of its deals) entered a CRM stage value.

    The raw CRM value is stored; the configured `[[stages]]` mapping is applied when reading, so
    people can edit the mapping without a re-sync.
    """

    __tablename__ = "stage_change"
    __table_args__ = (
        UniqueConstraint("lead_id", "field", "value", "deal_id", name="uq_stage_change"),
    )

    id: int | None = Field(default=None, primary_key=True)
    lead_id: int = Field(foreign_key="lead.id")  # indexed first in uq_stage_change
    field: str  # CRM property, e.g. lifecyclestage, dealstage
    value: str  # CRM value, e.g. salesqualifiedlead, closedwon
    entered_at: datetime = _ts_required()
    deal_id: str = ""  # "" for the lead's own stage property
    amount: Decimal | None = _money()
    currency: str | None = None
    is_lost: bool = False  # the stage closes the deal as lost


class Score(SQLModel, table=True):
    """A lead's latest score and the model version that made it: one row per lead, replaced
    when a newer model (or the same one, the lead having changed) scores it again. Superseded
    scores were never read (the report and the export take each lead's latest) and grew the
    table by one row per active lead at every weekly retrain."""

    __tablename__ = "score"
    __table_args__ = (UniqueConstraint("lead_id", name="uq_score_lead"),)

    id: int | None = Field(default=None, primary_key=True)
    lead_id: int = Field(foreign_key="lead.id")  # indexed by uq_score_lead
    model_version: str
    probability: float
    expected_value: Decimal | None = _money()
    currency: str | None = None
    value_band: str | None = None
    scored_at: datetime = _ts_now(index=True)


class SyncState(SQLModel, table=True):
    """Incremental cursor per source and object type (see leadloop/sync.py for the rules)."""

    __tablename__ = "sync_state"

    source: str = Field(primary_key=True)
    object_type: str = Field(primary_key=True)
    cursor_updated_at: datetime | None = _ts()
    cursor_id: str | None = None
    last_started_at: datetime | None = _ts()
    last_success_at: datetime | None = _ts()
    last_job_run_id: int | None = None
    extra: dict[str, Any] = _json()


class OutboxWatermark(SQLModel, table=True):
    """Where the outbox build got to, per fingerprint of the config it is built from
    (`leadloop.export.state.outbox_key`): the last build's start. The next build rebuilds only
    leads changed since then; a changed config has no watermark yet and rebuilds them all."""

    __tablename__ = "outbox_watermark"

    config_key: str = Field(primary_key=True)
    # None only inside the transaction that creates the row (see export/state.py)
    last_build_started_at: datetime | None = _ts()


class ConversionStatus(enum.StrEnum):
    pending = "pending"  # built, waiting to be sent
    held = "held"  # a platform rule stops it (hold_rule says which); re-checked each run
    sent = "sent"  # accepted by the platform
    rejected = "rejected"  # permanent per-row error from the platform
    failed = "failed"  # transient error; retried at next_attempt_at
    dead = "dead"  # transient errors past the retry horizon (dead letter)
    withdrawn = "withdrawn"  # never sent, and no longer true (lead deleted, merged, erased)


class ConversionKind(enum.StrEnum):
    conversion = "conversion"
    restatement = "restatement"
    retraction = "retraction"


class Conversion(SQLModel, table=True):
    """The outbox: one row per (destination, lead, stage, revision). A sent row is never edited."""

    __tablename__ = "conversion"
    __table_args__ = (
        UniqueConstraint("destination", "lead_id", "stage", "revision", name="uq_conversion"),
        Index("ix_conversion_due", "destination", "status", "next_attempt_at"),
        Index("ix_conversion_hold", "destination", "status", "hold_rule"),  # holds that may clear
    )

    id: int | None = Field(default=None, primary_key=True)
    order_id: str = Field(unique=True)
    destination: str
    lead_id: int = Field(foreign_key="lead.id", index=True)
    stage: str
    revision: int = 0
    kind: ConversionKind = ConversionKind.conversion
    conversion_action: str
    conversion_time: datetime = _ts_required()
    value: Decimal | None = _money()
    currency: str | None = None
    click_id_kind: str | None = None
    click_id: str | None = None
    status: ConversionStatus = Field(default=ConversionStatus.pending, index=True)
    hold_rule: str | None = None
    attempts: int = 0
    next_attempt_at: datetime | None = _ts()
    last_error: str | None = None
    platform_code: str | None = None
    platform_response: dict[str, Any] = _json()
    request_id: str | None = None
    created_at: datetime = _ts_now()
    sent_at: datetime | None = _ts()
    job_run_id: int | None = Field(default=None, index=True)  # the run that last wrote the row


class RejectedRecord(SQLModel, table=True):
    """Whatever could not be ingested or sent, with its reason; payload has no clear PII."""

    __tablename__ = "rejected_record"
    # Each synced page with rejects looks up those already kept by (source, record_ref)
    # (`rejects.keep_rejects`): without an index, a scan of every reject kept so far.
    __table_args__ = (Index("ix_rejected_record_ref", "source", "record_ref"),)

    id: int | None = Field(default=None, primary_key=True)
    job_run_id: int | None = Field(default=None, index=True)
    source: str
    object_type: str
    record_ref: str
    flow_stage: str = "ingest"  # ingest | score | export
    reason: str
    payload: dict[str, Any] = _json()
    created_at: datetime = _ts_now()


class JobOutcome(enum.StrEnum):
    running = "running"
    ok = "ok"
    failed = "failed"
    interrupted = "interrupted"


class JobRun(SQLModel, table=True):
    __tablename__ = "job_run"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True)
    started_at: datetime = _ts_required()
    finished_at: datetime | None = _ts()
    outcome: JobOutcome = JobOutcome.running
    counts: dict[str, Any] = _json()
    error: str | None = None


class ValidationResult(SQLModel, table=True):
    """One micro→macro test of one validation run (overall or within a segment)."""

    __tablename__ = "validation_result"

    id: int | None = Field(default=None, primary_key=True)
    job_run_id: int | None = Field(default=None, index=True)
    computed_at: datetime = _ts_required()
    micro: str
    segment: str = "all"  # "all" or "utm_source=google" etc.
    n: int
    n_with: int
    n_without: int
    macro_with: int
    macro_without: int
    rate_with: float | None = None
    rate_without: float | None = None
    lift: float | None = None
    lift_ci_low: float | None = None
    lift_ci_high: float | None = None
    p_value: float | None = None
    q_value: float | None = None
    phi: float | None = None
    median_days_to_macro: float | None = None
    verdict: str
    reason: str
    role: str
    details: dict[str, Any] = _json()


class DaemonLease(SQLModel, table=True):
    """Single-instance lease: one daemon per database."""

    __tablename__ = "daemon_lease"

    name: str = Field(primary_key=True)  # always "daemon"
    owner: str
    acquired_at: datetime = _ts_required()
    heartbeat_at: datetime = _ts_required()
    expires_at: datetime = _ts_required()


class Erasure(SQLModel, table=True):
    """Record of a GDPR erasure (`leadloop forget`): what was removed, never who in clear."""

    __tablename__ = "erasure"

    id: int | None = Field(default=None, primary_key=True)
    requested_at: datetime = _ts_required()
    selector: str  # "email_sha256:<hash>" or "crm_id:<source>:<id>"
    leads: int = 0
    counts: dict[str, Any] = _json()
