"""Chain verifiers: pure, batched rules that decide how many drafted tokens to keep.

Every verifier has the signature
    verify(key, draft_tokens [B, k], draft_probs [B, k, V], target_probs [B, k+1, V]) -> Verdict
where `draft_probs[:, i]` is the (warped) drafter distribution `x_{i+1}` was sampled from and
`target_probs[:, i]` the target's distribution at the same position (the last one follows the final
draft). The Verdict holds the number of accepted drafts `n` per row and the one token emitted after
them, so each row emits `x_1..x_n, next_token` (1..k+1 tokens). Rules: Leviathan et al. arXiv
2211.17192, Sun et al. arXiv 2403.10444.

All three are lossless. At temperature 0 (one-hot distributions) `verify_sampling` and
`verify_block` make exactly the decisions of `verify_greedy`. `CHAIN_VERIFIERS` names only these;
the lossy opt-in rules (typical acceptance, SpecDec) live in `jspec.verify.lossy` and have no name.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jspec.sampling import residual, sample


class Verdict(NamedTuple):
    accepted: jax.Array  # int32 [B], drafts kept (0..k)
    next_token: jax.Array  # int32 [B], the token emitted after them


def _at(x: jax.Array, index: jax.Array) -> jax.Array:
    """x `[B, N, ...]` at `index [B]` -> `[B, ...]`."""
    return jax.vmap(lambda row, i: row[i])(x, index)


def _prob_of(probs: jax.Array, tokens: jax.Array) -> jax.Array:
    """probs `[B, k, V]`, tokens `[B, k]` -> probability of each token `[B, k]`."""
    return jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]


def _leading_true(ok: jax.Array) -> jax.Array:
    """Length of the all-True prefix of each row of bool `[B, k]` -> int32 `[B]`."""
    return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


def _pad_zero_step(probs: jax.Array) -> jax.Array:
    """Append a zero distribution after the last draft step: `[B, k, V]` -> `[B, k+1, V]`.

    With it, "residual at position n" covers the all-accepted case: norm((p_{k+1} - 0)+) = p_{k+1}.
    """
    return jnp.concatenate([probs, jnp.zeros_like(probs[:, :1])], axis=1)


def verify_greedy(key, draft_tokens, draft_probs, target_probs) -> Verdict:
    """Accept while the draft equals the target's argmax; then emit the target's argmax.

    Lossless only for greedy decoding (temperature 0); `key` and `draft_probs` are unused.
    """
    del key, draft_probs
    k = draft_tokens.shape[1]
    target_argmax = jnp.argmax(target_probs, axis=-1).astype(jnp.int32)  # [B, k+1]
    n = _leading_true(draft_tokens == target_argmax[:, :k])
    return Verdict(n, _at(target_argmax, n))


def verify_sampling(key, draft_tokens, draft_probs, target_probs) -> Verdict:
    """Speculative sampling (Leviathan et al. arXiv 2211.17192; Chen et al. arXiv 2302.01318).

    Accept x_i while U_i < p_i(x_i) / q_i(x_i); at the first rejection sample norm((p_i - q_i)+);
    if all k are accepted, sample the bonus token from p_{k+1}.
    """
    key_accept, key_sample = jax.random.split(key)
    p_x = _prob_of(target_probs[:, :-1], draft_tokens)
    q_x = _prob_of(draft_probs, draft_tokens)
    u = jax.random.uniform(key_accept, p_x.shape)
    n = _leading_true(u * q_x < p_x)  # U < p/q without dividing by q
    dist = residual(_at(target_probs, n), _at(_pad_zero_step(draft_probs), n))
    return Verdict(n, sample(key_sample, dist))


def block_weights(draft_tokens, draft_probs, target_probs) -> jax.Array:
    """w_0..w_k of block verification, `[B, k+1]`: w_0 = 1, w_i = min(1, w_{i-1} p_i(x_i) / q_i(x_i)).

    Closed form instead of a sequential scan: with S_i = sum_{j<=i} log(p_j/q_j) and S_0 = 0,
    log w_i = S_i - max_{j<=i} S_j (induction: min(0, S_i - M_{i-1}) = S_i - max(S_i, M_{i-1})).
    """
    p_x = _prob_of(target_probs[:, :-1], draft_tokens)
    q_x = _prob_of(draft_probs, draft_tokens)
    # A drafted token has q > 0; the clip only keeps an impossible q = 0 from producing inf - inf.
    log_ratio = jnp.clip(jnp.log(p_x) - jnp.log(q_x), None, 80.0)
    s = jnp.concatenate([jnp.zeros_like(log_ratio[:, :1]), jnp.cumsum(log_ratio, axis=1)], axis=1)
    return jnp.exp(s - jax.lax.cummax(s, axis=1))


def verify_block(key, draft_tokens, draft_probs, target_probs) -> Verdict:
    """Block verification (Sun et al. arXiv 2403.10444).

    Keeps the longest prefix n with eta_n < h_n (independent eta_i), then samples from
    norm((w_n p_{n+1} - q_{n+1})+), or from p_{k+1} when n = k. Never accepts fewer tokens in
    expectation than `verify_sampling`.
    """
    key_accept, key_sample = jax.random.split(key)
    k = draft_tokens.shape[1]
    w = block_weights(draft_tokens, draft_probs, target_probs)  # [B, k+1]
    # Z_{i+1} = sum_x (w_i p_{i+1} - q_{i+1})+ for i = 0..k-1.
    z = jnp.sum(jnp.maximum(w[:, :k, None] * target_probs[:, :k] - draft_probs, 0.0), axis=-1)  # [B, k]
    # h_i for i = 1..k-1 from Z_{i+1}; h_k = w_k. A zero denominator (w_i = 1, Z = 0) means "keep".
    denom = z[:, 1:] + 1.0 - w[:, 1:k]
    h_inner = jnp.where(denom > 0, z[:, 1:] / jnp.where(denom > 0, denom, 1.0), 1.0)
    h = jnp.concatenate([h_inner, w[:, k:]], axis=1)  # [B, k], h[:, i-1] = h_i
    eta = jax.random.uniform(key_accept, h.shape)
    positions = jnp.arange(1, k + 1, dtype=jnp.int32)
    n = jnp.max(jnp.where(eta < h, positions, 0), axis=1).astype(jnp.int32)
    dist = residual(_at(w, n)[:, None] * _at(target_probs, n), _at(_pad_zero_step(draft_probs), n))
    return Verdict(n, sample(key_sample, dist))


ChainVerifier = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], Verdict]

CHAIN_VERIFIERS: dict[str, ChainVerifier] = {
    "greedy": verify_greedy,
    "sampling": verify_sampling,
    "block": verify_block,
}
