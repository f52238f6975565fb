"""The `DynamicTree` strategy: DySpec (Xiong et al., arXiv 2410.11744), a token tree grown greedily
at run time under a fixed node budget.

Every node u carries a value v_u, the product of the drafter's probabilities of the tokens on its
path (the root has 1). The tree grows in steps; the candidates of a step are, for every node u
already in the tree, its *next* child (its first child, or the next sibling of its last child),
and a step adds the `width` best candidates, at most one per node. With width 1 this is DySpec's
priority-queue expansion. The budget N is static: the nodes take indices 1, 2, ... in the order
they are added, scored by the drafter `width` at a time, and nodes never chosen stay invalid.

Why the priority is an expectation (losslessness). A node's children are a sample without
replacement from q_u in draw order: each scored node pre-draws its Gumbel-top-k order, and the
j-th child added to u is the j-th token of that order (one child per node per step, so siblings get
increasing indices in draw order). `jspec.verify.tree.verify_tree_without_replacement` tries them
in index order and is exact when, given the earlier siblings x_1..x_{j-1} (and anything else
independent of u's order), x_j is distributed as q_u restricted to the other tokens: i.e. when
*whether* the j-th child exists does not depend on x_j itself. DySpec's own priority, v_u * q_u(x_j),
depends on x_j: a likely token would be added more often than an unlikely one, biasing the tree
towards tokens the verifier then over-accepts. So the candidate's priority is computed before its
token is revealed, as its expected value
    priority = v_u * E[q_u(x)] = v_u * S_u / M_u,   x ~ q_u restricted to the tokens not yet taken,
with M_u the remaining mass and S_u the remaining sum of squares of q_u. Everything that decides
whether x_j exists (other nodes' tokens and values, u's earlier children and their subtrees) is
independent of x_j given x_1..x_{j-1}; the end-to-end distribution test checks the claim. Once
added, a child's value is its true v_u * q_u(x_j), which only steers its own descendants.

At temperature 0 the greedy verifier decides, so nothing needs hiding: the children are the top-k
of the raw logits and the priority is the child's true value under the softmax of the raw logits,
which is exactly DySpec's greedy expansion.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jspec.rounds import TreeStrategy
from jspec.sampling import Sampling
from jspec.trees.draft import TreeDraft, add_nodes, choose_children, set_nodes, start_draft
from jspec.validation import check_int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Frontier:
    """Per-node expansion state next to the `TreeDraft` (all `[B, N]` or `[B, N, K]`, K = max_children).

    value: v_u, float32; order: int32 `[B, N, K]`, u's pre-drawn children in draw order;
    order_q: float32 `[B, N, K]`, q_u of those tokens (under the priority distribution);
    mass, square: float32, the total sum and sum of squares of q_u; limit: int32, how many
    children u may get (0 for nodes not scored or invalid); taken: int32, children added so far.
    """

    value: jax.Array
    order: jax.Array
    order_q: jax.Array
    mass: jax.Array
    square: jax.Array
    limit: jax.Array
    taken: jax.Array


def _take(array: jax.Array, index: jax.Array) -> jax.Array:
    """`array[b, index[b, m]]` for array `[B, N, ...]` and index `[B, M]` -> `[B, M, ...]`."""
    return jax.vmap(lambda a, i: a[i])(array, index)


def _priority_probs(logits: jax.Array, probs: jax.Array, greedy: bool) -> jax.Array:
    """The q whose probabilities make up values `[B, M, V]`: the warped q, or at temperature 0
    (where q is one-hot) the softmax of the raw logits."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1) if greedy else probs


def _score_frontier(
    frontier: Frontier, start, key: jax.Array, logits: jax.Array, probs: jax.Array, valid: jax.Array, k: int, greedy: bool
) -> Frontier:
    """Pre-draw the children of M newly scored nodes at indices start.. (logits, probs `[B, M, V]`,
    valid `[B, M]`) and store their order, its probabilities and their totals."""
    order = choose_children(key, logits, probs, k, "without_replacement", greedy)  # [B, M, K]
    q = _priority_probs(logits, probs, greedy)
    order_q = jnp.take_along_axis(q, order, axis=-1)
    # Tokens outside the warped support (top-k / top-p) are never drawn; the count does not
    # depend on which tokens are drawn.
    support = jnp.sum(probs > 0, axis=-1) if not greedy else jnp.full(valid.shape, q.shape[-1])
    limit = jnp.where(valid, jnp.minimum(support, k), 0)
    return dataclasses.replace(
        frontier,
        order=set_nodes(frontier.order, start, order),
        order_q=set_nodes(frontier.order_q, start, order_q),
        mass=set_nodes(frontier.mass, start, q.sum(axis=-1)),
        square=set_nodes(frontier.square, start, jnp.square(q).sum(axis=-1)),
        limit=set_nodes(frontier.limit, start, limit),
    )


def candidate_priority(frontier: Frontier, greedy: bool) -> jax.Array:
    """float32 `[B, N]`: the priority of each node's next child, -inf where it has none left.

    Sampling: v_u * S_u / M_u over the tokens of q_u not yet taken (the child's expected value, known
    before its token is); greedy: the child's true value v_u * q_u(x)."""
    k = frontier.order.shape[-1]
    taken = frontier.taken
    next_q = jnp.take_along_axis(frontier.order_q, jnp.minimum(taken, k - 1)[..., None], axis=-1)[..., 0]
    if greedy:
        expected = next_q
    else:
        before = jnp.arange(k) < taken[..., None]  # [B, N, K]: the children already taken
        mass = frontier.mass - jnp.sum(jnp.where(before, frontier.order_q, 0.0), axis=-1)
        square = frontier.square - jnp.sum(jnp.where(before, jnp.square(frontier.order_q), 0.0), axis=-1)
        expected = jnp.clip(square / jnp.maximum(mass, 1e-30), 0.0, 1.0)
    return jnp.where(taken < frontier.limit, frontier.value * expected, -jnp.inf)


def _grow(
    draft: TreeDraft, frontier: Frontier, drafter, step, width: int, sampling: Sampling, key: jax.Array, score: bool
) -> tuple[TreeDraft, Frontier]:
    """One step: add the `width` best next children (at most one per node) at indices
    1 + step * width .., scoring them with the drafter in one call if `score`."""
    b = draft.tokens.shape[0]
    k = frontier.order.shape[-1]
    start = 1 + step * width
    best, parent = jax.lax.top_k(candidate_priority(frontier, sampling.greedy), width)  # [B, W]
    valid = best > -jnp.inf
    rank = jnp.minimum(_take(frontier.taken, parent), k - 1)  # which of the parent's children this is
    tokens = jnp.take_along_axis(_take(frontier.order, parent), rank[..., None], axis=-1)[..., 0]
    value = _take(frontier.value, parent) * jnp.take_along_axis(_take(frontier.order_q, parent), rank[..., None], axis=-1)[..., 0]
    rows = jnp.arange(b)[:, None]
    frontier = dataclasses.replace(
        frontier,
        taken=frontier.taken.at[rows, parent].add(valid.astype(jnp.int32)),  # top_k parents are distinct
        value=set_nodes(frontier.value, start, jnp.where(valid, value, 0.0)),
    )
    draft = add_nodes(draft, drafter, start, parent, tokens, valid, sampling, score=score)
    if score:
        logits = jax.lax.dynamic_slice_in_dim(draft.logits, start, width, axis=1)
        probs = jax.lax.dynamic_slice_in_dim(draft.probs, start, width, axis=1)
        frontier = _score_frontier(frontier, start, key, logits, probs, valid, k, sampling.greedy)
    return draft, frontier


@dataclasses.dataclass(frozen=True)
class DynamicTree(TreeStrategy):
    """DySpec: grow a tree of at most `size` nodes (the node budget N, root included), adding per
    step the `width` best next children by expected path probability; each node gets at most
    `max_children`.

    `size - 1` must be a multiple of `width`: the tree grows in (size - 1) / width steps, each
    one drafter call over `width` new nodes. Verified by `verify_tree_without_replacement`
    (greedy at temperature 0). See the module docstring for why it is lossless.
    """

    size: int = 16
    width: int = 1
    max_children: int = 4

    def __post_init__(self):
        check_int("size", self.size, 2)
        check_int("width", self.width, 1)
        check_int("max_children", self.max_children, 1)
        if (self.size - 1) % self.width:
            raise ValueError(f"size - 1 must be a multiple of width={self.width}, got size={self.size}")

    @property
    def steps(self) -> int:
        """Drafter calls that add nodes: (size - 1) / width."""
        return (self.size - 1) // self.width

    @property
    def max_depth(self) -> int:
        """The deepest node possible: a node added at step s has depth <= s + 1, so a chain of
        `steps` nodes (size - 1 with width 1)."""
        return self.steps

    def draft(self, drafter, state, last, sampling, key):
        n = self.size
        draft = start_draft(drafter, state, last, n, sampling)
        b, _, v = draft.logits.shape
        k = min(self.max_children, v)
        frontier = Frontier(
            value=jnp.zeros((b, n), jnp.float32).at[:, 0].set(1.0),
            order=jnp.zeros((b, n, k), jnp.int32),
            order_q=jnp.zeros((b, n, k), jnp.float32),
            mass=jnp.zeros((b, n), jnp.float32),
            square=jnp.zeros((b, n), jnp.float32),
            limit=jnp.zeros((b, n), jnp.int32),
            taken=jnp.zeros((b, n), jnp.int32),
        )
        key_root, key_steps = jax.random.split(key)
        frontier = _score_frontier(
            frontier, 0, key_root, draft.logits[:, :1], draft.probs[:, :1], jnp.ones((b, 1), bool), k, sampling.greedy
        )

        def step(s, state):  # every step but the last scores its new nodes: they may get children
            return _grow(*state, drafter, s, self.width, sampling, jax.random.fold_in(key_steps, s), score=True)

        draft, frontier = jax.lax.fori_loop(0, self.steps - 1, step, (draft, frontier))
        draft, _ = _grow(draft, frontier, drafter, self.steps - 1, self.width, sampling, key_steps, score=False)
        return draft.finish()
