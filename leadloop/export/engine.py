"""The export job: outbox -> platform rules -> vendor-sized batches -> per-row outcomes.

`run_export(ctx)` (1) builds and refreshes the outbox from the store, holding what a platform's
rules say may not be sent as it builds each row, (2) checks the unsent rows the build did not
look at against those rules too, (3) sends the due rows of every enabled destination in
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

What each answer does to a row is decided by the pure functions of `transitions.py`; this module
reads, sends and writes.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text, union
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from leadloop.context import Context
from leadloop.errors import FatalDestinationError
from leadloop.export import state, transitions
from leadloop.export.base import (
    BaseDestination,
    BatchRejected,
    DestinationPaused,
    OutRow,
    RetryLater,
    RowResult,
    Settlement,
)
from leadloop.export.outbox import BUILD_RULES, Build, build, bulk_update, load_rows
from leadloop.export.registry import DESTINATIONS
from leadloop.export.rules import CLEAR_WITH_TIME
from leadloop.progress import track
from leadloop.redact import redact_text, scrub_payload
from leadloop.store import id_chunks, session_scope
from leadloop.tables import Conversion, ConversionStatus, RejectedRecord

log = logging.getLogger(__name__)

_COUNTED = ("held", "sent", "rejected", "failed", "dead", "requests")


def build_destination(ctx: Context, name: str) -> BaseDestination:
    cfg = ctx.settings.destinations[name]
    cls = DESTINATIONS[ctx.settings.destination_kind(name)]
    return cls(
        name, cfg, session_factory=ctx.http,
        secret=lambda key, env: ctx.settings.secret(key, env).get_secret_value(),
        resolve_path=ctx.settings.resolve_path, clock=ctx.now,
    )


def destination_states(ctx: Context) -> dict[str, dict[str, Any]]:
    """Destination name -> what the export last recorded about it (pause, token expiry)."""
    with session_scope(ctx.engine) as session:
        return state.destination_states(session)


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


# -- the run --------------------------------------------------------------------------------


def run_export(ctx: Context) -> dict[str, int | dict]:
    now = ctx.now()
    dests = {name: build_destination(ctx, name)
             for name, cfg in ctx.settings.destinations.items() if cfg.enabled}
    if ctx.dry_run:
        return _dry_run(ctx, dests, now)
    # Incremental: only leads changed since the last build (same config) are rebuilt and
    # re-checked. The watermark is the previous build's start, stored with the build itself.
    with session_scope(ctx.engine) as session:
        since = state.advance_watermark(session, _outbox_key(ctx, dests), now)
        built = _build(session, ctx, dests, now, since, ctx.job_run_id)
    totals = _totals(built.counts)
    for name, dest in dests.items():
        if ctx.stopping:
            break
        per = _export_destination(ctx, dest, now, since, built.unchecked.get(name, []))
        with session_scope(ctx.engine) as session:
            state.record_destination(session, name, per)
        _add(totals, name, per)
    _vacuum_after_bulk(ctx, totals)
    return _finish(totals)


# Outbox rows one run may write before PostgreSQL's table is vacuumed at its end.
VACUUM_AFTER_ROWS = 100_000
_WRITES = ("built", "revisions", "refreshed", "withdrawn", "sent", "rejected", "failed", "dead")


def _vacuum_after_bulk(ctx: Context, totals: dict[str, Any]) -> None:
    """After a run that wrote many outbox rows, vacuum and analyze `conversion` (PostgreSQL).

    Every run counts each destination's held rows (2.1M at 1M leads) from an index, which
    answers alone only for pages the visibility map marks all-visible. After a bulk write no
    page is, until autovacuum comes by, and the count visits the heap for every row: at 300k
    leads the incremental export took 0.5 s before a vacuum and 0.06 s after (the planner,
    without statistics, estimated one row for 492k). A failure here only costs that speed."""
    if ctx.engine.dialect.name != "postgresql":
        return
    if sum(int(totals.get(key, 0)) for key in _WRITES) < VACUUM_AFTER_ROWS:
        return
    try:
        with ctx.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                text("VACUUM (ANALYZE) conversion"))
    except SQLAlchemyError as exc:
        log.warning("could not vacuum the outbox table after a bulk export (%s); autovacuum "
                    "will, and until then each run's count of held rows is slower",
                    type(exc).__name__)


def _export_destination(ctx: Context, dest: BaseDestination, now: datetime,
                        since: datetime | None, unchecked: list[int]) -> dict[str, Any]:
    """Check one destination's rows against its rules and send its due ones; its counts."""
    with session_scope(ctx.engine) as session:
        held = apply_rules(session, dest, now, unchecked, changed_since=since,
                           job_run_id=ctx.job_run_id)
    per: dict[str, Any] = {"held": held}
    try:
        per.update(_send_due(ctx, dest, now))
    except FatalDestinationError as exc:
        _pause(per, dest, exc, now)
    per["held"] += per.get("held_before_retry", 0)
    return per


def _dry_run(ctx: Context, dests: dict[str, BaseDestination], now: datetime) -> dict[str, Any]:
    """Build, check and write the request bodies (validate-only where the platform has it) with
    the store left exactly as it was: the build runs in a transaction that is rolled back before
    anything is sent."""
    due: dict[str, tuple[int, list[OutRow]]] = {}
    with Session(ctx.engine) as session:
        try:
            since = state.read_watermark(session, _outbox_key(ctx, dests))
            built = _build(session, ctx, dests, now, since, None)
            for name, dest in dests.items():
                held = apply_rules(session, dest, now, built.unchecked.get(name, []),
                                   changed_since=since)
                rows, newly_held = _sendable(session, dest, now)
                due[name] = (held + len(newly_held), rows)
        finally:
            session.rollback()
    totals = _totals(built.counts)
    for name, dest in dests.items():
        held, rows = due[name]
        per: dict[str, Any] = {"held": held}
        try:
            per.update(_send_rows(ctx, dest, rows, now, dry=True))
        except FatalDestinationError as exc:
            _pause(per, dest, exc, now)
        _add(totals, name, per)
    return _finish(totals)


def _outbox_key(ctx: Context, dests: dict[str, BaseDestination]) -> str:
    return state.outbox_key(ctx.settings, {n: d.cfg for n, d in dests.items()})


def _build(session: Session, ctx: Context, dests: dict[str, BaseDestination], now: datetime,
           since: datetime | None, job_run_id: int | None) -> Build:
    """The outbox build, deciding each destination's platform rules as rows are built."""
    adjustments: dict[str, bool | frozenset[str]] = {n: d.adjustments for n, d in dests.items()}
    return build(session, ctx.settings, adjustments, now, job_run_id, changed_since=since,
                 rules={n: d.hold_rule for n, d in dests.items()})


def _totals(built: dict[str, int]) -> dict[str, Any]:
    return {**built, **dict.fromkeys(_COUNTED, 0), "destinations": {}}


def _add(totals: dict[str, Any], name: str, per: dict[str, Any]) -> None:
    totals["destinations"][name] = per
    for key in _COUNTED:
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


# -- rules ----------------------------------------------------------------------------------


def apply_rules(session: Any, dest: BaseDestination, now: datetime, unchecked: list[int],
                changed_since: datetime | None = None, job_run_id: int | None = None) -> int:
    """Hold or release the pending/held rows of one destination that the outbox build did not
    check (`unchecked`, see `outbox.Build`); return how many are held now.

    The build decided the rows of every lead it built (all of them without `changed_since`).
    With `changed_since` the other leads' pending rows and holds that can clear with time are
    checked again too. Rows are read in chunks, so memory stays flat with the outbox's size."""
    conv = Conversion.__table__  # type: ignore[attr-defined]
    for rows in _rows_to_check(session, dest.name, changed_since, unchecked):
        was = dict(session.execute(select(conv.c.id, conv.c.hold_rule).where(
            conv.c.destination == dest.name, conv.c.id.between(rows[0].id, rows[-1].id))).all())
        updates = [change for row in rows if was.get(row.id) not in BUILD_RULES
                   if (change := transitions.rule_change(row.id, was.get(row.id),
                                                          dest.hold_rule(row, now)))]
        bulk_update(session, updates, job_run_id)
    session.flush()
    return int(session.execute(
        select(func.count()).select_from(conv).where(
            conv.c.destination == dest.name, conv.c.status == ConversionStatus.held.value)
    ).scalar_one())


def _rows_to_check(session: Any, destination: str, changed_since: datetime | None,
                   unchecked: list[int]) -> Iterator[list[OutRow]]:
    """Unsent rows whose rule check can come out differently than when they were last checked,
    in chunks ordered by id: `unchecked`, and with `changed_since` pending rows and holds that
    can clear with time, each found through an index (a scan of every held row made an
    unchanged million-lead store take seconds)."""
    unsent = [ConversionStatus.pending, ConversionStatus.held]
    conv = Conversion.__table__  # type: ignore[attr-defined]
    candidates = set(unchecked)
    if changed_since is not None:
        def ids(*cond: Any) -> Any:
            return select(conv.c.id).where(conv.c.destination == destination, *cond)

        candidates.update(session.execute(union(
            ids(conv.c.status == ConversionStatus.pending.value),
            ids(conv.c.status == ConversionStatus.held.value, conv.c.hold_rule.in_(CLEAR_WITH_TIME)),
        )).scalars())
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
        rule = dest.hold_rule(row, now)
        if rule is None:
            ok.append(row)
        else:
            holds.append(transitions.retry_hold(row.id, rule))
    return ok, holds


# -- sending --------------------------------------------------------------------------------


def _send_due(ctx: Context, dest: BaseDestination, now: datetime) -> dict[str, Any]:
    with session_scope(ctx.engine) as session:
        rows, holds = _sendable(session, dest, now)
        bulk_update(session, holds, ctx.job_run_id)
    counts = _send_rows(ctx, dest, rows, now, dry=bool(dest.cfg.dry_run))
    if holds:
        counts["held_before_retry"] = len(holds)
    return counts


def _send_rows(ctx: Context, dest: BaseDestination, rows: list[OutRow], now: datetime, *,
               dry: bool) -> dict[str, Any]:
    """Send `rows` in batches (or only write their bodies when `dry`); the counts. A pause by
    the platform is raised once the batches before it are committed."""
    dry = dry or ctx.dry_run
    validate = dest.has_validate_only and (dest.cfg.validate_only or (dry and dest.has_credentials))
    writer = PayloadWriter(ctx.out_dir, dest.name)
    counts: Counter[str] = Counter(due=len(rows), min_requests=dest.min_requests(len(rows)))
    paused = _send_batches(ctx, dest, rows, writer, counts, dry=dry, validate=validate)
    if not dry and not validate and dest.has_diagnostics and paused is None:
        counts["diagnosed"], paused = _diagnose(ctx, dest)
    if writer.written:
        counts["files"] = writer.written
    out: dict[str, Any] = dict(counts)
    if dest.refresh_token_expires_at:
        out["refresh_token_expires_at"] = dest.refresh_token_expires_at.isoformat()
    if paused is not None:
        # Rows before the paused one were applied; the rest stay due. Raised after the commit.
        raise DestinationPaused(dest.name, paused.platform_code or "SETUP", paused.message or "",
                                f"{counts['requests']} request(s) spent")
    if ctx.stopping:
        log.info("stop requested: export of %s ended after a committed batch", dest.name)
    return out


def _send_batches(ctx: Context, dest: BaseDestination, rows: list[OutRow], writer: PayloadWriter,
                  counts: Counter[str], *, dry: bool, validate: bool) -> RowResult | None:
    """Send batch after batch, committing each one's results, until done, paused or stopping;
    adds to `counts` and returns the answer that paused the destination, if one did."""
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
                    counts.update(apply_results(session, dest, batch, results, ctx.now(),
                                                ctx.job_run_id))
            progress.advance(len(batch))
            paused = next((r for r in results if r.outcome == "paused"), None)
            if paused is not None:
                return paused
            if ctx.stopping:
                break
    return None


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


# -- results --------------------------------------------------------------------------------


def _redacted(res: RowResult) -> RowResult:
    """`res` with the vendor's text run through the log redaction (tokens echoed by proxies or
    WAFs, e-mails) before anything of it is stored."""
    return RowResult(res.order_id, res.outcome, res.platform_code and redact_text(res.platform_code),
                     redact_text(res.message) if res.message else res.message, res.retry_after,
                     scrub_payload(res.response or {}), res.request_id)


def _rejected_record(dest: BaseDestination, order_id: str, reason: str, payload: dict[str, Any],
                     now: datetime, job_run_id: int | None) -> RejectedRecord:
    return RejectedRecord(job_run_id=job_run_id, source=dest.name, object_type="conversion",
                          record_ref=order_id, flow_stage="export", created_at=now, reason=reason,
                          payload=payload)


def apply_results(session: Any, dest: BaseDestination, batch: Sequence[OutRow],
                  results: Sequence[RowResult], now: datetime, job_run_id: int | None
                  ) -> Counter[str]:
    """Write the platform's answers for one sent batch (see `transitions.result_change`); a
    rejected row also gets a rejected-record row. Returns counts by outcome."""
    by_order = {r.order_id: r for r in batch}
    before = {i: (a, resp) for i, a, resp in session.execute(
        select(Conversion.id, Conversion.attempts, Conversion.platform_response).where(  # type: ignore[call-overload]
            Conversion.id.in_([r.id for r in batch]))  # type: ignore[union-attr]
    )}
    policy = transitions.RetryPolicy.of(dest.cfg)
    counts: Counter[str] = Counter()
    updates = []
    for res in results:
        row = by_order.get(res.order_id)
        if row is None or res.outcome == "paused":  # a paused row stays due, untouched
            continue
        res = _redacted(res)
        attempts, response = before[row.id]
        key, change = transitions.result_change(res, row.id, attempts, response, now, policy)
        if key == "rejected":
            session.add(_rejected_record(dest, row.order_id, f"{res.platform_code}: {res.message}",
                                         transitions.rejected_payload(row), now, job_run_id))
        counts[key] += 1
        updates.append(change)
    bulk_update(session, updates, job_run_id)
    return counts


def _diagnose(ctx: Context, dest: BaseDestination, limit: int = 50) -> tuple[int, RowResult | None]:
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
        settled = dest.settle(status)
        settled = replace(settled, message=redact_text(settled.message) if settled.message else None)
        with session_scope(ctx.engine) as session:
            _settle_request(session, dest, request_id, status, settled, now, ctx.job_run_id)
        if settled.outcome == "paused":
            paused = RowResult(request_id, "paused", settled.code, settled.message)
        done += 1
    return done, paused


def _settle_request(session: Any, dest: BaseDestination, request_id: str,
                    diagnostics: dict[str, Any], settled: Settlement, now: datetime,
                    job_run_id: int | None) -> None:
    """Apply a settled request to its rows (see `transitions.settle_change`)."""
    rows = session.execute(select(  # type: ignore[call-overload]
        Conversion.id, Conversion.order_id, Conversion.stage, Conversion.kind,
        Conversion.conversion_action).where(
        Conversion.destination == dest.name, Conversion.request_id == request_id)).all()
    change = transitions.settle_change(settled, diagnostics, now)
    if settled.outcome == "rejected":
        for r in rows:
            session.add(_rejected_record(
                dest, r.order_id, f"{settled.code}: {settled.message}",
                {"stage": r.stage, "kind": str(r.kind), "request_id": request_id,
                 "conversion_action": r.conversion_action}, now, job_run_id))
    bulk_update(session, [{"id": r.id, **change} for r in rows], job_run_id)
