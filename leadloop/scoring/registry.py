"""Model artifacts and their JSON model cards under `[model] dir`.

Each training writes `<version>.json` (the card) and, when a model was chosen,
`<version>.skops` (the calibrated pipeline, saved with `skops.io`, which loads without running
arbitrary pickle code). `CURRENT` names the newest card: if that card is a fallback (not enough
data, or no candidate beat the baseline) there is no current model and the stage-value mapping
is used. Loading refuses an artifact written by another scikit-learn minor version (retrain)
and warns on a patch difference; it also refuses one whose SHA-256 is not the one its card
recorded when it was written, or that holds any type beyond skops' defaults and
`TRUSTED_TYPES`. Artifacts, cards and the folder are owner-only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from datetime import datetime
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from leadloop import __version__
from leadloop.config import Settings
from leadloop.context import Context
from leadloop.errors import ModelError
from leadloop.files import private_dir, private_file
from leadloop.scoring.card import ModelCard

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
# Exactly the types beyond skops' own defaults that leadloop's training writes (the
# calibrated HistGradientBoosting and LogisticRegression pipelines of `scoring.evaluate`), and
# nothing else: a prefix such as "builtins." would trust `builtins.eval`, and a tampered
# artifact could then run code through `functools.partial(eval, ...)`. A partial is trusted
# because HistGradientBoosting keeps `partial(check_array, ...)`; its function must itself be a
# trusted type. tests/test_hostile_model.py fails when training starts writing another type.
TRUSTED_TYPES = frozenset({
    "functools.partial",
    "numpy.dtype",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    # the calibrated model keeps its shuffled folds (`calibration.shipped_model`): a splitter
    # holding three numbers, no callable
    "sklearn.model_selection._split.StratifiedKFold",
    "sklearn.utils.validation.check_array",
    # the pipeline's first step, category values → codes: a dict of value lists, no callable
    "leadloop.scoring.evaluate.CategoryCodes",
})


def models_dir(settings: Settings) -> Path:
    return settings.resolve_path(settings.model.dir)


def library_versions() -> dict[str, str]:
    """Installed versions, read from package metadata: reading a card (e.g. to see that the
    scores are current) must not pay for importing scikit-learn."""
    return {"python": platform.python_version(),
            **{name: installed_version(name)
               for name in ("scikit-learn", "numpy", "pandas", "scipy", "skops")},
            "leadloop": __version__}


def config_hash(settings: Settings) -> str:
    """Hash of the configuration that shapes a model (stages, micro-conversions, [model])."""
    part = settings.model_dump(mode="json", include={"stages", "micro_conversions", "model"})
    blob = json.dumps(part, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def new_version(settings: Settings, now: datetime) -> str:
    base = now.strftime("%Y%m%dT%H%M%SZ")
    d = models_dir(settings)
    version, i = base, 1
    while (d / f"{version}.json").exists():
        i += 1
        version = f"{base}-{i}"
    return version


def register(settings: Settings, card: ModelCard, model: Any | None) -> str:
    """Write the artifact (if any) and the card, then point CURRENT at it."""
    d = models_dir(settings)
    private_dir(d)
    version = card.version
    if model is not None:
        import skops.io as sio

        artifact = d / f"{version}.skops"
        with private_file(artifact).open("wb") as f:
            sio.dump(model, f)
        card.artifact = artifact.name
        card.artifact_sha256 = file_sha256(artifact)
    else:
        card.artifact = None
    private_file(d / f"{version}.json").write_text(
        json.dumps(card.to_dict(), indent=2, default=_json_default) + "\n")
    tmp = private_file(d / f".{CURRENT}.tmp")
    tmp.write_text(version + "\n")
    tmp.replace(d / CURRENT)  # atomic: a reader never sees a half-written pointer
    return version


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, datetime | pd.Timestamp):
        return value.isoformat()
    raise TypeError(type(value).__name__)


def _read_card(d: Path, version: str) -> ModelCard:
    path = d / f"{version}.json"
    if not path.is_file():
        raise ModelError(f"no model card {version!r} in {d}", hint="see `leadloop model list`")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"model card {path.name} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("version"), str):
        raise ModelError(f"model card {path.name} is not a model card (no version)")
    return ModelCard.from_dict(raw)


def current_version(settings: Settings) -> str | None:
    pointer = models_dir(settings) / CURRENT
    return pointer.read_text().strip() if pointer.is_file() else None


def current_card(settings: Settings) -> ModelCard | None:
    """The newest model card (a fallback card has `chosen = None` and a `fallback_reason`)."""
    version = current_version(settings)
    return _read_card(models_dir(settings), version) if version else None


def load_card(settings: Settings, version: str | None = None) -> ModelCard:
    version = version or current_version(settings)
    if not version:
        raise ModelError("no model has been trained yet", hint="run `leadloop score` or the "
                         "retrain job")
    return _read_card(models_dir(settings), version)


def list_cards(settings: Settings) -> list[ModelCard]:
    d = models_dir(settings)
    if not d.is_dir():
        return []
    cards = [_read_card(d, p.stem) for p in d.glob("*.json")]
    return sorted(cards, key=lambda c: c.created_at, reverse=True)


def check_versions(card: ModelCard) -> None:
    """Refuse another scikit-learn minor version; warn on a patch difference."""
    saved = card.library_versions.get("scikit-learn", "")
    running = installed_version("scikit-learn")
    if saved == running:
        return
    if saved.split(".")[:2] != running.split(".")[:2]:
        raise ModelError(
            f"model {card.version} was trained with scikit-learn {saved or 'unknown'}, "
            f"this is {running}; its predictions cannot be trusted",
            hint="retrain: `leadloop score` after removing it, or run the retrain job",
        )
    log.warning("model %s was trained with scikit-learn %s, running %s (patch difference)",
                card.version, saved, running)


def load_model(settings: Settings, card: ModelCard) -> Any:
    """Load a card's artifact: only when its SHA-256 is the one the card recorded when it was
    written, and it holds only skops' default types and `TRUSTED_TYPES`."""
    if not card.artifact:
        raise ModelError(f"model card {card.version} has no artifact "
                         f"({card.fallback_reason or 'no model chosen'})")
    check_versions(card)
    d = models_dir(settings)
    path = d / card.artifact
    if path.resolve().parent != d.resolve() or path.suffix != ".skops":
        raise ModelError(f"model card {card.version} names an artifact outside {d}; "
                         "refusing to load it")
    if not path.is_file():
        raise ModelError(f"model artifact {path} is missing")
    expected = card.artifact_sha256
    if not expected:
        raise ModelError(f"model card {card.version} records no SHA-256 of its artifact "
                         "(written by an older leadloop); refusing to load it",
                         hint=f"retrain: delete {d / CURRENT} and run `leadloop score` (it "
                              "trains a new model), or let the scheduled retrain job run")
    if file_sha256(path) != expected:
        raise ModelError(f"model artifact {path.name} does not match the SHA-256 in its card "
                         "(changed since it was trained); refusing to load it")
    import skops.io as sio

    untrusted = sio.get_untrusted_types(file=path)
    foreign = sorted(set(untrusted) - TRUSTED_TYPES)
    if foreign:
        raise ModelError(f"model artifact {path.name} contains types leadloop's training never "
                         f"writes {foreign[:5]}; refusing to load it")
    return sio.load(path, trusted=untrusted)


# -- CLI views ------------------------------------------------------------------------------


def format_model_list(ctx: Context) -> str:
    cards = list_cards(ctx.settings)
    if not cards:
        return f"No models in {models_dir(ctx.settings)} yet."
    current = current_version(ctx.settings)
    lines = [f"{'':1} {'version':<20} {'chosen':<24} {'n':>8} {'pos':>7} {'roc_auc':>8} "
             f"{'baseline':>8}  note"]
    for c in cards:
        m, b = c.metrics or {}, c.baseline or {}
        lines.append(
            f"{'*' if c.version == current else ' ':1} {c.version:<20} "
            f"{c.chosen or '(fallback)':<24} {c.counts['n']:>8} "
            f"{c.counts['positives']:>7} {_f(m.get('roc_auc')):>8} {_f(b.get('roc_auc')):>8}  "
            f"{c.fallback_reason or ''}"
        )
    return "\n".join(lines)


def _f(v: Any, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{digits}f}"


def format_model_card(ctx: Context, version: str | None) -> str:
    c = load_card(ctx.settings, version)
    lines = [f"model {c.version}  created {c.created_at}",
             f"chosen:    {c.chosen or '(none: falling back to the stage values)'}"]
    if c.fallback_reason:
        lines.append(f"why:       {c.fallback_reason}")
    w = c.data_window or {}
    lines += [f"label:     reached {c.macro_stage} within {c.horizon_days} days",
              f"mode:      {c.mode or '-'}: {c.mode_reason or ''}",
              f"data:      {c.counts['n']} leads, {c.counts['positives']} converted, "
              f"{w.get('start')} .. {w.get('end')}",
              f"split:     {c.split or '-'}"]
    for reason, count in (c.counts.get("dropped") or {}).items():
        lines.append(f"dropped:   {count} lead(s): {reason}")
    if c.selection:
        lines.append(f"selection: {c.selection}")
    if c.metrics:
        cand = c.candidate_metrics or {}
        lines.append(f"{'':11}{'shipped':>9} {'candidate':>9} {'baseline':>9}")
        for k in ("roc_auc", "pr_auc", "brier", "log_loss", "ece"):
            lines.append(f"  {k:<9}{_f(c.metrics.get(k), 4):>9} {_f(cand.get(k), 4):>9} "
                         f"{_f((c.baseline or {}).get(k), 4):>9}")
    if c.metrics_at_creation:
        a = c.metrics_at_creation
        lines.append(f"  at creation (age 0, every decided lead of the test period): ROC AUC "
                     f"{a['roc_auc']:.4f} on {a['n']} leads, {a['positives']} converted "
                     "(the overall figure pools the landmark ages; the age alone separates some)")
    if c.calibration_method:
        cm = c.calibration_method
        lines.append(f"calibrated: {cm['method']} ({cm['why']})")
    if c.gate:
        g = c.gate
        lines.append(f"gate:      AUC gain {g['auc_gain']:+.3f} (90 % CI {g['auc_gain_ci'][0]:+.3f}"
                     f" to {g['auc_gain_ci'][1]:+.3f}), Brier skill {g['brier_skill']:+.3f} "
                     f"(90 % CI {g['brier_skill_ci'][0]:+.3f} to {g['brier_skill_ci'][1]:+.3f})"
                     f": {'passed' if g['passed'] else 'failed'}")
    for leak in c.suspected_leakage or []:
        lines.append(f"suspect:   {leak['feature']}: {leak['reason']}")
    if c.calibration_by_age:
        lines.append("calibration by age (days: predicted → observed [95 % CI], n, ROC AUC):")
        lines += [f"  {r['age_days']:>4g}  {r['predicted']:.3f} → {r['observed']:.3f} "
                  f"[{r['observed_ci'][0]:.3f}, {r['observed_ci'][1]:.3f}]  {r['n']}  "
                  f"{_f(r.get('roc_auc'))}"
                  for r in c.calibration_by_age]
    if c.calibration:
        lines.append("calibration (predicted → observed, n):")
        lines += [f"  {r['bin']:<8} {r['predicted']:.3f} → {r['observed']:.3f}  {r['n']}"
                  for r in c.calibration]
    if c.lift_by_decile:
        lines.append("lift by decile: " + "  ".join(f"{r['decile']}:{r['lift']:.2f}"
                                                    for r in c.lift_by_decile))
    if c.permutation_importance:
        lines.append("permutation importance (ROC AUC drop):")
        lines += [f"  {r['feature']:<28} {r['importance']:+.4f}"
                  for r in c.permutation_importance[:10]]
    if c.value_bands:
        lines.append("value bands: " + "  ".join(
            f"{b['band']}≥{b['min_probability']:.3f} ({b['observed_rate']:.1%})"
            for b in c.value_bands))
    lines.append("features:  " + ", ".join(f"{f['name']}@{f['known_at']}" for f in c.features))
    lines.append(f"versions:  {c.library_versions}  config {c.config_hash}")
    return "\n".join(lines)
