"""The `Rest` strategy: retrieval-based speculative decoding (He et al. arXiv 2311.08252), no model.

Each round the row's sequence (prompt, output and the root) is looked up in a REST datastore
(`jspec.retrieval.datastore`): the continuations of the longest suffix found form a trie, and its
`size` most frequent nodes (root included) are the tree the target scores. The candidates are
chosen by count, never sampled, so the tree is verified as deterministic proposals (accept a child
with probability r(x), the EAGLE-2 rule of `jspec.verify.tree`): lossless at every temperature.

Run it with the datastore as the drafter: `speculative_generate(target,
jspec.retrieval.Retrieval(datastore), prompts, strategy=jspec.Rest())`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jspec.retrieval.datastore import retrieve
from jspec.retrieval.lookup import LookupDrafter, LookupRounds, LookupState, as_lookup_drafter
from jspec.rounds import TreeStrategy, prefix_sizes
from jspec.trees.draft import DraftedTree
from jspec.trees.tree import tree_ancestor_mask
from jspec.validation import check_int


def require_datastore(drafter: LookupDrafter, strategy) -> None:
    if drafter.datastore is None:
        raise ValueError(f"{type(strategy).__name__} needs a datastore: pass jspec.retrieval.Retrieval(datastore) as the drafter")


@dataclasses.dataclass(frozen=True)
class Rest(LookupRounds, TreeStrategy):
    """REST's draft tree from a datastore.

    size: N, nodes the target scores per round (root included); depth: the longest continuation
    read; max_context: the longest suffix of the sequence searched; max_occurrences: the most
    occurrences whose continuations form the trie (counts are exact whatever it is).
    """

    size: int = 16
    depth: int = 4
    max_context: int = 8
    max_occurrences: int = 64
    children = "top_k"  # chosen by count, not sampled: the deterministic verifier (not a field)
    needs_drafter = False  # not a model: the datastore comes through jspec.retrieval.Retrieval

    def __post_init__(self):
        check_int("size", self.size, 2)
        check_int("depth", self.depth, 1)
        check_int("max_context", self.max_context, 1)
        check_int("max_occurrences", self.max_occurrences, 1)

    @property
    def max_depth(self) -> int:
        return self.depth

    @property
    def score_sizes(self) -> tuple[int, ...]:
        """A round whose retrieval found few nodes scores only the prefix holding them."""
        return prefix_sizes(self.size)

    def lookup_drafter(self, target, drafter) -> LookupDrafter:
        drafter = as_lookup_drafter(target, drafter, (1,))
        require_datastore(drafter, self)
        return drafter

    def draft(self, drafter: LookupDrafter, state: LookupState, last, sampling, key) -> DraftedTree:
        del sampling, key  # nothing is sampled
        state = dataclasses.replace(state, root=last.astype(jnp.int32))
        history, end = state.sequence()
        found = retrieve(
            drafter.datastore, history, end, max_context=self.max_context, depth=self.depth, size=self.size,
            max_occurrences=self.max_occurrences,
        )  # fmt: skip
        tree = found.tree
        b, n = tree.tokens.shape
        probs = jnp.zeros((b, n, drafter.vocab_size), jnp.float32)  # the deterministic verifier reads no q
        return DraftedTree(tree, tree_ancestor_mask(tree), probs, state, jnp.full((b, n), -1, jnp.int32))
