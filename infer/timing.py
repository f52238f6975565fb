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
from jspec.chain import Chain, draft_chain
from jspec.decode import prefill
from jspec.models import KVCache, Transformer, causal_mask, truncate
from jspec.sampling import Sampling


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
def _prefill(graph, state, prompts: jax.Array, cache_size: int) -> KVCache:
    model = nnx.merge(graph, state)
    lengths = jnp.full((prompts.shape[0],), prompts.shape[1], jnp.int32)
    return prefill(model, prompts, lengths, cache_size)[1]


# Timing one pass per call would add the dispatch overhead of a call (about a third of a small
# model's pass on CPU) that the decode loop, one compiled program, never pays. So the passes run
# inside one compiled loop, as they do when decoding. Each pass feeds its argmax to the next, which
# keeps the lm_head live (as sampling does), and the cache is carried and donated so that XLA
# writes the new keys/values in place instead of copying the whole cache.
@functools.partial(jax.jit, static_argnames=("graph", "passes"), donate_argnames=("cache",))
def _forward_loop(graph, state, tokens: jax.Array, cache: KVCache, passes: int) -> tuple[jax.Array, KVCache]:
    model = nnx.merge(graph, state)
    b, t = tokens.shape
    # The cache is never committed, so every pass scores the same positions.
    positions = cache.lengths[:, None] + jnp.arange(t)
    mask = causal_mask(b, t)

    def body(_, carry):
        tokens, cache = carry
        logits, cache = model(tokens, positions, mask, cache)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

    return jax.lax.fori_loop(0, passes, body, (tokens, cache))


def forward_seconds(
    model: Transformer, prompts: jax.Array, cache_size: int, n_new: int, *, passes: int = 32, runs: int = 7
) -> float:
    """Seconds of one forward pass of `model` over n_new tokens per row, after `prompts` `[B, P]`
    were prefilled into a cache of cache_size slots: the median over `runs` compiled loops of
    `passes` passes each, divided by `passes`."""
    graph, state = nnx.split(model)
    cache = _prefill(graph, state, prompts, cache_size)
    tokens = jnp.zeros((prompts.shape[0], n_new), jnp.int32)

    def loop() -> jax.Array:
        nonlocal cache
        tokens_out, cache = _forward_loop(graph, state, tokens, cache, passes)
        return tokens_out

    seconds, _ = time_calls(loop, runs)
    return statistics.median(seconds) / passes


@functools.partial(jax.jit, static_argnames=("graph", "strategy", "sampling", "passes"), donate_argnames=("cache",))
def _draft_loop(graph, state, cache: KVCache, last: jax.Array, key: jax.Array, strategy, sampling, passes: int):
    drafter = nnx.merge(graph, state)
    lengths = cache.lengths

    def body(i, carry):
        cache, last = carry
        step_key = jax.random.fold_in(key, i)
        if isinstance(strategy, Chain):
            tokens, probs, cache = draft_chain(drafter, cache, last, last, strategy.k, sampling, step_key)
        else:
            drafted = strategy.draft(drafter, cache, last, last, sampling, step_key)
            tokens, probs, cache = drafted.tree.tokens, drafted.draft_probs, drafted.cache
        # Feed a token back (and touch the distributions) so no drafting work is dead code.
        nxt = tokens[:, -1] + (probs[:, -1, 0] > 2).astype(jnp.int32)
        return truncate(cache, lengths), nxt

    return jax.lax.fori_loop(0, passes, body, (cache, last))


def draft_round_seconds(
    strategy,
    drafter: Transformer,
    prompts: jax.Array,
    cache_size: int,
    sampling: Sampling,
    *,
    passes: int = 16,
    runs: int = 5,
) -> float:
    """Seconds the drafter spends per round of `strategy` (a `jspec.Chain` or a tree strategy): its
    catch-up step and every drafting call, after `prompts` were prefilled; median over `runs`
    compiled loops of `passes` rounds each, divided by `passes`."""
    graph, state = nnx.split(drafter)
    cache = _prefill(graph, state, prompts, cache_size)
    cache = truncate(cache, cache.lengths - 1)  # the loop's invariant: the drafter is 2 tokens behind
    last = prompts[:, -1]
    key = jax.random.key(0)

    def loop():
        nonlocal cache
        cache, out = _draft_loop(graph, state, cache, last, key, strategy, sampling, passes)
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
