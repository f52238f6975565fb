"""One speculative round of any tree strategy: draft, score in one target pass, verify, commit.

A tree strategy is a frozen dataclass with
    size: int                  N, the nodes the target scores per round (root included)
    max_depth: int             the deepest node; a round emits at most max_depth + 1 tokens
    tokens_per_round: int      max_depth + 1
    tokens_scored: int         cache slots a round writes past the committed length, either model
    check(sampling)            raises ValueError for combinations that are not allowed
    draft(drafter, cache, prev, last, sampling, key) -> DraftedTree
    verifier(sampling)         the tree verifier (`jspec.tree_verify`) that its children call for

`TreeStrategy` below supplies tokens_per_round, tokens_scored, check and verifier for the
common case. A strategy may also bring a round and carry of its own (`round_function`,
`init_carry`), which `speculative_generate` then runs instead of `tree_round`.

The carry and its cache invariant are the chain's (`jspec.chain.ChainCarry`): the target cache
holds `seq[:-1]`, the drafter cache `seq[:-2]`, and the root of the tree is `last = seq[-1]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jspec.chain import ChainCarry, emitted_tokens, next_carry
from jspec.models import Transformer, commit_path
from jspec.sampling import Sampling, warp
from jspec.tree_verify import children_verifier
from jspec.trees import tree_path

TREE_STRATEGY_API = ("size", "max_depth", "tokens_per_round", "tokens_scored", "check", "draft", "verifier")


class TreeStrategy:
    """The defaults tree strategies share: a round emits at most a root-to-leaf path plus one
    token, writes `size` cache slots, is lossless at every temperature, and is verified by the
    verifier of how its children are chosen (`children`: "iid", "without_replacement" or "top_k",
    `jspec.tree_verify.children_verifier`). A strategy adds `size`, `max_depth`, `children`
    and `draft`, and overrides what differs."""

    children: str = "without_replacement"

    @property
    def tokens_per_round(self) -> int:
        """Most tokens one round emits: a full root-to-leaf path plus one."""
        return self.max_depth + 1

    @property
    def tokens_scored(self) -> int:
        """Cache slots a round writes past the committed length: the N nodes the target scores."""
        return self.size

    def check(self, sampling: Sampling) -> None:
        """Every combination is lossless: nothing to refuse."""
        del sampling

    def verifier(self, sampling: Sampling):
        """The lossless tree verifier (`jspec.tree_verify`) for this strategy's children."""
        return children_verifier(self.children, sampling.greedy)


def is_tree_strategy(strategy) -> bool:
    """Whether `strategy` implements the tree-strategy interface above."""
    return all(hasattr(strategy, name) for name in TREE_STRATEGY_API)


def tree_round(
    strategy,
    target: Transformer,
    drafter: Transformer,
    carry: ChainCarry,
    active: jax.Array,  # bool [B]
    sampling: Sampling,
    key: jax.Array,
) -> tuple[ChainCarry, jax.Array, jax.Array]:
    """Draft, score, verify and commit one tree; same contract as `jspec.chain.chain_round`.

    Returns the new carry, the emitted tokens `[B, max_depth + 1]` and how many each row emitted.
    """
    key_draft, key_verify = jax.random.split(key)
    drafted = strategy.draft(drafter, carry.drafter_cache, carry.prev, carry.last, sampling, key_draft)
    tree = drafted.tree
    positions = carry.target_cache.lengths[:, None] + tree.depth
    logits, target_cache = target(tree.tokens, positions, drafted.ancestors, carry.target_cache)
    verdict = strategy.verifier(sampling)(key_verify, tree, drafted.draft_probs, warp(logits, sampling))

    path, path_length = tree_path(tree, verdict.node, drafted.ancestors)  # root first; length = accepted + 1
    target_cache = commit_path(target_cache, path, jnp.where(active, path_length, 0))
    # Gather the accepted drafts but the last into place in the drafter's window; `next_carry`
    # then rewinds the drafter to one token behind the target.
    drafter_path = jnp.take_along_axis(drafted.slot, path, axis=1)[:, 1:]
    drafter_cache = commit_path(drafted.cache, drafter_path, jnp.where(active, jnp.maximum(verdict.accepted - 1, 0), 0))
    path_tokens = jnp.take_along_axis(tree.tokens, path, axis=1)  # [B, N], root first
    carry = next_carry(carry, target_cache, drafter_cache, path_tokens, verdict, active)
    depth = strategy.max_depth
    return carry, emitted_tokens(path_tokens[:, 1 : depth + 1], verdict), verdict.accepted + 1
