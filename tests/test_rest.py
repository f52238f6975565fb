"""The Rest strategy (`jspec.methods.rest`): exact at T=0 on ragged prompts with and without
repeats, the target's law at T=1, and a clear error without a datastore."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_decode import first3_pvalue, unrelated_small_pair

import jspec
from jspec.retrieval import Retrieval, build_datastore

from conftest import PLAIN_PROMPTS, RAGGED_LENGTHS, REPEATING_PROMPTS, TINY, random_model

CORPUS_RNG = np.random.default_rng(1)  # the random documents of the datastores


@pytest.fixture(scope="module")
def target():
    return random_model(TINY, seed=0)


def corpus_for(target, prompts):
    """Random documents plus the target's own greedy continuations of the prompts (so the
    datastore knows what the target will say next, as a datastore of in-domain text does)."""
    out = jspec.generate(target, prompts, prompt_lengths=RAGGED_LENGTHS, max_new_tokens=24)
    docs = [np.concatenate([prompts[i, : RAGGED_LENGTHS[i]], np.asarray(out.tokens[i])]) for i in range(3)]
    return jax.device_put(build_datastore(docs + [CORPUS_RNG.integers(0, 64, 300) for _ in range(4)])), out


@pytest.mark.parametrize("prompts", [REPEATING_PROMPTS, PLAIN_PROMPTS], ids=["repeats", "no-repeats"])
def test_greedy_output_equals_the_target_s(target, prompts):
    datastore, expected = corpus_for(target, prompts)
    out = jspec.speculative_generate(
        target,
        Retrieval(datastore),
        prompts,
        prompt_lengths=RAGGED_LENGTHS,
        max_new_tokens=24,
        strategy=jspec.Rest(size=8, depth=3),
    )
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
    assert float(out.stats.mean_accepted) > 2.0  # the continuations are in the datastore


def test_greedy_output_is_exact_when_the_datastore_knows_nothing(target):
    datastore = jax.device_put(build_datastore([CORPUS_RNG.integers(0, 64, 300)]))
    expected = jspec.generate(target, PLAIN_PROMPTS, prompt_lengths=RAGGED_LENGTHS, max_new_tokens=16)
    out = jspec.speculative_generate(
        target, Retrieval(datastore), PLAIN_PROMPTS, prompt_lengths=RAGGED_LENGTHS, max_new_tokens=16, strategy=jspec.Rest()
    )
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))


def test_rest_needs_a_datastore(target):
    with pytest.raises(ValueError, match="needs a datastore"):
        jspec.speculative_generate(target, None, PLAIN_PROMPTS, max_new_tokens=4, strategy=jspec.Rest())
    with pytest.raises(ValueError, match="size must be"):
        jspec.Rest(size=1)


@pytest.mark.slow
def test_the_first_three_tokens_follow_the_target_s_law_at_t1():
    target, _ = unrelated_small_pair()
    rng = np.random.default_rng(1)
    datastore = jax.device_put(build_datastore([rng.integers(0, 4, 400) for _ in range(3)]))
    assert first3_pvalue(jspec.Rest(size=6, depth=3), pair=(target, Retrieval(datastore))) > 1e-3
