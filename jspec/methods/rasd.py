"""The `RASD` strategy: retrieval-augmented speculative decoding (Quan et al. arXiv 2503.03434).

A round builds two trees and verifies their union in one target pass:

1. the drafter's own tree, EAGLE-2's dynamic tree (`jspec.methods.eagle_tree`) of `size` nodes;
2. a retrieval tree: the trie of the continuations of the latest `occurrences` earlier matches of
   the row's last n-gram in its own prompt and output (prompt lookup, Saxena 2023), and, with a
   datastore, REST's trie (`jspec.retrieval.datastore.retrieve`), `retrieval_size` nodes each.

Pruning (RASD's, by the drafter's distribution): a retrieved branch is kept only if the drafter
gives its first token probability >= `min_prob` at the root (temperature 1). Fusion: retrieved
nodes whose root path is already in the tree merge with it (longest-prefix matching,
`jspec.retrieval.trie.fuse_trees`); the rest are appended. Every node is then scored by the drafter
in one more call (its entries for the accepted path are what the drafter keeps), and the target
scores the fused tree of at most `size + retrieval nodes` nodes.

Every candidate is chosen by value or by count, never sampled, so the fused tree is verified as
deterministic proposals (accept a child with probability r(x), `jspec.verify.tree`): lossless at
every temperature, greedy at temperature 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jspec.methods.eagle_tree import draft_eagle_tree, scored_size
from jspec.methods.rest import require_datastore
from jspec.retrieval.datastore import retrieve
from jspec.retrieval.lookup import (
    LookupDrafter,
    LookupRounds,
    LookupState,
    as_lookup_drafter,
    check_ngram_sizes,
    continuations,
    latest_matches,
    tail_tokens,
)
from jspec.retrieval.trie import fuse_trees, trie_from_sequences
from jspec.rounds import TreeStrategy, prefix_sizes
from jspec.trees.draft import DraftedTree
from jspec.trees.tree import tree_ancestor_mask, tree_from_parents
from jspec.validation import check_int


@dataclasses.dataclass(frozen=True)
class RASD(LookupRounds, TreeStrategy):
    """EAGLE-2's tree (top_k, depth, size) fused with pruned retrieval trees (module docstring).

    retrieval_size: nodes of each retrieval trie (root included); retrieval_depth: the longest
    retrieved continuation; occurrences: the prompt-lookup matches read; min_prob: the pruning
    threshold; use_datastore: also retrieve from the `jspec.retrieval.Retrieval`'s datastore.
    """

    top_k: int = 2
    depth: int = 2
    size: int = 5
    retrieval_size: int = 8
    retrieval_depth: int = 6
    occurrences: int = 4
    ngram_sizes: tuple[int, ...] = (3, 2, 1)
    min_prob: float = 0.05
    use_datastore: bool = False
    max_context: int = 8
    max_occurrences: int = 64
    children = "top_k"  # chosen by value or count: the deterministic verifier (not a field)

    def __post_init__(self):
        for name, low in (
            ("top_k", 1),
            ("depth", 1),
            ("size", 2),
            ("retrieval_size", 2),
            ("retrieval_depth", 1),
            ("occurrences", 1),
        ):
            check_int(name, getattr(self, name), low)
        object.__setattr__(self, "ngram_sizes", check_ngram_sizes(self.ngram_sizes))
        if isinstance(self.min_prob, bool) or not isinstance(self.min_prob, (int, float)) or not 0 <= self.min_prob <= 1:
            raise ValueError(f"min_prob must be a number in [0, 1], got {self.min_prob!r}")

    @property
    def retrieved(self) -> int:
        """Retrieved nodes a round may add (root excluded)."""
        return (self.retrieval_size - 1) * (2 if self.use_datastore else 1)

    @property
    def fused_size(self) -> int:
        """Nodes the target scores per round: the drafter's tree plus every retrieved node."""
        return self.size + self.retrieved

    @property
    def max_depth(self) -> int:
        return max(self.depth, self.retrieval_depth)

    @property
    def score_sizes(self) -> tuple[int, ...]:
        """Retrieved nodes are appended after the drafter's tree (the unused tail invalid): a round
        that retrieved little scores only the prefix holding its valid nodes."""
        return prefix_sizes(self.fused_size)

    @property
    def tokens_scored(self) -> int:
        # The drafter writes its EAGLE-2 levels, then the fused tree once more, in its window.
        return max(self.fused_size, scored_size(self.top_k, self.depth) + self.fused_size)

    def lookup_drafter(self, target, drafter) -> LookupDrafter:
        if drafter is None or (isinstance(drafter, LookupDrafter) and drafter.inner is None):
            raise ValueError("RASD needs a model drafter: pass it, or jspec.retrieval.Retrieval(datastore, drafter)")
        drafter = as_lookup_drafter(target, drafter, self.ngram_sizes)
        if drafter.inner.feature_layers:
            raise ValueError("RASD drafts with a language-model drafter (an EAGLE head's features are not supported)")
        if self.use_datastore:
            require_datastore(drafter, self)
        return drafter

    def retrieval_tries(self, drafter: LookupDrafter, history, end, root):
        """The retrieval tries `[(tokens, parent, valid), ...]`, each `[B, retrieval_size]`."""
        tail = tail_tokens(history, end, max(self.ngram_sizes))[:, None, :]
        start, found = latest_matches(history, end, tail, self.ngram_sizes, self.occurrences)
        seqs, seq_valid = continuations(history, end, start[:, 0], found[:, 0], self.retrieval_depth)
        seq_valid = jnp.cumprod(seq_valid, axis=-1).astype(bool)
        tokens, parent, valid, _ = trie_from_sequences(root, seqs, seq_valid, self.retrieval_size)
        tries = [(tokens, parent, valid)]
        if self.use_datastore:
            found = retrieve(
                drafter.datastore, history, end, max_context=self.max_context, depth=self.retrieval_depth,
                size=self.retrieval_size, max_occurrences=self.max_occurrences,
            )  # fmt: skip
            tries.append((found.tokens, found.parent, found.valid))
        return tries

    def draft(self, drafter: LookupDrafter, state: LookupState, last, sampling, key) -> DraftedTree:
        del key  # nothing is sampled
        inner = drafter.inner
        state = dataclasses.replace(state, root=last.astype(jnp.int32))
        history, end = state.sequence()
        model, root_logits = draft_eagle_tree(self.top_k, self.depth, self.size, inner, state.inner, last, sampling)
        b = last.shape[0]
        tokens, parent, valid = model.tree.tokens, model.tree.parent, model.tree.valid
        # Pruning: the drafter's temperature-1 probability of each first retrieved token, at the root.
        q_root = jax.nn.softmax(root_logits.astype(jnp.float32), axis=-1)
        for r_tokens, r_parent, r_valid in self.retrieval_tries(drafter, history, end, last):
            first = jnp.where(r_parent == 0, r_tokens, 0)
            keep_first = jnp.take_along_axis(q_root, first, axis=1) >= self.min_prob
            branch_ok = jnp.where(r_parent == 0, keep_first, True)
            r_valid = r_valid & self._ancestors_all(r_parent, branch_ok)
            tokens, parent, valid, _ = fuse_trees(tokens, parent, valid, r_tokens, r_parent, r_valid)
        tree = tree_from_parents(tokens, parent, valid)
        ancestors = tree_ancestor_mask(tree)
        # Score every node with the drafter past its EAGLE-2 window, so any accepted path has entries.
        n = tree.size
        base = scored_size(self.top_k, self.depth) - 1
        window = jnp.concatenate([jnp.zeros((b, n - 1, base), bool), ancestors[:, 1:, 1:]], axis=2)
        _, _, inner_state = inner.extend(
            model.state, tree.tokens[:, 1:], jnp.zeros((b, n - 1, 0)), tree.depth[:, 1:], window, base
        )
        slot = jnp.concatenate(
            [jnp.full((b, 1), -1, jnp.int32), jnp.broadcast_to(base + jnp.arange(n - 1, dtype=jnp.int32), (b, n - 1))], 1
        )
        probs = jnp.zeros((b, n, drafter.vocab_size), jnp.float32)  # the deterministic verifier reads no q
        return DraftedTree(tree, ancestors, probs, dataclasses.replace(state, inner=inner_state), slot)

    @staticmethod
    def _ancestors_all(parent: jax.Array, ok: jax.Array) -> jax.Array:
        """bool `[B, E]`: the node and all its ancestors are ok (parents precede children)."""

        def step(i, out):
            p = jnp.maximum(parent[:, i], 0)
            up = jnp.where(parent[:, i] >= 0, jnp.take_along_axis(out, p[:, None], axis=1)[:, 0], True)
            return out.at[:, i].set(out[:, i] & up)

        return jax.lax.fori_loop(1, parent.shape[1], step, ok)
