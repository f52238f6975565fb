"""jspec.training.pretrain: training lowers the loss; an interrupted run resumes to the same parameters."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from jspec.models import ModelConfig, Transformer
from jspec.training.pretrain import TrainConfig, train

CONFIG = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=64)


def _streams():
    # A learnable toy language: repeated short patterns with noise.
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 32, (8, 6))
    pieces = [patterns[i] if rng.random() > 0.1 else rng.integers(0, 32, 6) for i in rng.integers(0, 8, 4000)]
    stream = np.concatenate(pieces).astype(np.int32)
    return stream[:20_000], stream[20_000:]


def _params(model):
    return jax.tree.leaves(nnx.state(model))


def test_training_lowers_held_out_loss(tmp_path):
    train_stream, held = _streams()
    config = TrainConfig(
        steps=60, batch_size=8, seq_len=24, learning_rate=3e-3, warmup_steps=5, eval_every=30, eval_batches=4, checkpoint_every=60
    )
    model = Transformer(CONFIG, rngs=nnx.Rngs(0))
    before = _params(model)
    _, history = train(model, train_stream, held, config, str(tmp_path / "ckpt"), progress=False, log=lambda s: None)
    assert [h["step"] for h in history] == [30, 60]
    assert history[-1]["held_out_loss"] < np.log(32) - 0.5  # well below a uniform guess
    assert history[-1]["held_out_loss"] < history[0]["held_out_loss"]
    for a, b in zip(before, _params(model)):  # the caller's model is untouched (not donated)
        np.testing.assert_array_equal(a, b)


def test_interrupted_then_resumed_run_equals_uninterrupted(tmp_path):
    train_stream, held = _streams()
    config = TrainConfig(steps=10, batch_size=4, seq_len=16, warmup_steps=2, eval_every=5, eval_batches=2, checkpoint_every=3)
    quiet = dict(progress=False, log=lambda s: None)
    full, full_history = train(Transformer(CONFIG, rngs=nnx.Rngs(1)), train_stream, held, config, str(tmp_path / "a"), **quiet)

    # Interrupted after 7 steps: the last checkpoint is step 6, so step 7 is redone on resume.
    directory = str(tmp_path / "b")
    train(Transformer(CONFIG, rngs=nnx.Rngs(1)), train_stream, held, config, directory, stop_after=7, **quiet)
    logs = []
    resumed, resumed_history = train(
        Transformer(CONFIG, rngs=nnx.Rngs(99)), train_stream, held, config, directory, progress=False, log=logs.append
    )
    assert logs[0].startswith("resumed from step 6")
    for a, b in zip(_params(full), _params(resumed)):
        np.testing.assert_array_equal(a, b)
    assert resumed_history == full_history


@pytest.mark.parametrize("field, value", [("steps", 0), ("learning_rate", 0.0), ("warmup_steps", 10)])
def test_bad_train_config_raises(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{"steps": 10, field: value})
