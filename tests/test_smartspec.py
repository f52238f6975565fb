"""SmartSpec (`jspec.methods.smartspec`): exact at T=0 while k switches between 0 and longer
chains, the target's law at T=1, k chosen by goodput from the measured costs, and the drafter's
catch-up after plain rounds (`ModelDrafter.absorb`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_decode import first3_pvalue

import jspec
from jspec.drafters import ModelDrafter, Prefill, prefill_model
from jspec.methods.smartspec import SmartSpecCarry, with_forced_k, with_round_seconds
from jspec.rounds import RoundCarry

from conftest import TINY, assert_greedy_matches_target, causal_logits, random_model

PROMPTS = np.asarray(jax.random.randint(jax.random.key(5), (3, 10), 0, 64), np.int32)
LENGTHS = np.array([10, 3, 6], np.int32)
CHEAP = dict(t_draft=0.2, t_target=[1.0, 1.1, 1.15, 1.2, 1.3])  # a target pass barely grows with its tokens


def carry_with(strategy, alpha: list[float], forced_k: int = -1, n: float = 1e6, alpha_next=None) -> SmartSpecCarry:
    """A carry whose rows have accepted `alpha` of n first drafts and `alpha_next` (default: alpha)
    of n later ones (n large: the estimates are alpha and alpha_next)."""
    first = jnp.asarray(alpha, jnp.float32)
    later = first if alpha_next is None else jnp.asarray(alpha_next, jnp.float32)
    counts = n * jnp.stack([first, jnp.ones_like(first), later, jnp.ones_like(first)], axis=1)
    return SmartSpecCarry(None, counts, jnp.zeros((4,)), None, None, None, None, strategy.round_seconds(), jnp.int32(forced_k))


def test_greedy_output_equals_the_target_s_while_k_switches():
    """lag=3: plain rounds fill the drafter's buffer and force catch-ups mid-run."""
    assert_greedy_matches_target(random_model(TINY, seed=0), jspec.SmartSpec.from_costs(**CHEAP, lag=3), PROMPTS, LENGTHS)


def test_k_is_the_goodput_argmax_of_the_cost_model():
    cheap = jspec.SmartSpec.from_costs(**CHEAP)
    active = jnp.ones((2,), bool)
    ks = [int(cheap.choose_k(carry_with(cheap, [a, a]), active)) for a in (0.0, 0.3, 0.6, 0.9, 1.0)]
    assert ks[0] == 0 and ks[-1] == 4 and ks == sorted(ks)  # longer chains as acceptance grows
    # By hand at alpha 0.6: E(k) = 1, 1.6, 1.96, 2.176, 2.306 over costs 1, 1.3, 1.55, 1.8, 2.1.
    expected = np.asarray([1.0, 1.6, 1.96, 2.176, 2.3056]) / np.asarray([1.0, 1.3, 1.55, 1.8, 2.1])
    np.testing.assert_allclose(np.asarray(cheap.goodput(carry_with(cheap, [0.6, 0.6]), active)) / 2, expected, rtol=1e-5)
    assert int(cheap.choose_k(carry_with(cheap, [0.6, 0.6]), active)) == int(np.argmax(expected))
    # Bursty acceptance (alpha 0.5, alpha_next 0.8): E(k) = 1, 1.5, 1.9, 2.22, 2.476, so a longer
    # chain than one rate of 0.5 gives (E(k) = 1, 1.5, 1.75, 1.875, 1.9375: k = 1 at these costs).
    bursty = carry_with(cheap, [0.5, 0.5], alpha_next=[0.8, 0.8])
    expected = np.asarray([1.0, 1.5, 1.9, 2.22, 2.476]) / np.asarray([1.0, 1.3, 1.55, 1.8, 2.1])
    np.testing.assert_allclose(np.asarray(cheap.goodput(bursty, active)) / 2, expected, rtol=1e-5)
    assert int(cheap.choose_k(carry_with(cheap, [0.5, 0.5]), active)) == 1 and int(cheap.choose_k(bursty, active)) == 3
    # A compute-bound batch (a pass costs in proportion to its tokens): never speculate.
    busy = jspec.SmartSpec.from_costs(0.05, [1.0, 2.0, 3.0, 4.0])
    assert all(int(busy.choose_k(carry_with(busy, [a, a]), active)) == 0 for a in (0.5, 0.9, 0.99))
    # Only active rows count: an idle row's high estimate does not lengthen the chain.
    assert int(cheap.choose_k(carry_with(cheap, [0.0, 1.0]), jnp.asarray([True, False]))) == 0
    # The cost model and a forced k are values in the carry (measured and set by a server).
    measured = with_round_seconds(carry_with(cheap, [0.9, 0.9]), [1.0, 3.0, 5.0, 7.0, 9.0])
    assert int(cheap.choose_k(measured, active)) == 0
    assert int(cheap.choose_k(with_forced_k(measured, 3), active)) == 3
    assert int(cheap.choose_k(with_forced_k(with_forced_k(measured, 3), None), active)) == 0


def test_a_new_row_starts_at_the_batch_s_estimate_and_plain_rounds_relax_toward_it():
    s = jspec.SmartSpec.from_costs(**CHEAP, prior=0.5, decay=0.5, relax=0.5, batch_decay=0.25)
    pending = (
        jnp.zeros((2, s.lag), jnp.int32),
        jnp.zeros((2,), jnp.int32),
        jnp.zeros((s.k_max + 1,), jnp.int32),
        jnp.zeros((2,), bool),
    )
    root = RoundCarry(None, None, jnp.zeros((2,), jnp.int32))
    carry = SmartSpecCarry(root, jnp.zeros((2, 4)), jnp.zeros((4,)), *pending, s.round_seconds(), jnp.int32(-1))
    np.testing.assert_allclose(s.acceptance(carry), [[0.5, 0.5], [0.5, 0.5]])  # nothing seen yet: the prior
    # Row 0 accepts 1 of 2 drafts (first accepted of 1 tried, later 0 of 1), row 1 is idle. The
    # batch: alpha (1 + 1) / (1 + 2) = 2/3, alpha_next (0 + 2 * 2/3) / (1 + 2) = 4/9 (its prior is
    # the batch's alpha); row 0 its own counts plus 2 tried at the batch's: (1 + 4/3) / 3 and
    # (0 + 8/9) / 3; row 1 (a new request) the batch's.
    carry = s._observe(carry, carry.round, 2, jnp.asarray([1, 0]), jnp.asarray([True, False]))
    np.testing.assert_allclose(s.acceptance(carry), [[7 / 9, 2 / 3], [8 / 27, 4 / 9]], rtol=1e-6)
    assert int(carry.n_pending.sum()) == 0
    # A plain round halves a row's counts (relax 0.5) and quarters the batch's (batch_decay 0.25):
    # the batch's (0.25 + 1) / (0.25 + 2) = 5/9 and (0 + 10/9) / 2.25; row 0's (0.5 + 10/9) / 2.5
    # and (0 + 80/81) / 2.5.
    carry = s._observe(carry, carry.round, 0, jnp.zeros((2,), jnp.int32), jnp.asarray([True, True]))
    np.testing.assert_allclose(s.acceptance(carry), [[29 / 45, 5 / 9], [32 / 81, 40 / 81]], rtol=1e-6)
    assert carry.n_pending.tolist() == [1, 1] and carry.rounds_per_k.tolist() == [1, 0, 1, 0, 0]


def test_a_step_s_measured_round_cost_moves_the_cost_model():
    s = jspec.SmartSpec.from_costs(**CHEAP, cost_memory=0.75)
    carry = carry_with(s, [0.5])
    moved = s.observe_round_seconds(carry, jnp.int32(2), jnp.float32(2.0))  # 0.75 * 1.55 + 0.25 * 2
    np.testing.assert_allclose(moved.round_seconds, [1.0, 1.3, 1.6625, 1.8, 2.1], rtol=1e-6)
    unchanged = s.observe_round_seconds(carry, jnp.int32(-1), jnp.float32(2.0))  # no step observed
    np.testing.assert_array_equal(unchanged.round_seconds, carry.round_seconds)


def test_absorb_brings_the_drafter_in_step():
    """After plain rounds with roots r1..rm, the drafter's next logits are a full pass's."""
    model = random_model(TINY, seed=3)
    prompts = jnp.asarray(PROMPTS[:, :6])
    roots = jnp.asarray([[7, 11, 12, 0], [8, 21, 0, 0], [9, 0, 0, 0]], jnp.int32)  # rows take in 3, 2, 0 roots
    n = jnp.asarray([3, 2, 0], jnp.int32)
    last = jnp.asarray([13, 22, 9], jnp.int32)

    @nnx.jit
    def next_logits(model):
        drafter = ModelDrafter(model)
        lengths = jnp.full((3,), 6, jnp.int32)
        _, cache, _ = prefill_model(model, prompts, lengths, 40)
        state = drafter.prefill(Prefill(prompts, lengths, cache, None), roots[:, 0], 4)  # the first root: the first token
        return drafter.catch_up(drafter.absorb(state, roots, n), last)[0]

    logits = next_logits(model)
    for row in range(3):
        seq = list(PROMPTS[row, :6]) + list(roots[row, : int(n[row])]) + [int(last[row])]
        full = causal_logits(model, jnp.asarray([seq], jnp.int32))[0, -1]
        np.testing.assert_allclose(np.asarray(logits[row]), np.asarray(full), atol=2e-4)


def test_plain_steps_leave_rows_stale_and_a_restart_brings_the_drafter_in_step():
    """Serving: before a plain step whose rounds would overflow a row's buffer the row falls out of
    step (no drafter pass); before a drafting step the active stale rows are to be restarted, and
    `restart_drafter` on a row's sequence gives the drafter a full pass's next logits."""
    model = random_model(TINY, seed=3)
    drafter = ModelDrafter(model)
    s = jspec.SmartSpec.from_costs(**CHEAP, lag=3)
    prompts, lengths = jnp.asarray(PROMPTS), jnp.asarray(LENGTHS)
    _, cache, _ = prefill_model(model, prompts, lengths, 40)
    carry = s.init(model, drafter, Prefill(prompts, lengths, cache, None), prompts[:, 0], jspec.Sampling())
    carry = dataclasses.replace(carry, n_pending=jnp.asarray([2, 1, 2], jnp.int32))
    active = jnp.asarray([True, True, False])
    plain, k, restart = s.prepare_step(drafter, with_forced_k(carry, 0), active, 2)
    assert int(k) == 0 and plain.stale.tolist() == [True, False, False] and not restart.any()  # 2 + 2 > lag: row 0
    assert plain.n_pending.tolist() == [0, 1, 2]  # the idle row 2 is left as it was
    assert (plain.round.drafter.cache.lengths == carry.round.drafter.cache.lengths).all()  # no drafter pass
    drafting, k, restart = s.prepare_step(drafter, with_forced_k(plain, 2), active, 2)
    assert int(k) == 2 and restart.tolist() == [True, False, False]
    sequence = [int(t) for t in PROMPTS[0]] + [7, 11, 12]  # the row's tokens, its last (13) the next root
    tokens = jnp.zeros((1, 16), jnp.int32).at[0, : len(sequence)].set(jnp.asarray(sequence))
    restarted = s.restart_drafter(drafter, drafting, jnp.int32(0), tokens, jnp.asarray([len(sequence)], jnp.int32))
    assert restarted.stale.tolist() == [False, False, False] and int(restarted.n_pending[0]) == 0
    logits = drafter.catch_up(restarted.round.drafter, jnp.asarray([13, 0, 0], jnp.int32))[0]
    full = causal_logits(model, jnp.asarray([sequence + [13]], jnp.int32))[0, -1]
    np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(full), atol=2e-4)
    assert int(restarted.round.drafter.cache.lengths[1]) == int(drafting.round.drafter.cache.lengths[1])  # row 1 untouched


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="t_target must hold"):
        jspec.SmartSpec(k_max=2, t_target=(1.0, 1.1))
    with pytest.raises(ValueError, match="t_target must hold"):
        jspec.SmartSpec(k_max=1, t_target=(1.0, -1.0))
    with pytest.raises(ValueError, match="k_max must be in"):
        jspec.SmartSpec.from_costs(0.1, [1.0, 1.1], k_max=3)
    with pytest.raises(ValueError, match="t_draft"):
        jspec.SmartSpec.from_costs(-0.1, [1.0, 1.1])
    with pytest.raises(ValueError, match="relax"):
        jspec.SmartSpec.from_costs(**CHEAP, relax=2.0)
    with pytest.raises(ValueError, match="cost_memory"):
        jspec.SmartSpec.from_costs(**CHEAP, cost_memory=1.5)
    with pytest.raises(ValueError, match="batch_decay"):
        jspec.SmartSpec.from_costs(**CHEAP, batch_decay=-0.1)
    with pytest.raises(ValueError, match="lag"):
        jspec.SmartSpec.from_costs(**CHEAP, lag=0)


@pytest.mark.slow
def test_the_first_three_tokens_follow_the_target_s_law_at_t1():
    """With an unrelated drafter the estimate falls, so rounds at k = 0 and k > 0 both occur."""
    assert first3_pvalue(jspec.SmartSpec.from_costs(0.05, [1.0, 1.02, 1.04], lag=2)) > 1e-3
