"""Static-shape token trees: `tree` (the tree pytree, its ancestor mask, positions and accepted
paths) and `draft` (growing a tree with any drafter under a fixed node budget). The package
re-exports `tree`."""

from jspec.trees.tree import (
    Tree,
    commit_tree_path,
    tree_ancestor_mask,
    tree_from_parents,
    tree_path,
    tree_positions,
)

__all__ = [
    "Tree",
    "commit_tree_path",
    "tree_ancestor_mask",
    "tree_from_parents",
    "tree_path",
    "tree_positions",
]
