"""Lossy chain verification rules, opt-in only (Medusa arXiv 2401.10774; SpecDec arXiv 2203.16487).

Both rules trade the target's exact distribution for more accepted drafts, so neither has a string
name: a `jspec.Chain` uses one only when given the object, e.g.
`jspec.Chain(k=4, verifier=jspec.LossyTypical())`, and then reports `Chain.lossy == True`.

- `LossyTypical`: Medusa's typical acceptance (Cai et al., arXiv 2401.10774). Accept x_i while
  p_i(x_i) > min(eps, delta * exp(-H(p_i))); at the first failure sample the next token from p_i
  itself (not from the residual norm((p_i - q_i)+) that would make it lossless); after k accepted
  drafts sample the bonus token from p_{k+1}. At temperature 0 (one-hot p) it is exactly greedy.
- `LossySpecDec`: SpecDec's verification (Xia et al., arXiv 2203.16487). Accept x_i while it is
  among the target's top-beta tokens and log p_i(x_i) >= log p_i(top1) - tol; then emit the
  target's top-1 (also as the bonus token). beta = 1 or tol = 0 is exactly greedy verification.

Each rule's `verify` has the signature of the verifiers in `jspec.verify`:
    verify(key, draft_tokens [B, k], draft_probs [B, k, V], target_probs [B, k+1, V]) -> Verdict
and `scoring(sampling)` says which warp the target's logits get before `verify` sees them.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import entr

from jspec.sampling import Sampling, sample
from jspec.verify.chain import Verdict, _at, _leading_true, _prob_of


def _check_real(name: str, value, ok: Callable[[float], bool], want: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {want}, got {value!r}")


def entropy(probs: jax.Array) -> jax.Array:
    """Shannon entropy in nats over the last axis, `[..., V]` -> `[...]` (0 log 0 = 0)."""
    return jnp.sum(entr(probs), axis=-1)


def typical_threshold(probs: jax.Array, eps: float, delta: float) -> jax.Array:
    """Medusa's acceptance threshold min(eps, delta * exp(-H(p))): `[..., V]` -> `[...]`.

    A flat p (high entropy) lowers the bar, so plausible but unlikely tokens pass where the
    target itself is unsure; a peaked p keeps it at eps.
    """
    return jnp.minimum(eps, delta * jnp.exp(-entropy(probs)))


def verify_typical(key, draft_tokens, draft_probs, target_probs, *, eps: float, delta: float) -> Verdict:
    """Typical acceptance (lossy): keep x_i while p_i(x_i) > min(eps, delta exp(-H(p_i))), then
    sample the next token from p at the first rejected position (p_{k+1} if none). `draft_probs` is
    unused: the rule never looks at the drafter."""
    del draft_probs
    k = draft_tokens.shape[1]
    p_x = _prob_of(target_probs[:, :k], draft_tokens)  # [B, k]
    n = _leading_true(p_x > typical_threshold(target_probs[:, :k], eps, delta))
    return Verdict(n, sample(key, _at(target_probs, n)))


def in_top(probs: jax.Array, tokens: jax.Array, beta: int) -> jax.Array:
    """Whether each token is among the `beta` most likely of its distribution: probs `[B, k, V]`,
    tokens `[B, k]` -> bool `[B, k]`. Ties go to the lower index, as in `jnp.argmax`, so beta = 1
    accepts exactly the argmax."""
    top = jax.lax.top_k(probs, min(beta, probs.shape[-1]))[1]  # [B, k, beta]
    return jnp.any(top == tokens[..., None], axis=-1)


def verify_specdec(key, draft_tokens, draft_probs, target_probs, *, beta: int, tol: float) -> Verdict:
    """SpecDec verification (lossy): keep x_i while it is in the target's top-beta and
    log p_i(x_i) >= log p_i(top1) - tol; then emit the target's top-1 at that position.

    Deterministic: `key` and `draft_probs` are unused. With beta = 1 or tol = 0 it makes the
    decisions of `jspec.verify.verify_greedy` (with tol = 0, up to exact ties for the top-1).
    """
    del key, draft_probs
    k = draft_tokens.shape[1]
    p = target_probs[:, :k]  # [B, k, V]
    log_gap = jnp.log(jnp.max(p, axis=-1)) - jnp.log(_prob_of(p, draft_tokens))  # [B, k], >= 0, inf if p(x) = 0
    n = _leading_true(in_top(p, draft_tokens, beta) & (log_gap <= tol))
    top1 = jnp.argmax(target_probs, axis=-1).astype(jnp.int32)  # [B, k+1]
    return Verdict(n, _at(top1, n))


class LossyVerifier:
    """Base of the opt-in lossy chain rules; `jspec.Chain` recognises a verifier by this type."""

    lossy = True

    def scoring(self, sampling: Sampling) -> Sampling:
        """The warp of the target's logits that `verify` receives: by default the decoding's own."""
        return sampling

    def verify(self, key, draft_tokens, draft_probs, target_probs) -> Verdict:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class LossyTypical(LossyVerifier):
    """Medusa's typical acceptance, NOT lossless: it skews the output towards the drafter.

    eps: hard threshold in (0, 1); delta > 0 scales the entropy-dependent threshold
    delta * exp(-H(p)). Defaults 0.09 and 0.3 are Medusa's (`posterior_threshold`,
    `posterior_alpha`). eps < 1 keeps the target's argmax accepted at temperature 0, where the
    rule is exactly greedy.
    """

    eps: float = 0.09
    delta: float = 0.3

    def __post_init__(self):
        _check_real("eps", self.eps, lambda x: 0 < x < 1, "a number in (0, 1)")
        _check_real("delta", self.delta, lambda x: x > 0, "a finite number > 0")

    def verify(self, key, draft_tokens, draft_probs, target_probs) -> Verdict:
        """`verify_typical` with this rule's eps and delta."""
        return verify_typical(key, draft_tokens, draft_probs, target_probs, eps=self.eps, delta=self.delta)


@dataclasses.dataclass(frozen=True)
class LossySpecDec(LossyVerifier):
    """SpecDec's top-beta / tolerance verification, NOT lossless: it emits near-top-1 drafts.

    beta: int >= 1, the target's top-beta tokens a draft must be among; tol >= 0 (finite), the
    largest allowed gap log p(top1) - log p(x). Defaults beta = 3, tol = 1.0: the relaxation the
    paper (GAD++) reports for translation; beta = 1 or tol = 0 is exact greedy verification.

    SpecDec is a greedy-decoding method whose tolerance is a gap in the target's logits, so at
    temperature 0 (where the warped p is one-hot and every gap would be infinite) the rule is
    given the temperature-1 softmax instead; drafts are still the drafter's argmax and every
    emitted token is a target top-1. At temperature T > 0 it is given the decoding's warped p
    (the gap is then in logits / T).
    """

    beta: int = 3
    tol: float = 1.0

    def __post_init__(self):
        if isinstance(self.beta, bool) or not isinstance(self.beta, numbers.Integral) or self.beta < 1:
            raise ValueError(f"beta must be an int >= 1, got {self.beta!r}")
        _check_real("tol", self.tol, lambda x: x >= 0, "a finite number >= 0")

    def scoring(self, sampling: Sampling) -> Sampling:
        """Temperature-1 softmax at temperature 0 (the logit gaps SpecDec compares), else `sampling`."""
        return Sampling(temperature=1.0) if sampling.greedy else sampling

    def verify(self, key, draft_tokens, draft_probs, target_probs) -> Verdict:
        """`verify_specdec` with this rule's beta and tol."""
        return verify_specdec(key, draft_tokens, draft_probs, target_probs, beta=int(self.beta), tol=self.tol)
