"""jspec.methods.multi_candidate.MultiCandidate (MCSD and Improved MCSD): greedy decoding equals target
greedy, with and without replacement and with early stop; sampled decoding has the target's exact
distribution (early stop included); target-initialised candidates are measurably lossy unless
k_1 = 1; bad arguments are rejected."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_decode import first3_pvalue, unrelated_small_pair

import jspec
from jspec.methods.early_stop import FEATURES, ConfidenceStop, EarlyStop
from jspec.methods.multi_candidate import MultiCandidate
from jspec.sampling import Sampling

from conftest import assert_greedy_matches_target, perturbed

# A hand-set "learned" rule (continue while max_prob is high and entropy low), so the EarlyStop
# path runs without training; tests/test_early_stop.py trains a real one.
_W1 = np.zeros((len(FEATURES), 2), np.float32)
_W1[0, 0], _W1[1, 1] = 2.0, -2.0
HAND_STOP = EarlyStop.from_params(
    dict(mean=np.zeros(4), scale=np.ones(4), w1=_W1, b1=np.zeros(2), w2=np.ones(2), b2=np.float32(-0.5)), threshold=0.5
)

GREEDY = [MultiCandidate((2, 2, 1)), MultiCandidate((3, 1, 2), replacement=False, early_stop=HAND_STOP)]
# One prompt shape for every greedy test, so programs compiled for one are reused by the next.
PROMPTS = np.asarray(jax.random.randint(jax.random.key(2), (4, 6), 0, 64), np.int32)
LENGTHS = np.array([6, 3, 5, 2], np.int32)


@pytest.mark.parametrize("strategy", GREEDY, ids=["replacement", "without-replacement-learned-stop"])
def test_greedy_multi_candidate_equals_greedy_autoregressive(tiny_target, strategy):
    assert_greedy_matches_target(tiny_target, strategy, PROMPTS, LENGTHS)


def test_early_stop_cuts_the_tree_to_the_first_level(tiny_target):
    """With the drafter equal to the target every path is accepted: the full tree gives depth + 1
    tokens per round; a rule that always stops (threshold 1) leaves level 1 only: 2 per round."""
    tau = {
        name: float(
            jspec.speculative_generate(
                tiny_target, tiny_target, PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=20, strategy=s
            ).stats.mean_accepted
        )
        for name, s in {"full": GREEDY[0], "stop": MultiCandidate((2, 2, 1), early_stop=ConfidenceStop(1.0))}.items()
    }
    assert tau == {"full": 4.0, "stop": 2.0}


# --- Sampling: exact distribution of the first three tokens (SMALL models, vocabulary 4) --------


@pytest.fixture(scope="module")
def small_pair():
    return unrelated_small_pair()


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy",
    # 0.329 is about the median of the SMALL drafter's max probability after level 1 (it lies in
    # 0.325 .. 0.332): about half the rows stop there (measured 48% on 512 rows), half go on.
    [MultiCandidate((2, 2)), MultiCandidate((2, 2), replacement=False, early_stop=ConfidenceStop(0.329))],
    ids=["replacement", "without-replacement-early-stop"],
)
def test_sampled_multi_candidate_matches_exact_target_distribution(small_pair, strategy):
    assert first3_pvalue(strategy, pair=small_pair) > 1e-3


# --- Target-initialised candidates (Improved MCSD (i)) ------------------------------------------


def test_lossy_target_init_is_exact_at_temperature_0(tiny_target):
    """At temperature 0 every target-drawn candidate is the target's argmax: nothing is chosen."""
    expected = jspec.generate(tiny_target, PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=20)
    strategy = MultiCandidate((3, 2, 1), lossy_target_init=True)
    drafter = perturbed(tiny_target, 1.0, seed=1)
    out = jspec.speculative_generate(tiny_target, drafter, PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=20, strategy=strategy)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))


@pytest.mark.slow
@pytest.mark.parametrize("k_config, lossless", [((1, 2), True), ((3, 1), False)], ids=["k1=1-lossless", "k1=3-lossy"])
def test_target_init_is_lossy_unless_one_candidate(small_pair, k_config, lossless):
    """The verdict on Improved MCSD's target initialisation, measured: keeping the target-drawn
    candidate whose continuation is accepted longest distorts the output (chi-square p ~ 1e-60
    with 3 candidates); with one candidate nothing is chosen and the same round is exact."""
    pvalue = first3_pvalue(MultiCandidate(k_config, lossy_target_init=True), pair=small_pair)
    assert pvalue > 1e-3 if lossless else pvalue < 1e-6, pvalue


# --- Bad arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k_config=()), "k_config"),
        (dict(k_config=(2, 0)), r"k_config.*\(2, 0\)"),
        (dict(k_config=[2, 2]), r"k_config.*\[2, 2\]"),
        (dict(replacement="yes"), "replacement.*'yes'"),
        (dict(target_init=1), "target_init.*1"),
        (dict(lossy_target_init=None), "lossy_target_init.*None"),
        (dict(early_stop=0.5), "early_stop.*0.5"),
        (dict(k_config=(4,), early_stop=ConfidenceStop(0.5)), r"early_stop.*k_config.*\(4,\)"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiCandidate(**kwargs)


def test_target_init_is_refused_unless_named_lossy(tiny_target):
    with pytest.raises(ValueError, match="target_init=True is not lossless.*lossy_target_init=True"):
        jspec.speculative_generate(
            tiny_target,
            tiny_target,
            np.zeros((1, 3), np.int32),
            max_new_tokens=2,
            strategy=MultiCandidate(target_init=True),
            sampling=Sampling(temperature=1.0),
            rng=jax.random.key(0),
        )
    MultiCandidate(lossy_target_init=True).check(Sampling(temperature=1.0))  # the explicit opt-in is accepted


def test_shape():
    s = MultiCandidate((2, 3))
    np.testing.assert_array_equal(s.shape.parent, [-1, 0, 0, 1, 1, 1, 2, 2, 2])
    assert (s.size, s.max_depth, s.tokens_per_round, s.tokens_scored) == (9, 2, 3, 9)
    assert hash(MultiCandidate(early_stop=HAND_STOP)) == hash(MultiCandidate(early_stop=EarlyStop(HAND_STOP.weights, 0.5)))
