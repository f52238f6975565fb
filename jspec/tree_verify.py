"""Lossless tree verifiers (methods.md section 5): walk a drafted token tree from the root.

Every verifier has the signature
    verify(key, tree, draft_probs [B, N, V], target_probs [B, N, V]) -> TreeVerdict
where `target_probs[:, i]` is the (warped) target distribution after node i's root path and
`draft_probs[:, i]` the drafter distribution node i's children were drawn from. At node u with
residual r (initially p_u) the children of u are tried in index order; an accepted child becomes
the new u (r = p_child), and when no child is left one token is drawn from r (p_u itself if u has
no children: the bonus token). The rules differ only in how a child is accepted and how a
rejection updates r and q; they share the residual update of `jspec.sampling`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jspec.sampling import residual, sample
from jspec.trees import Tree


class TreeVerdict(NamedTuple):
    node: jax.Array  # int32 [B], the deepest accepted node (0: only the root, no draft kept)
    accepted: jax.Array  # int32 [B], drafts kept = depth[node]
    next_token: jax.Array  # int32 [B], the token emitted after the accepted path


# A child rule: (u01 [B], r [B, V], q [B, V], x [B]) -> (accept [B], r after a rejection, q after a rejection).
ChildRule = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


def _prob(probs: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.take_along_axis(probs, x[:, None], axis=1)[:, 0]


def _iid_rule(u, r, q, x):
    """Children sampled independently from q_u: accept if U < r(x)/q(x), else r = norm((r - q)+)."""
    return u * _prob(q, x) < _prob(r, x), residual(r, q), q


def _without_replacement_rule(u, r, q, x):
    """Children sampled without replacement: as i.i.d., then q(x) = 0 renormalised for the next child."""
    accept = u * _prob(q, x) < _prob(r, x)  # strict: a token the residual excludes is never kept
    q_next = q.at[jnp.arange(q.shape[0]), x].set(0.0)
    q_next = q_next / jnp.maximum(q_next.sum(axis=-1, keepdims=True), 1e-30)
    return accept, residual(r, q), q_next


def _deterministic_rule(u, r, q, x):
    """Candidates chosen by value, not sampled: accept with probability r(x), else r(x) = 0 renormalised."""
    accept = u < _prob(r, x)
    one_hot = jax.nn.one_hot(x, r.shape[-1], dtype=r.dtype)
    return accept, residual(r, one_hot * _prob(r, x)[:, None]), q


def _walk(rule: ChildRule, key: jax.Array, tree: Tree, draft_probs: jax.Array, target_probs: jax.Array) -> TreeVerdict:
    b, n = tree.tokens.shape
    rows = jnp.arange(b)
    step_keys = jax.random.split(key, n + 1)

    def step(i, carry):
        node, tried, r, q, done, token = carry
        # The next untried child of `node`: the first valid index past `tried` whose parent is `node`.
        candidates = tree.valid & (tree.parent == node[:, None]) & (jnp.arange(n)[None, :] > tried[:, None])
        has_child = candidates.any(axis=1) & ~done
        child = jnp.argmax(candidates, axis=1).astype(jnp.int32)
        x = tree.tokens[rows, child]
        key_accept, key_emit = jax.random.split(step_keys[i])
        accept, r_rejected, q_rejected = rule(jax.random.uniform(key_accept, (b,)), r, q, x)
        accept &= has_child
        reject = has_child & ~accept
        finish = ~done & ~has_child  # no child left: emit from r
        token = jnp.where(finish, sample(key_emit, r), token)
        node = jnp.where(accept, child, node)
        tried = jnp.where(has_child, child, tried)  # an accepted child's own children all lie past it
        r = jnp.where(accept[:, None], target_probs[rows, child], jnp.where(reject[:, None], r_rejected, r))
        q = jnp.where(accept[:, None], draft_probs[rows, child], jnp.where(reject[:, None], q_rejected, q))
        return node, tried, r, q, done | finish, token

    zeros = jnp.zeros((b,), jnp.int32)
    init = (zeros, zeros, target_probs[:, 0], draft_probs[:, 0], jnp.zeros((b,), bool), zeros)
    # Each step tries one node or finishes, so N + 1 steps always finish.
    node, _, _, _, _, token = jax.lax.fori_loop(0, n + 1, step, init)
    return TreeVerdict(node, tree.depth[rows, node], token)


def verify_tree_greedy(key, tree: Tree, draft_probs, target_probs) -> TreeVerdict:
    """Move to the child whose token is argmax p_u; if none, emit argmax p_u. Lossless only at
    temperature 0; `key` and `draft_probs` are unused."""
    del key, draft_probs
    one_hot = jax.nn.one_hot(jnp.argmax(target_probs, axis=-1), target_probs.shape[-1], dtype=jnp.float32)
    return _walk(_deterministic_rule, jax.random.key(0), tree, one_hot, one_hot)


def verify_tree_iid(key, tree: Tree, draft_probs, target_probs) -> TreeVerdict:
    """SpecInfer multi-step speculative sampling / MCSD with replacement: children drawn i.i.d. from q_u."""
    return _walk(_iid_rule, key, tree, draft_probs, target_probs)


def verify_tree_without_replacement(key, tree: Tree, draft_probs, target_probs) -> TreeVerdict:
    """Sequoia, RSD, DySpec, MCSD without replacement: children drawn without replacement from q_u."""
    return _walk(_without_replacement_rule, key, tree, draft_probs, target_probs)


def verify_tree_deterministic(key, tree: Tree, draft_probs, target_probs) -> TreeVerdict:
    """EAGLE-2 style: children chosen by value (e.g. top-k of q_u), not sampled; q is not needed."""
    return _walk(_deterministic_rule, key, tree, draft_probs, target_probs)


TREE_VERIFIERS: dict[str, Callable[..., TreeVerdict]] = {
    "greedy": verify_tree_greedy,
    "iid": verify_tree_iid,
    "without_replacement": verify_tree_without_replacement,
    "deterministic": verify_tree_deterministic,
}
