"""Retrieval trees at static shapes: the trie of several retrieved continuations, and fusing one
token tree into another by longest-prefix matching (RASD, Quan et al. arXiv 2503.03434).

Trees follow `jspec.trees.tree.Tree`'s convention: node 0 is the root (the row's last token),
parents precede children, `valid` flags the nodes in use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def trie_from_sequences(root: jax.Array, sequences: jax.Array, valid: jax.Array, size: int):
    """The trie of M continuations `[B, M, D]` (`valid [B, M, D]`, a prefix of each), keeping the
    root and the `size - 1` nodes shared by the most continuations (ties: shallower first, then the
    earlier continuation), which is ancestor-closed since a node's count is at most its parent's.

    Returns tokens, parent int32 `[B, size]`, valid bool `[B, size]` and count int32 `[B, size]`
    (continuations through the node; the root's: all valid ones), in (depth, continuation) order,
    so parents precede children."""
    b, m, d = sequences.shape
    # same[b, i, j, t]: continuations i and j agree (and are valid) on their first t + 1 tokens.
    agree = (sequences[:, :, None, :] == sequences[:, None, :, :]) & valid[:, :, None, :] & valid[:, None, :, :]
    same = jnp.cumprod(agree, axis=-1).astype(bool)
    first = jnp.argmax(same, axis=2)  # [B, M, D]: the earliest continuation sharing the prefix
    own = jnp.arange(m)[None, :, None]
    node = valid & (first == own)  # (i, t) is a trie node, represented by its first continuation
    count = same.sum(axis=2).astype(jnp.int32)
    # Candidate c = t * M + i (depth-major): sorting the kept candidates by c puts parents first.
    flat = lambda x: jnp.swapaxes(x, 1, 2).reshape(b, d * m)  # noqa: E731
    c_node, c_count = flat(node), flat(count)
    c_depth = jnp.repeat(jnp.arange(d), m)[None, :]
    key = jnp.where(c_node, -c_count * (d + 1) + c_depth, jnp.iinfo(jnp.int32).max)  # count desc, depth asc
    keep_n = min(size - 1, d * m)
    order = jnp.argsort(key, axis=1, stable=True)[:, :keep_n]
    chosen = jnp.sort(order, axis=1)  # depth-major: parents first
    chosen_ok = jnp.take_along_axis(c_node, chosen, axis=1)
    # Parent of candidate (i, t): candidate (first[i, t - 1], t - 1), or the root at t = 0.
    c_first_parent = flat(jnp.concatenate([jnp.zeros((b, m, 1), first.dtype), first[:, :, :-1]], axis=2))
    parent_c = (c_depth - 1) * m + c_first_parent
    new_index = (
        jnp.full((b, d * m), -1, jnp.int32).at[jnp.arange(b)[:, None], chosen].set(jnp.arange(1, keep_n + 1, dtype=jnp.int32))
    )
    parent = jnp.where(c_depth == 0, 0, jnp.take_along_axis(new_index, jnp.maximum(parent_c, 0), axis=1))
    parent = jnp.take_along_axis(parent, chosen, axis=1)
    tokens = jnp.take_along_axis(flat(sequences), chosen, axis=1)
    counts = jnp.take_along_axis(c_count, chosen, axis=1)
    pad = size - 1 - keep_n
    root_count = valid[:, :, 0].sum(axis=1).astype(jnp.int32)
    cat = lambda first_, rest, fill: jnp.concatenate(  # noqa: E731
        [first_[:, None], rest, jnp.full((b, pad), fill, rest.dtype)], axis=1
    )
    return (
        cat(root.astype(jnp.int32), tokens.astype(jnp.int32), 0),
        cat(jnp.full((b,), -1, jnp.int32), jnp.where(chosen_ok, parent, -1).astype(jnp.int32), -1),
        cat(jnp.ones((b,), bool), chosen_ok, False),
        cat(root_count, jnp.where(chosen_ok, counts, 0), 0),
    )


def fuse_trees(
    tokens: jax.Array,  # int32 [B, N]
    parent: jax.Array,  # int32 [B, N]
    valid: jax.Array,  # bool [B, N]
    extra_tokens: jax.Array,  # int32 [B, E], node 0 the same root
    extra_parent: jax.Array,  # int32 [B, E]
    extra_valid: jax.Array,  # bool [B, E]
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Fuse the extra tree into the base tree by longest-prefix matching (RASD): each extra node
    whose root path is already in the tree maps onto that node; the rest are appended, after their
    parents. Returns tokens, parent, valid `[B, N + E - 1]` (appended nodes after the base's N, in
    the extra tree's order; the unused tail invalid) and `mapped` int32 `[B, E]`, the fused index of
    each extra node (-1 if invalid). Base nodes keep their indices."""
    b, n = tokens.shape
    e = extra_tokens.shape[1]
    total = n + e - 1
    pad = lambda x, fill: jnp.concatenate([x, jnp.full((b, e - 1), fill, x.dtype)], axis=1)  # noqa: E731
    init = (
        pad(tokens.astype(jnp.int32), 0),
        pad(jnp.where(valid, parent, -1).astype(jnp.int32), -1),
        pad(valid, False),
        jnp.full((b, e), -1, jnp.int32).at[:, 0].set(0),
        jnp.full((b,), n, jnp.int32),  # next free index per row
    )
    rows = jnp.arange(b)
    slots = jnp.arange(total)[None, :]

    def add(i, carry):
        f_tokens, f_parent, f_valid, mapped, free = carry
        p = jnp.take_along_axis(mapped, jnp.maximum(extra_parent[:, i], 0)[:, None], axis=1)[:, 0]
        ok = extra_valid[:, i] & (p >= 0)
        match = f_valid & (f_parent == p[:, None]) & (f_tokens == extra_tokens[:, i, None]) & (slots > 0)
        found = match.any(axis=1)
        target = jnp.where(found, jnp.argmax(match, axis=1), free).astype(jnp.int32)
        append = ok & ~found
        write = jnp.where(append, target, total)  # out of range: dropped
        f_tokens = f_tokens.at[rows, write].set(extra_tokens[:, i], mode="drop")
        f_parent = f_parent.at[rows, write].set(p, mode="drop")
        f_valid = f_valid.at[rows, write].set(True, mode="drop")
        mapped = mapped.at[:, i].set(jnp.where(ok, target, -1))
        return f_tokens, f_parent, f_valid, mapped, free + append.astype(jnp.int32)

    f_tokens, f_parent, f_valid, mapped, _ = jax.lax.fori_loop(1, e, add, init)
    return f_tokens, f_parent, f_valid, mapped
