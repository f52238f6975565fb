"""jspec.DynamicTree (DySpec): greedy tree decoding (ragged prompts, perturbed drafters) is target
greedy; at temperature 0 the tree is DySpec's priority-queue expansion (against a brute-force
reference); sampled decoding has the target's exact distribution, and the priority that peeks at
the child's token does not; bad arguments are rejected."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_decode import first3_pvalue

import jspec
from jspec.drafters import ModelDrafter, ModelDrafterState
from jspec.methods import dynamic_tree
from jspec.methods.dynamic_tree import DynamicTree
from jspec.models import causal_mask, commit, init_cache
from jspec.sampling import Sampling

from conftest import TINY, forward, perturbed

STRATEGY = DynamicTree(size=7, width=2, max_children=2)
GREEDY_PROMPTS = np.asarray(jax.random.randint(jax.random.key(2), (4, 6), 0, 64), np.int32)
GREEDY_LENGTHS = np.array([6, 3, 5, 2], np.int32)  # ragged


def assert_greedy(model, out, max_new_tokens: int) -> None:
    """Every emitted token is the argmax of `model` after its row's prompt and the tokens before it
    (teacher forcing in one causal pass: what `jspec.generate` emits, without compiling it)."""
    np.testing.assert_array_equal(np.asarray(out.lengths), max_new_tokens)
    for row, length in enumerate(GREEDY_LENGTHS):
        tokens = np.asarray(out.tokens[row])
        logits = reference_logits(model, list(GREEDY_PROMPTS[row, :length]) + list(tokens))
        np.testing.assert_array_equal(tokens, np.argmax(logits[length - 1 : length - 1 + max_new_tokens], axis=-1))


def test_greedy_tree_decoding_equals_greedy_autoregressive(tiny_target):
    for noise in (0.3, 1.0):
        drafter = perturbed(tiny_target, noise, seed=1)
        out = jspec.speculative_generate(
            tiny_target, drafter, GREEDY_PROMPTS, prompt_lengths=GREEDY_LENGTHS, max_new_tokens=20, strategy=STRATEGY
        )
        assert_greedy(tiny_target, out, 20)


# --- The drafted tree, against references computed from plain causal passes. -------------------

PROMPTS = np.asarray(jax.random.randint(jax.random.key(5), (3, 6), 0, 64), np.int32)  # [B, P]
WINDOW = 32  # a reference pass scores a sequence padded to this length


@functools.partial(nnx.jit, static_argnames=("strategy", "sampling"))
def _draft(model, cache, prev, last, key, *, strategy, sampling):
    tree = strategy.draft(ModelDrafter(model), ModelDrafterState(cache, prev), last, sampling, key).tree
    return tree.tokens, tree.parent, tree.valid


def drafted_tree(strategy, model, sampling: Sampling, key=jax.random.key(0)):
    """`strategy.draft` after PROMPTS, with `model` as drafter -> numpy tokens, parent, valid `[B, N]`."""
    b, p = PROMPTS.shape
    cache = init_cache(TINY, b, 40)
    _, cache = forward(
        model, jnp.asarray(PROMPTS[:, :-2]), jnp.broadcast_to(jnp.arange(p - 2), (b, p - 2)), causal_mask(b, p - 2), cache
    )
    cache = commit(cache, jnp.full((b,), p - 2, jnp.int32))
    prev, last = jnp.asarray(PROMPTS[:, -2]), jnp.asarray(PROMPTS[:, -1])
    return tuple(np.asarray(x) for x in _draft(model, cache, prev, last, key, strategy=strategy, sampling=sampling))


def reference_logits(model, seq) -> np.ndarray:
    """Logits `[WINDOW, V]` of one causal pass over the token sequence `seq` (padded to WINDOW)."""
    tokens = np.zeros((1, WINDOW), np.int32)
    tokens[0, : len(seq)] = seq  # causal: the padding after the sequence does not matter
    logits, _ = forward(model, jnp.asarray(tokens), jnp.arange(WINDOW)[None], causal_mask(1, WINDOW), init_cache(TINY, 1, WINDOW))
    return np.asarray(logits[0], np.float64)


def reference_logprobs(model, seq) -> np.ndarray:
    """log q `[V]` after the token sequence `seq`, from one causal pass (raw logits: temperature 0)."""
    logits = reference_logits(model, seq)[len(seq) - 1]
    return logits - np.logaddexp.reduce(logits)


def node_paths(tokens, parent, valid, row: int) -> list:
    """The token path (root excluded) of every node of `row`, None for invalid nodes."""
    paths = []
    for i in range(tokens.shape[1]):
        if not valid[row, i]:
            paths.append(None)
            continue
        path, j = [], i
        while j > 0:
            path.append(int(tokens[row, j]))
            j = parent[row, j]
        paths.append(tuple(path[::-1]))
    return paths


def reference_dyspec(model, row: int, strategy: DynamicTree) -> list:
    """DySpec's greedy expansion by hand: per step the `width` best next children (one per node), by
    value = product of softmax probabilities along the path; children in top-k order."""
    prompt = list(PROMPTS[row])
    paths, value, taken, logq = [()], [1.0], [0], [reference_logprobs(model, prompt)]
    for _ in range(strategy.steps):
        candidates = []
        for u in range(len(paths)):
            if logq[u] is not None and taken[u] < strategy.max_children:
                x = int(np.argsort(-logq[u], kind="stable")[taken[u]])
                candidates.append((-value[u] * np.exp(logq[u][x]), u, x))
        for _, u, x in sorted(candidates)[: strategy.width]:
            taken[u] += 1
            paths.append(paths[u] + (x,))
            value.append(value[u] * np.exp(logq[u][x]))
            taken.append(0)
            logq.append(reference_logprobs(model, prompt + list(paths[-1])))
    return paths


@pytest.mark.parametrize("strategy", [STRATEGY, DynamicTree(size=6, width=1, max_children=3)], ids=str)
def test_greedy_tree_is_dyspecs_priority_queue_expansion(tiny_target, strategy):
    tokens, parent, valid = drafted_tree(strategy, tiny_target, Sampling())
    for row in range(PROMPTS.shape[0]):
        got = [path for path in node_paths(tokens, parent, valid, row) if path is not None]
        assert got == reference_dyspec(tiny_target, row, strategy)


def test_sampled_tree_is_a_valid_budgeted_tree(tiny_target):
    """At temperature 1: valid parents precede their children, siblings are distinct tokens, at most
    max_children per node, and each step fills its `width` slots when it has enough candidates."""
    strategy = STRATEGY
    tokens, parent, valid = drafted_tree(strategy, tiny_target, Sampling(temperature=1.0), jax.random.key(3))
    b, n = tokens.shape
    assert n == strategy.size and valid[:, 0].all()
    for row in range(b):
        for i in range(1, n):
            if valid[row, i]:
                assert 0 <= parent[row, i] < i and valid[row, parent[row, i]]
        for u in range(n):
            children = [i for i in range(1, n) if valid[row, i] and parent[row, i] == u]
            assert len(children) <= strategy.max_children
            assert len({int(tokens[row, i]) for i in children}) == len(children)
        # Step 1 can only add the root's first child; steps 2 and 3 find two candidates each.
        np.testing.assert_array_equal(valid[row], [True, True, False] + [True] * (n - 3))


WIDTH_ONE = DynamicTree(size=5, width=1, max_children=3)  # width 1: exactly DySpec's expansion


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [STRATEGY, WIDTH_ONE], ids=str)
def test_sampled_tree_decoding_matches_exact_target_distribution(strategy):
    assert first3_pvalue(strategy) > 1e-3


@pytest.mark.slow
def test_a_priority_that_sees_the_childs_token_is_rejected(monkeypatch):
    """Negative control: DySpec's literal priority v_u * q_u(x), computed from the child's own token,
    makes whether a child exists depend on its token, and the output is no longer the target's."""
    monkeypatch.setattr(dynamic_tree, "candidate_priority", lambda frontier, greedy: PRIORITY(frontier, True))
    jax.clear_caches()  # the honest WIDTH_ONE may be compiled already: compile the patched one
    pvalue = first3_pvalue(WIDTH_ONE)
    jax.clear_caches()  # leave no patched program behind
    assert pvalue < 1e-6


PRIORITY = dynamic_tree.candidate_priority


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(size=1), "size"),
        (dict(size=7.0), "size"),
        (dict(size=8, width=2), "width"),
        (dict(size=7, width=0), "width"),
        (dict(size=7, max_children=0), "max_children"),
        (dict(size=7, max_children=True), "max_children"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DynamicTree(**kwargs)


def test_sizes():
    s = DynamicTree(size=7, width=2)
    assert (s.size, s.steps, s.max_depth, s.tokens_per_round, s.tokens_scored) == (7, 3, 3, 4, 7)
    assert DynamicTree(size=7).max_depth == 6  # width 1: the worst case is a chain
