"""jspec.methods.early_stop and train/mcsd_early_stop.py: the decision model trains (its loss decreases),
saves and loads with Orbax, and the loaded model drives MultiCandidate; bad thresholds are rejected."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import jspec
from jspec.methods import early_stop as es
from jspec.methods.multi_candidate import MultiCandidate
from train import mcsd_early_stop

from conftest import TINY, random_model


def test_training_script_on_tiny_models_trains_saves_and_loads(tmp_path, capsys):
    target = random_model(TINY, seed=0)
    drafter = random_model(TINY, seed=5)
    jspec.models.save(target, tmp_path / "target")
    jspec.models.save(drafter, tmp_path / "drafter")
    summary = mcsd_early_stop.main(
        [
            "--target",
            str(tmp_path / "target"),
            "--drafter",
            str(tmp_path / "drafter"),
            "--prompt-source",
            "random",
            "--prompts",
            "8",
            "--prompt-len",
            "8",
            "--rounds",
            "4",
            "--batch-size",
            "4",
            "--k-config",
            "2,2,1",
            "--steps",
            "60",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert "held-out accuracy" in capsys.readouterr().out
    assert summary["train_examples"] > 0 and summary["held_out_examples"] > 0
    assert summary["loss_last"] < summary["loss_first"]
    assert 0 <= summary["held_out_accuracy"] <= 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["k_config"] == [2, 2, 1]

    loaded = es.load(tmp_path / "run" / "early_stop")
    assert loaded.threshold == 0.5 and loaded.params["w1"].shape == (len(es.FEATURES), 8)
    hash(MultiCandidate(early_stop=loaded))  # usable as a static jit argument
    with pytest.raises(ValueError, match="already exists"):
        es.save(loaded, tmp_path / "run" / "early_stop")


def test_examples_keep_only_levels_the_walk_reached():
    features = np.arange(2 * 1 * 3 * 4, dtype=np.float32).reshape(2, 1, 3, 4)  # [R, B, L-1, F]
    accepted = np.array([[0], [2]])  # round 0 reached no level >= 1; round 1 accepted 2 drafts
    x, y = mcsd_early_stop.examples(features, accepted)
    np.testing.assert_array_equal(x, features[1, 0, :2])  # levels 1 and 2 of round 1
    np.testing.assert_array_equal(y, [1.0, 0.0])  # level 2 was accepted after level 1, level 3 was not


def test_fit_separates_a_learnable_rule():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, len(es.FEATURES))).astype(np.float32)
    y = (x[:, 0] - x[:, 1] > 0).astype(np.float32)
    params, history = es.fit(x, y, steps=200, learning_rate=3e-2)
    assert history[-1] < 0.5 * history[0]
    assert es.accuracy(params, x, y) > 0.9


def test_level_features_weight_nodes_by_path_probability():
    logits = jnp.log(jnp.array([[[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]]))  # [1, 2, 4]
    f = es.level_features(logits, jnp.log(jnp.array([[0.75, 0.25]])), jnp.array([[True, True]]), depth=2)
    np.testing.assert_allclose(f[0, 0], 0.75 * 0.7 + 0.25 * 0.25, rtol=1e-5)  # max_prob
    np.testing.assert_allclose(f[0, 2], np.log(0.75), rtol=1e-5)  # best path
    assert f[0, 3] == 2 and 0 < f[0, 1] < 1
    only_second = es.level_features(logits, jnp.log(jnp.array([[0.75, 0.25]])), jnp.array([[False, True]]), depth=2)
    np.testing.assert_allclose(only_second[0, 0], 0.25, rtol=1e-5)  # an invalid node does not count


@pytest.mark.parametrize("threshold", [-0.1, 1.5, "0.5", True])
def test_bad_thresholds_raise(threshold):
    with pytest.raises(ValueError, match="threshold"):
        es.ConfidenceStop(threshold)
    with pytest.raises(ValueError, match="threshold"):
        es.EarlyStop.from_params(
            dict(mean=np.zeros(4), scale=np.ones(4), w1=np.zeros((4, 2)), b1=np.zeros(2), w2=np.zeros(2), b2=0.0), threshold
        )


def test_bad_weights_raise():
    with pytest.raises(ValueError, match="weights must hold"):
        es.EarlyStop((("w", (1,), (0.0,)),))
