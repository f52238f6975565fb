"""Chains cut by a stop rule (`jspec.methods.chain`, `Chain(stop=...)`) and the prefix scoring they
use (`jspec.rounds.score_tree(sizes=...)`): exact at T=0, the target's law at T=1, shorter rounds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decode import first3_pvalue

import jspec
from jspec.drafters import ModelDrafter, prefill_model
from jspec.methods.chain import draft_chain
from jspec.methods.early_stop import ConfidenceStop
from jspec.rounds import prefix_sizes, score_tree

from conftest import TINY, assert_greedy_matches_target, perturbed, random_model

PROMPTS = np.asarray(jax.random.randint(jax.random.key(3), (3, 10), 0, 64), np.int32)
LENGTHS = np.array([10, 4, 7], np.int32)


@pytest.fixture(scope="module")
def target():
    return random_model(TINY, seed=0)


def test_greedy_output_equals_the_target_s_with_a_stop_rule(target):
    assert_greedy_matches_target(target, jspec.Chain(k=4, stop=ConfidenceStop(0.2)), PROMPTS, LENGTHS)


def test_the_stop_rule_cuts_chains_by_the_drafter_s_confidence(target):
    """Node i + 1 is drafted iff the drafter's top probability after every node up to i reaches the
    threshold; the valid nodes are the uncut chain's."""
    drafter = ModelDrafter(perturbed(target, 0.3, 1))
    lengths = jnp.asarray(LENGTHS)
    _, cache, _ = prefill_model(drafter.model, jnp.asarray(PROMPTS), lengths, 40)
    state = drafter.prefill(jspec.drafters.Prefill(jnp.asarray(PROMPTS), lengths, cache, None), None, 5)
    last = jnp.asarray(PROMPTS[np.arange(3), LENGTHS - 1])
    full = draft_chain(drafter, state, last, 4, jspec.Sampling(), jax.random.key(0))
    # The drafter's temperature-1 top probability after each node of the uncut chain.
    logits, context, s = drafter.catch_up(state, last)
    top = [np.asarray(jax.nn.softmax(logits).max(-1))]
    for i in range(1, 4):
        mask = jnp.broadcast_to(jnp.arange(4)[None, None, :] < i, (3, 1, 4))
        logits, context, s = drafter.extend(s, full.tree.tokens[:, i : i + 1], context[:, None], jnp.full((3, 1), i), mask, i - 1)
        context = context[:, 0]
        top.append(np.asarray(jax.nn.softmax(logits[:, 0]).max(-1)))
    top = np.stack(top, 1)
    for threshold in sorted({0.0, 1.0, *np.round(np.quantile(top, [0.25, 0.5, 0.75]), 4)}):
        drafted = draft_chain(drafter, state, last, 4, jspec.Sampling(), jax.random.key(0), stop=ConfidenceStop(float(threshold)))
        keep = np.cumprod(top >= threshold, axis=1).astype(bool)
        valid = np.asarray(drafted.tree.valid)
        np.testing.assert_array_equal(valid[:, 1:], keep)
        np.testing.assert_array_equal(np.asarray(drafted.tree.tokens)[valid], np.asarray(full.tree.tokens)[valid])


def test_prefix_scoring_equals_the_full_pass_on_every_valid_node(target):
    drafter = ModelDrafter(perturbed(target, 0.3, 1))
    lengths = jnp.asarray(LENGTHS)
    logits, cache, _ = prefill_model(target, jnp.asarray(PROMPTS), lengths, 40)
    _, dcache, _ = prefill_model(drafter.model, jnp.asarray(PROMPTS), lengths, 40)
    state = drafter.prefill(jspec.drafters.Prefill(jnp.asarray(PROMPTS), lengths, dcache, None), None, 7)
    last = jnp.argmax(logits, -1).astype(jnp.int32)
    drafted = draft_chain(drafter, state, last, 6, jspec.Sampling(), jax.random.key(0), limit=jnp.asarray([2, 0, 1]))
    full, _, _ = score_tree(target, cache, drafted, ())
    cut, _, _ = jax.jit(lambda c, d: score_tree(target, c, d, (), prefix_sizes(7)))(cache, drafted)
    valid = np.asarray(drafted.tree.valid)
    assert valid.sum(1).tolist() == [3, 1, 2]
    np.testing.assert_allclose(np.asarray(cut)[valid], np.asarray(full)[valid], atol=1e-4)
    assert not np.asarray(cut)[:, 3:].any()  # the pass stopped at the prefix of 3 (of sizes 1, 2, 3, 5, 7)


def test_prefix_sizes():
    assert prefix_sizes(1) == (1,)
    assert prefix_sizes(7) == (1, 2, 3, 5, 7)
    assert prefix_sizes(9) == (1, 2, 3, 5, 9)


def test_a_stop_rule_needs_the_tree_walk():
    with pytest.raises(ValueError, match="stop rule needs verifier"):
        jspec.Chain(k=2, verifier="block", stop=ConfidenceStop(0.3))
    with pytest.raises(ValueError, match="stop must be"):
        jspec.Chain(k=2, stop=0.3)


@pytest.mark.slow
def test_the_first_three_tokens_follow_the_target_s_law_at_t1():
    assert first3_pvalue(jspec.Chain(k=2, stop=ConfidenceStop(0.4))) > 1e-3
