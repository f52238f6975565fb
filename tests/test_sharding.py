"""jspec.sharding: the layout rules (pure functions, in process) and sharded decoding on 8
simulated CPU devices (a subprocess, since this process's JAX already has one device)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import jspec
from jspec import sharding
from jspec.models import KVCache, ModelConfig, Transformer

from conftest import run_on_simulated_devices

MESH = AbstractMesh((4, 2), ("data", "model"))  # only axis names and sizes matter to the rules
CONFIG = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=256)


def spec(path, shape, mesh=MESH, config=CONFIG):
    return sharding.param_partition_spec(path, shape, mesh, config)


def test_split_rules_by_parameter_path():
    assert spec(("blocks", 0, "attn", "q_proj", "kernel"), (64, 64)) == P(None, "model")
    assert spec(("blocks", 1, "attn", "k_proj", "kernel"), (64, 32)) == P(None, "model")
    assert spec(("blocks", 1, "attn", "v_proj", "bias"), (32,)) == P("model")
    assert spec(("blocks", 0, "attn", "o_proj", "kernel"), (64, 64)) == P("model", None)
    assert spec(("blocks", 0, "attn", "o_proj", "bias"), (64,)) == P()  # added after the all-reduce
    assert spec(("blocks", 0, "mlp", "gate_proj", "kernel"), (64, 128)) == P(None, "model")
    assert spec(("blocks", 0, "mlp", "up_proj", "bias"), (128,)) == P("model")
    assert spec(("blocks", 0, "mlp", "down_proj", "kernel"), (128, 64)) == P("model", None)
    assert spec(("blocks", 0, "mlp", "down_proj", "bias"), (64,)) == P()
    assert spec(("embed", "embedding"), (512, 64)) == P("model", None)
    assert spec(("lm_head", "kernel"), (64, 512)) == P(None, "model")


def test_norms_positions_token_map_and_unknown_variables_are_replicated():
    for path, shape in [
        (("blocks", 0, "attn_norm", "scale"), (64,)),
        (("blocks", 0, "mlp_norm", "bias"), (64,)),
        (("blocks", 0, "attn", "q_norm", "scale"), (16,)),
        (("final_norm", "scale"), (64,)),
        (("position_embed", "embedding"), (256, 64)),
        (("head_token_ids",), (128,)),
        (("blocks", 0, "post_attn_norm", "scale"), (64,)),  # added by a newer model: replicated, no error
        (("blocks", 0, "attn", "sinks"), (4,)),
        (("some", "new", "kernel"), (64, 64)),
        ((), ()),
    ]:
        assert spec(path, shape) == P(), path


def test_dimensions_that_do_not_divide_are_replicated():
    mesh = AbstractMesh((2, 4), ("data", "model"))
    # n_kv_heads = 2 < 4 model shards: k/v stay whole (not split inside a head), q/o split by head.
    assert spec(("blocks", 0, "attn", "k_proj", "kernel"), (64, 32), mesh) == P(None, None)
    assert spec(("blocks", 0, "attn", "v_proj", "bias"), (32,), mesh) == P(None)
    assert spec(("blocks", 0, "attn", "q_proj", "kernel"), (64, 64), mesh) == P(None, "model")
    # Without the config only the dimension is checked (32 = 2 heads x 16 divides 4).
    assert spec(("blocks", 0, "attn", "k_proj", "kernel"), (64, 32), mesh, None) == P(None, "model")
    assert spec(("embed", "embedding"), (510, 64), mesh) == P(None, None)
    assert spec(("lm_head", "kernel"), (64, 510), mesh) == P(None, None)
    assert spec(("blocks", 0, "mlp", "up_proj", "kernel"), (64, 126), mesh) == P(None, None)
    assert sharding.cache_partition_spec((2, 8, 40, 2, 16), mesh) == P(None, "data", None, None, None)
    assert sharding.cache_partition_spec((2, 3, 40, 4, 16), mesh) == P(None, None, None, "model", None)
    assert sharding.batch_partition_spec((3, 12), mesh) == P(None, None)
    assert sharding.batch_partition_spec((8, 12), mesh) == P("data", None)
    assert sharding.batch_partition_spec((8,), mesh) == P("data")


def test_axes_missing_from_the_mesh_mean_no_split():
    data_only = AbstractMesh((8,), ("data",))
    assert spec(("blocks", 0, "attn", "q_proj", "kernel"), (64, 64), data_only) == P(None, None)
    assert sharding.cache_partition_spec((2, 8, 40, 2, 16), data_only) == P(None, "data", None, None, None)
    model_only = AbstractMesh((2,), ("model",))
    assert sharding.batch_partition_spec((8, 12), model_only) == P(None, None)
    assert spec(("blocks", 0, "mlp", "down_proj", "kernel"), (128, 64), model_only) == P("model", None)


def test_every_variable_of_every_architecture_gets_a_spec():
    """All the model switches at once: each variable gets a spec of its own rank, in-process on
    a 1-device mesh, and shard_model places (and keeps) the weights and the model's output."""
    config = ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=1,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        max_seq_len=32,
        tie_embeddings=False,
        qkv_bias=True,
        qk_norm=True,
        o_bias=True,
        mlp="gelu",
        norm="layer",
        positions="learned",
        post_norms=True,
        head_tokens=16,
    )
    model = Transformer(config, rngs=nnx.Rngs(0))
    for path, var in nnx.to_flat_state(nnx.state(model)):
        x = var.get_value()
        got = sharding.param_partition_spec(path, x.shape, MESH, config)
        assert len(got) <= x.ndim, (path, got)
    mesh = sharding.make_mesh(data=1, model=1)
    before = nnx.state(model)
    shardings = sharding.model_shardings(model, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(before)
    assert sharding.shard_model(model, mesh) is model
    after = nnx.state(model)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding.mesh == mesh
    prompts = np.arange(8, dtype=np.int32).reshape(2, 4)
    sharded = sharding.shard_batch(prompts, mesh)
    assert sharded.sharding.spec == P(None, None)  # an axis of size 1 splits nothing
    cache = jspec.models.init_cache(config, 2, 8)
    assert isinstance(sharding.cache_shardings(cache, mesh), KVCache)


def test_make_mesh_checks_its_arguments():
    with pytest.raises(ValueError, match="data"):
        sharding.make_mesh(data=0, model=1)
    with pytest.raises(ValueError, match="model"):
        sharding.make_mesh(data=1, model=True)
    with pytest.raises(ValueError, match="number of devices"):
        sharding.make_mesh(data=2, model=2, devices=jax.devices()[:1])
    mesh = sharding.make_mesh(1, 1)
    assert mesh.axis_names == ("data", "model")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_sharded_decoding_equals_unsharded_on_8_devices():
    """Greedy generate, Chain(k=3) and StaticTree((2, 1)) on a data=4 x model=2 mesh of simulated
    CPU devices match their unsharded outputs exactly, and the programs really are partitioned."""
    run_on_simulated_devices("sharded_decode_check.py", 8, "SHARDED DECODE OK", timeout=600)
