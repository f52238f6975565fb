"""Sharded decoding on 8 simulated CPU devices: run by tests/test_sharding.py in a subprocess.

JAX fixes its device count when the backend starts, and the test process already has one CPU
device, so this script runs in its own process with
`XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu`. It checks, on a
data=4 x model=2 mesh with 8 ragged prompts, that greedy `jspec.generate`, `speculative_generate`
with `Chain(k=3)` and with `StaticTree(branching=(2, 1))` give exactly the unsharded output, and
that the work really is partitioned (parameter shards, the compiled program's per-device cache
shape and collectives, the cache constraint of `prefill`). Each failure raises an AssertionError
saying what differed; success prints `SHARDED DECODE OK`.
"""

from __future__ import annotations

import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jspec
from jspec import decode, sharding
from jspec.models import ModelConfig, Transformer
from jspec.models.kv_cache import SPARE_SLOTS
from jspec.rounds import Autoregressive

MAX_NEW = 16
CONFIG = ModelConfig(
    vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=256, tie_embeddings=False
)
DRAFTER_CONFIG = ModelConfig(**{**CONFIG.to_dict(), "n_layers": 1})
STRATEGIES = {"chain": jspec.Chain(k=3), "tree": jspec.StaticTree(branching=(2, 1))}


def models() -> tuple[Transformer, Transformer]:
    """A random target whose matrices are scaled up (varied, context-dependent greedy text, as in
    tests/conftest.py) and a 1-layer drafter cut from it (embedding, first block, head) plus
    noise, so that drafts are often but not always accepted."""
    graph, state = nnx.split(Transformer(CONFIG, rngs=nnx.Rngs(0)))
    target = nnx.merge(graph, jax.tree.map(lambda x: x * 5.0 if x.ndim == 2 else x, state))
    drafter = Transformer(DRAFTER_CONFIG, rngs=nnx.Rngs(1))
    source = dict(nnx.to_flat_state(nnx.state(target)))
    key = jax.random.key(2)
    flat = []
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(drafter))):
        x = source[path].get_value()
        flat.append((path, var.replace(value=x + 0.3 * x.std() * jax.random.normal(jax.random.fold_in(key, i), x.shape))))
    nnx.update(drafter, nnx.from_flat_state(flat))
    return target, drafter


def run_all(target, drafter, prompts, lengths) -> dict[str, jspec.Output]:
    kw = dict(prompt_lengths=lengths, max_new_tokens=MAX_NEW)
    return {
        "generate": jspec.generate(target, prompts, **kw),
        **{name: jspec.speculative_generate(target, drafter, prompts, strategy=s, **kw) for name, s in STRATEGIES.items()},
    }


def compiled_text(name, target, drafter, prompts, lengths) -> str:
    """HLO of the program the sharded call ran, after SPMD partitioning (shapes are per device).
    Same arguments as that call, so this reuses its compiled executable instead of compiling anew."""
    key, eos = jax.random.key(0), jnp.int32(-1)  # what generate passes for greedy decoding, no EOS
    limit, budget = jnp.int32(MAX_NEW), decode.bucket_size(MAX_NEW)
    prompts = decode._pad_width(prompts, decode.bucket_size(prompts.shape[1]))  # as generate buckets them
    tg, ts = nnx.split(target)
    if name == "generate":
        lowered = decode._decode.lower(
            tg,
            ts,
            None,
            None,
            prompts,
            lengths,
            key,
            eos,
            limit,
            strategy=Autoregressive(),
            sampling=jspec.Sampling(),
            budget=budget,
        )
    else:
        dg, ds = nnx.split(drafter)
        lowered = decode._decode.lower(
            tg,
            ts,
            dg,
            ds,
            prompts,
            lengths,
            key,
            eos,
            limit,
            strategy=STRATEGIES[name],
            sampling=jspec.Sampling(),
            budget=budget,
        )
    return lowered.compile().as_text()


def main() -> None:
    start = time.perf_counter()
    assert jax.device_count() == 8, f"expected 8 simulated CPU devices, got {jax.devices()}"
    target, drafter = models()
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, CONFIG.vocab_size, (8, 12)).astype(np.int32)
    lengths = np.array([12, 3, 7, 12, 1, 9, 5, 10], np.int32)

    expected = run_all(target, drafter, prompts, lengths)  # unsharded, on one device
    tau = float(expected["chain"].stats.mean_accepted)
    assert tau > 1.2, f"drafter accepts too little (tau {tau:.2f}) for the chain to exercise multi-token commits"

    mesh = sharding.make_mesh(data=4, model=2)
    sharding.shard_model(target, mesh)
    sharding.shard_model(drafter, mesh)
    specs = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(target))}
    want = {
        ("blocks", 0, "attn", "q_proj", "kernel"): (P(None, "model"), (64, 32)),
        ("blocks", 1, "attn", "k_proj", "kernel"): (P(None, "model"), (64, 16)),
        ("blocks", 0, "attn", "o_proj", "kernel"): (P("model", None), (32, 64)),
        ("blocks", 1, "mlp", "up_proj", "kernel"): (P(None, "model"), (64, 64)),
        ("blocks", 1, "mlp", "down_proj", "kernel"): (P("model", None), (64, 64)),
        ("embed", "embedding"): (P("model", None), (256, 64)),
        ("lm_head", "kernel"): (P(None, "model"), (64, 256)),
        ("final_norm", "scale"): (P(), (64,)),
    }
    for path, (spec, shard_shape) in want.items():
        x = specs[path]
        assert x.sharding.spec == spec, f"{path}: spec {x.sharding.spec}, expected {spec}"
        assert x.addressable_shards[0].data.shape == shard_shape, f"{path}: shard {x.addressable_shards[0].data.shape}"
        assert len(x.sharding.device_set) == 8, f"{path}: on {len(x.sharding.device_set)} devices"
    sharded_prompts, sharded_lengths = sharding.shard_batch((prompts, lengths), mesh)
    assert sharded_prompts.sharding.spec == P("data", None) and sharded_lengths.sharding.spec == P("data")
    assert sharded_prompts.addressable_shards[0].data.shape == (2, 12)

    with jax.set_mesh(mesh):
        got = run_all(target, drafter, sharded_prompts, sharded_lengths)
    for name, out in got.items():
        ref = expected[name]
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens), err_msg=f"{name}: tokens")
        np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(ref.lengths), err_msg=f"{name}: lengths")
        np.testing.assert_array_equal(
            np.asarray(out.stats.emitted_per_round), np.asarray(ref.stats.emitted_per_round), err_msg=f"{name}: rounds"
        )
        # The output comes back batch-split over 'data', as the inputs went in.
        assert out.tokens.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None)), 2), f"{name}: {out.tokens.sharding}"

    # The compiled programs are partitioned: each device holds a [L, B/4, S, H_kv/2, D] cache
    # (never the whole [L, 8, S, 2, D] one) and the model axis all-reduces the partial sums.
    for name in got:  # cache slots as decode sizes them: bucketed prompt and new tokens, one round's slack, 1,
        # and the cache's spare slots
        width, budget = decode.bucket_size(prompts.shape[1]), decode.bucket_size(MAX_NEW)
        s = width + budget + (STRATEGIES[name].tokens_scored if name in STRATEGIES else 1) + 1 + SPARE_SLOTS
        with jax.set_mesh(mesh):
            text = compiled_text(name, target, drafter, sharded_prompts, sharded_lengths)
        local, whole = f"f32[2,2,{s},1,16]", f"f32[2,8,{s},2,16]"
        assert local in text, f"{name}: no per-device cache {local} in the compiled program"
        assert whole not in text, f"{name}: the whole cache {whole} is materialised on a device"
        assert re.search(r"\ball-reduce(-start)?\(", text), f"{name}: no all-reduce in the compiled program"
        if name != "generate":  # the 1-layer drafter's cache, split the same way
            assert f"f32[1,2,{s},1,16]" in text, f"{name}: no per-device drafter cache"

    # `prefill` pins the cache it creates to the layout, even when nothing else is sharded
    # (replicated weights and prompts would otherwise give a replicated cache).
    @functools.partial(jax.jit, static_argnums=(0, 4))
    def run_prefill(graph, state, prompts, lengths, size):
        return decode.prefill(nnx.merge(graph, state), prompts, lengths, size)

    fresh = Transformer(CONFIG, rngs=nnx.Rngs(3))
    graph, state = nnx.split(fresh)
    replicated = NamedSharding(mesh, P())
    args = jax.device_put((state, prompts, lengths), replicated)
    with jax.set_mesh(mesh):
        _, cache = run_prefill(graph, *args, 32)
    assert cache.keys.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "data", None, "model", None)), 5), cache.keys.sharding
    assert cache.lengths.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 1), cache.lengths.sharding
    _, cache = run_prefill(graph, *args, 32)  # no ambient mesh: no constraint, the cache stays replicated
    assert cache.keys.sharding.is_fully_replicated, cache.keys.sharding

    # An Explicit-axes mesh (jax.make_mesh's default) is refused with a ValueError naming the mesh.
    explicit = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    try:
        with jax.set_mesh(explicit):
            jspec.generate(fresh, prompts, prompt_lengths=lengths, max_new_tokens=4)
    except ValueError as e:
        assert "mesh" in str(e) and "AxisType.Auto" in str(e), e
    else:
        raise AssertionError("an Explicit mesh was accepted")

    print(f"SHARDED DECODE OK (tau {tau:.2f}, {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
