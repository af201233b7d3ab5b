"""The model card: what a training chose, measured and wrote, as a typed record.

Each training writes one card as `<version>.json` under `[model] dir` (see `registry.py`). The
JSON keeps the format cards have always had: the fields below in this order, `model` only when
candidates were evaluated, `artifact_sha256` only when an artifact was written. A card read from
disk keeps the keys this version does not know (written by an older or newer leadloop) in
`extra`, and the ones it lacks are absent again when it is written back out, so every model
folder written so far still loads and reads the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

# Written only when set (a card without them never had the key).
_ONLY_WHEN_SET = ("model", "artifact_sha256")


@dataclass
class ModelCard:
    version: str
    created_at: str = ""
    chosen: str | None = None  # the shipped candidate; None: fallback to the stage values
    fallback_reason: str | None = None
    macro_stage: str | None = None
    horizon_days: int | None = None
    mode: str | None = None  # "landmark" or "snapshot" (older cards: absent)
    mode_reason: str | None = None
    landmark_days: list[int] = field(default_factory=list)
    data_window: dict[str, Any] = field(default_factory=dict)  # start, end (ISO 8601)
    counts: dict[str, Any] = field(default_factory=dict)  # n, positives, decided, dropped, ...
    features: list[dict[str, str]] = field(default_factory=list)  # name, kind, known_at
    metrics: dict[str, float] | None = None  # the shipped model on the evaluation rows
    baseline: dict[str, float] | None = None
    candidates: dict[str, float] | None = None
    split: str | None = None
    candidate_metrics: dict[str, float] | None = None
    calibration_method: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None
    selection: str | None = None
    metrics_at_creation: dict[str, Any] | None = None
    calibration: list[dict[str, Any]] = field(default_factory=list)
    calibration_by_age: list[dict[str, Any]] = field(default_factory=list)
    lift_by_decile: list[dict[str, Any]] = field(default_factory=list)
    permutation_importance: list[dict[str, Any]] = field(default_factory=list)
    suspected_leakage: list[dict[str, Any]] = field(default_factory=list)
    strongest_feature: dict[str, Any] | None = None
    value_bands: list[dict[str, Any]] = field(default_factory=list)
    macro_value: float = 0.0
    macro_value_source: str | None = None
    currency: str | None = None
    library_versions: dict[str, str] = field(default_factory=dict)
    config_hash: str | None = None
    inputs: str | None = None
    model: str | None = None  # the candidate measured (chosen only if it passed the gate)
    artifact: str | None = None
    artifact_sha256: str | None = None
    # keys of the JSON this version does not know; the known ones it lacked (None: a card
    # made here, whose `_ONLY_WHEN_SET` fields are written when set)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    absent: frozenset[str] | None = field(default=None, repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelCard:
        names = {f.name for f in fields(cls)} - {"extra", "absent"}
        return cls(**{k: v for k, v in raw.items() if k in names},
                   extra={k: v for k, v in raw.items() if k not in names},
                   absent=frozenset(names - set(raw)))

    def to_dict(self) -> dict[str, Any]:
        """The card as its JSON holds it."""
        if self.absent is None:
            absent = {n for n in _ONLY_WHEN_SET if getattr(self, n) is None}
        else:
            absent = set(self.absent)
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("extra", "absent", *absent)}
        return {**out, **self.extra}

    @property
    def usable(self) -> bool:
        """A model is in use (not a fallback card)."""
        return bool(self.chosen)
