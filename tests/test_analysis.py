"""jspec.analysis: each closed form against Monte Carlo simulation (fixed seed, a bound of several
standard errors) or brute force, with negative controls, and argument checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jspec import analysis
from jspec.sequoia import FixedShape

ROUNDS = 200_000


def simulate_chain(accept_probs, rounds: int, seed: int) -> np.ndarray:
    """Tokens emitted per round by a chain whose draft i is accepted with probability a_i given
    the drafts before it were: the first rejection ends the round; one more token is always emitted."""
    rng = np.random.default_rng(seed)
    accepted = rng.random((rounds, len(accept_probs))) < np.asarray(accept_probs)
    return 1 + np.cumprod(accepted, axis=1).sum(axis=1)


def within(samples: np.ndarray, value: float, sigmas: float = 5.0) -> bool:
    return abs(samples.mean() - value) <= sigmas * samples.std() / math.sqrt(samples.size)


@pytest.mark.parametrize("alpha, k", [(0.6, 4), (0.9, 8), (0.3, 1), (0.99, 16)])
def test_expected_tau_matches_simulation(alpha, k):
    emitted = simulate_chain([alpha] * k, ROUNDS, seed=k)
    assert within(emitted, analysis.expected_tau(alpha, k))
    assert analysis.expected_tau(alpha, k) == pytest.approx(sum(alpha**i for i in range(k + 1)))


def test_a_wrong_acceptance_rate_is_rejected_by_the_same_simulation():
    emitted = simulate_chain([0.7] * 4, ROUNDS, seed=0)
    assert within(emitted, analysis.expected_tau(0.7, 4))
    assert not within(emitted, analysis.expected_tau(0.65, 4))


def test_position_dependent_tau_matches_simulation():
    a = [0.9, 0.7, 0.5, 0.2]
    emitted = simulate_chain(a, ROUNDS, seed=1)
    assert within(emitted, analysis.expected_tau_from_acceptance(a))
    assert not within(emitted, analysis.expected_tau_from_acceptance(a[::-1]))
    assert analysis.expected_tau_from_acceptance([0.8] * 5) == pytest.approx(analysis.expected_tau(0.8, 5))
    assert analysis.expected_tau(1.0, 3) == 4 and analysis.expected_tau(0.0, 3) == 1


def test_speedup_and_best_k_against_brute_force_and_simulated_costs():
    alpha, c = 0.8, 0.1
    simulated = {}
    for k in range(1, 13):  # a simulated run: each round costs k drafter steps (c each) and one target pass (1)
        emitted = simulate_chain([alpha] * k, 50_000, seed=100 + k)
        simulated[k] = emitted.sum() / (emitted.size * (k * c + 1))
        assert simulated[k] == pytest.approx(analysis.speedup(alpha, k, c), rel=0.02)
    best = analysis.best_k(alpha, c, k_max=12)
    assert best == max(range(1, 13), key=lambda k: analysis.speedup(alpha, k, c))
    assert analysis.speedup(alpha, best, c) >= max(simulated.values()) * 0.98
    assert analysis.best_k(1.0, 1.0) == 1  # every k ties; the smallest wins
    assert analysis.best_k(0.95, 0.01) > analysis.best_k(0.6, 0.01)  # a better drafter drafts further


def test_speedup_from_costs_by_hand():
    # tau 3, drafting 2 ms, a 5-token target pass 4 ms, a 1-token pass 3 ms: 3 * 3 / (2 + 4) = 1.5
    assert analysis.speedup_from_costs(3.0, 2.0, 4.0, 3.0) == pytest.approx(1.5)
    assert analysis.speedup_from_costs(analysis.expected_tau(0.8, 4), 4 * 0.1, 1.0, 1.0) == pytest.approx(
        analysis.speedup(0.8, 4, 0.1)
    )


def test_mbsu_by_hand():
    assert analysis.mbsu(3.0, 4, 1.0, 8.0) == pytest.approx(3.0 / 1.5)


def simulate_tree(acceptance, parents, rounds: int, seed: int) -> np.ndarray:
    """Tokens emitted per round on a tree under the positional model: at an accepted node, its
    children are tried in rank order, the rank-r child being the accepted one with probability
    acceptance[r] (exclusive events: at most one child is accepted); the walk stops at a node none
    of whose children is accepted. The root (always accepted) counts 1, as in tau."""
    rng = np.random.default_rng(seed)
    parents = np.asarray(parents)
    children = {v: [c for c in range(len(parents)) if parents[c] == v] for v in range(len(parents))}
    a = np.asarray(acceptance)
    out = np.empty(rounds)
    for t in range(rounds):
        node, emitted = 0, 1
        while children[node]:
            u = rng.random()
            edges = np.cumsum(a[: len(children[node])])
            rank = int(np.searchsorted(edges, u, side="right"))
            if rank >= len(children[node]):
                break
            node, emitted = children[node][rank], emitted + 1
        out[t] = emitted
    return out


def test_sequoia_objective_matches_simulation_and_the_dp():
    a = (0.6, 0.2, 0.1)
    parents = [-1, 0, 0, 1, 1, 2, 3]  # root, two children, grandchildren, one great-grandchild
    FixedShape.from_parents(parents)  # a valid breadth-first shape
    emitted = simulate_tree(a, parents, 40_000, seed=3)
    value = analysis.tree_value(a, parents)
    assert within(emitted, value)
    assert not within(emitted, analysis.tree_value((0.5, 0.2, 0.1), parents))
    chain = [-1, 0, 1, 2]
    assert analysis.tree_value((0.7,), chain) == pytest.approx(analysis.expected_tau(0.7, 3))
    # The DP's best over trees of 7 nodes is at least this tree's value, and at least the chain's.
    best = analysis.best_tree_value(a, 7, 6)
    assert best >= value - 1e-12 and best >= analysis.tree_value(a, [-1, 0, 1, 2, 3, 4, 5]) - 1e-12


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: analysis.expected_tau(1.5, 4), "alpha"),
        (lambda: analysis.expected_tau(0.5, 0), "k"),
        (lambda: analysis.speedup(0.5, 2, -1.0), "cost_ratio"),
        (lambda: analysis.best_k(0.5, 0.1, k_max=0), "k_max"),
        (lambda: analysis.mbsu(2.0, 2, 1.0, 0.0), "target_weights"),
        (lambda: analysis.speedup_from_costs(2.0, 1.0, 0.0, 1.0), "t_target_n"),
        (lambda: analysis.expected_tau_from_acceptance([0.5, 1.2]), "accept_probs"),
    ],
)
def test_bad_arguments_raise_naming_them(call, name):
    with pytest.raises(ValueError, match=name):
        call()
