"""jspec.methods.sequoia: the DP equals brute force over all small trees; SequoiaTree decodes losslessly
(greedy token for token, sampled in exact distribution); the measured acceptance vector follows
the verifier's exact law; the hardware-aware choice trades F against measured times; bad
arguments are rejected."""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decode import first3_pvalue

import jspec
from jspec.methods.sequoia import (
    SequoiaTree,
    accepted_rank,
    choose_size_and_depth,
    measure_acceptance,
    sequoia_tree,
    sequoia_values,
    tree_value,
)
from jspec.sampling import Sampling
from jspec.trees.draft import FixedShape

from conftest import chi_square_pvalue, perturbed

ACCEPTANCE = [
    (0.6, 0.3, 0.1),
    (0.8,),  # one child per node: the best tree is a chain
    (0.5, 0.5, 0.25),  # ties
    (0.7, 0.2, 0.0, 0.0),  # ranks that are never accepted
    (0.95, 0.04),
]
MAX_N, MAX_D = 8, 4
STRATEGY = SequoiaTree((0.6, 0.3, 0.1), size=8, max_depth=4)


# --- The DP against brute force ------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _forests(m: int, d: int) -> tuple:
    """Every ordered forest of exactly m nodes whose trees have depth <= d; a tree is the tuple of
    its children's trees."""
    if m == 0:
        return ((),)
    if d < 0:
        return ()
    return tuple((tree,) + rest for k in range(1, m + 1) for tree in _forests(k - 1, d - 1) for rest in _forests(m - k, d))


def _brute_value(tree: tuple, a: tuple) -> float:
    """F by its definition, recursively: 1 + sum over children of a_rank * F(child)."""
    return 1.0 + sum((a[i] if i < len(a) else 0.0) * _brute_value(child, a) for i, child in enumerate(tree))


def _brute_best(a: tuple, n: int, d: int) -> float:
    """max F over all ordered trees of at most n nodes and depth <= d."""
    return max(_brute_value(tree, a) for size in range(1, n + 1) for tree in _forests(size - 1, d - 1 if d else -1))


def _value_from_parents(a: tuple, parents: np.ndarray) -> float:
    """F from a parents array: a node's rank is the count of earlier siblings."""
    total, product = 0.0, {}
    for i, p in enumerate(parents):
        rank = sum(1 for q in parents[:i] if q == p) if p >= 0 else None
        product[i] = 1.0 if p < 0 else product[p] * (a[rank] if rank < len(a) else 0.0)
        total += product[i]
    return total


def test_forest_enumeration_counts_ordered_trees():
    # Catalan numbers: ordered trees of n nodes, any depth; depth <= 1 leaves only the star.
    assert [len(_forests(n - 1, n)) for n in range(1, 9)] == [1, 1, 2, 5, 14, 42, 132, 429]
    assert [len(_forests(n - 1, 0)) for n in range(1, 6)] == [1, 1, 1, 1, 1]


@pytest.mark.parametrize("a", ACCEPTANCE, ids=str)
def test_dp_equals_brute_force_on_small_budgets(a):
    table = sequoia_values(a, MAX_N, MAX_D)
    assert table.shape == (MAX_N + 1, MAX_D + 1) and (table[0] == 0).all()
    for n, d in itertools.product(range(1, MAX_N + 1), range(MAX_D + 1)):
        best = _brute_best(a, n, d)
        assert math.isclose(table[n, d], best, rel_tol=1e-12), (n, d, table[n, d], best)
        parents, value = sequoia_tree(a, n, d)
        assert math.isclose(value, best, rel_tol=1e-12)
        assert math.isclose(_value_from_parents(a, parents), value, rel_tol=1e-12)
        assert math.isclose(tree_value(a, parents), value, rel_tol=1e-12)
        shape = FixedShape.from_parents(parents)  # breadth-first, siblings consecutive
        assert shape.size <= n and shape.max_depth <= d
        assert shape.rank.max() < max(1, sum(x > 0 for x in a))  # no child at a rank never accepted
        reachable = sum(len(a) ** level for level in range(d + 1))  # a full len(a)-ary tree of depth d
        if min(a) > 0:
            assert shape.size == min(n, reachable)  # every node helps when every rank can be accepted


def test_tree_value_of_known_shapes():
    a = (0.5, 0.25)
    assert tree_value(a, [-1]) == 1.0
    assert tree_value(a, [-1, 0, 0, 0]) == 1.75  # the third child's rank has acceptance 0
    assert tree_value(a, [-1, 0, 1]) == 1.75  # a chain: 1 + 0.5 + 0.25
    assert tree_value(a, [-1, 0, 0, 1]) == 2.0


# --- The strategy --------------------------------------------------------------------------------


def test_strategy_is_the_dp_tree_with_its_real_size_and_depth():
    parents, value = sequoia_tree((0.6, 0.3, 0.1), 8, 4)
    assert STRATEGY.parents == tuple(parents) and STRATEGY.expected_tokens == value
    assert (STRATEGY.size, STRATEGY.max_depth, STRATEGY.tokens_per_round, STRATEGY.tokens_scored) == (8, 4, 5, 8)
    # Depth is not forced: with room for 12 levels the best 8-node tree is much shallower.
    deep = SequoiaTree((0.6, 0.3, 0.1), size=8, max_depth=12)
    assert deep.size == 8 and deep.max_depth < 7
    # One child per node and three levels: a chain of 4 nodes, whatever the budget.
    chain = SequoiaTree((0.8,), size=8, max_depth=3)
    assert (chain.size, chain.max_depth, chain.parents) == (4, 3, (-1, 0, 1, 2))
    # Equal strategies hash equal (a static jit argument); another tree is another strategy.
    assert STRATEGY == SequoiaTree((0.6, 0.3, 0.1), 8, 4) and hash(STRATEGY) == hash(SequoiaTree((0.6, 0.3, 0.1), 8, 4))
    assert STRATEGY != SequoiaTree((0.6, 0.3, 0.1), 9, 4)


def _first_child_depth(parents) -> int:
    """How deep the chain of rank-0 children from the root goes."""
    node, depth = 0, 0
    while node + 1 < len(parents) and node in parents:
        node, depth = parents.index(node), depth + 1
    return depth


def test_greedy_sequoia_decoding_equals_greedy_autoregressive(tiny_target):
    prompts = np.asarray(jax.random.randint(jax.random.key(2), (4, 6), 0, 64), np.int32)
    lengths = np.array([6, 3, 5, 2], np.int32)
    expected = jspec.generate(tiny_target, prompts, prompt_lengths=lengths, max_new_tokens=20)
    for drafter in (perturbed(tiny_target, 0.3, seed=1), perturbed(tiny_target, 1.0, seed=1), tiny_target):
        out = jspec.speculative_generate(
            tiny_target, drafter, prompts, prompt_lengths=lengths, max_new_tokens=20, strategy=STRATEGY
        )
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
        np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(expected.lengths))
    # The drafter equal to the target: its top-1 child is always right, so every round accepts the
    # whole chain of first children.
    assert float(out.stats.mean_accepted) == _first_child_depth(STRATEGY.parents) + 1 == 5


@pytest.mark.slow
def test_sampled_sequoia_decoding_matches_exact_target_distribution():
    strategy = SequoiaTree((0.6, 0.3, 0.1), size=6, max_depth=2)
    assert strategy.parents == (-1, 0, 0, 1, 1, 2)  # branching at both levels
    assert first3_pvalue(strategy) > 1e-3


@pytest.mark.parametrize(
    "kwargs, name, bad",
    [
        (dict(acceptance=()), "acceptance", ()),
        (dict(acceptance=[0.5]), "acceptance", [0.5]),
        (dict(acceptance=(0.5, 0.6)), "acceptance", (0.5, 0.6)),
        (dict(acceptance=(1.5,)), "acceptance", (1.5,)),
        (dict(acceptance=(-0.1,)), "acceptance", (-0.1,)),
        (dict(acceptance=(float("nan"),)), "acceptance", (float("nan"),)),
        (dict(acceptance=(True,)), "acceptance", (True,)),
        (dict(acceptance=("0.5",)), "acceptance", ("0.5",)),
        (dict(size=0), "size", 0),
        (dict(size=4.0), "size", 4.0),
        (dict(size=True), "size", True),
        (dict(max_depth=0), "max_depth", 0),
        (dict(max_depth=None), "max_depth", None),
    ],
    ids=lambda x: repr(x) if not isinstance(x, dict) else "-".join(f"{k}={v!r}" for k, v in x.items()),
)
def test_bad_arguments_raise_naming_argument_and_value(kwargs, name, bad):
    args = dict(acceptance=(0.6, 0.3), size=4, max_depth=2) | kwargs
    with pytest.raises(ValueError) as error:
        SequoiaTree(**args)
    assert name in str(error.value) and repr(bad) in str(error.value)


def test_bad_dp_arguments_raise():
    with pytest.raises(ValueError, match="size must be an int >= 1, got 0"):
        sequoia_tree((0.5,), 0, 2)
    with pytest.raises(ValueError, match="max_depth must be an int >= 0, got -1"):
        sequoia_values((0.5,), 4, -1)
    with pytest.raises(ValueError, match="non-increasing"):
        sequoia_values([0.1, 0.2], 4, 2)


# --- Measuring the acceptance vector -------------------------------------------------------------


def _exact_rank_law(p: np.ndarray, q: np.ndarray, width: int) -> np.ndarray:
    """P(no child accepted), P(the rank-i child accepted) for i = 1..width: the tree verifier's
    without-replacement rule (Sequoia arXiv 2402.12374), by enumerating every ordered draw of `width` children from q."""
    law = np.zeros(width + 1)
    for draw in itertools.permutations(range(len(q)), width):
        prob_draw, left = 1.0, q.copy()
        for x in draw:  # sequential sampling without replacement
            prob_draw *= left[x] / left.sum()
            left[x] = 0.0
        if prob_draw == 0:
            continue
        reach, r, qq = 1.0, p.copy(), q / q.sum()
        for rank, x in enumerate(draw, start=1):
            accept = min(1.0, r[x] / qq[x])
            law[rank] += prob_draw * reach * accept
            reach *= 1.0 - accept
            residual = np.maximum(r - qq, 0.0)
            r = residual / residual.sum() if residual.sum() > 1e-12 else r
            qq = qq.copy()
            qq[x] = 0.0
            qq = qq / qq.sum() if qq.sum() > 0 else qq
        law[0] += prob_draw * reach
    return law


def test_accepted_rank_follows_the_exact_law_of_the_verifier():
    p = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
    q = np.array([0.3, 0.1, 0.25, 0.05, 0.3])
    width, rows = 3, 40_000
    exact = _exact_rank_law(p, q, width)
    assert exact[1] > 0.3 and exact[2] > 0.1 and exact[3] > 0.05 and math.isclose(exact.sum(), 1.0)
    tile = lambda x: jnp.asarray(np.broadcast_to(x, (rows, len(x))), jnp.float32)
    sampling = Sampling(temperature=1.0)
    ranks = jax.jit(accepted_rank, static_argnames=("width", "sampling"))(
        jax.random.key(0), jnp.log(tile(q)), tile(q), tile(p), width=width, sampling=sampling
    )
    assert chi_square_pvalue(np.asarray(ranks), exact) > 1e-3


def test_accepted_rank_at_temperature_zero_is_the_target_argmax_among_the_drafter_top_k():
    draft_logits = jnp.asarray([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    target_probs = jax.nn.one_hot(jnp.asarray([1, 3, 3]), 4)  # warped at temperature 0: one-hot argmax
    sampling = Sampling()
    ranks = accepted_rank(
        jax.random.key(0), draft_logits, jax.nn.one_hot(jnp.argmax(draft_logits, -1), 4), target_probs, 2, sampling
    )
    np.testing.assert_array_equal(ranks, [2, 0, 1])  # top-2 = (0, 1), (0, 1), (3, 2)


@pytest.fixture(scope="module")
def measure_prompts():
    prompts = np.asarray(jax.random.randint(jax.random.key(5), (4, 6), 0, 64), np.int32)
    return prompts, np.array([6, 2, 4, 5], np.int32)


def test_identical_drafter_at_temperature_zero_accepts_its_first_child(tiny_target, measure_prompts):
    prompts, lengths = measure_prompts
    a = measure_acceptance(
        tiny_target, tiny_target, prompts, width=3, sampling=Sampling(), rng=None, prompt_lengths=lengths, max_new_tokens=24
    )
    np.testing.assert_array_equal(a, [1.0, 0.0, 0.0])


# Temperature 0 reuses the programs compiled above; temperature 1 compiles its own, so it runs with the slow tests.
@pytest.mark.parametrize("temperature", [0.0, pytest.param(1.0, marks=pytest.mark.slow)])
def test_perturbed_drafter_gives_a_probability_vector_that_does_not_increase(tiny_target, measure_prompts, temperature):
    prompts, lengths = measure_prompts
    a = measure_acceptance(
        tiny_target,
        perturbed(tiny_target, 1.0, seed=3),
        prompts,
        width=3,
        sampling=Sampling(temperature=temperature),
        rng=jax.random.key(7),
        prompt_lengths=lengths,
        max_new_tokens=24,
    )
    assert a.shape == (3,) and (a >= 0).all() and a.sum() <= 1.0 and (np.diff(a) <= 0).all()
    assert 0.05 < a[0] < 0.95 and a[1] > 0, a  # neither the identical nor a useless drafter
    SequoiaTree(tuple(a), size=8, max_depth=4)  # a valid acceptance vector as measured


# --- The hardware-aware choice -------------------------------------------------------------------


def test_flat_verify_time_picks_the_largest_tree():
    a, sizes, depths = (0.6, 0.3, 0.1), (2, 4, 8, 16, 32), (1, 2, 3, 4, 6)
    n, d, speedup = choose_size_and_depth(a, 0.001, lambda n: 0.02, sizes=sizes, depths=depths)
    assert n == 32
    values = sequoia_values(a, 32, 6)
    assert math.isclose(speedup, values[n, d] / (d * 0.001 + 0.02) * 0.02)
    # The best over the grid, by brute force.
    assert math.isclose(speedup, max(values[m, e] / (e * 0.001 + 0.02) * 0.02 for m in sizes for e in depths))


def test_linear_verify_time_and_low_acceptance_pick_a_small_tree():
    sizes, depths = (1, 2, 4, 8, 16, 32), (1, 2, 3)
    linear = {n: 0.01 * n for n in sizes}  # as a dict, the measured form
    n, d, speedup = choose_size_and_depth((0.1, 0.05), 0.002, linear, sizes=sizes, depths=depths)
    assert (n, d) == (1, 1) and math.isclose(speedup, 0.01 / 0.012)  # speculation cannot pay here
    # Verify time with a fixed part: the poor drafter still gets a tiny tree, a good one a larger tree.
    affine = lambda n: 0.01 + 0.002 * n
    n_poor, _, speedup_poor = choose_size_and_depth((0.1, 0.05), 0.002, affine, sizes=sizes, depths=depths)
    n_good, _, speedup_good = choose_size_and_depth((0.9, 0.05), 0.002, affine, sizes=sizes, depths=depths)
    assert n_poor <= 2 and speedup_poor < 1 and n_good >= 4 and speedup_good > 1.5


def test_bad_choice_arguments_raise():
    with pytest.raises(ValueError, match=r"verify_time must give .* missing \[1, 4\]"):
        choose_size_and_depth((0.5,), 0.001, {2: 0.1}, sizes=(2, 4), depths=(1,))
    with pytest.raises(ValueError, match="draft_time must be a finite number of seconds >= 0, got -1"):
        choose_size_and_depth((0.5,), -1, lambda n: 0.1, sizes=(2,), depths=(1,))
    with pytest.raises(ValueError, match=r"sizes must be a non-empty sequence of ints >= 1, got \(\)"):
        choose_size_and_depth((0.5,), 0.001, lambda n: 0.1, sizes=(), depths=(1,))
