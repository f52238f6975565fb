"""Sampling configuration and the warps that turn logits into the distribution to sample from.

The same warp is applied to the target's and the drafter's logits before any verifier runs, so
speculative decoding is lossless with respect to the warped target (Leviathan et al. arXiv
2211.17192; Chen et al. arXiv 2302.01318).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (one-hot argmax); top_k keeps the k largest logits; top_p keeps the
    smallest set of most likely tokens whose mass reaches top_p (nucleus)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {self.top_k!r}")
        if self.top_p is not None and (
            isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1
        ):
            raise ValueError(f"top_p must be None or in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSampling:
    """Sampling set per row, as values rather than a compiled-in config (a serving batch whose
    requests each bring their own, `jspec.serve`): temperature float32 `[B]` (0: the row is
    greedy) and top_p float32 `[B]` (1: no nucleus cut).

    `greedy` is False, so strategies take their sampling path for every row; a greedy row's warp is
    one-hot, on which each lossless verifier reduces to greedy verification (token for token).
    """

    temperature: jax.Array
    top_p: jax.Array
    top_k = None
    greedy = False

    @classmethod
    def of(cls, samplings) -> RowSampling:
        """One row per `Sampling` (top_k must be None: it is not a per-row setting)."""
        for s in samplings:
            if s.top_k is not None:
                raise ValueError(f"top_k is not supported per row, got top_k={s.top_k!r}")
        t = jnp.asarray([s.temperature for s in samplings], jnp.float32)
        return cls(t, jnp.asarray([1.0 if s.top_p is None else s.top_p for s in samplings], jnp.float32))


def _row_warp(logits: jax.Array, sampling: RowSampling) -> jax.Array:
    """`warp` with each row's own temperature and top_p (logits `[B, ..., V]`, float32)."""
    per_row = lambda x: x.reshape(x.shape + (1,) * (logits.ndim - 1))  # noqa: E731
    t = per_row(sampling.temperature)
    scaled = logits / jnp.where(t > 0, t, 1.0)
    # The nucleus sort over V is skipped when no row cuts (one compiled program either way).
    top_p = per_row(sampling.top_p)
    scaled = jax.lax.cond(
        jnp.any(sampling.top_p < 1), lambda x: jnp.where(top_p < 1, _top_p_filter(x, top_p), x), lambda x: x, scaled
    )
    one_hot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jnp.where(t > 0, jax.nn.softmax(scaled, axis=-1), one_hot)


def warp(logits: jax.Array, sampling: Sampling | RowSampling) -> jax.Array:
    """Warped probabilities `[..., V]` (float32) from logits `[..., V]`.

    Greedy gives one-hot argmax (lowest index on ties), so every lossless verifier reduces to
    greedy verification on it. A `RowSampling` warps each row (leading axis) by its own settings.
    """
    logits = logits.astype(jnp.float32)
    if isinstance(sampling, RowSampling):
        return _row_warp(logits, sampling)
    if sampling.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if sampling.top_p is not None and sampling.top_p < 1:
        logits = _top_p_filter(logits, sampling.top_p)
    return jax.nn.softmax(logits, axis=-1)


def _top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1: the top token has mass 0 before it
    cutoff = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)  # ties at the cutoff are kept, for p and q alike


def _exponentials(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Exp(1) variates resolved to 2^-46 near zero, float32 `shape`.

    One float32 uniform has 23 random bits, so -log1p(-u) cannot go below 2^-23 and an exponential
    race could not tell apart tokens whose probabilities differ by less than that ratio from the
    leader. Two uniforms, the second scaled by 2^-23, fill in the missing bits near zero.
    """
    k1, k2 = jax.random.split(key)
    u = jax.random.uniform(k1, shape) + jax.random.uniform(k2, shape) * jnp.float32(2.0**-23)
    return -jnp.log1p(-jnp.minimum(u, jnp.float32(1.0 - 2.0**-24)))


def _race(key: jax.Array, weights: jax.Array) -> jax.Array:
    """Index of the winner of an exponential race over `weights [..., n]` (>= 0, unnormalised):
    argmin E_i / w_i wins with probability w_i / sum(w), compared in log space (relative precision)."""
    score = jnp.where(weights > 0, jnp.log(_exponentials(key, weights.shape)) - jnp.log(weights), jnp.inf)
    return jnp.argmin(score, axis=-1).astype(jnp.int32)


def _block_size(vocab: int) -> int:
    """A power of two near sqrt(vocab): 256 for 49152 tokens, so both races stay small."""
    return 1 << max(0, math.ceil(math.log2(math.sqrt(vocab))))


def sample(key: jax.Array, probs: jax.Array) -> jax.Array:
    """One token per distribution: probs `[..., V]` (need not be normalised, >= 0) -> int32 `[...]`.

    A two-level exponential race: the vocabulary is cut into blocks of about sqrt(V) tokens; a race
    over the block masses picks a block, a second race over its tokens picks the token. Each token
    is drawn with probability (m_block / sum m)(p / m_block) = p / sum p, and every factor is
    compared in log space, so a token's error is relative to its own probability (down to about
    1e-13 of the leader's) rather than an absolute 6e-8 as in a float32 running sum, where the long
    tail of a 49k-152k vocabulary at temperature 1 would get 0 or 1 ulp instead of its mass. It
    draws 2 (sqrt V + sqrt V) uniforms instead of V Gumbels (for V = 49152, 896 instead of 49152).
    Zero-probability tokens are never drawn (an all-zero row returns 0).
    """
    probs = probs.astype(jnp.float32)
    v = probs.shape[-1]
    size = _block_size(v)
    blocks = -(-v // size)
    padded = jnp.pad(probs, [(0, 0)] * (probs.ndim - 1) + [(0, blocks * size - v)])
    padded = padded.reshape(probs.shape[:-1] + (blocks, size))
    key_block, key_token = jax.random.split(key)
    block = _race(key_block, padded.sum(axis=-1))  # [...]
    within = jnp.take_along_axis(padded, block[..., None, None], axis=-2)[..., 0, :]  # [..., size]
    return block * size + _race(key_token, within)


def sample_without_replacement(key: jax.Array, probs: jax.Array, n: int) -> jax.Array:
    """n distinct tokens per distribution in draw order: probs `[..., V]` -> int32 `[..., n]`.

    Successive sampling: each draw is `sample` from the mass not drawn yet, which is the law of
    Gumbel-top-n (top-n of log p + Gumbel noise) at n inverse-CDF draws instead of V Gumbels (on
    CPU, V = 8192 Gumbels cost as much as a small drafter's forward pass). Once the support is
    exhausted the remaining entries are tokens of probability 0, which no verifier accepts.
    """
    keys = jax.random.split(key, n)
    vocab = jnp.arange(probs.shape[-1])
    drawn = jnp.zeros(probs.shape, bool)
    tokens = []
    for i in range(n):  # n is small and static
        # Past the support: the first token not drawn yet (probability 0, distinct from the draws).
        x = jnp.where(probs.sum(axis=-1) > 0, sample(keys[i], probs), jnp.argmax(~drawn, axis=-1)).astype(jnp.int32)
        tokens.append(x)
        drawn |= vocab == x[..., None]
        probs = jnp.where(drawn, 0.0, probs)
    return jnp.stack(tokens, axis=-1)


def residual(p: jax.Array, q: jax.Array) -> jax.Array:
    """norm((p - q)+) over the last axis: what to sample from after a rejection.

    `p` may be unnormalised (block verification passes `w * p`). Falls back to norm(p) where
    (p - q)+ has no mass (p == q up to rounding), a case of probability zero under exact arithmetic
    that must not produce NaN.
    """
    r = jnp.maximum(p - q, 0.0)
    mass = r.sum(axis=-1, keepdims=True)
    fallback = p / jnp.maximum(p.sum(axis=-1, keepdims=True), 1e-30)
    return jnp.where(mass > 1e-12, r / jnp.maximum(mass, 1e-30), fallback)
