"""jspec.RSD (Recursive Speculative Decoding): RSD-S greedy decoding equals target greedy, its tree at
temperature 0 is the exact beam search and an identical drafter keeps the longest greedy prefix the
beam holds; RSD-C drafts StaticTree's Gumbel-top-k tree; sampled decoding has the target's exact
distribution; the truncated-Gumbel conditioning is right; bad arguments are rejected."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from test_decode import first3_pvalue
from test_dynamic_tree import (
    GREEDY_LENGTHS,
    GREEDY_PROMPTS,
    PROMPTS,
    assert_greedy,
    drafted_tree,
    node_paths,
    reference_logprobs,
)

import jspec
from jspec.methods import rsd
from jspec.methods.rsd import RSD, top_perturbed, truncated_gumbel
from jspec.sampling import Sampling
from jspec.verify.tree import verify_tree_greedy, verify_tree_without_replacement

from conftest import chi_square_pvalue, perturbed

BEAM = RSD(beam=2, depth=3)


def test_greedy_beam_decoding_equals_greedy_autoregressive(tiny_target):
    for noise in (0.3, 1.0):
        drafter = perturbed(tiny_target, noise, seed=1)
        out = jspec.speculative_generate(
            tiny_target, drafter, GREEDY_PROMPTS, prompt_lengths=GREEDY_LENGTHS, max_new_tokens=20, strategy=BEAM
        )
        assert_greedy(tiny_target, out, 20)


def reference_beams(model, prefix, beam: int, depth: int) -> list[list[tuple]]:
    """Beam search by hand from causal passes: per level the `beam` best (path, log-probability)
    extensions of the level above, best first."""
    levels, frontier = [], [((), 0.0)]
    for _ in range(depth):
        candidates = [
            (path + (x,), logp + logq[x])
            for path, logp in frontier
            for logq in [reference_logprobs(model, prefix + list(path))]
            for x in range(len(logq))
        ]
        frontier = sorted(candidates, key=lambda c: -c[1])[:beam]
        levels.append(frontier)
    return levels


def test_greedy_tree_is_the_exact_beam_search(tiny_target):
    tokens, parent, valid = drafted_tree(BEAM, tiny_target, Sampling())
    assert valid.all()
    for row in range(PROMPTS.shape[0]):
        paths = node_paths(tokens, parent, valid, row)
        levels = reference_beams(tiny_target, list(PROMPTS[row]), BEAM.beam, BEAM.depth)
        for level, best in enumerate(levels):
            got = paths[1 + level * BEAM.beam : 1 + (level + 1) * BEAM.beam]
            assert sorted(got) == sorted(path for path, _ in best)
            # Grouped by parent, and within a parent best first (the order a verifier tries them).
            rank = {path: i for i, (path, _) in enumerate(best)}
            assert got == sorted(got, key=lambda path: (paths.index(path[:-1]), rank[path]))


def test_identical_drafter_keeps_the_longest_greedy_prefix_in_the_beam(tiny_target):
    """With drafter = target at temperature 0 every round emits 1 + the longest prefix of the greedy
    continuation that the beam kept: L + 1 tokens when the greedy path survives, fewer when beam search
    drops it (so tau can be below L + 1, unlike a tree that holds every top-1 child)."""
    out = jspec.speculative_generate(
        tiny_target, tiny_target, GREEDY_PROMPTS, prompt_lengths=GREEDY_LENGTHS, max_new_tokens=20, strategy=BEAM
    )
    assert_greedy(tiny_target, out, 20)
    tokens, emitted = np.asarray(out.tokens), np.asarray(out.stats.emitted_per_round)
    seen = []
    for row in range(len(GREEDY_PROMPTS)):
        prompt, done = list(GREEDY_PROMPTS[row, : GREEDY_LENGTHS[row]]), 1  # prefill emitted one token
        for rnd in range(3):  # the rounds whose greedy continuation lies within the output
            prefix = prompt + list(tokens[row, :done])
            kept = [path for path, _ in sum(reference_beams(tiny_target, prefix, BEAM.beam, BEAM.depth), [])]
            accepted = max(depth for depth in range(BEAM.depth + 1) if tuple(tokens[row, done : done + depth]) in kept + [()])
            assert emitted[row, rnd] == accepted + 1
            seen.append(accepted)
            done += accepted + 1
    assert BEAM.depth in seen and min(seen) < BEAM.depth  # both cases occur here, so both are checked


def test_constant_branching_drafts_static_trees_gumbel_top_k(monkeypatch):
    """RSD-C is `draft_fixed_shape` with StaticTree's breadth-first shape and Gumbel-top-k children, so
    StaticTree's tests (greedy equality, distribution) cover its drafting."""
    calls = []
    monkeypatch.setattr(rsd, "draft_fixed_shape", lambda *args: calls.append(args) or "drafted")
    strategy = RSD(branching=(3, 2))
    assert strategy.draft("drafter", "state", "last", "sampling", "key") == "drafted"
    ((shape, mode, *rest),) = calls
    expected = jspec.StaticTree((3, 2), children="without_replacement").shape
    assert mode == "without_replacement" and rest == ["drafter", "state", "last", "sampling", "key"]
    np.testing.assert_array_equal(shape.parent, expected.parent)
    assert shape.level_starts == expected.level_starts
    assert (strategy.size, strategy.max_depth, strategy.tokens_per_round, strategy.tokens_scored) == (10, 2, 3, 10)
    assert strategy.verifier(Sampling(temperature=1.0)) is verify_tree_without_replacement
    assert strategy.verifier(Sampling()) is verify_tree_greedy


def test_truncated_gumbel_sets_the_max_and_keeps_the_order():
    g = jax.random.gumbel(jax.random.key(0), (5, 16)) + jax.nn.log_softmax(jax.random.normal(jax.random.key(1), (5, 16)))
    g = g.at[:, 3].set(-jnp.inf)  # outside the support
    parent = jnp.asarray([0.0, -3.0, 2.0, -40.0, -jnp.inf])
    out, g = np.asarray(truncated_gumbel(parent, g)), np.asarray(g)
    np.testing.assert_allclose(out[:4].max(axis=1), parent[:4], rtol=1e-6)
    # The order is kept; far below the parent float32 rounds children to ties (row 3), hence G as tie-break.
    np.testing.assert_array_equal(np.argsort(-out[:3], axis=1, kind="stable"), np.argsort(-g[:3], axis=1, kind="stable"))
    assert (np.diff(out[3][np.argsort(-g[3])]) <= 0).all()
    assert np.isneginf(out[:, 3]).all() and np.isneginf(out[4]).all()
    t, g64 = np.asarray(parent[:4, None], np.float64), g[:4].astype(np.float64)
    naive = -np.log(np.exp(-t) - np.exp(-g64.max(1, keepdims=True)) + np.exp(-g64))  # the formula, in float64
    np.testing.assert_allclose(out[:4], naive, rtol=1e-5, atol=1e-5)


def test_truncated_gumbel_has_the_conditioned_law():
    """Kool et al.: the truncated children are Gumbels (locations log q) conditioned on their max being
    the parent's T = 0. Given the argmax i ~ q, the others are then Gumbels truncated below 0, so the
    second largest has CDF exp(-m e^-t) / exp(-m) for t < 0 with m = 1 - q(i)."""
    q = jnp.asarray([0.5, 0.3, 0.2])
    n = 200_000
    g = jnp.log(q) + jax.random.gumbel(jax.random.key(2), (n, 3))
    out = np.asarray(truncated_gumbel(jnp.full((n,), 0.0), g))
    second = np.sort(out, axis=1)[:, -2]
    t = np.array([-2.0, -1.0, -0.5, -0.2])
    cdf = sum(qi * np.exp(-(1 - qi) * np.exp(-t)) / np.exp(-(1 - qi)) for qi in np.asarray(q))
    np.testing.assert_allclose((second[:, None] < t).mean(axis=0), cdf, atol=5e-3)


@pytest.mark.parametrize("control", [False, True], ids=["top-down", "untruncated-control"])
def test_top_perturbed_has_the_law_of_the_top_two_gumbel_perturbed_log_probabilities(control):
    """Against brute force (V Gumbels, top 2): the token pairs and the joint law of the two values
    (the second's gap below the first, split by the first token) agree. The control draws the
    second value as an untruncated Gumbel of the remaining mass, which the same test rejects."""
    q = jnp.asarray([0.5, 0.3, 0.15, 0.05])
    n = 100_000
    values, tokens = top_perturbed(jax.random.key(3), jnp.broadcast_to(q, (n, 4)), 2)
    values, tokens = np.array(values), np.asarray(tokens)
    if control:
        rest = 1 - np.asarray(q)[tokens[:, 0]]
        values[:, 1] = np.log(rest) + np.asarray(jax.random.gumbel(jax.random.key(4), (n,)))
    brute_values, brute_tokens = (
        np.asarray(x) for x in jax.lax.top_k(jnp.log(q) + jax.random.gumbel(jax.random.key(5), (n, 4)), 2)
    )
    pair, brute_pair = tokens[:, 0] * 4 + tokens[:, 1], brute_tokens[:, 0] * 4 + brute_tokens[:, 1]
    assert chi_square_pvalue(pair, np.bincount(brute_pair, minlength=16) / n) > 1e-3
    pvalues = [stats.ks_2samp(values[:, 0], brute_values[:, 0]).pvalue]
    for first in (0, 1):  # the gap given the first token: truncation and independence together
        gap, brute_gap = values[:, 0] - values[:, 1], brute_values[:, 0] - brute_values[:, 1]
        pvalues.append(stats.ks_2samp(gap[tokens[:, 0] == first], brute_gap[brute_tokens[:, 0] == first]).pvalue)
    assert (min(pvalues) < 1e-6) if control else (min(pvalues) > 1e-3), pvalues


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [BEAM, RSD(branching=(2, 2))], ids=str)
def test_sampled_rsd_decoding_matches_exact_target_distribution(strategy):
    assert first3_pvalue(strategy) > 1e-3


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(), "beam"),
        (dict(beam=2), "depth"),
        (dict(depth=3), "beam"),
        (dict(beam=0, depth=3), "beam"),
        (dict(beam=2, depth=True), "depth"),
        (dict(branching=(2, 0)), "branching"),
        (dict(branching=[2, 2]), "branching"),
        (dict(branching=(2,), beam=2, depth=2), "branching"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RSD(**kwargs)


def test_sizes():
    s = RSD(beam=2, depth=3)
    assert (s.size, s.max_depth, s.tokens_per_round, s.tokens_scored) == (7, 3, 4, 7)
