"""PEARL: parallel speculative decoding with adaptive draft length (Liu et al., arXiv 2408.11850),
the `PEARL` strategy.

Each step the target and the drafter work at once (on devices of their own under
`jspec.parallel.parallel_generate`, in turn under `jspec.speculative_generate`). A row is in one
of two modes, set by the previous step:

- **pre-verify** (no drafts pending): the target scores the root alone while the drafter drafts
  gamma tokens from it; the first draft is then verified against the target's distribution after
  the root. Rejected: the correction is the next root, pre-verify again (the other drafts were
  never waited for). Accepted: it is the next root and the other gamma - 1 drafts are pending.
- **post-verify** (gamma - 1 drafts pending): the target scores the root and the pending drafts
  (gamma tokens) while the drafter, assuming they are all accepted, drafts gamma more past them.
  The gamma - 1 pending drafts and the first new draft are verified in order against the target's
  gamma distributions. All accepted: no bonus token is sampled, the first new draft is the next
  root and the other gamma - 1 are pending (post-verify again, so the draft length grows while
  drafts keep being accepted). A rejection emits the correction and returns to pre-verify.

Lossless: every draft is verified by Leviathan/Chen speculative sampling against the target's
distribution given exactly its prefix, with the distribution it was drawn from. The target scores
gamma tokens in either mode (a pre-verify row's extra positions are padding), except that a step
where every row pre-verifies scores the root alone (`lax.cond`, one program).
`jspec.analysis.pearl_speedup` is the expected speedup from measured costs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from jspec.drafters import Accepted
from jspec.methods.chain import score_chain
from jspec.models import KVCache, causal_mask, commit
from jspec.parallel import SEQUENTIAL
from jspec.rounds import keep_active
from jspec.sampling import Sampling, sample, warp
from jspec.verify.chain import verify_sampling


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PEARLCarry:
    """Between steps, per row: `last` [B], the root (emitted, not in the target's cache); the
    target's cache and the drafter's committed state (each on its own device); `pending` bool [B],
    post-verify; `drafts` int32 [B, gamma - 1] and `draft_probs` [B, gamma - 1, V], the pending
    drafts after the root and their distributions. `steps`, `post_steps`: int32 [B] counts."""

    target_cache: KVCache
    drafter: Any
    last: jax.Array
    pending: jax.Array
    drafts: jax.Array
    draft_probs: jax.Array
    steps: jax.Array
    post_steps: jax.Array


@dataclasses.dataclass(frozen=True)
class PEARL:
    """PEARL with draft length gamma >= 1 (see the module docstring). The paper sets gamma to the
    ratio of the target's and the drafter's step times, so neither device waits."""

    gamma: int = 4
    parallel = True  # places its work with `jspec.parallel` stages
    lossy = False

    def __post_init__(self):
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, int) or self.gamma < 1:
            raise ValueError(f"gamma must be an int >= 1, got {self.gamma!r}")

    @property
    def tokens_per_round(self) -> int:
        """Most tokens a step emits: gamma - 1 pending drafts and the first new one."""
        return self.gamma

    @property
    def tokens_scored(self) -> int:
        """Slots past the committed length a step writes: the drafter's window holds the pending
        drafts and gamma new ones (the target writes gamma)."""
        return 2 * self.gamma

    def check(self, sampling: Sampling) -> None:
        del sampling  # speculative sampling is lossless at every temperature

    def init(self, target, drafter, prefill, first_token, sampling, stages=SEQUENTIAL) -> PEARLCarry:
        del target, sampling
        b, v, m = first_token.shape[0], drafter.vocab_size, self.gamma - 1
        state = stages.on_drafter(lambda: drafter.prefill(prefill, first_token, self.tokens_per_round))
        zeros = jnp.zeros((b,), jnp.int32)
        return PEARLCarry(
            target_cache=prefill.cache,
            drafter=state,
            last=first_token,
            pending=jnp.zeros((b,), bool),
            drafts=jnp.zeros((b, m), jnp.int32),
            draft_probs=jnp.zeros((b, m, v), jnp.float32),
            steps=zeros,
            post_steps=zeros,
        )

    def round(self, target, drafter, carry: PEARLCarry, active, sampling, key, stages=SEQUENTIAL):
        g, b = self.gamma, carry.last.shape[0]
        key_draft, key_verify = jax.random.split(key)
        chain = jnp.concatenate([carry.last[:, None], carry.drafts], axis=1)  # [B, g]: root + pending

        # At once: the target scores the root and the pending drafts, the drafter drafts g tokens
        # past them (past the root alone for a pre-verifying row).
        def score():
            positions = carry.target_cache.lengths[:, None] + jnp.arange(g)

            def over(n):
                logits, cache = target(chain[:, :n], positions[:, :n], causal_mask(b, n), carry.target_cache)
                return jnp.pad(logits, ((0, 0), (0, g - n), (0, 0))), cache

            if g == 1:
                return over(1)
            return jax.lax.cond(jnp.any(carry.pending & active), lambda: over(g), lambda: over(1))

        logits, target_cache = stages.on_target(score)
        state, new_drafts, new_probs = stages.on_drafter(
            lambda: self.draft(drafter, carry.drafter, chain, carry.pending, sampling, key_draft)
        )
        logits, (new_drafts, new_probs) = stages.share((logits, (new_drafts, new_probs)))

        # Verify the pending drafts and the first new one ([B, L] valid, L = g post, 1 pre).
        limit = jnp.where(carry.pending, g, 1)
        drafts = jnp.where(carry.pending[:, None], jnp.concatenate([carry.drafts, new_drafts[:, :1]], axis=1), 0)
        drafts = drafts.at[:, 0].set(jnp.where(carry.pending, drafts[:, 0], new_drafts[:, 0]))
        probs = jnp.concatenate([carry.draft_probs, new_probs[:, :1]], axis=1)
        probs = jnp.where(carry.pending[:, None, None], probs, jnp.zeros_like(probs).at[:, 0].set(new_probs[:, 0]))
        target_probs = warp(logits, sampling)  # [B, g, V]
        verdict = verify_sampling(key_verify, drafts, probs, jnp.concatenate([target_probs, target_probs[:, -1:]], axis=1))
        all_accepted = verdict.accepted >= limit
        accepted = jnp.minimum(verdict.accepted, limit)
        last_draft = jnp.take_along_axis(drafts, (limit - 1)[:, None], axis=1)[:, 0]  # the first new draft
        next_root = jnp.where(all_accepted, last_draft, verdict.next_token)
        # Emitted: the accepted drafts, then the correction after a rejection (no bonus token).
        index = jnp.arange(g)[None, :]
        emitted = jnp.where(index < accepted[:, None], drafts, next_root[:, None])
        n_new = jnp.where(all_accepted, limit, accepted + 1)

        # Commit: the root and the accepted pending drafts (a new root never is in the cache yet).
        kept = jnp.where(all_accepted, limit - 1, accepted)
        target_cache = stages.on_target(lambda: commit(target_cache, jnp.where(active, kept + 1, 0), g))
        # The drafter keeps the root and the kept pending drafts (window slots 0..g-2; a
        # pre-verifying row keeps the root alone).
        path = Accepted(
            tokens=jnp.concatenate([carry.last[:, None], drafts], axis=1)[:, :g],
            slots=jnp.broadcast_to(jnp.arange(-1, g - 1, dtype=jnp.int32), (b, g)),
            accepted=kept,
            next_token=next_root,
            features=None,
            active=active,
        )
        state = stages.on_drafter(lambda: drafter.commit(state, path))

        keep = functools.partial(keep_active, active)
        carry = PEARLCarry(
            target_cache=target_cache,
            drafter=state,
            last=keep(next_root, carry.last),
            pending=keep(all_accepted & (g > 1), carry.pending),
            drafts=keep(new_drafts[:, 1:], carry.drafts),
            draft_probs=keep(new_probs[:, 1:], carry.draft_probs),
            steps=carry.steps + active,
            post_steps=carry.post_steps + (active & carry.pending),
        )
        return carry, emitted, n_new

    def draft(self, drafter, state, chain: jax.Array, pending: jax.Array, sampling: Sampling, key: jax.Array):
        """The drafter's step: catch up to the root `chain[:, 0]`, score the pending drafts
        `chain[:, 1:]` (rows with `pending`; window slots 0..g-2), then draft g tokens past the last
        of them (past the root for the other rows) at window slots g-1 .. 2g-2. Returns the state
        (uncommitted) and the drafts `[B, g]` with their distributions `[B, g, V]`."""
        g, b = self.gamma, chain.shape[0]
        width = 2 * g - 1
        window = jnp.arange(width)
        # The pending drafts in one pass (a pre-verifying row's entries are never looked at).
        scored, state = score_chain(drafter, state, chain[:, 0], chain[:, 1:], width, "PEARL")
        logits = jnp.where(pending[:, None], scored[:, -1], scored[:, 0])
        base = jnp.where(pending, g - 1, 0)  # depth of the node the new drafts grow from
        keys = jax.random.split(key, g)
        q = warp(logits, sampling)
        x = sample(keys[0], q)

        def step(carry, i):
            state, x = carry  # x: new draft i (1-based), at window slot g - 2 + i
            sees = jnp.where(pending[:, None], window[None, :] < g - 1, False) | (
                (window[None, :] >= g - 1) & (window[None, :] <= g - 2 + i)
            )
            out, _, state = drafter.extend(
                state, x[:, None], jnp.zeros((b, 1, 0), jnp.float32), (base + i)[:, None], sees[:, None, :], g - 2 + i
            )
            q = warp(out[:, 0], sampling)
            x_next = sample(keys[i], q)
            return (state, x_next), (x_next, q)

        (state, _), (xs, qs) = jax.lax.scan(step, (state, x), jnp.arange(1, g))
        drafts = jnp.concatenate([x[:, None], xs.T], axis=1)
        probs = jnp.concatenate([q[:, None], jnp.moveaxis(qs, 0, 1)], axis=1)
        return state, drafts, probs

    def stats(self, carry: PEARLCarry) -> dict[str, jax.Array]:
        """`Output.stats.strategy`: steps run and steps in post-verify mode, int32 [B]."""
        return {"steps": carry.steps, "post_steps": carry.post_steps}
