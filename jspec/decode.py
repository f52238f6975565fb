"""Generation: the autoregressive baseline and speculative decoding, each one compiled program.

The loop knows a method only through the strategy protocol (`jspec.rounds`): after the target's
prefill it calls `strategy.init` once, then `strategy.round` inside one `lax.while_loop` on the
device, and appends what each round emits. Plain decoding is the strategy `Autoregressive`. Rows finish
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

from jspec.drafters import Prefill, as_drafter, prefill_model
from jspec.methods.chain import Chain
from jspec.models import Transformer
from jspec.models.kv_cache import new_slots
from jspec.parallel import SEQUENTIAL
from jspec.rounds import Autoregressive
from jspec.sampling import Sampling, sample, warp
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
    strategy: the strategy's own counts (`strategy.stats(carry)`, e.g. SSD's cache hits), or None.
    """

    target_passes: jax.Array
    emitted_per_round: jax.Array
    mean_accepted: jax.Array
    strategy: Any = None


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


def prefill(model: Transformer, prompts: jax.Array, prompt_lengths: jax.Array, cache_size: int):
    """Run the prompts `[B, P]` through `model`: the logits after each row's last prompt token
    `[B, V]` and a cache of `cache_size` slots holding the prompt (`lengths = prompt_lengths`)."""
    logits, cache, _ = prefill_model(model, prompts, prompt_lengths, cache_size)
    return logits, cache


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
    carry_stats: Callable[[Any], Any] | None = None,
) -> Output:
    """Emit `first_token [B]` (from prefill), then run `round_fn(carry, active, key)` in a while_loop
    until every row has `max_new_tokens` (int32 [], at most the static `budget`) or hit EOS.
    `stream(tokens [B, E], counts [B])` is called on the host with each step's kept tokens;
    `carry_stats(carry)` gives `Stats.strategy` from the final carry."""
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
    extra = None if carry_stats is None else carry_stats(state.carry)
    return Output(tokens=tokens, lengths=length, stats=Stats(passes, state.emitted_per_round, tau.astype(jnp.float32), extra))


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


@functools.partial(jax.jit, static_argnames=("target_graph", "drafter_graph", "strategy", "sampling", "budget", "stream"))
def _decode(
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
    """`decode_program` of the merged models: one compiled program per (shapes, strategy,
    sampling, budget). drafter_graph None: no drafter."""
    target = nnx.merge(target_graph, target_state)
    drafter = None if drafter_graph is None else nnx.merge(drafter_graph, drafter_state)
    return decode_program(
        target, drafter, prompts, prompt_lengths, key, eos_id, max_new_tokens,
        strategy=strategy, sampling=sampling, budget=budget, stream=stream,
    )  # fmt: skip


def decode_program(
    target: Transformer,
    drafter_model,
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
    stages=SEQUENTIAL,
) -> Output:
    """Prefill, `strategy.init`, then `strategy.round` until done (traced inside a jit).

    stages: where the target's and the drafter's work runs (`jspec.parallel`): one device in turn,
    or each model on its own device inside `jspec.parallel.parallel_generate`'s shard_map; a
    strategy that places its own work (`strategy.parallel`) receives it."""
    drafter = None if drafter_model is None else as_drafter(drafter_model)
    feature_layers = () if drafter is None else drafter.feature_layers
    key_prefill, key_loop = jax.random.split(key)
    # Slack past the last emitted token: a round writes tokens_scored entries beyond the length.
    cache_size = prompts.shape[1] + budget + strategy.tokens_scored + 1
    logits, cache, features = stages.on_target(lambda: prefill_model(target, prompts, prompt_lengths, cache_size, feature_layers))
    logits, features = stages.share((logits, features))  # the target's cache stays on its device
    first = sample(key_prefill, warp(logits, sampling))
    placed = dict(stages=stages) if getattr(strategy, "parallel", False) else {}
    carry = strategy.init(target, drafter, Prefill(prompts, prompt_lengths, cache, features), first, sampling, **placed)
    round_fn = lambda carry, active, key: strategy.round(target, drafter, carry, active, sampling, key, **placed)  # noqa: E731
    return _decode_loop(
        round_fn, carry, first, key_loop, eos_id, max_new_tokens, budget, strategy.tokens_per_round, stream,
        getattr(strategy, "stats", None),
    )  # fmt: skip


STRATEGY_API = ("tokens_per_round", "tokens_scored", "lossy", "check", "init", "round")


def check_strategy(strategy) -> None:
    """Raise ValueError unless `strategy` implements the strategy protocol (`jspec.rounds`)."""
    missing = [name for name in STRATEGY_API if not hasattr(strategy, name)]
    if missing:
        raise ValueError(
            f"strategy must be a strategy of the jspec protocol, e.g. jspec.Chain(k=4) (missing {missing}), got {strategy!r}"
        )


def check_drafter(target: Transformer, drafter) -> None:
    """Raise ValueError unless `drafter` is a model with a drafter (`jspec.drafters.as_drafter`)
    over the target's vocabulary."""
    if isinstance(drafter, Transformer):
        check_vocab(target.config, drafter.config)
        as_drafter(drafter)  # a model with Mamba-2 layers cannot draft
        return
    if not hasattr(drafter, "as_drafter"):
        raise ValueError(
            f"drafter must be a jspec.models.Transformer or provide as_drafter() (e.g. jspec.eagle.EagleHead), "
            f"got {type(drafter).__name__}"
        )
    if hasattr(drafter, "check_target"):
        drafter.check_target(target)


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
    output = _decode(
        graph, state, None, None, _pad_width(prompts, bucket_size(prompts.shape[1])), prompt_lengths, key,
        jnp.int32(eos), jnp.int32(n), strategy=Autoregressive(), sampling=sampling, budget=bucket_size(n), stream=stream,
    )  # fmt: skip
    return _trim(output, n)


def speculative_generate(
    target: Transformer,
    drafter,
    prompts,
    *,
    max_new_tokens: int,
    strategy=Chain(k=4),  # any strategy of the protocol (jspec.rounds): Chain, StaticTree, SequoiaTree, ...
    sampling: Sampling = Sampling(),
    rng: jax.Array | None = None,
    prompt_lengths=None,
    eos_id: int | None = None,
    stream: Callable[[Any, Any], None] | None = None,
) -> Output:
    """Speculative decoding of `target` with `drafter`; same arguments and output as `generate`
    (`stream` is called once per round, with the tokens the round kept).

    drafter: a `jspec.models.Transformer` sharing the target's vocabulary, or any model providing
    a drafter of the protocol (`jspec.drafters`), e.g. an EAGLE head (`jspec.eagle.EagleHead`); None
    for a strategy that drafts without a model (`jspec.PromptLookup`).

    With a lossless strategy the output has exactly the distribution of `generate(target, ...)`
    (token for token at temperature 0). `Output.stats.mean_accepted` is tau.
    """
    _check_model("target", target)
    _check_sampling(sampling)
    check_strategy(strategy)
    strategy.check(sampling)
    if drafter is None:
        if getattr(strategy, "needs_drafter", True):
            raise ValueError(f"drafter is None, but strategy {strategy!r} needs one (only e.g. jspec.PromptLookup runs without)")
    else:
        check_drafter(target, drafter)
    prompts, prompt_lengths = check_prompts(prompts, prompt_lengths, target.config.vocab_size)
    check_budget("target", target.config, prompts.shape[1], max_new_tokens)
    if isinstance(drafter, Transformer):
        check_budget("drafter", drafter.config, prompts.shape[1], max_new_tokens)
    eos = check_eos(eos_id, target.config.vocab_size)
    key = check_rng(rng, sampling.greedy)
    target_graph, target_state = nnx.split(target)
    drafter_graph, drafter_state = (None, None) if drafter is None else nnx.split(drafter)
    n = int(max_new_tokens)
    output = _decode(
        target_graph, target_state, drafter_graph, drafter_state, _pad_width(prompts, bucket_size(prompts.shape[1])),
        prompt_lengths, key, jnp.int32(eos), jnp.int32(n), strategy=strategy, sampling=sampling, budget=bucket_size(n),
        stream=stream,
    )  # fmt: skip
    return _trim(output, n)
