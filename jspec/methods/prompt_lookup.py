"""The `PromptLookup` strategy: prompt lookup decoding (Saxena 2023; Spec-Bench's PLD, arXiv
2401.07851), a chain drafted by n-gram lookup in the row's own prompt and output, with no model.

Each round drafts up to k tokens with `jspec.retrieval.lookup.LookupDrafter`: the continuation of
the latest earlier occurrence of the last n-gram (n = 3, 2, 1 by default, longest first). Where
nothing matches, a drafter passed to `speculative_generate` drafts instead (PLD combined with a
model); without one the chain stops there. A lookup proposal is deterministic (one-hot q), so the
chain walk accepts it with probability p(x), the deterministic-proposal rule: lossless at every
temperature. Rows that propose nothing score only their root: with every row stopped, a round is
one plain target step (`jspec.rounds.score_tree` scores the shortest prefix holding the drafts).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jspec.methods.chain import Chain
from jspec.methods.early_stop import ConfidenceStop
from jspec.retrieval.lookup import LookupDrafter, LookupRounds, as_lookup_drafter, check_ngram_sizes


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

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "ngram_sizes", check_ngram_sizes(self.ngram_sizes))

    def lookup_drafter(self, target, drafter) -> LookupDrafter:
        """The lookup over `drafter` (None: no model) for `target`'s vocabulary."""
        return as_lookup_drafter(target, drafter, self.ngram_sizes)
