"""The `PromptLookup` strategy: prompt lookup decoding (Saxena 2023; Spec-Bench's PLD, arXiv
2401.07851), a chain drafted by n-gram lookup in the row's own prompt and output, with no model.

Each round drafts up to k tokens with `jspec.retrieval.lookup.LookupDrafter`: the continuation of
the latest earlier occurrence of the last n-gram (n = 3, 2, 1 by default, longest first). Where
nothing matches, a drafter passed to `speculative_generate` drafts instead (PLD combined with a
model); without one the chain stops there. A lookup proposal is deterministic (one-hot q), so the
chain walk accepts it with probability p(x), the deterministic-proposal rule: lossless at every
temperature. Every round scores all k + 1 nodes, the invalid ones masked out: a lookup of
n-grams down to n = 1 nearly always proposes, and choosing a shorter prefix at run time
(`score_sizes`, as the stop rules of `Chain` do) cost more than it saved. With SmolLM2 in
bfloat16 on a 2-core Xeon a `PromptLookup(k=3)` round took 33.1 ms with the choice and 30.9 ms
without, at the same tau (a pass over 4 tokens costs about one over 1 there).

With no model and a confidence stop that cuts where the lookup finds nothing (the default), the
chain is drafted by the lookup alone (`LookupDrafter.propose_chain`): the same tokens and cuts,
without the drafter protocol's per-node logits over the vocabulary, their softmax and the stop's
features: with a 1-layer target of SmolLM2's vocabulary on a 2-core Xeon, a `PromptLookup(k=3)`
round took 1.26 ms instead of 1.96.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jspec.methods.chain import Chain, drafted_chain
from jspec.methods.early_stop import ConfidenceStop
from jspec.retrieval.lookup import LookupDrafter, LookupRounds, as_lookup_drafter, check_ngram_sizes
from jspec.sampling import Sampling
from jspec.trees.draft import DraftedTree


@dataclasses.dataclass(frozen=True)
class PromptLookup(LookupRounds, Chain):
    """Chain(k) drafted by prompt lookup (see the module docstring).

    ngram_sizes: the n-gram lengths searched, longest first. stop: cuts the chain after a node whose
    drafter confidence is below its threshold (a lookup proposal has confidence 1; no proposal and
    no model drafter: uniform logits, confidence 1/V, so the default cuts there; a model drafter's
    own drafts are cut when it is unsure). `speculative_generate(target, None, ...)` runs it with no
    model; pass a drafter to fall back on it where the lookup finds nothing.
    """

    stop: Any = ConfidenceStop(0.5)
    ngram_sizes: tuple[int, ...] = (3, 2, 1)
    needs_drafter = False  # the drafter argument is optional (not a field)
    score_sizes = None  # every round scores all k + 1 nodes (see the module docstring)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "ngram_sizes", check_ngram_sizes(self.ngram_sizes))

    def lookup_drafter(self, target, drafter) -> LookupDrafter:
        """The lookup over `drafter` (None: no model) for `target`'s vocabulary."""
        return as_lookup_drafter(target, drafter, self.ngram_sizes)

    def cuts_where_nothing_matches(self, drafter: LookupDrafter) -> bool:
        """Whether a chain stops exactly at its first node with no proposal: no model to fall back
        on, and a confidence stop between a miss's 1/V and a proposal's 1."""
        stop = self.stop
        return drafter.inner is None and isinstance(stop, ConfidenceStop) and stop.threshold * drafter.vocab_size > 1

    def draft(self, drafter: LookupDrafter, state, last: jax.Array, sampling: Sampling, key: jax.Array) -> DraftedTree:
        """`Chain.draft`, or where `cuts_where_nothing_matches` the same chain from the lookup
        alone: node i + 1 valid while every proposal up to it was found, and its q one-hot."""
        if not self.cuts_where_nothing_matches(drafter):
            return super().draft(drafter, state, last, sampling, key)
        b = last.shape[0]
        proposals, found = drafter.propose_chain(state, last, self.k)  # [B, k]
        tokens = jnp.concatenate([last[:, None].astype(jnp.int32), proposals], axis=1)
        valid = jnp.concatenate([jnp.ones((b, 1), bool), jnp.cumprod(found, axis=1).astype(bool)], axis=1)
        # Node i's children were drawn from the one-hot on proposal i + 1 (the leaf has none).
        q = jax.nn.one_hot(proposals, drafter.vocab_size, dtype=jnp.float32)
        probs = jnp.concatenate([q, jnp.zeros((b, 1, drafter.vocab_size), jnp.float32)], axis=1)
        return drafted_chain(tokens, valid, probs, state)
