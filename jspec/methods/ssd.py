"""Speculative speculative decoding (SSD, Kumar, Dao and May, arXiv 2603.03251): the `SSD` strategy.

In a round of chain speculation the target verifies k drafts while the drafter waits. SSD gives
the drafter that time: while the target verifies round t, the drafter pre-drafts round t + 1 for
the verification outcomes it finds likeliest, and keeps the drafts in a speculation cache keyed by
the outcome (accepted length n, bonus token y). If round t's real outcome is in the cache (a hit),
round t + 1 starts at verification: no drafting at all. A miss drafts as usual.

The outcome predictor is the paper's: for each accepted length n the cache holds the top F_n
tokens of the drafter's own distribution at position n + 1 (for n < k without the draft d_{n+1},
which a rejection never emits), the fan-out `fanout = (F_0, .., F_k)`; the paper allocates it as
a capped geometric series, largest at n = k.

Lossless: every chain the target verifies was drawn from the drafter given exactly the prefix it
extends (a hit means the predicted prefix is the real one), its distributions travel with it, and
the verifier is Leviathan/Chen speculative sampling, unchanged. Whether a round hits depends on the
previous verification and the drafter's ranking only, never on the pre-drafted tokens' own draws.

With `jspec.parallel.parallel_generate` the target and the drafter are on devices of their own
and the verification and the pre-drafting of a round run at the same time; with
`jspec.speculative_generate` they run in turn on one device (same output, for the same key).
`Output.stats.strategy` holds per row the rounds run and the rounds that hit.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jspec.drafters import Accepted
from jspec.methods.chain import draft_chain, score_chain
from jspec.models import KVCache, causal_mask, commit
from jspec.parallel import SEQUENTIAL
from jspec.rounds import emitted_tokens, keep_active
from jspec.sampling import Sampling, sample, warp
from jspec.verify.chain import Verdict, verify_sampling


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SSDCarry:
    """Between rounds: the target's cache (on the target's device), the drafter's state (on the
    drafter's), `last` [B] (the next root), and the speculation cache's answer for the next round:
    `hit` bool [B], and where it hit, the pre-drafted chain `cached_tokens` int32 [B, k] with the
    distributions it was drawn from `cached_probs` [B, k, V]. `rounds`, `hits`: int32 [B] counts."""

    target_cache: KVCache
    drafter: Any
    last: jax.Array
    hit: jax.Array
    cached_tokens: jax.Array
    cached_probs: jax.Array
    rounds: jax.Array
    hits: jax.Array


def default_fanout(k: int) -> tuple[int, ...]:
    """A capped geometric fan-out over accepted lengths 0..k: one candidate bonus token per length,
    two after a fully accepted chain (the likeliest outcome at the acceptance rates seen here)."""
    return (1,) * k + (2,)


@dataclasses.dataclass(frozen=True)
class SSD:
    """Chain speculation of k drafts with a speculation cache (see the module docstring).

    fanout: `(F_0, .., F_k)`, candidate bonus tokens kept per accepted length (0 skips a length);
    None: `default_fanout(k)`. The drafter pre-drafts sum(F) chains of k tokens per round, as
    k drafter passes over sum(F) tokens each. Needs a language-model drafter (`ModelDrafter`).
    """

    k: int = 3
    fanout: tuple[int, ...] | None = None
    parallel = True  # places its work with `jspec.parallel` stages
    lossy = False

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int >= 1, got {self.k!r}")
        fanout = self.fanout_per_length
        if (
            not isinstance(fanout, tuple)
            or len(fanout) != self.k + 1
            or any(isinstance(f, bool) or not isinstance(f, int) or f < 0 for f in fanout)
            or sum(fanout) < 1
        ):
            raise ValueError(f"fanout must be a tuple of k + 1 = {self.k + 1} ints >= 0, not all 0, got {self.fanout!r}")

    @property
    def fanout_per_length(self) -> tuple[int, ...]:
        return default_fanout(self.k) if self.fanout is None else self.fanout

    @property
    def branches(self) -> int:
        """M: the pre-drafted chains per round (entries of the speculation cache)."""
        return sum(self.fanout_per_length)

    @property
    def branch_outcomes(self) -> tuple[np.ndarray, np.ndarray]:
        """(accepted length, rank of the bonus token among the drafter's candidates) of each branch, `[M]` each."""
        lengths = np.concatenate([np.full(f, n) for n, f in enumerate(self.fanout_per_length)]).astype(np.int32)
        ranks = np.concatenate([np.arange(f) for f in self.fanout_per_length]).astype(np.int32)
        return lengths, ranks

    @property
    def tokens_per_round(self) -> int:
        return self.k + 1

    @property
    def tokens_scored(self) -> int:
        """Slots past the committed length a round writes: the drafter's window holds the chain and
        every branch (k + M k); the target writes k + 1."""
        return self.k + self.branches * self.k + 1

    def check(self, sampling: Sampling) -> None:
        del sampling  # speculative sampling is lossless at every temperature

    def init(self, target, drafter, prefill, first_token, sampling, stages=SEQUENTIAL) -> SSDCarry:
        del target, sampling
        b, v = first_token.shape[0], drafter.vocab_size
        state = stages.on_drafter(lambda: drafter.prefill(prefill, first_token, self.tokens_per_round))
        zeros = jnp.zeros((b,), jnp.int32)
        return SSDCarry(
            target_cache=prefill.cache,
            drafter=state,
            last=first_token,
            hit=jnp.zeros((b,), bool),
            cached_tokens=jnp.zeros((b, self.k), jnp.int32),
            cached_probs=jnp.zeros((b, self.k, v), jnp.float32),
            rounds=zeros,
            hits=zeros,
        )

    def round(self, target, drafter, carry: SSDCarry, active, sampling, key, stages=SEQUENTIAL):
        k, b = self.k, carry.last.shape[0]
        key_draft, key_verify, key_branch = jax.random.split(key, 3)

        # 1. Rows the cache missed draft now, while the target waits; a round where every active
        #    row hit skips the drafter altogether.
        def draft():
            drafted = draft_chain(drafter, carry.drafter, carry.last, k, sampling, key_draft)
            return drafted.tree.tokens[:, 1:], drafted.draft_probs[:, :k]

        def skip():
            return jnp.zeros_like(carry.cached_tokens), jnp.zeros_like(carry.cached_probs)

        missed = jnp.any(active & ~carry.hit)
        fresh = stages.share(stages.on_drafter(lambda: jax.lax.cond(missed, draft, skip)))
        tokens = jnp.where(carry.hit[:, None], carry.cached_tokens, fresh[0])  # [B, k]
        probs = jnp.where(carry.hit[:, None, None], carry.cached_probs, fresh[1])  # [B, k, V]

        # 2. At once: the target verifies the chain, the drafter pre-drafts the next round.
        chain = jnp.concatenate([carry.last[:, None], tokens], axis=1)  # [B, k+1]: the root, then the drafts

        def verify():
            positions = carry.target_cache.lengths[:, None] + jnp.arange(k + 1)
            logits, cache = target(chain, positions, causal_mask(b, k + 1), carry.target_cache)
            verdict = verify_sampling(key_verify, tokens, probs, warp(logits, sampling))
            return cache, verdict.accepted, verdict.next_token

        target_cache, accepted, next_token = stages.on_target(verify)
        predrafted = stages.on_drafter(lambda: self.predraft(drafter, carry.drafter, carry.last, tokens, sampling, key_branch))
        state, branches = predrafted[0], predrafted[1:]
        (accepted, next_token), branches = stages.share(((accepted, next_token), branches))
        branch_length, branch_bonus, branch_tokens, branch_probs = branches

        # 3. Commit the accepted prefix, each model on its own device.
        n_new = accepted + 1
        target_cache = stages.on_target(lambda: commit(target_cache, jnp.where(active, n_new, 0), k + 1))
        slots = jnp.broadcast_to(jnp.arange(-1, k, dtype=jnp.int32), (b, k + 1))  # node i at window slot i - 1
        kept = Accepted(tokens=chain, slots=slots, accepted=accepted, next_token=next_token, features=None, active=active)
        state = stages.on_drafter(lambda: drafter.commit(state, kept))

        # 4. Look the real outcome up in the speculation cache.
        match = (branch_length == accepted[:, None]) & (branch_bonus == next_token[:, None])  # [B, M]
        first = jnp.argmax(match, axis=1)
        keep = functools.partial(keep_active, active)
        carry = SSDCarry(
            target_cache=target_cache,
            drafter=state,
            last=keep(next_token, carry.last),
            hit=keep(match.any(axis=1), carry.hit),
            cached_tokens=keep(jnp.take_along_axis(branch_tokens, first[:, None, None], axis=1)[:, 0], carry.cached_tokens),
            cached_probs=keep(jnp.take_along_axis(branch_probs, first[:, None, None, None], axis=1)[:, 0], carry.cached_probs),
            rounds=carry.rounds + active,
            hits=carry.hits + (active & carry.hit),
        )
        return carry, emitted_tokens(tokens, Verdict(accepted, next_token)), n_new

    def stats(self, carry: SSDCarry) -> dict[str, jax.Array]:
        """`Output.stats.strategy`: rounds run and rounds that hit the speculation cache, int32 [B]."""
        return {"rounds": carry.rounds, "hits": carry.hits}

    def predraft(self, drafter, state, last: jax.Array, tokens: jax.Array, sampling: Sampling, key: jax.Array):
        """The drafter's work during verification: score the chain `last, tokens [B, k]` (window
        slots 0..k-1), rank candidate bonus tokens per accepted length, and draft k tokens after each
        of the M outcomes (window slots k + s M + m). Returns (state, branch lengths [B, M], bonus
        tokens [B, M], drafts [B, M, k], their distributions [B, M, k, V])."""
        k, m = self.k, self.branches
        b = last.shape[0]
        width = k + m * k
        window = jnp.arange(width)
        # [B, k+1, V]: at position n, the drafter's logits for the token after n accepted drafts.
        logits, state = score_chain(drafter, state, last, tokens, width, "SSD")

        # Candidates for the bonus token after n accepted drafts: the drafter's top tokens at
        # position n, without d_{n+1} for n < k (a rejected draft is never what replaces it).
        rejected = jnp.concatenate([tokens, jnp.full((b, 1), -1, jnp.int32)], axis=1)  # [B, k+1]
        ranked = jnp.where(jnp.arange(logits.shape[-1]) == rejected[..., None], -jnp.inf, logits)
        top = jax.lax.top_k(ranked, max(self.fanout_per_length))[1].astype(jnp.int32)  # [B, k+1, F]
        lengths, ranks = self.branch_outcomes
        bonus = top[:, lengths, ranks]  # [B, M]
        branch_length = jnp.broadcast_to(jnp.asarray(lengths), (b, m))

        keys = jax.random.split(key, k)
        sees_chain = window[None, :] < jnp.asarray(lengths)[:, None]  # [M, W]: a branch sees d_1..d_n
        lane = (window - k) % m == jnp.arange(m)[:, None]  # [M, W]: the branch's own slots
        level = (window - k) // m

        def step(carry, s):
            state, x = carry  # x [B, M]: each branch's node at level s (the bonus token at s = 0)
            mask = sees_chain | ((window >= k) & lane & (level <= s))
            node_depth = branch_length + 1 + s
            extend_mask = jnp.broadcast_to(mask, (b, m, width))
            out, _, state = drafter.extend(state, x, jnp.zeros((b, m, 0), jnp.float32), node_depth, extend_mask, k + s * m)
            q = warp(out, sampling)  # [B, M, V]
            x_next = sample(keys[s], q)
            return (state, x_next), (x_next, q)

        (state, _), (xs, qs) = jax.lax.scan(step, (state, bonus), jnp.arange(k))
        return state, branch_length, bonus, jnp.moveaxis(xs, 0, 2), jnp.moveaxis(qs, 0, 2)


def hit_rate(stats) -> float:
    """Fraction of all rounds that started from the speculation cache (a row's first round never
    does), from `Output.stats` of an SSD decode."""
    return float(np.sum(stats.strategy["hits"]) / max(np.sum(stats.strategy["rounds"]), 1))
