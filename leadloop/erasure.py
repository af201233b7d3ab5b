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

from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, or_, select, update
from sqlmodel import Session

from leadloop.context import Context
from leadloop.errors import LeadloopError
from leadloop.identity import IdentityError, hash_email
from leadloop.store import among, session_scope
from leadloop.tables import (
    Conversion,
    ConversionStatus,
    Erasure,
    Lead,
    LeadEvent,
    LeadStatus,
    RejectedRecord,
    Score,
)

if TYPE_CHECKING:
    from leadloop.crm.base import Page

_CLICK_IDS = ("gclid", "gbraid", "wbraid", "fbclid", "fbc", "msclkid", "li_fat_id", "meta_lead_id")
_IDENTITY = ("email_sha256", "email_google_sha256", "phone_e164_sha256", "phone_digits_sha256")


def forget_person(ctx: Context, *, email: str | None, crm_id: str | None) -> str:
    """Erase the person selected by `email` or `crm_id` (exactly one); return a summary line."""
    if bool(email) == bool(crm_id):
        raise LeadloopError("give exactly one of --email or --crm-id")
    source = ctx.settings.crm.source_name
    if email:
        try:
            plain, google = hash_email(email)
        except IdentityError as exc:
            raise LeadloopError(f"--email: {exc}") from None
        selector = f"email_sha256:{plain}"
        match = or_(Lead.email_sha256 == plain, Lead.email_google_sha256 == google)  # type: ignore[arg-type]
        who = f"e-mail sha256 {plain[:12]}…"
    else:
        selector = f"crm_id:{source}:{crm_id}"
        match = (Lead.source == source) & (Lead.crm_id == crm_id)  # type: ignore[arg-type]
        who = f"{source} record {crm_id}"
    now = ctx.now()
    with session_scope(ctx.engine) as session:
        found = session.execute(select(Lead.id, Lead.source, Lead.crm_id).where(match)).all()
        ids = [row.id for row in found]
        if ids:  # leads merged into this person are the same person
            merged = session.execute(
                select(Lead.id, Lead.source, Lead.crm_id).where(Lead.merged_into_id.in_(ids))  # type: ignore[union-attr]
            ).all()
            found += [m for m in merged if m.id not in ids]
            ids = [row.id for row in found]
        counts = {"leads": len(ids), "events": 0, "scores": 0, "conversions_deleted": 0,
                  "conversions_sent_kept": 0, "rejected_records": 0}
        if ids:
            counts["events"] = _delete(session, delete(LeadEvent).where(LeadEvent.lead_id.in_(ids)))  # type: ignore[attr-defined]
            counts["scores"] = _delete(session, delete(Score).where(Score.lead_id.in_(ids)))  # type: ignore[attr-defined]
            counts["conversions_deleted"] = _delete(session, delete(Conversion).where(
                Conversion.lead_id.in_(ids),  # type: ignore[attr-defined]
                Conversion.status != ConversionStatus.sent,
            ))
            counts["conversions_sent_kept"] = len(session.execute(
                select(Conversion.id).where(Conversion.lead_id.in_(ids))  # type: ignore[attr-defined]
            ).all())
            for src in {row.source for row in found}:
                refs = [row.crm_id for row in found if row.source == src]
                counts["rejected_records"] += _delete(session, delete(RejectedRecord).where(
                    RejectedRecord.source == src, RejectedRecord.record_ref.in_(refs)  # type: ignore[attr-defined]
                ))
            cleared = {col: None for col in (*_IDENTITY, *_CLICK_IDS, "landing_page")}
            session.execute(
                update(Lead).where(Lead.id.in_(ids))  # type: ignore[union-attr]
                .values(**cleared, attributes={}, status=LeadStatus.erased, updated_at=now)
            )
        session.add(Erasure(requested_at=now, selector=selector, leads=len(ids), counts=counts))
    if not ids:
        return f"no lead matched {who}; the request is recorded"
    summary = (
        f"erased {counts['leads']} lead(s) for {who}: {counts['events']} events, "
        f"{counts['scores']} scores, {counts['conversions_deleted']} unsent conversions and "
        f"{counts['rejected_records']} rejected records deleted; identities and click ids cleared"
    )
    if counts["conversions_sent_kept"]:
        summary += (f"; {counts['conversions_sent_kept']} conversion(s) already sent to ad "
                    "platforms are kept (erase them there too)")
    return summary


def _delete(session: Session, stmt: Any) -> int:
    return int(session.execute(stmt).rowcount or 0)  # type: ignore[attr-defined]


def erased_crm_ids(session: Session, source: str, crm_ids: Iterable[str]) -> set[str]:
    """Which of these CRM ids belong to erased leads."""
    ids = list(set(crm_ids))
    out: set[str] = set()
    for i in range(0, len(ids), 5000):
        out.update(session.execute(select(Lead.crm_id).where(
            Lead.source == source, Lead.status == LeadStatus.erased,
            among(session, Lead.crm_id, ids[i : i + 5000]),
        )).scalars())
    return out


def drop_erased(session: Session, source: str, page: Page) -> Page:
    """The page without the records of erased people: an erasure outlives the CRM record, so a
    later sync must not bring the person's identity, events or stages back."""
    refs = {x.crm_id for x in (*page.leads, *page.stages, *page.events)}
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
