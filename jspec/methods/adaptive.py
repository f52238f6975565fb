"""The `AdaptiveK` strategy: a chain whose length is chosen per row and per round from the row's
running acceptance estimate and a measured cost model (the "Decoding Speculative Decoding" analysis
of choosing k, arXiv 2402.01528, and SmartSpec's online estimate, arXiv 2406.14066).

Each row keeps exponentially decayed counts of accepted drafts and of drafts tried (a round that
accepts a of k tries a + 1, or k when all are accepted); their ratio estimates the acceptance rate
alpha. The round drafts `k_row = best_k_from_costs(alpha, t_draft, t_target)` tokens
(`jspec.analysis`), looked up in a table computed once on the host over a grid of alpha, so the
choice is an array index on device. The chain is drafted at the static length k_max and cut per row
(`jspec.methods.chain.draft_chain(limit=...)`): drafter calls past every row's k are skipped and
the target scores only the prefix the longest row needs, in one compiled program.

Lossless: k_row depends only on earlier rounds, never on this round's draws.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jspec.analysis import best_k_from_costs
from jspec.methods.chain import draft_chain, verify_cut_chain
from jspec.rounds import RoundCarry, SpeculativeStrategy, commit_round, prefix_sizes, score_tree
from jspec.validation import check_int

GRID = 100  # the alpha grid of the choice table: alpha = i / GRID


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdaptiveCarry:
    """The round carry plus, per row, decayed counts `[B]` of accepted drafts and drafts tried."""

    round: RoundCarry
    accepted: jax.Array
    tried: jax.Array


@dataclasses.dataclass(frozen=True)
class AdaptiveK(SpeculativeStrategy):
    """A chain of per-row length k in 1..k_max, chosen each round (see the module docstring).

    choice: `[GRID + 1]` ints, the k for alpha = i / GRID (build it with `AdaptiveK.from_costs`);
    decay: the weight of the past in the running counts (SmartSpec's 0.85); prior: the acceptance
    assumed before any round (worth 2 drafts tried). Verified by the chain walk (speculative
    sampling at T > 0, greedy at T = 0).
    """

    k_max: int = 8
    choice: tuple[int, ...] = ()
    decay: float = 0.85
    prior: float = 0.5
    stop: Any = None

    def __post_init__(self):
        check_int("k_max", self.k_max, 1)
        if len(self.choice) != GRID + 1 or any(
            isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.k_max for k in self.choice
        ):
            raise ValueError(
                f"choice must hold {GRID + 1} ints in 1..k_max={self.k_max} (use AdaptiveK.from_costs), got {self.choice!r}"
            )
        for name in ("decay", "prior"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")

    @classmethod
    def from_costs(cls, t_draft: float, t_target, k_max: int | None = None, **kwargs) -> AdaptiveK:
        """From measured costs: t_draft, seconds per drafter step, and t_target `[n]`, seconds of a
        target pass over 1 .. n tokens; k_max defaults to n - 1."""
        k_max = len(t_target) - 1 if k_max is None else k_max
        if k_max > len(t_target) - 1:
            raise ValueError(f"k_max must be <= len(t_target) - 1 = {len(t_target) - 1}, got {k_max}")
        costs = tuple(t_target)[: k_max + 1]
        choice = tuple(best_k_from_costs(i / GRID, t_draft, costs) for i in range(GRID + 1))
        return cls(k_max=k_max, choice=choice, **kwargs)

    @property
    def tokens_per_round(self) -> int:
        return self.k_max + 1

    @property
    def tokens_scored(self) -> int:
        return self.k_max + 1

    @property
    def score_sizes(self) -> tuple[int, ...]:
        return prefix_sizes(self.k_max + 1)

    def row_k(self, carry: AdaptiveCarry) -> jax.Array:
        """int32 `[B]`: this round's k per row, from the running acceptance estimate."""
        alpha = carry.accepted / jnp.maximum(carry.tried, 1e-6)
        return jnp.asarray(self.choice, jnp.int32)[jnp.round(alpha * GRID).astype(jnp.int32)]

    def init(self, target, drafter, prefill, first_token, sampling) -> AdaptiveCarry:
        carry = super().init(target, drafter, prefill, first_token, sampling)
        b = first_token.shape[0]
        return AdaptiveCarry(carry, jnp.full((b,), 2.0 * self.prior, jnp.float32), jnp.full((b,), 2.0, jnp.float32))

    def round(self, target, drafter, carry: AdaptiveCarry, active, sampling, key):
        key_draft, key_verify = jax.random.split(key)
        k = self.row_k(carry)
        inner = carry.round
        drafted = draft_chain(drafter, inner.drafter, inner.last, self.k_max, sampling, key_draft, stop=self.stop, limit=k)
        logits, cache, features = score_tree(target, inner.target_cache, drafted, drafter.feature_layers, self.score_sizes)
        verdict = verify_cut_chain(key_verify, drafted, logits, sampling)
        inner, tokens, n_new = commit_round(inner, drafter, drafted, cache, features, verdict, active, self.tokens_per_round)
        drafts = jnp.sum(drafted.tree.valid, axis=1) - 1  # a stop rule may cut below k
        tried = jnp.where(verdict.accepted < drafts, verdict.accepted + 1, drafts)
        update = lambda old, new: jnp.where(active & (drafts > 0), self.decay * old + new, old)  # noqa: E731
        carry = AdaptiveCarry(
            inner, update(carry.accepted, verdict.accepted.astype(jnp.float32)), update(carry.tried, tried.astype(jnp.float32))
        )
        return carry, tokens, n_new
