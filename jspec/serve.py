"""Serving many requests: continuous batching with speculation.

`Engine` keeps a fixed number of batch slots, so every compiled program has one shape. Between
compiled steps the host admits waiting requests into free slots (one prefill program per prompt
width, a power of two, writes the prompt into that slot's cache rows and the strategy's state), streams what
the last step emitted and evicts finished or cancelled requests. A step runs up to
`rounds_per_step` rounds of the strategy (`jspec.rounds`) over all slots in one `lax.while_loop`;
an empty or finished slot is an inactive row, which a round leaves as it was.

Each request brings its own `max_new_tokens`, EOS, temperature, top-p and seed: they are values in
the slot state (the warps read them per row, `jspec.sampling.RowSampling`), so requests with
different settings share one program. A request's output is what `jspec.speculative_generate` gives
for it alone: token for token when greedy, in law at temperature > 0 (rows never read each
other's state; a row's verdicts are the strategy's, per row).

Any strategy whose state has one row per request serves: Chain, trees, `AdaptiveK`, `SmartSpec`
(one k for the batch, 0 included, by goodput: the point of serving with speculation), and
`jspec.rounds.Autoregressive` (plain decoding, no drafter). A strategy with `at_k` and `prepare_step`
(SmartSpec) has k chosen between steps (`prepare_step`, a program of its own) and each step runs
the program at that k: k_max + 1 step programs, no cond on k in a round; the engine times each
step and hands its seconds per round to the next `prepare_step` (`observe_round_seconds`: the cost
model follows what steps really take). Such a strategy's rows are
admitted without a drafter pass, and a row's drafter, left behind by plain steps, is restarted from
the row's tokens (host-side, one program per width) only before a step that drafts: an engine that
keeps choosing k = 0 does plain decoding's work. Strategies whose state depends on the prompt's
width (retrieval over the prompt) are refused.

Randomness: a request's `seed` draws its first token; later rounds draw from the engine's key
folded with the step count, shared by the batch (a round samples all rows at once). So a sampled
output is reproducible from its seed only under the same arrival schedule, as with OpenAI's
best-effort `seed`; its law is exact either way.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jspec.decode import PAD_ID, check_drafter, check_strategy
from jspec.drafters import Prefill, as_drafter, prefill_model
from jspec.methods.chain import Chain
from jspec.models import Transformer
from jspec.sampling import RowSampling, Sampling, sample, warp
from jspec.validation import check_eos, check_int


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request: prompt token ids, at most `max_new_tokens` new ones, stopping after
    `eos_id` (None: never), sampled with `sampling` (temperature, top_p) from `seed`."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: Sampling = Sampling()
    seed: int = 0
    eos_id: int | None = None


@dataclasses.dataclass(frozen=True)
class Event:
    """What one request got from one host step: new token ids (possibly none) and, when it ended,
    why: "stop" (its EOS, which is the last token), "length" (max_new_tokens) or "cancelled"."""

    request_id: int
    tokens: tuple[int, ...]
    finish_reason: str | None = None


@dataclasses.dataclass
class Completion:
    """A request's output so far (host side): tokens, the finish reason once done, and the target
    passes (rounds) it took part in after its prefill."""

    request: Request
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    rounds: int = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
    """The engine's device state, one row per slot `[S]`: the strategy's carry, tokens emitted so
    far (`length`), whether the row is idle or finished (`done`), its limits and sampling, and the
    rounds it ran; `key` and `step` give each round its random key."""

    carry: Any
    length: jax.Array  # int32 [S]
    done: jax.Array  # bool [S]
    max_new: jax.Array  # int32 [S]
    eos: jax.Array  # int32 [S], -1: none
    temperature: jax.Array  # float32 [S]
    top_p: jax.Array  # float32 [S]
    rounds: jax.Array  # int32 [S]
    key: jax.Array
    step: jax.Array  # int32 []


def _merge(target_graph, target_state, drafter_graph, drafter_state):
    return nnx.merge(target_graph, target_state), _merge_drafter(drafter_graph, drafter_state)


def _merge_drafter(drafter_graph, drafter_state):
    return None if drafter_graph is None else as_drafter(nnx.merge(drafter_graph, drafter_state))


def _start(target, drafter, strategy, prompts, lengths, cache_size: int, key, sampling):
    """Prefill `prompts [b, P]` and start the strategy: (carry, first tokens `[b]`). A strategy
    that can start without its drafter (`init_without_drafter`, SmartSpec) does: the engine
    restarts the drafter of a row when a step is to draft (`_restart_drafter`)."""
    feature_layers = () if drafter is None else drafter.feature_layers
    logits, cache, features = prefill_model(target, prompts, lengths, cache_size, feature_layers)
    first = sample(key, warp(logits, sampling))
    init = getattr(strategy, "init_without_drafter", strategy.init)
    return init(target, drafter, Prefill(prompts, lengths, cache, features), first, sampling), first


@functools.partial(jax.jit, static_argnames=("target_graph", "drafter_graph", "strategy", "slots", "width", "cache_size"))
def _start_carry(target_graph, target_state, drafter_graph, drafter_state, *, strategy, slots, width, cache_size):
    """The strategy's carry for `slots` rows after a prompt of `width` zeros: the engine's initial
    state (every slot idle) and, abstractly, the shapes the engine checks."""
    target, drafter = _merge(target_graph, target_state, drafter_graph, drafter_state)
    prompts = jnp.zeros((slots, width), jnp.int32)
    sampling = RowSampling(jnp.zeros((slots,)), jnp.ones((slots,)))
    lengths = jnp.ones((slots,), jnp.int32)
    return _start(target, drafter, strategy, prompts, lengths, cache_size, jax.random.key(0), sampling)[0]


def _set_row(full: jax.Array, one: jax.Array, slot: jax.Array, axis: int | None) -> jax.Array:
    """`full` with its row `slot` along the batch `axis` replaced by `one` (a batch of 1); a leaf
    with no batch axis (axis None, e.g. a strategy's counters) keeps the engine's value."""
    if axis is None:
        return full
    start = [0] * full.ndim
    start[axis] = slot
    return jax.lax.dynamic_update_slice(full, one.astype(full.dtype), start)


@functools.partial(
    jax.jit, static_argnames=("target_graph", "drafter_graph", "strategy", "cache_size", "axes"), donate_argnums=(4,)
)
def _admit(
    target_graph, target_state, drafter_graph, drafter_state, state: SlotState, prompt, length, slot, limits, sampling,
    seed, *, strategy, cache_size, axes,
):  # fmt: skip
    """Prefill one request (`prompt [1, P]`) into row `slot`: returns the state and its first token."""
    target, drafter = _merge(target_graph, target_state, drafter_graph, drafter_state)
    carry, first = _start(target, drafter, strategy, prompt, length, cache_size, jax.random.key(seed), sampling)
    leaves, treedef = jax.tree.flatten(state.carry)
    carry = jax.tree.unflatten(treedef, [_set_row(f, o, slot, a) for f, o, a in zip(leaves, jax.tree.leaves(carry), axes)])
    max_new, eos = limits[0], limits[1]
    row = lambda x, v: x.at[slot].set(v)  # noqa: E731
    state = dataclasses.replace(
        state, carry=carry, length=row(state.length, 1), done=row(state.done, (first[0] == eos) | (max_new <= 1)),
        max_new=row(state.max_new, max_new), eos=row(state.eos, eos), rounds=row(state.rounds, 0),
        temperature=row(state.temperature, sampling.temperature[0]), top_p=row(state.top_p, sampling.top_p[0]),
    )  # fmt: skip
    return state, first[0]


@functools.partial(jax.jit, static_argnames=("target_graph", "drafter_graph", "strategy", "rounds_per_step"), donate_argnums=(4,))
def _step(target_graph, target_state, drafter_graph, drafter_state, state: SlotState, cancel, *, strategy, rounds_per_step):
    """Run up to `rounds_per_step` rounds over every active slot. Returns the state, the tokens
    each slot kept `[S, rounds_per_step * tokens_per_round]` and how many `[S]`."""
    target, drafter = _merge(target_graph, target_state, drafter_graph, drafter_state)
    slots = state.length.shape[0]
    width = strategy.tokens_per_round
    buffer = jnp.full((slots, rounds_per_step * width), PAD_ID, jnp.int32)
    state = dataclasses.replace(state, done=state.done | cancel)

    def cond(loop):
        r, state, _, _ = loop
        return (r < rounds_per_step) & jnp.any(~state.done)

    def body(loop):
        r, state, buffer, count = loop
        active = ~state.done
        key = jax.random.fold_in(state.key, state.step)
        # Idle and finished rows warp greedily, so a finished request's top_p < 1 costs no nucleus sort.
        sampling = RowSampling(jnp.where(active, state.temperature, 0.0), jnp.where(active, state.top_p, 1.0))
        round_fn = lambda carry: strategy.round(target, drafter, carry, active, sampling, key)  # noqa: E731
        # Under a cond XLA updates the caches in place; a round straight in the loop body ran up to
        # 30% slower (SmolLM2, CPU). The loop only runs while a row is active, so the skip is never taken.
        shapes = jax.eval_shape(round_fn, state.carry)
        skip = lambda carry: (carry, jnp.zeros(shapes[1].shape, jnp.int32), jnp.zeros(shapes[2].shape, jnp.int32))  # noqa: E731
        carry, new, n_new = jax.lax.cond(jnp.any(active), round_fn, skip, state.carry)
        index = jnp.arange(new.shape[1])[None, :]
        is_eos = (new == state.eos[:, None]) & (index < n_new[:, None])
        kept = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, n_new)
        kept = jnp.where(active, jnp.minimum(kept, state.max_new - state.length), 0)
        rows = jnp.arange(slots)[:, None]
        buffer = buffer.at[rows, count[:, None] + index].set(jnp.where(index < kept[:, None], new, PAD_ID), mode="drop")
        length = state.length + kept
        stopped = jnp.any(is_eos & (index < kept[:, None]), axis=1)
        state = dataclasses.replace(
            state, carry=carry, length=length, done=state.done | stopped | (length >= state.max_new),
            rounds=state.rounds + active, step=state.step + 1,
        )  # fmt: skip
        return r + 1, state, buffer, count + kept

    _, state, buffer, count = jax.lax.while_loop(cond, body, (0, state, buffer, jnp.zeros((slots,), jnp.int32)))
    return state, buffer, count


_NOT_OBSERVED = (np.int32(-1), np.float32(0.0))  # no step's cost to take in (`_prepare_step`)


@functools.partial(jax.jit, static_argnames=("drafter_graph", "strategy", "rounds_per_step"), donate_argnums=(2,))
def _prepare_step(
    drafter_graph, drafter_state, state: SlotState, cancel, observed_k, observed_seconds, *, strategy, rounds_per_step
):
    """For a strategy choosing per step: the state ready for the next step, its k (int32 `[]`) and
    the rows whose drafter to restart first, from the rows that run it (not done, not cancelled),
    after the cost of a round at the last step's k (`observed_k`, -1: none) has taken in what
    that step's rounds took (`observed_seconds`). It takes the drafter alone: passing the target's
    hundreds of weight arrays to a jitted call costs milliseconds of the host's time per step."""
    drafter = _merge_drafter(drafter_graph, drafter_state)
    carry = strategy.observe_round_seconds(state.carry, observed_k, observed_seconds)
    carry, k, restart = strategy.prepare_step(drafter, carry, ~(state.done | cancel), rounds_per_step)
    return dataclasses.replace(state, carry=carry), k, restart


@functools.partial(jax.jit, static_argnames=("drafter_graph", "strategy"), donate_argnums=(2,))
def _restart_drafter(drafter_graph, drafter_state, state: SlotState, tokens, length, slot, *, strategy):
    """Row `slot`'s drafter started afresh on its sequence but the last token (`tokens [1, W]`,
    `length [1]` of them): before a drafting step, for a row admitted or served without it."""
    drafter = _merge_drafter(drafter_graph, drafter_state)
    return dataclasses.replace(state, carry=strategy.restart_drafter(drafter, state.carry, slot, tokens, length))


STEP_API = (
    "k_max", "at_k", "prepare_step", "observe_round_seconds", "init_without_drafter", "restart_drafter", "without_drafter",
    "with_drafter",
)  # fmt: skip


def _chooses_per_step(strategy) -> bool:
    """Whether `strategy` picks its draft length between steps (`jspec.rounds`: all of `STEP_API`);
    ValueError for one bringing part of it, which the engine could not run as either kind."""
    present = [name for name in STEP_API if hasattr(strategy, name)]
    if present and len(present) < len(STEP_API) and present != ["k_max"]:  # k_max alone: e.g. AdaptiveK
        missing = [name for name in STEP_API if name not in present]
        raise ValueError(f"strategy {strategy!r} brings {present} of the per-step protocol but not {missing}")
    return len(present) == len(STEP_API)


def _batch_axes(abstract_1, abstract_2) -> tuple[int | None, ...]:
    """Per carry leaf, the axis that grows with the batch (from its shapes at batch 1 and 2), or
    None for a leaf without one."""
    axes = []
    for a, b in zip(jax.tree.leaves(abstract_1), jax.tree.leaves(abstract_2)):
        differ = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
        if len(a.shape) != len(b.shape) or len(differ) > 1 or (differ and (a.shape[differ[0]], b.shape[differ[0]]) != (1, 2)):
            raise ValueError(f"the strategy's state has a leaf of shape {a.shape} at batch 1 and {b.shape} at batch 2")
        axes.append(differ[0] if differ else None)
    return tuple(axes)


class Engine:
    """Continuous batching with speculative decoding over a fixed number of slots.

    target: a `jspec.models.Transformer`; drafter: the strategy's drafter (a Transformer sharing the
    vocabulary or e.g. an EAGLE head), None for `jspec.rounds.Autoregressive`; strategy: any
    strategy of the protocol whose state is per row (module doc), e.g. `jspec.Chain(k=4)` or
    `jspec.SmartSpec.from_costs(...)`; slots: requests decoded at once (the compiled batch);
    max_len: the most tokens a request may hold, prompt plus new tokens; rounds_per_step: rounds
    each compiled step runs before the host admits, streams and evicts; seed: the engine's key
    for rounds that sample; keep_finished: how many finished requests `completions` keeps (the
    oldest are dropped; None: all, as `run()` needs; a long-running server bounds it).

    Use: `submit(...)` requests (any thread), then call `step()` (one thread) until `idle`; `run()`
    does that and returns every `Completion`. `cancel(id)` ends a request at the next step.
    """

    def __init__(
        self,
        target: Transformer,
        drafter=None,
        strategy=Chain(k=4),
        *,
        slots: int,
        max_len: int,
        rounds_per_step: int = 4,
        seed: int = 0,
        keep_finished: int | None = None,
    ):
        if not isinstance(target, Transformer):
            raise ValueError(f"target must be a jspec.models.Transformer, got {type(target).__name__}")
        check_strategy(strategy)
        strategy.check(Sampling(temperature=1.0))  # requests may sample: refuse a greedy-only verifier
        if drafter is None:
            if getattr(strategy, "needs_drafter", True):
                raise ValueError(f"drafter is None, but strategy {strategy!r} needs one (jspec.rounds.Autoregressive does not)")
        else:
            check_drafter(target, drafter)
        self.slots = check_int("slots", slots, 1)
        self.max_len = check_int("max_len", max_len, 2)
        self.rounds_per_step = check_int("rounds_per_step", rounds_per_step, 1)
        for name, model in (("target", target), ("drafter", drafter)):
            if isinstance(model, Transformer) and max_len > model.config.max_seq_len:
                raise ValueError(f"max_len={max_len} is more than the {name}'s max_seq_len={model.config.max_seq_len}")
        self.target, self.drafter, self.strategy = target, drafter, strategy
        self.vocab_size = target.config.vocab_size
        # Slack past the last token, as in `jspec.decode`: a round writes tokens_scored entries.
        self.cache_size = max_len + strategy.tokens_scored + 1
        self._graphs = (*nnx.split(target), *((None, None) if drafter is None else nnx.split(drafter)))
        self._axes = self._check_servable()
        # A strategy choosing per step (`at_k`, `prepare_step`): its step program at each k.
        self._variants = tuple(strategy.at_k(k) for k in range(strategy.k_max + 1)) if _chooses_per_step(strategy) else None
        self.state = self._empty_state(seed)
        if self._variants is not None:  # traced only: e.g. SmartSpec refuses more rounds per step than its lag
            prepare = functools.partial(_prepare_step, strategy=strategy, rounds_per_step=self.rounds_per_step)
            jax.eval_shape(prepare, *self._graphs[2:], self.state, np.zeros((self.slots,), bool), *_NOT_OBSERVED)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._waiting: collections.deque[int] = collections.deque()
        self._cancelled: set[int] = set()
        self._listeners: dict[int, Callable[[Event], None]] = {}
        self.completions: dict[int, Completion] = {}
        self._slot_of: dict[int, int] = {}  # running request -> slot
        self._free = list(range(self.slots))
        self.keep_finished = None if keep_finished is None else check_int("keep_finished", keep_finished, 0)
        self._finished: collections.deque[int] = collections.deque()  # finished request ids, oldest first
        self.drafter_restarts = 0  # rows whose drafter was started afresh before a drafting step (SmartSpec)
        # A strategy choosing per step: the last step's k and seconds per round, for its cost model.
        self._observed, self._step_k, self._rounds_run = _NOT_OBSERVED, -1, 0

    # --- construction ---------------------------------------------------------------------------

    def _check_servable(self) -> tuple[int | None, ...]:
        """The carry's batch axis per leaf; ValueError for a strategy whose state is not per row
        or depends on the prompt's width (traced only, nothing compiled)."""
        shape = lambda b, width: jax.eval_shape(  # noqa: E731
            functools.partial(_start_carry, strategy=self.strategy, slots=b, width=width, cache_size=self.cache_size),
            *self._graphs,
        )
        one, two, wide = shape(1, 16), shape(2, 16), shape(1, 32)
        if jax.tree.structure(one) != jax.tree.structure(two) or jax.tree.map(lambda a: a.shape, one) != jax.tree.map(
            lambda a: a.shape, wide
        ):
            raise ValueError(f"strategy {self.strategy!r} cannot be served: its state depends on the prompt's width")
        try:
            return _batch_axes(one, two)
        except ValueError as error:
            raise ValueError(f"strategy {self.strategy!r} cannot be served: {error}") from None

    def _empty_state(self, seed: int) -> SlotState:
        s = self.slots
        carry = _start_carry(*self._graphs, strategy=self.strategy, slots=s, width=1, cache_size=self.cache_size)
        # Strong types, as every later state has: a weakly typed leaf (e.g. from jnp.full(.., 2.0))
        # would make the first admission's program a different one from all later admissions'.
        carry = jax.tree.map(lambda x: jax.lax.convert_element_type(x, x.dtype), carry)
        # Committed to the device, as every state a step returns is once the weights are (loaded
        # ones are): the first admission after a step would otherwise compile its program again.
        state = SlotState(
            carry=carry, length=jnp.zeros((s,), jnp.int32), done=jnp.ones((s,), bool), max_new=jnp.zeros((s,), jnp.int32),
            eos=jnp.full((s,), -1, jnp.int32), temperature=jnp.zeros((s,)), top_p=jnp.ones((s,)),
            rounds=jnp.zeros((s,), jnp.int32), key=jax.random.key(check_int("seed", seed, 0)), step=jnp.zeros((), jnp.int32),
        )  # fmt: skip
        return jax.device_put(state, jax.devices()[0])

    def prompt_width(self, n: int) -> int:
        """The padded width a prompt of n tokens is prefilled at: the next power of two from 16,
        at most max_len. One admission program per width, so few (7 up to 1024) that a server
        compiles them all before serving (`prompt_widths`)."""
        return min(max(16, 1 << (n - 1).bit_length()), self.max_len)

    @property
    def prompt_widths(self) -> tuple[int, ...]:
        """Every width `prompt_width` gives for prompts that fit (at most max_len - 1 tokens)."""
        return tuple(sorted({self.prompt_width(n) for n in range(1, self.max_len)}))

    def warm_up(self, widths=None) -> None:
        """Compile every program before serving: one greedy request per prompt width (`widths`,
        default all `prompt_widths`), then a step. Runs the engine (call it while no request is
        queued); leaves no completion behind."""
        if not self.idle:
            raise ValueError("warm_up needs an idle engine")
        sequences = [[0] * min(width, self.max_len - 1) for width in sorted(self.prompt_widths if widths is None else widths)]
        for sequence in sequences:
            self.submit(sequence, max_new_tokens=1)
        self.run()
        if self._variants is not None:  # a drafter restart per width (on the idle row 0: harmless)
            for sequence in sequences:
                self._restart_row(0, sequence)
        for variant in self._variants or ():  # every step program: on the idle state a step runs no round
            self._run_step(variant, np.zeros((self.slots,), bool))
        self.completions.clear()
        self._finished.clear()
        self.drafter_restarts = 0

    # --- requests (any thread) -----------------------------------------------------------------

    def check_request(self, request: Request) -> Request:
        """Raise ValueError naming the bad field unless `request` can be served; returns it."""
        prompt = request.prompt
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or len(prompt) == 0:
            raise ValueError(f"prompt must be a non-empty sequence of token ids, got {prompt!r:.80}")
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < self.vocab_size:
                raise ValueError(f"prompt must hold token ids in [0, {self.vocab_size}), got {t!r}")
        n = check_int("max_new_tokens", request.max_new_tokens, 1)
        if len(prompt) + n > self.max_len:
            raise ValueError(
                f"a prompt of {len(prompt)} tokens plus max_new_tokens={n} needs {len(prompt) + n} positions, more than "
                f"the engine's max_len={self.max_len}"
            )
        if not isinstance(request.sampling, Sampling) or request.sampling.top_k is not None:
            raise ValueError(f"sampling must be a jspec.Sampling without top_k, got {request.sampling!r}")
        check_int("seed", request.seed, 0)
        check_eos(request.eos_id, self.vocab_size)
        return request

    def submit(
        self,
        prompt: Sequence[int],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        eos_id: int | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> int:
        """Queue a request; returns its id. A bad argument raises ValueError naming it (nothing is
        queued). `on_event(Event)` is called on the stepping thread with each of its events."""
        prompt = tuple(prompt.tolist()) if isinstance(prompt, np.ndarray) else prompt
        request = self.check_request(Request(prompt, max_new_tokens, Sampling(temperature, top_p=top_p), seed, eos_id))
        request = dataclasses.replace(request, prompt=tuple(int(t) for t in request.prompt))
        with self._lock:
            request_id = next(self._ids)
            self.completions[request_id] = Completion(request)
            if on_event is not None:
                self._listeners[request_id] = on_event
            self._waiting.append(request_id)
        return request_id

    def cancel(self, request_id: int) -> None:
        """End a queued or running request at the next step (finish reason "cancelled"); a finished
        or unknown id is ignored."""
        with self._lock:
            self._cancelled.add(request_id)

    @property
    def idle(self) -> bool:
        """No request is waiting or running."""
        with self._lock:
            return not self._waiting and not self._slot_of and not self._cancelled

    # --- the host loop (one thread) ------------------------------------------------------------

    def _emit(self, events: list[Event], event: Event) -> None:
        completion = self.completions[event.request_id]
        completion.tokens.extend(event.tokens)
        if event.finish_reason is not None:
            completion.finish_reason = event.finish_reason
        events.append(event)
        listener = self._listeners.get(event.request_id)
        if event.finish_reason is not None:
            self._listeners.pop(event.request_id, None)
        if listener is not None:
            listener(event)

    def _admit_one(self, request_id: int, slot: int) -> int:
        request = self.completions[request_id].request
        p = len(request.prompt)
        width = self.prompt_width(p)
        prompt = np.zeros((1, width), np.int32)
        prompt[0, :p] = request.prompt
        limits = np.asarray([request.max_new_tokens, check_eos(request.eos_id, self.vocab_size)], np.int32)
        sampling = RowSampling.of([request.sampling])
        self.state, first = _admit(
            *self._graphs, self.state, prompt, np.asarray([p], np.int32), np.int32(slot), limits, sampling,
            np.uint32(request.seed), strategy=self.strategy, cache_size=self.cache_size, axes=self._axes,
        )  # fmt: skip
        return int(first)

    def step(self) -> list[Event]:
        """Admit waiting requests into free slots, run one compiled step, and return its events
        (first tokens of admitted requests, new tokens, finishes)."""
        events: list[Event] = []
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            dropped = [r for r in self._waiting if r in cancelled]
            for request_id in dropped:
                self._waiting.remove(request_id)
            cancel = np.zeros((self.slots,), bool)
            for request_id in cancelled & set(self._slot_of):
                cancel[self._slot_of[request_id]] = True
            admitted = []
            while self._free and self._waiting:
                admitted.append((self._waiting.popleft(), self._free.pop(0)))
        for request_id in dropped:  # listeners run outside the lock: they may submit
            self._finish(events, Event(request_id, (), "cancelled"))
        for request_id, slot in admitted:
            self._slot_of[request_id] = slot
            first = self._admit_one(request_id, slot)
            self._emit(events, Event(request_id, (first,)))
        if not self._slot_of:
            return events
        strategy = self._step_strategy(cancel)
        start = time.perf_counter()
        buffer, count = self._run_step(strategy, cancel)
        buffer, count, done, length, rounds, rounds_run = jax.device_get(
            (buffer, count, self.state.done, self.state.length, self.state.rounds, self.state.step)
        )
        if self._variants is not None and rounds_run > self._rounds_run:  # what a round at this k took
            seconds = (time.perf_counter() - start) / (int(rounds_run) - self._rounds_run)
            self._observed = (np.int32(self._step_k), np.float32(seconds))
        self._rounds_run = int(rounds_run)
        for request_id, slot in sorted(self._slot_of.items(), key=lambda item: item[1]):
            completion = self.completions[request_id]
            completion.rounds = int(rounds[slot])
            tokens = tuple(int(t) for t in buffer[slot, : count[slot]])
            reason = None
            if cancel[slot]:
                reason = "cancelled"
            elif done[slot]:
                last = (completion.tokens + list(tokens))[-1]
                reason = "stop" if last == check_eos(completion.request.eos_id, self.vocab_size) else "length"
            if reason is not None:
                del self._slot_of[request_id]
                self._free.append(slot)
                self._finish(events, Event(request_id, tokens, reason))
            elif tokens:
                self._emit(events, Event(request_id, tokens))
        return events

    def _step_strategy(self, cancel: np.ndarray):
        """What the next step runs: the strategy, or for one that picks its variant between steps
        (`at_k`, e.g. SmartSpec: k for the whole step by goodput), that variant, after its
        `prepare_step` (a program of its own): one compiled step per k, no cond on k in a round."""
        if self._variants is None:
            return self.strategy
        self.state, k, restart = _prepare_step(
            *self._graphs[2:], self.state, cancel, *self._observed, strategy=self.strategy, rounds_per_step=self.rounds_per_step
        )
        self._observed = _NOT_OBSERVED
        k, restart = jax.device_get((k, restart))
        self._step_k = int(k)
        if restart.any():
            for request_id, slot in self._slot_of.items():
                if restart[slot]:
                    completion = self.completions[request_id]
                    self._restart_row(slot, completion.request.prompt + tuple(completion.tokens[:-1]))
        return self._variants[int(k)]

    def _run_step(self, strategy, cancel: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """Run one compiled step of `strategy` (the strategy or a variant of it); returns the tokens
        each slot kept and how many. A variant that drafts nothing (`needs_drafter` False, e.g.
        SmartSpec at k = 0) runs without the drafter: its state stays out of the step's loop
        (`without_drafter`) and its weights out of the call, so the step is plain decoding's."""
        state, graphs, drafter_state = self.state, self._graphs, None
        if strategy is not self.strategy and not getattr(strategy, "needs_drafter", True):
            carry, drafter_state = self.strategy.without_drafter(state.carry)
            state, graphs = dataclasses.replace(state, carry=carry), (*self._graphs[:2], None, None)
        state, buffer, count = _step(*graphs, state, cancel, strategy=strategy, rounds_per_step=self.rounds_per_step)
        if drafter_state is not None:
            state = dataclasses.replace(state, carry=self.strategy.with_drafter(state.carry, drafter_state))
        self.state = state
        return buffer, count

    def _restart_row(self, slot: int, sequence: Sequence[int]) -> None:
        """Start row `slot`'s drafter afresh on `sequence` (the row's tokens but its last), padded
        to its `prompt_width`: one program per width, as admissions."""
        tokens = np.zeros((1, self.prompt_width(len(sequence))), np.int32)
        tokens[0, : len(sequence)] = sequence
        self.state = _restart_drafter(
            *self._graphs[2:], self.state, tokens, np.asarray([len(sequence)], np.int32), np.int32(slot), strategy=self.strategy
        )
        self.drafter_restarts += 1

    def _finish(self, events: list[Event], event: Event) -> None:
        """Emit a request's last event and forget the oldest finished requests beyond `keep_finished`."""
        self._emit(events, event)
        self._finished.append(event.request_id)
        while self.keep_finished is not None and len(self._finished) > self.keep_finished:
            self.completions.pop(self._finished.popleft(), None)

    def run(self) -> dict[int, Completion]:
        """Step until idle; returns every request's completion (by id)."""
        while not self.idle:
            self.step()
        return self.completions

    def update_strategy_state(self, update: Callable, *args) -> None:
        """Replace the strategy's state (the carry of every slot) by `update(carry, *args)`, e.g.
        `jspec.methods.smartspec.with_forced_k`, in a compiled program: arrays made on the host
        would make the next admission and step compile again. `update` is static (a module-level
        function compiles once), `args` are values."""
        self.state = _update_carry(self.state, update, *args)

    def strategy_stats(self):
        """The strategy's own counters over the engine's life (`strategy.stats`, e.g. SmartSpec's
        rounds per k), or None."""
        stats = getattr(self.strategy, "stats", None)
        return None if stats is None else jax.device_get(stats(self.state.carry))


def calibrate_smartspec(engine: Engine, *, prompt_len: int = 64, steps: int = 3, passes: int = 2) -> np.ndarray:
    """Measure what a round of the engine's `SmartSpec` costs at each k = 0 .. k_max, with every slot
    busy, and make it the strategy's cost model (in the engine's state: nothing recompiles).

    A round's real cost is more than the target's pass over k + 1 tokens: the drafter's k steps,
    verification, committing, sampling and the host's share of each step, all growing with the
    batch. So the engine runs whole steps at each forced k (`with_forced_k`) on `slots` requests of
    `prompt_len` tokens and times them (`steps` steps after an untimed one), in `passes` passes over
    k = 0 .. k_max, every other one in reverse order, and averages them: a machine whose speed
    drifts during the calibration would otherwise bias the k measured first against the last.
    Returns the seconds per round `[k_max + 1]`. The engine must be idle; it is idle again
    afterwards, with no completions kept."""
    from jspec.methods.smartspec import SmartSpec, with_forced_k

    strategy = engine.strategy
    if not isinstance(strategy, SmartSpec):
        raise ValueError(f"calibrate_smartspec needs an engine with a SmartSpec strategy, got {strategy!r}")
    if not engine.idle:
        raise ValueError("calibrate_smartspec needs an idle engine")
    check_int("steps", steps, 1)
    check_int("passes", passes, 1)
    prompt_len = min(prompt_len, engine.max_len // 2)
    seconds = np.zeros((strategy.k_max + 1,))
    for _, k in alternating_passes(range(strategy.k_max + 1), passes):
        engine.update_strategy_state(with_forced_k, np.int32(k))
        max_new = min(engine.max_len - prompt_len, (steps + 2) * engine.rounds_per_step * (k + 1))
        ids = [engine.submit([0] * prompt_len, max_new_tokens=max_new) for _ in range(engine.slots)]
        engine.step()  # admits them all: the timed steps only decode
        start, rounds = time.perf_counter(), int(engine.state.step)
        for _ in range(steps):
            engine.step()
        seconds[k] += (time.perf_counter() - start) / max(int(engine.state.step) - rounds, 1) / passes
        for request_id in ids:
            engine.cancel(request_id)
        engine.run()
    engine.update_strategy_state(_calibrated, seconds.astype(np.float32))
    engine._observed = _NOT_OBSERVED  # the last forced step's cost is in `seconds` already
    engine.completions.clear()
    engine._finished.clear()
    engine.drafter_restarts = 0
    return seconds


def alternating_passes(items: Sequence, passes: int) -> list[tuple[int, Any]]:
    """(pass, item) over `passes` passes through `items`, every other pass in reverse order: timings
    taken in this order weigh a drift of the machine's speed on every item alike."""
    items = list(items)
    return [(p, item) for p in range(passes) for item in (items if p % 2 == 0 else items[::-1])]


def _calibrated(carry, seconds):
    """The SmartSpec carry choosing k by goodput on the measured `seconds` per round, the
    calibration's rounds not counted, nor what its dummy prompts accepted: the acceptance
    estimates start again from the prior (else a long batch memory serves on a made-up rate)."""
    from jspec.methods.smartspec import with_forced_k, with_round_seconds, without_acceptance

    carry = without_acceptance(with_forced_k(with_round_seconds(carry, seconds), -1))
    return dataclasses.replace(carry, rounds_per_k=jnp.zeros_like(carry.rounds_per_k))


@functools.partial(jax.jit, static_argnums=(1,), donate_argnums=(0,))
def _update_carry(state: SlotState, update: Callable, *args) -> SlotState:
    return dataclasses.replace(state, carry=update(state.carry, *args))
