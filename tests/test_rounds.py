"""The strategy protocol (`jspec.rounds`): a method defined outside jspec runs in the unchanged
decode loop, and the round machinery keeps inactive rows as they were."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decode import first3_pvalue

import jspec
from jspec.drafters import ModelDrafter, Prefill, prefill_model
from jspec.eagle import EagleHead
from jspec.methods.chain import draft_chain
from jspec.retrieval import LookupDrafter
from jspec.rounds import TreeStrategy, run_branch

from conftest import TINY, perturbed, random_model


@dataclasses.dataclass(frozen=True)
class ArgmaxChain(TreeStrategy):
    """A method written as a user would, in one module: the drafter's k most likely next tokens in
    a row (its argmax, whatever the sampling), verified as deterministic proposals."""

    k: int = 3
    children = "top_k"  # not sampled: the deterministic tree verifier, lossless at any temperature

    @property
    def size(self) -> int:
        return self.k + 1

    @property
    def max_depth(self) -> int:
        return self.k

    def draft(self, drafter, state, last, sampling, key):
        return draft_chain(drafter, state, last, self.k, jspec.Sampling(), key)


PROMPTS = np.asarray(jax.random.randint(jax.random.key(3), (3, 8), 0, 64), np.int32)
LENGTHS = np.array([8, 3, 5], np.int32)


@pytest.fixture(scope="module")
def target():
    return random_model(TINY, seed=0)


def test_a_strategy_defined_outside_jspec_is_exact_at_temperature_0(target):
    expected = jspec.generate(target, PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=20)
    out = jspec.speculative_generate(
        target, perturbed(target, 0.3, 1), PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=20, strategy=ArgmaxChain(k=3)
    )
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
    assert float(out.stats.mean_accepted) > 1.5


@pytest.mark.slow
def test_a_strategy_defined_outside_jspec_keeps_the_target_law_at_t1():
    assert first3_pvalue(ArgmaxChain(k=2)) > 1e-3


def test_a_non_strategy_is_refused_before_compiling(target):
    with pytest.raises(ValueError, match="strategy must be a strategy of the jspec protocol"):
        jspec.speculative_generate(target, target, PROMPTS, max_new_tokens=4, strategy=object())


@pytest.mark.parametrize(
    "make",
    [
        lambda t: ModelDrafter(perturbed(t, 0.3, 1)),
        lambda t: EagleHead.from_target(t).as_drafter(),
        lambda t: LookupDrafter(t.config.vocab_size),  # no model: prompt lookup
        lambda t: LookupDrafter(t.config.vocab_size, inner=ModelDrafter(perturbed(t, 0.3, 1))),
    ],
    ids=["model", "eagle-head", "lookup", "lookup-over-model"],
)
def test_an_inactive_row_comes_out_of_a_round_as_it_went_in(target, make):
    """Every strategy relies on it: a finished row commits nothing, in either model."""
    drafter = make(target)
    strategy, sampling = jspec.StaticTree((2, 2)), jspec.Sampling()
    lengths = jnp.asarray(LENGTHS)

    @jax.jit
    def init_and_round(prompts):
        logits, cache, features = prefill_model(target, prompts, lengths, 40, drafter.feature_layers)
        first = jnp.argmax(logits, -1).astype(jnp.int32)
        carry = strategy.init(target, drafter, Prefill(prompts, lengths, cache, features), first, sampling)
        active = jnp.array([True, False, True])
        return carry, strategy.round(target, drafter, carry, active, sampling, jax.random.key(0))[0]

    carry, new = init_and_round(jnp.asarray(PROMPTS))
    for before, after in zip(jax.tree.leaves(carry), jax.tree.leaves(new)):
        if before.ndim == 0:
            continue
        if before.shape[0] == 3:  # [B, ...]: the batch axis leads
            np.testing.assert_array_equal(np.asarray(before[1]), np.asarray(after[1]))
        else:  # a cache buffer [L, B, S, ...]: row 1's committed slots
            n = int(carry.target_cache.lengths[1])
            np.testing.assert_array_equal(np.asarray(before[:, 1, : n - 2]), np.asarray(after[:, 1, : n - 2]))
    assert int(new.target_cache.lengths[0]) > int(carry.target_cache.lengths[0])  # an active row moved on


def _whole_buffer_copies(fn, *args, shape: str) -> int:
    """Copies of a whole `shape` buffer in fn's compiled program."""
    hlo = jax.jit(fn, donate_argnums=1).lower(*args).compile().as_text()
    return sum(1 for line in hlo.splitlines() if f"= {shape}" in line and " copy(" in line)


def test_run_branch_runs_the_chosen_branch_alone_and_updates_its_operand_in_place():
    """Each branch writes one row of a large carried buffer (as a round writes the cache): the
    chosen branch alone runs, and the compiled program holds no copy of the buffer, where the same
    branches under `lax.switch` do (the control: XLA copies what a conditional's branches update)."""
    branches = [lambda operand, i=i: (operand[0].at[i].set(i + 1.0), operand[1] + i + 1) for i in range(3)]
    buffer = jnp.zeros((4, 4096), jnp.float32)
    for index in range(3):
        out, count = jax.jit(lambda index, buffer: run_branch(index, branches, (buffer, jnp.int32(0))))(index, buffer)
        np.testing.assert_array_equal(np.asarray(out)[:, 0], [float(i == index) * (index + 1) for i in range(4)])
        assert int(count) == index + 1
    looped = _whole_buffer_copies(lambda i, b: run_branch(i, branches, (b, jnp.int32(0))), 1, buffer, shape="f32[4,4096]")
    switched = _whole_buffer_copies(lambda i, b: jax.lax.switch(i, branches, (b, jnp.int32(0))), 1, buffer, shape="f32[4,4096]")
    assert looped == 0 and switched > 0, (looped, switched)
