"""jspec.trees: ancestor masks, positions and path commits of static-shape token trees."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jspec.models import causal_mask, commit, init_cache
from jspec.trees import commit_tree_path, tree_ancestor_mask, tree_from_parents, tree_path, tree_positions

from conftest import TINY, forward, random_model

N = 8


def _random_tree(seed: int, b: int = 3, n: int = N, n_valid=(8, 5, 1)):
    """Random trees: parent[i] uniform over 0..i-1; row r has its first n_valid[r] nodes valid."""
    rng = np.random.default_rng(seed)
    parent = np.full((b, n), -1, np.int32)
    for i in range(1, n):
        parent[:, i] = rng.integers(0, i, b)
    tokens = rng.integers(0, TINY.vocab_size, (b, n)).astype(np.int32)
    valid = np.arange(n)[None, :] < np.asarray(n_valid)[:, None]
    return tree_from_parents(jnp.asarray(tokens), jnp.asarray(parent), jnp.asarray(valid)), parent, valid


def _root_path(parent_row: np.ndarray, node: int) -> list[int]:
    path = [node]
    while parent_row[path[-1]] >= 0:
        path.append(int(parent_row[path[-1]]))
    return path[::-1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_depth_and_ancestor_mask_match_a_walk_to_the_root(seed):
    tree, parent, valid = _random_tree(seed)
    mask = np.asarray(tree_ancestor_mask(tree))
    depth = np.asarray(tree.depth)
    for b in range(parent.shape[0]):
        for i in range(N):
            path = _root_path(parent[b], i)
            assert depth[b, i] == len(path) - 1
            expected = np.zeros(N, bool)
            expected[path if valid[b, i] else [i]] = True
            np.testing.assert_array_equal(mask[b, i], expected, err_msg=f"row {b} node {i}")


def test_a_chain_is_the_causal_mask():
    parent = jnp.arange(-1, N - 1, dtype=jnp.int32)[None, :]  # node i's parent is i - 1
    tree = tree_from_parents(jnp.zeros((1, N), jnp.int32), parent, jnp.ones((1, N), bool))
    np.testing.assert_array_equal(tree_ancestor_mask(tree), causal_mask(1, N))
    np.testing.assert_array_equal(tree_positions(tree, jnp.asarray([5])), 5 + np.arange(N)[None, :])


def test_tree_path_lists_the_root_path_in_order():
    tree, parent, _ = _random_tree(3)
    node = jnp.asarray([7, 4, 0], jnp.int32)
    path, length = tree_path(tree, node)
    for b in range(3):
        expected = _root_path(parent[b], int(node[b]))
        assert int(length[b]) == len(expected)
        assert np.asarray(path[b, : len(expected)]).tolist() == expected


def _causal_last_logits(model, tokens: np.ndarray) -> np.ndarray:
    t = len(tokens)
    logits, _ = forward(model, jnp.asarray(tokens)[None], jnp.arange(t)[None], causal_mask(1, t), init_cache(model.config, 1, t))
    return np.asarray(logits[0, -1])


def test_one_pass_scores_every_node_as_its_root_path_and_commit_keeps_the_path():
    """SpecInfer (arXiv 2305.09781) tree attention: the logits of every node equal a causal pass over its root path; after
    committing a path, decoding continues exactly as if only that path had been fed."""
    model = random_model(TINY, seed=5)
    tree, parent, valid = _random_tree(4)
    b = parent.shape[0]
    prompts = np.asarray(jax.random.randint(jax.random.key(6), (b, 5), 0, TINY.vocab_size))
    cache = init_cache(model.config, b, 5 + N + 1)
    cache = commit(
        forward(model, jnp.asarray(prompts), jnp.broadcast_to(jnp.arange(5), (b, 5)), causal_mask(b, 5), cache)[1],
        jnp.full((b,), 5, jnp.int32),
    )
    logits, cache = forward(model, tree.tokens, tree_positions(tree, cache.lengths), tree_ancestor_mask(tree), cache)
    tokens = np.asarray(tree.tokens)
    for row in range(b):
        for i in np.flatnonzero(valid[row]):
            sequence = np.concatenate([prompts[row], tokens[row, _root_path(parent[row], i)]])
            np.testing.assert_allclose(logits[row, i], _causal_last_logits(model, sequence), atol=2e-4, rtol=1e-4)

    node = jnp.asarray([6, 3, 0], jnp.int32)
    cache = commit_tree_path(cache, tree, node)
    next_tokens = jnp.asarray([[1], [2], [3]], jnp.int32)
    after, _ = forward(model, next_tokens, cache.lengths[:, None], causal_mask(b, 1), cache)
    for row in range(b):
        path = _root_path(parent[row], int(node[row]))
        assert int(cache.lengths[row]) == 5 + len(path)
        sequence = np.concatenate([prompts[row], tokens[row, path], np.asarray(next_tokens[row])])
        np.testing.assert_allclose(after[row, 0], _causal_last_logits(model, sequence), atol=2e-4, rtol=1e-4)
