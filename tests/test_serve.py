"""jspec.serve: the engine's output equals decoding each request alone (greedy, token for token,
under random arrivals, slot reuse, cancellations and mixed sampling settings), its samples follow
the target's law at T=1, streaming, and bad requests are refused before anything runs."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from test_decode import PROMPT, _codes, _exact_first3, unrelated_small_pair

import jspec
from jspec.methods.smartspec import with_forced_k, with_round_seconds
from jspec.serve import Engine, Event, alternating_passes, calibrate_smartspec

from conftest import TINY, chi_square_pvalue, perturbed, random_model

MAX_NEW = 24
# Cheap chains: k > 0 until acceptance drops. The given costs stay (cost_memory 1: no step's timing
# moves them), so k follows the acceptance alone.
SMARTSPEC = dict(t_draft=0.2, t_target=[1.0, 1.1, 1.15, 1.2], lag=3, cost_memory=1.0)


@pytest.fixture(scope="module")
def models():
    target = random_model(TINY, seed=0)
    return target, perturbed(target, 0.3, seed=1), perturbed(target, 1.0, seed=1)


@pytest.fixture(scope="module")
def requests():
    """12 ragged prompts and each one's greedy continuation from `jspec.generate` (no EOS)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 20, 12)
    prompts = [[int(t) for t in rng.integers(0, TINY.vocab_size, n)] for n in lengths]
    return prompts, rng.integers(1, MAX_NEW + 1, 12)


def greedy_reference(target, prompts) -> list[list[int]]:
    padded = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
    for row, p in enumerate(prompts):
        padded[row, : len(p)] = p
    out = jspec.generate(target, padded, prompt_lengths=np.asarray([len(p) for p in prompts]), max_new_tokens=MAX_NEW)
    return [list(map(int, row)) for row in np.asarray(out.tokens)]


def expected_output(reference: list[int], max_new: int, eos: int | None) -> list[int]:
    """A greedy output: the reference cut at max_new tokens and after the first EOS."""
    out = reference[:max_new]
    return out[: out.index(eos) + 1] if eos in out else out


@pytest.mark.parametrize("method", ["chain", "smartspec", "ar"])
def test_engine_output_equals_each_request_decoded_alone(models, requests, method):
    """Random arrivals into 3 slots (so slots are reused), different max_new_tokens and EOS per
    request, sampled requests in the same batches, and cancellations (one queued, one running):
    every greedy request's output equals `jspec.generate` on its prompt alone, token for token."""
    target, close, poor = models
    prompts, max_new = requests
    reference = greedy_reference(target, prompts)
    eos = reference[0][5]  # a token the outputs contain: some requests stop at it
    drafter, strategy = {
        "chain": (close, jspec.Chain(k=3)),
        "smartspec": (poor, jspec.SmartSpec.from_costs(**SMARTSPEC)),  # a poor drafter: k switches between 0 and more
        "ar": (None, jspec.Autoregressive()),
    }[method]
    engine = Engine(target, drafter, strategy, slots=3, max_len=48, rounds_per_step=2)
    rng = np.random.default_rng(1)
    order = rng.permutation(len(prompts))
    ids, sampled, events = {}, {}, {}
    for i in order:
        for _ in range(rng.integers(0, 3)):  # 0-2 steps between arrivals
            engine.step()
        kwargs = dict(eos_id=eos if i % 2 else None, max_new_tokens=int(max_new[i]))
        if i % 4 == 3:  # a sampled request in the same batches as the greedy ones
            kwargs.update(temperature=1.0, top_p=0.9, seed=int(i))
        ids[i] = engine.submit(prompts[i], on_event=events.setdefault(i, []).append, **kwargs)
        sampled[i] = i % 4 == 3
        if i == order[4]:
            engine.cancel(ids[i])  # still queued
    engine.step()
    engine.cancel(ids[order[-3]])  # admitted, possibly running
    completions = engine.run()
    assert engine.idle and sorted(engine._free) == [0, 1, 2]
    for i, request_id in ids.items():
        c = completions[request_id]
        assert [t for e in events[i] for t in e.tokens] == c.tokens and events[i][-1].finish_reason == c.finish_reason
        if i in (order[4], order[-3]):
            assert c.finish_reason == "cancelled"
            if i == order[4]:
                assert c.tokens == []
            continue
        assert c.finish_reason in ("stop", "length") and 1 <= len(c.tokens) <= max_new[i]
        if sampled[i]:
            continue
        expected = expected_output(reference[i], int(max_new[i]), eos if i % 2 else None)
        assert c.tokens == expected, (i, c.tokens, expected)
        assert c.finish_reason == ("stop" if expected[-1] == eos and i % 2 else "length")
    if method == "smartspec":
        rounds_per_k = engine.strategy_stats()
        assert rounds_per_k[0] > 0 and rounds_per_k[1:].sum() > 0  # both plain and drafting rounds ran
        assert engine.drafter_restarts > 0  # admitted without a drafter pass: restarted to draft


def law_codes(engine: Engine, n: int, temperature: float = 1.0) -> np.ndarray:
    """First 3 tokens of n requests of PROMPT through the engine (greedy requests interleaved,
    checked equal to each other), as codes 0..63."""
    prompt = [int(t) for t in PROMPT[0]]
    sampled = [engine.submit(prompt, max_new_tokens=3, temperature=temperature, seed=s) for s in range(n)]
    greedy = [engine.submit(prompt, max_new_tokens=3) for _ in range(4)]
    completions = engine.run()
    assert len({tuple(completions[i].tokens) for i in greedy}) == 1
    return _codes(np.asarray([completions[i].tokens for i in sampled]))


@pytest.mark.slow
def test_engine_samples_follow_the_target_s_law_at_t1():
    """SmartSpec through the engine (greedy requests in the same batches): the first 3 tokens follow
    the target's exact law; the same test rejects an engine sampling from the drafter."""
    target, drafter = unrelated_small_pair()
    exact = _exact_first3(target, jspec.Sampling(temperature=1.0))
    strategy = jspec.SmartSpec.from_costs(0.05, [1.0, 1.02, 1.04], lag=2)
    engine = Engine(target, drafter, strategy, slots=32, max_len=16, rounds_per_step=2, seed=3)
    assert chi_square_pvalue(law_codes(engine, 4000), exact) > 1e-3
    assert engine.strategy_stats()[1:].sum() > 0
    wrong = Engine(drafter, None, jspec.Autoregressive(), slots=32, max_len=16, rounds_per_step=2)
    assert chi_square_pvalue(law_codes(wrong, 4000), exact) < 1e-6


def test_bad_requests_and_engines_are_refused(models):
    target, close, _ = models
    engine = Engine(target, close, jspec.Chain(k=2), slots=2, max_len=30)
    bad = [
        (dict(prompt=[1] * 20, max_new_tokens=11), "max_len=30"),
        (dict(prompt=[], max_new_tokens=4), "prompt"),
        (dict(prompt="hello", max_new_tokens=4), "prompt"),
        (dict(prompt=[1, 64], max_new_tokens=4), "prompt"),
        (dict(prompt=[1, 2], max_new_tokens=0), "max_new_tokens"),
        (dict(prompt=[1, 2], max_new_tokens=4, temperature=-1.0), "temperature"),
        (dict(prompt=[1, 2], max_new_tokens=4, temperature=1.0, top_p=0.0), "top_p"),
        (dict(prompt=[1, 2], max_new_tokens=4, temperature=1.0, top_p=1.5), "top_p"),
        (dict(prompt=[1, 2], max_new_tokens=4, eos_id=64), "eos_id"),
        (dict(prompt=[1, 2], max_new_tokens=4, seed=-1), "seed"),
    ]
    for kwargs, name in bad:
        with pytest.raises(ValueError, match=name):
            engine.submit(kwargs.pop("prompt"), **kwargs)
    assert engine.idle and engine.completions == {}
    with pytest.raises(ValueError, match="slots"):
        Engine(target, close, slots=0, max_len=30)
    with pytest.raises(ValueError, match="max_seq_len"):
        Engine(target, close, slots=2, max_len=TINY.max_seq_len + 1)
    with pytest.raises(ValueError, match="verifier 'greedy'"):
        Engine(target, close, jspec.Chain(k=2, verifier="greedy"), slots=2, max_len=30)
    with pytest.raises(ValueError, match="needs one"):
        Engine(target, None, jspec.Chain(k=2), slots=2, max_len=30)
    with pytest.raises(ValueError, match="prompt's width"):
        Engine(target, None, KeepsPrompt(), slots=2, max_len=30)
    with pytest.raises(ValueError, match="lag=3"):  # a step's plain rounds would overflow the drafter's buffer
        Engine(target, close, jspec.SmartSpec.from_costs(**SMARTSPEC), slots=2, max_len=30, rounds_per_step=4)
    with pytest.raises(ValueError, match="not .*'prepare_step'"):  # half of the per-step protocol
        Engine(target, None, ChoosesKWithoutPreparing(), slots=2, max_len=30)


@dataclasses.dataclass(frozen=True)
class ChoosesKWithoutPreparing(jspec.Autoregressive):
    """A strategy with a step program per k but no `prepare_step` (nor the rest): refused."""

    k_max = 1

    def at_k(self, k):
        return self


@dataclasses.dataclass(frozen=True)
class KeepsPrompt(jspec.Autoregressive):
    """A strategy whose state holds the prompt as given (its width varies): not servable."""

    def init(self, target, drafter, prefill, first_token, sampling):
        return super().init(target, drafter, prefill, first_token, sampling), prefill.prompts


def test_unknown_and_finished_requests_cancel_quietly(models):
    target, close, _ = models
    engine = Engine(target, close, jspec.Chain(k=2), slots=1, max_len=30)
    request = engine.submit([3, 4, 5], max_new_tokens=2)
    assert engine.run()[request].finish_reason == "length"
    engine.cancel(request)
    engine.cancel(12345)
    assert engine.step() == [] and engine.idle
    assert isinstance(Event(0, ()), Event)


def test_calibration_measures_each_k_and_sets_the_cost_model(models):
    target, _, poor = models
    strategy = jspec.SmartSpec.from_costs(**{**SMARTSPEC, "cost_memory": 0.9})
    engine = Engine(target, poor, strategy, slots=2, max_len=40, rounds_per_step=2)
    seconds = calibrate_smartspec(engine, prompt_len=8, steps=1, passes=2)  # k = 0..3, then 3..0
    assert seconds.shape == (4,) and (seconds > 0).all()
    carry = engine.state.carry
    np.testing.assert_allclose(np.asarray(carry.round_seconds), seconds, rtol=1e-6)
    assert int(carry.forced_k) == -1 and not np.asarray(engine.strategy_stats()).any()  # calibration rounds not counted
    assert not np.asarray(carry.counts).any() and not np.asarray(carry.batch_counts).any()  # nor what they accepted
    assert engine.idle and engine.completions == {}
    engine.update_strategy_state(with_forced_k, 2)
    engine.update_strategy_state(with_round_seconds, np.full((4,), 5.0, np.float32))  # far off: 5 s a round
    engine.submit([1, 2, 3], max_new_tokens=9)
    engine.run()
    rounds_per_k = np.asarray(engine.strategy_stats())
    assert rounds_per_k[2] > 0 and rounds_per_k.sum() == rounds_per_k[2]
    # Each step's timed rounds moved the cost at k = 2 toward what they took (milliseconds), from
    # the second step on (a step's cost is taken in before the next); the other costs stay put.
    measured = np.asarray(engine.state.carry.round_seconds)
    assert measured[2] < 5.0 and (measured[[0, 1, 3]] == 5.0).all()
    with pytest.raises(ValueError, match="SmartSpec"):
        calibrate_smartspec(Engine(target, None, jspec.Autoregressive(), slots=1, max_len=40))


def test_after_warm_up_serving_compiles_nothing(models):
    """`warm_up` compiles every program a request can need, also for weights committed to a device
    (as loaded ones are): a state whose arrays were not committed made the first admission after a
    step compile again (seconds for SmolLM2, while serving)."""
    from jspec.serve import _admit, _prepare_step, _restart_drafter, _step

    target, _, poor = (nnx.merge(graph, jax.device_put(state, jax.devices()[0])) for graph, state in map(nnx.split, models))
    engine = Engine(target, poor, jspec.SmartSpec.from_costs(**SMARTSPEC), slots=2, max_len=30, rounds_per_step=2)
    engine.warm_up()
    programs = (_admit, _step, _prepare_step, _restart_drafter)
    compiled = [f._cache_size() for f in programs]
    for n in (3, 9, 17, 2):
        engine.submit(list(range(1, n + 1)), max_new_tokens=6)
    engine.run()
    assert engine.strategy_stats()[0] > 0 and engine.strategy_stats()[1:].sum() > 0  # both kinds of step ran
    assert [f._cache_size() for f in programs] == compiled


def test_alternating_passes_reverse_every_other_pass():
    assert alternating_passes(["ar", "smartspec"], 3) == [
        (0, "ar"),
        (0, "smartspec"),
        (1, "smartspec"),
        (1, "ar"),
        (2, "ar"),
        (2, "smartspec"),
    ]
