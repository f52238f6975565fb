"""infer.lookup_ceiling: the host replay of prompt lookup runs the rounds `jspec.PromptLookup` runs."""

from __future__ import annotations

import numpy as np
import pytest

import jspec
from infer.lookup_ceiling import ceiling, lookup_proposal, prompt_lookup_rounds

from conftest import PLAIN_PROMPTS, RAGGED_LENGTHS, REPEATING_PROMPTS, TINY, random_model


def test_the_proposal_follows_the_latest_match_of_the_longest_ngram():
    history = [5, 1, 2, 9, 1, 2, 7, 3, 2, 8]
    assert lookup_proposal(history, history + [1, 2], (2, 1)) == 7  # "1 2" last seen before 7
    assert lookup_proposal(history, history + [3, 2], (2, 1)) == 8  # "3 2" before 8
    assert lookup_proposal(history, history + [4, 2], (2, 1)) == 8  # no "4 2": the latest "2" (before 8)
    assert lookup_proposal(history, history + [4], (2, 1)) is None


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("prompts", [REPEATING_PROMPTS, PLAIN_PROMPTS], ids=["repeats", "no-repeats"])
def test_the_replay_emits_what_each_round_of_prompt_lookup_emitted(prompts, k):
    target = random_model(TINY, seed=0)
    out = jspec.speculative_generate(
        target, None, prompts, prompt_lengths=RAGGED_LENGTHS, max_new_tokens=24, strategy=jspec.PromptLookup(k=k)
    )
    emitted = np.asarray(out.stats.emitted_per_round)
    accepted_any = False
    for row, length in enumerate(np.asarray(RAGGED_LENGTHS)):
        output = np.asarray(out.tokens[row, : int(out.lengths[row])])
        rounds = prompt_lookup_rounds(np.asarray(prompts)[row, :length], output, k)
        assert len(rounds) == int(out.stats.target_passes[row])
        # Every round but the last emits accepted + 1 (the last is cut at max_new_tokens).
        assert [a + 1 for _, a in rounds[:-1]] == emitted[row, : len(rounds) - 1].tolist()
        assert all(0 <= a <= d <= k for d, a in rounds)
        accepted_any |= any(a > 0 for _, a in rounds)
    assert accepted_any or prompts is PLAIN_PROMPTS


def test_the_ceiling_is_tau_when_every_pass_costs_the_same():
    rounds = [(3, 2), (2, 0), (0, 0)]
    result = ceiling(rounds, 6, lambda n: 1.0)
    assert result["rounds"] == 3 and result["tau"] == pytest.approx(2.0) and result["speedup_bound"] == pytest.approx(2.0)
    costlier = ceiling(rounds, 6, lambda n: 1.0 + 0.1 * (n - 1))
    assert costlier["speedup_bound"] == pytest.approx(6 / (1.3 + 1.2 + 1.0))
