"""The drafter protocol: what a speculative round asks of whatever proposes tokens.

A strategy drafts through four calls, whatever the drafter is (a small language model, an EAGLE
head that reads the target's hidden states, or, with no model at all, an n-gram lookup):

    prefill(prefill, first_token, width) -> state
        after the target's prefill (`jspec.rounds.Prefill`: prompts, lengths, the target's cache and
        the features it was asked for) and the first token; `width` bounds the tokens a round
        emits (the strategy's `tokens_per_round`).
    catch_up(state, last) -> (logits [B, V], context [B, C], state)
        at the start of a round whose root is `last` (emitted, not yet in the target's cache): the
        drafter's logits for the first draft token, and the root's context (below).
    extend(state, tokens [B, M], context [B, M, C], depth [B, M], mask [B, M, W], write_at)
        -> (logits [B, M, V], context [B, M, C], state)
        scores M new draft nodes at once. `context` is each node's parent's context (what a head
        reads besides the token: an EAGLE head's predicted feature; empty, C = 0, for a language
        model); `depth` is the node's depth below the root; the nodes' entries go to window slots
        `write_at ..` after the committed prefix and `mask` says which window slots each sees (its
        ancestors). Nothing is committed.
    commit(state, accepted: Accepted) -> state
        after verification: keep what the accepted path needs and be ready for the next round.

and two attributes: `vocab_size`, and `feature_layers`, the target hidden states (Hugging Face
`hidden_states` numbering) the drafter reads; the target's prefill and verify passes return them
at no extra pass (`jspec.models.Transformer(..., features=...)`).

`as_drafter` wraps a model in its drafter: a `jspec.models.Transformer` becomes a `ModelDrafter`;
any other object provides its own (`obj.as_drafter()`, e.g. `jspec.eagle.EagleHead`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from jspec.models import KVCache, Transformer, causal_mask, commit, commit_path, init_cache, truncate
from jspec.sharding import constrain_cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prefill:
    """The target's prefill: prompts int32 `[B, P]` (right-padded), lengths int32 `[B]`, the
    target's cache holding the prompts, and its hidden states `[B, P, F, d]` at the drafter's
    `feature_layers` (None when it reads none)."""

    prompts: jax.Array
    lengths: jax.Array
    cache: KVCache
    features: jax.Array | None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Accepted:
    """What a round kept, for `Drafter.commit`. Arrays `[B, W]` (W = tokens_per_round) run along
    the accepted root-to-node path, root (the round's `last`) first; entries past `accepted` are
    unspecified.

    tokens: int32 `[B, W]`; slots: int32 `[B, W]`, where each node's drafter entry lies in the
    window (-1: the root, or a node the drafter never scored); accepted: int32 `[B]`, drafts
    kept; next_token: int32 `[B]`, the token emitted after them; features: the target's hidden
    states at the path's nodes `[B, W, F, d]` (None unless the drafter reads features); active:
    bool `[B]`, rows that commit (an inactive row must come out as it went in).
    """

    tokens: jax.Array
    slots: jax.Array
    accepted: jax.Array
    next_token: jax.Array
    features: jax.Array | None
    active: jax.Array


class Drafter(Protocol):
    """See the module docstring."""

    vocab_size: int
    feature_layers: tuple[int, ...]

    def prefill(self, prefill: Prefill, first_token: jax.Array, width: int) -> Any: ...

    def catch_up(self, state: Any, last: jax.Array) -> tuple[jax.Array, jax.Array, Any]: ...

    def extend(
        self, state: Any, tokens: jax.Array, context: jax.Array, depth: jax.Array, mask: jax.Array, write_at
    ) -> tuple[jax.Array, jax.Array, Any]: ...

    def commit(self, state: Any, accepted: Accepted) -> Any: ...


def prefill_model(model: Transformer, prompts: jax.Array, lengths: jax.Array, cache_size: int, features: tuple[int, ...] = ()):
    """Run the prompts `[B, P]` through `model`. Returns the logits after each row's last prompt
    token `[B, V]`, a cache of `cache_size` slots holding the prompt (`lengths` committed) and, if
    `features` are asked for, the hidden states `[B, P, F, d]` (else None)."""
    b, p = prompts.shape
    # Under an ambient mesh (`jax.set_mesh`) pin the new cache to jspec.sharding's layout (batch
    # over 'data', KV heads over 'model'); nothing else fixes it. Without a mesh this is a no-op.
    cache = constrain_cache(init_cache(model.config, b, cache_size))
    positions = jnp.broadcast_to(jnp.arange(p), (b, p))
    out = model(prompts, positions, causal_mask(b, p), cache, logits_at=(lengths - 1)[:, None], features=features)
    logits, cache = out[0], commit(out[1], lengths, p)
    return logits[:, 0], cache, (out[2] if features else None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelDrafterState:
    """Between rounds the cache holds `seq[:-2]` and `prev = seq[-2]` ([B]); `catch_up` feeds
    `[prev, last]`, which re-computes one entry but keeps the drafter in step whether or not the
    last draft was accepted, at a fixed shape."""

    cache: KVCache
    prev: jax.Array


@dataclasses.dataclass(frozen=True)
class ModelDrafter:
    """A language model drafting from tokens alone (a small Transformer sharing the vocabulary)."""

    model: Transformer
    feature_layers: tuple[int, ...] = ()

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def prefill(self, prefill: Prefill, first_token: jax.Array, width: int) -> ModelDrafterState:
        del first_token, width
        return self.start(prefill.prompts, prefill.lengths, prefill.cache.size)

    def start(self, tokens: jax.Array, lengths: jax.Array, cache_size: int) -> ModelDrafterState:
        """The state in step with rows `tokens [B, W]` (right-padded, `lengths [B]` of them): each
        row's sequence but its last token, which the next round gets as its root."""
        _, cache, _ = prefill_model(self.model, tokens, lengths, cache_size)
        prev = jnp.take_along_axis(tokens, (lengths - 1)[:, None], axis=1)[:, 0]
        return ModelDrafterState(truncate(cache, lengths - 1), prev)

    def restart_row(self, state: ModelDrafterState, row: jax.Array, tokens: jax.Array, length: jax.Array) -> ModelDrafterState:
        """`state` with row `row` (int32 `[]`) started afresh on `tokens [1, W]` (`length [1]` of
        them, as `start`), the other rows as they were: a row whose state fell behind (SmartSpec
        serving at k = 0) back in step from its sequence."""
        one = self.start(tokens, length, state.cache.size)
        put = lambda full, new, axis: jax.lax.dynamic_update_slice_in_dim(full, new.astype(full.dtype), row, axis)  # noqa: E731
        cache = dataclasses.replace(
            state.cache, keys=put(state.cache.keys, one.cache.keys, 1), values=put(state.cache.values, one.cache.values, 1),
            lengths=put(state.cache.lengths, one.cache.lengths, 0),
        )  # fmt: skip
        return ModelDrafterState(cache, put(state.prev, one.prev, 0))

    def catch_up(self, state: ModelDrafterState, last: jax.Array) -> tuple[jax.Array, jax.Array, ModelDrafterState]:
        b = last.shape[0]
        tokens = jnp.stack([state.prev, last], axis=1)
        positions = state.cache.lengths[:, None] + jnp.arange(2)
        logits, cache = self.model(tokens, positions, causal_mask(b, 2), state.cache, logits_at=jnp.ones((b, 1), jnp.int32))
        cache = commit(cache, jnp.full((b,), 2, jnp.int32))
        return logits[:, 0], jnp.zeros((b, 0), jnp.float32), dataclasses.replace(state, cache=cache)

    def extend(self, state, tokens, context, depth, mask, write_at):
        del context
        positions = state.cache.lengths[:, None] + depth - 1  # the root sits at position lengths - 1
        logits, cache = self.model(tokens, positions, mask, state.cache, write_at=write_at)
        return logits, jnp.zeros(tokens.shape + (0,), jnp.float32), dataclasses.replace(state, cache=cache)

    def absorb(self, state: ModelDrafterState, roots: jax.Array, n: jax.Array) -> ModelDrafterState:
        """Take in rounds that ran without drafting (SmartSpec's k = 0): `roots [B, L]`, the roots
        of those rounds in order (the first is the root this state was in step with), `n [B]` of
        them per row. One pass over L tokens brings the state in step with the root after them."""
        b, width = roots.shape
        tokens = jnp.concatenate([state.prev[:, None], roots[:, : width - 1]], axis=1)
        positions = state.cache.lengths[:, None] + jnp.arange(width)
        _, cache = self.model(tokens, positions, causal_mask(b, width), state.cache, logits_at=jnp.zeros((b, 1), jnp.int32))
        prev = jnp.take_along_axis(roots, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
        return ModelDrafterState(commit(cache, n, width), jnp.where(n > 0, prev, state.prev))

    def commit(self, state: ModelDrafterState, accepted: Accepted) -> ModelDrafterState:
        # Keep the accepted drafts but the last (gathered into place), then rewind to two tokens
        # behind the next round's root; an inactive row goes back to where it was.
        active = accepted.active
        cache = commit_path(state.cache, accepted.slots[:, 1:], jnp.where(active, jnp.maximum(accepted.accepted - 1, 0), 0))
        cache = truncate(cache, state.cache.lengths - 2 + jnp.where(active, accepted.accepted + 1, 0))
        prev = jnp.take_along_axis(accepted.tokens, accepted.accepted[:, None], axis=1)[:, 0]
        return ModelDrafterState(cache, jnp.where(active, prev, state.prev))


def as_drafter(model) -> Drafter:
    """The drafter of `model`: a `ModelDrafter` for a `jspec.models.Transformer`, else `model.as_drafter()`."""
    if isinstance(model, Transformer):
        if model.config.mamba_layers:
            raise ValueError(
                f"drafter: a model with Mamba-2 layers (layers {model.config.mamba_layers}) cannot draft: a draft "
                "model rewinds its cache after each round and an SSM state does not rewind; draft with an "
                "attention-only model (a state-space or hybrid model can be the target)"
            )
        return ModelDrafter(model)
    if hasattr(model, "as_drafter"):
        return model.as_drafter()
    raise ValueError(
        f"drafter must be a jspec.models.Transformer or provide as_drafter() (e.g. jspec.eagle.EagleHead), "
        f"got {type(model).__name__}"
    )
