"""What a stage-mapping change would do, before it is saved.

The preview runs the exporter's own outbox build (`leadloop.export.outbox.build_outbox`) for
the edited stages, once with the current config and once with the proposed one, each inside a
transaction that is always rolled back: the numbers are exactly what the next export would
build, and nothing is written. For each destination it counts the conversions that would be
new, the queued (not yet sent) conversions whose value would change, the restatements and
retractions that would be sent, and, on platforms that accept no adjustments, the conversions
already sent that keep their old value. The guardrails are evaluated again on the proposed outbox.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select
from sqlmodel import Session

from leadloop.config import Settings
from leadloop.context import Context
from leadloop.export.outbox import build_outbox
from leadloop.export.registry import DESTINATIONS
from leadloop.report.data import ReportData, load_conversions
from leadloop.tables import Conversion, ConversionKind, ConversionStatus

DUE = (ConversionStatus.pending.value, ConversionStatus.failed.value)
EFFECTS = ("new_conversions", "value_changes", "restatements", "retractions", "not_restated")


@dataclass
class Preview:
    stages: list[str]
    after: dict[str, dict[str, int]]  # destination -> effect -> count, with the change
    before: dict[str, dict[str, int]]  # the same without it (what is due anyway)
    guardrails: list[Any] = field(default_factory=list)

    def added(self, dest: str, effect: str) -> int:
        return self.after.get(dest, {}).get(effect, 0) - self.before.get(dest, {}).get(effect, 0)

    @property
    def destinations(self) -> list[str]:
        return sorted(set(self.after) | set(self.before))

    def total(self, effect: str) -> int:
        return sum(v.get(effect, 0) for v in self.after.values())


def _adjustable(settings: Settings) -> dict[str, frozenset[str]]:
    """Enabled destinations → the revisions their platform takes (restatement, retraction)."""
    out = {}
    for name, cfg in settings.destinations.items():
        if cfg.enabled:
            cls = DESTINATIONS.get(settings.destination_kind(name))
            out[name] = cls.adjustments if cls else frozenset()
    return out


def _effects(ctx: Context, settings: Settings, stages: list[str], data: ReportData | None
             ) -> tuple[dict[str, dict[str, int]], Any]:
    """Build the outbox for `stages` under `settings` in a transaction, count what changed,
    and roll back. Returns the counts and (when `data` is given) the proposed outbox frame."""
    conv = Conversion.__table__  # type: ignore[attr-defined]
    scoped = settings.model_copy(update={"stages": [s for s in settings.stages if s.name in stages]})
    dests = _adjustable(settings)
    counts: dict[str, dict[str, int]] = {}
    frame = None
    with Session(ctx.engine) as session:
        try:
            max_id = session.execute(select(func.max(conv.c.id))).scalar() or 0
            before = {r.id: r.value for r in session.execute(
                select(conv.c.id, conv.c.value).where(conv.c.stage.in_(stages),
                                                     conv.c.status.in_(DUE)))}
            takes: dict[str, bool | frozenset[str]] = dict(dests)  # build_outbox's parameter type
            build_outbox(session, scoped, takes, ctx.now())
            for stage in scoped.stages:
                for dest in stage.destinations:
                    if dest not in dests:
                        continue
                    per = counts.setdefault(dest, dict.fromkeys(EFFECTS, 0))
                    if "restatement" not in dests[dest] and isinstance(stage.value, float):
                        per["not_restated"] += session.execute(
                            select(func.count()).where(
                                conv.c.destination == dest, conv.c.stage == stage.name,
                                conv.c.status == ConversionStatus.sent.value,
                                conv.c.kind == ConversionKind.conversion.value,
                                func.abs(conv.c.value - Decimal(str(stage.value))) >= Decimal("0.01"))
                        ).scalar() or 0
            rows = session.execute(
                select(conv.c.id, conv.c.destination, conv.c.kind, conv.c.status, conv.c.value)
                .where(conv.c.stage.in_(stages), conv.c.status.in_(DUE)))
            for r in rows:
                per = counts.setdefault(r.destination, dict.fromkeys(EFFECTS, 0))
                kind = getattr(r.kind, "value", r.kind)
                if kind == ConversionKind.restatement.value:
                    per["restatements"] += 1
                elif kind == ConversionKind.retraction.value:
                    per["retractions"] += 1
                elif r.id > max_id:
                    per["new_conversions"] += 1
                refreshed = r.id in before and before[r.id] != r.value and kind != "retraction"
                restated = r.id > max_id and kind == ConversionKind.restatement.value
                if refreshed or restated:
                    per["value_changes"] += 1
            if data is not None:
                frame = load_conversions(session.connection(), data.since)
        finally:
            session.rollback()
    return counts, frame


def preview_change(ctx: Context, proposed: Settings, stages: list[str],
                   data: ReportData | None = None) -> Preview:
    """The effect of replacing `ctx.settings` by `proposed` on `stages` (names in `proposed`)."""
    from leadloop.report.guardrails import evaluate_guardrails

    known = {s.name for s in ctx.settings.stages}
    before, _ = _effects(ctx, ctx.settings, [s for s in stages if s in known], None)
    after, frame = _effects(ctx, proposed, stages, data)
    guardrails = []
    if data is not None and frame is not None:
        guardrails = evaluate_guardrails(replace(data, conversions=frame), proposed)
    return Preview(stages=stages, after=after, before=before, guardrails=guardrails)
