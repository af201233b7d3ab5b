"""Keep rejected records once: a re-read of the same export must not pile up copies.

A CSV source is read whole on every sync, and the daemon syncs on a schedule, so the same
malformed line or flagged stage is found again each time. A reject is the same one when its
source, object type, record key, stage of the flow and reason all match: it is stored once
(`created_at`: when first seen), and each run that meets it again takes it over
(`job_run_id`: the last run that saw it, whose start is the last time it was seen; that run's
sync note lists it). A record rejected for a new reason gets a row of its own.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from sqlmodel import Session, select

from leadloop.store import among
from leadloop.tables import RejectedRecord

_CHUNK = 1000


def _key(r: RejectedRecord) -> tuple[str, str, str, str, str]:
    return (r.source, r.object_type, r.record_ref, r.flow_stage, r.reason)


def keep_rejects(session: Session, rejects: Sequence[RejectedRecord]) -> None:
    """Add the rejects not already stored; move the stored ones to this run.

    Matched by count: two records of one page with the same key (two leads without an id, say)
    are two rejects, and stay two, not one more on every re-read."""
    new: dict[tuple[str, str, str, str, str], list[RejectedRecord]] = defaultdict(list)
    for r in rejects:
        new[_key(r)].append(r)
    if not new:
        return
    for source in {k[0] for k in new}:
        refs = sorted({k[2] for k in new if k[0] == source})
        for i in range(0, len(refs), _CHUNK):
            stmt = select(RejectedRecord).where(
                RejectedRecord.source == source,
                among(session, RejectedRecord.record_ref, refs[i:i + _CHUNK]))
            for old in session.exec(stmt):
                same = new.get(_key(old))
                if not same:
                    continue
                seen = same.pop()
                if seen.job_run_id is not None:
                    old.job_run_id = seen.job_run_id
                    session.add(old)
    session.add_all(r for group in new.values() for r in group)
