"""Wall-clock timing with the compile excluded, and the per-pass costs behind the speedup model.

Every timed call is preceded by one untimed call of the same shapes, which compiles it, and is
closed by `jax.block_until_ready`, since JAX dispatches asynchronously.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jspec.analysis import speedup_from_costs
from jspec.decode import prefill
from jspec.drafters import Accepted, Prefill, as_drafter, prefill_model
from jspec.models import KVCache, Transformer, causal_mask
from jspec.sampling import Sampling
from jspec.trees import Tree, tree_ancestor_mask


def time_calls(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Call fn once untimed (compile), then `repeats` times timed. Returns the seconds of each
    timed call and the last result."""
    result = jax.block_until_ready(fn())
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = jax.block_until_ready(fn())
        seconds.append(time.perf_counter() - start)
    return seconds, result


@functools.partial(jax.jit, static_argnames=("graph", "cache_size"))
def prefill_cache(graph, state, prompts: jax.Array, cache_size: int) -> KVCache:
    """The cache of a model (`nnx.split` as graph, state) after full-length `prompts` `[B, P]`."""
    model = nnx.merge(graph, state)
    lengths = jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32)
    return prefill(model, prompts, lengths, cache_size)[1]


# Timing one pass per call would add the dispatch overhead of a call (about a third of a small
# model's pass on CPU) that the decode loop, one compiled program, never pays. So the passes run
# inside one compiled loop, as they do when decoding. Each pass feeds its argmax to the next, which
# keeps the lm_head live (as sampling does), and the cache is carried and donated so that XLA
# writes the new keys/values in place instead of copying the whole cache.
@functools.partial(jax.jit, static_argnames=("graph", "passes"), donate_argnames=("cache",))
def _forward_loop(graph, state, tokens: jax.Array, cache: KVCache, passes: int, mask, depth) -> tuple[jax.Array, KVCache]:
    model = nnx.merge(graph, state)
    # The cache is never committed, so every pass scores the same positions.
    positions = cache.lengths[:, None] + depth

    def body(_, carry):
        tokens, cache = carry
        logits, cache = model(tokens, positions, mask, cache)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

    return jax.lax.fori_loop(0, passes, body, (tokens, cache))


def forward_seconds(
    model: Transformer,
    prompts: jax.Array,
    cache_size: int,
    n_new: int,
    *,
    passes: int = 32,
    runs: int = 7,
    tree: Tree | None = None,
) -> float:
    """Seconds of one forward pass of `model` over n_new tokens per row, after `prompts` `[B, P]`
    were prefilled into a cache of cache_size slots: the median over `runs` compiled loops of
    `passes` passes each, divided by `passes`. The n_new tokens form a chain (a causal mask), or
    with `tree` (n_new nodes) that token tree (its ancestor mask and depths)."""
    graph, state = nnx.split(model)
    cache = prefill_cache(graph, state, prompts, cache_size)
    b = prompts.shape[0]
    tokens = jnp.zeros((b, n_new), jnp.int32)
    if tree is None:
        mask, depth = causal_mask(b, n_new), jnp.broadcast_to(jnp.arange(n_new), (b, n_new))
    else:
        if tree.size != n_new:
            raise ValueError(f"tree has {tree.size} nodes, n_new is {n_new}")
        mask, depth = tree_ancestor_mask(tree), tree.depth

    def loop() -> jax.Array:
        nonlocal cache
        tokens_out, cache = _forward_loop(graph, state, tokens, cache, passes, mask, depth)
        return tokens_out

    seconds, _ = time_calls(loop, runs)
    return statistics.median(seconds) / passes


@functools.partial(jax.jit, static_argnames=("graph", "target_graph", "cache_size", "width"))
def _draft_prefill(graph, state, target_graph, target_state, prompts: jax.Array, cache_size: int, width: int):
    """The drafter's state after `prompts` (the target's prefill gives the features it reads)."""
    drafter = as_drafter(nnx.merge(graph, state))
    target = nnx.merge(target_graph, target_state)
    lengths = jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32)
    _, cache, features = prefill_model(target, prompts, lengths, cache_size, drafter.feature_layers)
    return drafter.prefill(Prefill(prompts, lengths, cache, features), prompts[:, -1], width)


@functools.partial(jax.jit, static_argnames=("graph", "strategy", "sampling", "passes"), donate_argnames=("drafter_state",))
def _draft_loop(graph, state, drafter_state, last: jax.Array, features, key: jax.Array, strategy, sampling, passes: int):
    drafter = as_drafter(nnx.merge(graph, state))
    inactive = jnp.zeros(last.shape, bool)
    width = strategy.tokens_per_round

    def body(i, carry):
        drafter_state, last = carry
        drafted = strategy.draft(drafter, drafter_state, last, sampling, jax.random.fold_in(key, i))
        # Feed a token back (and touch the distributions) so no drafting work is dead code; an
        # inactive commit hands back the state as it was before the round (the protocol's rule).
        tokens, probs = drafted.tree.tokens, drafted.draft_probs
        nxt = tokens[:, -1] + (probs[:, -1, 0] > 2).astype(jnp.int32)
        accepted = Accepted(
            tokens=tokens[:, :width], slots=drafted.slot[:, :width], accepted=jnp.zeros_like(last), next_token=nxt,
            features=features, active=inactive,
        )  # fmt: skip
        return drafter.commit(drafted.state, accepted), nxt

    return jax.lax.fori_loop(0, passes, body, (drafter_state, last))


def draft_round_seconds(
    strategy,
    drafter,
    prompts: jax.Array,
    cache_size: int,
    sampling: Sampling,
    *,
    target: Transformer | None = None,
    passes: int = 16,
    runs: int = 5,
) -> float:
    """Seconds the drafter spends per round of `strategy` (any strategy of the protocol): its
    catch-up and every drafting call, after `prompts` were prefilled (outside the timing); median
    over `runs` compiled loops of `passes` rounds each, divided by `passes`. `target` gives the
    features a feature-level drafter reads (an EAGLE head needs it)."""
    graph, state = nnx.split(drafter)
    layers = as_drafter(drafter).feature_layers  # the features a commit hands over (their values do not matter)
    if layers and target is None:
        raise ValueError(f"target is needed to time a drafter that reads target features {layers}")
    # Only a feature-level drafter needs the target's prefill; a language model prefills itself.
    target_graph, target_state = nnx.split(target if layers else drafter)
    drafter_state = _draft_prefill(graph, state, target_graph, target_state, prompts, cache_size, strategy.tokens_per_round)
    last = prompts[:, -1]
    features = None
    if layers:
        shape = (prompts.shape[0], strategy.tokens_per_round, len(layers), target.config.d_model)
        features = jnp.zeros(shape, jnp.float32)
    key = jax.random.key(0)

    def loop():
        nonlocal drafter_state
        drafter_state, out = _draft_loop(graph, state, drafter_state, last, features, key, strategy, sampling, passes)
        return out

    seconds, _ = time_calls(loop, runs)
    return statistics.median(seconds) / passes


def theoretical_round_speedup(tau: float, t_target_1: float, t_verify: float, t_draft_round: float) -> float:
    """Speedup over autoregressive decoding predicted from measured costs, for any strategy: a round
    emits tau tokens for its drafting (t_draft_round) and one target pass over the N tokens it
    scores (t_verify = t_target(N)); AR pays t_target(1) per token. Overheads (verification,
    sampling, the loop) are left out, so achieved/theoretical < 1 measures them.
    `jspec.analysis.speedup_from_costs` is the formula."""
    return speedup_from_costs(tau, t_draft_round, t_verify, t_target_1)
