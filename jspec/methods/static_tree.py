"""The `StaticTree` strategy: a token tree of fixed shape, the same every round.

`branching[l]` children for every node at depth l, e.g. (4, 2, 2, 1): SpecInfer's expansion with
sampled children, RSD-C's constant branching with Gumbel-top-k (sampling without replacement),
or top-k candidates. Drafting, scoring and committing are shared with every tree strategy
(`jspec.trees.draft`, `jspec.rounds`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from jspec.rounds import TreeStrategy
from jspec.trees.draft import FixedShape, draft_fixed_shape
from jspec.verify.tree import CHILD_VERIFIERS


def check_branching(name: str, branching) -> None:
    if (
        not isinstance(branching, tuple)
        or not branching
        or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in branching)
    ):
        raise ValueError(f"{name} must be a non-empty tuple of ints >= 1, got {branching!r}")


def check_children(children) -> None:
    if children not in CHILD_VERIFIERS:
        raise ValueError(f"children must be one of {sorted(CHILD_VERIFIERS)}, got {children!r}")


def branching_parents(branching: tuple[int, ...]) -> np.ndarray:
    """int32 `[N]`, breadth-first: `branching[l]` consecutive children for every node at depth l."""
    parent, start, count = [-1], 0, 1
    for b in branching:
        parent += [start + i for i in range(count) for _ in range(b)]
        start, count = start + count, count * b
    return np.asarray(parent, np.int32)


@dataclasses.dataclass(frozen=True)
class StaticTree(TreeStrategy):
    """Draft a tree with `branching[l]` children per node at depth l, e.g. (4, 2, 2, 1).

    children: how a node's children are chosen from the drafter's q: "iid" samples, "without_replacement"
    samples without replacement, "top_k" takes the most likely; each has its lossless verifier. At
    temperature 0 the children are always the top-k and the greedy tree verifier decides.
    """

    branching: tuple[int, ...] = (2, 2, 1)
    children: str = "without_replacement"

    def __post_init__(self):
        check_branching("branching", self.branching)
        check_children(self.children)

    @property
    def depth(self) -> int:
        return len(self.branching)

    max_depth = depth

    @property
    def level_sizes(self) -> list[int]:
        """Nodes per depth, root included: [1, b1, b1*b2, ...]."""
        return [math.prod(self.branching[:level]) for level in range(self.depth + 1)]

    @property
    def size(self) -> int:
        """N, the node budget (root included): the tokens the target scores per round."""
        return sum(self.level_sizes)

    def parents(self) -> np.ndarray:
        """int32 `[N]`, breadth-first: the children of a node are consecutive, levels in order."""
        return branching_parents(self.branching)

    @functools.cached_property
    def shape(self) -> FixedShape:
        return FixedShape.from_parents(self.parents())

    def draft(self, drafter, state, last, sampling, key):
        return draft_fixed_shape(self.shape, self.children, drafter, state, last, sampling, key)
