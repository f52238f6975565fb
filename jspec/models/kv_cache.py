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


def new_slots(lengths: jax.Array, t: int) -> jax.Array:
    """Slots of T new tokens: `lengths[b] + i`, int32 `[B, T]`."""
    return lengths[:, None] + jnp.arange(t, dtype=jnp.int32)


def write_layer(buffer: jax.Array, layer: int, new: jax.Array, start: jax.Array) -> jax.Array:
    """Write `new [B, T, H, D]` into layer `layer` of `buffer [L, B, S, H, D]` at slots
    `start[b] ..` of each row (its committed length, or further into the uncommitted window).

    A scatter into the one cache buffer (no per-layer copy), which XLA performs in place inside a
    while_loop. Slots past S are dropped rather than clamped, so an undersized cache can never
    shift entries onto committed ones.
    """
    b, t = new.shape[:2]
    rows = jnp.arange(b)[:, None]
    return scatter_set(buffer, (layer, rows, new_slots(start, t)), new.astype(buffer.dtype))


def scatter_set(buffer: jax.Array, index: tuple, values: jax.Array) -> jax.Array:
    """`buffer.at[index].set(values, mode="drop")`, with a 16-bit float buffer scattered as its
    integer bits: XLA's CPU backend scatters bfloat16/float16 by converting the whole buffer to
    float32 and back (the whole cache, every layer of every pass), integers in place."""
    if jnp.issubdtype(buffer.dtype, jnp.floating) and buffer.dtype.itemsize == 2:
        bits = jax.lax.bitcast_convert_type(buffer, jnp.uint16)
        bits = bits.at[index].set(jax.lax.bitcast_convert_type(values, jnp.uint16), mode="drop")
        return jax.lax.bitcast_convert_type(bits, buffer.dtype)
    return buffer.at[index].set(values, mode="drop")


def commit(cache: KVCache, n: jax.Array) -> KVCache:
    """Keep the first `n[b]` new tokens of each row (int32 `[B]`): lengths += n."""
    return dataclasses.replace(cache, lengths=cache.lengths + n.astype(jnp.int32))


def commit_path(cache: KVCache, path: jax.Array, path_length: jax.Array) -> KVCache:
    """Keep an accepted path of new tokens.

    path: int32 `[B, P]`, indices into the last forward pass's new tokens (increasing along the
    path, as a tree's parents precede their children); entries past `path_length[b]` are ignored.
    path_length: int32 `[B]`. The entries at `lengths + path[:, i]` move to `lengths + i`.
    """
    b, p = path.shape
    rows = jnp.arange(b)[:, None]
    source = cache.lengths[:, None] + jnp.clip(path, 0, None)  # [B, P]
    keep = jnp.arange(p)[None, :] < path_length[:, None]
    dest = jnp.where(keep, new_slots(cache.lengths, p), cache.size)  # slot S: dropped

    def move(buffer):  # [L, B, S, H, D]; all gathers happen before any write
        return scatter_set(buffer, (slice(None), rows, dest), buffer[:, rows, source])

    return KVCache(
        keys=move(cache.keys),
        values=move(cache.values),
        lengths=cache.lengths + path_length.astype(jnp.int32),
    )


def truncate(cache: KVCache, lengths: jax.Array) -> KVCache:
    """Set the committed length of each row to `lengths [B]` (<= current), dropping what lies past it."""
    return dataclasses.replace(cache, lengths=lengths.astype(jnp.int32))
