"""The `RSD` strategy: Recursive Speculative Decoding (Jeon et al., arXiv 2402.14160), token trees
whose siblings are drafted without replacement, verified by recursive rejection sampling
(`jspec.verify.tree.verify_tree_without_replacement`; greedy at temperature 0).

RSD-C (`branching=(b1, b2, ...)`): constant branching; every node at depth l gets b_{l+1} children
by Gumbel-top-k (top-b of log q + Gumbel: a sample without replacement, in draw order), the
shape of `StaticTree(branching, children="without_replacement")`.

RSD-S (`beam=W, depth=L`): stochastic beam search (Kool et al. 2019, "Stochastic Beams and Where
to Find Them"). Every sequence gets a perturbed log-probability G: the root's is 0, and the
children x of a beam node u (log-probability phi_u, perturbed value G_u) get
    G_x = phi_u + log q_u(x) + Gumbel_x,  Z = max_x G_x,
    G~_x = -log(exp(-G_u) - exp(-Z) + exp(-G_x))   (truncated so that max_x G~_x = G_u),
and each level keeps the top W of all (beam node, token) candidates of the level above by G~.
The tree is the union of the L beams, N = 1 + W * L nodes; a level lists the children of each
node together, in decreasing G~ (= decreasing G_x, the draw order of a sample without
replacement from q_u).

Why RSD-S is lossless. The without-replacement verifier is exact when, given a node's earlier
siblings x_1..x_{j-1}, whether the j-th child exists does not depend on its token x_j. The children
of u in G order are a Gumbel-top-k sample: given the earlier draws and their values, the next
token x_j is the argmax of the remaining perturbed values and its value G_(j) their max, and the
argmax of Gumbel-perturbed log-probabilities is independent of the max (also after truncating all
of them at the same level). Child j survives the beam iff fewer than W candidates have a larger
G~; those are u's earlier children and the candidates of other nodes, which depend on other
Gumbels, and G~_j is a function of (G_u, Z, G_(j)), not of x_j. So existence depends on the
values, never on x_j; the end-to-end distribution test checks it. At temperature 0 there are
no Gumbels: each level is the top W by log-probability (under the softmax of the raw logits), an
ordinary beam search, and the greedy verifier decides.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jspec.methods.static_tree import branching_parents, check_branching
from jspec.rounds import TreeStrategy
from jspec.sampling import Sampling, sample_without_replacement
from jspec.trees.draft import FixedShape, add_nodes, draft_fixed_shape, start_draft


def _log1mexp(a: jax.Array) -> jax.Array:
    """log(1 - exp(a)) for a <= 0, accurate at both ends (Maechler 2012); -inf at a = 0."""
    a = jnp.minimum(a, 0.0)
    return jnp.where(a > -0.6931472, jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(a)))


def truncated_gumbel(parent_value: jax.Array, g: jax.Array) -> jax.Array:
    """Kool et al.'s conditioning: perturbed values g `[..., V]` of a node's children, shifted so that
    their max equals parent_value `[...]`, keeping their order:
    -log(exp(-T) - exp(-Z) + exp(-g)), computed stably as T - softplus(T - g + log1mexp(g - Z)).

    A child of -inf (outside the support) stays -inf; a parent of -inf (not in the beam) gives
    every child -inf."""
    t = parent_value[..., None]
    z = jnp.max(g, axis=-1, keepdims=True)
    finite = (g > -jnp.inf) & (t > -jnp.inf) & (z > -jnp.inf)
    g_safe, z_safe, t_safe = (jnp.where(finite, x, 0.0) for x in (g, z, t))
    v = t_safe - g_safe + _log1mexp(g_safe - z_safe)
    return jnp.where(finite, t_safe - jax.nn.softplus(v), -jnp.inf)


def top_perturbed(key: jax.Array, probs: jax.Array, w: int) -> tuple[jax.Array, jax.Array]:
    """The w largest of log q(x) + Gumbel_x over the vocabulary and their tokens, both `[..., w]`
    in decreasing order, from q `[..., V]`, without drawing V Gumbels (the top-down Gumbel process).

    The argmax and the max of Gumbel-perturbed log-probabilities over a set S are independent:
    the argmax is distributed as q on S, the max as Gumbel(log q(S)). So the tokens are successive
    draws without replacement from q (`sample_without_replacement`), the largest value is
    Gumbel(log 1), and each next one is Gumbel(log m_j) truncated below the one before, m_j the mass
    not drawn yet: G_j = -logaddexp(-G_{j-1}, log E_j - log m_j) with E_j ~ Exp(1). Past the
    support a value is -inf.
    """
    key_tokens, key_values = jax.random.split(key)
    tokens = sample_without_replacement(key_tokens, probs, w)
    q = jnp.take_along_axis(probs, tokens, axis=-1)  # [..., w]
    log_mass = jnp.log(jnp.maximum(probs.sum(axis=-1, keepdims=True) - (jnp.cumsum(q, axis=-1) - q), 1e-30))
    log_e = jnp.log(jax.random.exponential(key_values, q.shape))
    values, previous = [], jnp.full(q.shape[:-1], jnp.inf)
    for j in range(w):
        previous = -jnp.logaddexp(-previous, log_e[..., j] - log_mass[..., j])
        values.append(previous)
    return jnp.where(q > 0, jnp.stack(values, axis=-1), -jnp.inf), tokens


def beam_level(
    key: jax.Array,
    logits: jax.Array,  # [B, M, V], the drafter's raw logits after each beam node
    probs: jax.Array,  # [B, M, V], their warped q
    phi: jax.Array,  # [B, M], log-probability of each beam node (-inf: not in the beam)
    value: jax.Array,  # [B, M], its perturbed log-probability G~
    width: int,
    greedy: bool,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """The next beam: the top `width` of all (beam node, token) candidates by G~ (by log-probability
    at temperature 0). Returns, each `[B, width]`: parent (index into the M beam nodes), token, phi,
    G~ and valid, ordered by parent and, within a parent, by decreasing G~ (the draw order)."""
    b, m, v = logits.shape
    # The truncation keeps each node's order by G, so only a node's top `width` children by G can
    # enter the beam: take those per node and sort M * width candidates, not M * V. Their max is
    # the max over all V, as the truncation needs.
    w = min(width, v)
    if greedy:
        log_q, token = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), w)
        perturbed = phi[..., None] + log_q  # [B, M, w], decreasing
    else:
        g, token = top_perturbed(key, probs, w)
        log_q = jnp.log(jnp.take_along_axis(probs, token, axis=-1))
        perturbed = phi[..., None] + g
    phi_child = phi[..., None] + log_q
    child_value = perturbed if greedy else truncated_gumbel(value, perturbed)
    child_value = jnp.where(phi[..., None] > -jnp.inf, child_value, -jnp.inf)
    flat_value, flat_g = child_value.reshape(b, m * w), perturbed.reshape(b, m * w)
    if m * w < width:  # fewer candidates than the beam (a vocabulary smaller than the width)
        pad = ((0, 0), (0, width - m * w))
        flat_value, flat_g = jnp.pad(flat_value, pad, constant_values=-jnp.inf), jnp.pad(flat_g, pad, constant_values=-jnp.inf)
    # Top `width` by G~, ties broken by G (float32 rounds G~ far below the parent's value to the
    # parent's value; falling back to the token index would make a child's survival depend on its token).
    flat_index = jnp.broadcast_to(jnp.arange(flat_value.shape[1], dtype=jnp.int32), flat_value.shape)
    neg_best, _, flat = jax.lax.sort((-flat_value, -flat_g, flat_index), dimension=1, num_keys=2)
    best, flat = -neg_best[:, :width], jnp.minimum(flat[:, :width], m * w - 1)  # descending
    valid = best > -jnp.inf
    parent = jnp.where(valid, flat // w, m)  # invalid candidates sort last
    # A stable sort by parent keeps each parent's children in decreasing G~.
    order = jnp.argsort(parent, axis=1, stable=True)
    parent, flat, best, valid = (jnp.take_along_axis(x, order, axis=1) for x in (parent, flat, best, valid))
    token = jnp.take_along_axis(token.reshape(b, m * w), flat, axis=1)
    phi_new = jnp.take_along_axis(phi_child.reshape(b, m * w), flat, axis=1)
    parent = jnp.minimum(parent, m - 1)
    return parent, token.astype(jnp.int32), jnp.where(valid, phi_new, -jnp.inf), best, valid


def draft_beam(beam: int, depth: int, drafter, state, last, sampling: Sampling, key: jax.Array):
    """Draft the union of `depth` stochastic beams of width `beam`: N = 1 + beam * depth nodes,
    level l (1-based) at indices 1 + (l - 1) * beam .. l * beam."""
    n = 1 + beam * depth
    draft = start_draft(drafter, state, last, n, sampling)
    b = last.shape[0]
    phi = jnp.zeros((b, 1), jnp.float32)
    value = jnp.zeros((b, 1), jnp.float32)  # the root's G
    keys = jax.random.split(key, depth)
    lo = 0  # first index of the level above
    for level in range(1, depth + 1):
        hi = 1 + (level - 1) * beam  # first index of this level
        parent, tokens, phi, value, valid = beam_level(
            keys[level - 1], draft.logits[:, lo:hi], draft.probs[:, lo:hi], phi, value, beam, sampling.greedy
        )
        draft = add_nodes(draft, drafter, hi, parent + lo, tokens, valid, sampling, score=level < depth)
        lo = hi
    return draft.finish()


@dataclasses.dataclass(frozen=True)
class RSD(TreeStrategy):
    """Recursive Speculative Decoding: give exactly one of
    `branching=(b1, b2, ...)` (RSD-C, constant branching by Gumbel-top-k) or
    `beam=W, depth=L` (RSD-S, stochastic beam search; N = 1 + W * L nodes).
    Verified by `verify_tree_without_replacement` (greedy at temperature 0)."""

    branching: tuple[int, ...] | None = None
    beam: int | None = None
    depth: int | None = None

    def __post_init__(self):
        if self.branching is not None:
            if self.beam is not None or self.depth is not None:
                raise ValueError(
                    f"give either branching (RSD-C) or beam and depth (RSD-S), got branching={self.branching!r}, "
                    f"beam={self.beam!r}, depth={self.depth!r}"
                )
            check_branching("branching", self.branching)
            return
        for name in ("beam", "depth"):
            x = getattr(self, name)
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise ValueError(f"{name} must be an int >= 1 (RSD-S) or branching must be given (RSD-C), got {name}={x!r}")

    @property
    def constant(self) -> bool:
        """RSD-C (constant branching) rather than RSD-S (stochastic beam)."""
        return self.branching is not None

    @functools.cached_property
    def shape(self) -> FixedShape:
        """RSD-C's fixed breadth-first shape."""
        return FixedShape.from_parents(branching_parents(self.branching))

    @property
    def size(self) -> int:
        """N, the node budget (root included): the tokens the target scores per round."""
        return self.shape.size if self.constant else 1 + self.beam * self.depth

    @property
    def max_depth(self) -> int:
        return len(self.branching) if self.constant else self.depth

    def draft(self, drafter, state, last, sampling, key):
        if self.constant:
            return draft_fixed_shape(self.shape, "without_replacement", drafter, state, last, sampling, key)
        return draft_beam(self.beam, self.depth, drafter, state, last, sampling, key)
