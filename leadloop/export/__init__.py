"""The export job: outbox -> platform rules -> vendor-sized batches -> per-row outcomes.

`run_export(ctx)` (1) builds and refreshes the outbox from the store, (2) checks each platform's
rules and holds what may not be sent, (3) sends the due rows of every enabled destination in
vendor-sized batches, committing after each batch and stopping between batches when a shutdown
was requested, and (4) returns counts. A crash between a send and its commit re-sends the same
rows under the same order ids next run; the platforms deduplicate them, and their "already
exists" answer is recorded as sent.
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

from leadloop.context import Context
from leadloop.errors import FatalDestinationError
from leadloop.export.base import BaseDestination, BatchRejected, OutRow, RetryLater, RowResult
from leadloop.export.csv_files import CsvFilesDestination
from leadloop.export.google_ads import GoogleAdsDestination
from leadloop.export.google_data_manager import DataManagerDestination
from leadloop.export.linkedin import LinkedInDestination
from leadloop.export.meta import MetaDestination
from leadloop.export.microsoft import MicrosoftDestination
from leadloop.export.outbox import BUILD_RULES, _bulk_update, build_outbox, changed_leads, load_rows
from leadloop.export.rules import CLEAR_WITH_TIME, check
from leadloop.progress import track
from leadloop.store import id_chunks, session_scope
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
    # Incremental: only leads changed since the last build (same config) are rebuilt and
    # re-checked. The watermark is the previous build's start, stored with the build itself.
    with session_scope(ctx.engine) as session:
        state = session.get(SyncState, ("outbox", _outbox_key(ctx, dests))) or SyncState(
            source="outbox", object_type=_outbox_key(ctx, dests))
        since = state.cursor_updated_at
        built = build_outbox(session, settings, {n: d.supports_adjustments for n, d in dests.items()},
                             now, ctx.job_run_id, changed_since=since)
        state.cursor_updated_at, state.last_success_at = now, now
        session.add(state)
    totals: dict[str, Any] = {**built, "held": 0, "sent": 0, "rejected": 0, "failed": 0, "dead": 0,
                              "requests": 0, "destinations": {}}
    fatal: list[str] = []
    for name, dest in dests.items():
        if ctx.stopping:
            break
        with session_scope(ctx.engine) as session:
            held = apply_rules(session, dest, now, changed_since=since, job_run_id=ctx.job_run_id)
        per: dict[str, Any] = {"held": held}
        try:
            per.update(_send_due(ctx, dest, now))
        except FatalDestinationError as exc:
            per["error"] = exc.message
            fatal.append(exc.message)
            log.error("%s", exc.message)
        totals["destinations"][name] = per
        for key in ("held", "sent", "rejected", "failed", "dead", "requests"):
            totals[key] += per.get(key, 0)
    if fatal:
        raise FatalDestinationError("; ".join(fatal), hint="the other destinations were exported")
    return totals


def rule_set(dest: BaseDestination) -> str:
    return f"file:{dest.cfg.file_platform}" if dest.kind == "csv_files" else dest.kind


def apply_rules(session: Any, dest: BaseDestination, now: datetime,
                changed_since: datetime | None = None, job_run_id: int | None = None) -> int:
    """Hold or release pending/held rows of one destination; return how many are held now.

    With `changed_since`, a held row is re-checked only if its hold can clear with time or its
    lead changed since then; pending rows are always checked. Rows are read in chunks, so memory
    stays flat with the outbox's size."""
    conv = Conversion.__table__  # type: ignore[attr-defined]
    kind = rule_set(dest)
    for rows in _rows_to_check(session, dest.name, changed_since):
        was = dict(session.execute(select(conv.c.id, conv.c.hold_rule).where(
            conv.c.destination == dest.name, conv.c.id.between(rows[0].id, rows[-1].id))).all())
        updates = []
        for row in rows:
            if was.get(row.id) in BUILD_RULES:
                continue
            rule = check(kind, row, now, consent_required=dest.cfg.consent_required,
                         send_user_data=dest.cfg.send_user_data)
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


def _send_due(ctx: Context, dest: BaseDestination, now: datetime) -> dict[str, int]:
    cfg = dest.cfg
    dry = ctx.dry_run or cfg.dry_run
    validate = dest.has_validate_only and (cfg.validate_only or (dry and dest.has_credentials))
    writer = PayloadWriter(ctx.out_dir, dest.name)
    with session_scope(ctx.engine) as session:
        rows = load_rows(session, dest.name, [ConversionStatus.pending, ConversionStatus.failed],
                         due_before=now)
    counts: Counter[str] = Counter(due=len(rows), min_requests=dest.min_requests(len(rows)))
    with track(f"export {dest.name}", total=len(rows)) as progress:
        for batch in dest.batches(rows):
            sender = _BatchSender(dest, writer, send=not dry or validate, validate=validate)
            results = sender.run(batch)
            counts["requests"] += sender.requests
            if validate or dry:
                counts["validated" if validate else "written"] += len(batch)
                counts["invalid"] += sum(r.outcome == "rejected" for r in results)
            else:
                with session_scope(ctx.engine) as session:
                    for key, n in _apply_results(ctx, session, dest, batch, results).items():
                        counts[key] += n
            progress.advance(len(batch))
            if ctx.stopping:
                log.info("stop requested: export of %s ends after a committed batch", dest.name)
                break
    if not dry and not validate and hasattr(dest, "diagnose"):
        counts["diagnosed"] = _diagnose(ctx, dest)
    if writer.written:
        counts["files"] = writer.written
    return dict(counts)


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
        if row is None:
            continue
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


def _diagnose(ctx: Context, dest: Any, limit: int = 50) -> int:
    """Fetch the platform's asynchronous per-request status for rows still PROCESSING."""
    with session_scope(ctx.engine) as session:
        ids = [r for (r,) in session.execute(
            select(Conversion.request_id).where(  # type: ignore[call-overload]
                Conversion.destination == dest.name, Conversion.platform_code == "PROCESSING",
                Conversion.request_id.is_not(None),  # type: ignore[union-attr]
            ).distinct().limit(limit)
        )]
    done = 0
    for request_id in ids:
        status = dest.diagnose(request_id)
        if status is None:
            continue
        with session_scope(ctx.engine) as session:
            rows = session.execute(select(Conversion.id).where(  # type: ignore[call-overload]
                Conversion.destination == dest.name, Conversion.request_id == request_id)).all()
            _bulk_update(session, [{"id": i, "platform_code": status["requestStatus"],
                                    "platform_response": {"diagnostics": status}} for (i,) in rows],
                         ctx.job_run_id)
        done += 1
    return done
