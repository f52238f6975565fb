"""jspec.methods.pearl (PEARL) on one device (`jspec.speculative_generate`, the stages in turn):
exact at T=0, the target's law at T=1 (with a negative control), and its two modes: a step after
an accepted first draft post-verifies, and a drafter equal to the target never leaves post-verify.
tests/test_parallel.py runs it with the drafter on a device of its own."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from test_decode import first3_pvalue
from test_ssd import law_pair

import jspec
from jspec.methods.pearl import PEARL

from conftest import PLAIN_PROMPTS, RAGGED_LENGTHS, REPEATING_PROMPTS, TINY, assert_greedy_matches_target, random_model


@pytest.fixture(scope="module")
def target():
    return random_model(TINY, seed=0)


@pytest.mark.parametrize("gamma", [1, 2, 4])
@pytest.mark.parametrize("prompts", [REPEATING_PROMPTS, PLAIN_PROMPTS], ids=["repeats", "plain"])
def test_greedy_output_equals_the_target_s(target, prompts, gamma):
    assert_greedy_matches_target(target, PEARL(gamma=gamma), prompts, RAGGED_LENGTHS)


def test_a_drafter_equal_to_the_target_post_verifies_every_step_after_the_first(target):
    """Every draft is accepted: the first step pre-verifies (emits 1 token), every later one
    post-verifies and emits gamma tokens, with no bonus token (so rounds are gamma tokens, not gamma + 1)."""
    gamma = 3
    out = jspec.speculative_generate(
        target, target, PLAIN_PROMPTS, prompt_lengths=RAGGED_LENGTHS, max_new_tokens=16, strategy=PEARL(gamma=gamma)
    )
    steps, post = np.asarray(out.stats.strategy["steps"]), np.asarray(out.stats.strategy["post_steps"])
    np.testing.assert_array_equal(post, steps - 1)
    emitted = np.asarray(out.stats.emitted_per_round)
    np.testing.assert_array_equal(emitted[:, 0], 1)
    np.testing.assert_array_equal(emitted[:, 1 : steps[0]], gamma)


def test_an_unrelated_drafter_falls_back_to_pre_verify(target):
    """A rejection returns a row to pre-verify: with a poor drafter some steps are not post steps,
    and a pre-verify step emits exactly one token."""
    unrelated = random_model(TINY, seed=7)
    out = jspec.speculative_generate(
        target, unrelated, PLAIN_PROMPTS, prompt_lengths=RAGGED_LENGTHS, max_new_tokens=16, strategy=PEARL(gamma=3)
    )
    steps, post = np.asarray(out.stats.strategy["steps"]), np.asarray(out.stats.strategy["post_steps"])
    assert (post < steps - 1).all()


@pytest.mark.slow
@pytest.mark.parametrize("gamma", [1, 2])
def test_the_first_three_tokens_follow_the_target_s_law_at_t1(gamma):
    assert first3_pvalue(PEARL(gamma=gamma), pair=law_pair()) > 1e-3


@dataclasses.dataclass(frozen=True)
class _WrongPendingProbs(PEARL):
    """Negative control: drafts carry a near-zero q instead of the distribution they were drawn
    from, so every draft is accepted whatever the target says (the drafter's law)."""

    def draft(self, *args):
        state, drafts, probs = super().draft(*args)
        return state, drafts, jnp.full_like(probs, 1e-6)


@pytest.mark.slow
def test_the_law_test_rejects_drafts_verified_against_the_wrong_distribution():
    assert first3_pvalue(_WrongPendingProbs(gamma=2), pair=law_pair()) < 1e-6


def test_bad_arguments_raise():
    for gamma in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="gamma must be"):
            PEARL(gamma=gamma)
