"""Chain speculative decoding: the `Chain` strategy and its per-round pure steps.

One round: `draft_chain` samples k tokens from the drafter, `score_chain` runs one target pass
over the last emitted token plus the k drafts, a chain verifier (`jspec.verify`) keeps a prefix,
and `commit` keeps the accepted entries in both caches. `chain_round` composes them; users who
want their own loop (streaming, custom stopping) can call the steps directly.

Cache invariant between rounds, per row, for the sequence `seq` (prompt + emitted tokens):
the target cache holds `seq[:-1]` and the drafter cache `seq[:-2]`; `last = seq[-1]`,
`prev = seq[-2]`. Drafting starts by feeding `[prev, last]`, which re-computes one drafter entry
but keeps the drafter in step whether or not the final draft was accepted, at a fixed shape.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jspec.lossy_verify import LossyVerifier
from jspec.models import KVCache, Transformer, causal_mask, commit, truncate
from jspec.sampling import Sampling, sample, warp
from jspec.verify import CHAIN_VERIFIERS, ChainVerifier, Verdict


@dataclasses.dataclass(frozen=True)
class Chain:
    """Draft a chain of k tokens per round and verify it with `verifier`.

    verifier: "sampling" (Leviathan/Chen speculative sampling), "block" (Sun et al. block
    verification) or "greedy" (temperature 0 only), all lossless; or, as an explicit opt-in, a
    lossy rule object from `jspec.lossy_verify` (`LossyTypical()`, `LossySpecDec()`), which makes
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

    @property
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

    def check(self, sampling: Sampling) -> None:
        """Reject combinations that would not be lossless (a lossy rule, asked for, runs at any temperature)."""
        if self.verifier == "greedy" and not sampling.greedy:
            raise ValueError(f"verifier 'greedy' is only lossless at temperature 0, got temperature={sampling.temperature}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ChainCarry:
    """What a chain round carries: both caches and the last two tokens of each row ([B])."""

    target_cache: KVCache
    drafter_cache: KVCache
    prev: jax.Array
    last: jax.Array


def drafter_catch_up(drafter: Transformer, cache: KVCache, prev: jax.Array, last: jax.Array) -> tuple[jax.Array, KVCache]:
    """Feed `[prev, last]` (int32 `[B]` each) to the drafter, whose cache holds `seq[:-2]`.

    Returns the drafter's logits after `last` `[B, V]` (the distribution of the first draft) and
    the cache holding `seq`. Every round starts this way, chain or tree.
    """
    b = prev.shape[0]
    tokens = jnp.stack([prev, last], axis=1)
    positions = cache.lengths[:, None] + jnp.arange(2)
    logits, cache = drafter(tokens, positions, causal_mask(b, 2), cache, logits_at=jnp.ones((b, 1), jnp.int32))
    return logits[:, 0], commit(cache, jnp.full((b,), 2, jnp.int32))


def next_carry(
    carry: ChainCarry,
    target_cache: KVCache,
    drafter_cache: KVCache,
    sequence: jax.Array,  # int32 [B, >= accepted + 1]: last, then the drafts along the accepted path
    verdict,  # accepted [B], next_token [B]
    active: jax.Array,  # bool [B]
) -> ChainCarry:
    """The carry after a round whose target cache is committed: the drafter rewound to one token
    behind the target, `prev` the last accepted draft (or the old `last`), `last` the next token.
    Inactive rows keep their tokens."""
    prev_new = jnp.take_along_axis(sequence, verdict.accepted[:, None], axis=1)[:, 0]
    return ChainCarry(
        target_cache=target_cache,
        drafter_cache=truncate(drafter_cache, target_cache.lengths - 1),
        prev=jnp.where(active, prev_new, carry.prev),
        last=jnp.where(active, verdict.next_token, carry.last),
    )


def draft_chain(
    drafter: Transformer,
    cache: KVCache,
    prev: jax.Array,  # int32 [B]
    last: jax.Array,  # int32 [B]
    k: int,
    sampling: Sampling,
    key: jax.Array,
) -> tuple[jax.Array, jax.Array, KVCache]:
    """Sample k draft tokens autoregressively.

    Returns draft tokens int32 `[B, k]`, the warped distributions they were drawn from
    `[B, k, V]`, and the drafter cache advanced past `prev, last, x_1..x_{k-1}`.
    """
    b = prev.shape[0]
    keys = jax.random.split(key, k)
    logits, cache = drafter_catch_up(drafter, cache, prev, last)
    q = warp(logits, sampling)
    x = sample(keys[0], q)

    def step(carry, step_key):
        cache, x = carry
        logits, cache = drafter(x[:, None], cache.lengths[:, None], causal_mask(b, 1), cache)
        cache = commit(cache, jnp.ones((b,), jnp.int32))
        q = warp(logits[:, 0], sampling)
        x_next = sample(step_key, q)
        return (cache, x_next), (x_next, q)

    (cache, _), (xs, qs) = jax.lax.scan(step, (cache, x), keys[1:])
    draft_tokens = jnp.concatenate([x[:, None], xs.T], axis=1)
    draft_probs = jnp.concatenate([q[:, None], jnp.swapaxes(qs, 0, 1)], axis=1)
    return draft_tokens, draft_probs, cache


def score_chain(
    target: Transformer,
    cache: KVCache,
    last: jax.Array,  # int32 [B]
    draft_tokens: jax.Array,  # int32 [B, k]
    sampling: Sampling,
) -> tuple[jax.Array, KVCache]:
    """One target pass over `[last, x_1..x_k]`: warped target distributions `[B, k+1, V]`."""
    tokens = jnp.concatenate([last[:, None], draft_tokens], axis=1)
    b, t = tokens.shape
    positions = cache.lengths[:, None] + jnp.arange(t)
    logits, cache = target(tokens, positions, causal_mask(b, t), cache)
    return warp(logits, sampling), cache


def emitted_tokens(draft_tokens: jax.Array, verdict: Verdict) -> jax.Array:
    """`[B, k+1]`: x_1..x_n, then next_token at index n (entries after it are unspecified)."""
    b, k = draft_tokens.shape
    padded = jnp.concatenate([draft_tokens, jnp.zeros((b, 1), jnp.int32)], axis=1)
    index = jnp.arange(k + 1)[None, :]
    return jnp.where(index == verdict.accepted[:, None], verdict.next_token[:, None], padded)


def chain_round(
    strategy: Chain,
    target: Transformer,
    drafter: Transformer,
    carry: ChainCarry,
    active: jax.Array,  # bool [B]
    sampling: Sampling,
    key: jax.Array,
) -> tuple[ChainCarry, jax.Array, jax.Array]:
    """Draft, score, verify and commit once.

    Returns the new carry, the emitted tokens `[B, k+1]` and how many of them each row emitted
    (`accepted + 1`, `[B]`). Rows with `active` False commit nothing and keep their tokens.
    """
    key_draft, key_verify = jax.random.split(key)
    draft_tokens, draft_probs, drafter_cache = draft_chain(
        drafter, carry.drafter_cache, carry.prev, carry.last, strategy.k, sampling, key_draft
    )
    # A lossy rule may see another warp of the same logits (SpecDec: logit gaps at temperature 0).
    target_probs, target_cache = score_chain(target, carry.target_cache, carry.last, draft_tokens, strategy.scoring(sampling))
    verdict = strategy.verify_rule(key_verify, draft_tokens, draft_probs, target_probs)

    n_emitted = verdict.accepted + 1
    target_cache = commit(target_cache, jnp.where(active, n_emitted, 0))
    sequence = jnp.concatenate([carry.last[:, None], draft_tokens], axis=1)  # [B, k+1]
    carry = next_carry(carry, target_cache, drafter_cache, sequence, verdict, active)
    return carry, emitted_tokens(draft_tokens, verdict), n_emitted
