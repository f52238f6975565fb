"""Closed-form analysis of speculative decoding: expected tokens per round, speedup models, the
best draft length, the memory-bound speedup, and (re-exported) the Sequoia tree objective.

Everything here is plain Python / numpy on scalars and small vectors; every argument is checked
and a bad one raises a `ValueError` naming it and its value. Notation (Leviathan et al. arXiv 2211.17192): alpha is
the per-token acceptance rate (for context-free p, q: alpha = sum_x min(p(x), q(x)) = 1 - TV(p, q)),
k the number of drafted tokens per round, tau the expected tokens emitted per round (accepted
drafts plus the one correction or bonus token, so 1 <= tau <= k + 1).

    expected_tau(alpha, k)                 tau of a chain, i.i.d. acceptance
    expected_tau_from_acceptance(a)        tau of a chain, position-dependent acceptance a [k]
    speedup(alpha, k, cost_ratio)          Leviathan et al.'s walltime improvement
    speedup_from_costs(tau, ...)           the same from measured per-pass costs, any strategy
    best_k(alpha, cost_ratio, k_max)       the k maximising `speedup`
    best_k_from_costs(alpha, t_draft, t_target)  the same with t_target measured per tokens scored
    mbsu(tau, k, draft_w, target_w)        the memory-bound speedup (VocabTrim)
    pearl_speedup(alpha, gamma, ...)       PEARL's speedup: drafter and target on their own devices
    ssd_speedup(alpha, k, hit_rate, ...)   speculative speculative decoding's speedup from its hit rate
    tree_value(acceptance, parents)        Sequoia's F(T): tau of a token tree (jspec.methods.sequoia)
    best_tree_value(acceptance, size, d)   the largest F over trees of <= size nodes, depth <= d
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from jspec.methods import sequoia as _sequoia
from jspec.validation import check_real as _real

__all__ = [
    "best_k",
    "best_k_from_costs",
    "best_tree_value",
    "expected_tau",
    "expected_tau_from_acceptance",
    "mbsu",
    "pearl_speedup",
    "speedup",
    "speedup_from_costs",
    "ssd_speedup",
    "tree_value",
]


# --- validation -------------------------------------------------------------------------------


def _int(name: str, value, low: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _probabilities(name: str, values) -> np.ndarray:
    """float64 `[k]`, k >= 1, every entry a probability."""
    if isinstance(values, (str, bytes)) or np.ndim(values) != 1:
        raise ValueError(f"{name} must be a 1-D sequence of probabilities, got {values!r}")
    if len(values) == 0:
        raise ValueError(f"{name} must not be empty, got {values!r}")
    return np.asarray([_real(f"{name}[{i}]", x, low=0.0, high=1.0) for i, x in enumerate(values)], np.float64)


def _positional(acceptance) -> np.ndarray:
    """Sequoia's positional acceptance vector, checked as jspec.methods.sequoia checks it, and also that it
    sums to at most 1: a_i is the probability that the i-th child tried is THE accepted child, and
    those events are disjoint (jspec.methods.sequoia.measure_acceptance gives such a vector)."""
    a = _probabilities("acceptance", acceptance)
    if a.sum() > 1 + 1e-9:
        raise ValueError(
            f"acceptance must sum to at most 1 (a_i = P(the i-th child tried is the accepted one)), "
            f"got {acceptance!r} with sum {a.sum():.6g}"
        )
    return a


# --- chains -----------------------------------------------------------------------------------


def expected_tau(alpha: float, k: int) -> float:
    """Expected tokens per target pass of a chain of k drafts whose acceptances are i.i.d. with rate
    alpha (Leviathan et al. 2023, eq. 1):

        tau = sum_{i=0}^{k} alpha^i = (1 - alpha^(k+1)) / (1 - alpha),   k + 1 at alpha = 1.

    alpha: float in [0, 1]; k: int >= 1. Computed as -expm1((k+1) log alpha) / (1 - alpha), which
    stays accurate as alpha -> 1 (1 - alpha is exact there).
    """
    alpha = _real("alpha", alpha, low=0.0, high=1.0)
    k = _int("k", k, 1)
    if alpha == 1.0:
        return float(k + 1)
    if alpha == 0.0:
        return 1.0
    return -math.expm1((k + 1) * math.log(alpha)) / (1.0 - alpha)


def alpha_from_tau(tau: float, k: int) -> float:
    """The i.i.d. acceptance rate alpha with `expected_tau(alpha, k) = tau`: what a measured tau of
    a chain of k drafts implies (bisection; tau is increasing in alpha). tau in [1, k + 1]."""
    k = _int("k", k, 1)
    tau = _real("tau", tau, low=1.0, high=k + 1.0)
    low, high = 0.0, 1.0
    for _ in range(60):  # 2^-60: below float64 resolution of alpha
        mid = (low + high) / 2
        low, high = (mid, high) if expected_tau(mid, k) < tau else (low, mid)
    return (low + high) / 2


def expected_tau_from_acceptance(accept_probs) -> float:
    """Expected tokens per round of a chain with position-dependent acceptance.

    accept_probs: `[k]`, k >= 1, entry i = P(draft i accepted | drafts < i accepted). Draft i is
    accepted (and so emitted) with probability prod_{j <= i} a_j, and one more token always is:

        tau = 1 + sum_{i=1}^{k} prod_{j=1}^{i} a_j.

    With every a_j = alpha this is `expected_tau(alpha, k)`.
    """
    a = _probabilities("accept_probs", accept_probs)
    return float(1.0 + np.cumprod(a).sum())


def speedup(alpha: float, k: int, cost_ratio: float) -> float:
    """Leviathan et al.'s expected walltime improvement of a chain of k drafts (Theorem 3.8):

        speedup = tau / (k * c + 1),   tau = expected_tau(alpha, k),   c = t_draft / t_target,

    a round costing k drafter steps and one target pass (taken to cost the same as a 1-token pass).
    alpha in [0, 1]; k >= 1; cost_ratio c >= 0. `speedup_from_costs` is the honest version with
    the measured cost of the (k + 1)-token target pass.
    """
    tau = expected_tau(alpha, k)
    c = _real("cost_ratio", cost_ratio, low=0.0)
    return tau / (k * c + 1.0)


def speedup_from_costs(tau: float, t_draft_round: float, t_target_n: float, t_target_1: float) -> float:
    """Speedup over autoregressive decoding from measured costs, for any strategy (chain or tree):

        speedup = tau * t_target_1 / (t_draft_round + t_target_n).

    A round emits tau tokens (expected) for its drafting (t_draft_round seconds) and one target pass
    over the n tokens it scores (t_target_n = t_target(n)); autoregressive decoding pays t_target_1
    per token. tau >= 0; t_draft_round >= 0; t_target_n, t_target_1 > 0 (seconds, or any common
    unit). `speedup(alpha, k, c)` is the case tau = expected_tau(alpha, k), t_draft_round = k c,
    t_target_n = t_target_1 = 1. Overheads (verification, sampling, the loop) are left out.
    """
    tau = _real("tau", tau, low=0.0)
    t_draft_round = _real("t_draft_round", t_draft_round, low=0.0)
    t_target_n = _real("t_target_n", t_target_n, low=0.0, low_open=True)
    t_target_1 = _real("t_target_1", t_target_1, low=0.0, low_open=True)
    return tau * t_target_1 / (t_draft_round + t_target_n)


def best_k(alpha: float, cost_ratio: float, k_max: int = 64) -> int:
    """The draft length k in 1..k_max maximising `speedup(alpha, k, cost_ratio)`; ties go to the
    smaller k (e.g. every k ties at alpha = 1, c = 1, and k = 1 is returned). k_max: int >= 1."""
    alpha = _real("alpha", alpha, low=0.0, high=1.0)
    cost_ratio = _real("cost_ratio", cost_ratio, low=0.0)
    k_max = _int("k_max", k_max, 1)
    values = [speedup(alpha, k, cost_ratio) for k in range(1, k_max + 1)]
    return int(np.argmax(values)) + 1  # argmax returns the first maximum


def best_k_from_costs(alpha: float, t_draft: float, t_target, alpha_next: float | None = None) -> int:
    """The draft length k in 1..len(t_target) - 1 maximising the chain's speedup from measured costs,

        tau(k) * t_target[0] / (k * t_draft + t_target[k]),   tau(k) = 1 + alpha * sum_{i<k} alpha_next^i,

    `speedup_from_costs` with a round of k drafter steps and one target pass over k + 1 tokens.
    alpha: P(the first draft is accepted); alpha_next: P(a later draft is accepted | the one before
    it was), `expected_tau_from_acceptance([alpha, alpha_next, ...])`; None: alpha, the i.i.d. case
    `expected_tau(alpha, k)`. Acceptance is bursty in practice (a draft after an accepted one is
    accepted more often), which makes longer chains pay where the i.i.d. model says they do not.
    t_draft >= 0: seconds per drafter step; t_target: `[n]`, n >= 2, seconds of one target pass
    over 1, 2, ..., n tokens (each > 0). Ties go to the smaller k. With t_target constant and
    alpha_next None this is `best_k(alpha, t_draft / t_target[0], n - 1)`.
    """
    alpha = _real("alpha", alpha, low=0.0, high=1.0)
    alpha_next = alpha if alpha_next is None else _real("alpha_next", alpha_next, low=0.0, high=1.0)
    t_draft = _real("t_draft", t_draft, low=0.0)
    if isinstance(t_target, (str, bytes)) or np.ndim(t_target) != 1 or len(t_target) < 2:
        raise ValueError(f"t_target must be a 1-D sequence of >= 2 costs (1, 2, ... tokens scored), got {t_target!r}")
    costs = [_real(f"t_target[{i}]", t, low=0.0, low_open=True) for i, t in enumerate(t_target)]
    taus = 1.0 + alpha * np.cumsum(alpha_next ** np.arange(len(costs) - 1))  # tau(k) for k = 1 .. n - 1
    values = [taus[k - 1] * costs[0] / (k * t_draft + costs[k]) for k in range(1, len(costs))]
    return int(np.argmax(values)) + 1


def mbsu(tau: float, k: int, draft_weights: float, target_weights: float) -> float:
    """Memory-bound speedup (VocabTrim, arXiv 2506.22694):

        MBSU = tau / (1 + k * N_draft / N_target),

    decoding taken to be bound by weight reads: a round reads the drafter's N_draft weights k times
    and the target's N_target once, and emits tau tokens; autoregressive decoding reads N_target per
    token. tau >= 0; k >= 1; draft_weights >= 0; target_weights > 0 (parameter counts, or bytes,
    in the same unit).
    """
    tau = _real("tau", tau, low=0.0)
    k = _int("k", k, 1)
    n_draft = _real("draft_weights", draft_weights, low=0.0)
    n_target = _real("target_weights", target_weights, low=0.0, low_open=True)
    return tau / (1.0 + k * n_draft / n_target)


# --- parallel drafting: drafter and target on their own devices ----------------------------------


def _outcome_rewards(alpha: float, m: int) -> tuple[float, float]:
    """For m i.i.d. drafts verified at rate alpha: (P(all m accepted), E[tokens emitted; not all
    accepted]) with j accepted before the first rejection emitting j + 1 (the correction)."""
    return alpha**m, sum((j + 1) * alpha**j * (1.0 - alpha) for j in range(m))


def pearl_speedup(alpha: float, gamma: int, t_draft: float, t_target_gamma: float, t_target_1: float) -> float:
    """Expected speedup over autoregressive decoding of PEARL (arXiv 2408.11850), the drafter and the
    target each on a device of its own, drafts accepted i.i.d. at rate alpha.

    A step runs both devices at once and costs the longer of the two: gamma drafter steps
    (gamma * t_draft) and one target pass. PEARL alternates two kinds of step:

    - draft (pre-verify): the drafter drafts x1..x_gamma while the target scores 1 token and
      verifies x1. Rejected (1 - alpha): the correction is emitted, draft again. Accepted: x1 is
      emitted and the next step verifies x2..x_gamma. Cost max(gamma t_draft, t_target(1)).
    - verify (post-verify): the target scores gamma tokens, verifying the m pending drafts (gamma - 1
      after a draft step, gamma after a verify step), while the drafter drafts gamma more past them.
      A rejection after j accepts emits j + 1 tokens and discards the new drafts (back to a draft
      step); all m accepted emits m and the next step verifies the gamma new drafts (the target's
      distribution past the last draft checks the first of them). Cost max(gamma t_draft, t_target(gamma)).

    The speedup is the stationary chain's tokens per second over autoregressive decoding's
    1 / t_target(1). gamma >= 1 (PEARL takes gamma = t_target / t_draft, so neither device waits);
    costs in seconds (any common unit): t_draft >= 0, t_target_gamma and t_target_1 > 0.
    """
    alpha = _real("alpha", alpha, low=0.0, high=1.0)
    gamma = _int("gamma", gamma, 1)
    t_draft = _real("t_draft", t_draft, low=0.0)
    t_target_gamma = _real("t_target_gamma", t_target_gamma, low=0.0, low_open=True)
    t_target_1 = _real("t_target_1", t_target_1, low=0.0, low_open=True)
    # Three states: D (draft step), V1 (verify gamma - 1 pending), V (verify gamma pending).
    all1, partial1 = _outcome_rewards(alpha, gamma - 1)
    all_v, partial_v = _outcome_rewards(alpha, gamma)
    transition = np.array(
        [
            [1.0 - alpha, alpha, 0.0],
            [1.0 - all1, 0.0, all1],
            [1.0 - all_v, 0.0, all_v],
        ]
    )
    reward = np.array([1.0, partial1 + (gamma - 1) * all1, partial_v + gamma * all_v])
    cost = np.array([max(gamma * t_draft, t_target_1)] + [max(gamma * t_draft, t_target_gamma)] * 2)
    # Stationary distribution: pi (T - I) = 0, sum(pi) = 1 (unique: one recurrent class for every alpha).
    system = np.vstack([(transition - np.eye(3)).T, np.ones(3)])
    pi = np.linalg.lstsq(system, np.array([0.0, 0.0, 0.0, 1.0]), rcond=None)[0]
    return float(pi @ reward * t_target_1 / (pi @ cost))


def ssd_speedup(
    alpha: float,
    k: int,
    hit_rate: float,
    t_draft: float,
    t_target_n: float,
    t_target_1: float,
    t_predraft: float = 0.0,
) -> float:
    """Expected speedup over autoregressive decoding of speculative speculative decoding (arXiv
    2603.03251): a chain of k drafts verified as usual (tau = expected_tau(alpha, k)) while the
    drafter, on its own device, pre-drafts the next round for the likeliest verification outcomes.
    A hit (probability hit_rate) starts the next round at verification; a miss drafts it first.

        speedup = tau * t_target_1 / (max(t_target_n, t_predraft) + (1 - hit_rate) * k * t_draft)

    t_target_n: one target pass over the k + 1 tokens; t_predraft: the drafter's pre-drafting during
    it (both devices work at once: the longer one sets the step); t_draft: seconds per drafter step.
    hit_rate in [0, 1]; alpha in [0, 1]; k >= 1. hit_rate 0 with t_predraft 0 is sequential
    speculative decoding (`speedup_from_costs`).
    """
    tau = expected_tau(alpha, k)
    hit_rate = _real("hit_rate", hit_rate, low=0.0, high=1.0)
    t_draft = _real("t_draft", t_draft, low=0.0)
    t_target_n = _real("t_target_n", t_target_n, low=0.0, low_open=True)
    t_target_1 = _real("t_target_1", t_target_1, low=0.0, low_open=True)
    t_predraft = _real("t_predraft", t_predraft, low=0.0)
    return tau * t_target_1 / (max(t_target_n, t_predraft) + (1.0 - hit_rate) * k * t_draft)


# --- trees (Sequoia): thin wrappers, the DP lives in jspec.methods.sequoia ------------------------------


def tree_value(acceptance, parents) -> float:
    """Sequoia's objective F(T): the expected tokens per round of the token tree `parents` under a
    positional acceptance vector (`jspec.methods.sequoia.tree_value`).

    acceptance: `[K]`, non-increasing, each in [0, 1], summing to at most 1: a_r = P(the rank-r
    child (1-based, in the order children are tried) is the accepted one | its parent accepted);
    ranks past K are never accepted. parents: int `[n]`, breadth-first (`FixedShape.from_parents`:
    parents[0] = -1, levels and siblings contiguous, siblings in rank order). Then

        F(T) = sum over nodes v of prod_{u on the root path of v, u != root} a_rank(u),

    the root counting 1: each product is P(v accepted), and the accepted nodes (root included) are
    the tokens a round emits. A chain of k drafts with acceptance (alpha,) has F = expected_tau(alpha, k).
    """
    return _sequoia.tree_value(_positional(acceptance), parents)


def best_tree_value(acceptance, size: int, max_depth: int) -> float:
    """The largest `tree_value` over trees of at most `size` nodes (root included, size >= 1) and
    depth <= max_depth (>= 0): entry [size, max_depth] of `jspec.methods.sequoia.sequoia_values`; the tree
    itself is `jspec.methods.sequoia.sequoia_tree(acceptance, size, max_depth)`."""
    a = _positional(acceptance)
    size, max_depth = _int("size", size, 1), _int("max_depth", max_depth, 0)
    return float(_sequoia.sequoia_values(a, size, max_depth)[size, max_depth])
