"""Parallel drafting on 2 simulated CPU devices: run by tests/test_parallel.py in a subprocess.

JAX fixes its device count when the backend starts, so this script runs in its own process with
`XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu`. It checks that
`jspec.parallel.place` puts each model's weights on its own device, that inside the program each
device's copy of the other model's cache is zeros (the real one lives on the other device), that
`parallel_generate` with `SSD` equals greedy `jspec.generate` token for token and equals
`speculative_generate` with the same strategy and key at T=1, and that the first 3 tokens
follow the target's law at T=1 (chi-square, with the negative control of test_ssd). Each failure
raises an AssertionError saying what differed; success prints `PARALLEL DECODE OK`.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_decode import PROMPT, _exact_first3, _sample_codes
from test_ssd import LAW, law_pair

import jspec
from jspec.drafters import ModelDrafter, Prefill
from jspec.methods.ssd import SSD
from jspec.models import causal_mask, init_cache
from jspec.parallel import STAGE, PlacedStages, Placement, parallel_generate, place

from conftest import PLAIN_PROMPTS, RAGGED_LENGTHS, TINY, chi_square_pvalue, perturbed, random_model


def check_weights_live_on_their_own_device(placed, target, drafter) -> None:
    mesh = placed.placement.mesh
    pairs = (("target", placed.target_state, target, 0), ("drafter", placed.drafter_state, drafter, 1))
    for name, stacked, model, stage in pairs:
        for got, want in zip(jax.tree.leaves(stacked), jax.tree.leaves(nnx.state(model))):
            assert got.sharding.spec == P(STAGE) and got.sharding.mesh == mesh, (name, got.sharding)
            for shard in got.addressable_shards:
                index = mesh.devices.tolist().index(shard.device)
                values = np.asarray(shard.data)[0]
                if index == stage:
                    np.testing.assert_array_equal(values, np.asarray(want), err_msg=f"{name}'s weights on its device")
                else:
                    assert not values.any(), f"{name}'s weights also on device {index}"


def check_caches_live_on_their_own_device(placed, prompts, lengths) -> None:
    """SSD.init inside the placed program, each device's local carry stacked: the target's cache is
    filled on stage 0 and zeros on stage 1, the drafter's the other way round."""
    strategy = SSD(k=2)

    def body(target_state, drafter_state, prompts, lengths):
        local = lambda state: jax.tree.map(lambda x: x[0], state)  # noqa: E731
        target = nnx.merge(placed.target_graph, local(target_state))
        drafter = ModelDrafter(nnx.merge(placed.drafter_graph, local(drafter_state)))
        stages = PlacedStages()
        b, p = prompts.shape
        positions = jnp.broadcast_to(jnp.arange(p), (b, p))
        cache = stages.on_target(lambda: target(prompts, positions, causal_mask(b, p), init_cache(target.config, b, 48))[1])
        carry = strategy.init(target, drafter, Prefill(prompts, lengths, cache, None), prompts[:, 0], jspec.Sampling(), stages)
        return jax.tree.map(lambda x: x[None], (carry.target_cache.keys, carry.drafter.cache.keys))

    specs = (P(STAGE), P(STAGE), P(), P())
    run = jax.jit(jax.shard_map(body, mesh=placed.placement.mesh, in_specs=specs, out_specs=P(STAGE), check_vma=False))
    target_keys, drafter_keys = run(placed.target_state, placed.drafter_state, prompts, lengths)
    target_keys, drafter_keys = np.asarray(target_keys), np.asarray(drafter_keys)
    assert target_keys[0].any() and not target_keys[1].any(), "the target's cache is not (only) on stage 0"
    assert drafter_keys[1].any() and not drafter_keys[0].any(), "the drafter's cache is not (only) on stage 1"


def main() -> None:
    assert len(jax.devices()) == 2, f"expected 2 simulated devices, got {jax.devices()}"
    placement = Placement.two_devices()
    target = random_model(TINY, seed=0)
    drafter = perturbed(target, 0.3, seed=1)
    placed = place(target, drafter, placement)
    check_weights_live_on_their_own_device(placed, target, drafter)
    prompts, lengths = jnp.asarray(PLAIN_PROMPTS), jnp.asarray(RAGGED_LENGTHS)
    check_caches_live_on_their_own_device(placed, prompts, jnp.full((3,), prompts.shape[1], jnp.int32))

    greedy = jspec.generate(target, prompts, prompt_lengths=lengths, max_new_tokens=20)
    for strategy in (SSD(k=3), jspec.PEARL(gamma=3)):
        parallel = parallel_generate(placed, prompts, prompt_lengths=lengths, max_new_tokens=20, strategy=strategy)
        message = f"{strategy} on 2 devices != greedy"
        np.testing.assert_array_equal(np.asarray(parallel.tokens), np.asarray(greedy.tokens), err_msg=message)
        np.testing.assert_array_equal(np.asarray(parallel.lengths), np.asarray(greedy.lengths))
        # At T=1 (T=0 is the greedy check above): the same key draws the same tokens and counts.
        sampling = jspec.Sampling(temperature=1.0)
        common = dict(prompt_lengths=lengths, max_new_tokens=20, strategy=strategy, sampling=sampling, rng=jax.random.key(5))
        one = jspec.speculative_generate(target, drafter, prompts, **common)
        two = parallel_generate(placed, prompts, **common)
        message = f"{strategy} on 2 devices != on 1 device, {sampling}"
        np.testing.assert_array_equal(np.asarray(two.tokens), np.asarray(one.tokens), err_msg=message)
        for name, counts in one.stats.strategy.items():
            np.testing.assert_array_equal(np.asarray(two.stats.strategy[name]), np.asarray(counts), err_msg=message)
        print(f"greedy {strategy} on 2 devices: {jax.tree.map(lambda x: np.asarray(x).tolist(), parallel.stats.strategy)}")

    small_target, small_drafter = law_pair()
    small = place(small_target, small_drafter, placement)
    sampling = jspec.Sampling(temperature=1.0)
    exact = _exact_first3(small_target, sampling)
    for strategy in (LAW, jspec.PEARL(gamma=2)):
        run = lambda p, key: parallel_generate(small, p, max_new_tokens=3, strategy=strategy, sampling=sampling, rng=key)  # noqa: E731
        codes = _sample_codes(run)
        pvalue = chi_square_pvalue(codes, exact)
        assert pvalue > 1e-3, f"{strategy}: first 3 tokens on 2 devices: chi-square p = {pvalue:.2e}"
        print(f"{strategy}: T=1 first-3-token law on 2 devices: p = {pvalue:.3f} ({len(codes)} samples, {PROMPT.tolist()})")
    check_parallel_bench()
    print("PARALLEL DECODE OK")


def check_parallel_bench() -> None:
    """`python -m infer.parallel_bench` runs on 2 devices and writes a record per method, with the
    SSD hit rate, PEARL's post-verify share and the analysis's predictions."""
    from infer import parallel_bench

    with tempfile.TemporaryDirectory() as tmp:
        questions = Path(tmp) / "q.jsonl"
        lines = [{"question_id": i, "category": c, "turns": [t]} for i, (c, t) in enumerate([("rag", "a b a b"), ("qa", "x y")])]
        questions.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        out = Path(tmp) / "p.json"
        records = parallel_bench.main(
            ["--target", "target", "--json", str(out), "--prompts-jsonl", str(questions), "--max-new-tokens", "6",
             "--temperatures", "0", "--k", "2", "--gamma", "2"]
        )  # fmt: skip
        assert json.loads(out.read_text()) == records
    names = [r["method"] for r in records]
    assert names == ["ar", "chain-k2", "ssd-k2-1dev", "ssd-k2-2dev", "pearl-g2-1dev", "pearl-g2-2dev"], names
    for r in records:
        assert set(r["by_category"]) == {"rag", "qa"} and r["tokens_per_s"] > 0, r
    by_name = {r["method"]: r for r in records}
    assert 0 <= by_name["ssd-k2-2dev"]["hit_rate"] <= 1 and 0 <= by_name["pearl-g2-2dev"]["post_verify_share"] <= 1
    assert all(by_name[n]["predicted_speedup"] > 0 for n in ("chain-k2", "ssd-k2-2dev", "pearl-g2-2dev"))
    print(f"parallel_bench: {names}")


if __name__ == "__main__":
    sys.exit(main())
