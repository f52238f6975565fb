"""The speculative methods `infer.bench` compares, each built for a node budget.

A node budget N is the number of tokens the target scores per round (the tree's nodes, root
included; a chain of k drafts scores k + 1). Comparing methods at equal N compares what each
does with the same verification cost. Every tree builder gets a shape of exactly N nodes:

    chain      Chain(k = N - 1), the sampling verifier
    specinfer  StaticTree(b, 1, ..., 1), children sampled i.i.d. (SpecInfer, MCSD with replacement)
    rsd-c      RSD(branching=(b, 1, ..., 1)): constant branching by Gumbel-top-k
    rsd-s      RSD(beam=b, depth=(N - 1) / b): stochastic beam search
    sequoia    SequoiaTree(a, size=N): the DP-optimal shape for the acceptance vector a measured
               on calibration prompts (not the benchmark's) at the benchmark's temperature
    dynamic    DynamicTree(size=N, width=b): DySpec's greedy expansion, b nodes per drafter call
    mcsd       MultiCandidate((b, 1, ..., 1), replacement=False)
    eagle      EagleTree(top_k=b, depth=(N - 1) / b, size=N): EAGLE-2's expand-and-rerank

with b = 2 for N <= 9 and 4 above, (N - 1) divisible by b.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jspec

TREE_METHODS = ("specinfer", "rsd-c", "rsd-s", "sequoia", "dynamic", "mcsd", "eagle")


@dataclasses.dataclass(frozen=True)
class Method:
    """A named strategy with what the bench reports about it."""

    name: str
    family: str  # "chain" or "tree"
    strategy: Any
    nodes: int  # tokens the target scores per round
    k: int | None = None  # chains only
    verifier: str | None = None


def chain_method(k: int, verifier: str) -> Method:
    return Method(f"chain-{verifier}-k{k}", "chain", jspec.Chain(k=k, verifier=verifier), k + 1, k, verifier)


def tree_width(budget: int) -> int:
    """The branching b used at this budget (see the module docstring)."""
    b = 2 if budget <= 9 else 4
    if budget < 3 or (budget - 1) % b:
        raise ValueError(f"node budget must be >= 3 with (budget - 1) divisible by {b}, got {budget}")
    return b


def tree_method(name: str, budget: int, acceptance: Callable[[int], tuple[float, ...]] | None = None) -> Method:
    """The tree method `name` at node budget `budget`; `acceptance(width)` measures Sequoia's vector."""
    b = tree_width(budget)
    depth = (budget - 1) // b
    branching = (b,) + (1,) * (depth - 1)
    if name == "specinfer":
        strategy = jspec.StaticTree(branching, children="iid")
    elif name == "rsd-c":
        strategy = jspec.RSD(branching=branching)
    elif name == "rsd-s":
        strategy = jspec.RSD(beam=b, depth=depth)
    elif name == "sequoia":
        if acceptance is None:
            raise ValueError("sequoia needs a measured acceptance vector")
        # Floored so that the DP fills the budget even where a rank was never accepted in calibration
        # (with all-zero entries every tree has value 1 and the DP would keep one node).
        vector = tuple(max(float(a), 1e-6) for a in acceptance(b * 2))
        strategy = jspec.SequoiaTree(vector, size=budget, max_depth=budget - 1)
    elif name == "dynamic":
        strategy = jspec.DynamicTree(size=budget, width=b)
    elif name == "mcsd":
        strategy = jspec.MultiCandidate(branching, replacement=False)
    elif name == "eagle":
        strategy = jspec.EagleTree(top_k=b, depth=depth, size=budget)
    else:
        raise ValueError(f"tree method must be one of {TREE_METHODS}, got {name!r}")
    nodes = strategy.size
    assert nodes == budget, (name, nodes, budget)
    return Method(f"{name}-n{budget}", "tree", strategy, nodes)
