"""`MultiCandidate`: multi-candidate speculative decoding (MCSD, Yang et al. arXiv 2401.06706) with
the options of Improved MCSD (Lu et al. arXiv 2409.10644).

Every node at depth i - 1 gets k_i candidates (`k_config`), drawn i.i.d. from the drafter's q
(`replacement=True`, verified by `verify_tree_iid`) or without replacement (Gumbel-top-k,
`verify_tree_without_replacement`); temperature 0 uses the top-k and the greedy verifier.

Improved MCSD, under static shapes:
(ii) "one maximal mask, sliced to this step's draft length": the maximal tree (k_config) has one
    static shape and ancestor structure; a row that stops at depth d marks its deeper nodes
    invalid. An invalid node is scored but sees only itself and can never be accepted, so the
    target's mask is the maximal mask restricted to depth <= d: under jit, slicing a static mask
    per step is exactly what `valid` flags do. (Shapes do not shrink, so the target pass costs
    the same; a level that every row has stopped before is not scored by the drafter.)
(iii) early stop: `early_stop=EarlyStop(...)` (a learned model, `jspec.methods.early_stop`) or
    `ConfidenceStop(...)` decides after each drafted level l >= 1 whether to draft level l + 1.
    It reads only drafter information at depths <= l, never the tokens it removes, so it is
    lossless with every verifier (see `jspec.methods.early_stop`).
(i) target-initialised candidates: the first level drawn from the target's own distribution.
    In our round the root `last` was already drawn from the target, and the target's
    distribution after `last` is unknown before the target pass, so the only faithful version
    draws the k_1 first-level candidates from the distribution the next token would be drawn
    from (the previous round's residual or bonus distribution), defers emitting that token, and,
    as the paper does, keeps the candidate whose subtree is accepted longest. Choosing among
    target samples by how well the drafter continues them biases the output (measured:
    tests/test_multi_candidate.py), so it is `lossy_target_init=True` and `check` refuses
    `target_init=True`. With k_1 = 1 it is lossless (nothing is chosen). It has an `init` and a
    `round` of its own (the strategy protocol, `jspec.rounds`): the carry also holds the
    distribution the next candidates are drawn from.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jspec.methods.early_stop import FEATURES, ConfidenceStop, EarlyStop, level_features
from jspec.methods.static_tree import branching_parents, check_branching
from jspec.models import Transformer, causal_mask
from jspec.rounds import RoundCarry, TreeStrategy, commit_round, score_tree
from jspec.sampling import Sampling, warp
from jspec.trees.draft import DraftedTree, FixedShape, TreeDraft, add_nodes, choose_children, draft_fixed_shape, start_draft
from jspec.trees.tree import Tree
from jspec.verify.tree import (
    TreeVerdict,
    _deterministic_rule,
    _iid_rule,
    _without_replacement_rule,
    walk_to_residual,
)


@dataclasses.dataclass(frozen=True)
class MultiCandidate(TreeStrategy):
    """MCSD: `k_config[i]` candidates for every node at depth i, e.g. (2, 2, 1).

    replacement: candidates i.i.d. from q (True) or without replacement (False); both lossless.
    early_stop: None, `jspec.methods.early_stop.EarlyStop` or `ConfidenceStop`; lossless.
    target_init: refused by `check` (not lossless); lossy_target_init=True opts in (see module doc).
    """

    k_config: tuple[int, ...] = (2, 2, 1)
    replacement: bool = True
    target_init: bool = False
    early_stop: EarlyStop | ConfidenceStop | None = None
    lossy_target_init: bool = False

    def __post_init__(self):
        check_branching("k_config", self.k_config)
        for name in ("replacement", "target_init", "lossy_target_init"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.early_stop is not None and not isinstance(self.early_stop, (EarlyStop, ConfidenceStop)):
            raise ValueError(f"early_stop must be None, an EarlyStop or a ConfidenceStop, got {self.early_stop!r}")
        if self.early_stop is not None and len(self.k_config) < 2:
            raise ValueError(f"early_stop needs k_config of length >= 2 (it decides after level 1), got {self.k_config!r}")

    @property
    def lossy(self) -> bool:
        """Whether the output may differ in distribution from the target's (the opted-in target init)."""
        return self.lossy_target_init

    @property
    def max_depth(self) -> int:
        return len(self.k_config)

    @property
    def size(self) -> int:
        """N, the maximal tree's node budget (root included)."""
        return sum(math.prod(self.k_config[:level]) for level in range(self.max_depth + 1))

    @property
    def children(self) -> str:
        return "iid" if self.replacement else "without_replacement"

    @functools.cached_property
    def shape(self) -> FixedShape:
        return FixedShape.from_parents(branching_parents(self.k_config))

    def check(self, sampling: Sampling) -> None:
        """Refuse target_init: it is not lossless (pass lossy_target_init=True to opt in)."""
        del sampling
        if self.target_init:
            raise ValueError(
                "target_init=True is not lossless: choosing among target-drawn first-level candidates by how "
                "long the drafter's continuation is accepted biases the output; pass lossy_target_init=True to opt in"
            )

    def draft(self, drafter, state, last, sampling, key) -> DraftedTree:
        if self.early_stop is None and not self.lossy_target_init:
            return draft_fixed_shape(self.shape, self.children, drafter, state, last, sampling, key)
        return draft_levels(self, drafter, state, last, sampling, key)[0].finish()

    # The lossy target-initialised variant carries the next candidates' distribution: its own
    # init and round (the protocol's; every other variant inherits TreeStrategy's).
    def init(self, target, drafter, prefill, first_token, sampling):
        carry = super().init(target, drafter, prefill, first_token, sampling)
        return init_target_init_carry(target, carry, sampling) if self.lossy_target_init else carry

    def round(self, target, drafter, carry, active, sampling, key):
        if self.lossy_target_init:
            return target_init_round(self, target, drafter, carry, active, sampling, key)
        return super().round(target, drafter, carry, active, sampling, key)


def draft_levels(
    strategy: MultiCandidate,
    drafter,
    state,
    last: jax.Array,  # int32 [B]
    sampling: Sampling,
    key: jax.Array,
    root_probs: jax.Array | None = None,  # [B, V]: draw level 1 from it (target init) instead of q
) -> tuple[TreeDraft, jax.Array]:
    """Draft the maximal tree level by level, with early stop if the strategy has one.

    Returns the draft and the early-stop features of levels 1 .. L-1 `[B, L-1, F]` (computed
    whether or not early stop is on: `train/mcsd_early_stop.py` collects them). A row stops after
    level l when `early_stop.continue_probability < threshold`; its deeper nodes are invalid.
    """
    shape, mode, stop = strategy.shape, strategy.children, strategy.early_stop
    b = last.shape[0]
    starts = shape.level_starts
    draft = start_draft(drafter, state, last, shape.size, sampling)
    log_path = jnp.zeros((b, shape.size), jnp.float32)  # log q (temperature 1) of each node's path
    alive = jnp.ones((b,), bool)
    keys = jax.random.split(key, shape.max_depth)
    features = []
    for level in range(1, shape.max_depth + 1):
        lo, hi = starts[level], starts[level + 1]
        above = starts[level - 1]
        local_parent = shape.parent[lo:hi] - above
        rank = shape.rank[lo:hi]
        n_children = int(rank.max()) + 1
        parent = jnp.broadcast_to(jnp.asarray(shape.parent[lo:hi]), (b, hi - lo))
        parent_valid = draft.valid[:, above:lo][:, local_parent]  # [B, M]
        if level == 1 and root_probs is not None:
            # Target init: i.i.d. samples from the target's distribution (at temperature 0 every
            # candidate is its argmax); without replacement, a candidate beyond its support is dropped.
            root_mode = "iid" if (sampling.greedy or mode == "iid") else mode
            choices = choose_children(keys[0], jnp.log(root_probs)[:, None], root_probs[:, None], n_children, root_mode, False)
            tokens = choices[:, local_parent, rank]
            valid = parent_valid & (jnp.take_along_axis(root_probs, tokens, axis=1) > 0)
        else:
            choices = choose_children(
                keys[level - 1], draft.logits[:, above:lo], draft.probs[:, above:lo], n_children, mode, sampling.greedy
            )
            tokens = choices[:, local_parent, rank]  # [B, M]
            valid = parent_valid & alive[:, None]
        edge = jnp.take_along_axis(jax.nn.log_softmax(draft.logits[:, above:lo][:, local_parent]), tokens[..., None], axis=-1)
        log_path = log_path.at[:, lo:hi].set(log_path[:, above:lo][:, local_parent] + edge[..., 0])
        add = functools.partial(
            add_nodes, drafter=drafter, start=lo, parent=parent, tokens=tokens, valid=valid, sampling=sampling
        )
        if level == shape.max_depth:
            draft = add(draft, score=False)  # leaves get no children: no need to score them
            continue
        # A level no row will extend is not scored (saves the drafter call when the whole batch stopped).
        draft = jax.lax.cond(valid.any(), lambda d: add(d, score=True), lambda d: add(d, score=False), draft)
        feats = level_features(draft.logits[:, lo:hi], log_path[:, lo:hi], draft.valid[:, lo:hi], level)
        features.append(feats)
        if stop is not None:
            alive = alive & (stop.continue_probability(feats) >= stop.threshold)
    return draft, jnp.stack(features, axis=1) if features else jnp.zeros((b, 0, len(FEATURES)), jnp.float32)


# --- Lossy target-initialised candidates: a round and carry of their own -----------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TargetInitCarry:
    """The round carry (target cache holds seq[:-1], `last` = seq[-1]) plus root_probs `[B, V]`:
    the warped target (residual or bonus) distribution of the token after `last`, not yet drawn."""

    round: RoundCarry
    root_probs: jax.Array


def init_target_init_carry(target: Transformer, carry: RoundCarry, sampling: Sampling) -> TargetInitCarry:
    """One target pass over `last` (written past the cache length, not committed) gives the
    distribution of the token after it, from which the first round's candidates are drawn."""
    b = carry.last.shape[0]
    cache = carry.target_cache
    logits, _ = target(carry.last[:, None], cache.lengths[:, None], causal_mask(b, 1), cache)
    return TargetInitCarry(carry, warp(logits[:, 0], sampling))


def select_candidate(
    strategy: MultiCandidate, sampling: Sampling, key: jax.Array, tree: Tree, draft_probs, target_probs
) -> tuple[jax.Array, jax.Array]:
    """The lossy rule: every first-level candidate counts as accepted (it was drawn from the
    target); walk each one's subtree with the MCSD rule and keep the deepest walk (first on ties).
    Returns its final node int32 `[B]` (depth >= 1) and residual `[B, V]`."""
    k1 = strategy.k_config[0]
    if sampling.greedy:
        rule = _deterministic_rule
        target_probs = draft_probs = jax.nn.one_hot(jnp.argmax(target_probs, -1), target_probs.shape[-1])
    else:
        rule = _iid_rule if strategy.replacement else _without_replacement_rule
    b, n = tree.tokens.shape
    rows = jnp.arange(b)
    index = jnp.arange(n)[None, :]
    nodes, residuals = [], []
    for j in range(k1):  # candidates are nodes 1 .. k1
        only_j = Tree(tree.tokens, tree.parent, tree.depth, tree.valid & ((tree.depth != 1) | (index == 1 + j)))
        forced = jax.nn.one_hot(tree.tokens[:, 1 + j], target_probs.shape[-1])  # p = q = one-hot: always accepted
        node, r = walk_to_residual(
            rule, jax.random.fold_in(key, j), only_j, draft_probs.at[:, 0].set(forced), target_probs.at[:, 0].set(forced)
        )
        nodes.append(node)
        residuals.append(r)
    nodes = jnp.stack(nodes)  # [k1, B]
    best = jnp.argmax(tree.depth[rows[None, :], nodes], axis=0)  # [B]
    return nodes[best, rows], jnp.stack(residuals)[best, rows]


def target_init_round(
    strategy: MultiCandidate,
    target: Transformer,
    drafter,
    carry: TargetInitCarry,
    active: jax.Array,  # bool [B]
    sampling: Sampling,
    key: jax.Array,
) -> tuple[TargetInitCarry, jax.Array, jax.Array]:
    """One lossy target-initialised round: it emits the chosen candidate and its accepted drafts
    (1 .. max_depth tokens) and carries the residual instead of drawing the token after them.

    The chosen node becomes the next round's root, so the round commits as if the verdict were
    "its parent accepted, then the chosen token emitted" (`jspec.rounds.commit_round`)."""
    key_draft, key_verify = jax.random.split(key)
    previous = carry.round
    draft, _ = draft_levels(strategy, drafter, previous.drafter, previous.last, sampling, key_draft, carry.root_probs)
    drafted = draft.finish()
    tree = drafted.tree
    logits, target_cache, features = score_tree(target, previous.target_cache, drafted, drafter.feature_layers)
    draft_probs = drafted.draft_probs.at[:, 0].set(carry.root_probs)  # what the candidates were drawn from
    node, r = select_candidate(strategy, sampling, key_verify, tree, draft_probs, warp(logits, sampling))
    rows = jnp.arange(tree.tokens.shape[0])
    depth = tree.depth[rows, node]  # >= 1: tokens emitted
    verdict = TreeVerdict(tree.parent[rows, node], depth - 1, tree.tokens[rows, node])
    next_round, emitted, n_new = commit_round(
        previous, drafter, drafted, target_cache, features, verdict, active, strategy.tokens_per_round
    )
    root_probs = jnp.where(active[:, None], r, carry.root_probs)
    return TargetInitCarry(next_round, root_probs), emitted, n_new
