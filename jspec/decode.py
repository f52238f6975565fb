"""Generation: the autoregressive baseline and speculative decoding, each one compiled program.

After prefill, every round runs inside one `lax.while_loop` on the device. Rows finish
independently (EOS or `max_new_tokens`); a finished row commits nothing and its output stops
changing. Models are passed as `nnx.split` state (arguments, not closures over weights), so a
call compiles once per (shapes, strategy, sampling) and never per call or acceptance pattern.

Prompt widths and `max_new_tokens` are rounded up to buckets (`bucket_size`: at most 25% more,
four sizes per doubling) before compiling, with the true limit passed as a value: a chat's next
prompt, one token longer, reuses the program of the last one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jspec.chain import Chain, ChainCarry, chain_round
from jspec.models import KVCache, Transformer, causal_mask, commit, init_cache, truncate
from jspec.models.kv_cache import new_slots
from jspec.sampling import Sampling, sample, warp
from jspec.sharding import constrain_cache
from jspec.tree_round import is_tree_strategy, tree_round
from jspec.validation import check_budget, check_eos, check_prompts, check_rng, check_vocab

PAD_ID = -1  # Output.tokens past each row's length


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Stats:
    """Per-row decoding statistics. A "round" is one target forward pass after prefill.

    target_passes: int32 `[B]`, rounds run while the row was unfinished.
    emitted_per_round: int32 `[B, R]`, tokens the verifier emitted in each round (accepted drafts
      plus the one token after them, before truncation at EOS or max_new_tokens); 0 after the row
      finished. R = max_new_tokens bounds the rounds.
    mean_accepted: float32 `[]`, tau: tokens emitted per target pass over all rows and rounds
      (the prefill pass, which emits the first token in every method, is not counted).
    """

    target_passes: jax.Array
    emitted_per_round: jax.Array
    mean_accepted: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Output:
    """tokens: int32 `[B, max_new_tokens]`, `PAD_ID` past `lengths` (int32 `[B]`); stats: `Stats`."""

    tokens: jax.Array
    lengths: jax.Array
    stats: Stats


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoopState:
    """The while_loop state shared by every method; `carry` is the method's own pytree."""

    step: jax.Array  # int32 [], rounds run
    key: jax.Array
    tokens: jax.Array  # int32 [B, W], W = max_new_tokens + tokens_per_round
    length: jax.Array  # int32 [B], tokens emitted so far
    done: jax.Array  # bool [B]
    emitted_per_round: jax.Array  # int32 [B, R]
    carry: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AutoregressiveCarry:
    cache: KVCache
    last: jax.Array  # int32 [B], emitted but not yet in the cache


def prefill(model: Transformer, prompts: jax.Array, prompt_lengths: jax.Array, cache_size: int) -> tuple[jax.Array, KVCache]:
    """Run the prompts `[B, P]` through `model`. Returns the logits after each row's last prompt
    token `[B, V]` and a cache of `cache_size` slots holding the prompt (`lengths = prompt_lengths`)."""
    b, p = prompts.shape
    # Under an ambient mesh (`jax.set_mesh`) pin the new cache to jspec.sharding's layout (batch
    # over 'data', KV heads over 'model'); nothing else fixes it. Without a mesh this is a no-op.
    cache = constrain_cache(init_cache(model.config, b, cache_size))
    positions = jnp.broadcast_to(jnp.arange(p), (b, p))
    logits, cache = model(prompts, positions, causal_mask(b, p), cache, logits_at=(prompt_lengths - 1)[:, None])
    return logits[:, 0], commit(cache, prompt_lengths)


def autoregressive_round(
    target: Transformer, carry: AutoregressiveCarry, active: jax.Array, sampling: Sampling, key: jax.Array
) -> tuple[AutoregressiveCarry, jax.Array, jax.Array]:
    """One target pass over the last token; emits one token per row. Same contract as `chain_round`."""
    b = carry.last.shape[0]
    logits, cache = target(carry.last[:, None], carry.cache.lengths[:, None], causal_mask(b, 1), carry.cache)
    cache = commit(cache, active.astype(jnp.int32))
    token = sample(key, warp(logits[:, 0], sampling))
    carry = AutoregressiveCarry(cache=cache, last=jnp.where(active, token, carry.last))
    return carry, token[:, None], jnp.ones((b,), jnp.int32)


def _write_rows(buffer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """buffer `[B, W]`, new `[B, E]` written at column start `[B]` of each row (as the KV cache is)."""
    rows = jnp.arange(buffer.shape[0])[:, None]
    return buffer.at[rows, new_slots(start, new.shape[1])].set(new, mode="drop")


def _append(state: LoopState, new: jax.Array, n_new: jax.Array, eos_id: jax.Array, max_new_tokens: int) -> LoopState:
    """Append the first n_new[b] of new `[B, E]` to each unfinished row, stopping at EOS / length."""
    active = ~state.done
    index = jnp.arange(new.shape[1])[None, :]
    is_eos = (new == eos_id) & (index < n_new[:, None])
    first_eos = jnp.argmax(is_eos, axis=1)
    n_kept = jnp.where(is_eos.any(axis=1), first_eos + 1, n_new)
    tokens = jnp.where(active[:, None], _write_rows(state.tokens, new, state.length), state.tokens)
    length = state.length + jnp.where(active, n_kept, 0)
    done = state.done | (active & is_eos.any(axis=1)) | (length >= max_new_tokens)
    return dataclasses.replace(state, tokens=tokens, length=length, done=done)


def _decode_loop(
    round_fn: Callable[[Any, jax.Array, jax.Array], tuple[Any, jax.Array, jax.Array]],
    carry: Any,
    first_token: jax.Array,
    key: jax.Array,
    eos_id: jax.Array,
    max_new_tokens: jax.Array,
    budget: int,
    tokens_per_round: int,
    stream: Callable[[Any, Any], None] | None = None,
) -> Output:
    """Emit `first_token [B]` (from prefill), then run `round_fn(carry, active, key)` in a while_loop
    until every row has `max_new_tokens` (int32 [], at most the static `budget`) or hit EOS.
    `stream(tokens [B, E], counts [B])` is called on the host with each step's kept tokens."""
    b = first_token.shape[0]
    state = LoopState(
        step=jnp.zeros((), jnp.int32),
        key=key,
        tokens=jnp.full((b, budget + tokens_per_round), PAD_ID, jnp.int32),
        length=jnp.zeros((b,), jnp.int32),
        done=jnp.zeros((b,), bool),
        emitted_per_round=jnp.zeros((b, budget), jnp.int32),
        carry=carry,
    )

    def append(state: LoopState, new: jax.Array, n_new: jax.Array) -> LoopState:
        appended = _append(state, new, n_new, eos_id, max_new_tokens)
        if stream is not None:  # the tokens each row kept, as they are accepted
            kept = jnp.minimum(appended.length, max_new_tokens) - jnp.minimum(state.length, max_new_tokens)
            jax.debug.callback(stream, new, kept, ordered=True)
        return appended

    state = append(state, first_token[:, None], jnp.ones((b,), jnp.int32))

    def cond(state: LoopState):
        return jnp.any(~state.done) & (state.step < max_new_tokens)

    def body(state: LoopState):
        active = ~state.done
        carry, new, n_new = round_fn(state.carry, active, jax.random.fold_in(state.key, state.step))
        emitted = state.emitted_per_round.at[:, state.step].set(jnp.where(active, n_new, 0))
        state = dataclasses.replace(state, carry=carry, emitted_per_round=emitted, step=state.step + 1)
        return append(state, new, n_new)

    state = jax.lax.while_loop(cond, body, state)
    length = jnp.minimum(state.length, max_new_tokens)
    tokens = state.tokens[:, :budget]
    tokens = jnp.where(jnp.arange(budget)[None, :] < length[:, None], tokens, PAD_ID)
    passes = jnp.sum(state.emitted_per_round > 0, axis=1).astype(jnp.int32)
    tau = jnp.sum(state.emitted_per_round) / jnp.maximum(jnp.sum(passes), 1)
    return Output(tokens=tokens, lengths=length, stats=Stats(passes, state.emitted_per_round, tau.astype(jnp.float32)))


def bucket_size(n: int) -> int:
    """The bucket a prompt width or token budget `n` is rounded up to: 16, 20, 24, 28, 32, 40, 48,
    56, 64, 80, ... (four sizes per doubling, so at most 25% larger than n), so that nearby sizes
    share one compiled program."""
    if n <= 16:
        return 16
    step = 1 << max(0, n.bit_length() - 3)  # a quarter of the largest power of two <= n
    return -(-n // step) * step


def _pad_width(prompts: jax.Array, width: int) -> jax.Array:
    """Right-pad prompts `[B, P]` to `[B, width]` (the padding is never attended to: prompt_lengths)."""
    return prompts if prompts.shape[1] == width else jnp.pad(prompts, ((0, 0), (0, width - prompts.shape[1])))


def _trim(output: Output, max_new_tokens: int) -> Output:
    """The bucketed output cut back to `max_new_tokens` columns."""
    if output.tokens.shape[1] == max_new_tokens:
        return output
    stats = dataclasses.replace(output.stats, emitted_per_round=output.stats.emitted_per_round[:, :max_new_tokens])
    return Output(tokens=output.tokens[:, :max_new_tokens], lengths=output.lengths, stats=stats)


@functools.partial(jax.jit, static_argnames=("target_graph", "sampling", "budget", "stream"))
def _generate(target_graph, target_state, prompts, prompt_lengths, key, eos_id, max_new_tokens, *, sampling, budget, stream=None):
    target = nnx.merge(target_graph, target_state)
    key_prefill, key_loop = jax.random.split(key)
    logits, cache = prefill(target, prompts, prompt_lengths, prompts.shape[1] + budget + 1)
    first = sample(key_prefill, warp(logits, sampling))
    round_fn = lambda carry, active, key: autoregressive_round(target, carry, active, sampling, key)
    return _decode_loop(round_fn, AutoregressiveCarry(cache, first), first, key_loop, eos_id, max_new_tokens, budget, 1, stream)


@functools.partial(jax.jit, static_argnames=("target_graph", "drafter_graph", "strategy", "sampling", "budget", "stream"))
def _speculative_generate(
    target_graph,
    target_state,
    drafter_graph,
    drafter_state,
    prompts,
    prompt_lengths,
    key,
    eos_id,
    max_new_tokens,
    *,
    strategy,
    sampling,
    budget,
    stream=None,
):
    target = nnx.merge(target_graph, target_state)
    drafter = nnx.merge(drafter_graph, drafter_state)
    key_prefill, key_loop = jax.random.split(key)
    # Slack past the last emitted token: a round writes tokens_scored entries beyond the length.
    cache_size = prompts.shape[1] + budget + strategy.tokens_scored + 1
    logits, target_cache = prefill(target, prompts, prompt_lengths, cache_size)
    _, drafter_cache = prefill(drafter, prompts, prompt_lengths, cache_size)
    first = sample(key_prefill, warp(logits, sampling))
    carry = ChainCarry(
        target_cache=target_cache,
        drafter_cache=truncate(drafter_cache, prompt_lengths - 1),
        prev=jnp.take_along_axis(prompts, (prompt_lengths - 1)[:, None], axis=1)[:, 0],
        last=first,
    )
    if isinstance(strategy, Chain):
        strategy_round = chain_round
    elif getattr(strategy, "round_function", None) is not None:  # a round and a carry of its own
        strategy_round = strategy.round_function
        carry = strategy.init_carry(target, carry, sampling)
    else:
        strategy_round = tree_round
    round_fn = lambda carry, active, key: strategy_round(strategy, target, drafter, carry, active, sampling, key)
    return _decode_loop(round_fn, carry, first, key_loop, eos_id, max_new_tokens, budget, strategy.tokens_per_round, stream)


def _check_model(name: str, model) -> None:
    if not isinstance(model, Transformer):
        raise ValueError(f"{name} must be a jspec.models.Transformer, got {type(model).__name__}")


def _check_sampling(sampling) -> None:
    if not isinstance(sampling, Sampling):
        raise ValueError(f"sampling must be a jspec.Sampling, got {type(sampling).__name__}")


def generate(
    model: Transformer,
    prompts,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    rng: jax.Array | None = None,
    prompt_lengths=None,
    eos_id: int | None = None,
    stream: Callable[[Any, Any], None] | None = None,
) -> Output:
    """Autoregressive decoding, the baseline every speculative method must match in distribution.

    prompts: int32 `[B, P]`, right-padded; prompt_lengths: int32 `[B]` (None: all rows are full).
    rng: a PRNG key, required when sampling.temperature > 0.
    stream: called on the host after every step as `stream(tokens, counts)` with numpy arrays
    `[B, E]` and `[B]`: row b kept `tokens[b, :counts[b]]` (for printing an answer as it grows).
    The function is part of the compiled program: pass the same object to reuse it.
    """
    _check_model("model", model)
    _check_sampling(sampling)
    prompts, prompt_lengths = check_prompts(prompts, prompt_lengths, model.config.vocab_size)
    check_budget("model", model.config, prompts.shape[1], max_new_tokens)
    eos = check_eos(eos_id, model.config.vocab_size)
    key = check_rng(rng, sampling.greedy)
    graph, state = nnx.split(model)
    n = int(max_new_tokens)
    output = _generate(
        graph, state, _pad_width(prompts, bucket_size(prompts.shape[1])), prompt_lengths, key, jnp.int32(eos),
        jnp.int32(n), sampling=sampling, budget=bucket_size(n), stream=stream,
    )  # fmt: skip
    return _trim(output, n)


def speculative_generate(
    target: Transformer,
    drafter: Transformer,
    prompts,
    *,
    max_new_tokens: int,
    strategy=Chain(k=4),  # Chain or any tree strategy (jspec.tree_round): StaticTree, SequoiaTree, ...
    sampling: Sampling = Sampling(),
    rng: jax.Array | None = None,
    prompt_lengths=None,
    eos_id: int | None = None,
    stream: Callable[[Any, Any], None] | None = None,
) -> Output:
    """Speculative decoding of `target` with `drafter`; same arguments and output as `generate`
    (`stream` is called once per round, with the tokens the round kept).

    With a lossless strategy the output has exactly the distribution of `generate(target, ...)`
    (token for token at temperature 0). `Output.stats.mean_accepted` is tau.
    """
    _check_model("target", target)
    _check_model("drafter", drafter)
    _check_sampling(sampling)
    if not (isinstance(strategy, Chain) or is_tree_strategy(strategy)):
        raise ValueError(f"strategy must be a jspec strategy such as jspec.Chain(k=4), got {strategy!r}")
    strategy.check(sampling)
    check_vocab(target.config, drafter.config)
    prompts, prompt_lengths = check_prompts(prompts, prompt_lengths, target.config.vocab_size)
    check_budget("target", target.config, prompts.shape[1], max_new_tokens)
    check_budget("drafter", drafter.config, prompts.shape[1], max_new_tokens)
    eos = check_eos(eos_id, target.config.vocab_size)
    key = check_rng(rng, sampling.greedy)
    target_graph, target_state = nnx.split(target)
    drafter_graph, drafter_state = nnx.split(drafter)
    n = int(max_new_tokens)
    output = _speculative_generate(
        target_graph, target_state, drafter_graph, drafter_state, _pad_width(prompts, bucket_size(prompts.shape[1])),
        prompt_lengths, key, jnp.int32(eos), jnp.int32(n), strategy=strategy, sampling=sampling, budget=bucket_size(n),
        stream=stream,
    )  # fmt: skip
    return _trim(output, n)
