"""The export job: outbox -> platform rules -> vendor-sized batches -> per-row outcomes.

`run_export(ctx)` (1) builds and refreshes the outbox from the store, (2) checks each platform's
rules and holds what may not be sent, (3) sends the due rows of every enabled destination in
vendor-sized batches, committing after each batch and stopping between batches when a shutdown
was requested, and (4) returns counts. A crash between a send and its commit re-sends the same
rows under the same order ids next run; the platforms deduplicate them, and their "already
exists" answer is recorded as sent.

A destination whose platform refuses the account or its setup (`DestinationPaused`, or a row
answer with outcome "paused") stops after that request: its rows stay due and untouched, its
counts carry `paused` {code, fix} (what `leadloop status` shows), and the next run tries again.
Rows waiting for a retry are checked against the platform rules again before they are re-sent,
so a window that closed meanwhile holds them. Vendor error text is redacted (secrets, bearer
tokens, e-mails) before it is stored.

`ctx.dry_run` changes nothing in the store: the outbox is built and checked inside a transaction
that is rolled back, and only the request bodies are written (and validate-only requests sent).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, union
from sqlmodel import Session

from leadloop.context import Context
from leadloop.errors import FatalDestinationError
from leadloop.export.base import (
    BaseDestination,
    BatchRejected,
    DestinationPaused,
    OutRow,
    RetryLater,
    RowResult,
)
from leadloop.export.csv_files import CsvFilesDestination
from leadloop.export.google_ads import GoogleAdsDestination
from leadloop.export.google_data_manager import DataManagerDestination
from leadloop.export.linkedin import LinkedInDestination
from leadloop.export.meta import MetaDestination
from leadloop.export.microsoft import MicrosoftDestination
from leadloop.export.outbox import BUILD_RULES, _bulk_update, build_outbox, changed_leads, load_rows
from leadloop.export.rules import CLEAR_WITH_TIME, check
from leadloop.progress import track
from leadloop.redact import redact_text, scrub_payload
from leadloop.store import _insert_for, id_chunks, session_scope
from leadloop.tables import Conversion, ConversionStatus, RejectedRecord, SyncState

log = logging.getLogger(__name__)

DESTINATIONS: dict[str, type[BaseDestination]] = {
    cls.kind: cls
    for cls in (DataManagerDestination, GoogleAdsDestination, MetaDestination,
                MicrosoftDestination, LinkedInDestination, CsvFilesDestination)
}
_BACKOFF_START = 300.0  # seconds before the first retry of a transient failure
_BACKOFF_CAP = 6 * 3600.0
_RULES_CHUNK = 20_000  # outbox rows checked per read in apply_rules


def adjustment_support(settings: Any) -> dict[str, dict[str, bool]]:
    """Destination name -> whether its platform can restate a sent conversion's value and
    retract it (lost deal, deleted lead), for the report. Data Manager restates (same
    transactionId, new value) but documents no retraction; Meta, LinkedIn and manual files take
    neither."""
    out = {}
    for name in settings.destinations:
        takes = DESTINATIONS[settings.destination_kind(name)].adjustments
        out[name] = {"can_restate": "restatement" in takes, "can_retract": "retraction" in takes}
    return out


def build_destination(ctx: Context, name: str) -> BaseDestination:
    cfg = ctx.settings.destinations[name]
    cls = DESTINATIONS[ctx.settings.destination_kind(name)]
    return cls(
        name, cfg, session_factory=ctx.http,
        secret=lambda key, env: ctx.settings.secret(key, env).get_secret_value(),
        resolve_path=ctx.settings.resolve_path, clock=ctx.now,
    )


class PayloadWriter:
    """Writes every request body to `<out_dir>/payloads/<destination>/<NNNN>.json`."""

    def __init__(self, out_dir: Path | None, destination: str) -> None:
        self.dir = out_dir / "payloads" / destination if out_dir else None
        self.n = 0
        self.written = 0
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.n = max((int(p.stem) for p in self.dir.glob("[0-9]*.json")
                          if p.stem.isdigit()), default=0)

    def write(self, payload: dict[str, Any]) -> None:
        if self.dir is None:
            return
        self.n += 1
        self.written += 1
        (self.dir / f"{self.n:04d}.json").write_text(json.dumps(payload, indent=1, default=str))


def _outbox_key(ctx: Context, dests: dict[str, BaseDestination]) -> str:
    """A fingerprint of what the outbox is built from in the config: the stage-to-value mapping
    and the enabled destinations. Editing either forces a full rebuild."""
    mapping = {
        "stages": [s.model_dump(mode="json") for s in ctx.settings.stages],
        "destinations": {n: d.cfg.model_dump(mode="json") for n, d in sorted(dests.items())},
        "crm": [ctx.settings.crm.lead_stage_property, ctx.settings.crm.deal_stage_property],
    }
    return hashlib.sha256(json.dumps(mapping, sort_keys=True).encode()).hexdigest()[:16]


def run_export(ctx: Context) -> dict[str, int | dict]:
    settings = ctx.settings
    now = ctx.now()
    dests = {name: build_destination(ctx, name)
             for name, cfg in settings.destinations.items() if cfg.enabled}
    if ctx.dry_run:
        return _dry_run(ctx, dests, now)
    # Incremental: only leads changed since the last build (same config) are rebuilt and
    # re-checked. The watermark is the previous build's start, stored with the build itself.
    with session_scope(ctx.engine) as session:
        since = _advance_watermark(session, _outbox_key(ctx, dests), now)
        built = build_outbox(session, settings, {n: d.adjustments for n, d in dests.items()},
                             now, ctx.job_run_id, changed_since=since)
    totals = _totals(built)
    for name, dest in dests.items():
        if ctx.stopping:
            break
        with session_scope(ctx.engine) as session:
            held = apply_rules(session, dest, now, changed_since=since, job_run_id=ctx.job_run_id)
        per: dict[str, Any] = {"held": held}
        try:
            per.update(_send_due(ctx, dest, now))
        except FatalDestinationError as exc:
            _pause(per, dest, exc, now)
        per["held"] += per.get("held_before_retry", 0)
        _record_state(ctx, name, per)
        _add(totals, name, per)
    return _finish(totals)


DESTINATION_STATE = "destination"  # sync_state.source of the per-destination state rows


def _record_state(ctx: Context, name: str, per: dict[str, Any]) -> None:
    """Keep what `leadloop status` shows about a destination in `sync_state` (source
    "destination"): the pause and its fix, cleared once a request goes through again, and the
    refresh token's announced expiry."""
    sent_something = per.get("requests", 0) > 0 and "paused" not in per
    if not (per.get("paused") or sent_something or per.get("refresh_token_expires_at")):
        return
    with session_scope(ctx.engine) as session:
        state = _state_row(session, DESTINATION_STATE, name)
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


def destination_states(ctx: Context) -> dict[str, dict[str, Any]]:
    """Destination name -> what the export last recorded about it (see `_record_state`)."""
    with session_scope(ctx.engine) as session:
        found = session.execute(select(SyncState.object_type, SyncState.extra).where(  # type: ignore[call-overload]
            SyncState.source == DESTINATION_STATE)).all()
    return {name: extra or {} for name, extra in found}


def _state_row(session: Any, source: str, key: str) -> SyncState:
    """The `sync_state` row (source, key), created with `ON CONFLICT DO NOTHING` and locked, so
    two writers starting together cannot collide on its key."""
    table = SyncState.__table__  # type: ignore[attr-defined]
    session.execute(_insert_for(session, table).values(
        source=source, object_type=key, extra={}).on_conflict_do_nothing())
    return session.get(SyncState, (source, key), with_for_update=True, populate_existing=True)


def _totals(built: dict[str, int]) -> dict[str, Any]:
    return {**built, "held": 0, "sent": 0, "rejected": 0, "failed": 0, "dead": 0,
            "requests": 0, "destinations": {}}


def _add(totals: dict[str, Any], name: str, per: dict[str, Any]) -> None:
    totals["destinations"][name] = per
    for key in ("held", "sent", "rejected", "failed", "dead", "requests"):
        totals[key] += per.get(key, 0)


def _finish(totals: dict[str, Any]) -> dict[str, Any]:
    """The totals, or a `FatalDestinationError` naming every paused destination and its fix (the
    job fails, so `leadloop status` exits non-zero; the other destinations were exported)."""
    paused = {n: p["paused"] for n, p in totals["destinations"].items() if p.get("paused")}
    if paused:
        log.info("export totals %s", {k: v for k, v in totals.items() if k != "destinations"})
        raise FatalDestinationError(
            "; ".join(f"destination {n} paused: {p['code']}: {p['fix']}" for n, p in paused.items()),
            hint="rows stay due and the next run retries; the other destinations were exported")
    return totals


def _pause(per: dict[str, Any], dest: BaseDestination, exc: FatalDestinationError,
           now: datetime) -> None:
    """Record in the destination's counts that the platform refused its account or setup."""
    code = exc.code if isinstance(exc, DestinationPaused) else "CREDENTIALS"
    fix = exc.fix if isinstance(exc, DestinationPaused) else (exc.hint or exc.message)
    per["paused"] = {"code": code, "fix": redact_text(fix), "at": now.isoformat(),
                     "detail": redact_text(exc.message)}
    log.error("destination %s paused: %s (%s); its rows stay due, the next run retries",
              dest.name, code, redact_text(fix))


def _advance_watermark(session: Any, key: str, now: datetime) -> datetime | None:
    """Move the outbox build watermark to `now`; return the previous one. The row is created with
    `ON CONFLICT DO NOTHING`, so two builders starting together cannot collide on its key."""
    state = _state_row(session, "outbox", key)
    since = state.cursor_updated_at
    state.cursor_updated_at, state.last_success_at = now, now
    session.add(state)
    return since


def _dry_run(ctx: Context, dests: dict[str, BaseDestination], now: datetime) -> dict[str, Any]:
    """Build, check and write the request bodies (validate-only where the platform has it) with
    the store left exactly as it was: the build runs in a transaction that is rolled back before
    anything is sent."""
    due: dict[str, tuple[int, list[OutRow]]] = {}
    with Session(ctx.engine) as session:
        try:
            key = _outbox_key(ctx, dests)
            state = session.get(SyncState, ("outbox", key))
            since = state.cursor_updated_at if state else None
            built = build_outbox(session, ctx.settings, {n: d.adjustments for n, d in dests.items()},
                                 now, changed_since=since)
            for name, dest in dests.items():
                held = apply_rules(session, dest, now, changed_since=since)
                rows, newly_held = _sendable(session, dest, now)
                due[name] = (held + len(newly_held), rows)
        finally:
            session.rollback()
    totals = _totals(built)
    for name, dest in dests.items():
        held, rows = due[name]
        per: dict[str, Any] = {"held": held}
        try:
            per.update(_send_rows(ctx, dest, rows, now, dry=True))
        except FatalDestinationError as exc:
            _pause(per, dest, exc, now)
        _add(totals, name, per)
    return _finish(totals)


def rule_set(dest: BaseDestination) -> str:
    return f"file:{dest.cfg.file_platform}" if dest.kind == "csv_files" else dest.kind


def _rule(dest: BaseDestination, row: OutRow, now: datetime) -> str | None:
    cfg = dest.cfg
    return check(rule_set(dest), row, now, consent_required=cfg.consent_required,
                 send_user_data=cfg.send_user_data, window_days=cfg.conversion_window_days)


def apply_rules(session: Any, dest: BaseDestination, now: datetime,
                changed_since: datetime | None = None, job_run_id: int | None = None) -> int:
    """Hold or release pending/held rows of one destination; return how many are held now.

    With `changed_since`, a held row is re-checked only if its hold can clear with time or its
    lead changed since then; pending rows are always checked. Rows are read in chunks, so memory
    stays flat with the outbox's size."""
    conv = Conversion.__table__  # type: ignore[attr-defined]
    for rows in _rows_to_check(session, dest.name, changed_since):
        was = dict(session.execute(select(conv.c.id, conv.c.hold_rule).where(
            conv.c.destination == dest.name, conv.c.id.between(rows[0].id, rows[-1].id))).all())
        updates = []
        for row in rows:
            if was.get(row.id) in BUILD_RULES:
                continue
            rule = _rule(dest, row, now)
            if rule != was.get(row.id):
                updates.append({"id": row.id, "hold_rule": rule,
                                "status": ConversionStatus.held if rule else ConversionStatus.pending})
        _bulk_update(session, updates, job_run_id)
    session.flush()
    return int(session.execute(
        select(func.count()).select_from(conv).where(
            conv.c.destination == dest.name, conv.c.status == ConversionStatus.held.value)
    ).scalar_one())


def _rows_to_check(session: Any, destination: str, changed_since: datetime | None
                   ) -> Iterator[list[OutRow]]:
    """Unsent rows whose rule check can come out differently, in chunks ordered by id.

    Without `changed_since` that is every pending or held row. With it: pending rows, holds that
    can clear with time, and rows of leads changed since then, each found through an index (a
    scan of every held row made an unchanged million-lead store take seconds)."""
    unsent = [ConversionStatus.pending, ConversionStatus.held]
    if changed_since is None:
        after = 0
        while rows := load_rows(session, destination, unsent, after_id=after, limit=_RULES_CHUNK):
            yield rows
            after = rows[-1].id
        return
    conv = Conversion.__table__  # type: ignore[attr-defined]

    def ids(*cond: Any) -> Any:
        return select(conv.c.id).where(conv.c.destination == destination, *cond)

    candidates = session.execute(union(
        ids(conv.c.status == ConversionStatus.pending.value),
        ids(conv.c.status == ConversionStatus.held.value, conv.c.hold_rule.in_(CLEAR_WITH_TIME)),
        ids(conv.c.status.in_([s.value for s in unsent]),
            conv.c.lead_id.in_(changed_leads(changed_since))),
    )).scalars().all()
    for part in id_chunks(candidates):
        if rows := load_rows(session, destination, unsent, where=conv.c.id.in_(part)):
            yield rows


def _sendable(session: Any, dest: BaseDestination, now: datetime
              ) -> tuple[list[OutRow], list[dict[str, Any]]]:
    """The due rows that still pass the platform rules, and the hold updates for those that no
    longer do (a retry whose window closed while it waited: Meta's 7 days)."""
    rows = load_rows(session, dest.name, [ConversionStatus.pending, ConversionStatus.failed],
                     due_before=now)
    ok, holds = [], []
    for row in rows:
        rule = _rule(dest, row, now)
        if rule is None:
            ok.append(row)
        else:
            holds.append({"id": row.id, "status": ConversionStatus.held, "hold_rule": rule,
                          "next_attempt_at": None})
    return ok, holds


def _send_due(ctx: Context, dest: BaseDestination, now: datetime) -> dict[str, Any]:
    with session_scope(ctx.engine) as session:
        rows, holds = _sendable(session, dest, now)
        _bulk_update(session, holds, ctx.job_run_id)
    counts = _send_rows(ctx, dest, rows, now, dry=bool(dest.cfg.dry_run))
    if holds:
        counts["held_before_retry"] = len(holds)
    return counts


def _send_rows(ctx: Context, dest: BaseDestination, rows: list[OutRow], now: datetime, *,
               dry: bool) -> dict[str, Any]:
    cfg = dest.cfg
    dry = dry or ctx.dry_run
    validate = dest.has_validate_only and (cfg.validate_only or (dry and dest.has_credentials))
    writer = PayloadWriter(ctx.out_dir, dest.name)
    counts: Counter[str] = Counter(due=len(rows), min_requests=dest.min_requests(len(rows)))
    paused: RowResult | None = None
    with track(f"export {dest.name}", total=len(rows)) as progress:
        for batch in dest.batches(rows):
            sender = _BatchSender(dest, writer, send=not dry or validate, validate=validate)
            try:
                results = sender.run(batch)
            finally:
                counts["requests"] += sender.requests
            if validate or dry:
                counts["validated" if validate else "written"] += len(batch)
                counts["invalid"] += sum(r.outcome == "rejected" for r in results)
            else:
                with session_scope(ctx.engine) as session:
                    for key, n in _apply_results(ctx, session, dest, batch, results).items():
                        counts[key] += n
            progress.advance(len(batch))
            paused = next((r for r in results if r.outcome == "paused"), None)
            if paused is not None or ctx.stopping:
                break
    if not dry and not validate and hasattr(dest, "diagnose") and paused is None:
        counts["diagnosed"], paused = _diagnose(ctx, dest)
    if writer.written:
        counts["files"] = writer.written
    out: dict[str, Any] = dict(counts)
    if getattr(dest, "refresh_token_expires_at", None):
        out["refresh_token_expires_at"] = dest.refresh_token_expires_at.isoformat()
    if paused is not None:
        # Rows before the paused one were applied; the rest stay due. Raised after the commit.
        raise DestinationPaused(dest.name, paused.platform_code or "SETUP", paused.message or "",
                                f"{counts['requests']} request(s) spent")
    if ctx.stopping:
        log.info("stop requested: export of %s ended after a committed batch", dest.name)
    return out


class _BatchSender:
    """Sends one batch; isolates the bad rows of a fast-failed request by splitting it."""

    def __init__(self, dest: BaseDestination, writer: PayloadWriter, *, send: bool,
                 validate: bool) -> None:
        self.dest, self.writer, self.send, self.validate = dest, writer, send, validate
        self.requests = 0

    def run(self, batch: Sequence[OutRow]) -> list[RowResult]:
        payload = self.dest.build_payload(batch)
        if self.validate:
            payload = self.dest.validate_payload(payload)
        self.writer.write(payload)
        if not self.send:
            return []
        self.requests += 1
        try:
            return self.dest.send(payload, batch)
        except BatchRejected as exc:
            if exc.row_index is not None and 0 <= exc.row_index < len(batch):
                bad = batch[exc.row_index]
                rest = [r for i, r in enumerate(batch) if i != exc.row_index]
                return [_rejected(bad, exc)] + (self.run(rest) if rest else [])
            if len(batch) == 1:
                return [_rejected(batch[0], exc)]
            mid = len(batch) // 2
            return self.run(batch[:mid]) + self.run(batch[mid:])
        except RetryLater as exc:
            return [RowResult(r.order_id, "retry", "TRANSIENT", exc.message, exc.retry_after)
                    for r in batch]


def _redacted(res: RowResult) -> RowResult:
    """`res` with the vendor's text run through the log redaction (tokens echoed by proxies or
    WAFs, e-mails) before anything of it is stored."""
    return RowResult(res.order_id, res.outcome, res.platform_code and redact_text(res.platform_code),
                     redact_text(res.message) if res.message else res.message, res.retry_after,
                     scrub_payload(res.response or {}), res.request_id)


def _rejected(row: OutRow, exc: BatchRejected) -> RowResult:
    return RowResult(row.order_id, "rejected", exc.code, exc.detail)


def _apply_results(ctx: Context, session: Any, dest: BaseDestination, batch: Sequence[OutRow],
                   results: Sequence[RowResult]) -> Counter[str]:
    now = ctx.now()
    by_order = {r.order_id: r for r in batch}
    state = {i: (a, resp) for i, a, resp in session.execute(
        select(Conversion.id, Conversion.attempts, Conversion.platform_response).where(  # type: ignore[call-overload]
            Conversion.id.in_([r.id for r in batch]))  # type: ignore[union-attr]
    )}
    horizon = timedelta(hours=dest.cfg.retry_horizon_hours)
    counts: Counter[str] = Counter()
    updates = []
    for res in results:
        row = by_order.get(res.order_id)
        if row is None or res.outcome == "paused":  # a paused row stays due, untouched
            continue
        res = _redacted(res)
        attempts, response = state[row.id]
        attempts += 1
        change: dict[str, Any] = {"id": row.id, "attempts": attempts,
                                  "platform_code": res.platform_code, "request_id": res.request_id,
                                  "job_run_id": ctx.job_run_id}
        if res.outcome == "sent":
            change.update(status=ConversionStatus.sent, sent_at=now, last_error=None,
                          next_attempt_at=None, platform_response=res.response or {})
            counts["sent"] += 1
        elif res.outcome == "rejected":
            change.update(status=ConversionStatus.rejected, last_error=res.message,
                          next_attempt_at=None, platform_response=res.response or {})
            session.add(RejectedRecord(
                job_run_id=ctx.job_run_id, source=dest.name, object_type="conversion",
                record_ref=row.order_id, flow_stage="export", created_at=now,
                reason=f"{res.platform_code}: {res.message}",
                payload={"stage": row.stage, "kind": row.kind, "crm_id": row.crm_id,
                         "conversion_action": row.conversion_action},
            ))
            counts["rejected"] += 1
        else:
            first = (response or {}).get("first_failed_at") or now.isoformat()
            delay = res.retry_after if res.retry_after is not None else min(
                _BACKOFF_START * 2 ** (attempts - 1), _BACKOFF_CAP)
            next_at = now + timedelta(seconds=delay)
            dead = (attempts >= dest.cfg.max_attempts
                    or next_at > datetime.fromisoformat(first) + horizon)
            change.update(status=ConversionStatus.dead if dead else ConversionStatus.failed,
                          last_error=res.message, next_attempt_at=None if dead else next_at,
                          platform_response={**(res.response or {}), "first_failed_at": first})
            counts["dead" if dead else "failed"] += 1
        updates.append(change)
    _bulk_update(session, updates, ctx.job_run_id)
    return counts


def _diagnose(ctx: Context, dest: Any, limit: int = 50) -> tuple[int, RowResult | None]:
    """Fetch the platform's asynchronous per-request status for rows still PROCESSING and apply
    what it means (`settle`): a FAILED request's rows are rejected, retried, or back to due with
    the destination paused; a PARTIAL_SUCCESS request's rows stay sent but marked so. Returns the
    number of requests settled and the pause, if any."""
    with session_scope(ctx.engine) as session:
        ids = [r for (r,) in session.execute(
            select(Conversion.request_id).where(  # type: ignore[call-overload]
                Conversion.destination == dest.name, Conversion.platform_code == "PROCESSING",
                Conversion.request_id.is_not(None),  # type: ignore[union-attr]
            ).distinct().limit(limit)
        )]
    done, paused = 0, None
    now = ctx.now()
    for request_id in ids:
        status = dest.diagnose(request_id)
        if status is None:
            continue
        outcome, code, message, retry_after = dest.settle(status)
        message = redact_text(message) if message else None
        with session_scope(ctx.engine) as session:
            rows = session.execute(select(  # type: ignore[call-overload]
                Conversion.id, Conversion.order_id, Conversion.stage, Conversion.kind,
                Conversion.conversion_action).where(
                Conversion.destination == dest.name, Conversion.request_id == request_id)).all()
            change: dict[str, Any] = {"platform_code": code,
                                      "platform_response": {"diagnostics": status}}
            if outcome == "rejected":
                change.update(status=ConversionStatus.rejected, last_error=message)
                for r in rows:
                    session.add(RejectedRecord(
                        job_run_id=ctx.job_run_id, source=dest.name, object_type="conversion",
                        record_ref=r.order_id, flow_stage="export", created_at=now,
                        reason=f"{code}: {message}",
                        payload={"stage": r.stage, "kind": str(r.kind), "request_id": request_id,
                                 "conversion_action": r.conversion_action}))
            elif outcome == "retry":
                change.update(status=ConversionStatus.failed, last_error=message,
                              next_attempt_at=now + timedelta(seconds=retry_after or _BACKOFF_START))
            elif outcome == "paused":
                change.update(status=ConversionStatus.pending, last_error=message, sent_at=None)
                paused = RowResult(request_id, "paused", code, message)
            elif message:
                change["last_error"] = message
            _bulk_update(session, [{"id": r.id, **change} for r in rows], ctx.job_run_id)
        done += 1
    return done, paused
