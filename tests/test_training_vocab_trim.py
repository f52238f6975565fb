"""jspec.training.vocab_trim: a trimmed drafter is exact over its kept tokens, keeps speculative
decoding lossless, saves and loads, and lowers the weights a draft step reads."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jspec
from jspec.models import causal_mask, init_cache
from jspec.sampling import Sampling, warp
from jspec.training.vocab_trim import (
    memory_bound_speedup,
    most_frequent,
    target_generation_counts,
    token_counts,
    trim_drafter,
    weights_read_per_token,
)

from conftest import TINY, chi_square_pvalue, forward, perturbed, random_model


def _logits(model, tokens):
    b, t = tokens.shape
    return forward(model, tokens, jnp.broadcast_to(jnp.arange(t), (b, t)), causal_mask(b, t), init_cache(model.config, b, t))[0]


@pytest.mark.parametrize("tied", [True, False])
def test_trimmed_logits_equal_full_logits_on_kept_tokens(tied):
    drafter = random_model(dataclasses.replace(TINY, tie_embeddings=tied), seed=3)
    keep = np.array([0, 5, 7, 20, 63])
    trimmed = trim_drafter(drafter, keep)
    tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, TINY.vocab_size)
    full, cut = np.asarray(_logits(drafter, tokens)), np.asarray(_logits(trimmed, tokens))
    np.testing.assert_allclose(cut[..., keep], full[..., keep], rtol=1e-5, atol=1e-5)
    assert np.isneginf(np.delete(cut, keep, axis=-1)).all()
    q = np.asarray(warp(jnp.asarray(cut), Sampling(temperature=1.0)))
    np.testing.assert_allclose(q.sum(-1), 1.0, rtol=1e-5)
    assert (np.delete(q, keep, axis=-1) == 0).all()


def test_counts_and_most_frequent():
    counts = token_counts(np.array([[3, 3, 1, 9], [1, 3, 2, 2]]), 10, lengths=np.array([4, 2]))
    assert counts.tolist() == [0, 2, 0, 3, 0, 0, 0, 0, 0, 1]
    assert most_frequent(counts, 2).tolist() == [1, 3]
    assert most_frequent(counts, 3).tolist() == [1, 3, 9]
    assert most_frequent(counts, 2, always_keep=(0,)).tolist() == [0, 3]
    with pytest.raises(ValueError, match="k must lie"):
        most_frequent(counts, 0)


def test_trimmed_drafter_round_trips_and_reads_fewer_weights(tmp_path):
    target = random_model(TINY, seed=0)
    drafter = random_model(dataclasses.replace(TINY, n_layers=1), seed=1)
    trimmed = trim_drafter(drafter, np.arange(0, 64, 4))
    jspec.models.save(trimmed, tmp_path / "trimmed")
    loaded = jspec.models.load(tmp_path / "trimmed")
    tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, 64)
    np.testing.assert_array_equal(_logits(loaded, tokens), _logits(trimmed, tokens))
    saved = (64 - 16) * TINY.d_model
    assert weights_read_per_token(drafter) - weights_read_per_token(trimmed) == saved
    assert memory_bound_speedup(3.0, 4, trimmed, target) > memory_bound_speedup(3.0, 4, drafter, target)
    with pytest.raises(ValueError, match="distinct token ids"):
        trim_drafter(drafter, np.array([1, 1]))


def test_greedy_speculative_with_trimmed_drafter_equals_target_greedy():
    target = random_model(TINY, seed=5)
    prompts = np.random.default_rng(0).integers(0, 64, (3, 8)).astype(np.int32)
    counts = target_generation_counts(target, prompts, max_new_tokens=24, sampling=Sampling(1.0), rng=jax.random.key(0))
    trimmed = trim_drafter(perturbed(target, 0.2, 1), most_frequent(counts, 24))
    ar = jspec.generate(target, prompts, max_new_tokens=24)
    for verifier in ("sampling", "block"):
        spec = jspec.speculative_generate(target, trimmed, prompts, max_new_tokens=24, strategy=jspec.Chain(3, verifier))
        np.testing.assert_array_equal(spec.tokens, ar.tokens)
        assert float(spec.stats.mean_accepted) > 1.0


SMALL = dataclasses.replace(TINY, vocab_size=4, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)


@pytest.mark.slow
@pytest.mark.parametrize("verifier", ["sampling", "block"])
def test_trimmed_drafter_keeps_the_exact_target_distribution(verifier):
    """First 3 tokens at temperature 1 with a drafter trimmed to 3 of 4 tokens: the target's exact law."""
    target = random_model(SMALL, seed=11, scale=3.0)
    trimmed = trim_drafter(random_model(SMALL, seed=12, scale=3.0), np.array([0, 1, 3]))
    prompt = np.array([[1, 3, 0, 2, 2]], np.int32)
    seqs = np.array(list(itertools.product(range(4), repeat=3)), np.int32)
    full = np.concatenate([np.repeat(prompt, 64, 0), seqs], axis=1)
    probs = np.asarray(warp(_logits(target, jnp.asarray(full)), Sampling(1.0)))
    exact = np.prod([probs[np.arange(64), 4 + i, seqs[:, i]] for i in range(3)], axis=0)
    codes = []
    for seed in range(3):
        out = jspec.speculative_generate(
            target,
            trimmed,
            np.repeat(prompt, 8192, 0),
            max_new_tokens=3,
            strategy=jspec.Chain(2, verifier),
            sampling=Sampling(1.0),
            rng=jax.random.key(seed),
        )
        t = np.asarray(out.tokens)
        codes.append(t[:, 0] * 16 + t[:, 1] * 4 + t[:, 2])
    codes = np.concatenate(codes)
    assert (codes // 16 == 2).any()  # token 2, which the drafter can never propose, is still emitted
    assert chi_square_pvalue(codes, exact) > 1e-3
