"""The KV cache: an explicit pytree, and the pure functions that allocate and commit it.

A forward pass writes the keys/values of its T new tokens at slots `lengths[b] .. lengths[b]+T-1`
of each row but does not move `lengths`. Committing is a separate step: `commit` keeps the first n
new tokens of each row, `commit_path` keeps an arbitrary accepted path (a tree's root-to-node path)
by gathering its entries into consecutive slots. Rejected entries are never cleared: they lie past
`lengths` and are overwritten by the next forward pass.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jspec.models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """keys, values: `[L, B, S, H_kv, D]`; lengths: int32 `[B]`, committed tokens per row."""

    keys: jax.Array
    values: jax.Array
    lengths: jax.Array

    @property
    def size(self) -> int:
        """Slots per row (S)."""
        return self.keys.shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]


def init_cache(config: ModelConfig, batch_size: int, size: int, dtype=None) -> KVCache:
    """An empty cache of `size` slots per row (all `lengths` zero)."""
    shape = (config.n_layers, batch_size, size, config.n_kv_heads, config.resolved_head_dim)
    dtype = jnp.dtype(dtype or config.dtype)
    return KVCache(
        keys=jnp.zeros(shape, dtype),
        values=jnp.zeros(shape, dtype),
        lengths=jnp.zeros((batch_size,), jnp.int32),
    )


def write_new(buffer: jax.Array, new: jax.Array, lengths: jax.Array) -> jax.Array:
    """Write `new [B, T, ...]` into `buffer [B, S, ...]` at slot `lengths[b]` of each row."""

    def write_row(row, update, start):
        starts = (start,) + (0,) * (row.ndim - 1)
        return jax.lax.dynamic_update_slice(row, update.astype(row.dtype), starts)

    return jax.vmap(write_row)(buffer, new, lengths)


def commit(cache: KVCache, n: jax.Array) -> KVCache:
    """Keep the first `n[b]` new tokens of each row (int32 `[B]`): lengths += n."""
    return dataclasses.replace(cache, lengths=cache.lengths + n.astype(jnp.int32))


def commit_path(cache: KVCache, path: jax.Array, path_length: jax.Array) -> KVCache:
    """Keep an accepted path of new tokens.

    path: int32 `[B, P]`, indices into the last forward pass's new tokens (increasing along the
    path, as a tree's parents precede their children); entries past `path_length[b]` are ignored.
    path_length: int32 `[B]`. The entries at `lengths + path[:, i]` move to `lengths + i`.
    """
    p = path.shape[1]
    slots = cache.lengths[:, None] + jnp.clip(path, 0, None)  # [B, P]
    slots = jnp.minimum(slots, cache.size - 1)

    def move(buffer):  # [L, B, S, H, D]
        gathered = jnp.take_along_axis(buffer, slots[None, :, :, None, None], axis=2)  # [L, B, P, H, D]
        keep = (jnp.arange(p)[None, :] < path_length[:, None])[None, :, :, None, None]
        current = jax.vmap(lambda row, start: jax.lax.dynamic_slice_in_dim(row, start, p, axis=1), in_axes=(1, 0), out_axes=1)(
            buffer, cache.lengths
        )
        update = jnp.where(keep, gathered, current)
        return jax.vmap(
            lambda row, upd, start: jax.lax.dynamic_update_slice_in_dim(row, upd, start, axis=1),
            in_axes=(1, 1, 0),
            out_axes=1,
        )(buffer, update, cache.lengths)

    return KVCache(
        keys=move(cache.keys),
        values=move(cache.values),
        lengths=cache.lengths + path_length.astype(jnp.int32),
    )


def truncate(cache: KVCache, lengths: jax.Array) -> KVCache:
    """Set the committed length of each row to `lengths [B]` (<= current), dropping what lies past it."""
    return dataclasses.replace(cache, lengths=lengths.astype(jnp.int32))
