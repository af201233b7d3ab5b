"""Tampered model files: an artifact runs no code, and one that changed is refused."""

from __future__ import annotations

import functools
import json
import stat
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import skops.io as sio

from leadloop.errors import ModelError
from leadloop.scoring import registry
from leadloop.scoring.card import ModelCard
from leadloop.scoring.evaluate import fit_final
from leadloop.scoring.features import Feature
from tests.scoring_helpers import demo_context

FEATURES = [Feature("utm_source", "category", "created"), Feature("visits", "numeric", "created")]


def _data(n: int = 400) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(1)
    x = pd.DataFrame({"utm_source": rng.choice(["google", "facebook", "x"], n),
                      "visits": rng.integers(0, 9, n).astype(float)})
    x.loc[::9, "visits"] = np.nan
    y = (rng.random(n) < 0.1 + 0.05 * x["visits"].fillna(0)).astype(int).to_numpy()
    return x, y


def _register(ctx, model, version: str = "v1") -> ModelCard:
    card = ModelCard(version, created_at="2026-10-01T00:00:00+00:00",
                     library_versions=registry.library_versions())
    registry.register(ctx.settings, card, model)
    return registry.load_card(ctx.settings, version)


@pytest.mark.parametrize("method", ["none", "sigmoid", "isotonic"])
@pytest.mark.parametrize("candidate", ["hist_gradient_boosting", "logistic_regression"])
def test_training_writes_only_trusted_types_and_records_the_hash(sqlite_engine, tmp_path,
                                                                 candidate, method) -> None:
    ctx = demo_context(sqlite_engine, tmp_path)
    x, y = _data()
    model = fit_final(x, y, FEATURES, candidate, method=method)
    card = _register(ctx, model)
    artifact = tmp_path / "models" / card.artifact
    assert card.artifact_sha256 == registry.file_sha256(artifact)
    assert set(sio.get_untrusted_types(file=artifact)) <= registry.TRUSTED_TYPES
    again = registry.load_model(ctx.settings, card)
    np.testing.assert_array_equal(model.predict_proba(x), again.predict_proba(x))
    assert stat.S_IMODE(artifact.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "models" / "v1.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "models").stat().st_mode) == 0o700


def test_an_artifact_that_changed_is_refused_with_one_line(sqlite_engine, tmp_path) -> None:
    ctx = demo_context(sqlite_engine, tmp_path)
    x, y = _data()
    card = _register(ctx, fit_final(x, y, FEATURES, "logistic_regression"))
    artifact = tmp_path / "models" / card.artifact
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))
    with pytest.raises(ModelError) as caught:
        registry.load_model(ctx.settings, card)
    assert "does not match the SHA-256 in its card" in caught.value.message
    assert "\n" not in caught.value.message


def test_a_pipeline_holding_partial_eval_is_refused_even_with_a_matching_hash(
        sqlite_engine, tmp_path) -> None:
    """The issue's probe: a `.skops` whose pipeline holds `functools.partial(eval, …)`, with
    the card's hash updated to match (whoever can write the artifact can write the card)."""
    ctx = demo_context(sqlite_engine, tmp_path)
    marker = tmp_path / "pwned"
    x, y = _data()
    model = fit_final(x, y, FEATURES, "hist_gradient_boosting")
    card = _register(ctx, model)
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    pipeline = model.calibrated_classifiers_[0].estimator if hasattr(
        model, "calibrated_classifiers_") else model  # shipped calibrated or as it is
    pipeline.steps[-1][1]._loss = functools.partial(eval, payload)
    artifact = tmp_path / "models" / card.artifact
    sio.dump(model, artifact)
    card_path = tmp_path / "models" / "v1.json"
    tampered = {**card.to_dict(), "artifact_sha256": registry.file_sha256(artifact)}
    card_path.write_text(json.dumps(tampered))
    with pytest.raises(ModelError, match=r"builtins\.eval.*refusing to load it"):
        registry.load_model(ctx.settings, registry.load_card(ctx.settings, "v1"))
    assert not marker.exists()


def test_a_card_without_a_hash_or_pointing_elsewhere_is_refused(sqlite_engine, tmp_path) -> None:
    ctx = demo_context(sqlite_engine, tmp_path)
    x, y = _data()
    card = _register(ctx, fit_final(x, y, FEATURES, "logistic_regression"))
    with pytest.raises(ModelError, match="records no SHA-256"):
        registry.load_model(ctx.settings, replace(card, artifact_sha256=None))
    with pytest.raises(ModelError, match="outside"):
        registry.load_model(ctx.settings, replace(card, artifact="../elsewhere.skops"))
