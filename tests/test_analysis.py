"""jspec.analysis: each closed form against Monte Carlo simulation (fixed seed, a bound of 5
standard errors) or brute force, each with a negative control the same check rejects, and the
argument checks."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest

from jspec import analysis
from jspec.methods.sequoia import sequoia_tree
from jspec.trees.draft import FixedShape

from conftest import TINY, random_model

ROUNDS = 200_000


def leading_accepts(accepted: np.ndarray) -> np.ndarray:
    """[rounds, k] bool -> [rounds]: accepted drafts before the first rejection."""
    return np.cumprod(accepted, axis=1).sum(axis=1)


def simulate_chain(accept_probs, rounds: int, seed: int) -> np.ndarray:
    """Tokens emitted per round by a chain whose draft i is accepted with probability a_i given
    the drafts before it were: the first rejection ends the round; one more token is always emitted."""
    rng = np.random.default_rng(seed)
    return 1 + leading_accepts(rng.random((rounds, len(accept_probs))) < np.asarray(accept_probs))


def within(samples: np.ndarray, value: float, sigmas: float = 5.0) -> bool:
    return abs(samples.mean() - value) <= sigmas * samples.std() / math.sqrt(samples.size)


# --- chains -----------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha, k", [(0.6, 4), (0.9, 8), (0.3, 1), (0.99, 16)])
def test_expected_tau_matches_simulation(alpha, k):
    emitted = simulate_chain([alpha] * k, ROUNDS, seed=k)
    assert within(emitted, analysis.expected_tau(alpha, k))
    assert analysis.expected_tau(alpha, k) == pytest.approx(sum(alpha**i for i in range(k + 1)), rel=1e-12)


def test_a_wrong_acceptance_rate_is_rejected_by_the_same_simulation():
    emitted = simulate_chain([0.7] * 4, ROUNDS, seed=0)
    assert within(emitted, analysis.expected_tau(0.7, 4))
    assert not within(emitted, analysis.expected_tau(0.68, 4))
    assert not within(emitted, analysis.expected_tau(0.6, 4))


def test_expected_tau_edges_and_precision_near_one():
    assert analysis.expected_tau(1.0, 3) == 4.0 and analysis.expected_tau(0.0, 3) == 1.0
    # (1 - a^(k+1)) / (1 - a) evaluated naively loses digits as a -> 1; the sum does not.
    a, k = 1 - 1e-12, 10
    assert analysis.expected_tau(a, k) == pytest.approx(math.fsum(a**i for i in range(k + 1)), rel=1e-12)


def test_tau_of_real_speculative_sampling_is_expected_tau_of_one_minus_tv():
    """The acceptance-rate model against the rule itself (Leviathan et al. arXiv 2211.17192): context-free p, q
    on a vocabulary of 6, x_i ~ q accepted iff U_i <= p(x_i) / q(x_i); alpha = sum_x min(p, q)."""
    rng = np.random.default_rng(7)
    p, q = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
    k = 5
    x = rng.choice(6, size=(ROUNDS, k), p=q)
    emitted = 1 + leading_accepts(rng.random((ROUNDS, k)) * q[x] <= p[x])
    alpha = float(np.minimum(p, q).sum())
    assert within(emitted, analysis.expected_tau(alpha, k))
    assert not within(emitted, analysis.expected_tau(float(np.sqrt(p * q).sum()), k))  # a wrong overlap (Bhattacharyya)


def test_alpha_from_tau_inverts_expected_tau():
    for alpha, k in ((0.0, 1), (0.3, 2), (0.75, 4), (0.99, 8), (1.0, 3)):
        assert analysis.alpha_from_tau(analysis.expected_tau(alpha, k), k) == pytest.approx(alpha, abs=1e-9)
    assert analysis.alpha_from_tau(1.5, 2) < analysis.alpha_from_tau(1.5, 1)  # the same tau from more drafts: lower alpha
    with pytest.raises(ValueError, match="tau"):
        analysis.alpha_from_tau(4.5, 3)
    with pytest.raises(ValueError, match="k"):
        analysis.alpha_from_tau(1.5, 0)


def test_position_dependent_tau_matches_simulation():
    a = [0.9, 0.7, 0.5, 0.2]
    emitted = simulate_chain(a, ROUNDS, seed=1)
    assert within(emitted, analysis.expected_tau_from_acceptance(a))
    assert analysis.expected_tau_from_acceptance(a) == pytest.approx(1 + 0.9 + 0.63 + 0.315 + 0.063)
    assert not within(emitted, analysis.expected_tau_from_acceptance(a[::-1]))
    assert analysis.expected_tau_from_acceptance([0.8] * 5) == pytest.approx(analysis.expected_tau(0.8, 5))


# --- speedup and the best k -------------------------------------------------------------------


def test_speedup_by_hand():
    # alpha 0.5, k 2, c 0.25: tau = 1 + 0.5 + 0.25 = 1.75 over 2 * 0.25 + 1 = 1.5
    assert analysis.speedup(0.5, 2, 0.25) == pytest.approx(1.75 / 1.5)
    assert analysis.speedup(0.9, 7, 0.0) == pytest.approx(analysis.expected_tau(0.9, 7))  # free drafting


def _speedup_independently(alpha: float, k: int, c: float) -> float:
    return sum(alpha**i for i in range(k + 1)) / (k * c + 1)


def test_best_k_is_the_brute_force_argmax():
    for alpha in (0.0, 0.2, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0):
        for c in (0.0, 0.01, 0.05, 0.1, 0.3, 1.0, 2.0):
            values = [_speedup_independently(alpha, k, c) for k in range(1, 33)]
            best = analysis.best_k(alpha, c, k_max=32)
            assert values[best - 1] == pytest.approx(max(values), rel=1e-12), (alpha, c)
            own = [analysis.speedup(alpha, k, c) for k in range(1, 33)]
            assert all(v < own[best - 1] for v in own[: best - 1]), (alpha, c)  # the first maximum: ties to the smaller k
    assert analysis.best_k(0.8, 0.1) == 6  # 2.4696 at k 6, 2.4595 at k 5, 2.4477 at k 7
    assert analysis.best_k(1.0, 1.0) == 1  # (k + 1) / (k + 1): every k ties exactly; the smallest wins
    assert analysis.best_k(0.0, 0.0) == 1  # every k gives 1
    assert analysis.best_k(1.0, 0.0, k_max=9) == 9  # free drafts, always accepted: draft as far as allowed
    assert analysis.best_k(0.95, 0.01) > analysis.best_k(0.6, 0.01)  # a better drafter drafts further


@pytest.mark.parametrize("alpha, c", [(0.8, 0.1), (0.7, 0.2)])
def test_best_k_is_the_argmax_of_the_simulated_speedup(alpha, c):
    """A simulated run per k (the same random numbers for every k): each round costs k drafter steps
    (c each) and one target pass (1), AR costs 1 per token, so speedup = tokens / time."""
    k_max = 12
    rng = np.random.default_rng(11)
    run = leading_accepts(rng.random((ROUNDS, k_max)) < alpha)  # a round with k drafts accepts min(run, k)
    simulated = np.empty(k_max)
    for k in range(1, k_max + 1):
        emitted = 1 + np.minimum(run, k)
        simulated[k - 1] = emitted.sum() / (emitted.size * (k * c + 1))
        assert within(emitted / (k * c + 1), analysis.speedup(alpha, k, c))
    assert int(np.argmax(simulated)) + 1 == analysis.best_k(alpha, c, k_max=k_max)
    assert int(np.argmax(simulated)) + 1 != analysis.best_k(alpha, c / 4, k_max=k_max)  # control: other costs, other k


def test_speedup_from_costs_by_hand():
    # tau 3, drafting 2 ms, a 5-token target pass 4 ms, a 1-token pass 3 ms: 3 * 3 / (2 + 4) = 1.5
    assert analysis.speedup_from_costs(3.0, 2.0, 4.0, 3.0) == pytest.approx(1.5)
    assert analysis.speedup_from_costs(2.5, 0.0, 1.25, 1.0) == pytest.approx(2.0)  # model-free drafting
    assert analysis.speedup_from_costs(analysis.expected_tau(0.8, 4), 4 * 0.1, 1.0, 1.0) == pytest.approx(
        analysis.speedup(0.8, 4, 0.1)
    )


def test_infer_timing_uses_the_same_formula():
    from infer.timing import theoretical_round_speedup

    # theoretical_round_speedup(tau, t_target_1, t_verify, t_draft_round): distinct values catch a swap.
    assert theoretical_round_speedup(3.0, 3.0, 4.0, 2.0) == analysis.speedup_from_costs(3.0, 2.0, 4.0, 3.0) == 1.5
    with pytest.raises(ValueError, match="t_draft_round"):
        theoretical_round_speedup(3.0, 3.0, 4.0, -2.0)


# --- memory-bound speedup ---------------------------------------------------------------------


def test_mbsu_by_hand_and_against_simulated_weight_reads():
    assert analysis.mbsu(3.0, 4, 1.0, 8.0) == pytest.approx(3.0 / 1.5)
    # A simulated run bound by weight reads: a round reads the drafter k times and the target once.
    k, n_draft, n_target = 4, 30.0, 400.0
    emitted = simulate_chain([0.75] * k, ROUNDS, seed=5)
    per_round = emitted * n_target / (k * n_draft + n_target)  # AR reads n_target per token
    assert within(per_round, analysis.mbsu(analysis.expected_tau(0.75, k), k, n_draft, n_target))
    assert not within(per_round, analysis.mbsu(analysis.expected_tau(0.75, k), k, 2 * n_draft, n_target))


def test_vocab_trim_memory_bound_speedup_is_mbsu():
    from jspec.training.vocab_trim import memory_bound_speedup, weights_read_per_token

    target, drafter = random_model(TINY, seed=0), random_model(dataclasses.replace(TINY, n_layers=1), seed=1)
    n_target, n_draft = weights_read_per_token(target), weights_read_per_token(drafter)
    assert n_draft < n_target
    expected = 2.5 / (1 + 3 * n_draft / n_target)
    assert memory_bound_speedup(2.5, 3, drafter, target) == pytest.approx(expected, rel=1e-12)
    assert analysis.mbsu(2.5, 3, n_draft, n_target) == memory_bound_speedup(2.5, 3, drafter, target)


# --- the Sequoia objective --------------------------------------------------------------------


def _children_table(parents) -> np.ndarray:
    """int `[n, max children]`: row v lists v's children in rank order, -1 past the last."""
    parents = list(parents)
    kids = [[c for c in range(len(parents)) if parents[c] == v] for v in range(len(parents))]
    table = -np.ones((len(parents), max(1, max(map(len, kids)))), np.int64)
    for v, cs in enumerate(kids):
        table[v, : len(cs)] = cs
    return table


def simulate_tree(acceptance, parents, rounds: int, seed: int, conditional: bool = False) -> np.ndarray:
    """Tokens emitted per round on a tree, walking from the root (always accepted, counting 1).

    Positional model of jspec.methods.sequoia (conditional=False): at an accepted node its children are
    tried in rank order and the rank-r child is THE accepted one with probability acceptance[r]
    (exclusive events, so child r is accepted with probability a_r / (1 - a_1 - ... - a_{r-1})
    given the earlier ranks were rejected); ranks past len(acceptance) are never accepted. The walk
    stops at a node none of whose children is accepted. conditional=True is the other reading,
    acceptance[r] = P(rank r accepted | ranks < r rejected): a negative control.
    """
    rng = np.random.default_rng(seed)
    table = _children_table(parents)
    width = table.shape[1]
    a = np.zeros(width)
    a[: min(width, len(acceptance))] = np.asarray(acceptance, np.float64)[:width]
    if conditional:
        a = a * np.concatenate([[1.0], np.cumprod(1 - a)[:-1]])  # unconditional P(rank r is the one)
    edges = np.cumsum(a)
    node = np.zeros(rounds, np.int64)
    emitted = np.ones(rounds)
    active = np.ones(rounds, bool)
    while active.any():
        rank = np.searchsorted(edges, rng.random(rounds), side="right")  # width: no child accepted
        child = np.where(rank < width, table[node, np.minimum(rank, width - 1)], -1)
        active &= child >= 0
        node = np.where(active, child, node)
        emitted += active
    return emitted


TREES = [
    ((0.6, 0.2, 0.1), [-1, 0, 0, 1, 1, 2, 3]),  # root, two children, grandchildren, a great-grandchild
    ((0.5, 0.25), [-1, 0, 0, 0, 1, 1, 2]),  # the root's third child has rank 3 > len(acceptance): never accepted
    ((0.7,), [-1, 0, 1, 2, 3]),  # a chain
]


@pytest.mark.parametrize("acceptance, parents", TREES)
def test_tree_value_matches_simulation(acceptance, parents):
    emitted = simulate_tree(acceptance, parents, ROUNDS, seed=len(parents))
    value = analysis.tree_value(acceptance, parents)
    assert within(emitted, value)
    assert not within(emitted, analysis.tree_value(tuple(0.8 * x for x in acceptance), parents))


def test_tree_value_rejects_the_conditional_reading_of_acceptance():
    """The same check tells the two readings of the acceptance vector apart on a bushy tree."""
    acceptance, parents = (0.5, 0.3, 0.2), [-1, 0, 0, 0, 1, 1, 1, 2, 2, 4]
    value = analysis.tree_value(acceptance, parents)
    assert within(simulate_tree(acceptance, parents, ROUNDS, seed=0), value)
    assert not within(simulate_tree(acceptance, parents, ROUNDS, seed=0, conditional=True), value)


def test_the_dp_tree_attains_best_tree_value_in_simulation():
    acceptance, size, depth = (0.55, 0.2, 0.1, 0.05), 12, 4
    parents, value = sequoia_tree(acceptance, size, depth)
    assert analysis.best_tree_value(acceptance, size, depth) == pytest.approx(value, rel=1e-12)
    assert analysis.tree_value(acceptance, parents) == pytest.approx(value, rel=1e-12)
    assert within(simulate_tree(acceptance, parents, ROUNDS, seed=2), value)


def _breadth_first_trees(n: int):
    for tail in itertools.product(*(range(i) for i in range(1, n))):
        try:
            yield FixedShape.from_parents([-1, *tail])
        except ValueError:  # not breadth-first
            continue


def _value_independently(acceptance, shape: FixedShape) -> float:
    reach = [1.0]
    for i in range(1, shape.size):
        r = int(shape.rank[i])
        reach.append(reach[shape.parent[i]] * (acceptance[r] if r < len(acceptance) else 0.0))
    return math.fsum(reach)


@pytest.mark.parametrize("acceptance", [(0.6, 0.2, 0.1), (0.4, 0.35, 0.25), (0.9,)])
def test_best_tree_value_is_the_brute_force_maximum(acceptance):
    shapes = [s for n in range(1, 8) for s in _breadth_first_trees(n)]
    for shape in shapes:
        assert analysis.tree_value(acceptance, shape.parent) == pytest.approx(_value_independently(acceptance, shape))
    for size in range(1, 8):
        for depth in range(0, 7):
            best = max(_value_independently(acceptance, s) for s in shapes if s.size <= size and s.max_depth <= depth)
            assert analysis.best_tree_value(acceptance, size, depth) == pytest.approx(best, rel=1e-12), (size, depth)


def test_a_chain_tree_is_expected_tau():
    assert analysis.tree_value((0.7,), [-1, 0, 1, 2]) == pytest.approx(analysis.expected_tau(0.7, 3))
    assert analysis.best_tree_value((0.7,), 4, 3) == pytest.approx(analysis.expected_tau(0.7, 3))


# --- argument checks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: analysis.expected_tau(1.5, 4), "alpha"),
        (lambda: analysis.expected_tau(-0.1, 4), "alpha"),
        (lambda: analysis.expected_tau(math.nan, 4), "alpha"),
        (lambda: analysis.expected_tau(True, 4), "alpha"),
        (lambda: analysis.expected_tau(0.5, 0), "k"),
        (lambda: analysis.expected_tau(0.5, 2.0), "k"),
        (lambda: analysis.expected_tau_from_acceptance([0.5, 1.2]), "accept_probs"),
        (lambda: analysis.expected_tau_from_acceptance([]), "accept_probs"),
        (lambda: analysis.expected_tau_from_acceptance(0.5), "accept_probs"),
        (lambda: analysis.speedup(0.5, 2, -1.0), "cost_ratio"),
        (lambda: analysis.speedup(0.5, 0, 0.1), "k"),
        (lambda: analysis.best_k(0.5, 0.1, k_max=0), "k_max"),
        (lambda: analysis.best_k(1.1, 0.1), "alpha"),
        (lambda: analysis.best_k(0.5, -0.1), "cost_ratio"),
        (lambda: analysis.speedup_from_costs(-1.0, 1.0, 1.0, 1.0), "tau"),
        (lambda: analysis.speedup_from_costs(2.0, -1.0, 1.0, 1.0), "t_draft_round"),
        (lambda: analysis.speedup_from_costs(2.0, 1.0, 0.0, 1.0), "t_target_n"),
        (lambda: analysis.speedup_from_costs(2.0, 1.0, 1.0, -1.0), "t_target_1"),
        (lambda: analysis.mbsu(-1.0, 2, 1.0, 1.0), "tau"),
        (lambda: analysis.mbsu(2.0, 0, 1.0, 1.0), "k"),
        (lambda: analysis.mbsu(2.0, 2, -1.0, 1.0), "draft_weights"),
        (lambda: analysis.mbsu(2.0, 2, 1.0, 0.0), "target_weights"),
        (lambda: analysis.tree_value((0.7, 0.5), [-1, 0, 0]), "sum to at most 1"),
        (lambda: analysis.tree_value((0.2, 0.5), [-1, 0, 0]), "non-increasing"),
        (lambda: analysis.tree_value((0.5,), [-1, 0, 0, 1, 0]), "parents"),  # not breadth-first
        (lambda: analysis.best_tree_value((0.5,), 0, 2), "size"),
        (lambda: analysis.best_tree_value((0.5,), 3, -1), "max_depth"),
        (lambda: analysis.pearl_speedup(1.2, 4, 1.0, 4.0, 4.0), "alpha"),
        (lambda: analysis.pearl_speedup(0.5, 0, 1.0, 4.0, 4.0), "gamma"),
        (lambda: analysis.pearl_speedup(0.5, 4, -1.0, 4.0, 4.0), "t_draft"),
        (lambda: analysis.pearl_speedup(0.5, 4, 1.0, 0.0, 4.0), "t_target_gamma"),
        (lambda: analysis.pearl_speedup(0.5, 4, 1.0, 4.0, float("nan")), "t_target_1"),
        (lambda: analysis.ssd_speedup(0.5, 4, -0.1, 1.0, 4.0, 4.0), "hit_rate"),
        (lambda: analysis.ssd_speedup(0.5, 4, 0.5, 1.0, 4.0, 4.0, t_predraft=-1.0), "t_predraft"),
        (lambda: analysis.ssd_speedup(0.5, 0, 0.5, 1.0, 4.0, 4.0), "k"),
    ],
)
def test_bad_arguments_raise_naming_them(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_best_k_from_costs_is_best_k_when_the_target_pass_cost_is_flat():
    from jspec.analysis import best_k, best_k_from_costs

    for alpha in (0.0, 0.3, 0.6, 0.8, 0.95, 1.0):
        for c in (0.0, 0.05, 0.2, 1.0):
            assert best_k_from_costs(alpha, c, [1.0] * 9) == best_k(alpha, c, k_max=8)
    # A target pass that grows with the tokens scored shortens the best chain.
    assert best_k_from_costs(0.8, 0.05, [1.0 + 0.2 * n for n in range(9)]) < best_k(0.8, 0.05, k_max=8)
    for bad in ([1.0], [1.0, 0.0], "ab"):
        with pytest.raises(ValueError, match="t_target"):
            best_k_from_costs(0.5, 0.1, bad)


# --- parallel drafting ------------------------------------------------------------------------


def simulate_pearl(alpha, gamma, t_draft, t_target_gamma, t_target_1, batches: int, steps: int, seed: int) -> np.ndarray:
    """Speedup over autoregressive decoding of `batches` PEARL runs of `steps` steps each, played
    out draft by draft: a pre-verify step verifies x1 while the drafter drafts gamma tokens; a verify
    step checks the pending drafts while the drafter drafts gamma more past them."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        tokens, seconds, verifying, pending = 0, 0.0, False, 0
        for _ in range(steps):
            if not verifying:
                seconds += max(gamma * t_draft, t_target_1)
                tokens += 1  # x1 if accepted, else the correction
                verifying, pending = rng.random() < alpha, gamma - 1
                continue
            seconds += max(gamma * t_draft, t_target_gamma)
            accepted = 0
            while accepted < pending and rng.random() < alpha:
                accepted += 1
            if accepted == pending:
                tokens, pending = tokens + pending, gamma
            else:
                tokens, verifying = tokens + accepted + 1, False
        out.append(tokens * t_target_1 / seconds)
    return np.asarray(out)


@pytest.mark.parametrize(
    "alpha, gamma, t_draft, t_target_gamma, t_target_1",
    [(0.8, 4, 1.0, 4.5, 4.0), (0.5, 3, 2.0, 5.0, 5.0), (0.95, 6, 0.5, 2.0, 2.0), (0.3, 2, 1.0, 1.0, 1.0)],
)
def test_pearl_speedup_matches_a_step_by_step_simulation(alpha, gamma, t_draft, t_target_gamma, t_target_1):
    simulated = simulate_pearl(alpha, gamma, t_draft, t_target_gamma, t_target_1, batches=200, steps=1000, seed=gamma)
    assert within(simulated, analysis.pearl_speedup(alpha, gamma, t_draft, t_target_gamma, t_target_1))
    # The negative control: the same runs reject a slightly different acceptance rate.
    assert not within(simulated, analysis.pearl_speedup(alpha - 0.03, gamma, t_draft, t_target_gamma, t_target_1))


def test_pearl_speedup_at_the_edges():
    # Nothing accepted: every step a pre-verify emitting one token; all accepted: gamma per verify step.
    assert analysis.pearl_speedup(0.0, 4, 1.0, 6.0, 4.0) == pytest.approx(1.0)
    assert analysis.pearl_speedup(0.0, 4, 2.0, 6.0, 4.0) == pytest.approx(4.0 / 8.0)
    assert analysis.pearl_speedup(1.0, 4, 1.0, 6.0, 4.0) == pytest.approx(4 * 4.0 / 6.0)
    # With the drafter's gamma steps as long as a target pass, PEARL beats the sequential chain of gamma drafts.
    for alpha in (0.5, 0.8, 0.95):
        sequential = analysis.speedup_from_costs(analysis.expected_tau(alpha, 4), 4 * 1.0, 4.0, 4.0)
        assert analysis.pearl_speedup(alpha, 4, 1.0, 4.0, 4.0) > sequential


def simulate_ssd(alpha, k, hit_rate, t_draft, t_target_n, t_target_1, t_predraft, batches: int, rounds: int, seed: int):
    """Speedup of `batches` runs of `rounds` SSD rounds: a hit skips drafting, a miss drafts k first."""
    rng = np.random.default_rng(seed)
    emitted = simulate_chain([alpha] * k, batches * rounds, seed).reshape(batches, rounds)
    miss = rng.random((batches, rounds)) >= hit_rate
    seconds = max(t_target_n, t_predraft) + miss * k * t_draft
    return emitted.sum(axis=1) * t_target_1 / seconds.sum(axis=1)


@pytest.mark.parametrize("alpha, k, hit_rate, t_predraft", [(0.8, 4, 0.6, 0.0), (0.6, 3, 0.3, 6.0), (0.9, 6, 0.9, 2.0)])
def test_ssd_speedup_matches_simulation(alpha, k, hit_rate, t_predraft):
    costs = dict(t_draft=1.0, t_target_n=5.0, t_target_1=4.0, t_predraft=t_predraft)
    simulated = simulate_ssd(alpha, k, hit_rate, **costs, batches=200, rounds=1000, seed=k)
    assert within(simulated, analysis.ssd_speedup(alpha, k, hit_rate, **costs))
    assert not within(simulated, analysis.ssd_speedup(alpha, k, hit_rate - 0.05, **costs))


def test_ssd_without_hits_is_sequential_speculative_decoding():
    for alpha, k in ((0.5, 2), (0.8, 5)):
        sequential = analysis.speedup_from_costs(analysis.expected_tau(alpha, k), k * 1.5, 6.0, 4.0)
        assert analysis.ssd_speedup(alpha, k, 0.0, 1.5, 6.0, 4.0) == pytest.approx(sequential)
        assert analysis.ssd_speedup(alpha, k, 1.0, 1.5, 6.0, 4.0) == pytest.approx(analysis.expected_tau(alpha, k) * 4.0 / 6.0)
