"""How jspec models, KV caches and batches are laid out on a `jax.sharding.Mesh` ('data', 'model').

The layout is Megatron-style tensor parallelism over 'model' plus data parallelism over 'data':

- attention heads and MLP hidden units are split over 'model': the q/k/v/gate/up kernels
  `[d_model, out]` on their output dimension, the o/down kernels `[in, d_model]` on their input
  dimension (so each layer needs one all-reduce after o_proj and one after down_proj);
- the vocabulary is split over 'model': embedding `[V, d_model]` on V, lm_head `[d_model, V]` on V
  (logits come out vocabulary-parallel);
- norms, position embeddings, the trimmed head's token map, and any parameter these rules do not
  know (a new optional norm, say) are replicated;
- the batch is split over 'data': prompts `[B, P]`, lengths `[B]`, and the KV cache
  `[L, B, S, H_kv, D]` on B, with its KV heads H_kv over 'model'.

A dimension that the axis size does not divide is replicated instead (e.g. k/v projections and
the cache's H_kv when `n_kv_heads % model != 0`, or the batch when `B % data != 0`), and an axis
the mesh lacks is treated as size 1, so every mesh and every model gets a valid layout. These
functions only choose `PartitionSpec`s and call `jax.device_put`; XLA's SPMD partitioner inserts
the collectives. Sharding changes where the arithmetic runs, not what it computes, up to the
summation order of the all-reduces (last-bit differences in the logits).

Use (see docs/sharding.md):

    mesh = jspec.sharding.make_mesh(data=4, model=2)
    target = jspec.sharding.shard_model(target, mesh)
    prompts, lengths = jspec.sharding.shard_batch((prompts, lengths), mesh)
    with jax.set_mesh(mesh):  # the decode loop constrains its KV caches to `cache_partition_spec`
        out = jspec.generate(target, prompts, prompt_lengths=lengths, max_new_tokens=64)
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from jspec.models import KVCache, ModelConfig

DATA = "data"  # mesh axis of the batch
MODEL = "model"  # mesh axis of heads, MLP hidden units and the vocabulary

# Linear layers whose output dimension is split (column-parallel) and whose input is (row-parallel).
_COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW_PARALLEL = ("o_proj", "down_proj")


def make_mesh(data: int, model: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `data x model` mesh with axes ('data', 'model') over `devices` (default `jax.devices()`,
    all processes' devices in a multi-host run), laid out by `jax.make_mesh` for the topology.

    The axes are `AxisType.Auto`: the partitioner propagates shardings from the inputs and the
    constraints jspec places, and the decode code needs no sharding annotations of its own.
    """
    for name, value in (("data", data), ("model", model)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    devices = list(jax.devices() if devices is None else devices)
    if data * model != len(devices):
        raise ValueError(f"data * model = {data * model} must equal the number of devices, {len(devices)}")
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def _split(mesh: Mesh | AbstractMesh, axis: str, size: int, *, also: int | None = None) -> str | None:
    """`axis` if the mesh has it (size > 1) and its size divides `size` (and `also`, a head count); else None."""
    n = dict(mesh.shape).get(axis, 1)
    if n == 1 or size % n or (also is not None and also % n):
        return None
    return axis


def _names(path) -> tuple[str, ...]:
    """A parameter path (`nnx` state path or jax key path) as strings: ('blocks', '0', 'attn', ...)."""
    out = []
    for key in path:
        for attr in ("key", "name", "idx"):  # jax.tree_util DictKey / GetAttrKey / SequenceKey
            if hasattr(key, attr):
                key = getattr(key, attr)
                break
        out.append(str(key))
    if out and out[-1] == "value":  # the Variable's own leaf in a jax key path
        out.pop()
    return tuple(out)


def _heads(config: ModelConfig | None, layer: str) -> int | None:
    """Heads whose dimension a projection's split dimension packs ([heads * head_dim])."""
    if config is None:
        return None
    if layer in ("q_proj", "o_proj"):
        return config.n_heads
    if layer in ("k_proj", "v_proj"):
        return config.n_kv_heads
    return None


def param_partition_spec(
    path: Sequence[Any], shape: Sequence[int], mesh: Mesh | AbstractMesh, config: ModelConfig | None = None
) -> PartitionSpec:
    """The `PartitionSpec` of one `jspec.models.Transformer` variable.

    path: its path in `nnx.state(model)`, e.g. ('blocks', 0, 'attn', 'q_proj', 'kernel');
    shape: its shape; mesh: a `Mesh` or `AbstractMesh` (only its axis names and sizes are read).
    config: the model's config; with it, attention projections are split only when the mesh's
    'model' size divides the head count (`n_heads` for q/o, `n_kv_heads` for k/v), so a shard
    always holds whole heads. Without it only the dimension itself must divide.

    q/k/v/gate/up kernel `[d_model, out]` -> (None, 'model'), their bias `[out]` -> ('model',);
    o/down kernel `[in, d_model]` -> ('model', None), their bias replicated;
    embed.embedding `[V, d_model]` -> ('model', None); lm_head.kernel `[d_model, V]` -> (None, 'model');
    everything else (norms, position_embed, head_token_ids, unknown variables) replicated, as is
    any dimension that does not divide. Never raises for an unknown path.
    """
    names = _names(path)
    shape = tuple(shape)
    layer, leaf = (names[-2], names[-1]) if len(names) >= 2 else ("", names[-1] if names else "")
    replicated = PartitionSpec()
    if layer in _COLUMN_PARALLEL and leaf == "kernel" and len(shape) == 2:
        return PartitionSpec(None, _split(mesh, MODEL, shape[1], also=_heads(config, layer)))
    if layer in _COLUMN_PARALLEL and leaf == "bias" and len(shape) == 1:
        return PartitionSpec(_split(mesh, MODEL, shape[0], also=_heads(config, layer)))
    if layer in _ROW_PARALLEL and leaf == "kernel" and len(shape) == 2:
        return PartitionSpec(_split(mesh, MODEL, shape[0], also=_heads(config, layer)), None)
    if names == ("embed", "embedding") and len(shape) == 2:
        return PartitionSpec(_split(mesh, MODEL, shape[0]), None)
    if names == ("lm_head", "kernel") and len(shape) == 2:
        return PartitionSpec(None, _split(mesh, MODEL, shape[1]))
    return replicated


def model_shardings(model: nnx.Module, mesh: Mesh) -> nnx.State:
    """`nnx.state(model)` with each variable's value replaced by its `NamedSharding` (the rules of
    `param_partition_spec`): a pytree to pass to `jax.device_put`, `jax.jit(out_shardings=...)` or an
    Orbax restore, so that a large checkpoint loads straight into its shards."""
    config = getattr(model, "config", None)
    config = config if isinstance(config, ModelConfig) else None
    flat = nnx.to_flat_state(nnx.state(model))
    return nnx.from_flat_state(
        [
            (path, var.replace(value=NamedSharding(mesh, param_partition_spec(path, var.get_value().shape, mesh, config))))
            for path, var in flat
        ]
    )


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place every variable of `model` on `mesh` with its `NamedSharding` (`jax.device_put`); the
    model is updated in place and returned. Pass it to `jspec.generate` / `speculative_generate` as usual."""
    shardings = model_shardings(model, mesh)
    nnx.update(model, jax.device_put(nnx.state(model), shardings))
    return model


def batch_partition_spec(shape: Sequence[int], mesh: Mesh | AbstractMesh) -> PartitionSpec:
    """`[B, ...]` arrays (prompts `[B, P]`, lengths `[B]`): B over 'data' (replicated if it does not divide)."""
    shape = tuple(shape)
    if not shape:
        return PartitionSpec()
    return PartitionSpec(_split(mesh, DATA, shape[0]), *([None] * (len(shape) - 1)))


def shard_batch(x, mesh: Mesh):
    """`jax.device_put` an array or a pytree of arrays with leading batch dimension onto `mesh`,
    B over 'data'. Every process must pass the same global batch; for per-host shards of the
    batch build the arrays with `jax.make_array_from_process_local_data` (docs/sharding.md)."""
    return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, batch_partition_spec(a.shape, mesh))), x)


def cache_partition_spec(shape: Sequence[int], mesh: Mesh | AbstractMesh) -> PartitionSpec:
    """KV cache keys/values `[L, B, S, H_kv, D]`: B over 'data', H_kv over 'model' (each dimension
    replicated where the axis size does not divide it, e.g. H_kv when `n_kv_heads % model != 0`)."""
    if len(shape) != 5:
        raise ValueError(f"shape must be a KV cache's [L, B, S, H_kv, D], got {tuple(shape)}")
    _, b, _, h_kv, _ = shape
    return PartitionSpec(None, _split(mesh, DATA, b), None, _split(mesh, MODEL, h_kv), None)


def ssm_partition_spec(shape: Sequence[int], mesh: Mesh | AbstractMesh) -> PartitionSpec:
    """A Mamba-2 cache buffer `[Lm, B, ...]`: B over 'data', the rest replicated."""
    return PartitionSpec(None, *batch_partition_spec(tuple(shape)[1:], mesh))


def cache_shardings(cache: KVCache, mesh: Mesh) -> KVCache:
    """A `KVCache` of `NamedSharding`s for `cache` (keys/values by `cache_partition_spec`, lengths by
    batch, Mamba-2 buffers by `ssm_partition_spec`)."""
    kv = NamedSharding(mesh, cache_partition_spec(cache.keys.shape, mesh))
    ssm = None if cache.ssm is None else jax.tree.map(lambda a: NamedSharding(mesh, ssm_partition_spec(a.shape, mesh)), cache.ssm)
    lengths = NamedSharding(mesh, batch_partition_spec(cache.lengths.shape, mesh))
    return KVCache(keys=kv, values=kv, lengths=lengths, ssm=ssm, dtype=cache.dtype, spare=cache.spare)


def constrain_cache(cache: KVCache) -> KVCache:
    """Inside a traced function, `jax.lax.with_sharding_constraint` the cache to the layout above
    on the ambient mesh (`jax.set_mesh`). Without an ambient mesh: `cache` itself, no op added.

    The cache is the largest array a decode loop carries, and it is created inside the jitted
    program (`jspec.decode.prefill`), so no input fixes its layout: this constraint is what keeps
    it split over the devices whatever the partitioner's propagation would choose.

    The mesh's 'data' / 'model' axes must be `AxisType.Auto` (as `make_mesh` builds them): the
    models carry no explicit-sharding annotations, so an `Explicit` axis raises a ValueError.
    Inside `shard_map` (a `Manual` axis) the caller owns the layout and the cache is left alone.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return cache
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    if any(types.get(axis) == AxisType.Explicit for axis in (DATA, MODEL)):
        raise ValueError(
            f"mesh: jspec decoding needs AxisType.Auto mesh axes, got axis_types {mesh.axis_types} for "
            f"{mesh.axis_names} (jax.make_mesh defaults to Explicit); build it with jspec.sharding.make_mesh "
            "or jax.make_mesh(..., axis_types=(AxisType.Auto, AxisType.Auto))"
        )
    if any(t == AxisType.Manual for t in mesh.axis_types):
        return cache
    return jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh))
