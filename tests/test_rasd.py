"""RASD (`jspec.methods.rasd`) and its tree pieces (`jspec.retrieval.trie`): the trie equals brute
force, fusion keeps every retrieved candidate that survives pruning with ancestors before
children, and decoding is exact at T=0 and in law at T=1."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decode import first3_pvalue, unrelated_small_pair

import jspec
from jspec.retrieval import Retrieval, build_datastore
from jspec.retrieval.trie import fuse_trees, trie_from_sequences

from conftest import PLAIN_PROMPTS, RAGGED_LENGTHS, REPEATING_PROMPTS, TINY, perturbed, random_model


def paths(tokens, parent, valid) -> dict[int, tuple[int, ...]]:
    """Node index -> its root path's tokens (root excluded), checking parents precede children."""
    out = {0: ()}
    for i in range(1, len(tokens)):
        if valid[i]:
            assert 0 <= parent[i] < i and valid[parent[i]]
            out[i] = out[parent[i]] + (int(tokens[i]),)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_the_trie_keeps_the_most_shared_prefixes_with_their_counts(seed):
    rng = np.random.default_rng(seed)
    b, m, d, size = 4, 6, 4, 9
    seqs = rng.integers(0, 3, (b, m, d)).astype(np.int32)
    lengths = rng.integers(0, d + 1, (b, m))
    valid = np.arange(d)[None, None, :] < lengths[:, :, None]
    tokens, parent, ok, count = jax.jit(trie_from_sequences, static_argnums=3)(jnp.zeros(b, jnp.int32), seqs, valid, size)
    for r in range(b):
        prefixes = collections.Counter(tuple(seqs[r, i, : t + 1]) for i in range(m) for t in range(lengths[r, i]))
        got = paths(np.asarray(tokens[r]), np.asarray(parent[r]), np.asarray(ok[r]))
        kept = {got[i]: int(count[r, i]) for i in got if i}
        assert len(kept) == len(got) - 1  # no prefix twice
        assert all(prefixes[p] == c for p, c in kept.items())
        # The kept ones are the most shared: nothing left out beats anything kept (ties by depth).
        rank = lambda p: (-prefixes[p], len(p))  # noqa: E731
        if kept:
            worst = max(rank(p) for p in kept)
            assert all(rank(p) >= worst for p in prefixes if p not in kept)
        assert len(kept) == min(size - 1, len(prefixes))


@pytest.mark.parametrize("seed", range(3))
def test_fusion_keeps_every_candidate_by_its_path_with_ancestors_first(seed):
    rng = np.random.default_rng(seed)
    b, n, e = 4, 7, 6

    def random_tree(size):
        parent = np.stack([np.concatenate([[-1], [rng.integers(0, i) for i in range(1, size)]]) for _ in range(b)])
        tokens = rng.integers(0, 3, (b, size))
        valid = rng.random((b, size)) < 0.8
        valid[:, 0] = True
        for i in range(1, size):  # a valid node needs a valid parent
            valid[:, i] &= valid[np.arange(b), parent[:, i]]
        return tokens.astype(np.int32), parent.astype(np.int32), valid

    base, extra = random_tree(n), random_tree(e)
    tokens, parent, valid, mapped = jax.jit(fuse_trees)(*base, *extra)
    for r in range(b):
        before = paths(base[0][r], base[1][r], base[2][r])
        fused = paths(np.asarray(tokens[r]), np.asarray(parent[r]), np.asarray(valid[r]))
        wanted = paths(extra[0][r], extra[1][r], extra[2][r])
        assert all(fused[i] == p for i, p in before.items())  # base nodes keep their index
        for i, p in wanted.items():
            assert fused[int(mapped[r, i])] == p  # every candidate is in the fused tree, by its path
        assert set(fused.values()) == set(before.values()) | set(wanted.values())  # and nothing else
        assert len(set(fused.values())) == len(fused) or len(set(before.values())) < len(before)  # merged, not copied


@pytest.fixture(scope="module")
def target():
    return random_model(TINY, seed=0)


@pytest.mark.parametrize("prompts", [REPEATING_PROMPTS, PLAIN_PROMPTS], ids=["repeats", "no-repeats"])
@pytest.mark.parametrize("with_datastore", [False, True], ids=["prompt-only", "datastore"])
def test_greedy_output_equals_the_target_s(target, prompts, with_datastore):
    expected = jspec.generate(target, prompts, prompt_lengths=RAGGED_LENGTHS, max_new_tokens=24)
    drafter = perturbed(target, 0.3, 1)
    if with_datastore:
        docs = [np.concatenate([prompts[i, : RAGGED_LENGTHS[i]], np.asarray(expected.tokens[i])]) for i in range(3)]
        drafter = Retrieval(jax.device_put(build_datastore(docs)), drafter)
    strategy = jspec.RASD(use_datastore=with_datastore)
    out = jspec.speculative_generate(
        target, drafter, prompts, prompt_lengths=RAGGED_LENGTHS, max_new_tokens=24, strategy=strategy
    )
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
    if prompts is REPEATING_PROMPTS or with_datastore:  # retrieval finds what the target says next
        model_only = jspec.speculative_generate(
            target,
            perturbed(target, 0.3, 1),
            prompts,
            prompt_lengths=RAGGED_LENGTHS,
            max_new_tokens=24,
            strategy=jspec.EagleTree(2, 2, 5),
        )
        assert float(out.stats.mean_accepted) > float(model_only.stats.mean_accepted) + 0.2


def test_rasd_refuses_what_it_cannot_run(target):
    with pytest.raises(ValueError, match="drafter is None"):
        jspec.speculative_generate(target, None, PLAIN_PROMPTS, max_new_tokens=4, strategy=jspec.RASD())
    with pytest.raises(ValueError, match="needs a datastore"):
        jspec.speculative_generate(target, target, PLAIN_PROMPTS, max_new_tokens=4, strategy=jspec.RASD(use_datastore=True))
    with pytest.raises(ValueError, match="min_prob"):
        jspec.RASD(min_prob=2.0)


@pytest.mark.slow
@pytest.mark.parametrize("with_datastore", [False, True], ids=["prompt-only", "datastore"])
def test_the_first_three_tokens_follow_the_target_s_law_at_t1(with_datastore):
    target, drafter = unrelated_small_pair()
    if with_datastore:
        rng = np.random.default_rng(1)
        drafter = Retrieval(jax.device_put(build_datastore([rng.integers(0, 4, 400) for _ in range(3)])), drafter)
    strategy = jspec.RASD(retrieval_size=4, retrieval_depth=3, min_prob=0.0, use_datastore=with_datastore)
    assert first3_pvalue(strategy, pair=(target, drafter)) > 1e-3
