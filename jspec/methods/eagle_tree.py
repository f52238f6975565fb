"""The `EagleTree` strategy: EAGLE-2's dynamic draft tree (Li et al., arXiv 2406.16858), drafted by
any drafter of `jspec.drafters`: an EAGLE feature head (`jspec.eagle`), as in the paper, or a small
language model.

The value of a node is the product of the drafter's confidences along its root path, a confidence
being the drafter's probability of the token (softmax of its raw logits, at temperature 1 whatever
the sampling: EAGLE-2's estimate of how likely the path is to be accepted). Values are kept as log
sums. Drafting grows a candidate pool level by level (EAGLE-2's expand phase):

    level 1: the top_k children of the root (all of them form the level's beam);
    level d = 2 .. depth: each of the top_k beam nodes of level d - 1 gets its top_k children:
             top_k**2 candidates, all kept in the pool; the top_k of them by value form level d's
             beam (only a beam below `depth` is scored by the drafter, as only it gets children).

so the pool holds `1 + top_k + (depth - 1) * top_k**2` nodes (root included), of which
`1 + (depth - 1) * top_k` are scored (root, level 1 and the beams of levels 2 .. depth - 1), with
one drafter call per level. Then EAGLE-2's rerank keeps the root plus the global top
`size - 1` candidates by value, and the target scores those `size` nodes (EAGLE-2's
`total_tokens`).

The candidates are chosen by value, never sampled, so the tree is verified with
`verify_tree_deterministic` (greedy at temperature 0), lossless for any candidate set that does not
depend on random draws. `depth` is the deepest node (EAGLE-2's `depth` counts the expansions after
the first level, one less).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jspec.rounds import TreeStrategy
from jspec.sampling import Sampling
from jspec.trees.draft import DraftedTree, add_nodes, start_draft
from jspec.trees.tree import Tree, tree_ancestor_mask
from jspec.validation import check_int


def pool_size(top_k: int, depth: int) -> int:
    """Candidates the expand phase produces, root included: 1 + top_k + (depth - 1) * top_k**2."""
    return 1 + top_k + (depth - 1) * top_k * top_k


def scored_size(top_k: int, depth: int) -> int:
    """Nodes the drafter scores, root included: the root, then top_k beam nodes per level below `depth`."""
    return 1 + (depth - 1) * top_k


def pool_depths(top_k: int, depth: int) -> np.ndarray:
    """int32 `[P]`: the depth of each pool node (the pool is in level order)."""
    sizes = [1, top_k] + [top_k * top_k] * (depth - 1)
    return np.repeat(np.arange(depth + 1), sizes).astype(np.int32)


def top_value_nodes(value: jax.Array, m: int) -> jax.Array:
    """bool `[B, P]`: the root (index 0) and the m best other nodes by value `[B, P]`, ties
    toward the smaller index.

    Ancestor-closed whenever every node's value is at most its parent's and parents have smaller
    indices: a parent then strictly precedes its children in the order (value desc, index asc),
    so any prefix of that order that holds a node holds its parent.
    """
    b, p = value.shape
    key = jnp.where(jnp.arange(p)[None, :] == 0, -jnp.inf, -value)  # the root first
    best = jnp.argsort(key, axis=1, stable=True)[:, : m + 1]  # stable: ties keep index order
    return jnp.zeros((b, p), bool).at[jnp.arange(b)[:, None], best].set(True)


def rerank(
    tokens: jax.Array,  # int32 [B, P], pool in level order (parents precede children)
    parent: jax.Array,  # int32 [B, P], pool index of the parent (-1 for the root)
    depth: jax.Array,  # int32 [B, P]
    value: jax.Array,  # float32 [B, P], at most the parent's value
    size: int,  # N, nodes of the final tree
) -> tuple[Tree, jax.Array]:
    """EAGLE-2's rerank: keep the root plus the top `size - 1` pool nodes by value, re-indexed in
    pool order (so parents precede children and siblings keep their candidate order).

    Returns the final `Tree` (`[B, N]`; nodes past the pool's size are invalid) and `source`,
    int32 `[B, N]`, the pool index of each final node (0 for invalid ones).
    """
    b, p = tokens.shape
    rows = jnp.arange(b)[:, None]
    kept = top_value_nodes(value, min(size - 1, p - 1))
    source = jnp.argsort(~kept, axis=1, stable=True)[:, :size].astype(jnp.int32)  # kept nodes, in pool order
    n_kept = min(size, p)
    if size > p:  # fewer candidates than the budget: pad with invalid nodes
        source = jnp.concatenate([source, jnp.zeros((b, size - p), jnp.int32)], axis=1)
    valid = jnp.broadcast_to(jnp.arange(size) < n_kept, (b, size))
    new_index = (
        jnp.full((b, p), -1, jnp.int32).at[rows, jnp.where(valid, source, p)].set(jnp.arange(size, dtype=jnp.int32), mode="drop")
    )
    pool_parent = jnp.take_along_axis(parent, source, axis=1)
    new_parent = jnp.take_along_axis(new_index, jnp.maximum(pool_parent, 0), axis=1)
    new_parent = jnp.where(valid & (pool_parent >= 0), new_parent, -1)
    tree = Tree(
        tokens=jnp.take_along_axis(tokens, source, axis=1),
        parent=new_parent,
        depth=jnp.where(valid, jnp.take_along_axis(depth, source, axis=1), 0),
        valid=valid,
    )
    return tree, source


def _children(logits: jax.Array, value: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k most confident children of M nodes, from their raw drafter logits `[B, M, V]` and
    log-values `[B, M]`: tokens int32 `[B, M * k]` (each node's children together, most likely
    first) and their log-values `[B, M * k]` (parent's + log confidence, never above the parent's)."""
    b, m, _ = logits.shape
    log_conf, tokens = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), k)
    values = value[:, :, None] + jnp.minimum(log_conf, 0.0)
    return tokens.reshape(b, m * k).astype(jnp.int32), values.reshape(b, m * k)


def draft_eagle_tree(
    top_k: int,
    depth: int,
    size: int,
    drafter,
    state,
    last: jax.Array,  # int32 [B]
    sampling: Sampling,
) -> tuple[DraftedTree, jax.Array]:
    """Expand the candidate pool level by level (one drafter call per level below `depth`), then
    rerank it into a tree of `size` nodes (see the module docstring). Any drafter of
    `jspec.drafters`: a small language model, or an EAGLE head (`jspec.eagle`) as in the paper.
    Returns the tree and the drafter's raw logits `[B, V]` at the root (what a strategy that adds
    nodes of its own, RASD, judges them by without another drafter call)."""
    b, k = last.shape[0], top_k
    if k > drafter.vocab_size:
        raise ValueError(f"top_k must be <= the drafter's vocabulary size {drafter.vocab_size}, got {k}")
    rows = jnp.arange(b)[:, None]
    draft = start_draft(drafter, state, last, scored_size(k, depth), sampling)
    # The pool, one [B, M] block per level. scored: the node's index in `draft` (-1: not scored).
    zero = jnp.zeros((b, 1), jnp.int32)
    tokens, parent, value, scored = [last[:, None]], [zero - 1], [jnp.zeros((b, 1))], [zero]
    # The beam whose children form the next level: its first index in `draft`, pool indices
    # [B, M] and log-values [B, M]. Level 1 grows from the root alone.
    beam_scored, beam_pool, beam_value = 0, zero, jnp.zeros((b, 1))
    pool_start = 1
    for level in range(1, depth + 1):
        m = beam_pool.shape[1]
        level_tokens, level_value = _children(draft.logits[:, beam_scored : beam_scored + m], beam_value, k)
        tokens.append(level_tokens)
        parent.append(jnp.repeat(beam_pool, k, axis=1))
        value.append(level_value)
        level_scored = jnp.full((b, m * k), -1, jnp.int32)
        if level < depth:  # the next beam: the level's top_k by value, scored in one drafter call
            chosen = jax.lax.top_k(level_value, k)[1].astype(jnp.int32)  # [B, k], candidate indices
            start = 1 + (level - 1) * k
            draft = add_nodes(
                draft,
                drafter,
                start,
                beam_scored + chosen // k,
                jnp.take_along_axis(level_tokens, chosen, axis=1),
                jnp.ones((b, k), bool),
                sampling,
            )
            level_scored = level_scored.at[rows, chosen].set(start + jnp.arange(k, dtype=jnp.int32))
            beam_scored, beam_pool = start, pool_start + chosen
            beam_value = jnp.take_along_axis(level_value, chosen, axis=1)
        scored.append(level_scored)
        pool_start += m * k

    pool_depth = jnp.broadcast_to(jnp.asarray(pool_depths(k, depth)), (b, pool_start))
    scored = jnp.concatenate(scored, axis=1)
    tree, source = rerank(
        jnp.concatenate(tokens, axis=1),
        jnp.concatenate(parent, axis=1),
        pool_depth,
        jnp.concatenate(value, axis=1),
        size,
    )
    node_scored = jnp.take_along_axis(scored, source, axis=1)  # [B, N]; -1 for leaves the drafter never scored
    # Only nodes with children need q; a leaf (never scored) gets zeros, which no verifier reads.
    draft_probs = jnp.take_along_axis(draft.probs, jnp.maximum(node_scored, 0)[:, :, None], axis=1)
    draft_probs = jnp.where((node_scored >= 0)[:, :, None], draft_probs, 0.0)
    # A node scored at draft index i lies at drafter window slot i - 1 (the root: -1). Leaves are
    # only ever the last node of an accepted path, whose drafter entry is never committed.
    slot = jnp.where(node_scored >= 0, node_scored - 1, -1)
    return DraftedTree(tree, tree_ancestor_mask(tree), draft_probs, draft.state, slot), draft.logits[:, 0]


@dataclasses.dataclass(frozen=True)
class EagleTree(TreeStrategy):
    """EAGLE-2's dynamic draft tree: per level, expand the top_k nodes by value with their top_k
    children; finally keep the root and the global top `size - 1` candidates by value.

    top_k: children per expanded node and nodes expanded per level; depth: levels drafted (the
    deepest node); size: N, the nodes the target scores per round, root included (nodes
    past the pool's `1 + top_k + (depth - 1) * top_k**2` are invalid padding; EAGLE-2's `total_tokens`).
    """

    top_k: int = 4
    depth: int = 4
    size: int = 16
    children = "top_k"  # chosen by value, not sampled: the deterministic verifier (not a field)

    def __post_init__(self):
        check_int("top_k", self.top_k, 1)
        check_int("depth", self.depth, 1)
        check_int("size", self.size, 2)

    @property
    def max_depth(self) -> int:
        return self.depth

    @property
    def pool_size(self) -> int:
        """Candidates drafted per round, root included."""
        return pool_size(self.top_k, self.depth)

    @property
    def tokens_scored(self) -> int:
        """Cache slots a round writes past the target's length: the target's N, or the drafter's
        window (the drafter, one token ahead, scores more nodes than N when N is small)."""
        return max(self.size, scored_size(self.top_k, self.depth))

    def draft(self, drafter, state, last, sampling, key) -> DraftedTree:
        del key  # nothing is sampled
        return draft_eagle_tree(self.top_k, self.depth, self.size, drafter, state, last, sampling)[0]
