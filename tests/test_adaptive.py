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
from jspec.methods.adaptive import AdaptiveCarry, round_counts

from conftest import TINY, assert_greedy_matches_target, perturbed, random_model

PROMPTS = np.asarray(jax.random.randint(jax.random.key(5), (3, 10), 0, 64), np.int32)
LENGTHS = np.array([10, 3, 6], np.int32)
COSTS = dict(t_draft=0.1, t_target=[1.0, 1.1, 1.15, 1.2, 1.3])


def test_greedy_output_equals_the_target_s():
    assert_greedy_matches_target(random_model(TINY, seed=0), jspec.AdaptiveK.from_costs(**COSTS), PROMPTS, LENGTHS)


def test_greedy_output_equals_the_target_s_at_batch_1_where_each_round_runs_a_fixed_chain():
    """At batch 1 a round runs a fixed chain of the row's k (one branch per k); output is still
    the target's, and the rounds switch between k's."""
    target = random_model(TINY, seed=0)
    strategy = jspec.AdaptiveK.from_costs(**COSTS)
    chosen = np.zeros(strategy.k_max, np.int64)
    for row in range(len(PROMPTS)):
        prompts, lengths = PROMPTS[row : row + 1], LENGTHS[row : row + 1]
        assert_greedy_matches_target(target, strategy, prompts, lengths)
        out = jspec.speculative_generate(target, perturbed(target, 0.3, seed=1), prompts, prompt_lengths=lengths,
                                         max_new_tokens=20, strategy=strategy)  # fmt: skip
        per_k = np.asarray(out.stats.strategy["rounds_per_k"])[0]
        assert per_k.sum() == int(out.stats.target_passes[0])
        chosen += per_k
    assert np.count_nonzero(chosen) >= 2, chosen


def test_row_k_is_the_cost_model_s_best_k_at_each_row_s_two_rates():
    strategy = jspec.AdaptiveK.from_costs(**COSTS)
    assert strategy.k_max == 4 and strategy.t_target == tuple(COSTS["t_target"])
    rates = np.random.default_rng(0).uniform(0, 1, (200, 2)).astype(np.float32)
    ones = jnp.ones((200,), jnp.float32)
    carry = AdaptiveCarry(None, jnp.asarray(rates[:, 0]), ones, jnp.asarray(rates[:, 1]), ones, None)
    expected = [best_k_from_costs(float(a), 0.1, COSTS["t_target"], alpha_next=float(b)) for a, b in rates]
    np.testing.assert_array_equal(np.asarray(strategy.row_k(carry)), expected)
    assert len(set(expected)) == 4  # the grid reaches every k
    # Bursty acceptance drafts longer than i.i.d. at the same first-draft rate.
    assert best_k_from_costs(0.3, 0.1, COSTS["t_target"], alpha_next=0.9) > best_k_from_costs(0.3, 0.1, COSTS["t_target"])


def test_a_round_counts_its_first_draft_and_the_later_drafts_it_reached():
    # Rows: 4 drafts, 0 accepted | 4 drafts, 2 accepted (the third was tried and rejected) | 4 of 4 | 1 of 1.
    counts = round_counts(jnp.asarray([0, 2, 4, 1]), jnp.asarray([4, 4, 4, 1]))
    expected = ([0, 1, 1, 1], [1, 1, 1, 1], [0, 1, 3, 0], [0, 2, 3, 0])
    for got, want in zip(counts, expected):
        np.testing.assert_array_equal(np.asarray(got), want)


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
    # The chosen k is counted per row, one count per round the row was active.
    for out in (same, other):
        per_k = np.asarray(out.stats.strategy["rounds_per_k"])
        assert per_k.shape == (3, 4)
        np.testing.assert_array_equal(per_k.sum(axis=1), np.asarray(out.stats.target_passes))
    at_k_max = [np.asarray(out.stats.strategy["rounds_per_k"])[:, 3].sum() for out in (same, other)]
    assert at_k_max[0] > at_k_max[1]


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="t_target must be a tuple of >= 2"):
        jspec.AdaptiveK(t_draft=0.1, t_target=(1.0,))
    with pytest.raises(ValueError, match="t_draft"):
        jspec.AdaptiveK.from_costs(-1.0, [1.0, 1.1])
    with pytest.raises(ValueError, match=r"t_target\[1\]"):
        jspec.AdaptiveK.from_costs(0.1, [1.0, 0.0])
    with pytest.raises(ValueError, match="k_max must be <="):
        jspec.AdaptiveK.from_costs(0.1, [1.0, 1.1], k_max=3)
    with pytest.raises(ValueError, match="decay"):
        jspec.AdaptiveK.from_costs(**COSTS, decay=1.5)


@pytest.mark.slow
@pytest.mark.parametrize("batch_1", [False, True], ids=["cut-chain", "batch-1-fixed-chain"])
def test_the_first_three_tokens_follow_the_target_s_law_at_t1(batch_1):
    assert first3_pvalue(jspec.AdaptiveK.from_costs(0.1, [1.0, 1.05, 1.1]), batch_1=batch_1) > 1e-3
