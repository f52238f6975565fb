"""Chain speculative decoding (Leviathan et al. arXiv 2211.17192, Chen et al. arXiv 2302.01318):
the `Chain` strategy.

One round: `draft_chain` samples k tokens from the drafter, one target pass scores the last
emitted token plus the k drafts, a chain verifier (`jspec.verify`, or an opted-in lossy rule of
`jspec.verify.lossy`) keeps a prefix, and `jspec.rounds.commit_round` keeps it in both models. A
chain is drafted and committed as a tree that is a single path, so it shares every step with the
tree strategies but the verifier.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jspec.models import causal_mask
from jspec.rounds import SpeculativeStrategy
from jspec.sampling import Sampling, sample, warp
from jspec.trees.draft import DraftedTree
from jspec.trees.tree import Tree
from jspec.verify.chain import CHAIN_VERIFIERS, ChainVerifier
from jspec.verify.lossy import LossyVerifier
from jspec.verify.tree import TreeVerdict


@dataclasses.dataclass(frozen=True)
class Chain(SpeculativeStrategy):
    """Draft a chain of k tokens per round and verify it with `verifier`.

    verifier: "sampling" (Leviathan/Chen speculative sampling), "block" (Sun et al. block
    verification) or "greedy" (temperature 0 only), all lossless; or, as an explicit opt-in, a
    lossy rule object from `jspec.verify.lossy` (`LossyTypical()`, `LossySpecDec()`), which makes
    `lossy` True. No string selects a lossy rule.
    """

    k: int = 4
    verifier: str | LossyVerifier = "sampling"

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int >= 1, got {self.k!r}")
        if not isinstance(self.verifier, LossyVerifier) and not (
            isinstance(self.verifier, str) and self.verifier in CHAIN_VERIFIERS
        ):
            raise ValueError(
                f"verifier must be one of {sorted(CHAIN_VERIFIERS)} or a lossy rule object "
                f"(jspec.LossyTypical(), jspec.LossySpecDec()), got {self.verifier!r}"
            )

    @property  # type: ignore[override]
    def lossy(self) -> bool:
        """Whether the output may differ in distribution from the target's (an opt-in lossy rule)."""
        return isinstance(self.verifier, LossyVerifier)

    @property
    def verify_rule(self) -> ChainVerifier:
        """The chain verifier: `verify(key, draft_tokens, draft_probs, target_probs) -> Verdict`."""
        return self.verifier.verify if self.lossy else CHAIN_VERIFIERS[self.verifier]

    def scoring(self, sampling: Sampling) -> Sampling:
        """The warp of the target's logits the verifier sees (the decoding's own, for lossless rules)."""
        return self.verifier.scoring(sampling) if self.lossy else sampling

    @property
    def tokens_per_round(self) -> int:
        """Most tokens one round emits."""
        return self.k + 1

    @property
    def tokens_scored(self) -> int:
        """Tokens the target scores per round (cache slots written past the committed length)."""
        return self.k + 1

    @property
    def max_depth(self) -> int:
        return self.k

    def check(self, sampling: Sampling) -> None:
        """Reject combinations that would not be lossless (a lossy rule, asked for, runs at any temperature)."""
        if self.verifier == "greedy" and not sampling.greedy:
            raise ValueError(f"verifier 'greedy' is only lossless at temperature 0, got temperature={sampling.temperature}")

    def draft(self, drafter, state, last, sampling, key) -> DraftedTree:
        return draft_chain(drafter, state, last, self.k, sampling, key)

    def verify(self, key, drafted: DraftedTree, logits: jax.Array, sampling: Sampling) -> TreeVerdict:
        """The chain rule on the path; the accepted node is the depth reached. A lossy rule may see
        another warp of the same logits (SpecDec: logit gaps at temperature 0)."""
        target_probs = warp(logits, self.scoring(sampling))
        verdict = self.verify_rule(key, drafted.tree.tokens[:, 1:], drafted.draft_probs[:, : self.k], target_probs)
        return TreeVerdict(verdict.accepted, verdict.accepted, verdict.next_token)


def draft_chain(drafter, state, last: jax.Array, k: int, sampling: Sampling, key: jax.Array) -> DraftedTree:
    """Sample k draft tokens one after another from any drafter (`jspec.drafters`): the tree
    `[B, k+1]` of the path `last, x_1 .. x_k`, whose node i (depth i) lies at drafter window slot
    i - 1, and draft_probs `[B, k+1, V]`, node i's entry the warped distribution x_{i+1} was drawn
    from (zero for the leaf)."""
    b = last.shape[0]
    keys = jax.random.split(key, k)
    logits, context, state = drafter.catch_up(state, last)
    q = warp(logits, sampling)
    x = sample(keys[0], q)
    window = jnp.arange(k)[None, None, :]

    def step(carry, i):
        state, x, context = carry
        # Node i sees window slots 0 .. i - 1 (its ancestors x_1 .. x_{i-1} and itself).
        mask = jnp.broadcast_to(window < i, (b, 1, k))
        logits, context, state = drafter.extend(state, x[:, None], context[:, None], jnp.full((b, 1), i), mask, i - 1)
        q = warp(logits[:, 0], sampling)
        x_next = sample(keys[i], q)
        return (state, x_next, context[:, 0]), (x_next, q)

    (state, _, _), (xs, qs) = jax.lax.scan(step, (state, x, context), jnp.arange(1, k))
    tokens = jnp.concatenate([last[:, None], x[:, None], xs.T], axis=1)
    probs = jnp.concatenate([q[:, None], jnp.swapaxes(qs, 0, 1), jnp.zeros_like(q)[:, None]], axis=1)
    parent = jnp.broadcast_to(jnp.arange(k + 1, dtype=jnp.int32) - 1, (b, k + 1))
    depth = jnp.broadcast_to(jnp.arange(k + 1, dtype=jnp.int32), (b, k + 1))
    tree = Tree(tokens.astype(jnp.int32), parent, depth, jnp.ones((b, k + 1), bool))
    return DraftedTree(tree, causal_mask(b, k + 1), probs, state, parent)
