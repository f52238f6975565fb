"""jspec.verify.lossy: typical acceptance and SpecDec verification make exactly their stated
decisions, reduce to greedy where the papers say they do, are lossy at temperature 1, and are
used only when a Chain is given the rule object."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decode import SMALL, _exact_first3, _sample_codes

import jspec
from jspec.models import causal_mask, init_cache
from jspec.rounds import SpeculativeStrategy, TreeStrategy
from jspec.sampling import Sampling
from jspec.verify.chain import CHAIN_VERIFIERS, verify_greedy, verify_sampling
from jspec.verify.lossy import (
    LossySpecDec,
    LossyTypical,
    LossyVerifier,
    typical_threshold,
)

from conftest import TINY, chi_square_pvalue, forward, perturbed, random_model

V = 8
PEAK = np.array([0.9, 0.08, 0.02, 0, 0, 0, 0, 0])  # H = 0.375: min(0.09, 0.3 e^-H = 0.206) = eps = 0.09
FLAT = np.array([0.08] + [0.92 / 7] * 7)  # H = 2.068: min(0.09, 0.3 e^-H = 0.0379) = 0.0379
HALF = np.array([0.5, 0.5, 0, 0, 0, 0, 0, 0])  # H = ln 2


def _one_hot(i: int, v: int = V) -> np.ndarray:
    return np.eye(v)[i]


def _call(verify, rows, key=jax.random.key(0), repeat: int = 1):
    """rows: per row (list of k + 1 target distributions, list of k drafts), each row repeated
    `repeat` times -> (accepted [B], next_token [B]) as numpy.

    The drafter's q is set to the one-hot of each draft: neither lossy rule reads it."""
    p = np.repeat(np.stack([np.stack(dists) for dists, _ in rows]), repeat, axis=0)  # [B, k+1, V]
    drafts = jnp.asarray(np.repeat([x for _, x in rows], repeat, axis=0), jnp.int32)  # [B, k]
    q = jax.nn.one_hot(drafts, p.shape[-1])
    verdict = jax.jit(verify)(key, drafts, q, jnp.asarray(p, jnp.float32))
    assert verdict.accepted.dtype == jnp.int32 and verdict.next_token.dtype == jnp.int32
    return np.asarray(verdict.accepted), np.asarray(verdict.next_token)


# --- Typical acceptance (Medusa) -----------------------------------------------------------------


def test_typical_threshold_switches_from_eps_to_the_entropy_term():
    dists = jnp.asarray(np.stack([_one_hot(3), PEAK, np.full(V, 1 / V), FLAT]), jnp.float32)
    threshold = np.asarray(typical_threshold(dists, 0.09, 0.3))
    flat_entropy = -np.sum(FLAT * np.log(FLAT))
    # one-hot and peaked: eps binds; uniform over 8: 0.3 exp(-ln 8) = 0.3 / 8 exactly; FLAT: 0.3 e^-H.
    np.testing.assert_allclose(threshold, [0.09, 0.09, 0.3 / V, 0.3 * np.exp(-flat_entropy)], rtol=1e-5)
    assert threshold[3] < 0.08 < threshold[1]  # the same p(x) = 0.08 passes under FLAT only


# (target distributions p_1..p_{k+1}, drafts x_1..x_k), k = 2; expected (accepted, next token or None
# when the next token is sampled from a distribution that is not one-hot) per rule.
TYPICAL_ROWS = [
    ([PEAK, FLAT, _one_hot(5)], [0, 0]),  # 0.9 > 0.09; 0.08 > 0.0379 (entropy term); bonus 5
    ([FLAT, PEAK, _one_hot(5)], [0, 1]),  # 0.08 > 0.0379; 0.08 < 0.09 (eps)
    ([_one_hot(3), FLAT, _one_hot(5)], [4, 0]),  # p(x) = 0: reject, emit 3
    ([FLAT, FLAT, _one_hot(7)], [1, 0]),  # 0.131 and 0.08 both pass; bonus 7
    ([HALF, PEAK, _one_hot(5)], [0, 2]),  # 0.5 > 0.09; 0.02 < 0.09
]
TYPICAL_EXPECTED = {
    LossyTypical(): [(2, 5), (1, None), (0, 3), (2, 7), (1, None)],
    # eps 0.5, delta 2: PEAK 0.5, FLAT min(0.5, 0.253), HALF min(0.5, 2 * 0.5) = 0.5 and 0.5 > 0.5 fails
    LossyTypical(eps=0.5, delta=2.0): [(1, None), (0, None), (0, 3), (0, None), (0, None)],
}


@pytest.mark.parametrize("rule", list(TYPICAL_EXPECTED), ids=repr)
def test_typical_decisions_on_crafted_distributions(rule):
    accepted, next_token = _call(rule.verify, TYPICAL_ROWS)
    for row, ((dists, _), (n, token)) in enumerate(zip(TYPICAL_ROWS, TYPICAL_EXPECTED[rule])):
        assert accepted[row] == n, row
        if token is not None:
            assert next_token[row] == token, row
        else:  # sampled from p at the first rejected position
            assert dists[n][next_token[row]] > 0, row


def test_typical_samples_the_next_token_from_p_not_the_residual():
    """Rejected at p_1 = PEAK: the next token follows PEAK (norm((p - q)+) would never give the
    rejected token 1); all accepted: the bonus token follows p_{k+1} = FLAT."""
    trials = 40_000
    rows = [([PEAK, FLAT], [1]), ([FLAT, FLAT], [1])]
    accepted, next_token = _call(LossyTypical().verify, rows, jax.random.key(3), repeat=trials)
    assert (accepted[:trials] == 0).all() and (accepted[trials:] == 1).all()
    assert chi_square_pvalue(next_token[:trials], PEAK) > 1e-3
    assert chi_square_pvalue(next_token[trials:], FLAT) > 1e-3
    assert chi_square_pvalue(next_token[:trials], np.where(np.arange(V) == 1, 0, PEAK)) < 1e-6  # power


# --- SpecDec (top-beta and tolerance) ------------------------------------------------------------

# Logits, so log-probability gaps to the top-1 are logit differences.
L1 = np.array([3.0, 2.5, 1.8, 1.7, -2.0])  # top-1 is 0; gaps 0, 0.5, 1.2, 1.3, 5
L2 = np.array([2.9, 3.0, 2.8, 2.7, 0.0])  # top-1 is 1; ranks 1, 0, 2, 3, 4; gaps 0.1, 0, 0.2, 0.3, 3
L3 = np.array([0.0, 0.0, 0.0, 0.0, 2.0])  # top-1 is 4
SPECDEC_ROWS = [  # k = 3
    ([L1, L2, L1, L3], [1, 2, 0]),  # rank 2 gap 0.5; rank 3 gap 0.2; top-1
    ([L1, L1, L2, L3], [0, 2, 1]),  # top-1; rank 3 but gap 1.2
    ([L2, L1, L1, L3], [3, 0, 0]),  # gap 0.3 but rank 4
    ([L1, L2, L2, L3], [4, 1, 1]),  # rank 5, gap 5
]
SPECDEC_EXPECTED = {  # (accepted, next token) per row: the target's top-1 where the chain stops
    LossySpecDec(beta=3, tol=1.0): [(3, 4), (1, 0), (0, 1), (0, 0)],
    LossySpecDec(beta=4, tol=1.0): [(3, 4), (1, 0), (3, 4), (0, 0)],
    LossySpecDec(beta=3, tol=0.4): [(0, 0), (1, 0), (0, 1), (0, 0)],
    LossySpecDec(beta=5, tol=6.0): [(3, 4), (3, 4), (3, 4), (3, 4)],
}


@pytest.mark.parametrize("rule", list(SPECDEC_EXPECTED), ids=repr)
def test_specdec_decisions_on_crafted_logits(rule):
    rows = [([np.exp(l) / np.exp(l).sum() for l in logits], x) for logits, x in SPECDEC_ROWS]
    accepted, next_token = _call(rule.verify, rows)
    np.testing.assert_array_equal(accepted, [n for n, _ in SPECDEC_EXPECTED[rule]])
    np.testing.assert_array_equal(next_token, [t for _, t in SPECDEC_EXPECTED[rule]])


def _random_problem(seed: int, b: int = 1024, k: int = 5, v: int = 6):
    """Random targets [B, k+1, V] and drafts that match the target's argmax 60% of the time."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(v, 0.7), size=(b, k + 1)).astype(np.float32)
    argmax = p.argmax(-1)[:, :k]
    drafts = np.where(rng.random((b, k)) < 0.6, argmax, rng.integers(0, v, (b, k))).astype(np.int32)
    q = rng.dirichlet(np.ones(v), size=(b, k)).astype(np.float32)
    return jnp.asarray(drafts), jnp.asarray(q), jnp.asarray(p)


@pytest.mark.parametrize(
    "rule", [LossySpecDec(beta=1, tol=1.0), LossySpecDec(beta=1, tol=50.0), LossySpecDec(beta=6, tol=0.0)], ids=repr
)
def test_specdec_with_beta_1_or_tol_0_is_greedy(rule):
    drafts, q, p = _random_problem(0)
    expected = jax.jit(verify_greedy)(None, drafts, q, p)
    verdict = jax.jit(rule.verify)(jax.random.key(1), drafts, q, p)
    assert 0 < float(jnp.mean(expected.accepted)) < drafts.shape[1]  # both outcomes occur
    np.testing.assert_array_equal(verdict.accepted, expected.accepted)
    np.testing.assert_array_equal(verdict.next_token, expected.next_token)


def test_specdec_beta_1_breaks_top1_ties_like_argmax():
    """p = (0.4, 0.4, 0.2): greedy's argmax is token 0, so beta = 1 accepts 0 and rejects 1."""
    tie = np.array([0.4, 0.4, 0.2])
    accepted, next_token = _call(LossySpecDec(beta=1, tol=5.0).verify, [([tie, tie], [0]), ([tie, tie], [1])])
    np.testing.assert_array_equal(accepted, [1, 0])
    np.testing.assert_array_equal(next_token, [0, 0])


def test_default_specdec_accepts_a_superset_of_greedy():
    """Everything greedy accepts passes top-beta and tol too; the relaxation must add some."""
    drafts, q, p = _random_problem(1)
    greedy = jax.jit(verify_greedy)(None, drafts, q, p).accepted
    relaxed = jax.jit(LossySpecDec(beta=3, tol=1.0).verify)(None, drafts, q, p).accepted
    assert (relaxed >= greedy).all() and (relaxed > greedy).any()


@pytest.mark.parametrize(
    "rule", [LossyTypical(), LossyTypical(eps=0.999, delta=100.0), LossyTypical(eps=1e-6, delta=1e-6)], ids=repr
)
def test_typical_on_one_hot_distributions_is_greedy(rule):
    """Temperature 0: p is one-hot, so only the argmax can pass and the next token is the argmax."""
    drafts, q, p = _random_problem(2)
    p = jax.nn.one_hot(jnp.argmax(p, axis=-1), p.shape[-1])
    expected = jax.jit(verify_greedy)(None, drafts, q, p)
    verdict = jax.jit(rule.verify)(jax.random.key(1), drafts, q, p)
    assert 0 < float(jnp.mean(expected.accepted)) < drafts.shape[1]
    np.testing.assert_array_equal(verdict.accepted, expected.accepted)
    np.testing.assert_array_equal(verdict.next_token, expected.next_token)


# --- Lossy at temperature 1 ----------------------------------------------------------------------


def test_both_rules_change_the_first_token_distribution():
    """k = 1, p = (0.6, 0.35, 0.05), x_1 ~ q uniform. Speculative sampling gives p (the control).
    Typical (threshold 0.09) always accepts tokens 0 and 1 and, after rejecting 2, samples p:
    (1/3 + 0.6/3, 1/3 + 0.35/3, 0.05/3) = (0.533, 0.45, 0.017). SpecDec accepts 0 and 1 (gap
    0.54) and replaces 2 (gap 2.48) by the top-1: (2/3, 1/3, 0)."""
    trials = 30_000
    p = jnp.asarray([[0.6, 0.35, 0.05]] * 2, jnp.float32)
    q = jnp.full((1, 3), 1 / 3, jnp.float32)
    drafts = jax.random.randint(jax.random.key(0), (trials, 1), 0, 3)
    args = (drafts, jnp.broadcast_to(q, (trials, 1, 3)), jnp.broadcast_to(p, (trials, 2, 3)))

    def first_tokens(verify):
        verdict = jax.jit(verify)(jax.random.key(1), *args)
        return np.asarray(jnp.where(verdict.accepted > 0, drafts[:, 0], verdict.next_token))

    target = np.array([0.6, 0.35, 0.05])
    assert chi_square_pvalue(first_tokens(verify_sampling), target) > 1e-3
    typical = first_tokens(LossyTypical().verify)
    assert chi_square_pvalue(typical, target) < 1e-6
    assert chi_square_pvalue(typical, [1 / 3 + 0.6 / 3, 1 / 3 + 0.35 / 3, 0.05 / 3]) > 1e-3
    specdec = first_tokens(LossySpecDec().verify)
    assert chi_square_pvalue(specdec, [2 / 3, 1 / 3, 0]) > 1e-3


@pytest.mark.slow
def test_typical_decoding_misses_the_exact_target_distribution():
    """End to end on the models where every lossless chain passes (test_decode): rejected."""
    target = random_model(SMALL, seed=11, scale=3.0)
    drafter = random_model(SMALL, seed=12, scale=3.0)
    sampling = Sampling(temperature=1.0)
    codes = _sample_codes(
        lambda prompts, key: jspec.speculative_generate(
            target,
            drafter,
            prompts,
            max_new_tokens=3,
            strategy=jspec.Chain(k=2, verifier=LossyTypical()),
            sampling=sampling,
            rng=key,
        )
    )
    assert chi_square_pvalue(codes, _exact_first3(target, sampling)) < 1e-6


# --- End to end at temperature 0 -----------------------------------------------------------------


@pytest.fixture(scope="module")
def greedy_case(tiny_target):
    """Ragged prompts [4, 6], a drafter that often agrees with the target, and a function that
    decodes 20 tokens at temperature 0 with a lossy rule."""
    prompts = np.asarray(jax.random.randint(jax.random.key(2), (4, 6), 0, TINY.vocab_size), np.int32)
    lengths = np.array([6, 3, 5, 2], np.int32)
    drafter = perturbed(tiny_target, 0.3, seed=1)

    def run(rule):
        return jspec.speculative_generate(
            tiny_target,
            drafter,
            prompts,
            prompt_lengths=lengths,
            max_new_tokens=20,
            strategy=jspec.Chain(k=4, verifier=rule),
        )

    return prompts, lengths, run


@pytest.mark.parametrize("rule", [LossySpecDec(beta=1), LossyTypical()], ids=repr)
def test_greedy_variants_equal_greedy_autoregressive(tiny_target, greedy_case, rule):
    prompts, lengths, run = greedy_case
    out = run(rule)
    expected = jspec.generate(tiny_target, prompts, prompt_lengths=lengths, max_new_tokens=20)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
    np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(expected.lengths))
    assert float(out.stats.mean_accepted) > 1.0  # drafts were accepted, not just target tokens


@pytest.mark.slow
def test_specdec_at_temperature_0_emits_only_tolerated_tokens(tiny_target, greedy_case):
    """Relaxed greedy: every output token is within the target's top-3 with a logit gap <= 1 to
    its top-1, and some are not the top-1 (so it is not greedy decoding). Checked by one causal
    target pass over each prompt + output."""
    prompts, lengths, run = greedy_case
    out = run(LossySpecDec(beta=3, tol=1.0))
    tokens = np.asarray(out.tokens)
    assert (np.asarray(out.lengths) == 20).all()

    b, width = prompts.shape[0], prompts.shape[1] + 20
    seqs = np.zeros((b, width), np.int32)
    for row in range(b):
        seqs[row, : lengths[row] + 20] = np.concatenate([prompts[row, : lengths[row]], tokens[row]])
    logits, _ = forward(
        tiny_target,
        jnp.asarray(seqs),
        jnp.broadcast_to(jnp.arange(width), (b, width)),
        causal_mask(b, width),
        init_cache(TINY, b, width),
    )
    at = lengths[:, None] - 1 + np.arange(20)[None, :]  # the position predicting each output token
    step_logits = np.asarray(logits, np.float64)[np.arange(b)[:, None], at]  # [B, 20, V]
    chosen = np.take_along_axis(step_logits, tokens[..., None], axis=-1)[..., 0]
    gap = step_logits.max(-1) - chosen
    rank = (step_logits > chosen[..., None] + 1e-4).sum(-1)
    assert (gap <= 1.0 + 1e-3).all() and (rank < 3).all()
    assert (gap > 1e-3).any()  # some emitted token is not the target's top-1


# --- Opt-in only ---------------------------------------------------------------------------------


def test_a_chain_is_lossy_only_when_given_a_rule_object():
    chain = jspec.Chain(k=4, verifier=LossyTypical())
    assert chain.lossy and "LossyTypical(eps=0.09, delta=0.3)" in repr(chain)
    assert chain == jspec.Chain(k=4, verifier=LossyTypical()) and hash(chain) == hash(jspec.Chain(4, LossyTypical()))
    assert chain.verify_rule.__func__ is LossyTypical.verify and chain.verify_rule.__self__ == LossyTypical()
    specdec = jspec.Chain(k=2, verifier=LossySpecDec(beta=2, tol=0.5))
    assert specdec.lossy and "LossySpecDec(beta=2, tol=0.5)" in repr(specdec)
    assert specdec.scoring(Sampling()) == Sampling(temperature=1.0)  # logit gaps at temperature 0
    assert specdec.scoring(Sampling(temperature=0.7)) == Sampling(temperature=0.7)
    for sampling in (Sampling(), Sampling(temperature=1.0)):
        chain.check(sampling)  # defined at any temperature
        specdec.check(sampling)


@pytest.mark.parametrize("name", ["typical", "specdec", "LossyTypical", "LossySpecDec", "lossy", "spec_dec"])
def test_no_string_selects_a_lossy_rule(name):
    with pytest.raises(ValueError, match="verifier must be one of"):
        jspec.Chain(k=4, verifier=name)


def test_every_default_and_named_strategy_is_lossless():
    for name, rule in CHAIN_VERIFIERS.items():
        assert rule.__module__ == "jspec.verify.chain" and not isinstance(getattr(rule, "__self__", None), LossyVerifier)
        chain = jspec.Chain(k=3, verifier=name)
        assert not chain.lossy and chain.verify_rule is rule and chain.scoring(Sampling(0.5)) == Sampling(0.5)
    assert not inspect.signature(jspec.speculative_generate).parameters["strategy"].default.lossy
    # Every public strategy class, constructed with its defaults (SequoiaTree is built for a
    # measured acceptance vector, RSD for a chosen variant, AdaptiveK and SmartSpec for measured costs: they have none).
    public = {
        name
        for name in jspec.__all__
        if isinstance(getattr(jspec, name), type) and issubclass(getattr(jspec, name), SpeculativeStrategy)
    }
    make = {name: getattr(jspec, name) for name in public}
    make["SequoiaTree"] = lambda: jspec.SequoiaTree((0.6, 0.2), size=8, max_depth=4)
    make["RSD"] = lambda: jspec.RSD(beam=2, depth=3)
    make["AdaptiveK"] = lambda: jspec.AdaptiveK.from_costs(1.0, (10.0, 11.0, 12.0, 13.0))
    make["SmartSpec"] = lambda: jspec.SmartSpec.from_costs(1.0, (10.0, 11.0, 12.0, 13.0))
    assert public == {
        "Chain", "StaticTree", "SequoiaTree", "DynamicTree", "RSD", "MultiCandidate", "EagleTree",
        "PromptLookup", "Rest", "RASD", "AdaptiveK", "SmartSpec",
    }  # fmt: skip
    for name, build in make.items():
        strategy = build()
        assert not getattr(strategy, "lossy", False), name
        assert not isinstance(getattr(strategy, "verifier", None), LossyVerifier), name
        if isinstance(strategy, TreeStrategy):
            for sampling in (Sampling(), Sampling(temperature=1.0)):
                verify = strategy.verifier(sampling)
                assert not isinstance(getattr(verify, "__self__", None), LossyVerifier), name


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: LossyTypical(eps=0.0), "eps must be a number in \\(0, 1\\), got 0.0"),
        (lambda: LossyTypical(eps=1.0), "eps must be .* got 1.0"),
        (lambda: LossyTypical(eps=float("nan")), "eps must be .* got nan"),
        (lambda: LossyTypical(eps="0.1"), "eps must be .* got '0.1'"),
        (lambda: LossyTypical(delta=0), "delta must be a finite number > 0, got 0"),
        (lambda: LossyTypical(delta=float("inf")), "delta must be .* got inf"),
        (lambda: LossyTypical(delta=True), "delta must be .* got True"),
        (lambda: LossySpecDec(beta=0), "beta must be an int >= 1, got 0"),
        (lambda: LossySpecDec(beta=2.0), "beta must be .* got 2.0"),
        (lambda: LossySpecDec(beta=True), "beta must be .* got True"),
        (lambda: LossySpecDec(tol=-0.5), "tol must be a finite number >= 0, got -0.5"),
        (lambda: LossySpecDec(tol=float("inf")), "tol must be .* got inf"),
        (lambda: jspec.Chain(k=2, verifier=LossyTypical), "verifier must be one of .* got <class"),
        (lambda: jspec.Chain(k=2, verifier=["sampling"]), "verifier must be one of .* got \\['sampling'\\]"),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()
