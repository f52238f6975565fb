"""The `SequoiaTree` strategy (Sequoia, Chen et al. arXiv 2402.12374).

Sequoia assumes positional acceptance: the probability that the i-th child tried at an accepted
node is the one accepted depends only on i. With that vector a = (a_1 >= a_2 >= ...), a tree T
emits in expectation

    F(T) = sum over nodes of the product of a_rank along the node's root path (the root counts 1)

tokens per round, and a dynamic program over (node budget, depth, child rank) finds the tree of
at most n nodes and depth d maximising F. The pieces, each usable alone:

    sequoia_values / sequoia_tree   the DP: the table of optimal F, and the optimal tree itself
    SequoiaTree                     the strategy: the DP tree, children sampled without
                                    replacement (Gumbel-top-k), verified losslessly
    measure_acceptance              a for given models, prompts and sampling, measured by
                                    simulating the tree verifier on target-generated text
    choose_size_and_depth           the hardware-aware choice of (n, d) from measured times

Ranks past len(a) have acceptance 0, so no node gets more than len(a) children.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import numbers
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jspec.decode import generate
from jspec.models import Transformer, causal_mask, init_cache
from jspec.rounds import TreeStrategy
from jspec.sampling import Sampling, warp
from jspec.trees.draft import FixedShape, choose_children, draft_fixed_shape
from jspec.trees.tree import Tree
from jspec.validation import check_int, check_prompts
from jspec.verify.tree import children_verifier

# --- validation -------------------------------------------------------------------------------


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_acceptance(acceptance) -> np.ndarray:
    """float64 `[K]` from a non-empty, non-increasing sequence of numbers in [0, 1]."""
    values = tuple(acceptance) if isinstance(acceptance, (tuple, list)) or np.ndim(acceptance) == 1 else None
    if not values or any(isinstance(x, bool) or not isinstance(x, numbers.Real) or not 0 <= x <= 1 for x in values):
        raise ValueError(f"acceptance must be a non-empty sequence of numbers in [0, 1], got {acceptance!r}")
    a = np.asarray(values, np.float64)
    if (np.diff(a) > 0).any():
        raise ValueError(f"acceptance must be non-increasing (a_1 >= a_2 >= ...), got {acceptance!r}")
    return a


# --- the dynamic program ----------------------------------------------------------------------


def _solve(a: np.ndarray, max_size: int, max_depth: int) -> tuple[np.ndarray, np.ndarray]:
    """The DP over (node budget, depth, child rank).

    values[n, d] (`[N + 1, D + 1]`): the best F of a tree of at most n nodes and depth <= d.
    choice[d, i, m] (`[D + 1, K, N + 1]`): at a node allowed depth d below it, with m nodes left
    for its children of rank >= i (0-based), the nodes the rank-i child's subtree gets (0: the
    node has no rank-i child, nor any later one).

    With g_i(m) the best sum over the children of rank >= i sharing m nodes, depth <= d - 1 each:
        g_K(m) = 0,   g_i(m) = max(0, max_{1 <= k <= m} a_i * values[k, d - 1] + g_{i+1}(m - k)),
        values[n, d] = 1 + g_0(n - 1).
    Ties go to fewer nodes (the "no child" option, then the smallest k): extra nodes that cannot
    raise F (a_i = 0) are left out rather than scored for nothing.
    """
    n_max, k_max = max_size, len(a)
    values = np.zeros((n_max + 1, max_depth + 1))
    values[1:] = 1.0  # depth 0: the root alone
    choice = np.zeros((max_depth + 1, k_max, n_max + 1), np.int32)
    m = np.arange(n_max + 1)[:, None]
    k = np.arange(1, n_max + 1)[None, :]
    rest = m - k  # [N + 1, N]: nodes left for the later ranks if this child takes k of m
    for d in range(1, max_depth + 1):
        below = values[:, d - 1]
        g = np.zeros(n_max + 1)  # ranks past K: no child
        for i in reversed(range(k_max)):
            cand = np.where(rest >= 0, a[i] * below[k] + g[np.maximum(rest, 0)], -np.inf)  # [N + 1, N]
            best_k = np.argmax(cand, axis=1)  # the first maximum: the smallest k
            best = cand[np.arange(n_max + 1), best_k]
            take = best > 0  # strictly better than no child
            choice[d, i] = np.where(take, best_k + 1, 0)
            g = np.where(take, best, 0.0)
        values[1:, d] = 1.0 + g[:-1]
    return values, choice


def sequoia_values(acceptance, max_size: int, max_depth: int) -> np.ndarray:
    """Optimal F for every budget and depth limit: float64 `[max_size + 1, max_depth + 1]`, entry
    [n, d] the largest F(T) over trees of at most n nodes (root included) and depth <= d
    (row 0 is 0: no tree). The table `choose_size_and_depth` weighs against measured times."""
    a = _check_acceptance(acceptance)
    return _solve(a, check_int("max_size", max_size, 0), check_int("max_depth", max_depth, 0))[0]


def sequoia_tree(acceptance, size: int, max_depth: int) -> tuple[np.ndarray, float]:
    """The tree of at most `size` nodes and depth <= `max_depth` maximising F, and F of it.

    Returns parents int32 `[n]` in the breadth-first order `FixedShape.from_parents` takes (levels
    contiguous, a node's children consecutive in rank order, rank 0 first) and the value F. The
    tree has exactly `size` nodes unless more cannot raise F (a rank with a_i = 0, or every node
    already has len(acceptance) children down to `max_depth`).
    """
    a = _check_acceptance(acceptance)
    size, max_depth = check_int("size", size, 1), check_int("max_depth", max_depth, 0)
    values, choice = _solve(a, size, max_depth)
    parents = [-1]
    queue = collections.deque([(0, size, max_depth)])  # (node, its subtree's budget, depth allowed below it)
    while queue:  # breadth-first, so levels come out contiguous and siblings consecutive
        node, budget, depth = queue.popleft()
        left = budget - 1
        for rank in range(len(a) if depth > 0 else 0):
            take = int(choice[depth, rank, left])
            if take == 0:
                break
            queue.append((len(parents), take, depth - 1))
            parents.append(node)
            left -= take
    return np.asarray(parents, np.int32), float(values[size, max_depth])


def tree_value(acceptance, parents) -> float:
    """F of any breadth-first tree (parents `[n]` as `FixedShape.from_parents` takes): the expected
    tokens per round under positional acceptance. Ranks past len(acceptance) count 0."""
    a = np.append(_check_acceptance(acceptance), 0.0)
    shape = FixedShape.from_parents(parents)
    reach = np.ones(shape.size)  # product of a_rank along each node's path
    for i in range(1, shape.size):
        reach[i] = reach[shape.parent[i]] * a[min(shape.rank[i], len(a) - 1)]
    return float(reach.sum())


# --- the strategy -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SequoiaTree(TreeStrategy):
    """Draft the F-optimal tree (`sequoia_tree`) for a positional acceptance vector, every round.

    acceptance: (a_1 >= a_2 >= ...), each in [0, 1], e.g. from `measure_acceptance`; size: the
    node budget (root included); max_depth: the deepest level allowed. After construction `size`
    and `max_depth` are those of the DP tree (at most the arguments: fewer only where more cannot
    raise F) and `parents` is the tree. Children are sampled without replacement (Gumbel-top-k) and
    verified by `verify_tree_without_replacement`, losslessly; at temperature 0 they are the
    drafter's top-k and the greedy tree verifier decides. `expected_tokens` is F, the tokens per
    round the positional-acceptance model predicts.
    """

    acceptance: tuple[float, ...]
    size: int
    max_depth: int
    parents: tuple[int, ...] = dataclasses.field(init=False, repr=False)  # compared: the tree is the strategy
    expected_tokens: float = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.acceptance, tuple):
            raise ValueError(f"acceptance must be a tuple (hashable), got {self.acceptance!r}")
        a = _check_acceptance(self.acceptance)
        check_int("size", self.size, 1)
        check_int("max_depth", self.max_depth, 1)
        parents, value = sequoia_tree(a, self.size, self.max_depth)
        shape = FixedShape.from_parents(parents)
        # Frozen: the DP tree's own size and depth replace the limits it was built under.
        object.__setattr__(self, "acceptance", tuple(float(x) for x in a))
        object.__setattr__(self, "size", shape.size)
        object.__setattr__(self, "max_depth", shape.max_depth)
        object.__setattr__(self, "parents", tuple(int(p) for p in parents))
        object.__setattr__(self, "expected_tokens", value)

    @functools.cached_property
    def shape(self) -> FixedShape:
        return FixedShape.from_parents(self.parents)

    def draft(self, drafter, state, last, sampling, key):
        return draft_fixed_shape(self.shape, "without_replacement", drafter, state, last, sampling, key)


# --- measuring the acceptance vector ----------------------------------------------------------


def accepted_rank(
    key: jax.Array,
    draft_logits: jax.Array,  # float32 [R, V], the drafter's raw logits
    draft_probs: jax.Array,  # float32 [R, V], warped q
    target_probs: jax.Array,  # float32 [R, V], warped p
    width: int,
    sampling: Sampling,
) -> jax.Array:
    """For each of R positions, draft `width` children of one node as `SequoiaTree` does and verify
    them with its verifier: int32 `[R]`, the rank (1-based) of the accepted child, 0 if none.

    One star tree (a root and `width` leaves) per position, through the real verifier, so the
    measured ranks follow exactly the rule decoding uses (the without-replacement tree verifier).
    """
    r, v = target_probs.shape
    key_children, key_verify = jax.random.split(key)
    children = choose_children(
        key_children, draft_logits[:, None], draft_probs[:, None], width, "without_replacement", sampling.greedy
    )[:, 0]  # [R, width], in the order they are tried
    n = width + 1
    tree = Tree(
        tokens=jnp.concatenate([jnp.zeros((r, 1), jnp.int32), children], axis=1),  # the root's token is not used
        parent=jnp.broadcast_to(jnp.asarray([-1] + [0] * width, jnp.int32), (r, n)),
        depth=jnp.broadcast_to(jnp.asarray([0] + [1] * width, jnp.int32), (r, n)),
        valid=jnp.ones((r, n), bool),
    )
    # Only the root's rows matter (the leaves have no children; their rows only feed the bonus token).
    verdict = children_verifier("without_replacement", sampling.greedy)(
        key_verify, tree, jnp.broadcast_to(draft_probs[:, None], (r, n, v)), jnp.broadcast_to(target_probs[:, None], (r, n, v))
    )
    return verdict.node


_CHUNK = 128  # positions verified at once: bounds the [chunk, width + 1, V] star-tree arrays


@functools.partial(jax.jit, static_argnames=("target_graph", "drafter_graph", "width", "sampling"))
def _rank_counts(
    target_graph,
    target_state,
    drafter_graph,
    drafter_state,
    prompts,
    prompt_lengths,
    continuation,
    lengths,
    key,
    *,
    width,
    sampling,
):
    """int32 `[width + 1]`: over the valid continuation positions, how often no child (index 0) or
    the rank-i child (index i) was accepted. prompts `[B, P]`, continuation `[B, M]` (valid below
    lengths `[B]`)."""
    target = nnx.merge(target_graph, target_state)
    drafter = nnx.merge(drafter_graph, drafter_state)
    b, p = prompts.shape
    m = continuation.shape[1]
    t = p + m
    rows = jnp.arange(b)[:, None]
    at = (prompt_lengths - 1)[:, None] + jnp.arange(m)[None, :]  # [B, M]: the logits before each continuation token
    sequences = jnp.zeros((b, t), jnp.int32).at[:, :p].set(prompts).at[rows, at + 1].set(jnp.maximum(continuation, 0))
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))

    def logits(model: Transformer) -> jax.Array:  # [B, M, V]
        out, _ = model(sequences, positions, causal_mask(b, t), init_cache(model.config, b, t), logits_at=at)
        return out

    draft_logits, target_logits = logits(drafter), logits(target)
    v = draft_logits.shape[-1]
    rows_in = (
        jax.random.split(key, b * m),
        draft_logits.reshape(b * m, v),
        warp(draft_logits, sampling).reshape(b * m, v),
        warp(target_logits, sampling).reshape(b * m, v),
    )

    def one(args):  # a single position, as a batch of one
        k, dl, q, pp = args
        return accepted_rank(k, dl[None], q[None], pp[None], width, sampling)[0]

    ranks = jax.lax.map(one, rows_in, batch_size=_CHUNK)  # [B * M]
    valid = (jnp.arange(m)[None, :] < lengths[:, None]).reshape(-1)
    return jnp.zeros((width + 1,), jnp.int32).at[ranks].add(valid.astype(jnp.int32))


def measure_acceptance(
    target: Transformer,
    drafter: Transformer,
    prompts,
    *,
    width: int,
    sampling: Sampling,
    rng: jax.Array | None,
    prompt_lengths=None,
    max_new_tokens: int = 64,
) -> np.ndarray:
    """Sequoia's positional acceptance vector for these models, prompts and sampling: float64 `[width]`.

    The target generates `max_new_tokens` per prompt (`jspec.generate`); one forward pass of each
    model over prompt + continuation gives the warped p and q at every continuation position; at
    each position `width` children are drawn without replacement from q (Gumbel-top-k; at
    temperature 0 q's top-k) and verified as `SequoiaTree` verifies them (`accepted_rank`).

    a_i = (positions whose rank-i child was accepted) / (all positions): the probability that the
    i-th child tried is the one accepted, given its parent was. That is the reading under which
    F(T) is the expected number of tokens per round (each node's product is then the probability
    that it is accepted), and the one Sequoia measures. (The conditional rate, accepted at rank i
    over positions that reached rank i, is a_i / (1 - a_1 - ... - a_{i-1}).) Sequoia notes the
    measured vector is nearly monotone; a running minimum makes it exactly non-increasing, as
    `SequoiaTree` requires, lowering an entry only where sampling noise raised it above an earlier
    one. prompts: int32 `[B, P]`, right-padded to prompt_lengths `[B]`; rng: required when
    sampling.temperature > 0.
    """
    width = check_int("width", width, 1)
    if width > target.config.vocab_size:
        raise ValueError(f"width must be at most the vocabulary size {target.config.vocab_size}, got {width}")
    if not isinstance(sampling, Sampling):
        raise ValueError(f"sampling must be a jspec.Sampling, got {type(sampling).__name__}")
    if rng is None:
        key_generate, key_measure = None, jax.random.key(0)  # greedy: generate checks rng, and nothing here is random
    else:
        key_generate, key_measure = jax.random.split(rng)
    out = generate(
        target, prompts, max_new_tokens=max_new_tokens, sampling=sampling, rng=key_generate, prompt_lengths=prompt_lengths
    )
    prompts, prompt_lengths = check_prompts(prompts, prompt_lengths, target.config.vocab_size)
    target_graph, target_state = nnx.split(target)
    drafter_graph, drafter_state = nnx.split(drafter)
    counts = np.asarray(
        _rank_counts(
            target_graph,
            target_state,
            drafter_graph,
            drafter_state,
            prompts,
            prompt_lengths,
            out.tokens,
            out.lengths,
            key_measure,
            width=width,
            sampling=sampling,
        ),
        np.float64,
    )
    return np.minimum.accumulate(counts[1:] / counts.sum())


# --- the hardware-aware choice ----------------------------------------------------------------


def _check_sizes(name: str, values) -> tuple[int, ...]:
    values = tuple(values) if isinstance(values, (tuple, list, range)) else ()
    if not values or any(not _is_int(x) or x < 1 for x in values):
        raise ValueError(f"{name} must be a non-empty sequence of ints >= 1, got {values!r}")
    return tuple(int(x) for x in values)


def _check_seconds(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def choose_size_and_depth(
    acceptance,
    draft_time: float,
    verify_time: Mapping[int, float] | Callable[[int], float],
    *,
    sizes,
    depths,
) -> tuple[int, int, float]:
    """Sequoia's hardware-aware choice: the (size n, depth d) minimising seconds per token,
    (d * draft_time + verify_time(n)) / F(n, d), over `sizes` x `depths`.

    draft_time: seconds of one drafter step (one tree level); verify_time: seconds of one target
    pass over n tokens, a dict {n: seconds} covering `sizes` and 1, or a callable n -> seconds.
    Measure both on the deployment hardware, e.g. with `infer.timing.forward_seconds` (a pass of
    either model over n new tokens after a prefilled prompt) or `infer.bench.measure`.
    Returns (n, d, expected speedup), the speedup over autoregressive decoding that the model
    predicts: F(n, d) / (d * draft_time + verify_time(n)) * verify_time(1). Ties go to the smaller n,
    then the smaller d.
    """
    a = _check_acceptance(acceptance)
    draft_time = _check_seconds("draft_time", draft_time)
    sizes, depths = sorted(set(_check_sizes("sizes", sizes))), sorted(set(_check_sizes("depths", depths)))
    if isinstance(verify_time, Mapping):
        missing = sorted(set(sizes + [1]) - set(verify_time))
        if missing:
            raise ValueError(f"verify_time must give the seconds for every size and for 1, missing {missing}")
        times = {n: _check_seconds(f"verify_time[{n}]", verify_time[n]) for n in sizes + [1]}
    elif callable(verify_time):
        times = {n: _check_seconds(f"verify_time({n})", verify_time(n)) for n in sizes + [1]}
    else:
        raise ValueError(f"verify_time must be a dict or a callable n -> seconds, got {verify_time!r}")
    values = _solve(a, max(sizes), max(depths))[0]
    best = None
    for n in sizes:
        for d in depths:
            seconds = d * draft_time + times[n]
            speedup = values[n, d] / seconds * times[1] if seconds > 0 else math.inf
            if best is None or speedup > best[2]:
                best = (n, d, float(speedup))
    return best
