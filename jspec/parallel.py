"""Drafter and target on devices of their own: one compiled program per decode in which both work
at once (the placement parallel drafting needs: SSD, arXiv 2603.03251; PEARL, arXiv 2408.11850).

A `Placement` is a 1-D mesh over two devices, axis "stage": the target runs on stage 0, the
drafter on stage 1. `place(target, drafter)` lays each model's weights on its own device: every
weight becomes `[2, ...]`, sharded over "stage", holding the real values on its model's stage and
zeros on the other (an SPMD program gives every device equal shapes, so the other model's slot is
a zero copy that is never read). `parallel_generate` runs the whole decode, prefill and loop, in
one `jax.shard_map` over the mesh. Inside it a strategy places work with `Stages`:

    stages.on_target(fn, *args)    run fn on the target's device only (zeros elsewhere)
    stages.on_drafter(fn, *args)   run fn on the drafter's device only
    stages.share(tree)             what one stage computed, on both (a psum over "stage")

Work placed on the two stages between two `share`s has no data dependence, so the two devices run
it at the same time. Each device carries only its own model's cache for real: the target's cache
is zeros on the drafter's device and the drafter's on the target's, never read there.

`SEQUENTIAL` is the same interface on one device (both run in turn): a parallel strategy decodes
with `jspec.speculative_generate` too, as a reference and a fallback.

On CPU, test with simulated devices: set `XLA_FLAGS=--xla_force_host_platform_device_count=2`
before importing jax. On two GPUs or a TPU slice, `Placement.two_devices()` takes the first two
devices (docs/parallel.md).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

STAGE = "stage"  # the mesh axis: index 0 the target's device, 1 the drafter's
TARGET_STAGE, DRAFTER_STAGE = 0, 1


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the target (stage 0) and the drafter (stage 1) run: a 1-D mesh of two devices."""

    mesh: Mesh

    def __post_init__(self):
        if self.mesh.axis_names != (STAGE,) or self.mesh.devices.size != 2:
            raise ValueError(f"mesh must be 1-D over axis {STAGE!r} with 2 devices, got {self.mesh}")

    @classmethod
    def two_devices(cls, devices: Sequence[jax.Device] | None = None) -> Placement:
        """The target on devices[0], the drafter on devices[1] (default: the first two of `jax.devices()`)."""
        devices = list(jax.devices() if devices is None else devices)
        if len(devices) < 2:
            raise ValueError(
                f"devices must hold at least 2 devices (on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=2 "
                f"before importing jax), got {len(devices)}"
            )
        return cls(Mesh(np.asarray(devices[:2]), (STAGE,)))

    @property
    def target_device(self) -> jax.Device:
        return self.mesh.devices[TARGET_STAGE]

    @property
    def drafter_device(self) -> jax.Device:
        return self.mesh.devices[DRAFTER_STAGE]


def stack_on_stage(state: Any, stage: int, placement: Placement) -> Any:
    """Every leaf `[...]` of `state` as `[2, ...]`, its values at index `stage` and zeros at the
    other, sharded over "stage": each device holds one slice, so the values live on `stage`'s device."""
    sharding = NamedSharding(placement.mesh, P(STAGE))
    devices = list(placement.mesh.devices)

    def stack(x):
        x = jnp.asarray(x)
        slices = [x if i == stage else jnp.zeros_like(x) for i in range(2)]
        shards = [jax.device_put(s[None], d) for s, d in zip(slices, devices)]
        return jax.make_array_from_single_device_arrays((2,) + x.shape, sharding, shards)

    return jax.tree.map(stack, state)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PlacedModels:
    """The target's and the drafter's `nnx.split` graphs (static) and stacked states (`stack_on_stage`)."""

    target_graph: Any = dataclasses.field(metadata=dict(static=True))
    drafter_graph: Any = dataclasses.field(metadata=dict(static=True))
    target_state: Any
    drafter_state: Any
    placement: Placement = dataclasses.field(metadata=dict(static=True))


def place(target, drafter, placement: Placement) -> PlacedModels:
    """The target's weights on `placement.target_device`, the drafter's on `placement.drafter_device`
    (done once: `parallel_generate` takes the result, so no call moves weights)."""
    target_graph, target_state = nnx.split(target)
    drafter_graph, drafter_state = nnx.split(drafter)
    return PlacedModels(
        target_graph,
        drafter_graph,
        stack_on_stage(target_state, TARGET_STAGE, placement),
        stack_on_stage(drafter_state, DRAFTER_STAGE, placement),
        placement,
    )


def _zeros_like_output(fn: Callable, *args) -> Callable:
    shapes = jax.eval_shape(fn, *args)
    return lambda *_: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


class SequentialStages:
    """`Stages` on one device: work runs where it is called, in turn; nothing to share."""

    def on_target(self, fn: Callable, *args):
        return fn(*args)

    def on_drafter(self, fn: Callable, *args):
        return fn(*args)

    def share(self, tree):
        return tree


class PlacedStages:
    """`Stages` inside `parallel_generate`'s shard_map: a stage's work runs under `lax.cond` on its
    own device only (the other gets zeros of the same shapes), and `share` sums over "stage"."""

    def _on(self, stage: int, fn: Callable, *args):
        here = jax.lax.axis_index(STAGE) == stage
        return jax.lax.cond(here, fn, _zeros_like_output(fn, *args), *args)

    def on_target(self, fn: Callable, *args):
        return self._on(TARGET_STAGE, fn, *args)

    def on_drafter(self, fn: Callable, *args):
        return self._on(DRAFTER_STAGE, fn, *args)

    def share(self, tree):
        # Exactly the computing stage's values: the other adds zeros (bools travel as int32).
        def psum(x):
            if x.dtype == jnp.bool_:
                return jax.lax.psum(x.astype(jnp.int32), STAGE) > 0
            return jax.lax.psum(x, STAGE)

        return jax.tree.map(psum, tree)


SEQUENTIAL = SequentialStages()


def parallel_generate(
    placed: PlacedModels,
    prompts,
    *,
    max_new_tokens: int,
    strategy,
    sampling=None,
    rng: jax.Array | None = None,
    prompt_lengths=None,
    eos_id: int | None = None,
):
    """Speculative decoding with the target and the drafter each on its own device (`place`);
    same arguments and output as `jspec.speculative_generate`, for a strategy that places its work
    (`strategy.parallel`, e.g. `jspec.SSD`). The output equals `speculative_generate`'s with the
    same strategy and key: the placement changes where work runs, not what it computes."""
    from jspec.decode import _pad_width, _trim, bucket_size, check_strategy
    from jspec.sampling import Sampling
    from jspec.validation import check_budget, check_eos, check_prompts, check_rng

    sampling = Sampling() if sampling is None else sampling
    if not isinstance(placed, PlacedModels):
        raise ValueError(f"placed must be jspec.parallel.place(target, drafter, placement), got {type(placed).__name__}")
    check_strategy(strategy)
    if not getattr(strategy, "parallel", False):
        raise ValueError(f"strategy must place its work on the two devices (e.g. jspec.SSD), got {strategy!r}")
    strategy.check(sampling)
    target_config = _config(placed.target_graph, placed.target_state)
    prompts, prompt_lengths = check_prompts(prompts, prompt_lengths, target_config.vocab_size)
    check_budget("target", target_config, prompts.shape[1], max_new_tokens)
    eos = check_eos(eos_id, target_config.vocab_size)
    key = check_rng(rng, sampling.greedy)
    n = int(max_new_tokens)
    output = _parallel_decode(
        placed, _pad_width(prompts, bucket_size(prompts.shape[1])), prompt_lengths, key, jnp.int32(eos), jnp.int32(n),
        strategy=strategy, sampling=sampling, budget=bucket_size(n),
    )  # fmt: skip
    return _trim(output, n)


def _config(graph, state):
    return nnx.merge(graph, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), state)).config


@functools.partial(jax.jit, static_argnames=("strategy", "sampling", "budget"))
def _parallel_decode(placed: PlacedModels, prompts, prompt_lengths, key, eos_id, max_new_tokens, *, strategy, sampling, budget):
    from jspec.decode import decode_program

    def body(target_state, drafter_state, prompts, prompt_lengths, key, eos_id, max_new_tokens):
        local = lambda state: jax.tree.map(lambda x: x[0], state)  # noqa: E731  this device's slice
        target = nnx.merge(placed.target_graph, local(target_state))
        drafter = nnx.merge(placed.drafter_graph, local(drafter_state))
        return decode_program(
            target, drafter, prompts, prompt_lengths, key, eos_id, max_new_tokens,
            strategy=strategy, sampling=sampling, budget=budget, stages=PlacedStages(),
        )  # fmt: skip

    stacked, replicated = P(STAGE), P()
    run = jax.shard_map(
        body,
        mesh=placed.placement.mesh,
        in_specs=(stacked, stacked, replicated, replicated, replicated, replicated, replicated),
        out_specs=replicated,
        check_vma=False,  # outputs are equal on both devices by construction (every exchange is a psum)
    )
    return run(placed.target_state, placed.drafter_state, prompts, prompt_lengths, key, eos_id, max_new_tokens)
