"""Prompt lookup (Saxena 2023, "prompt lookup decoding"; the PLD baseline of Spec-Bench, arXiv
2401.07851): draft the continuation of the most recent earlier occurrence of the row's last n-gram
in its own prompt and output, on device and at static shapes.

Every search here is a dense comparison of the row's tail against every position of its history
(`[B, M, L]` booleans per n-gram size): no host round trip, no data-dependent shapes, and cheap
next to a transformer pass for histories of a few thousand tokens.

`LookupDrafter` makes the lookup a drafter of the protocol (`jspec.drafters`) with no model: its
logits are one-hot on the proposed token (so a chain drafted from it is a chain of deterministic
proposals, which the chain and tree verifiers accept with probability p(x), losslessly), and where
the lookup finds nothing it hands over to an inner drafter (a model) if it has one, or proposes
nothing (uniform logits, which a confidence stop cuts).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jspec.drafters import Accepted, Prefill

_NO_PROPOSAL = -1e9  # one-hot logits: finite, so softmax at any temperature stays exact and NaN-free


def check_ngram_sizes(ngram_sizes) -> tuple[int, ...]:
    """A non-empty tuple of distinct ints >= 1, longest first (the search prefers longer matches)."""
    sizes = tuple(ngram_sizes) if isinstance(ngram_sizes, (tuple, list)) else None
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes) or len(set(sizes)) != len(sizes):
        raise ValueError(f"ngram_sizes must be a non-empty tuple of distinct ints >= 1, got {ngram_sizes!r}")
    return tuple(sorted(sizes, reverse=True))


def ngram_match_lengths(history: jax.Array, end: jax.Array, tail: jax.Array, ngram_sizes: tuple[int, ...]) -> jax.Array:
    """For every position j of the history, the longest n of `ngram_sizes` such that the n tokens
    ending at j - 1 equal the last n tokens of `tail` and `history[j]` is a known token (j < end):
    int32 `[B, M, L]`, 0 where none matches.

    history: int32 `[B, L]`, the first `end [B]` tokens valid; tail: int32 `[B, M, T]`, the last T
    tokens (T >= max n) of M sequences to continue, most recent last. A match must end before the
    token it proposes, so the sequence's own last n-gram (ending at end - 1) never proposes."""
    b, l = history.shape
    t = tail.shape[-1]
    positions = jnp.arange(l)
    best = jnp.zeros(tail.shape[:2] + (l,), jnp.int32)
    for n in sorted(ngram_sizes):  # longer sizes overwrite shorter ones
        # equal[b, m, j] for the n-gram history[j - n : j] against tail[-n:].
        equal = jnp.ones(best.shape, bool)
        for i in range(1, n + 1):  # history[j - i] against tail[t - i]
            shifted = jnp.roll(history, i, axis=1)  # shifted[:, j] = history[:, j - i]
            equal &= shifted[:, None, :] == tail[:, :, t - i, None]
        equal &= (positions >= n)[None, None, :] & (positions[None, :] < end[:, None])[:, None, :]
        best = jnp.where(equal, n, best)
    return best


def latest_match(
    history: jax.Array, end: jax.Array, tail: jax.Array, ngram_sizes: tuple[int, ...]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The prompt-lookup proposal: among the positions matching the longest n-gram that matches at
    all, the latest one. Returns the proposed position int32 `[B, M]` (its token continues the
    tail), the n matched int32 `[B, M]` (0: no match) and found bool `[B, M]`."""
    lengths = ngram_match_lengths(history, end, tail, ngram_sizes)
    longest = lengths.max(axis=-1)
    score = jnp.where((lengths == longest[..., None]) & (lengths > 0), jnp.arange(history.shape[1]), -1)
    position = score.max(axis=-1)
    return jnp.maximum(position, 0).astype(jnp.int32), longest, position >= 0


def latest_matches(
    history: jax.Array, end: jax.Array, tail: jax.Array, ngram_sizes: tuple[int, ...], m: int
) -> tuple[jax.Array, jax.Array]:
    """The m latest positions matching the longest matching n-gram (for a retrieval tree of several
    continuations): int32 `[B, M, m]` positions, latest first, and bool `[B, M, m]` valid."""
    lengths = ngram_match_lengths(history, end, tail, ngram_sizes)
    longest = lengths.max(axis=-1, keepdims=True)
    score = jnp.where((lengths == longest) & (lengths > 0), jnp.arange(history.shape[1]), -1)
    top, _ = jax.lax.top_k(score, m)
    return jnp.maximum(top, 0).astype(jnp.int32), top >= 0


def continuations(
    history: jax.Array, end: jax.Array, start: jax.Array, valid: jax.Array, depth: int
) -> tuple[jax.Array, jax.Array]:
    """The `depth` tokens of the history from positions `start [B, ...]`: int32 `[B, ..., depth]`
    and bool `[B, ..., depth]`, valid while inside the row's first `end [B]` tokens."""
    b = history.shape[0]
    index = start[..., None] + jnp.arange(depth)
    flat = index.reshape(b, -1)
    tokens = jnp.take_along_axis(history, jnp.clip(flat, 0, history.shape[1] - 1), axis=1).reshape(index.shape)
    inside = index < end.reshape((b,) + (1,) * (index.ndim - 1))
    return tokens, valid[..., None] & inside


def tail_tokens(history: jax.Array, end: jax.Array, n: int) -> jax.Array:
    """The last n tokens of each row's first `end [B]` tokens: int32 `[B, n]`, -1 (equal to no
    token, so no n-gram longer than the sequence matches) before its start."""
    index = end[:, None] - n + jnp.arange(n)
    tokens = jnp.take_along_axis(history, jnp.clip(index, 0, history.shape[1] - 1), axis=1)
    return jnp.where(index >= 0, tokens, -1)


def one_hot_logits(tokens: jax.Array, vocab_size: int) -> jax.Array:
    """float32 `[..., V]`: 0 at the token, a large negative value elsewhere (softmax: one-hot at
    every temperature)."""
    return jnp.where(jax.nn.one_hot(tokens, vocab_size, dtype=bool), 0.0, _NO_PROPOSAL).astype(jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LookupState:
    """history: int32 `[B, L]`, the row's sequence but its last token (committed: `length [B]`).
    root: int32 `[B]`, this round's root (the sequence's last token) once caught up; window: int32
    `[B, S]`, the tokens of the nodes drafted this round at their window slots. Both are scratch,
    zero between rounds. inner: the inner drafter's state (None without one)."""

    history: jax.Array
    length: jax.Array
    root: jax.Array
    window: jax.Array
    inner: Any

    def sequence(self) -> tuple[jax.Array, jax.Array]:
        """The history with the root appended `[B, L]`, and its length `[B]`."""
        b = self.root.shape[0]
        return self.history.at[jnp.arange(b), self.length].set(self.root, mode="drop"), self.length + 1


@dataclasses.dataclass(frozen=True)
class LookupDrafter:
    """Prompt lookup as a drafter of the protocol (`jspec.drafters`), with no model of its own.

    Each scored node gets the lookup's proposal for the sequence ending at it (the row's history,
    then the node's root path): one-hot logits on the token that followed the latest earlier
    occurrence of its last n-gram (n in `ngram_sizes`, longest first). Where nothing matches it
    gives the `inner` drafter's logits (any drafter of the protocol, e.g. a small model; the inner
    drafter runs on every node either way, to stay in step), or uniform logits without one. It
    also carries the `datastore` REST and RASD retrieve from (`Retrieval` puts it there).
    """

    vocab_size: int
    ngram_sizes: tuple[int, ...] = (3, 2, 1)
    inner: Any = None
    datastore: Any = None  # a `jspec.retrieval.datastore.Datastore` for REST / RASD (not read here)

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return () if self.inner is None else self.inner.feature_layers

    def prefill(self, prefill: Prefill, first_token: jax.Array, width: int) -> LookupState:
        b, p = prefill.prompts.shape
        size = prefill.cache.size
        history = jnp.zeros((b, size), jnp.int32).at[:, :p].set(prefill.prompts.astype(jnp.int32))
        inner = None if self.inner is None else self.inner.prefill(prefill, first_token, width)
        zeros = jnp.zeros((b,), jnp.int32)
        return LookupState(history, prefill.lengths.astype(jnp.int32), zeros, jnp.zeros((b, size), jnp.int32), inner)

    def _proposal(self, history, end, tail) -> tuple[jax.Array, jax.Array]:
        """The proposed tokens int32 `[B, M]` (arbitrary where none) and whether one was found,
        bool `[B, M]`, for the M sequences ending in `tail [B, M, T]`."""
        position, _, found = latest_match(history, end, tail, self.ngram_sizes)
        token = jnp.take_along_axis(history, position.reshape(position.shape[0], -1), axis=1).reshape(position.shape)
        return token, found

    def _propose(self, history, end, tail, fallback):
        """Logits `[B, M, V]` and the proposals found `[B, M]` for the M sequences ending in `tail [B, M, T]`."""
        token, found = self._proposal(history, end, tail)
        return jnp.where(found[..., None], one_hot_logits(token, self.vocab_size), fallback), found

    def _inner_or_uniform(self, shape, logits):
        return jnp.zeros(shape + (self.vocab_size,), jnp.float32) if logits is None else logits.astype(jnp.float32)

    def catch_up(self, state: LookupState, last: jax.Array):
        b = last.shape[0]
        state = dataclasses.replace(state, root=last.astype(jnp.int32))
        history, end = state.sequence()
        inner_logits, context, inner = None, jnp.zeros((b, 0), jnp.float32), None
        if self.inner is not None:
            inner_logits, context, inner = self.inner.catch_up(state.inner, last)
        tail = tail_tokens(history, end, max(self.ngram_sizes))[:, None, :]
        fallback = self._inner_or_uniform((b, 1), None if inner_logits is None else inner_logits[:, None])
        logits, _ = self._propose(history, end, tail, fallback)
        return logits[:, 0], context, dataclasses.replace(state, inner=inner)

    def propose_chain(self, state: LookupState, last: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
        """The chain of k proposals after the row's sequence and `last [B]`, each continuing the
        one before (the proposal `extend` gives a node whose root path is the chain so far), with
        no logits: int32 `[B, k]` tokens and bool `[B, k]` found (a token where nothing matched
        is arbitrary)."""
        history, end = dataclasses.replace(state, root=last.astype(jnp.int32)).sequence()
        tail = tail_tokens(history, end, max(self.ngram_sizes))  # [B, n]
        tokens, found = [], []
        for _ in range(k):
            token, hit = self._proposal(history, end, tail[:, None, :])  # [B, 1]
            tokens.append(token[:, 0])
            found.append(hit[:, 0])
            tail = jnp.concatenate([tail[:, 1:], token], axis=1)
        return jnp.stack(tokens, axis=1), jnp.stack(found, axis=1)

    def extend(self, state: LookupState, tokens, context, depth, mask, write_at):
        b, m = tokens.shape
        window = jax.lax.dynamic_update_slice(state.window, tokens.astype(jnp.int32), (0, write_at))
        inner_logits, new_context, inner = None, jnp.zeros((b, m, 0), jnp.float32), None
        if self.inner is not None:
            inner_logits, new_context, inner = self.inner.extend(state.inner, tokens, context, depth, mask, write_at)
        # Each node's root path, root excluded, in depth order (its ancestors' window slots ascend).
        w = mask.shape[-1]
        slots = jnp.sort(jnp.where(mask, jnp.arange(w), w + window.shape[1]), axis=-1)  # [B, M, W]
        path = jnp.take_along_axis(window[:, None, :], jnp.clip(slots, 0, window.shape[1] - 1), axis=2)
        n = max(self.ngram_sizes)
        history, end = state.sequence()
        # tail[..., n - e] is the e-th token from the end: a path token while e <= depth, else history.
        back = n - jnp.arange(n)  # e = n .. 1
        from_path = jnp.take_along_axis(path, jnp.clip(depth[:, :, None] - back, 0, w - 1), axis=2)
        history_index = end[:, None, None] - (back - depth[:, :, None])
        from_history = jnp.take_along_axis(history, jnp.clip(history_index, 0, history.shape[1] - 1).reshape(b, -1), axis=1)
        from_history = jnp.where(history_index >= 0, from_history.reshape(b, m, n), -1)  # before the start: no token
        tail = jnp.where(back <= depth[:, :, None], from_path, from_history)
        logits, _ = self._propose(history, end, tail, self._inner_or_uniform((b, m), inner_logits))
        return logits, new_context, dataclasses.replace(state, window=window, inner=inner)

    def commit(self, state: LookupState, accepted: Accepted) -> LookupState:
        # The root and the accepted drafts join the history; the next root (the round's
        # next_token) arrives with the next catch-up. The scratch goes back to zeros, so a row
        # that did not commit comes out as it went in.
        b, w = accepted.tokens.shape
        index = state.length[:, None] + jnp.arange(w)
        keep = (jnp.arange(w)[None, :] <= accepted.accepted[:, None]) & accepted.active[:, None]
        index = jnp.where(keep, index, state.history.shape[1])  # out of range: dropped
        history = state.history.at[jnp.arange(b)[:, None], index].set(accepted.tokens, mode="drop")
        inner = None if self.inner is None else self.inner.commit(state.inner, accepted)
        length = state.length + jnp.where(accepted.active, accepted.accepted + 1, 0)
        return LookupState(history, length, jnp.zeros_like(state.root), jnp.zeros_like(state.window), inner)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Retrieval:
    """What to pass as `speculative_generate`'s drafter for retrieval drafting (`jspec.Rest`,
    `jspec.RASD`): a REST datastore (`jspec.retrieval.datastore.Datastore`, None for prompt lookup
    only) and an optional model drafter (a `jspec.models.Transformer`). A pytree, so the datastore's
    arrays enter the compiled program as arguments, never as constants."""

    datastore: Any = None
    drafter: Any = None

    def as_drafter(self) -> LookupDrafter:
        from jspec.drafters import as_drafter

        inner = None if self.drafter is None else as_drafter(self.drafter)
        return LookupDrafter(-1 if inner is None else inner.vocab_size, inner=inner, datastore=self.datastore)

    def check_target(self, target) -> None:
        """The drafter must share the target's vocabulary (checked before compiling)."""
        from jspec.validation import check_vocab

        if self.drafter is not None:
            check_vocab(target.config, self.drafter.config)


def as_lookup_drafter(target, drafter, ngram_sizes: tuple[int, ...]) -> LookupDrafter:
    """The lookup drafter a retrieval strategy drafts with: `drafter` (None, a drafter of the
    protocol, or the `LookupDrafter` of a `Retrieval`) under `target`'s vocabulary."""
    if isinstance(drafter, LookupDrafter):
        return dataclasses.replace(drafter, vocab_size=target.config.vocab_size, ngram_sizes=ngram_sizes)
    return LookupDrafter(target.config.vocab_size, ngram_sizes, drafter)


class LookupRounds:
    """For a strategy that drafts through a `LookupDrafter` (PromptLookup, Rest, RASD): `init` and
    `round` are its base's, with the drafter argument wrapped by `self.lookup_drafter(target,
    drafter)`. Put it before the base strategy class."""

    def init(self, target, drafter, prefill, first_token, sampling):
        return super().init(target, self.lookup_drafter(target, drafter), prefill, first_token, sampling)

    def round(self, target, drafter, carry, active, sampling, key):
        return super().round(target, self.lookup_drafter(target, drafter), carry, active, sampling, key)
