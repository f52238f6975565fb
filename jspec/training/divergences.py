"""Divergences D(p || q) between target p and drafter q, from logits, per position.

DistillSpec (arXiv 2310.08461) trains the drafter on one of these; `acceptance` is the quantity
speculative decoding actually pays for: alpha = sum_x min(p, q) = 1 - TV(p, q).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")


def _kl(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """sum_x a (log a - log b), with 0 log 0 = 0."""
    a = jnp.exp(log_a)
    return jnp.sum(jnp.where(a > 0, a * (log_a - log_b), 0.0), axis=-1)


def divergence(kind: str, target_logits: jax.Array, drafter_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """D(p || q) per position, `[...]`, for logits `[..., V]` softened by `temperature` (> 0).

    fkl: KL(p || q); rkl: KL(q || p); jsd: Jensen-Shannon; tvd: total variation 0.5 |p - q|_1.
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {kind!r}")
    log_p = jax.nn.log_softmax(target_logits.astype(jnp.float32) / temperature, axis=-1)
    log_q = jax.nn.log_softmax(drafter_logits.astype(jnp.float32) / temperature, axis=-1)
    if kind == "fkl":
        return _kl(log_p, log_q)
    if kind == "rkl":
        return _kl(log_q, log_p)
    if kind == "jsd":
        log_m = jnp.logaddexp(log_p, log_q) - jnp.log(2.0)
        return 0.5 * _kl(log_p, log_m) + 0.5 * _kl(log_q, log_m)
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(log_p) - jnp.exp(log_q)), axis=-1)


def acceptance(target_logits: jax.Array, drafter_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """alpha per position: sum_x min(p, q) = 1 - TV(p, q); temperature 0 means argmax agreement."""
    if temperature == 0:
        return (jnp.argmax(target_logits, -1) == jnp.argmax(drafter_logits, -1)).astype(jnp.float32)
    return 1.0 - divergence("tvd", target_logits, drafter_logits, temperature)
