"""jspec.methods.ssd (speculative speculative decoding) on one device (`jspec.speculative_generate`,
the stages in turn): exact at T=0, the target's law at T=1, and the speculation cache's logic on
crafted outcomes (a hit starts the round at verification, a miss drafts). tests/test_parallel.py
runs the same strategy with the drafter on a device of its own."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decode import SMALL, first3_pvalue, unrelated_small_pair

import jspec
from jspec.drafters import ModelDrafter, Prefill, prefill_model
from jspec.methods.ssd import SSD, hit_rate

from conftest import PLAIN_PROMPTS, RAGGED_LENGTHS, REPEATING_PROMPTS, TINY, assert_greedy_matches_target, random_model

# For the law tests: k = 1 and every bonus token of the 4-token vocabulary in the cache, with a
# peaked drafter unrelated to the target, so that many rows run a second round within the first 3
# tokens and it starts from the cache (about a quarter of the rows).
LAW = SSD(k=1, fanout=(3, 4))


def law_pair():
    target, _ = unrelated_small_pair()
    return target, random_model(SMALL, seed=12, scale=10.0)


@pytest.fixture(scope="module")
def target():
    return random_model(TINY, seed=0)


@pytest.mark.parametrize("prompts", [REPEATING_PROMPTS, PLAIN_PROMPTS], ids=["repeats", "plain"])
def test_greedy_output_equals_the_target_s(target, prompts):
    assert_greedy_matches_target(target, SSD(k=3), prompts, RAGGED_LENGTHS)


def test_a_drafter_equal_to_the_target_hits_every_round_after_the_first(target):
    """At T=0 a drafter equal to the target drafts what the target accepts, and its top token after
    the chain is the target's bonus token: every outcome is predicted, so each row's rounds after
    the first start from the cache, and a row emits k + 1 tokens per round."""
    out = jspec.speculative_generate(
        target, target, PLAIN_PROMPTS, prompt_lengths=RAGGED_LENGTHS, max_new_tokens=16, strategy=SSD(k=3)
    )
    rounds, hits = np.asarray(out.stats.strategy["rounds"]), np.asarray(out.stats.strategy["hits"])
    np.testing.assert_array_equal(hits, rounds - 1)
    assert float(out.stats.mean_accepted) == 4.0
    assert 0 < hit_rate(out.stats) < 1


def _start(strategy, target, drafter_model, prompts):
    """The carry after prefilling `prompts` `[B, P]` (full rows) and the target's greedy first token."""
    b, p = prompts.shape
    lengths = jnp.full((b,), p, jnp.int32)
    logits, cache, _ = prefill_model(target, prompts, lengths, p + 32)
    first = jnp.argmax(logits, -1).astype(jnp.int32)
    return strategy.init(target, ModelDrafter(drafter_model), Prefill(prompts, lengths, cache, None), first, jspec.Sampling())


def test_a_hit_verifies_the_cached_chain_without_drafting_and_a_miss_drafts(target):
    """Crafted cache entries: the target's own greedy continuation, marked as a hit, is verified
    as it stands (all k accepted) although the drafter is unrelated; the same chain marked as a
    miss is ignored, and the unrelated drafter's fresh chain is verified instead. A drafter that
    counts its catch-ups shows the hit round drafted nothing (one catch-up: the pre-drafting)."""
    strategy = SSD(k=3)
    unrelated = random_model(TINY, seed=7)
    prompts = jnp.asarray(PLAIN_PROMPTS)
    greedy = jspec.generate(target, prompts, max_new_tokens=5).tokens  # first token + 4
    carry = _start(strategy, target, unrelated, prompts)
    np.testing.assert_array_equal(np.asarray(carry.last), np.asarray(greedy[:, 0]))
    crafted = dataclasses.replace(carry, hit=jnp.ones((3,), bool), cached_tokens=greedy[:, 1:4].astype(jnp.int32))

    calls = []
    counting = CountingDrafter(unrelated, calls)
    after_hit, emitted, n_new = _round_with(strategy, target, counting, crafted)
    assert len(calls) == 1  # the pre-drafting's catch-up only
    np.testing.assert_array_equal(np.asarray(n_new), [4, 4, 4])
    np.testing.assert_array_equal(np.asarray(emitted), np.asarray(greedy[:, 1:5]))

    calls.clear()
    missed = dataclasses.replace(crafted, hit=jnp.zeros((3,), bool))
    _, emitted_miss, n_miss = _round_with(strategy, target, counting, missed)
    assert len(calls) == 2  # drafted (the fallback), then pre-drafted
    assert np.asarray(n_miss).sum() < 12  # the unrelated drafter's chains, not the crafted ones
    # Emitted tokens agree with greedy decoding either way (up to each row's count).
    for row in range(3):
        n = int(n_miss[row])
        np.testing.assert_array_equal(np.asarray(emitted_miss[row, :n]), np.asarray(greedy[row, 1 : 1 + n]))
    assert after_hit.rounds.tolist() == [1, 1, 1] and after_hit.hits.tolist() == [1, 1, 1]


class CountingDrafter(ModelDrafter):
    """A ModelDrafter that records every catch-up the compiled round actually runs."""

    def __init__(self, model, calls: list):
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "feature_layers", ())
        object.__setattr__(self, "calls", calls)

    def catch_up(self, state, last):
        jax.debug.callback(lambda: self.calls.append(1))
        return super().catch_up(state, last)

    def __hash__(self):
        return id(self)


def _round_with(strategy, target, drafter, carry):
    active = jnp.ones((carry.last.shape[0],), bool)
    out = jax.jit(lambda c: strategy.round(target, drafter, c, active, jspec.Sampling(), jax.random.key(0)))(carry)
    jax.effects_barrier()
    return out


def test_the_cache_keys_outcomes_by_accepted_length_and_bonus_token(target):
    """The branches are the fan-out's (length, rank) pairs; each bonus candidate is never the
    rejected draft at its length, and the pre-drafted chains extend exactly their outcome."""
    strategy = SSD(k=2, fanout=(2, 0, 1))
    lengths, ranks = strategy.branch_outcomes
    assert lengths.tolist() == [0, 0, 2] and ranks.tolist() == [0, 1, 0] and strategy.branches == 3
    drafter_model = random_model(TINY, seed=3)
    carry = _start(strategy, target, drafter_model, jnp.asarray(PLAIN_PROMPTS))
    chain = jnp.asarray([[1, 2], [3, 4], [5, 6]], jnp.int32)
    drafter = ModelDrafter(drafter_model)
    _, length, bonus, drafts, probs = jax.jit(
        lambda s: strategy.predraft(drafter, s, carry.last, chain, jspec.Sampling(), jax.random.key(0))
    )(carry.drafter)
    assert length.tolist() == [[0, 0, 2]] * 3
    assert all(bonus[r, m] != chain[r, 0] for r in range(3) for m in (0, 1))
    assert drafts.shape == (3, 3, 2) and probs.shape == (3, 3, 2, TINY.vocab_size)
    # Greedy pre-drafts of branch (0, y) are the drafter's greedy continuation of prompt, last, y.
    for row in range(3):
        for m in range(3):
            prefix = [int(carry.last[row])] + [int(t) for t in chain[row, : length[row, m]]] + [int(bonus[row, m])]
            seq = jnp.asarray(np.concatenate([PLAIN_PROMPTS[row], prefix]))[None]
            want = jspec.generate(drafter_model, seq, max_new_tokens=2).tokens[0]
            np.testing.assert_array_equal(np.asarray(drafts[row, m]), np.asarray(want))


@pytest.mark.slow
def test_the_first_three_tokens_follow_the_target_s_law_at_t1():
    assert first3_pvalue(LAW, pair=law_pair()) > 1e-3


@dataclasses.dataclass(frozen=True)
class _WrongCachedProbs(SSD):
    """Negative control: cached chains carry a near-zero q instead of the distribution they were
    drawn from, so a hit round accepts its drafts whatever the target says (the drafter's law)."""

    def predraft(self, *args):
        state, length, bonus, drafts, probs = super().predraft(*args)
        return state, length, bonus, drafts, jnp.full_like(probs, 1e-6)


@pytest.mark.slow
def test_the_law_test_rejects_cached_chains_verified_against_the_wrong_distribution():
    assert first3_pvalue(_WrongCachedProbs(k=LAW.k, fanout=LAW.fanout), pair=law_pair()) < 1e-6


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="k must be"):
        SSD(k=0)
    with pytest.raises(ValueError, match="fanout"):
        SSD(k=2, fanout=(1, 1))
    with pytest.raises(ValueError, match="fanout"):
        SSD(k=2, fanout=(0, 0, 0))
    with pytest.raises(ValueError, match="fanout"):
        SSD(k=1, fanout=(1, -1))
