"""The `AdaptiveK` strategy: a chain whose length is chosen per row and per round from the row's
running acceptance estimates and a measured cost model (the "Decoding Speculative Decoding" analysis
of choosing k, arXiv 2402.01528, and SmartSpec's online estimate, arXiv 2406.14066).

Each row keeps exponentially decayed counts of two acceptance rates: of its first draft (alpha), and
of a later draft given that the one before it was accepted (alpha_next). A round that drafts d and
accepts a tries the first draft once (accepted if a >= 1) and min(a, d - 1) later ones (a - 1 of
them accepted). Acceptance is bursty: where the drafter is right once it tends to stay right
(SmolLM2 and its drafter on Spec-Bench: alpha 0.28, alpha_next about 0.4), so a single i.i.d. rate
underrates longer chains. The round drafts the k in 1..k_max that maximises

    (1 + alpha * sum_{i<k} alpha_next^i) * t_target[0] / (k * t_draft + t_target[k])

(`jspec.analysis.best_k_from_costs` on the host; computed on device here), in one compiled program:

- at batch 1 the row's k is the round's, and the round runs a fixed chain of k drafts, one branch
  per k (`jspec.rounds.run_branch`). SmolLM2 in bfloat16 on a CPU, k_max = 4, one 256-token
  prompt, the same 68 rounds: 32.0 ms a round, where the cut chain below took 35.1;
- in a batch, the chain is drafted at the static length k_max and cut per row
  (`jspec.methods.chain.draft_chain(limit=...)`): drafter calls past every row's k are skipped and
  the target scores only the prefix the longest row needs. So is it, at any batch size, under a
  stop rule.

Lossless: k_row depends only on earlier rounds, never on this round's draws.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jspec.methods.chain import draft_chain, fixed_chain_round, verify_cut_chain
from jspec.rounds import RoundCarry, SpeculativeStrategy, commit_round, pad_tokens, prefix_sizes, run_branch, score_tree
from jspec.validation import check_real


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdaptiveCarry:
    """The round carry plus, per row, decayed counts `[B]`: first drafts accepted and tried, later
    drafts accepted and tried (a later draft is tried once the one before it was accepted); and
    rounds_per_k, int32 `[B, k_max]`: the rounds each row ran at k = 1 .. k_max (its `stats`)."""

    round: RoundCarry
    first_accepted: jax.Array
    first_tried: jax.Array
    next_accepted: jax.Array
    next_tried: jax.Array
    rounds_per_k: jax.Array


def round_counts(accepted: jax.Array, drafts: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """What a round adds to the counts, float32 `[B]` each: first drafts accepted and tried, later
    drafts accepted and tried, for rows that drafted `drafts [B]` (>= 1) and accepted `accepted [B]`.
    Drafts 2 .. a + 1 are tried when the first a are accepted (all d - 1 later ones when a = d)."""
    accepted, drafts = accepted.astype(jnp.float32), drafts.astype(jnp.float32)
    first_accepted = jnp.minimum(accepted, 1.0)
    return first_accepted, jnp.ones_like(accepted), jnp.maximum(accepted - 1.0, 0.0), jnp.minimum(accepted, drafts - 1.0)


def expected_chain_tokens(alpha: jax.Array, alpha_next: jax.Array, k_max: int) -> jax.Array:
    """float32 `[B, k_max + 1]`: the tokens a round emits with a chain of k = 0 .. k_max drafts,
    1 + alpha * (1 + alpha_next + ... + alpha_next^(k - 1)), for rows whose first draft is accepted
    with probability alpha `[B]` and a later one, given the one before it was, alpha_next `[B]`."""
    powers = alpha_next[:, None] ** jnp.arange(k_max, dtype=jnp.float32)  # [B, k_max]
    later = jnp.concatenate([jnp.zeros_like(alpha)[:, None], jnp.cumsum(powers, axis=1)], axis=1)
    return 1.0 + alpha[:, None] * later


@dataclasses.dataclass(frozen=True)
class AdaptiveK(SpeculativeStrategy):
    """A chain of per-row length k in 1..k_max, chosen each round (see the module docstring).

    t_draft: seconds of one drafter step; t_target: seconds of a target pass over 1, 2, ..,
    k_max + 1 tokens (build both with `AdaptiveK.from_costs`); decay: the weight of the past in the
    running counts; prior: the acceptance assumed before any round (worth 2 drafts tried, for each
    rate). Verified by the chain walk (speculative sampling at T > 0, greedy at T = 0).
    """

    t_draft: float = 0.0
    t_target: tuple[float, ...] = ()
    decay: float = 0.85
    prior: float = 0.5
    stop: Any = None

    def __post_init__(self):
        check_real("t_draft", self.t_draft, low=0.0)
        costs = self.t_target
        if not isinstance(costs, tuple) or len(costs) < 2:
            raise ValueError(f"t_target must be a tuple of >= 2 costs (passes over 1, 2, .. tokens), got {costs!r}")
        for i, t in enumerate(costs):
            check_real(f"t_target[{i}]", t, low=0.0, low_open=True)
        for name in ("decay", "prior"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")

    @classmethod
    def from_costs(cls, t_draft: float, t_target, k_max: int | None = None, **kwargs) -> AdaptiveK:
        """From measured costs: t_draft, seconds per drafter step, and t_target `[n]`, seconds of a
        target pass over 1 .. n tokens; k_max defaults to n - 1."""
        t_target = tuple(float(t) for t in t_target)
        k_max = len(t_target) - 1 if k_max is None else k_max
        if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 1:
            raise ValueError(f"k_max must be an int >= 1, got {k_max!r}")
        if k_max > len(t_target) - 1:
            raise ValueError(f"k_max must be <= len(t_target) - 1 = {len(t_target) - 1}, got {k_max}")
        return cls(t_draft=float(t_draft), t_target=t_target[: k_max + 1], **kwargs)

    @property
    def k_max(self) -> int:
        return len(self.t_target) - 1

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
        """int32 `[B]`: this round's k per row, the cost model's best at the running estimates."""
        alpha = carry.first_accepted / jnp.maximum(carry.first_tried, 1e-6)  # [B]
        alpha_next = carry.next_accepted / jnp.maximum(carry.next_tried, 1e-6)
        ks = jnp.arange(1, self.k_max + 1)
        taus = expected_chain_tokens(alpha, alpha_next, self.k_max)[:, 1:]  # [B, K], tau(k)
        costs = ks * self.t_draft + jnp.asarray(self.t_target[1:], jnp.float32)
        return (jnp.argmax(taus / costs, axis=1) + 1).astype(jnp.int32)  # argmax: ties go to the smaller k

    def init(self, target, drafter, prefill, first_token, sampling) -> AdaptiveCarry:
        carry = super().init(target, drafter, prefill, first_token, sampling)
        b = first_token.shape[0]
        accepted, tried = jnp.full((b,), 2.0 * self.prior, jnp.float32), jnp.full((b,), 2.0, jnp.float32)
        return AdaptiveCarry(carry, accepted, tried, accepted, tried, jnp.zeros((b, self.k_max), jnp.int32))

    def stats(self, carry: AdaptiveCarry) -> dict[str, jax.Array]:
        """`Output.stats.strategy`: rounds run at k = 1 .. k_max per row, int32 `[B, k_max]` (the k the
        cost model chose, before any stop rule cut the chain)."""
        return {"rounds_per_k": carry.rounds_per_k}

    def round(self, target, drafter, carry: AdaptiveCarry, active, sampling, key):
        k = self.row_k(carry)
        if active.shape[0] == 1 and self.stop is None:
            inner, tokens, n_new, accepted = self._fixed_chain_round(target, drafter, carry.round, k[0], active, sampling, key)
            drafts = k
        else:
            inner, tokens, n_new, accepted, drafts = self._cut_chain_round(target, drafter, carry.round, k, active, sampling, key)
        observed = active & (drafts > 0)
        update = lambda old, new: jnp.where(observed, self.decay * old + new, old)  # noqa: E731
        counts = (carry.first_accepted, carry.first_tried, carry.next_accepted, carry.next_tried)
        new = round_counts(accepted, drafts)
        rounds_per_k = carry.rounds_per_k + jax.nn.one_hot(k - 1, self.k_max, dtype=jnp.int32) * active[:, None]
        return AdaptiveCarry(inner, *(update(old, n) for old, n in zip(counts, new)), rounds_per_k), tokens, n_new

    def _cut_chain_round(self, target, drafter, inner: RoundCarry, k: jax.Array, active, sampling, key):
        """A chain drafted at k_max and cut per row at `k [B]` (and by the stop rule), the target
        scoring the shortest prefix that holds every row's: (carry, tokens, n_new, accepted,
        drafts `[B]`)."""
        key_draft, key_verify = jax.random.split(key)
        drafted = draft_chain(drafter, inner.drafter, inner.last, self.k_max, sampling, key_draft, stop=self.stop, limit=k)
        logits, cache, features = score_tree(target, inner.target_cache, drafted, drafter.feature_layers, self.score_sizes)
        verdict = verify_cut_chain(key_verify, drafted, logits, sampling)
        inner, tokens, n_new = commit_round(inner, drafter, drafted, cache, features, verdict, active, self.tokens_per_round)
        drafts = jnp.sum(drafted.tree.valid, axis=1) - 1  # a stop rule may cut below k
        return inner, tokens, n_new, verdict.accepted, drafts

    def _fixed_chain_round(self, target, drafter, inner: RoundCarry, k: jax.Array, active, sampling, key):
        """At batch 1 the row's k (int32 `[]`) is the round's: a fixed chain of k drafts
        (`jspec.methods.chain.fixed_chain_round`), one branch per k (`jspec.rounds.run_branch`),
        without the cut chain's conds and run-time prefix choice (the branches' loop costs about
        2 ms a round itself; SmolLM2, CPU). Returns (carry, tokens `[1, k_max + 1]`, n_new,
        accepted)."""

        def at(j: int):
            def branch(operand):
                inner, tokens, n_new, accepted = fixed_chain_round(target, drafter, operand[0], j, active, sampling, key)
                return inner, pad_tokens(tokens, self.tokens_per_round), n_new, accepted

            return branch

        empty = (inner, jnp.zeros((1, self.tokens_per_round), jnp.int32), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
        return run_branch(k - 1, [at(j) for j in range(1, self.k_max + 1)], empty)
