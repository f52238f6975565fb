"""jspec.decode: speculative output equals autoregressive output (token for token when greedy,
in distribution when sampling); one compiled program; clear errors before compiling."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jspec
from jspec.decode import PAD_ID, _decode, bucket_size
from jspec.drafters import ModelDrafter, Prefill, prefill_model
from jspec.models import causal_mask, init_cache
from jspec.sampling import Sampling, warp

from conftest import TINY, chi_square_pvalue, perturbed, random_model

MAX_NEW = 24


def _ragged_prompts(seed: int, batch: int, width: int = 10):
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, TINY.vocab_size, (batch, width)).astype(np.int32)
    lengths = rng.integers(1, width + 1, batch).astype(np.int32)
    lengths[0] = width  # one full row
    return prompts, lengths


def _assert_same_output(spec, ar):
    np.testing.assert_array_equal(np.asarray(spec.tokens), np.asarray(ar.tokens))
    np.testing.assert_array_equal(np.asarray(spec.lengths), np.asarray(ar.lengths))


@pytest.mark.parametrize(
    # k up to 8, each chain verifier, and batch sizes 1, 4, 5, 7 and 8 across the cases (batch below)
    "k, verifier",
    [(1, "sampling"), (2, "block"), (4, "sampling"), (6, "block"), (8, "sampling"), (2, "greedy")],
)
def test_greedy_speculative_equals_greedy_autoregressive(k, verifier):
    """Many seeds per compiled program: new random models and ragged prompts, same shapes."""
    batch = 1 + (3 * k + (verifier == "block")) % 8  # batch sizes 1..8 across the cases
    strategy = jspec.Chain(k=k, verifier=verifier)
    for seed in range(3):
        target = random_model(TINY, seed=100 + seed)
        prompts, lengths = _ragged_prompts(seed, batch)
        ar = jspec.generate(target, prompts, prompt_lengths=lengths, max_new_tokens=MAX_NEW)
        for drafter in (perturbed(target, 0.3, seed), random_model(TINY, seed=200 + seed)):
            spec = jspec.speculative_generate(
                target, drafter, prompts, prompt_lengths=lengths, max_new_tokens=MAX_NEW, strategy=strategy
            )
            _assert_same_output(spec, ar)
            assert 1.0 <= float(spec.stats.mean_accepted) <= k + 1
        # A drafter equal to the target: every draft is accepted, tau = k + 1 exactly.
        spec = jspec.speculative_generate(
            target, target, prompts, prompt_lengths=lengths, max_new_tokens=MAX_NEW, strategy=strategy
        )
        _assert_same_output(spec, ar)
        assert float(spec.stats.mean_accepted) == k + 1
    # The noisy drafter must actually exercise partial acceptance (tau strictly between 1 and k+1).
    spec = jspec.speculative_generate(
        target, perturbed(target, 0.3, 0), prompts, prompt_lengths=lengths, max_new_tokens=MAX_NEW, strategy=strategy
    )
    if k > 1:
        assert 1.0 < float(spec.stats.mean_accepted) < k + 1


def test_eos_finishes_rows_independently(tiny_target):
    prompts, lengths = _ragged_prompts(7, 6)
    ar_free = jspec.generate(tiny_target, prompts, prompt_lengths=lengths, max_new_tokens=MAX_NEW)
    eos = int(np.asarray(ar_free.tokens)[0, 5])  # a token row 0 emits mid-way
    ar = jspec.generate(tiny_target, prompts, prompt_lengths=lengths, max_new_tokens=MAX_NEW, eos_id=eos)
    drafter = perturbed(tiny_target, 0.3, 1)
    spec = jspec.speculative_generate(
        tiny_target,
        drafter,
        prompts,
        prompt_lengths=lengths,
        max_new_tokens=MAX_NEW,
        eos_id=eos,
        strategy=jspec.Chain(k=4),
    )
    _assert_same_output(spec, ar)
    tokens, out_lengths = np.asarray(spec.tokens), np.asarray(spec.lengths)
    assert out_lengths[0] <= 6 and tokens[0, out_lengths[0] - 1] == eos
    for row in range(6):
        n = out_lengths[row]
        assert (tokens[row, n:] == PAD_ID).all()
        assert eos not in tokens[row, : n - 1]  # nothing is emitted after an EOS
        assert n == MAX_NEW or tokens[row, n - 1] == eos


def test_stats_count_target_passes(tiny_target):
    prompts, lengths = _ragged_prompts(8, 3)
    ar = jspec.generate(tiny_target, prompts, prompt_lengths=lengths, max_new_tokens=MAX_NEW)
    assert float(ar.stats.mean_accepted) == 1.0
    np.testing.assert_array_equal(ar.stats.target_passes, MAX_NEW - 1)  # the first token comes from prefill
    spec = jspec.speculative_generate(
        tiny_target, perturbed(tiny_target, 0.3, 2), prompts, prompt_lengths=lengths, max_new_tokens=MAX_NEW
    )
    per_round = np.asarray(spec.stats.emitted_per_round)
    np.testing.assert_array_equal(spec.stats.target_passes, (per_round > 0).sum(axis=1))
    assert per_round.max() <= 5
    assert np.isclose(float(spec.stats.mean_accepted), per_round.sum() / (per_round > 0).sum())
    assert (per_round.sum(axis=1) >= MAX_NEW - 1).all()  # the rounds emitted at least what was kept


def test_compiles_once_per_shapes_strategy_and_sampling(tiny_target):
    """New prompts, lengths, weights, keys and acceptance patterns reuse the compiled program, and
    so do nearby prompt widths and token budgets (one bucket: 17..20)."""
    strategy, sampling = jspec.Chain(k=3, verifier="block"), Sampling(temperature=1.0)
    before = _decode._cache_size()
    for seed, (width, max_new) in enumerate([(17, 17), (18, 20), (19, 18), (20, 19)]):
        prompts, lengths = _ragged_prompts(seed, 4, width)
        out = jspec.speculative_generate(
            random_model(TINY, seed),
            perturbed(tiny_target, 0.1 * seed, seed),
            prompts,
            prompt_lengths=lengths,
            max_new_tokens=max_new,
            strategy=strategy,
            sampling=sampling,
            rng=jax.random.key(seed),
        )
        assert out.tokens.shape == (4, max_new) and int(out.lengths.max()) == max_new
    assert _decode._cache_size() == before + 1
    before = _decode._cache_size()
    for width, max_new in [(9, 5), (12, 16), (16, 11)]:
        prompts, lengths = _ragged_prompts(width, 2, width)
        assert jspec.generate(tiny_target, prompts, prompt_lengths=lengths, max_new_tokens=max_new).tokens.shape == (2, max_new)
    assert _decode._cache_size() == before + 1


@pytest.mark.parametrize(
    "n, bucket", [(1, 16), (16, 16), (17, 20), (20, 20), (21, 24), (33, 40), (100, 112), (129, 160), (1000, 1024)]
)
def test_bucket_sizes_are_at_most_a_quarter_larger(n, bucket):
    assert bucket_size(n) == bucket
    assert n <= bucket_size(n) <= max(16, 1.25 * n)


def test_bucketed_greedy_output_equals_an_exact_width_prompt(tiny_target):
    """Padding a prompt to its bucket changes nothing: a row decoded alone at its own width (17,
    bucket 20) and the same row inside a wider batch give the same tokens."""
    prompts, lengths = _ragged_prompts(5, 3, 17)
    batch = jspec.generate(tiny_target, prompts, prompt_lengths=lengths, max_new_tokens=13)
    for row in range(3):
        alone = jspec.generate(tiny_target, prompts[row : row + 1, : lengths[row]], max_new_tokens=13)
        np.testing.assert_array_equal(np.asarray(alone.tokens[0]), np.asarray(batch.tokens[row]))


def test_stream_sees_every_kept_token_in_order(tiny_target):
    """The host callback receives, round by round, exactly the tokens each row keeps: cut at EOS
    and at max_new_tokens, nothing after a row finishes."""
    drafter = perturbed(tiny_target, 0.3, 3)
    prompts, lengths = _ragged_prompts(4, 3)
    for decode in (
        lambda **kw: jspec.generate(tiny_target, prompts, prompt_lengths=lengths, **kw),
        lambda **kw: jspec.speculative_generate(
            tiny_target, drafter, prompts, prompt_lengths=lengths, strategy=jspec.Chain(k=3), **kw
        ),
    ):
        reference = decode(max_new_tokens=MAX_NEW)
        eos = int(reference.tokens[1, 5])  # row 1 stops early at this token
        streamed = [[] for _ in range(3)]

        def stream(tokens, counts):
            for row in range(3):
                streamed[row] += tokens[row, : counts[row]].tolist()

        out = decode(max_new_tokens=MAX_NEW - 1, eos_id=eos, stream=stream)
        assert int(out.lengths[1]) <= 6
        for row in range(3):
            assert streamed[row] == np.asarray(out.tokens[row, : out.lengths[row]]).tolist()


def test_runs_inside_a_user_jit(tiny_target):
    drafter = perturbed(tiny_target, 0.3, 3)
    prompts, lengths = _ragged_prompts(9, 2)

    @jax.jit
    def user_fn(prompts, lengths):
        return jspec.speculative_generate(tiny_target, drafter, prompts, prompt_lengths=lengths, max_new_tokens=8).tokens

    expected = jspec.generate(tiny_target, prompts, prompt_lengths=lengths, max_new_tokens=8).tokens
    np.testing.assert_array_equal(user_fn(prompts, lengths), expected)


def test_round_steps_compose_into_a_user_loop(tiny_target):
    """The strategy protocol's init and round reproduce generate() in a plain Python loop (streaming use)."""
    drafter = ModelDrafter(perturbed(tiny_target, 0.3, 4))
    prompts, lengths = _ragged_prompts(10, 2)
    prompts, lengths = jnp.asarray(prompts), jnp.asarray(lengths)
    strategy, sampling = jspec.Chain(k=3), Sampling()
    size = prompts.shape[1] + 32
    logits, target_cache, _ = prefill_model(tiny_target, prompts, lengths, size)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    carry = strategy.init(tiny_target, drafter, Prefill(prompts, lengths, target_cache, None), first, sampling)
    streamed = [[int(t)] for t in first]
    step = jax.jit(lambda carry, key: strategy.round(tiny_target, drafter, carry, jnp.ones(2, bool), sampling, key))
    while min(map(len, streamed)) < 12:
        carry, tokens, n = step(carry, jax.random.key(0))
        for row in range(2):
            streamed[row] += [int(t) for t in tokens[row, : int(n[row])]]
    expected = np.asarray(jspec.generate(tiny_target, prompts, prompt_lengths=lengths, max_new_tokens=12).tokens)
    for row in range(2):
        assert streamed[row][:12] == list(expected[row])


# --- Distribution: the first 3 tokens at temperature > 0 match the target's exact law. ----------

SMALL = dataclasses.replace(TINY, vocab_size=4, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
PROMPT = np.array([[1, 3, 0, 2, 2]], np.int32)
ROWS, CALLS = 8192, 3


def _exact_first3(target, sampling: Sampling) -> np.ndarray:
    """Probability of each of the 4^3 continuations under the warped target, by enumeration."""
    v = SMALL.vocab_size
    seqs = np.array(list(itertools.product(range(v), repeat=3)), np.int32)  # [64, 3]
    full = np.concatenate([np.repeat(PROMPT, len(seqs), 0), seqs], axis=1)
    b, t = full.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    logits, _ = target(jnp.asarray(full), positions, causal_mask(b, t), init_cache(target.config, b, t))
    probs = np.asarray(warp(logits, sampling))  # [64, T, V]
    p = PROMPT.shape[1]
    steps = [probs[np.arange(b), p - 1 + i, seqs[:, i]] for i in range(3)]
    return np.prod(steps, axis=0)


def _codes(tokens) -> np.ndarray:
    tokens = np.asarray(tokens)[:, :3]
    return tokens[:, 0] * 16 + tokens[:, 1] * 4 + tokens[:, 2]


def _sample_codes(run) -> np.ndarray:
    prompts = np.repeat(PROMPT, ROWS, 0)
    # run returns an `Output` or its tokens
    outputs = (run(prompts, jax.random.key(seed)) for seed in range(CALLS))
    return np.concatenate([_codes(getattr(out, "tokens", out)) for out in outputs])


def unrelated_small_pair():
    """The SMALL target and a drafter unrelated to it: the pair of every exact-distribution test."""
    return random_model(SMALL, seed=11, scale=3.0), random_model(SMALL, seed=12, scale=3.0)


def first3_pvalue(strategy, sampling: Sampling = Sampling(temperature=1.0), pair=None, batch_1: bool = False) -> float:
    """Chi-square p-value of the first 3 tokens of `speculative_generate` with `strategy` (on
    `pair`, by default `unrelated_small_pair()`) against the target's exact distribution. batch_1:
    every sample from a batch of one row (the calls vmapped over keys), for strategies whose
    batch-1 rounds take another path."""
    target, drafter = pair or unrelated_small_pair()

    def run(prompts, key):
        generate = lambda prompts, key: (
            jspec.speculative_generate(  # noqa: E731
                target, drafter, prompts, max_new_tokens=3, strategy=strategy, sampling=sampling, rng=key
            ).tokens
        )
        if not batch_1:
            return generate(prompts, key)
        keys = jax.random.split(key, prompts.shape[0])
        return jax.vmap(lambda key: generate(prompts[:1], key)[0])(keys)

    return chi_square_pvalue(_sample_codes(run), _exact_first3(target, sampling))


@pytest.fixture(scope="module")
def small_pair():
    return unrelated_small_pair()


@pytest.mark.slow
@pytest.mark.parametrize(
    "verifier, sampling",
    [
        ("sampling", Sampling(temperature=1.0)),
        ("block", Sampling(temperature=1.0)),
        ("sampling", Sampling(temperature=0.8, top_k=3)),
        ("block", Sampling(temperature=1.2, top_p=0.9)),
    ],
    ids=["sampling-t1", "block-t1", "sampling-t0.8-topk3", "block-t1.2-topp0.9"],
)
def test_speculative_sampling_matches_exact_target_distribution(small_pair, verifier, sampling):
    target, drafter = small_pair
    exact = _exact_first3(target, sampling)
    codes = _sample_codes(
        lambda prompts, key: jspec.speculative_generate(
            target,
            drafter,
            prompts,
            max_new_tokens=3,
            strategy=jspec.Chain(k=2, verifier=verifier),
            sampling=sampling,
            rng=key,
        )
    )
    assert chi_square_pvalue(codes, exact) > 1e-3


@pytest.mark.slow
def test_distribution_test_has_power(small_pair):
    """Controls for the end-to-end test: autoregressive sampling from the target passes, while
    sampling from the drafter (what a verifier that accepts everything would emit) is rejected."""
    target, drafter = small_pair
    sampling = Sampling(temperature=1.0)
    exact = _exact_first3(target, sampling)
    ar = _sample_codes(lambda p, key: jspec.generate(target, p, max_new_tokens=3, sampling=sampling, rng=key))
    assert chi_square_pvalue(ar, exact) > 1e-3
    wrong = _sample_codes(lambda p, key: jspec.generate(drafter, p, max_new_tokens=3, sampling=sampling, rng=key))
    assert chi_square_pvalue(wrong, exact) < 1e-6


# --- Bad input: a ValueError naming the argument, raised before anything is compiled. ---------


def _bad_calls(target, drafter):
    prompts = np.zeros((2, 6), np.int32)
    ok = dict(max_new_tokens=8)
    other_vocab = random_model(dataclasses.replace(TINY, vocab_size=32), 0)
    short_drafter = random_model(dataclasses.replace(TINY, max_seq_len=10), 0)
    spec = lambda **kw: jspec.speculative_generate(target, kw.pop("drafter", drafter), kw.pop("prompts", prompts), **{**ok, **kw})
    # case -> (regex the message must match, the call)
    return {
        "prompt+max_new_tokens>target": ("max_new_tokens=60 need 66 positions.*target", lambda: spec(max_new_tokens=60)),
        "max_new_tokens<1": ("max_new_tokens must be an int >= 1, got 0", lambda: spec(max_new_tokens=0)),
        "prompt+max_new_tokens>drafter": ("drafter's max_seq_len=10", lambda: spec(drafter=short_drafter)),
        "vocab_mismatch": ("drafter vocab_size=32", lambda: spec(drafter=other_vocab)),
        "k<1": ("k must be an int >= 1, got 0", lambda: spec(strategy=jspec.Chain(k=0))),
        "temperature<0": ("temperature must be .* got -1.0", lambda: spec(sampling=Sampling(temperature=-1.0))),
        "top_p>1": ("top_p must be .* got 1.5", lambda: spec(sampling=Sampling(temperature=1.0, top_p=1.5))),
        "top_p=0": ("top_p must be .* got 0", lambda: spec(sampling=Sampling(temperature=1.0, top_p=0))),
        "top_k<1": ("top_k must be .* got 0", lambda: spec(sampling=Sampling(temperature=1.0, top_k=0))),
        "prompts_dtype": ("prompts must have an integer dtype", lambda: spec(prompts=prompts.astype(np.float32))),
        "prompts_rank": ("prompts must have rank 2", lambda: spec(prompts=prompts[0])),
        "lengths_dtype": ("prompt_lengths must have an integer dtype", lambda: spec(prompt_lengths=np.array([1.0, 2.0]))),
        "lengths_rank": ("prompt_lengths must have rank 1", lambda: spec(prompt_lengths=np.ones((2, 1), np.int32))),
        "lengths_shape": ("prompt_lengths must have shape \\[2\\]", lambda: spec(prompt_lengths=np.ones(3, np.int32))),
        "lengths<1": ("prompt_lengths must lie in \\[1, 6\\].*got 0", lambda: spec(prompt_lengths=np.array([0, 3]))),
        "lengths>P": ("prompt_lengths must lie in \\[1, 6\\].*got 7", lambda: spec(prompt_lengths=np.array([7, 3]))),
        "token_out_of_vocab": ("prompts hold token id 64", lambda: spec(prompts=np.full((2, 6), 64))),
        "rng_missing": ("rng is required", lambda: spec(sampling=Sampling(temperature=1.0))),
        "rng_wrong": ("rng must be a JAX PRNG key", lambda: spec(rng=np.arange(3))),
        "eos_id": ("eos_id must be .* got 64", lambda: spec(eos_id=64)),
        "greedy_verifier_sampling": (
            "verifier 'greedy' is only lossless",
            lambda: spec(strategy=jspec.Chain(k=2, verifier="greedy"), sampling=Sampling(1.0), rng=jax.random.key(0)),
        ),
        "unknown_verifier": ("verifier must be one of", lambda: spec(strategy=jspec.Chain(k=2, verifier="typical"))),
        "strategy_type": ("strategy must be", lambda: spec(strategy=4)),
        "drafter_type": ("drafter must be a jspec.models.Transformer", lambda: spec(drafter="model")),
        "generate_prompts_dtype": (
            "prompts must have an integer dtype",
            lambda: jspec.generate(target, prompts.astype(float), **ok),
        ),
        "generate_budget": ("max_new_tokens=100 need 106 positions", lambda: jspec.generate(target, prompts, max_new_tokens=100)),
    }


BAD_CASES = list(_bad_calls(None, None))


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_raises_before_compiling(tiny_target, case):
    pattern, call = _bad_calls(tiny_target, perturbed(tiny_target, 0.1, 0))[case]
    before = _decode._cache_size()
    with pytest.raises(ValueError, match=pattern):
        call()
    assert _decode._cache_size() == before
