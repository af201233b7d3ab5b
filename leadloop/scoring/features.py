"""Lead → feature frame, where every feature declares when it becomes known.

A lead is scored at a *prediction moment*, defined the same way when training and when
scoring (see `model.py`): a fixed age after creation (a landmark: 0, 1, 3, 7, … days) at which
the lead had not converted yet, with its age as a feature; in snapshot mode (an export without
creation or conversion times) the export itself. Only what was known by then is used:

* `created`: fields the CRM has from the lead's creation (attribution, click ids, creation
  hour/weekday, lead attributes);
* `moment`: the lead's age at the moment (`age_days`);
* `event:<name>`: a micro-conversion flag, counted only for events at or before the moment;
* `after_contact`: filled in after sales contact (the lead's stage, the `[model] leaky_fields`,
  attributes named like a stage property). These are never used: asking for one explicitly in
  `[model] features` raises `LeakageError`, and `check_known_at` refuses any frame in which a
  value became known after its lead's prediction moment.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from sqlalchemy import select
from sqlalchemy.engine import Engine

from leadloop.config import Settings
from leadloop.errors import LeakageError
from leadloop.frames import SharedStrings, read_frame
from leadloop.store import id_chunks
from leadloop.tables import Lead, LeadEvent, LeadStatus

MISSING = "(missing)"
CATEGORY_COLUMNS = ("utm_source", "utm_medium", "utm_campaign", "landing_page", "country")
CLICK_FLAGS: dict[str, tuple[str, ...]] = {
    "has_google_click": ("gclid", "gbraid", "wbraid"),
    "has_meta_click": ("fbclid", "fbc"),
    "is_meta_lead_ad": ("meta_lead_id",),
    "has_microsoft_click": ("msclkid",),
    "has_linkedin_click": ("li_fat_id",),
}
ATTRIBUTE_PREFIX = "attr_"
MICRO_PREFIX = "micro_"
_LEAD_COLUMNS = ("id", "created_at", *CATEGORY_COLUMNS,
                 *sorted({c for cols in CLICK_FLAGS.values() for c in cols}), "attributes")


@dataclass(frozen=True)
class Feature:
    """One model input: its column name, type, and when its value becomes known."""

    name: str
    kind: Literal["category", "numeric"]
    known_at: str  # "created" | "moment" | "event:<micro name>" | "after_contact"

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "kind": self.kind, "known_at": self.known_at}


AGE_FEATURE = Feature("age_days", "numeric", "moment")


@dataclass
class LeadData:
    """Lead rows (index lead_id) and their events, as read from the store.

    `leads` holds created_at, the category columns, the click-id columns as presence only (1.0
    or NaN: the model and the reports use whether a click id exists, never its value), and each
    CRM attribute as a column `attr_<key>`."""

    leads: pd.DataFrame
    events: pd.DataFrame  # lead_id, name, occurred_at
    _named: dict[str, pd.DataFrame] = field(default_factory=dict, init=False, repr=False,
                                            compare=False)

    def events_named(self, name: str) -> pd.DataFrame:
        """The events called `name`: found once, not once per batch of leads scored."""
        if name not in self._named:
            self._named[name] = self.events[self.events["name"] == name]
        return self._named[name]

    def attributes(self) -> pd.DataFrame:
        """The CRM attributes under their own names."""
        cols = [c for c in self.leads.columns if c.startswith(ATTRIBUTE_PREFIX)]
        return self.leads[cols].rename(columns=lambda c: c.removeprefix(ATTRIBUTE_PREFIX))


_CLICK_COLUMNS = sorted({c for cols in CLICK_FLAGS.values() for c in cols})


def _compact_leads(part: pd.DataFrame, shared: SharedStrings) -> pd.DataFrame:
    for col in _CLICK_COLUMNS:  # selected as "is present": the values are never needed here
        part[col] = np.where(part[col].astype(bool), 1.0, np.nan)
    attrs = pd.DataFrame.from_records([a or {} for a in part.pop("attributes")], index=part.index)
    for key in attrs.columns:
        part[ATTRIBUTE_PREFIX + str(key)] = shared.column(attrs[key])
    return part


def load_lead_data(engine: Engine, statuses: tuple[LeadStatus, ...] = (LeadStatus.active,),
                   ids: Collection[int] | None = None) -> LeadData:
    """Leads of `statuses` (only `ids` when given) and their events, in compact frames."""
    lead = Lead.__table__  # type: ignore[attr-defined]
    ev = LeadEvent.__table__  # type: ignore[attr-defined]
    lead_parts, event_parts = [], []
    with engine.connect() as conn:
        for part in id_chunks(ids):
            lead_stmt = select(*[lead.c[c].is_not(None).label(c) if c in _CLICK_COLUMNS
                                 else lead.c[c] for c in _LEAD_COLUMNS]).where(
                lead.c.status.in_(list(statuses)))
            ev_stmt = select(ev.c.lead_id, ev.c.name, ev.c.occurred_at)
            if part is not None:
                lead_stmt = lead_stmt.where(lead.c.id.in_(part))
                ev_stmt = ev_stmt.where(ev.c.lead_id.in_(part))
            lead_parts.append(read_frame(conn, lead_stmt, _LEAD_COLUMNS, times=["created_at"],
                                         convert=_compact_leads))
            event_parts.append(read_frame(conn, ev_stmt, ["lead_id", "name", "occurred_at"],
                                          times=["occurred_at"]))
    leads = pd.concat(lead_parts) if len(lead_parts) > 1 else lead_parts[0]
    leads = leads.set_index("id")
    leads.index.name = "lead_id"
    events = pd.concat(event_parts, ignore_index=True) if len(event_parts) > 1 else event_parts[0]
    events = events[events["lead_id"].isin(leads.index)]
    return LeadData(leads=leads, events=events)


def snapshot_reason(settings: Settings, data: LeadData, macro_at: pd.Series) -> str | None:
    """Why the store holds a snapshot export (its times are stand-ins), or None: the config says
    so (`Settings.snapshot_export`), or the data do (most conversions stamped at the lead's
    creation: the export records whether a lead converted, not when). Scoring and validation
    both ask this, so a snapshot is decided the same way for the model and the validator."""
    if settings.snapshot_export:
        return ("the export has no creation time ([crm.csv] created_column is not set): every "
                "lead carries the file's time, so no lead has an age or a conversion time")
    converted = macro_at.reindex(data.leads.index).dropna()
    if len(converted) >= 10:
        share = float((converted == data.leads.loc[converted.index, "created_at"]).mean())
        if share >= 0.5:
            return (f"{share:.0%} of the conversions are stamped at the lead's creation time: the "
                    "export records whether a lead converted, not when")
    return None


def _post_contact_names(settings: Settings) -> set[str]:
    crm = settings.crm
    stage_fields = {s.field for s in settings.stages if s.field}
    return {*settings.model.leaky_fields, crm.lead_stage_property, crm.deal_stage_property,
            *stage_fields, "current_stage"}


def _looks_numeric(values: pd.Series) -> bool:
    """At least 95 % of the present values parse as numbers (and none is a bool)."""
    present = values.dropna()
    if present.empty:
        return False
    if isinstance(present.dtype, pd.StringDtype):
        # Texts only, and an attribute repeats a few: each distinct text is parsed once,
        # weighted by how often it occurs (0.1 s a column of 100,000 leads, parsed one by one).
        counts = present.value_counts(sort=False)
        parsed = pd.to_numeric(counts.index.to_series(), errors="coerce").notna().to_numpy()
        return bool(counts.to_numpy()[parsed].sum() >= 0.95 * len(present))
    if present.map(lambda v: isinstance(v, bool)).any():
        return False
    parsed = pd.to_numeric(present, errors="coerce")
    return bool(parsed.notna().mean() >= 0.95)


def micro_event_names(settings: Settings) -> dict[str, str]:
    """Configured micro-conversion name → the `LeadEvent.name` that records it: the `event`
    type when given, else the micro-conversion's own name (connectors record a date property
    such as HubSpot's `ll_pricing_view_date` as an event named after the micro-conversion).
    `expr` micro-conversions have no time and are left to the validation."""
    return {m.name: (m.event or m.name) for m in settings.micro_conversions if not m.expr}


def resolve_features(settings: Settings, data: LeadData, *, with_age: bool = True
                     ) -> list[Feature]:
    """The features this configuration and data allow, each with its known-at (`age_days`
    unless `with_age` is false: a snapshot has no ages).

    Raises LeakageError when `[model] features` asks for a field known only after contact.
    """
    leaky = _post_contact_names(settings)
    wanted = settings.model.features
    if wanted:
        refused = sorted(set(wanted) & leaky)
        if refused:
            raise LeakageError(
                f"config key model.features: {', '.join(refused)} known only after sales contact "
                "(a stage or a [model] leaky_fields entry); a model using it would see the answer",
                hint="remove it from model.features",
            )
    feats = [Feature(c, "category", "created") for c in CATEGORY_COLUMNS]
    feats += [Feature(f, "numeric", "created") for f in CLICK_FLAGS]
    feats += [Feature("created_hour", "numeric", "created"),
              Feature("created_weekday", "category", "created")]
    if with_age:
        feats.append(AGE_FEATURE)
    attrs = data.attributes()
    for key in sorted(attrs.columns):
        if key in leaky or (wanted is not None and key not in wanted):
            continue
        kind: Literal["category", "numeric"] = "numeric" if _looks_numeric(attrs[key]) else "category"
        feats.append(Feature(ATTRIBUTE_PREFIX + key, kind, "created"))
    for micro, event in micro_event_names(settings).items():
        feats.append(Feature(MICRO_PREFIX + micro, "numeric", f"event:{event}"))
    return feats


def build_features(data: LeadData, features: list[Feature], moments: pd.Series
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The feature frame for the leads of `moments` (index lead_id), and when each value became
    known (same shape; NaT where the value is missing). Micro flags count only events at or
    before the lead's moment; `age_days` is the moment's distance from the lead's creation."""
    leads = data.leads.loc[moments.index]
    created = leads["created_at"]
    x = pd.DataFrame(index=leads.index)
    known = pd.DataFrame(index=leads.index)
    for f in features:
        if f.known_at == "after_contact":
            raise LeakageError(f"feature {f.name} is known only after sales contact; refused")
        if f.known_at.startswith("event:"):
            name = f.known_at.removeprefix("event:")
            ev = data.events_named(name)
            ev = ev[ev["lead_id"].isin(leads.index)]
            # compared as datetime arrays (`to_numpy` made object arrays of Timestamps)
            before = ev[ev["occurred_at"].array <= moments.reindex(ev["lead_id"]).array]
            first = before.groupby("lead_id")["occurred_at"].min()
            x[f.name] = leads.index.isin(first.index).astype(float)
            known[f.name] = first.reindex(leads.index)
            continue
        if f.known_at == "moment":
            x[f.name] = (moments - created).dt.total_seconds().to_numpy() / 86400.0
            known[f.name] = moments
            continue
        if f.name in CATEGORY_COLUMNS:
            col = leads[f.name]
        elif f.name in CLICK_FLAGS:
            cols = list(CLICK_FLAGS[f.name])
            col = leads[cols].notna().any(axis=1).astype(float)
        elif f.name == "created_hour":
            col = created.dt.hour.astype(float)
        elif f.name == "created_weekday":
            col = created.dt.day_name()
        elif f.name.startswith(ATTRIBUTE_PREFIX):
            col = leads[f.name] if f.name in leads else pd.Series(np.nan, index=leads.index)
        else:
            raise LeakageError(f"feature {f.name} has no declared source; refused")
        x[f.name] = _coerce(col, f.kind)
        known[f.name] = created.where(col.notna())
    check_known_at(known, moments)
    return x, known


def _coerce(col: pd.Series, kind: str) -> pd.Series:
    if kind == "numeric":
        return pd.to_numeric(col, errors="coerce").astype(float)
    return col.astype("string").fillna(MISSING).astype(object)


def check_known_at(known: pd.DataFrame, moments: pd.Series) -> None:
    """Refuse (LeakageError) any feature value that became known after its lead's moment."""
    m = moments.reindex(known.index)
    for name in known.columns:
        late = known[name].notna() & (known[name] > m)
        if late.any():
            example = late.idxmax()
            raise LeakageError(
                f"feature {name} is known after the prediction moment for {int(late.sum())} "
                f"lead(s) (e.g. lead {example}); refusing to train or score on it"
            )


def frame_for(x: pd.DataFrame, features: list[Feature]) -> pd.DataFrame:
    """Columns in the model's order, with the types its pipeline expects."""
    out = pd.DataFrame(index=x.index)
    for f in features:
        col = x[f.name] if f.name in x else pd.Series(np.nan, index=x.index)
        out[f.name] = _coerce(col, f.kind)
    return out
