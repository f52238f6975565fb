"""Drafting token trees with any drafter (`jspec.drafters`), at static shapes: the pieces every
tree builder shares.

A `TreeDraft` holds a tree of at most N nodes while it grows, the drafter's logits, warped
distribution and context after every scored node, each node's ancestor row, and the drafter's
state. Node 0 is the root (`last`, scored by `start_draft` through the drafter's catch-up); node
i > 0 lives in the drafter's uncommitted window at slot i - 1, so `add_nodes` scores a batch of new
nodes in one drafter call that attends to their ancestors drafted by earlier calls (never
re-scoring them).

Builders differ only in which nodes they add: a fixed shape (`draft_fixed_shape`: StaticTree,
SequoiaTree, MultiCandidate), a path (`jspec.methods.chain.draft_chain`) or a run-time choice
(DynamicTree, RSD-S, EagleTree).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jspec.sampling import Sampling, sample, sample_without_replacement, warp
from jspec.trees.tree import Tree

CHILD_MODES = ("iid", "without_replacement", "top_k")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftedTree:
    """What a tree builder hands to `jspec.rounds.speculative_round`.

    tree: the `Tree` the target scores (`[B, N]`); ancestors: bool `[B, N, N]`, its ancestor mask
    (invalid nodes see only themselves); draft_probs: `[B, N, V]`, the distribution each node's
    children were drawn from; state: the drafter's state after drafting; slot: int32 `[B, N]`,
    where node i's drafter entry lies in the uncommitted window (-1 for the root); chain (static):
    whether node i is always the child of node i - 1 (a path), so that an accepted prefix already
    lies where it is committed and the target's cache needs no move (`jspec.rounds.commit_round`).
    """

    tree: Tree
    ancestors: jax.Array
    draft_probs: jax.Array
    state: Any
    slot: jax.Array
    chain: bool = dataclasses.field(default=False, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TreeDraft:
    """A tree being drafted. tokens, parent, depth: int32 `[B, N]`; valid: bool `[B, N]`;
    ancestors: bool `[B, N, N]`; logits, probs: float32 `[B, N, V]`, the drafter's raw logits and
    warped distribution after each scored node (zero for nodes not scored); context `[B, N, C]`,
    what the drafter hands a scored node's children; state: the drafter's."""

    tokens: jax.Array
    parent: jax.Array
    depth: jax.Array
    valid: jax.Array
    ancestors: jax.Array
    logits: jax.Array
    probs: jax.Array
    context: jax.Array
    state: Any

    @property
    def size(self) -> int:
        return self.tokens.shape[1]

    def finish(self) -> DraftedTree:
        """The drafted tree as it stands, every node at its own slot i - 1."""
        b, n = self.tokens.shape
        tree = Tree(self.tokens, self.parent, self.depth, self.valid)
        slot = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32) - 1, (b, n))
        return DraftedTree(tree, self.ancestors, self.probs, self.state, slot)


def start_draft(drafter, state, last: jax.Array, size: int, sampling: Sampling) -> TreeDraft:
    """A tree of budget `size` holding only its root `last` (int32 `[B]`), scored: the drafter
    catches up (`Drafter.catch_up`) and the root's distribution and context are set."""
    logits, context, state = drafter.catch_up(state, last)
    b, v = logits.shape
    eye = jnp.broadcast_to(jnp.eye(size, dtype=bool), (b, size, size))
    return TreeDraft(
        tokens=jnp.zeros((b, size), jnp.int32).at[:, 0].set(last),
        parent=jnp.full((b, size), -1, jnp.int32),
        depth=jnp.zeros((b, size), jnp.int32),
        valid=jnp.zeros((b, size), bool).at[:, 0].set(True),
        ancestors=eye,
        logits=jnp.zeros((b, size, v), jnp.float32).at[:, 0].set(logits),
        probs=jnp.zeros((b, size, v), jnp.float32).at[:, 0].set(warp(logits, sampling)),
        context=jnp.zeros((b, size) + context.shape[1:], context.dtype).at[:, 0].set(context),
        state=state,
    )


def set_nodes(array: jax.Array, start, update: jax.Array) -> jax.Array:
    """`array[:, start : start + M] = update` (array `[B, N, ...]`, update `[B, M, ...]`) for a static
    or traced `start`: the per-node arrays of a growing tree."""
    index = (0, start) + (0,) * (array.ndim - 2)
    return jax.lax.dynamic_update_slice(array, update.astype(array.dtype), index)


def add_nodes(
    draft: TreeDraft,
    drafter,
    start,  # int or int32 []: the new nodes take indices start .. start + M - 1 (start >= 1)
    parent: jax.Array,  # int32 [B, M], each < start
    tokens: jax.Array,  # int32 [B, M]
    valid: jax.Array,  # bool [B, M]; a valid node must have a valid parent
    sampling: Sampling,
    *,
    score: bool = True,
) -> TreeDraft:
    """Add M nodes and, if `score`, run the drafter over them in one call (writing their keys and
    values at window slots start - 1 ..), setting their logits and warped distributions. Leaves
    that will get no children need no scoring."""
    b, m = tokens.shape
    n = draft.size
    index = start + jnp.arange(m, dtype=jnp.int32)  # [M]
    parent = jnp.where(valid, parent, 0).astype(jnp.int32)
    own = jnp.arange(n)[None, None, :] == index[None, :, None]  # [1, M, N]
    rows = jnp.take_along_axis(draft.ancestors, parent[:, :, None], axis=1) | own  # [B, M, N]
    rows = jnp.where(valid[:, :, None], rows, own)  # an invalid node sees only itself
    depth = jnp.take_along_axis(draft.depth, parent, axis=1) + 1
    draft = dataclasses.replace(
        draft,
        tokens=set_nodes(draft.tokens, start, tokens),
        parent=set_nodes(draft.parent, start, jnp.where(valid, parent, -1)),
        depth=set_nodes(draft.depth, start, depth),
        valid=set_nodes(draft.valid, start, valid),
        ancestors=set_nodes(draft.ancestors, start, rows),
    )
    if not score:
        return draft
    parent_context = jnp.take_along_axis(draft.context, parent.reshape(parent.shape + (1,) * (draft.context.ndim - 2)), axis=1)
    logits, context, state = drafter.extend(draft.state, tokens, parent_context, depth, rows[:, :, 1:], start - 1)
    return dataclasses.replace(
        draft,
        logits=set_nodes(draft.logits, start, logits),
        probs=set_nodes(draft.probs, start, warp(logits, sampling)),
        context=set_nodes(draft.context, start, context),
        state=state,
    )


def choose_children(key: jax.Array, logits: jax.Array, probs: jax.Array, n: int, mode: str, greedy: bool) -> jax.Array:
    """n children for each of M nodes from their drafter logits and warped q `[B, M, V]` ->
    int32 `[B, M, n]`, in the order the verifier must try them.

    "iid": independent samples from q; "without_replacement": a sample without replacement in
    draw order (`sample_without_replacement`, the law of Gumbel-top-n of log q); "top_k": the n
    most likely. At temperature 0 (greedy) the children are always the top-n of the raw logits
    (q is one-hot and would rank only its argmax).
    """
    if greedy or mode == "top_k":
        return jax.lax.top_k(logits, n)[1].astype(jnp.int32)
    if mode == "iid":
        return sample(key, jnp.broadcast_to(probs[:, :, None, :], probs.shape[:2] + (n, probs.shape[-1])))
    if mode == "without_replacement":
        return sample_without_replacement(key, probs, n)
    raise ValueError(f"mode must be one of {CHILD_MODES}, got {mode!r}")


@dataclasses.dataclass(frozen=True)
class FixedShape:
    """Static index arrays for drafting a tree of fixed shape level by level.

    Built from parents `[N]` in breadth-first order (every level contiguous, the children of a node
    consecutive): node i is the `rank[i]`-th child of `parent[i]`.
    """

    parent: np.ndarray  # int32 [N]
    depth: np.ndarray  # int32 [N]
    rank: np.ndarray  # int32 [N]
    level_starts: tuple[int, ...]  # node index where each depth begins, plus N

    @classmethod
    def from_parents(cls, parents) -> FixedShape:
        parent = np.asarray(parents, np.int32)
        n = len(parent)
        if parent.ndim != 1 or n < 1 or parent[0] != -1 or (parent[1:] < 0).any() or (parent[1:] >= np.arange(1, n)).any():
            raise ValueError(f"parents must start with -1 and have 0 <= parents[i] < i, got {parent.tolist()}")
        depth = np.zeros(n, np.int32)
        rank = np.zeros(n, np.int32)
        for i in range(1, n):
            depth[i] = depth[parent[i]] + 1
            rank[i] = rank[i - 1] + 1 if parent[i - 1] == parent[i] and i > 1 else 0
        if (np.diff(depth) < 0).any() or (np.diff(parent[1:]) < 0).any():
            raise ValueError(f"parents must be breadth-first (levels and siblings contiguous), got {parent.tolist()}")
        starts = [int(np.searchsorted(depth, d)) for d in range(int(depth.max()) + 1)] + [n]
        return cls(parent, depth, rank, tuple(starts))

    @property
    def size(self) -> int:
        return len(self.parent)

    @property
    def max_depth(self) -> int:
        return len(self.level_starts) - 2


def draft_fixed_shape(
    shape: FixedShape,
    mode: str,
    drafter,
    state,
    last: jax.Array,  # int32 [B]
    sampling: Sampling,
    key: jax.Array,
) -> DraftedTree:
    """Draft a tree of fixed shape: per level, choose the children of every node of the level above
    (`choose_children` with `mode`) and score the new level in one drafter call."""
    b = last.shape[0]
    draft = start_draft(drafter, state, last, shape.size, sampling)
    starts = shape.level_starts
    keys = jax.random.split(key, max(shape.max_depth, 1))
    for level in range(1, shape.max_depth + 1):
        lo, hi = starts[level], starts[level + 1]
        above = starts[level - 1]
        local_parent = shape.parent[lo:hi] - above  # static: which node of the level above
        n_children = int(shape.rank[lo:hi].max()) + 1
        choices = choose_children(
            keys[level - 1], draft.logits[:, above:lo], draft.probs[:, above:lo], n_children, mode, sampling.greedy
        )  # [B, M_above, n_children]
        tokens = choices[:, local_parent, shape.rank[lo:hi]]  # [B, M]
        draft = add_nodes(
            draft,
            drafter,
            lo,
            jnp.broadcast_to(jnp.asarray(shape.parent[lo:hi]), (b, hi - lo)),
            tokens,
            jnp.ones((b, hi - lo), bool),
            sampling,
            score=level < shape.max_depth,
        )
    return draft.finish()
