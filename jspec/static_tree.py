"""Static token trees for `speculative_generate`: the `StaticTree` strategy and its round.

A round drafts a tree of fixed shape (`branching[l]` children for every node at depth l), scores
all its N nodes in one target pass under the ancestor mask, walks it with a lossless tree verifier
(`jspec.tree_verify`) and keeps the accepted root-to-node path in both caches. The carry and its
cache invariant are the chain's (`jspec.chain.ChainCarry`): the target cache holds `seq[:-1]`, the
drafter cache `seq[:-2]`, and the root of the tree is `last = seq[-1]`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jspec.chain import ChainCarry, drafter_catch_up, emitted_tokens, next_carry
from jspec.models import Transformer, commit_path
from jspec.sampling import Sampling, sample, warp
from jspec.tree_verify import verify_tree_deterministic, verify_tree_greedy, verify_tree_iid, verify_tree_without_replacement
from jspec.trees import Tree, tree_ancestor_mask, tree_path

CHILDREN = {
    "iid": verify_tree_iid,  # children sampled independently from q (SpecInfer)
    "without_replacement": verify_tree_without_replacement,  # Gumbel-top-k sampling (Sequoia, RSD-C)
    "top_k": verify_tree_deterministic,  # the k most likely tokens of q (EAGLE-style candidates)
}


@dataclasses.dataclass(frozen=True)
class StaticTree:
    """Draft a tree with `branching[l]` children per node at depth l, e.g. (4, 2, 2, 1).

    children: how a node's children are chosen from the drafter's q: "iid" samples, "without_replacement"
    samples without replacement, "top_k" takes the most likely; each has its lossless verifier. At
    temperature 0 the children are always the top-k and the greedy tree verifier decides.
    """

    branching: tuple[int, ...] = (2, 2, 1)
    children: str = "without_replacement"

    def __post_init__(self):
        b = self.branching
        if not isinstance(b, tuple) or not b or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in b):
            raise ValueError(f"branching must be a non-empty tuple of ints >= 1, got {b!r}")
        if self.children not in CHILDREN:
            raise ValueError(f"children must be one of {sorted(CHILDREN)}, got {self.children!r}")

    @property
    def depth(self) -> int:
        return len(self.branching)

    @property
    def level_sizes(self) -> list[int]:
        """Nodes per depth, root included: [1, b1, b1*b2, ...]."""
        return [math.prod(self.branching[:level]) for level in range(self.depth + 1)]

    @property
    def size(self) -> int:
        """N, the node budget (root included): the tokens the target scores per round."""
        return sum(self.level_sizes)

    @property
    def tokens_per_round(self) -> int:
        """Most tokens one round emits: a full root-to-leaf path plus one."""
        return self.depth + 1

    @property
    def tokens_scored(self) -> int:
        return self.size

    def parents(self) -> np.ndarray:
        """int32 `[N]`, breadth-first: the children of a node are consecutive, levels in order."""
        parent, start = [-1], 0
        for level, b in enumerate(self.branching):
            count = self.level_sizes[level]
            parent += [start + i for i in range(count) for _ in range(b)]
            start += count
        return np.asarray(parent, np.int32)

    def check(self, sampling: Sampling) -> None:
        del sampling  # every combination is lossless


def _choose_children(key: jax.Array, logits: jax.Array, q: jax.Array, n: int, mode: str, greedy: bool) -> jax.Array:
    """n children per node from its drafter logits and warped q `[B, M, V]` -> int32 `[B, M, n]`.

    Top-k ranks by the raw logits: at temperature 0 q is one-hot and would rank only its argmax.
    """
    if greedy or mode == "top_k":
        return jax.lax.top_k(logits, n)[1].astype(jnp.int32)
    if mode == "iid":
        return sample(key, jnp.broadcast_to(q[:, :, None, :], q.shape[:2] + (n, q.shape[-1])))
    perturbed = jnp.log(q) + jax.random.gumbel(key, q.shape)  # Gumbel-top-k: without replacement
    return jax.lax.top_k(perturbed, n)[1].astype(jnp.int32)


def draft_tree(
    strategy: StaticTree,
    drafter: Transformer,
    cache,
    prev: jax.Array,  # int32 [B]
    last: jax.Array,  # int32 [B]
    sampling: Sampling,
    key: jax.Array,
):
    """Draft the tree level by level. Returns the `Tree` (root = last), the drafter distributions
    each node's children came from `[B, N, V]` (zero for leaves) and the drafter cache holding
    `seq` committed, with the non-root nodes written after it (uncommitted)."""
    b, n = prev.shape[0], strategy.size
    parent = jnp.broadcast_to(jnp.asarray(strategy.parents()), (b, n))
    depth = jnp.broadcast_to(jnp.repeat(jnp.arange(strategy.depth + 1), np.asarray(strategy.level_sizes)), (b, n))
    logits, cache = drafter_catch_up(drafter, cache, prev, last)
    tokens = jnp.zeros((b, n), jnp.int32).at[:, 0].set(last)
    node_logits = jnp.zeros((b, n, logits.shape[-1]), jnp.float32).at[:, 0].set(logits)
    probs = jnp.zeros((b, n, logits.shape[-1]), jnp.float32).at[:, 0].set(warp(logits, sampling))
    keys = jax.random.split(key, strategy.depth)
    starts = np.cumsum([0] + strategy.level_sizes)  # level l holds nodes starts[l] .. starts[l+1]-1
    tree = Tree(tokens, parent, depth, jnp.ones((b, n), bool))
    for level, branching in enumerate(strategy.branching, start=1):
        parents = slice(starts[level - 1], starts[level])
        children = _choose_children(
            keys[level - 1], node_logits[:, parents], probs[:, parents], branching, strategy.children, sampling.greedy
        )
        tokens = tokens.at[:, starts[level] : starts[level + 1]].set(children.reshape(b, -1))
        tree = dataclasses.replace(tree, tokens=tokens)
        if level == strategy.depth:
            break
        # Score the non-root nodes drafted so far (the root is in the cache); deeper nodes come later.
        end = starts[level + 1]
        mask = tree_ancestor_mask(tree)[:, 1:end, 1:end]
        at = jnp.broadcast_to(jnp.arange(starts[level], end) - 1, (b, end - starts[level]))
        logits, cache = drafter(tokens[:, 1:end], cache.lengths[:, None] + depth[:, 1:end] - 1, mask, cache, logits_at=at)
        node_logits = node_logits.at[:, starts[level] : end].set(logits)
        probs = probs.at[:, starts[level] : end].set(warp(logits, sampling))
    return tree, probs, cache


def tree_round(
    strategy: StaticTree,
    target: Transformer,
    drafter: Transformer,
    carry: ChainCarry,
    active: jax.Array,  # bool [B]
    sampling: Sampling,
    key: jax.Array,
) -> tuple[ChainCarry, jax.Array, jax.Array]:
    """Draft, score, verify and commit one tree; same contract as `jspec.chain.chain_round`."""
    key_draft, key_verify = jax.random.split(key)
    tree, draft_probs, drafter_cache = draft_tree(strategy, drafter, carry.drafter_cache, carry.prev, carry.last, sampling, key_draft)
    positions = carry.target_cache.lengths[:, None] + tree.depth
    logits, target_cache = target(tree.tokens, positions, tree_ancestor_mask(tree), carry.target_cache)
    verify = verify_tree_greedy if sampling.greedy else CHILDREN[strategy.children]
    verdict = verify(key_verify, tree, draft_probs, warp(logits, sampling))

    path, path_length = tree_path(tree, verdict.node)  # root first; path_length = accepted + 1
    target_cache = commit_path(target_cache, path, jnp.where(active, path_length, 0))
    # The drafter's new tokens are the non-root nodes (node i at index i - 1): gather the accepted
    # drafts but the last into place; `next_carry` then rewinds it to one behind the target.
    drafter_cache = commit_path(drafter_cache, path[:, 1:] - 1, jnp.where(active, jnp.maximum(verdict.accepted - 1, 0), 0))
    path_tokens = jnp.take_along_axis(tree.tokens, path, axis=1)  # [B, N], root first
    carry = next_carry(carry, target_cache, drafter_cache, path_tokens, verdict, active)
    return carry, emitted_tokens(path_tokens[:, 1 : strategy.depth + 1], verdict), verdict.accepted + 1
