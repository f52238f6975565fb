"""Lossless tree verifiers: walk a drafted token tree from the root (SpecInfer arXiv 2305.09781,
Sequoia arXiv 2402.12374, EAGLE-2 arXiv 2406.16858).

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
from jspec.trees.tree import Tree


class TreeVerdict(NamedTuple):
    node: jax.Array  # int32 [B], the deepest accepted node (0: only the root, no draft kept)
    accepted: jax.Array  # int32 [B], drafts kept = depth[node]
    next_token: jax.Array  # int32 [B], the token emitted after the accepted path


# A child rule: (u01 [B], r [B, V], q [B, V], x [B]) -> (accept [B], r after a rejection, q after a rejection).
ChildRule = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


def _prob(probs: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.take_along_axis(probs, x[:, None], axis=1)[:, 0]


def _sampled_accept(u, r, q, x):
    """U < r(x)/q(x) for a child drawn from q. Strict, so a token the residual excludes is never
    kept; and a child q cannot draw (q(x) = 0: Gumbel-top-k past q's support, e.g. under a top-k
    warp) is never accepted either: it is no draw, and accepting it wherever r(x) > 0 would bias
    the output."""
    q_x = _prob(q, x)
    return (u * q_x < _prob(r, x)) & (q_x > 0)


def _iid_rule(u, r, q, x):
    """Children sampled independently from q_u: accept if U < r(x)/q(x), else r = norm((r - q)+)."""
    return _sampled_accept(u, r, q, x), residual(r, q), q


def _without_replacement_rule(u, r, q, x):
    """Children sampled without replacement: as i.i.d., then q(x) = 0 renormalised for the next child."""
    accept = _sampled_accept(u, r, q, x)
    q_next = q.at[jnp.arange(q.shape[0]), x].set(0.0)
    q_next = q_next / jnp.maximum(q_next.sum(axis=-1, keepdims=True), 1e-30)
    return accept, residual(r, q), q_next


def _deterministic_rule(u, r, q, x):
    """Candidates chosen by value, not sampled: accept with probability r(x), else r(x) = 0 renormalised."""
    accept = u < _prob(r, x)
    one_hot = jax.nn.one_hot(x, r.shape[-1], dtype=r.dtype)
    return accept, residual(r, one_hot * _prob(r, x)[:, None]), q


def walk_to_residual(
    rule: ChildRule, key: jax.Array, tree: Tree, draft_probs: jax.Array, target_probs: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Walk the tree with `rule` up to where a token is emitted: the deepest accepted node
    int32 `[B]` and the distribution r `[B, V]` the next token is drawn from."""
    b, n = tree.tokens.shape
    rows = jnp.arange(b)
    step_keys = jax.random.split(key, n + 1)

    def step(i, carry):
        node, tried, r, q, done = carry
        # The next untried child of `node`: the first valid index past `tried` whose parent is `node`.
        candidates = tree.valid & (tree.parent == node[:, None]) & (jnp.arange(n)[None, :] > tried[:, None])
        has_child = candidates.any(axis=1) & ~done
        child = jnp.argmax(candidates, axis=1).astype(jnp.int32)
        accept, r_rejected, q_rejected = rule(jax.random.uniform(step_keys[i], (b,)), r, q, tree.tokens[rows, child])
        accept &= has_child
        reject = has_child & ~accept
        node = jnp.where(accept, child, node)
        tried = jnp.where(has_child, child, tried)  # an accepted child's own children all lie past it
        r = jnp.where(accept[:, None], target_probs[rows, child], jnp.where(reject[:, None], r_rejected, r))
        q = jnp.where(accept[:, None], draft_probs[rows, child], jnp.where(reject[:, None], q_rejected, q))
        return node, tried, r, q, done | ~has_child  # no child left: r stays as it is, to emit from

    zeros = jnp.zeros((b,), jnp.int32)
    init = (zeros, zeros, target_probs[:, 0], draft_probs[:, 0], jnp.zeros((b,), bool))
    # Each step tries one node or finishes, so N + 1 steps always finish.
    node, _, r, _, _ = jax.lax.fori_loop(0, n + 1, step, init)
    return node, r


def _walk(rule: ChildRule, key: jax.Array, tree: Tree, draft_probs: jax.Array, target_probs: jax.Array) -> TreeVerdict:
    key_walk, key_emit = jax.random.split(key)
    node, r = walk_to_residual(rule, key_walk, tree, draft_probs, target_probs)
    rows = jnp.arange(tree.tokens.shape[0])
    return TreeVerdict(node, tree.depth[rows, node], sample(key_emit, r))  # one draw per row, after the walk


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


# The lossless verifier for each way of choosing a node's children (`jspec.trees.draft.choose_children`).
CHILD_VERIFIERS: dict[str, Callable[..., TreeVerdict]] = {
    "iid": verify_tree_iid,  # sampled independently from q (SpecInfer, MCSD with replacement)
    "without_replacement": verify_tree_without_replacement,  # Gumbel-top-k (Sequoia, RSD, DySpec)
    "top_k": verify_tree_deterministic,  # chosen by value (EAGLE-2 candidates)
}


def children_verifier(children: str, greedy: bool) -> Callable[..., TreeVerdict]:
    """The lossless verifier for children chosen as `children`; at temperature 0 (`greedy`) the
    greedy verifier, since every builder then drafts the drafter's top-k."""
    return verify_tree_greedy if greedy else CHILD_VERIFIERS[children]


TREE_VERIFIERS: dict[str, Callable[..., TreeVerdict]] = {
    "greedy": verify_tree_greedy,
    "iid": verify_tree_iid,
    "without_replacement": verify_tree_without_replacement,
    "deterministic": verify_tree_deterministic,
}
