"""After a sync: which configured `crm_values` match nothing the CRM has.

A typo in `[[stages]] crm_values` (or a value the CRM renamed) silently qualifies no lead and
uploads nothing. `unmatched_crm_values` names each configured value that no stored stage change
holds, with the values the store does hold in that field, so the fix is one glance away.

It reads only the store, so it is the same for every connector. The common case costs one
`EXISTS` probe per configured value (a scan that stops at the first match); only a value that
matches nothing pays for listing the field's values.
"""

from __future__ import annotations

from sqlalchemy import exists, func, select
from sqlalchemy.engine import Engine

from leadloop.config import Settings
from leadloop.tables import StageChange, table_of

SHOWN_VALUES = 15  # the most frequent values listed in a warning


def unmatched_crm_values(engine: Engine, settings: Settings) -> list[str]:
    """One warning per configured `crm_values` entry that no stored stage change matches."""
    sc = table_of(StageChange)
    default_fields = (settings.crm.lead_stage_property, settings.crm.deal_stage_property)
    warnings = []
    with engine.connect() as conn:
        for i, stage in enumerate(settings.stages):
            fields = (stage.field,) if stage.field else default_fields
            for value in stage.crm_values:
                hit = conn.execute(select(exists().where(
                    sc.c.field.in_(fields), sc.c.value == value))).scalar()
                if hit:
                    continue
                counts = conn.execute(
                    select(sc.c.value, func.count()).where(sc.c.field.in_(fields))
                    .group_by(sc.c.value).order_by(func.count().desc(), sc.c.value)
                    .limit(SHOWN_VALUES + 1)).all()
                where = " or ".join(repr(f) for f in fields)
                if counts:
                    shown = ", ".join(repr(v) for v, _ in counts[:SHOWN_VALUES])
                    more = ", …" if len(counts) > SHOWN_VALUES else ""
                    have = f"the CRM has {shown}{more}"
                else:
                    have = "the CRM has no stage changes there at all"
                warnings.append(f"stages[{i}].crm_values: {value!r} (stage {stage.name!r}) "
                                f"matched no stage change in {where}; {have}")
    return warnings
