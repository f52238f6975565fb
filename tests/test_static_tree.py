"""jspec.StaticTree: greedy tree decoding equals target greedy; sampled tree decoding has the
target's exact distribution; bad shapes are rejected."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_decode import first3_pvalue

import jspec

from conftest import assert_greedy_matches_target, perturbed

STRATEGIES = [
    jspec.StaticTree((2, 2, 1)),
    jspec.StaticTree((3,), children="iid"),
    jspec.StaticTree((2, 1, 2), children="top_k"),
    jspec.StaticTree((1, 1, 1, 1)),  # a chain, as a tree
]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
def test_greedy_tree_decoding_equals_greedy_autoregressive(tiny_target, strategy):
    prompts = np.asarray(jax.random.randint(jax.random.key(2), (4, 6), 0, 64), np.int32)
    assert_greedy_matches_target(tiny_target, strategy, prompts, np.array([6, 3, 5, 2], np.int32))


def test_identical_drafter_accepts_a_full_path_every_round(tiny_target):
    strategy = jspec.StaticTree((2, 2, 1))
    prompts = np.asarray(jax.random.randint(jax.random.key(3), (2, 5), 0, 64), np.int32)
    out = jspec.speculative_generate(tiny_target, tiny_target, prompts, max_new_tokens=17, strategy=strategy)
    assert float(out.stats.mean_accepted) == strategy.depth + 1


def test_tree_alternatives_raise_tau_over_the_chain_of_the_same_depth(tiny_target):
    drafter = perturbed(tiny_target, 1.0, seed=1)
    prompts = np.asarray(jax.random.randint(jax.random.key(4), (8, 6), 0, 64), np.int32)
    tau = {
        name: float(jspec.speculative_generate(tiny_target, drafter, prompts, max_new_tokens=32, strategy=s).stats.mean_accepted)
        for name, s in {"tree": jspec.StaticTree((3, 2, 1)), "chain": jspec.Chain(k=3)}.items()
    }
    assert tau["tree"] > tau["chain"], tau


@pytest.mark.slow
@pytest.mark.parametrize("children", ["iid", "without_replacement", "top_k"])
def test_sampled_tree_decoding_matches_exact_target_distribution(children):
    assert first3_pvalue(jspec.StaticTree((2, 2), children=children)) > 1e-3


@pytest.mark.parametrize("kwargs", [dict(branching=()), dict(branching=(2, 0)), dict(branching=[2]), dict(children="beam")])
def test_bad_tree_shapes_raise(kwargs):
    with pytest.raises(ValueError, match="branching|children"):
        jspec.StaticTree(**kwargs)


def test_parents_are_breadth_first():
    np.testing.assert_array_equal(jspec.StaticTree((2, 3)).parents(), [-1, 0, 0, 1, 1, 1, 2, 2, 2])
    assert jspec.StaticTree((2, 3)).size == 9 and jspec.StaticTree((2, 3)).tokens_per_round == 3
