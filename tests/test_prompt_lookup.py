"""PromptLookup (`jspec.methods.prompt_lookup`): exact at temperature 0 with no model and with a
model to fall back on, on ragged prompts with and without repeats; the target's law at T=1."""

from __future__ import annotations

import numpy as np
import pytest
from test_decode import first3_pvalue, unrelated_small_pair

import jspec
from jspec.methods.early_stop import ConfidenceStop

from conftest import PLAIN_PROMPTS, RAGGED_LENGTHS, REPEATING_PROMPTS, TINY, perturbed, random_model


@pytest.fixture(scope="module")
def target():
    return random_model(TINY, seed=0)


@pytest.mark.parametrize("prompts", [REPEATING_PROMPTS, PLAIN_PROMPTS], ids=["repeats", "no-repeats"])
@pytest.mark.parametrize("with_model", [False, True], ids=["no-model", "model-fallback"])
def test_greedy_output_equals_the_target_s(target, prompts, with_model):
    drafter = perturbed(target, 0.3, 1) if with_model else None
    expected = jspec.generate(target, prompts, prompt_lengths=RAGGED_LENGTHS, max_new_tokens=24)
    out = jspec.speculative_generate(
        target, drafter, prompts, prompt_lengths=RAGGED_LENGTHS, max_new_tokens=24, strategy=jspec.PromptLookup(k=4)
    )
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
    if prompts is REPEATING_PROMPTS:  # the greedy target continues the repeated pattern: lookups are accepted
        assert float(out.stats.mean_accepted) > 1.3


def test_the_model_drafts_where_the_lookup_finds_nothing(target):
    """Without repeats the lookup rarely proposes; with a close model to fall back on (and no stop),
    the model's drafts are accepted instead."""
    alone = jspec.speculative_generate(
        target, None, PLAIN_PROMPTS, prompt_lengths=RAGGED_LENGTHS, max_new_tokens=24, strategy=jspec.PromptLookup(k=4)
    )
    with_model = jspec.speculative_generate(
        target,
        perturbed(target, 0.3, 1),
        PLAIN_PROMPTS,
        prompt_lengths=RAGGED_LENGTHS,
        max_new_tokens=24,
        strategy=jspec.PromptLookup(k=4, stop=None),
    )
    assert float(with_model.stats.mean_accepted) > float(alone.stats.mean_accepted) + 0.3


def test_a_strategy_that_needs_a_drafter_refuses_none(target):
    with pytest.raises(ValueError, match="drafter is None"):
        jspec.speculative_generate(target, None, PLAIN_PROMPTS, max_new_tokens=4, strategy=jspec.Chain(k=2))


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="ngram_sizes"):
        jspec.PromptLookup(k=2, ngram_sizes=(0,))
    with pytest.raises(ValueError, match="k must be"):
        jspec.PromptLookup(k=0)


@pytest.mark.slow
@pytest.mark.parametrize("with_model", [False, True], ids=["no-model", "model-fallback"])
def test_the_first_three_tokens_follow_the_target_s_law_at_t1(with_model):
    target, drafter = unrelated_small_pair()
    strategy = jspec.PromptLookup(k=2, stop=ConfidenceStop(0.3) if with_model else ConfidenceStop(0.5))
    assert first3_pvalue(strategy, pair=(target, drafter if with_model else None)) > 1e-3
