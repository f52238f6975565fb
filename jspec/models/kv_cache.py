"""The model cache: an explicit pytree, and the pure functions that allocate and commit it.

A forward pass writes the keys/values of its T new tokens at slots `lengths[b] .. lengths[b]+T-1`
of each row but does not move `lengths`. Committing is a separate step: `commit` keeps the first n
new tokens of each row, `commit_path` keeps an arbitrary accepted path (a tree's root-to-node path)
by gathering its entries into consecutive slots. Rejected entries are never cleared: they lie past
`lengths` and are overwritten by the next forward pass.

Keys and values of a 16-bit float model are stored as their uint16 bits (`storage_dtype`): XLA's CPU
backend scatters a bfloat16/float16 buffer by converting all of it to float32 and back, and a
bitcast to integers around each scatter copies the whole buffer as well (on a 2-core Xeon, SmolLM2 in
bfloat16: four copies of the cache per AR step, eight per prompt-lookup round, about 10% of it).
Stored as bits, every write and commit is in place; only the layer read for attention is bitcast
back (`KVCache.layer`), which is free on accelerators.

A cache from `init_cache` also has `SPARE_SLOTS` slots past its S that no token reads: a pass over
that many tokens or fewer then writes each row with a `dynamic_update_slice`, cheaper than a
scatter on CPU, since whatever runs past S (where a scatter would drop it) lands there.

Mamba-2 layers (`SsmCache`) follow the same protocol. A pass writes, per new token's slot, the
convolution's input and the SSM's per-token terms (decay log a, input dt * x, and B), and leaves
the committed state (the state after `lengths` tokens) alone: a token tree is scored against that
state without one per-node state. Committing a path advances the state over the path's stored
terms, `h <- exp(sum log a) h + sum_j exp(sum of later log a) (dt x)_j B_j^T`: the state after the
accepted tokens, recomputed from the last committed state (the "rollback" is that a rejected
token never entered it). A committed state cannot move back, so `truncate` refuses SSM caches.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jspec.models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SsmCache:
    """The Mamba-2 layers' part of the cache (Lm layers, heads H of P dims, G groups of state N).

    conv: `[Lm, B, S, C]` each slot's convolution input (x, B, C before the convolution; a token's
    convolution reads its path's last few slots). Per slot, for the tokens not yet committed:
    log_decay `[Lm, B, S, H]` (dt * A, <= 0), x `[Lm, B, S, H, P]` (dt * x), b `[Lm, B, S, G, N]`.
    state: float32 `[Lm, B, H, P, N]`, the SSM state after each row's `lengths` committed tokens.
    """

    conv: jax.Array
    log_decay: jax.Array
    x: jax.Array
    b: jax.Array
    state: jax.Array


def storage_dtype(dtype) -> jnp.dtype:
    """The dtype cache buffers of `dtype` values are stored in: a 16-bit float as its uint16 bits,
    anything else as itself (see the module docstring)."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.uint16) if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2 else dtype


def to_storage(x: jax.Array, dtype) -> jax.Array:
    """`x` cast to `dtype`, in `storage_dtype(dtype)`."""
    x = x.astype(dtype)
    storage = storage_dtype(dtype)
    return x if x.dtype == storage else jax.lax.bitcast_convert_type(x, storage)


def from_storage(x: jax.Array, dtype) -> jax.Array:
    """The `dtype` values of a buffer stored in `storage_dtype(dtype)`."""
    dtype = jnp.dtype(dtype)
    return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """keys, values: `[La, B, S + spare, H_kv, D]` (La attention layers), values of `dtype` stored
    in `storage_dtype(dtype)` (read a layer with `layer`); lengths: int32 `[B]`, committed tokens
    per row; ssm: the Mamba-2 layers' `SsmCache`, None for attention-only models; dtype: the name of
    the keys' and values' dtype; spare: slots past the S a pass may write into but no token ever
    reads (`write_layer`); both static."""

    keys: jax.Array
    values: jax.Array
    lengths: jax.Array
    ssm: SsmCache | None = None
    dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))
    spare: int = dataclasses.field(default=0, metadata=dict(static=True))

    def layer(self, layer: int) -> tuple[jax.Array, jax.Array]:
        """Attention layer `layer`'s keys and values `[B, S, H_kv, D]`, in `dtype` (the spare
        slots left out)."""
        keys, values = (from_storage(x[layer, :, : self.size], self.dtype) for x in (self.keys, self.values))
        return keys, values

    @property
    def size(self) -> int:
        """Slots per row (S); the buffers hold `spare` more past them (`write_layer`)."""
        return self.keys.shape[2] - self.spare

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]


# Spare slots past the end of a cache: a pass over up to this many tokens writes its keys/values
# with one dynamic_update_slice per row instead of a scatter (`write_layer`).
SPARE_SLOTS = 16


def init_cache(config: ModelConfig, batch_size: int, size: int, dtype=None) -> KVCache:
    """An empty cache of `size` slots per row (all `lengths` zero, SSM states zero), with
    `SPARE_SLOTS` spare slots past them."""
    shape = (len(config.attention_layers), batch_size, size + SPARE_SLOTS, config.n_kv_heads, config.resolved_head_dim)
    dtype = jnp.dtype(dtype or config.dtype)
    ssm = None
    if config.mamba_layers:
        lead = (len(config.mamba_layers), batch_size)
        h, p, g, n = config.ssm_heads, config.ssm_head_dim, config.ssm_groups, config.ssm_state
        ssm = SsmCache(  # the SSM terms stay float32: the state sums many of them
            conv=jnp.zeros(lead + (size, config.ssm_conv_dim), dtype),
            log_decay=jnp.zeros(lead + (size, h), jnp.float32),
            x=jnp.zeros(lead + (size, h, p), jnp.float32),
            b=jnp.zeros(lead + (size, g, n), jnp.float32),
            state=jnp.zeros(lead + (h, p, n), jnp.float32),
        )
    return KVCache(
        keys=jnp.zeros(shape, storage_dtype(dtype)),
        values=jnp.zeros(shape, storage_dtype(dtype)),
        lengths=jnp.zeros((batch_size,), jnp.int32),
        ssm=ssm,
        dtype=dtype.name,
        spare=SPARE_SLOTS,
    )


def new_slots(lengths: jax.Array, t: int) -> jax.Array:
    """Slots of T new tokens: `lengths[b] + i`, int32 `[B, T]`."""
    return lengths[:, None] + jnp.arange(t, dtype=jnp.int32)


# Up to this many rows, a pass over at most `spare` tokens writes with one dynamic_update_slice per
# row: on a 2-core Xeon, SmolLM2 (bfloat16, batch 1, 768 cached tokens) passes over 2-8 tokens took
# 32.7-36.8 ms against 36.0-41.0 with one scatter; at 8 rows the two cost the same.
_ROW_SLICE_WRITES = 8


def write_layer(buffer: jax.Array, layer: int, new: jax.Array, start: jax.Array, spare: int = 0) -> jax.Array:
    """Write `new [B, T, H, D]` (in the buffer's dtype, or a 16-bit float into its uint16 bits)
    into layer `layer` of `buffer [L, B, S + spare, H, D]` at slots `start[b] ..` of each row (its
    committed length, or further into the uncommitted window).

    In place inside a while_loop (no per-layer copy). Slots past S are never read, and a write
    never shifts onto other slots below S: with T <= spare (and B small) a `dynamic_update_slice` per
    row writes them into the spare slots (where it clamps a start, the whole write lands there too);
    otherwise a scatter drops them.
    """
    b, t = new.shape[:2]
    if buffer.dtype == jnp.uint16 and new.dtype != jnp.uint16:
        new = jax.lax.bitcast_convert_type(new, jnp.uint16)
    new = new.astype(buffer.dtype)
    if t <= spare and b <= _ROW_SLICE_WRITES:
        for row in range(b):
            buffer = jax.lax.dynamic_update_slice(buffer, new[row][None, None], (layer, row, start[row], 0, 0))
        return buffer
    rows = jnp.arange(b)[:, None]
    return scatter_set(buffer, (layer, rows, new_slots(start, t)), new)


def scatter_set(buffer: jax.Array, index: tuple, values: jax.Array) -> jax.Array:
    """`buffer.at[index].set(values, mode="drop")`, with a 16-bit float buffer scattered as its
    integer bits: XLA's CPU backend scatters bfloat16/float16 by converting the whole buffer to
    float32 and back, integers in place (the bitcasts still copy the buffer: the KV cache avoids
    them by storing bits, `storage_dtype`; this is for the Mamba-2 convolution inputs)."""
    storage = storage_dtype(buffer.dtype)
    if storage != buffer.dtype:
        bits = to_storage(buffer, buffer.dtype).at[index].set(to_storage(values, buffer.dtype), mode="drop")
        return from_storage(bits, buffer.dtype)
    return buffer.at[index].set(values, mode="drop")


def commit(cache: KVCache, n: jax.Array, max_new: int | None = None) -> KVCache:
    """Keep the first `n[b]` new tokens of each row (int32 `[B]`): lengths += n.

    max_new: a static bound on n (the last pass's token count; n must not exceed it), which sizes
    the SSM state update; None: the cache size. Attention-only caches ignore it.
    """
    n = n.astype(jnp.int32)
    if cache.ssm is not None:
        steps = cache.size if max_new is None else max_new
        path = jnp.broadcast_to(jnp.arange(steps, dtype=jnp.int32), (cache.batch_size, steps))
        cache = dataclasses.replace(cache, ssm=advance_ssm(cache.ssm, cache.lengths[:, None] + path, n))
    return dataclasses.replace(cache, lengths=cache.lengths + n)


def advance_ssm(ssm: SsmCache, slots: jax.Array, n: jax.Array) -> SsmCache:
    """The SSM state after the tokens at `slots[:, :n]` (int32 `[B, P]`, a path in order; `n` int32
    `[B]`): h <- exp(sum_j log a_j) h + sum_j exp(sum_{k > j} log a_k) (dt x)_j B_j^T per head."""
    rows = jnp.arange(slots.shape[0])[:, None]
    keep = jnp.arange(slots.shape[1])[None, :] < n[:, None]  # [B, P]
    slots = jnp.clip(slots, 0, ssm.conv.shape[2] - 1)
    log_a = jnp.where(keep[None, :, :, None], ssm.log_decay[:, rows, slots], 0.0)  # [Lm, B, P, H]
    total = log_a.sum(axis=2)  # [Lm, B, H]
    after = total[:, :, None] - jnp.cumsum(log_a, axis=2)  # decay from each token to the path's end
    weight = jnp.where(keep[None, :, :, None], jnp.exp(after), 0.0)
    x, b = ssm.x[:, rows, slots], ssm.b[:, rows, slots]  # [Lm, B, P, H, P'], [Lm, B, P, G, N]
    h, g = x.shape[3], b.shape[3]
    b = jnp.repeat(b, h // g, axis=3)  # heads share their group's B
    update = jnp.einsum("lbth,lbthp,lbthn->lbhpn", weight, x, b)
    return dataclasses.replace(ssm, state=jnp.exp(total)[..., None, None] * ssm.state + update)


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
    dest = jnp.where(keep, new_slots(cache.lengths, p), cache.keys.shape[2])  # past the buffer: dropped

    def move(buffer):  # [L, B, S, ...]; all gathers happen before any write
        return scatter_set(buffer, (slice(None), rows, dest), buffer[:, rows, source])

    ssm = cache.ssm
    if ssm is not None:
        # The state advances over the path's own terms; the convolution inputs move like keys.
        ssm = advance_ssm(ssm, source, path_length.astype(jnp.int32))
        ssm = dataclasses.replace(ssm, conv=move(ssm.conv))
    return dataclasses.replace(
        cache, keys=move(cache.keys), values=move(cache.values), lengths=cache.lengths + path_length.astype(jnp.int32), ssm=ssm
    )


def truncate(cache: KVCache, lengths: jax.Array) -> KVCache:
    """Set the committed length of each row to `lengths [B]` (<= current), dropping what lies past it.

    Raises ValueError for a cache with Mamba-2 layers: their committed state cannot move back.
    """
    if cache.ssm is not None:
        raise ValueError("cache: a cache with Mamba-2 layers cannot be truncated (an SSM state does not rewind)")
    return dataclasses.replace(cache, lengths=lengths.astype(jnp.int32))
