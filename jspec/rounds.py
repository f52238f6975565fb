"""The round machinery every strategy shares: the strategy protocol, the carry, scoring a drafted
tree in one target pass, and committing the accepted path in the target and the drafter.

The decode loop (`jspec.decode`) knows a strategy only through this protocol:

    tokens_per_round: int    most tokens one round emits
    tokens_scored: int       cache slots a round writes past the committed length (either model)
    lossy: bool              whether the output may differ in law from the target's (an opt-in)
    check(sampling)          raise ValueError for combinations that are not allowed
    init(target, drafter, prefill, first_token, sampling) -> carry
    round(target, drafter, carry, active, sampling, key) -> (carry, new_tokens [B, E], n_new [B])

A strategy may also choose its draft length per serving step (`jspec.serve`, SmartSpec). It then
brings all of `STEP_API` (`jspec.serve`): `k_max`, `at_k(k)`, a strategy sharing its carry whose
every round runs at the static k (`needs_drafter` False at k = 0),
`prepare_step(drafter, carry, active, rounds) -> (carry, k, restart [B])`,
`observe_round_seconds(carry, k, seconds) -> carry` (what the last step's rounds took each, as
timed by the engine; k < 0: nothing to take in), `init_without_drafter`
(as `init`, with no drafter pass), `restart_drafter(drafter, carry, row, tokens [1, W], length [1])
-> carry`, and `without_drafter(carry) -> (carry, drafter state)` with its inverse
`with_drafter(carry, state)`. A serving engine then admits requests without running the drafter,
picks k between compiled steps, restarts the drafter of the rows `restart` names from their
sequences, and runs one program per k, the k = 0 one with no drafter in it.

`target` is the merged target model, `drafter` a `jspec.drafters.Drafter` (None for decoding
without one), `prefill` the target's `jspec.drafters.Prefill`; a round must leave rows whose
`active` is False as they were. A speculative strategy usually brings only `draft(drafter, state,
last, sampling, key) -> DraftedTree` and `verify(key, drafted, logits, sampling) -> TreeVerdict`,
and inherits the rest from `SpeculativeStrategy`: `speculative_round` drafts, scores the tree in
one target pass (returning the drafter's features from the same pass), verifies and commits.
Chains are trees whose nodes form one path, so chain and tree strategies share every step but
the verifier. `TreeStrategy` adds the defaults of a tree strategy: it brings `size` (N, the node
budget: nodes the target scores per round, root included), `max_depth`, `children` ("iid",
"without_replacement" or "top_k") and `draft`, and is verified by the lossless verifier of how
its children are chosen.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jspec.drafters import Accepted, Drafter, Prefill
from jspec.models import KVCache, Transformer, causal_mask, commit, commit_path
from jspec.sampling import Sampling, sample, warp
from jspec.trees.draft import DraftedTree
from jspec.trees.tree import tree_path
from jspec.verify.tree import TreeVerdict, children_verifier


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoundCarry:
    """Between rounds, per row, for the sequence `seq` (prompt + emitted tokens): the target cache
    holds `seq[:-1]`, `last = seq[-1]` ([B]) is the next round's root, and `drafter` is the
    drafter's state (`jspec.drafters`)."""

    target_cache: KVCache
    drafter: Any
    last: jax.Array


def emitted_tokens(draft_tokens: jax.Array, verdict) -> jax.Array:
    """`[B, D+1]`: the accepted drafts x_1..x_n of `draft_tokens [B, D]`, then next_token at index
    n (entries after it are unspecified)."""
    b, d = draft_tokens.shape
    padded = jnp.concatenate([draft_tokens, jnp.zeros((b, 1), jnp.int32)], axis=1)
    index = jnp.arange(d + 1)[None, :]
    return jnp.where(index == verdict.accepted[:, None], verdict.next_token[:, None], padded)


def keep_active(active: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """`new` for rows where `active [B]`, `old` elsewhere (arrays `[B, ...]`): a round leaves an
    inactive row as it was."""
    return jnp.where(active.reshape(active.shape + (1,) * (old.ndim - 1)), new, old)


def prefix_sizes(n: int) -> tuple[int, ...]:
    """The prefix lengths a round that may score fewer than its n nodes picks from: 1, 2, 3, 5, 9,
    17, ... below n, then n (each one branch of one compiled program)."""
    sizes, s = [1], 2
    while s < n:
        sizes.append(s)
        s = 2 * s - 1
    return tuple(sorted(set(sizes + [n])))


def score_tree(
    target: Transformer,
    cache: KVCache,
    drafted: DraftedTree,
    feature_layers: tuple[int, ...],
    sizes: tuple[int, ...] | None = None,
) -> tuple[jax.Array, KVCache, jax.Array | None]:
    """One target pass over the drafted tree `[B, N]` under its ancestor mask: raw logits
    `[B, N, V]`, the cache with the N entries written (uncommitted) and the hidden states
    `[B, N, F, d]` at `feature_layers` (None if there are none).

    sizes: for a tree whose valid nodes may end early (a chain cut by a stop rule, an adaptive
    length), the allowed prefix lengths (ascending, the last N): the pass scores only the shortest
    prefix holding every row's valid nodes, chosen at run time among static sizes (one program, no
    recompilation). Nodes past it get zero logits and features, which no verifier reads (they are
    invalid)."""
    tree = drafted.tree
    positions = cache.lengths[:, None] + tree.depth

    def score(s: int, cache: KVCache):
        out = target(tree.tokens[:, :s], positions[:, :s], drafted.ancestors[:, :s, :s], cache, features=feature_layers)
        pad = lambda x: jnp.pad(x, [(0, 0), (0, tree.size - s)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        return pad(out[0]), out[1], (pad(out[2]) if feature_layers else None)

    if sizes is None or len(sizes) == 1:
        return score(tree.size, cache)
    needed = jnp.max(jnp.where(tree.valid, jnp.arange(tree.size) + 1, 1))  # every row's last valid node
    result = jax.eval_shape(lambda: score(tree.size, cache))
    logits, features = (None if x is None else jnp.zeros(x.shape, x.dtype) for x in (result[0], result[2]))
    branches = [lambda operand, s=s: score(s, operand[1]) for s in sizes]  # (logits, cache, features)
    return run_branch(jnp.searchsorted(jnp.asarray(sizes), needed), branches, (logits, cache, features))


def run_branch(index: jax.Array, branches, operand):
    """`branches[index](operand)` for int32 `[]` index, each branch a function from `operand` (a
    pytree) to a pytree of the same shapes. Each branch is a `while_loop` that its index runs once
    and the others skip, instead of a `lax.switch`: XLA updates a loop's carried buffers (the
    caches) in place, where it copied the whole cache into and out of a conditional's branches
    (four copies per round in `score_tree`, a k = 0 round of SmartSpec at 1.4 plain rounds). A
    model pass inside such a loop still costs more than outside it (about 2 ms a round at batch 1,
    SmolLM2 on a CPU; docs/benchmarks.md)."""
    for i, branch in enumerate(branches):

        def once(carry, branch=branch):
            return jnp.zeros((), bool), branch(carry[1])

        _, operand = jax.lax.while_loop(lambda carry: carry[0], once, (index == i, operand))
    return operand


def pad_tokens(tokens: jax.Array, width: int) -> jax.Array:
    """Emitted tokens `[B, E]` padded to `[B, width]` (E <= width): a round that may emit fewer
    than `tokens_per_round` (a branch at a shorter k) returns its strategy's width. The padding is
    never read: the loop keeps each row's n_new."""
    return jnp.pad(tokens, ((0, 0), (0, width - tokens.shape[1])))


def commit_round(
    carry: RoundCarry,
    drafter: Drafter,
    drafted: DraftedTree,
    target_cache: KVCache,
    features: jax.Array | None,
    verdict: TreeVerdict,
    active: jax.Array,  # bool [B]
    width: int,  # tokens_per_round: the longest accepted path plus one
) -> tuple[RoundCarry, jax.Array, jax.Array]:
    """Keep the root-to-`verdict.node` path in the target's cache and hand it to the drafter.
    Returns the new carry, the emitted tokens `[B, width]` and how many each row emitted."""
    tree = drafted.tree
    path, path_length = tree_path(tree, verdict.node, drafted.ancestors)  # root first; length = accepted + 1
    kept = jnp.where(active, path_length, 0)
    # A chain's accepted prefix already sits at the slots it is committed to: moving it with
    # `commit_path` (a gather and a scatter) made XLA copy the whole cache twice per round.
    target_cache = commit(target_cache, kept, tree.size) if drafted.chain else commit_path(target_cache, path, kept)
    path = path[:, :width]
    tokens = jnp.take_along_axis(tree.tokens, path, axis=1)
    if features is not None:
        features = jnp.take_along_axis(features, path[:, :, None, None], axis=1)
    accepted = Accepted(
        tokens=tokens,
        slots=jnp.take_along_axis(drafted.slot, path, axis=1),
        accepted=verdict.accepted,
        next_token=verdict.next_token,
        features=features,
        active=active,
    )
    carry = RoundCarry(
        target_cache=target_cache,
        drafter=drafter.commit(drafted.state, accepted),
        last=jnp.where(active, verdict.next_token, carry.last),
    )
    return carry, emitted_tokens(tokens[:, 1:width], verdict), verdict.accepted + 1


def speculative_round(strategy, target: Transformer, drafter: Drafter, carry: RoundCarry, active, sampling, key):
    """Draft (`strategy.draft`), score in one target pass (only the prefix of `strategy.score_sizes`
    that holds the valid nodes, when the strategy has them), verify (`strategy.verify`) and commit."""
    key_draft, key_verify = jax.random.split(key)
    drafted = strategy.draft(drafter, carry.drafter, carry.last, sampling, key_draft)
    sizes = getattr(strategy, "score_sizes", None)
    logits, target_cache, features = score_tree(target, carry.target_cache, drafted, drafter.feature_layers, sizes)
    verdict = strategy.verify(key_verify, drafted, logits, sampling)
    return commit_round(carry, drafter, drafted, target_cache, features, verdict, active, strategy.tokens_per_round)


class SpeculativeStrategy:
    """The protocol's defaults for a strategy that drafts a tree (a chain being a path) and verifies
    it in one target pass: lossless, refusing nothing, `init` after the drafter's prefill and
    `round` = `speculative_round`. A subclass brings `tokens_per_round`, `tokens_scored`, `draft`
    and `verify`, and overrides what differs."""

    lossy = False
    score_sizes: tuple[int, ...] | None = None  # see `score_tree`; None: always score all N nodes

    def check(self, sampling: Sampling) -> None:
        del sampling

    def init(self, target: Transformer, drafter: Drafter, prefill: Prefill, first_token: jax.Array, sampling: Sampling):
        del target, sampling
        return RoundCarry(prefill.cache, drafter.prefill(prefill, first_token, self.tokens_per_round), first_token)

    def round(self, target, drafter, carry, active, sampling, key):
        return speculative_round(self, target, drafter, carry, active, sampling, key)


class TreeStrategy(SpeculativeStrategy):
    """A round emits at most a root-to-leaf path plus one token, writes `size` cache slots, is
    lossless at every temperature, and is verified by the verifier of how its children are chosen
    (`jspec.verify.tree.children_verifier`)."""

    children: str = "without_replacement"

    @property
    def tokens_per_round(self) -> int:
        """Most tokens one round emits: a full root-to-leaf path plus one."""
        return self.max_depth + 1

    @property
    def tokens_scored(self) -> int:
        """Cache slots a round writes past the committed length: the N nodes the target scores."""
        return self.size

    def verifier(self, sampling: Sampling):
        """The lossless tree verifier (`jspec.verify.tree`) for this strategy's children."""
        return children_verifier(self.children, sampling.greedy)

    def verify(self, key: jax.Array, drafted: DraftedTree, logits: jax.Array, sampling: Sampling) -> TreeVerdict:
        return self.verifier(sampling)(key, drafted.tree, drafted.draft_probs, warp(logits, sampling))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AutoregressiveCarry:
    cache: KVCache
    last: jax.Array  # int32 [B], emitted but not yet in the cache


@dataclasses.dataclass(frozen=True)
class Autoregressive:
    """Plain decoding as a strategy of the protocol: one target pass per token, no drafter."""

    tokens_per_round = 1
    tokens_scored = 1
    lossy = False
    needs_drafter = False

    def check(self, sampling: Sampling) -> None:
        del sampling

    def init(self, target, drafter, prefill: Prefill, first_token, sampling) -> AutoregressiveCarry:
        del target, drafter, sampling
        return AutoregressiveCarry(prefill.cache, first_token)

    def round(self, target, drafter, carry: AutoregressiveCarry, active, sampling, key):
        del drafter
        cache, token = plain_step(target, carry.cache, carry.last, active, sampling, key)
        carry = AutoregressiveCarry(cache=cache, last=jnp.where(active, token, carry.last))
        return carry, token[:, None], jnp.ones_like(token)


def plain_step(target: Transformer, cache: KVCache, last: jax.Array, active: jax.Array, sampling, key):
    """One target pass over `last [B]` (emitted, not yet cached): the cache with it committed for
    the active rows, and the next token sampled from the warped target `[B]`."""
    b = last.shape[0]
    logits, cache = target(last[:, None], cache.lengths[:, None], causal_mask(b, 1), cache)
    return commit(cache, active.astype(jnp.int32), 1), sample(key, warp(logits[:, 0], sampling))
