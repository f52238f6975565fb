"""The `SmartSpec` strategy: one draft length for the whole batch each round, 0 included, chosen by
estimated goodput (SmartSpec, "Optimizing Speculative Decoding for Serving LLMs Using Goodput",
arXiv 2406.14066).

Goodput is the tokens the batch is expected to emit per second of the round. A row's chain of k
drafts emits E(k) = 1 + alpha (1 + alpha_next + ... + alpha_next^(k - 1)) tokens, alpha the row's
estimated acceptance of a first draft and alpha_next of a later one given the one before it was
accepted (`AdaptiveK`'s two rates; with one rate, E is Leviathan et al.'s, arXiv 2211.17192). The
round costs t_target(k + 1), a target pass over k + 1 tokens, plus k drafter steps, both measured
at the batch size being served. Each round picks

    k* = argmax_k  sum over active rows of E_row(k)  /  (t_target(k + 1) + k t_draft),

k in 0..k_max. Under light load a pass over k + 1 tokens costs about as much as one, so k* is long;
as the batch grows the target's pass becomes compute-bound, longer chains cost in proportion and k*
falls to 0: plain decoding, where speculation would slow the batch down.

A k = 0 round runs the target alone, not the drafter. The drafter then falls behind by the rounds'
roots, kept in a buffer of `lag` tokens per row; before the next drafting round, or when the buffer
is full, one drafter pass takes them in (`ModelDrafter.absorb`). A serving engine does not even
do that: it admits requests without starting the drafter, lets a row whose buffer fills fall out
of step (`stale`), and restarts a stale row's drafter from its sequence only when a step drafts
(`restart_drafter`), and runs its k = 0 steps with the drafter's state set aside
(`without_drafter`), so an engine that keeps choosing k = 0 runs plain decoding's program, on a
target cache with a round's slack only (the drafter's cache has its own, `drafter_cache_size`).

Where k is chosen: `round` chooses it on the device every round (`jspec.decode`'s loop) and runs
`round_at(k)` as one of k_max + 1 branches (`jspec.rounds.run_branch`), so a drafting round is a
fixed chain's, with no cut-chain machinery. The branches still cost something: SmolLM2 in bfloat16,
batch 1, CPU, a round forced to k = 2 took 33.2 ms against a fixed chain's 31.3 at 256 tokens of
context, and a k = 0 round 1.1 ms (256 tokens) to 3.0-4.6 ms (896) more than a plain decoding round
(the loop around the pass: called directly, the same round costs what the plain one does). A
serving engine (`jspec.serve.Engine`) chooses k between its compiled steps (`prepare_step`, which
also feeds the drafter its pending roots when due) and runs the step at that k (`at_k`, one program
per k): no branch in a round, so a k = 0 round costs what a plain decoding round does.

The acceptance estimates are SmartSpec's, exponentially decayed counts of accepted and tried drafts
per row, kept for the two rates (as `AdaptiveK`): acceptance can come in bursts (where the drafter
is right once it tends to stay right), and one i.i.d. rate then underrates longer chains.
A new request's estimate starts at the batch's (decayed counts over every row, after `prior`).
The batch's counts have a long memory (`batch_decay`, applied every round): a row's estimate
follows its request (`decay`), the batch's what the drafter accepts over many requests. A k = 0
round observes no acceptance, so there a row's counts shrink (weight `relax`) and its estimate
relaxes toward the batch's, while the batch's keep decaying toward the prior, so the batch probes
speculation again, once it would pay at the prior, only after a few hundred plain rounds. A probe
is dear in a serving engine (every row whose drafter fell behind is restarted from its sequence),
and a short memory let a few poor requests hold a light load at k = 0 (SmolLM2, 2 slots, CPU).

Lossless: k depends only on earlier rounds (never on this round's draws), a drafting round is a
chain verified by speculative sampling (the chain walk), and a k = 0 round samples the target.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jspec.methods.adaptive import expected_chain_tokens, round_counts
from jspec.methods.chain import fixed_chain_round
from jspec.rounds import RoundCarry, SpeculativeStrategy, pad_tokens, plain_step, run_branch
from jspec.validation import check_int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SmartSpecCarry:
    """The round carry; per row, decayed counts `[B, 4]` of first drafts accepted and tried and of
    later drafts accepted and tried (`jspec.methods.adaptive.round_counts`), and the roots of k = 0
    rounds the drafter has not taken in (`pending [B, lag]`, `n_pending [B]`); the same counts over
    every row (`batch_counts [4]`: a new row's prior);
    `rounds_per_k [k_max + 1]`, how many rounds ran at each k (`Stats.strategy`); rows whose drafter
    state is out of step (`stale [B]`: a serving engine restarts it before drafting); the cost model
    and a forced k, as values (`with_round_seconds`, `with_forced_k`; in a serving engine through
    `Engine.update_strategy_state`), so that whoever runs the strategy can measure and replace them
    without recompiling."""

    round: RoundCarry
    counts: jax.Array  # float32 [B, 4]: first drafts accepted, tried; later drafts accepted, tried
    batch_counts: jax.Array  # float32 [4]
    pending: jax.Array
    n_pending: jax.Array
    rounds_per_k: jax.Array
    stale: jax.Array  # bool [B]: the drafter's state is not in step with the row (serving; module doc)
    round_seconds: jax.Array  # float32 [k_max + 1], the cost model (a value: a server re-measures it)
    forced_k: jax.Array  # int32 [], -1: choose by goodput; else run every round at this k (to measure it)


@dataclasses.dataclass(frozen=True)
class SmartSpec(SpeculativeStrategy):
    """A chain whose length, the same for every row of a round, is chosen by goodput (module doc).

    t_target: seconds of a target pass over 1 .. k_max + 1 tokens, and t_draft: seconds of one
    drafter step, both at the batch size being served (build it with `SmartSpec.from_costs`;
    `infer.serve_bench` measures them). decay: the weight of the past in the acceptance counts;
    prior: the acceptance of a first draft assumed before the first drafting round (worth 2 drafts
    tried; a later draft's is assumed to be the first's until later drafts have been tried; a new
    request starts at the batch's estimates); lag: the k = 0 rounds a row's drafter may fall behind
    before it catches up; decay and batch_decay: the weight a round keeps of a row's acceptance
    counts (a drafting round; a k = 0 round keeps `relax` of them) and of the batch's (every
    round; module doc); cost_memory: the weight of the past in a serving engine's running
    measurement of a round's cost at each k (`observe_round_seconds`; 1 keeps the calibrated
    costs). Needs a language-model drafter (one with `absorb`).
    """

    k_max: int = 4
    t_target: tuple[float, ...] = ()
    t_draft: float = 0.0
    decay: float = 0.95
    prior: float = 0.5
    lag: int = 16
    relax: float = 0.95
    batch_decay: float = 0.99
    cost_memory: float = 0.9

    def __post_init__(self):
        check_int("k_max", self.k_max, 1)
        check_int("lag", self.lag, 1)
        if len(self.t_target) != self.k_max + 1 or any(
            isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 for t in self.t_target
        ):
            raise ValueError(
                f"t_target must hold k_max + 1 = {self.k_max + 1} positive seconds (passes over 1 .. k_max + 1 tokens), "
                f"got {self.t_target!r}"
            )
        if isinstance(self.t_draft, bool) or not isinstance(self.t_draft, (int, float)) or not self.t_draft >= 0:
            raise ValueError(f"t_draft must be a number of seconds >= 0, got {self.t_draft!r}")
        for name in ("decay", "prior", "relax", "batch_decay", "cost_memory"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")

    @classmethod
    def from_costs(cls, t_draft: float, t_target, k_max: int | None = None, **kwargs) -> SmartSpec:
        """From measured costs at the served batch size: t_draft, seconds per drafter step, and
        t_target `[n]`, seconds of a target pass over 1 .. n tokens; k_max defaults to n - 1."""
        k_max = len(t_target) - 1 if k_max is None else k_max
        if not 1 <= k_max <= len(t_target) - 1:
            raise ValueError(f"k_max must be in 1..len(t_target) - 1 = {len(t_target) - 1}, got {k_max}")
        return cls(k_max=k_max, t_target=tuple(float(t) for t in t_target[: k_max + 1]), t_draft=float(t_draft), **kwargs)

    @property
    def tokens_per_round(self) -> int:
        return self.k_max + 1

    @property
    def tokens_scored(self) -> int:
        return self.k_max + 1

    def drafter_cache_size(self, target_cache_size: int) -> int:
        """The drafter's cache slots: the target's, plus what the drafter's catch-up pass (`lag`
        slots past its committed length) writes beyond a round's k_max + 1. The target's cache
        keeps only a round's slack: at k = 0 a step reads all of it, and a longer cache costs
        every plain round."""
        return target_cache_size + max(0, self.lag - self.k_max - 1)

    def _start_drafter(self, drafter, prefill):
        return drafter.start(prefill.prompts, prefill.lengths, self.drafter_cache_size(prefill.cache.size))

    def round_seconds(self) -> jax.Array:
        """float32 `[k_max + 1]`: the modelled cost of a round at each k, from the given costs."""
        k = jnp.arange(self.k_max + 1, dtype=jnp.float32)
        return jnp.asarray(self.t_target, jnp.float32) + k * self.t_draft

    def acceptance(self, carry: SmartSpecCarry) -> tuple[jax.Array, jax.Array]:
        """float32 `[B]` each: each row's estimates of alpha (a first draft accepted) and alpha_next
        (a later one, given the one before it was), its decayed counts plus 2 drafts tried at the
        batch's estimate (itself its counts plus 2 drafts tried at `prior`, for alpha_next at the
        batch's alpha). A new request starts at what the batch has been accepting, not at a
        constant."""
        counts, batch = carry.counts, carry.batch_counts
        batch_alpha = (batch[0] + 2.0 * self.prior) / (batch[1] + 2.0)
        # Until later drafts are tried, alpha_next is taken to be alpha (no evidence of bursts): a
        # prior of its own would stay put while k = 1 tries none, and could keep k at 1 for good.
        batch_next = (batch[2] + 2.0 * batch_alpha) / (batch[3] + 2.0)
        alpha = (counts[:, 0] + 2.0 * batch_alpha) / (counts[:, 1] + 2.0)
        return alpha, (counts[:, 2] + 2.0 * batch_next) / (counts[:, 3] + 2.0)

    def goodput(self, carry: SmartSpecCarry, active: jax.Array) -> jax.Array:
        """float32 `[k_max + 1]`: expected tokens per second of the round at each k, over the
        active rows (`active [B]`) and their acceptance estimates (`acceptance`)."""
        expected = expected_chain_tokens(*self.acceptance(carry), self.k_max)  # [B, K + 1]
        return jnp.sum(jnp.where(active[:, None], expected, 0.0), axis=0) / carry.round_seconds

    def choose_k(self, carry: SmartSpecCarry, active: jax.Array) -> jax.Array:
        """int32 `[]`: this round's draft length (0: plain decoding), the goodput's argmax (the
        shortest on ties), or the forced k."""
        best = jnp.argmax(self.goodput(carry, active)).astype(jnp.int32)
        return jnp.where(carry.forced_k >= 0, carry.forced_k, best)

    def init(self, target, drafter, prefill, first_token, sampling) -> SmartSpecCarry:
        del target, sampling
        _check_drafter(drafter)
        return self._carry(RoundCarry(prefill.cache, self._start_drafter(drafter, prefill), first_token), stale=False)

    def init_without_drafter(self, target, drafter, prefill, first_token, sampling) -> SmartSpecCarry:
        """As `init`, but with no drafter pass: every row stale (its drafter state zeros) until
        `restart_drafter`. How a serving engine admits a request: a row served at k = 0 throughout
        never runs the drafter."""
        _check_drafter(drafter)
        shapes = jax.eval_shape(lambda: self._start_drafter(drafter, prefill))
        state = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), shapes)
        return self._carry(RoundCarry(prefill.cache, state, first_token), stale=True)

    def restart_drafter(self, drafter, carry: SmartSpecCarry, row: jax.Array, tokens: jax.Array, length: jax.Array):
        """The carry with row `row`'s drafter started afresh on `tokens [1, W]` (`length [1]` of
        them): the row's sequence (prompt and emitted tokens) but its last, the next root. What a
        serving engine runs for a stale row before a drafting step (`prepare_step`)."""
        state = drafter.restart_row(carry.round.drafter, row, tokens, length)
        return dataclasses.replace(
            carry, round=dataclasses.replace(carry.round, drafter=state), stale=carry.stale.at[row].set(False),
            n_pending=carry.n_pending.at[row].set(0),
        )  # fmt: skip

    def _carry(self, carry: RoundCarry, stale: bool) -> SmartSpecCarry:
        b = carry.last.shape[0]
        return SmartSpecCarry(
            round=carry,
            counts=jnp.zeros((b, 4), jnp.float32),
            batch_counts=jnp.zeros((4,), jnp.float32),
            pending=jnp.zeros((b, self.lag), jnp.int32),
            n_pending=jnp.zeros((b,), jnp.int32),
            rounds_per_k=jnp.zeros((self.k_max + 1,), jnp.int32),
            stale=jnp.full((b,), stale),
            round_seconds=self.round_seconds(),
            forced_k=jnp.asarray(-1, jnp.int32),
        )

    def stats(self, carry: SmartSpecCarry) -> jax.Array:
        """`Stats.strategy`: rounds run at each k, int32 `[k_max + 1]`."""
        return carry.rounds_per_k

    def _catch_up(self, drafter, carry: SmartSpecCarry, active: jax.Array, when: jax.Array) -> SmartSpecCarry:
        """Feed the active rows' pending roots to the drafter if `when` (bool `[]`)."""

        # Only the drafter's state goes through the cond, not the whole carry: XLA may copy what a
        # cond passes through, and the target's cache is the largest buffer there is.
        def absorb(state, n_pending):
            n = jnp.where(active, n_pending, 0)
            return drafter.absorb(state, carry.pending, n), n_pending - n

        state, n_pending = jax.lax.cond(when, absorb, lambda *operands: operands, carry.round.drafter, carry.n_pending)
        return dataclasses.replace(carry, round=dataclasses.replace(carry.round, drafter=state), n_pending=n_pending)

    def round(self, target, drafter, carry: SmartSpecCarry, active, sampling, key):
        """A round whose k is chosen here, on the device, from the carry (`jspec.decode`'s loop), and
        run as `round_at(k)`: one branch per k (`jspec.rounds.run_branch`), so a round at k costs
        what a fixed chain of k does, with no cut-chain machinery. The drafter first takes in its
        pending roots: before a drafting round all of them, before a plain one only when its
        buffer is full. A serving engine instead picks k between its compiled steps and runs
        `at_k(k)` (module doc)."""
        k = self.choose_k(carry, active)
        width = self.tokens_per_round

        def at(j: int):
            def branch(operand):
                carry = operand[0]
                due = carry.n_pending > 0 if j > 0 else carry.n_pending >= self.lag
                carry = self._catch_up(drafter, carry, active, jnp.any(active & due))
                carry, tokens, n_new = self.round_at(j, target, drafter, carry, active, sampling, key)
                return carry, pad_tokens(tokens, width), n_new

            return branch

        b = active.shape[0]
        empty = (carry, jnp.zeros((b, width), jnp.int32), jnp.zeros((b,), jnp.int32))
        return run_branch(k, [at(j) for j in range(self.k_max + 1)], empty)

    def observe_round_seconds(self, carry: SmartSpecCarry, k: jax.Array, seconds: jax.Array) -> SmartSpecCarry:
        """The carry with the cost of a round at k (int32 `[]`; < 0: none observed) moved toward
        `seconds` (float32 `[]`, what a serving step's rounds at k took each, timed by the host),
        keeping `cost_memory` of the old. The calibration's costs are a start: its dummy prompts,
        cache lengths and all-busy slots are not the traffic's."""
        old = carry.round_seconds
        moved = self.cost_memory * old + (1.0 - self.cost_memory) * seconds
        return dataclasses.replace(carry, round_seconds=jnp.where(jnp.arange(self.k_max + 1) == k, moved, old))

    def prepare_step(self, drafter, carry: SmartSpecCarry, active: jax.Array, rounds: int):
        """Between a serving engine's steps: k for the next `rounds` rounds (`choose_k`, int32 `[]`),
        the carry ready for them, and the rows whose drafter the engine must restart first
        (`restart_drafter`; bool `[B]`). Before a drafting step the rows in step take in their
        pending roots; before a plain step a row whose buffer those rounds would overflow falls out
        of step (stale) instead of running the drafter. The rounds of `at_k` never catch up, so no
        cond sits in them."""
        if rounds > self.lag:
            raise ValueError(f"rounds per step ({rounds}) must be at most SmartSpec's lag={self.lag}")
        k = self.choose_k(carry, active)
        drafting = k > 0
        in_step = active & ~carry.stale
        carry = self._catch_up(drafter, carry, in_step, drafting & jnp.any(in_step & (carry.n_pending > 0)))
        stale = carry.stale | (active & ~drafting & (carry.n_pending + rounds > self.lag))
        carry = dataclasses.replace(carry, stale=stale, n_pending=jnp.where(stale, 0, carry.n_pending))
        return carry, k, active & stale & drafting

    def round_at(self, k: int, target, drafter, carry: SmartSpecCarry, active, sampling, key):
        """A round at a static k (0: the target alone, as `jspec.Autoregressive`; else a chain of k
        drafts) with no cond at all: the rounds of `at_k(k)`, after `prepare_step` (which leaves no
        pending root before a drafting step, and room for a plain step's)."""
        if k == 0:
            inner = carry.round
            cache, token = plain_step(target, inner.target_cache, inner.last, active, sampling, key)
            inner = dataclasses.replace(inner, target_cache=cache, last=jnp.where(active, token, inner.last))
            return self._observe(carry, inner, 0, jnp.zeros_like(token), active), token[:, None], jnp.ones_like(token)
        inner, tokens, n_new, accepted = fixed_chain_round(target, drafter, carry.round, k, active, sampling, key)
        return self._observe(carry, inner, k, accepted, active), tokens, n_new

    def without_drafter(self, carry: SmartSpecCarry) -> tuple[SmartSpecCarry, object]:
        """The carry without the drafter's state (None in its place), and that state: what a
        serving engine's k = 0 step carries (`at_k(0)` never reads the drafter), so that a plain
        step's program holds the target's state alone, as plain decoding's does."""
        return dataclasses.replace(carry, round=dataclasses.replace(carry.round, drafter=None)), carry.round.drafter

    def with_drafter(self, carry: SmartSpecCarry, state) -> SmartSpecCarry:
        """The carry with the drafter's `state` put back (`without_drafter`'s inverse)."""
        return dataclasses.replace(carry, round=dataclasses.replace(carry.round, drafter=state))

    def at_k(self, k: int) -> SmartSpecAt:
        """This strategy with every round at k drafts (static): what a serving engine runs for a
        step after choosing k between steps (`prepare_step`); it shares this strategy's carry."""
        check_int("k", k, 0)
        if k > self.k_max:
            raise ValueError(f"k must be at most k_max={self.k_max}, got {k}")
        return SmartSpecAt(self, k)

    def _observe(self, carry: SmartSpecCarry, inner: RoundCarry, k, accepted: jax.Array, active) -> SmartSpecCarry:
        """The carry after a round at k (int or int32 `[]`) in which the active rows accepted
        `accepted [B]` drafts: counts updated (a k = 0 round observes nothing: it shrinks each row's
        counts, so its estimate relaxes toward the batch's; the batch's decay every round) and a
        k = 0 round's roots buffered for the drafter."""
        drafting = k > 0
        plain_rows = active & jnp.asarray(k == 0)
        b = active.shape[0]
        root = carry.round.last
        pending = carry.pending.at[jnp.arange(b), jnp.where(plain_rows, carry.n_pending, self.lag)].set(root, mode="drop")
        drafts = jnp.full(accepted.shape, jnp.maximum(k, 1))  # a k = 0 round's counts are not used
        new = jnp.where(active[:, None], jnp.stack(round_counts(accepted, drafts), axis=1), 0.0)  # [B, 4]
        rows = jnp.where(
            drafting, jnp.where(active[:, None], self.decay * carry.counts + new, carry.counts), self.relax * carry.counts
        )
        batch = self.batch_decay * carry.batch_counts + jnp.where(drafting, jnp.sum(new, axis=0), 0.0)
        return dataclasses.replace(
            carry, round=inner, pending=pending, n_pending=carry.n_pending + plain_rows.astype(jnp.int32),
            counts=rows, batch_counts=batch, rounds_per_k=carry.rounds_per_k.at[k].add(jnp.any(active).astype(jnp.int32)),
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SmartSpecAt:
    """`spec` (a `SmartSpec`) with every round at `k` drafts, a static int: one compiled program
    per k, chosen between steps (`jspec.serve.Engine`). Shares `spec`'s carry, init and sizes."""

    spec: SmartSpec
    k: int

    lossy = False

    @property
    def needs_drafter(self) -> bool:
        """False at k = 0: the step runs on `spec.without_drafter`'s carry, with no drafter."""
        return self.k > 0

    @property
    def tokens_per_round(self) -> int:
        return self.spec.tokens_per_round

    @property
    def tokens_scored(self) -> int:
        return self.spec.tokens_scored

    def check(self, sampling) -> None:
        self.spec.check(sampling)

    def init(self, target, drafter, prefill, first_token, sampling) -> SmartSpecCarry:
        return self.spec.init(target, drafter, prefill, first_token, sampling)

    def stats(self, carry: SmartSpecCarry) -> jax.Array:
        return self.spec.stats(carry)

    def round(self, target, drafter, carry: SmartSpecCarry, active, sampling, key):
        return self.spec.round_at(self.k, target, drafter, carry, active, sampling, key)


def _check_drafter(drafter) -> None:
    if not (hasattr(drafter, "absorb") and hasattr(drafter, "start")):
        raise ValueError(f"SmartSpec needs a language-model drafter (a jspec.models.Transformer), got {type(drafter).__name__}")


def with_round_seconds(carry: SmartSpecCarry, seconds) -> SmartSpecCarry:
    """The carry with the cost model replaced by measured seconds per round at k = 0 .. k_max."""
    return dataclasses.replace(carry, round_seconds=jnp.asarray(seconds, jnp.float32).reshape(carry.round_seconds.shape))


def without_acceptance(carry: SmartSpecCarry) -> SmartSpecCarry:
    """The carry with every acceptance count (each row's and the batch's) cleared: the estimates
    start again from the prior (after rounds that were not real traffic, e.g. a calibration)."""
    return dataclasses.replace(carry, counts=jnp.zeros_like(carry.counts), batch_counts=jnp.zeros_like(carry.batch_counts))


def with_forced_k(carry: SmartSpecCarry, k) -> SmartSpecCarry:
    """The carry running every round at k (None or -1: back to choosing by goodput)."""
    return dataclasses.replace(carry, forced_k=jnp.asarray(-1 if k is None else k, jnp.int32))
