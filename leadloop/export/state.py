"""What the export keeps between runs.

- The outbox build watermark (`outbox_watermark`), per fingerprint of the config the outbox is
  built from (`outbox_key`): the previous build's start. Only leads changed since then are
  rebuilt.
- Per destination (`sync_state`, source "destination", key = its name): the pause and its fix,
  and the refresh token's announced expiry, which `leadloop status` shows.

Rows are created with `ON CONFLICT DO NOTHING` and locked, so two writers starting together
cannot collide on a key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlmodel import Session, col

from leadloop.config import Settings
from leadloop.store import insert_ignore
from leadloop.tables import OutboxWatermark, SyncState

DESTINATION_STATE = "destination"  # sync_state.source of the per-destination state rows


def outbox_key(settings: Settings, destination_configs: Mapping[str, Any]) -> str:
    """A fingerprint of what the outbox is built from in the config: the stage-to-value mapping
    and the enabled destinations. Editing either forces a full rebuild."""
    mapping = {
        "stages": [s.model_dump(mode="json") for s in settings.stages],
        "destinations": {n: c.model_dump(mode="json")
                         for n, c in sorted(destination_configs.items())},
        "crm": [settings.crm.lead_stage_property, settings.crm.deal_stage_property],
    }
    return hashlib.sha256(json.dumps(mapping, sort_keys=True).encode()).hexdigest()[:16]


def _locked_row(session: Session, source: str, key: str) -> SyncState:
    insert_ignore(session, SyncState, [{"source": source, "object_type": key, "extra": {}}],
                  conflict=("source", "object_type"))
    row = session.get(SyncState, (source, key), with_for_update=True, populate_existing=True)
    assert row is not None
    return row


def advance_watermark(session: Session, key: str, now: datetime) -> datetime | None:
    """Move the outbox build watermark of config `key` to `now`; return the previous one."""
    insert_ignore(session, OutboxWatermark, [{"config_key": key, "last_build_started_at": None}],
                  conflict=("config_key",))
    mark = session.get(OutboxWatermark, key, with_for_update=True, populate_existing=True)
    assert mark is not None
    since = mark.last_build_started_at
    mark.last_build_started_at = now
    session.add(mark)
    return since


def read_watermark(session: Session, key: str) -> datetime | None:
    """The outbox build watermark of config `key`, unchanged (for a dry run)."""
    mark = session.get(OutboxWatermark, key)
    return mark.last_build_started_at if mark else None


def record_destination(session: Session, name: str, per: dict[str, Any]) -> None:
    """Keep what `leadloop status` shows about a destination after its export (`per`, its
    counts): the pause and its fix, cleared once a request goes through again, and the refresh
    token's announced expiry."""
    sent_something = per.get("requests", 0) > 0 and "paused" not in per
    if not (per.get("paused") or sent_something or per.get("refresh_token_expires_at")):
        return
    state = _locked_row(session, DESTINATION_STATE, name)
    extra = dict(state.extra or {})
    if per.get("paused"):
        since = (extra.get("paused") or {}).get("since") or per["paused"]["at"]
        extra["paused"] = {**per["paused"], "since": since}
    elif sent_something:
        extra.pop("paused", None)
    if per.get("refresh_token_expires_at"):
        extra["refresh_token_expires_at"] = per["refresh_token_expires_at"]
    state.extra = extra
    session.add(state)


def destination_states(session: Session) -> dict[str, dict[str, Any]]:
    """Destination name -> what the export last recorded about it (see `record_destination`)."""
    found = session.execute(select(col(SyncState.object_type), col(SyncState.extra)).where(
        col(SyncState.source) == DESTINATION_STATE)).all()
    return {name: extra or {} for name, extra in found}
