"""jspec.verify: each lossless chain verifier reproduces the target distribution, and the same
test rejects broken rules (negative controls)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jspec.sampling import residual, sample
from jspec.verify.chain import (
    CHAIN_VERIFIERS,
    Verdict,
    block_weights,
    verify_block,
    verify_greedy,
    verify_sampling,
)

from conftest import chi_square_pvalue

TRIALS = 200_000
VOCAB, K = 6, 3


def _problem(seed: int, vocab: int = VOCAB, k: int = K):
    """Random context-free target p_1..p_{k+1} and drafter q_1..q_k (Dirichlet, some sharp)."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(vocab, 0.7), size=k + 1).astype(np.float32)
    q = rng.dirichlet(np.full(vocab, 0.7), size=k).astype(np.float32)
    return jnp.asarray(p), jnp.asarray(q)


def _run(verifier, p, q, trials=TRIALS, seed=0):
    """Draft x_i ~ q_i for `trials` rows and verify them all in one batched call."""
    key_draft, key_verify = jax.random.split(jax.random.key(seed))
    k, v = q.shape
    drafts = jax.random.categorical(key_draft, jnp.log(q), shape=(trials, k)).astype(jnp.int32)
    verdict = jax.jit(verifier)(key_verify, drafts, jnp.broadcast_to(q, (trials, k, v)), jnp.broadcast_to(p, (trials, k + 1, v)))
    return drafts, verdict


def _first_token(drafts, verdict: Verdict) -> np.ndarray:
    return np.asarray(jnp.where(verdict.accepted > 0, drafts[:, 0], verdict.next_token))


# Negative controls: plausible-looking broken rules the distribution test must reject.
def always_accept(key, drafts, q, p):
    k = drafts.shape[1]
    return Verdict(jnp.full(drafts.shape[:1], k, jnp.int32), sample(key, p[:, -1]))


def resample_from_target(key, drafts, q, p):
    """Speculative sampling that, on rejection, samples p instead of norm((p - q)+)."""
    verdict = verify_sampling(key, drafts, q, p)
    at = jax.vmap(lambda row, i: row[i])
    return Verdict(verdict.accepted, sample(jax.random.fold_in(key, 1), at(p, verdict.accepted)))


def block_without_weight(key, drafts, q, p):
    """Block verification whose residual forgets the weight w_n (uses norm((p - q)+))."""
    verdict = verify_block(key, drafts, q, p)
    n = verdict.accepted
    at = jax.vmap(lambda row, i: row[i])
    q_pad = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)
    return Verdict(n, sample(jax.random.fold_in(key, 1), residual(at(p, n), at(q_pad, n))))


@pytest.mark.parametrize("name", ["sampling", "block"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_token_follows_target(name, seed):
    p, q = _problem(seed)
    drafts, verdict = _run(CHAIN_VERIFIERS[name], p, q, seed=seed)
    assert chi_square_pvalue(_first_token(drafts, verdict), p[0]) > 1e-3


@pytest.mark.parametrize("broken", [always_accept, resample_from_target])
def test_negative_controls_are_rejected(broken):
    # Seed 0's problem has p far from q, so each broken rule moves the distribution visibly.
    p, q = _problem(0)
    drafts, verdict = _run(broken, p, q)
    assert chi_square_pvalue(_first_token(drafts, verdict), p[0]) < 1e-6


def _run_rounds(verifier, p_table, q_table, n_tokens: int, k: int, trials: int, seed: int = 0) -> np.ndarray:
    """Decode `n_tokens` per row by repeated rounds against a position-dependent target.

    p_table `[P, V]` is the target at absolute position t (context-free), q_table the drafter.
    Each round drafts k tokens from q at the row's next positions, verifies them against p at
    the same positions plus one, and emits accepted + 1 tokens. Returns the first `n_tokens`
    emitted tokens `[trials, n_tokens]`, whose joint law must be prod_t p_table[t].
    """
    key = jax.random.key(seed)
    verify = jax.jit(verifier)
    out = np.full((trials, n_tokens + k + 1), -1)
    length = np.zeros(trials, int)
    offsets = np.arange(k + 1)
    for round_index in range(n_tokens):  # each round emits >= 1 token
        key, key_draft, key_verify = jax.random.split(key, 3)
        positions = length[:, None] + offsets  # [trials, k+1]
        p = jnp.asarray(p_table)[positions]
        q = jnp.asarray(q_table)[positions[:, :k]]
        drafts = jax.random.categorical(key_draft, jnp.log(q)).astype(jnp.int32)
        verdict = verify(key_verify, drafts, q, p)
        n = np.asarray(verdict.accepted)
        emitted = np.where(offsets[None, :] < n[:, None], np.pad(np.asarray(drafts), ((0, 0), (0, 1))), -1)
        emitted[np.arange(trials), n] = np.asarray(verdict.next_token)
        active = length < n_tokens
        for j in range(k + 1):
            rows = active & (j <= n)
            out[rows, length[rows] + j] = emitted[rows, j]
        length = np.where(active, length + n + 1, length)
    return out[:, :n_tokens]


def _sequence_pvalue(tokens: np.ndarray, p_table: np.ndarray, vocab: int) -> float:
    n = tokens.shape[1]
    codes = (tokens * vocab ** np.arange(n)[::-1]).sum(axis=1)
    grid = np.stack(np.meshgrid(*[np.arange(vocab)] * n, indexing="ij"), axis=-1).reshape(-1, n)
    exact = np.prod([np.asarray(p_table)[t, grid[:, t]] for t in range(n)], axis=0)
    return chi_square_pvalue(codes, exact)


SEQ_VOCAB, SEQ_K, SEQ_TOKENS = 4, 2, 3


def _sequence_problem(seed: int):
    rng = np.random.default_rng(seed)
    size = SEQ_TOKENS + SEQ_K + 1
    p = rng.dirichlet(np.full(SEQ_VOCAB, 0.8), size=size).astype(np.float32)
    q = rng.dirichlet(np.full(SEQ_VOCAB, 0.8), size=size).astype(np.float32)
    return p, q


@pytest.mark.parametrize("name", ["sampling", "block"])
@pytest.mark.parametrize("seed", [10, 11])
def test_multi_round_sequences_follow_target(name, seed):
    """Joint law of the first 3 tokens across rounds (the property block verification guarantees)."""
    p, q = _sequence_problem(seed)
    tokens = _run_rounds(CHAIN_VERIFIERS[name], p, q, SEQ_TOKENS, SEQ_K, TRIALS, seed=seed)
    assert _sequence_pvalue(tokens, p, SEQ_VOCAB) > 1e-3


@pytest.mark.parametrize("broken", [always_accept, resample_from_target, block_without_weight])
def test_multi_round_negative_controls_are_rejected(broken):
    p, q = _sequence_problem(10)
    tokens = _run_rounds(broken, p, q, SEQ_TOKENS, SEQ_K, TRIALS)
    assert _sequence_pvalue(tokens, p, SEQ_VOCAB) < 1e-6


def test_second_token_follows_target_for_speculative_sampling():
    """Context-free target: given one accepted draft, the second emitted token is ~ p_2."""
    p, q = _problem(3)
    drafts, verdict = _run(verify_sampling, p, q)
    kept = np.asarray(verdict.accepted) >= 1
    second = np.where(np.asarray(verdict.accepted) >= 2, np.asarray(drafts[:, 1]), np.asarray(verdict.next_token))
    assert chi_square_pvalue(second[kept], p[1]) > 1e-3


@pytest.mark.parametrize("name", ["sampling", "block"])
def test_identical_drafter_is_always_accepted(name):
    p, _ = _problem(4)
    drafts, verdict = _run(CHAIN_VERIFIERS[name], p, p[:K], trials=20_000)
    assert (np.asarray(verdict.accepted) == K).all()
    assert chi_square_pvalue(np.asarray(verdict.next_token), p[K]) > 1e-3  # the bonus token ~ p_{k+1}


def test_block_verification_toy_example():
    """Block verification's toy case (Sun et al. arXiv 2403.10444): target [1/3, 2/3], drafter
    [2/3, 1/3], k = 2: expected accepted drafts 10/9 with token verification, 11/9 with block
    verification."""
    p = jnp.asarray([[1 / 3, 2 / 3]] * 3)
    q = jnp.asarray([[2 / 3, 1 / 3]] * 2)
    _, token = _run(verify_sampling, p, q, trials=400_000)
    _, block = _run(verify_block, p, q, trials=400_000)
    assert abs(float(token.accepted.mean()) - 10 / 9) < 0.01
    assert abs(float(block.accepted.mean()) - 11 / 9) < 0.01


@pytest.mark.parametrize("seed", [5, 6])
def test_block_accepts_at_least_as_many_as_token_verification(seed):
    p, q = _problem(seed, k=4)
    _, token = _run(verify_sampling, p, q)
    _, block = _run(verify_block, p, q)
    assert float(block.accepted.mean()) >= float(token.accepted.mean()) - 0.01


def test_block_weights_follow_the_recursion():
    p = jnp.asarray([[[0.5, 0.5], [0.9, 0.1], [0.5, 0.5]]])
    q = jnp.asarray([[[0.25, 0.75], [0.3, 0.7]]])
    drafts = jnp.asarray([[0, 1]])
    # w1 = min(1, 0.5/0.25) = 1; w2 = min(1, 1 * 0.1/0.7).
    np.testing.assert_allclose(block_weights(drafts, q, p), [[1.0, 1.0, 0.1 / 0.7]], rtol=1e-6)


def test_block_weights_match_the_literal_recursion():
    rng = np.random.default_rng(8)
    b, k, v = 2000, 6, 5
    p = rng.dirichlet(np.full(v, 0.3), size=(b, k + 1))
    p[: b // 4, :, 0] = 0.0  # drafts the target gives zero probability: w drops to 0 and stays
    p /= p.sum(-1, keepdims=True)
    q = rng.dirichlet(np.full(v, 0.3), size=(b, k))
    drafts = np.array([[rng.choice(v, p=q[r, i]) for i in range(k)] for r in range(b)])
    expected = np.ones((b, k + 1))
    for i in range(k):
        ratio = p[np.arange(b), i, drafts[:, i]] / q[np.arange(b), i, drafts[:, i]]
        expected[:, i + 1] = np.minimum(1.0, expected[:, i] * ratio)
    assert (expected == 0).any() and (expected == 1).any() and ((expected > 0) & (expected < 1)).any()
    w = block_weights(jnp.asarray(drafts), jnp.asarray(q, jnp.float32), jnp.asarray(p, jnp.float32))
    np.testing.assert_allclose(w, expected, atol=1e-5)


def test_all_verifiers_reduce_to_greedy_on_one_hot_distributions():
    """Temperature 0: every verifier accepts exactly the drafts that match the target's argmax."""
    rng = np.random.default_rng(7)
    b, k, v = 512, 5, 4
    target_argmax = rng.integers(0, v, (b, k + 1))
    drafts = np.where(rng.random((b, k)) < 0.7, target_argmax[:, :k], rng.integers(0, v, (b, k)))
    p = jax.nn.one_hot(target_argmax, v)
    q = jax.nn.one_hot(drafts, v)
    drafts = jnp.asarray(drafts, jnp.int32)
    expected_n = np.argmin(np.append(drafts == target_argmax[:, :k], np.zeros((b, 1), bool), axis=1), axis=1)
    expected_next = target_argmax[np.arange(b), expected_n]
    for name, verifier in CHAIN_VERIFIERS.items():
        verdict = verifier(jax.random.key(1), drafts, q, p)
        np.testing.assert_array_equal(verdict.accepted, expected_n, err_msg=name)
        np.testing.assert_array_equal(verdict.next_token, expected_next, err_msg=name)
        assert verdict.accepted.dtype == jnp.int32 and verdict.next_token.dtype == jnp.int32


def test_greedy_ignores_key_and_draft_probs():
    p = jax.nn.one_hot(jnp.asarray([[1, 2, 3]]), 4)
    a = verify_greedy(jax.random.key(0), jnp.asarray([[1, 0]]), p[:, :2], p)
    assert int(a.accepted[0]) == 1 and int(a.next_token[0]) == 2
