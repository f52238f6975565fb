"""jspec.training.divergences and .distill: the divergences are right, and distillation lowers
the chosen divergence and raises alpha and tau on held-out data."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jspec.models import ModelConfig, Transformer
from jspec.training.distill import DistillConfig, distill, measure_alpha, measure_divergence, measure_tau
from jspec.training.divergences import DIVERGENCES, acceptance, divergence
from jspec.training.loop import TrainConfig

P = jnp.log(jnp.asarray([0.5, 0.3, 0.2]))
Q = jnp.log(jnp.asarray([0.2, 0.2, 0.6]))


def test_divergences_match_their_definitions():
    p, q = np.exp(np.asarray(P)), np.exp(np.asarray(Q))
    m = (p + q) / 2
    kl = lambda a, b: float(np.sum(a * np.log(a / b)))
    np.testing.assert_allclose(divergence("fkl", P, Q), kl(p, q), rtol=1e-5)
    np.testing.assert_allclose(divergence("rkl", P, Q), kl(q, p), rtol=1e-5)
    np.testing.assert_allclose(divergence("jsd", P, Q), 0.5 * kl(p, m) + 0.5 * kl(q, m), rtol=1e-5)
    np.testing.assert_allclose(divergence("tvd", P, Q), 0.5 * np.abs(p - q).sum(), rtol=1e-5)
    np.testing.assert_allclose(acceptance(P, Q), np.minimum(p, q).sum(), rtol=1e-5)
    for kind in DIVERGENCES:
        assert abs(float(divergence(kind, P, P))) < 1e-6
    assert float(acceptance(P, Q, temperature=0)) == 0.0  # argmax 0 vs 2
    with pytest.raises(ValueError, match="divergence must be one of"):
        divergence("l2", P, Q)


TARGET = ModelConfig(
    vocab_size=32, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=64, tie_embeddings=False
)
DRAFTER = dataclasses.replace(TARGET, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)


@pytest.fixture(scope="module")
def toy():
    graph, state = nnx.split(Transformer(TARGET, rngs=nnx.Rngs(0)))
    target = nnx.merge(graph, jax.tree.map(lambda x: 4 * x if x.ndim == 2 else x, state))  # a peaked, structured target
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 32, 40_000).astype(np.int32)
    held = [rng.integers(0, 32, (8, 24)).astype(np.int32) for _ in range(2)]
    return target, stream, held


PROMPTS = np.random.default_rng(1).integers(0, 32, (64, 8)).astype(np.int32)  # tau needs many rows to be stable


def _taus(target, drafter) -> tuple[float, float]:
    """tau at temperature 1 and 0, Chain(k=3), 64 prompts x 32 new tokens."""
    return tuple(measure_tau(target, drafter, PROMPTS, k=3, temperature=t, max_new_tokens=32) for t in (1.0, 0.0))


CONFIG = TrainConfig(
    steps=40, batch_size=8, seq_len=24, learning_rate=1e-2, warmup_steps=4, eval_every=40, eval_batches=2, checkpoint_every=40
)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_distillation_lowers_the_divergence_and_raises_alpha(toy, kind, tmp_path):
    target, stream, held = toy
    drafter = Transformer(DRAFTER, rngs=nnx.Rngs(1))
    before = measure_divergence(target, drafter, held, kind, 1.0), measure_alpha(target, drafter, held, 1.0)
    trained, history = distill(
        target, drafter, stream, held, CONFIG, DistillConfig(divergence=kind), str(tmp_path), progress=False, log=lambda s: None
    )
    after = history[-1][f"held_out_{kind}"], history[-1]["held_out_alpha"]
    assert after[0] < 0.8 * before[0]
    assert after[1] > before[1] + 0.05


@pytest.mark.slow
@pytest.mark.parametrize("data", ["target", "drafter", "mix"])
def test_distillation_on_generated_data(toy, data, tmp_path):
    target, stream, held = toy
    drafter = Transformer(DRAFTER, rngs=nnx.Rngs(1))
    tau_before = _taus(target, drafter)
    alpha_before = measure_alpha(target, drafter, held, 1.0)
    config = dataclasses.replace(CONFIG, steps=30, eval_every=30, checkpoint_every=30)
    trained, history = distill(
        target,
        drafter,
        stream,
        held,
        config,
        DistillConfig(data=data, prompt_len=8),
        str(tmp_path),
        progress=False,
        log=lambda s: None,
    )
    assert history[-1]["held_out_alpha"] > alpha_before + 0.05
    tau_after = _taus(target, trained)
    assert tau_after[0] > tau_before[0] + 0.2 and tau_after[1] > tau_before[1] + 0.3


@pytest.mark.parametrize(
    "kwargs, name", [(dict(divergence="kl"), "divergence"), (dict(data="web"), "data"), (dict(temperature=0.0), "temperature")]
)
def test_bad_distill_config_raises(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DistillConfig(**kwargs)
