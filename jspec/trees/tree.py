"""Static-shape token trees (SpecInfer, Miao et al. arXiv 2305.09781): the tree pytree, its attention mask and
positions, and keeping an accepted root-to-node path in the KV cache.

A tree holds at most N nodes per row (N static); `valid` flags the ones in use, so every round
compiles to the same shapes whatever the tree's real size. Node 0 is the root: the last emitted
token, not yet in the target's cache, as the first token of a chain round. Every other node is a
drafted token whose parent precedes it (`parent[i] < i`), so a root-to-node path has increasing
indices and a single forward pass over the N nodes, with `tree_ancestor_mask` as the mask among the
new tokens, scores every node at once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jspec.models import KVCache, commit_path


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tree:
    """tokens, parent, depth: int32 `[B, N]`; valid: bool `[B, N]`.

    parent[:, 0] = -1 (the root); for i > 0, 0 <= parent[i] < i where valid. depth[root] = 0 and
    depth[i] = depth[parent[i]] + 1. Invalid nodes are ignored by every function here.
    """

    tokens: jax.Array
    parent: jax.Array
    depth: jax.Array
    valid: jax.Array

    @property
    def size(self) -> int:
        """The node budget N."""
        return self.tokens.shape[1]


def tree_from_parents(tokens: jax.Array, parent: jax.Array, valid: jax.Array) -> Tree:
    """A `Tree` from tokens `[B, N]`, parent `[B, N]` (parent[:, 0] = -1) and valid `[B, N]`,
    with depths computed from the parents."""
    n = tokens.shape[1]

    def set_depth(i, depth):  # parents precede children, so one pass in index order suffices
        p = parent[:, i]
        return depth.at[:, i].set(jnp.where(p >= 0, jnp.take_along_axis(depth, jnp.maximum(p, 0)[:, None], 1)[:, 0] + 1, 0))

    depth = jax.lax.fori_loop(1, n, set_depth, jnp.zeros(tokens.shape, jnp.int32))
    return Tree(tokens.astype(jnp.int32), parent.astype(jnp.int32), depth, valid.astype(bool))


def tree_ancestor_mask(tree: Tree) -> jax.Array:
    """bool `[B, N, N]`: M[b, i, j] iff node j is node i or one of its ancestors.

    Used as the mask among the new tokens of a forward pass (a chain's causal mask is the special
    case of a path). An invalid node sees only itself, so its (unused) attention stays finite.
    """
    b, n = tree.parent.shape
    rows = jnp.arange(b)[:, None]

    def add_ancestor(_, carry):  # walk every node one level up per step; n - 1 steps reach the root
        mask, node = carry
        # A node past the root marks itself, which the identity already holds.
        mask = mask.at[rows, jnp.arange(n)[None, :], jnp.where(node >= 0, node, jnp.arange(n))].set(True)
        parent_of = jnp.take_along_axis(tree.parent, jnp.maximum(node, 0), axis=1)
        return mask, jnp.where(node >= 0, parent_of, -1)

    eye = jnp.broadcast_to(jnp.eye(n, dtype=bool), (b, n, n))
    mask, _ = jax.lax.fori_loop(0, n - 1, add_ancestor, (eye, tree.parent))
    return mask & (tree.valid[:, :, None] | eye)


def tree_positions(tree: Tree, lengths: jax.Array) -> jax.Array:
    """Position ids `[B, N]`: each row's committed length plus the node's depth."""
    return lengths[:, None] + tree.depth


def tree_path(tree: Tree, node: jax.Array, ancestors: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The root-to-`node` path of each row (node: int32 `[B]`); `ancestors` is the tree's ancestor
    mask `[B, N, N]` when the caller already has it.

    Returns node indices int32 `[B, N]` in root-to-node order (entries past the path's length
    are N - 1, unused) and the path length `depth[node] + 1`, int32 `[B]`.
    """
    n = tree.size
    ancestors = tree_ancestor_mask(tree) if ancestors is None else ancestors
    on_path = jnp.take_along_axis(ancestors, node[:, None, None], axis=1)[:, 0]  # [B, N]
    # Ancestors have smaller indices than their descendants: sorting the path's indices orders it.
    path = jnp.sort(jnp.where(on_path, jnp.arange(n), n - 1), axis=1)
    length = jnp.take_along_axis(tree.depth, node[:, None], axis=1)[:, 0] + 1
    return path.astype(jnp.int32), length.astype(jnp.int32)


def commit_tree_path(cache: KVCache, tree: Tree, node: jax.Array) -> KVCache:
    """Keep the keys/values of the root-to-`node` path of the last forward pass over `tree`
    (node: int32 `[B]`), gathered into consecutive slots; everything else lies past `lengths`."""
    path, length = tree_path(tree, node)
    return commit_path(cache, path, length)
