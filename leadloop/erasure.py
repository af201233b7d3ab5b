"""`leadloop forget`: erase one person (GDPR art. 17) from the store, and record that we did.

A person is found by e-mail (hashed first, exactly as at ingestion, so the clear address is
never stored or logged) or by CRM record id; leads merged into that record are the same person
and are erased with it. In one transaction the person's events, scores and every conversion that
was never accepted by a platform are deleted, the rejected-record rows of those leads go too, and
the lead row keeps only what the funnel statistics need: hashed identities, click ids, landing
page and free CRM attributes are cleared and its status becomes `erased`. The sync engine leaves
erased leads alone, so a later sync does not bring the data back.

Conversions already sent stay: they are the platforms' records now (erase there through each
platform's own deletion process); the summary says how many there are.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import zipfile
from collections.abc import Iterable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, exists, or_, select, update
from sqlmodel import Session, col

from leadloop.context import Context
from leadloop.crm.base import CLICK_ID_FIELDS
from leadloop.errors import LeadloopError
from leadloop.identity import IdentityError, hash_email
from leadloop.lease import outbox_lease
from leadloop.store import among, session_scope
from leadloop.tables import (
    Conversion,
    ConversionStatus,
    Erasure,
    JobRun,
    Lead,
    LeadEvent,
    LeadStatus,
    RejectedRecord,
    Score,
)

if TYPE_CHECKING:
    from leadloop.crm.base import Page

ERASURE_KEY_ENV = "LEADLOOP_ERASURE_KEY"
_IDENTITY = ("email_sha256", "email_google_sha256", "phone_e164_sha256", "phone_digits_sha256")


def forget_person(ctx: Context, *, email: str | None, crm_id: str | None) -> str:
    """Erase the person selected by `email` or `crm_id` (exactly one); return a summary line.

    Holds the outbox lease (waiting for an export in flight to finish) so that no batch or
    payload file carrying the person's hashes is sent or written after the erasure."""
    if bool(email) == bool(crm_id):
        raise LeadloopError("give exactly one of --email or --crm-id")
    ttl = timedelta(seconds=ctx.settings.schedule.lease_seconds)
    with outbox_lease(ctx.engine, "forget", ttl=ttl, now=ctx.now, stop=ctx.stop) as owner:
        if owner is None:
            raise LeadloopError("forget was stopped while waiting for the export in flight; "
                                "nothing was erased")
        return _forget(ctx, email=email, crm_id=crm_id)


def _forget(ctx: Context, *, email: str | None, crm_id: str | None) -> str:
    source = ctx.settings.crm.source_name
    traces: set[str] = set()  # what identifies the person in files leadloop wrote
    if email:
        try:
            plain, google = hash_email(email)
        except IdentityError as exc:
            raise LeadloopError(f"--email: {exc}") from None
        selector = f"email:{audit_hash(plain)}"
        match = or_(col(Lead.email_sha256) == plain, col(Lead.email_google_sha256) == google)
        who = f"e-mail sha256 {plain[:12]}…"
        traces |= {plain, google, email.strip(), email.strip().lower()}
    else:
        selector = f"crm_id:{source}:{audit_hash(str(crm_id))}"
        match = (col(Lead.source) == source) & (col(Lead.crm_id) == crm_id)
        who = f"{source} record {crm_id}"
    now = ctx.now()
    with session_scope(ctx.engine) as session:
        who_rows = select(col(Lead.id), col(Lead.source), col(Lead.crm_id))
        found = list(session.execute(who_rows.where(match)).all())
        ids = [row.id for row in found]
        if ids:  # leads merged into this person are the same person
            merged = session.execute(who_rows.where(col(Lead.merged_into_id).in_(ids))).all()
            found += [m for m in merged if m.id not in ids]
            ids = [row.id for row in found]
        if ids:
            traces |= _traces(session, ids)
        counts = {"leads": len(ids), "events": 0, "scores": 0, "conversions_deleted": 0,
                  "conversions_sent_kept": 0, "rejected_records": 0}
        if ids:
            counts["events"] = _delete(session, delete(LeadEvent).where(col(LeadEvent.lead_id).in_(ids)))
            counts["scores"] = _delete(session, delete(Score).where(col(Score.lead_id).in_(ids)))
            counts["conversions_deleted"] = _delete(session, delete(Conversion).where(
                col(Conversion.lead_id).in_(ids),
                col(Conversion.status) != ConversionStatus.sent,
            ))
            counts["conversions_sent_kept"] = len(session.execute(
                select(col(Conversion.id)).where(col(Conversion.lead_id).in_(ids))
            ).all())
            for src in {row.source for row in found}:
                refs = [row.crm_id for row in found if row.source == src]
                counts["rejected_records"] += _delete(session, delete(RejectedRecord).where(
                    RejectedRecord.source == src, RejectedRecord.record_ref.in_(refs)  # type: ignore[attr-defined]
                ))
            cleared = {col: None for col in (*_IDENTITY, *CLICK_ID_FIELDS, "landing_page")}
            session.execute(
                update(Lead).where(Lead.id.in_(ids))  # type: ignore[union-attr]
                .values(**cleared, attributes={}, status=LeadStatus.erased, updated_at=now)
            )
        files = counts["files_rewritten"] = erase_from_files(output_dirs(ctx, session), traces)
        models = counts["models_removed"] = erase_from_models(ctx, traces)
        session.add(Erasure(requested_at=now, selector=selector, leads=len(ids), counts=counts))
    _compact_store(ctx)
    if not ids:
        return f"no lead matched {who}; the request is recorded"
    summary = (
        f"erased {counts['leads']} lead(s) for {who}: {counts['events']} events, "
        f"{counts['scores']} scores, {counts['conversions_deleted']} unsent conversions and "
        f"{counts['rejected_records']} rejected records deleted; identities and click ids cleared"
    )
    if files or models:
        summary += f"; {files} output file(s) rewritten without them, {models} model(s) removed"
    if counts["conversions_sent_kept"]:
        summary += (f"; {counts['conversions_sent_kept']} conversion(s) already sent to ad "
                    "platforms are kept (erase them there too)")
    return summary


def audit_hash(value: str) -> str:
    """What the erasure record keeps of the person: HMAC-SHA256 under
    `$LEADLOOP_ERASURE_KEY` (then whoever holds the key can tell whether someone was erased),
    or under a random key that is thrown away (then nobody can)."""
    key = os.environ.get(ERASURE_KEY_ENV, "").encode() or secrets.token_bytes(32)
    return "hmac-sha256:" + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()


def _traces(session: Session, ids: list[int]) -> set[str]:
    """The erased leads' identity hashes, click ids and any identity left in their attributes
    (stores synced before attributes were screened): what payload files and models can hold."""
    from leadloop.identity import identity_kind

    out: set[str] = set()
    for row in session.execute(select(Lead).where(Lead.id.in_(ids))).scalars():  # type: ignore[union-attr]
        out.update(v for c in (*_IDENTITY, *CLICK_ID_FIELDS) if (v := getattr(row, c)))
        out.update(str(v).strip() for k, v in (row.attributes or {}).items()
                   if identity_kind(k, v) is not None)
    return {t for t in out if len(t) >= 6}  # a short value would match unrelated text


def output_dirs(ctx: Context, session: Session) -> list[Path]:
    """Every folder leadloop writes lead data to: the report folder (where the demo also puts
    payloads), each file destination's folder, and every `--out` a run recorded."""
    from leadloop.jobs import OUT_DIR_KEY

    s = ctx.settings
    dirs = [s.resolve_path(s.report.out_dir), *(s.resolve_path(folder)
                                                for d in s.destinations.values()
                                                for folder in d.file_dirs())]
    if ctx.out_dir:
        dirs.append(Path(ctx.out_dir))
    for counts in session.execute(select(col(JobRun.counts))).scalars():
        if isinstance(counts, dict) and counts.get(OUT_DIR_KEY):
            dirs.append(Path(counts[OUT_DIR_KEY]))
    unique = {d.resolve(): None for d in dirs if d.is_dir()}
    return list(unique)


_TEXT_SUFFIXES = (".json", ".jsonl", ".csv", ".txt", ".tsv", ".html")
_ERASED = "<erased>"


def erase_from_files(dirs: Iterable[Path], traces: set[str]) -> int:
    """Rewrite every text file under `dirs` that holds a trace: a JSON list item or CSV row
    holding one is dropped (a request body loses that person's conversion), any other
    occurrence is replaced. Returns the number of files rewritten."""
    if not traces:
        return 0
    pattern = re.compile("|".join(re.escape(t) for t in sorted(traces, key=len, reverse=True)))
    rewritten = 0
    for folder in dirs:
        for path in folder.rglob("*"):
            if not path.is_file() or path.suffix.lower() not in _TEXT_SUFFIXES:
                continue
            try:
                text = path.read_text(encoding="utf-8", errors="surrogateescape")
            except OSError:
                continue
            if not pattern.search(text):
                continue
            path.write_text(_without(text, path.suffix.lower(), pattern), encoding="utf-8",
                            errors="surrogateescape")
            rewritten += 1
    return rewritten


def _without(text: str, suffix: str, pattern: re.Pattern[str]) -> str:
    if suffix == ".json":
        try:
            return json.dumps(_prune(json.loads(text), pattern), indent=2) + "\n"
        except ValueError:
            pass
    if suffix in (".csv", ".tsv", ".jsonl"):
        lines = text.splitlines(keepends=True)
        head = lines[:1] if suffix != ".jsonl" else []
        return "".join(head + [ln for ln in lines[len(head):] if not pattern.search(ln)])
    return pattern.sub(_ERASED, text)


def _prune(value: Any, pattern: re.Pattern[str]) -> Any:
    if isinstance(value, list):
        return [_prune(v, pattern) for v in value
                if not pattern.search(json.dumps(v, ensure_ascii=False))]
    if isinstance(value, dict):
        return {k: _prune(v, pattern) for k, v in value.items()}
    if isinstance(value, str) and pattern.search(value):
        return _ERASED
    return value


def erase_from_models(ctx: Context, traces: set[str]) -> int:
    """Remove each model artifact that holds a trace (models trained before attributes were
    screened could embed an e-mail as a category). Its card stays, with no model chosen and
    the reason, so scoring falls back to the stage values until the retrain job runs."""
    from leadloop.scoring.registry import models_dir

    d = models_dir(ctx.settings)
    if not traces or not d.is_dir():
        return 0
    needles = [t.encode() for t in traces]
    removed = 0
    for artifact in d.glob("*.skops"):
        if not _holds(artifact, needles):
            continue
        artifact.unlink()
        removed += 1
        card_path = d / f"{artifact.stem}.json"
        if card_path.is_file():
            card = json.loads(card_path.read_text())
            card.update(artifact=None, artifact_sha256=None, chosen=None,
                        fallback_reason="removed by `leadloop forget`: it held personal data "
                                        "of an erased person; the retrain job trains a new one")
            card_path.write_text(json.dumps(card, indent=2) + "\n")
    return removed


def _holds(artifact: Path, needles: list[bytes]) -> bool:
    """Whether a skops artifact (a zip) holds any needle, in any member, compressed or not."""
    try:
        with zipfile.ZipFile(artifact) as z:
            for name in z.namelist():
                data = z.read(name)
                if any(n in data for n in needles) or any(
                        n.decode().encode("utf-32-le") in data for n in needles):
                    return True
    except (zipfile.BadZipFile, OSError):
        data = artifact.read_bytes()
        return any(n in data for n in needles)
    return False


def _compact_store(ctx: Context) -> None:
    """SQLite keeps deleted content in free pages and the write-ahead log: with secure_delete
    (see store.make_engine) freed pages are zeroed; checkpointing empties the log."""
    if ctx.engine.dialect.name == "sqlite":
        with ctx.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


def _delete(session: Session, stmt: Any) -> int:
    return int(session.execute(stmt).rowcount or 0)  # type: ignore[attr-defined]


def erased_crm_ids(session: Session, source: str, crm_ids: Iterable[str]) -> set[str]:
    """Which of these CRM ids belong to erased leads.

    Whether the source has any erased lead is asked first (one probe of the partial index
    `ix_lead_erased`, 0.1-0.3 ms): most stores have none, and the keyed read of a sync page's
    200 ids cost 1.1 ms (SQLite, 100,000 leads), mostly in building and binding the IN list.
    Asked each time, so an erasure committed while a sync runs holds from its next page on."""
    if not session.execute(select(exists().where(
            col(Lead.source) == source, col(Lead.status) == LeadStatus.erased))).scalar():
        return set()
    ids = list(set(crm_ids))
    out: set[str] = set()
    for i in range(0, len(ids), 5000):
        out.update(session.execute(select(col(Lead.crm_id)).where(
            col(Lead.source) == source, col(Lead.status) == LeadStatus.erased,
            among(session, Lead.crm_id, ids[i : i + 5000]),
        )).scalars())
    return out


def drop_erased(session: Session, source: str, page: Page) -> Page:
    """The page without the records of erased people: an erasure outlives the CRM record, so a
    later sync must not bring the person's identity, events or stages back."""
    refs = ({x.crm_id for x in page.leads} | {x.crm_id for x in page.stages}
            | {x.crm_id for x in page.events})
    erased = erased_crm_ids(session, source, refs) if refs else set()
    if not erased:
        return page
    return replace(
        page,
        leads=[x for x in page.leads if x.crm_id not in erased],
        stages=[x for x in page.stages if x.crm_id not in erased],
        events=[x for x in page.events if x.crm_id not in erased],
        rejects=[r for r in page.rejects if r.record_ref not in erased],
    )
