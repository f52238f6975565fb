"""AdaptiveK (`jspec.methods.adaptive`): exact at T=0, the target's law at T=1, k chosen from the
acceptance estimate through the measured cost model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decode import first3_pvalue

import jspec
from jspec.analysis import best_k_from_costs
from jspec.methods.adaptive import GRID, AdaptiveCarry

from conftest import TINY, assert_greedy_matches_target, random_model

PROMPTS = np.asarray(jax.random.randint(jax.random.key(5), (3, 10), 0, 64), np.int32)
LENGTHS = np.array([10, 3, 6], np.int32)
COSTS = dict(t_draft=0.1, t_target=[1.0, 1.1, 1.15, 1.2, 1.3])


def test_greedy_output_equals_the_target_s():
    assert_greedy_matches_target(random_model(TINY, seed=0), jspec.AdaptiveK.from_costs(**COSTS), PROMPTS, LENGTHS)


def test_the_choice_table_is_the_cost_model_s_best_k_and_grows_with_acceptance():
    strategy = jspec.AdaptiveK.from_costs(**COSTS)
    assert strategy.k_max == 4
    assert strategy.choice == tuple(best_k_from_costs(i / GRID, 0.1, COSTS["t_target"]) for i in range(GRID + 1))
    assert list(strategy.choice) == sorted(strategy.choice) and strategy.choice[0] == 1 and strategy.choice[-1] == 4
    # row_k reads the table at the running estimate accepted / tried.
    carry = AdaptiveCarry(None, jnp.asarray([0.0, 9.0, 10.0]), jnp.asarray([10.0, 10.0, 10.0]))
    np.testing.assert_array_equal(
        np.asarray(strategy.row_k(carry)), [strategy.choice[0], strategy.choice[90], strategy.choice[100]]
    )


def test_rows_that_accept_more_draft_longer():
    """A row whose drafts the target always accepts (the drafter is the target) climbs to k_max;
    with an unrelated drafter it stays short, so it scores fewer tokens per round than fixed k."""
    target = random_model(TINY, seed=0)
    strategy = jspec.AdaptiveK.from_costs(**COSTS)
    same = jspec.speculative_generate(target, target, PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=30, strategy=strategy)
    other = jspec.speculative_generate(
        target, random_model(TINY, seed=9), PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=30, strategy=strategy
    )
    fixed = jspec.speculative_generate(
        target, random_model(TINY, seed=9), PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=30, strategy=jspec.Chain(k=4)
    )
    assert float(same.stats.mean_accepted) > 4.0  # k reached 4: 5 tokens per round
    assert float(other.stats.mean_accepted) <= float(fixed.stats.mean_accepted) + 1e-6


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="choice must hold"):
        jspec.AdaptiveK(k_max=4, choice=(1, 2))
    with pytest.raises(ValueError, match="k_max must be <="):
        jspec.AdaptiveK.from_costs(0.1, [1.0, 1.1], k_max=3)
    with pytest.raises(ValueError, match="decay"):
        jspec.AdaptiveK.from_costs(**COSTS, decay=1.5)


@pytest.mark.slow
def test_the_first_three_tokens_follow_the_target_s_law_at_t1():
    assert first3_pvalue(jspec.AdaptiveK.from_costs(0.1, [1.0, 1.05, 1.1])) > 1e-3
