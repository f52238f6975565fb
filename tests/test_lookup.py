"""Prompt lookup (`jspec.retrieval.lookup`): the on-device search equals a brute-force scan, and the
lookup drafter proposes, for every node of a drafted tree, what a scan of its own sequence gives."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jspec.retrieval.lookup import LookupDrafter, LookupState, check_ngram_sizes, latest_match, latest_matches, tail_tokens

SIZES = (3, 2, 1)


def brute_latest(history: list[int], sequence: list[int], sizes=SIZES):
    """(position, n) of the latest j < len(history) whose preceding n tokens equal the last n of
    `sequence`, for the longest n that matches anywhere; (None, 0) if none does."""
    for n in sorted(sizes, reverse=True):
        if len(sequence) < n:
            continue
        hits = [j for j in range(n, len(history)) if history[j - n : j] == sequence[-n:]]
        if hits:
            return max(hits), n
    return None, 0


@pytest.mark.parametrize("seed", range(4))
def test_latest_match_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    b, l, vocab = 6, 40, 3 + seed  # tiny vocabularies: many matches, of every length
    history = rng.integers(0, vocab, (b, l)).astype(np.int32)
    end = np.concatenate([[1, 2], rng.integers(3, l + 1, b - 2)]).astype(np.int32)  # rows shorter than an n-gram too
    tail = tail_tokens(jnp.asarray(history), jnp.asarray(end), 3)[:, None]  # -1 before a short row's start
    position, n, found = jax.jit(latest_match, static_argnums=3)(jnp.asarray(history), jnp.asarray(end), tail, SIZES)
    for r in range(b):
        seq = history[r, : end[r]].tolist()
        want, want_n = brute_latest(seq, seq)
        assert bool(found[r, 0]) == (want is not None)
        if want is not None:
            assert int(position[r, 0]) == want and int(n[r, 0]) == want_n


def test_latest_matches_are_the_latest_positions_of_the_longest_ngram():
    history = jnp.asarray([[5, 1, 2, 7, 1, 2, 8, 1, 2, 9, 0, 1, 2]], jnp.int32)
    position, valid = latest_matches(history, jnp.asarray([13]), jnp.asarray([[[0, 1, 2]]]), SIZES, 4)
    # "1 2" ends at 3, 6, 9 (positions of 7, 8, 9) and at 13 (the tail itself, which proposes nothing).
    np.testing.assert_array_equal(np.asarray(position[0, 0]), [9, 6, 3, 0])
    np.testing.assert_array_equal(np.asarray(valid[0, 0]), [True, True, True, False])


def test_ngram_sizes_are_checked():
    assert check_ngram_sizes((1, 3, 2)) == (3, 2, 1)
    for bad in ((), (0,), (2, 2), "3", (1.5,)):
        with pytest.raises(ValueError, match="ngram_sizes"):
            check_ngram_sizes(bad)


def test_the_drafter_proposes_for_each_tree_node_from_its_own_root_path():
    """Nodes at depths 1-3 whose n-gram straddles the history and the drafted path: every proposal
    (one-hot logits) equals a brute-force scan of history + root path."""
    rng = np.random.default_rng(0)
    vocab, b, l = 5, 3, 48
    history = rng.integers(0, vocab, (b, l)).astype(np.int32)
    length = np.array([20, 31, 1], np.int32)  # the last row: a 2-token sequence before its path
    drafter = LookupDrafter(vocab, SIZES)
    state = LookupState(jnp.asarray(history), jnp.asarray(length), jnp.zeros(b, jnp.int32), jnp.zeros((b, l), jnp.int32), None)
    root = rng.integers(0, vocab, b).astype(np.int32)
    logits, _, state = drafter.catch_up(state, jnp.asarray(root))
    # A tree: node 1 (child of the root), node 2 (child of 1), node 3 (child of the root), node 4 (child of 2).
    parents = [0, 1, 0, 2]
    tokens = rng.integers(0, vocab, (b, 4)).astype(np.int32)
    ancestors = {1: [1], 2: [1, 2], 3: [3], 4: [1, 2, 4]}
    mask = np.zeros((b, 4, 4), bool)
    for node, path in ancestors.items():
        mask[:, node - 1, [p - 1 for p in path]] = True
    depth = np.array([[len(ancestors[n]) for n in range(1, 5)]] * b, np.int32)
    del parents
    node_logits, _, _ = drafter.extend(state, jnp.asarray(tokens), jnp.zeros((b, 4, 0)), jnp.asarray(depth), jnp.asarray(mask), 0)
    for r in range(b):
        seq = history[r, : length[r]].tolist() + [int(root[r])]
        cases = [(np.asarray(logits[r]), seq)] + [
            (np.asarray(node_logits[r, n - 1]), seq + [int(tokens[r, p - 1]) for p in ancestors[n]]) for n in range(1, 5)
        ]
        for got, sequence in cases:
            want, _ = brute_latest(seq, sequence)
            if want is None:
                np.testing.assert_array_equal(got, np.zeros(vocab))  # uniform: no proposal, no model
            else:
                assert int(np.argmax(got)) == seq[want] and np.sum(got == 0) == 1
