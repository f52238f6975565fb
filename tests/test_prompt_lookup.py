"""PromptLookup (`jspec.methods.prompt_lookup`): exact at temperature 0 with no model and with a
model to fall back on, on ragged prompts with and without repeats; the target's law at T=1."""

from __future__ import annotations

import dataclasses

import jax
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


@dataclasses.dataclass(frozen=True)
class _ConfidenceStopLookalike:
    """ConfidenceStop(0.5) under another type: PromptLookup then drafts through the drafter
    protocol (per-node logits and the stop's features) instead of the lookup alone."""

    threshold: float = 0.5

    def continue_probability(self, features):
        return ConfidenceStop(self.threshold).continue_probability(features)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_drafting_by_the_lookup_alone_runs_the_rounds_the_drafter_protocol_runs(target, temperature):
    lean = jspec.PromptLookup(k=3)
    assert lean.cuts_where_nothing_matches(lean.lookup_drafter(target, None))
    general = jspec.PromptLookup(k=3, stop=_ConfidenceStopLookalike())
    assert not general.cuts_where_nothing_matches(general.lookup_drafter(target, None))
    sampling = jspec.Sampling(temperature=temperature)
    outs = [
        jspec.speculative_generate(
            target,
            None,
            REPEATING_PROMPTS,
            prompt_lengths=RAGGED_LENGTHS,
            max_new_tokens=24,
            strategy=strategy,
            sampling=sampling,
            rng=jax.random.key(3),
        )  # fmt: skip
        for strategy in (lean, general)
    ]
    np.testing.assert_array_equal(np.asarray(outs[0].tokens), np.asarray(outs[1].tokens))
    np.testing.assert_array_equal(np.asarray(outs[0].stats.emitted_per_round), np.asarray(outs[1].stats.emitted_per_round))
    if temperature == 0:  # the greedy target continues the repeats: drafts were accepted
        assert float(outs[0].stats.mean_accepted) > 1.3
