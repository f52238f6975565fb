"""jspec.sampling: configuration checks, warps, the shared residual and the sampler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jspec.sampling import RowSampling, Sampling, residual, sample, sample_without_replacement, warp

from conftest import chi_square_pvalue

LOGITS = jnp.asarray([[1.0, 3.0, 2.0, 0.0, -1.0], [0.5, 0.5, 4.0, 1.0, 0.0]])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=True), "temperature"),
        (dict(temperature=1.0, top_p=0.0), "top_p"),
        (dict(temperature=1.0, top_p=1.5), "top_p"),
        (dict(temperature=1.0, top_k=0), "top_k"),
        (dict(temperature=1.0, top_k=2.5), "top_k"),
    ],
)
def test_bad_sampling_raises(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Sampling(**kwargs)


def test_greedy_warp_is_one_hot_argmax():
    probs = np.asarray(warp(LOGITS, Sampling()))
    np.testing.assert_array_equal(probs, np.eye(5)[[1, 2]])
    # Ties go to the lowest index, the same rule as jnp.argmax in verify_greedy.
    np.testing.assert_array_equal(np.asarray(warp(jnp.asarray([2.0, 5.0, 5.0]), Sampling())), [0, 1, 0])


def test_temperature_scales_logits():
    probs = warp(LOGITS, Sampling(temperature=0.5))
    np.testing.assert_allclose(probs, jax.nn.softmax(LOGITS / 0.5), rtol=1e-6)


def test_top_k_keeps_the_k_largest():
    probs = np.asarray(warp(LOGITS, Sampling(temperature=1.0, top_k=2)))
    assert ((probs > 0).sum(axis=-1) == 2).all()
    np.testing.assert_allclose(probs[0, [1, 2]], jax.nn.softmax(jnp.asarray([3.0, 2.0])), rtol=1e-6)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)


def test_top_p_keeps_the_smallest_nucleus():
    full = np.asarray(jax.nn.softmax(LOGITS[0]))  # sorted masses: .665 .245 .090 .033 .012
    probs = np.asarray(warp(LOGITS[0], Sampling(temperature=1.0, top_p=0.8)))
    assert set(np.flatnonzero(probs)) == {1, 2}  # .665 < .8 needs the second token, then stop
    np.testing.assert_allclose(probs[[1, 2]], full[[1, 2]] / full[[1, 2]].sum(), rtol=1e-6)
    only_top = np.asarray(warp(LOGITS[0], Sampling(temperature=1.0, top_p=0.5)))
    np.testing.assert_array_equal(only_top > 0, np.eye(5)[1] > 0)
    np.testing.assert_allclose(np.asarray(warp(LOGITS, Sampling(1.0, top_p=1.0))), jax.nn.softmax(LOGITS), rtol=1e-6)


def test_residual_is_normalised_positive_part():
    p = jnp.asarray([0.5, 0.3, 0.2])
    q = jnp.asarray([0.2, 0.6, 0.2])
    np.testing.assert_allclose(residual(p, q), [1.0, 0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(residual(p, p), p, atol=1e-7)  # no mass left: falls back to p
    np.testing.assert_allclose(residual(2 * p, q), [0.8 / 1.0, 0.0, 0.2 / 1.0], atol=1e-6)  # unnormalised p


@pytest.mark.parametrize(
    "probs, shifted",  # shifted: 0.02 away in TV, which the same test must reject
    [
        ([0.1, 0.0, 0.6, 0.3], [0.12, 0.0, 0.58, 0.3]),
        ([0.0, 0.5, 0.5, 0.0], [0.0, 0.52, 0.48, 0.0]),
        ([0.002, 0.0, 0.0, 0.998], [0.022, 0.0, 0.0, 0.978]),
    ],
)
def test_sample_follows_probs_and_never_draws_zero_mass(probs, shifted):
    draws = np.asarray(sample(jax.random.key(0), jnp.broadcast_to(jnp.asarray(probs), (50_000, 4))))
    assert not np.isin(draws, np.flatnonzero(np.asarray(probs) == 0)).any()
    assert chi_square_pvalue(draws, jnp.asarray(probs)) > 1e-3
    assert chi_square_pvalue(draws, jnp.asarray(shifted)) < 1e-6


def test_sample_of_one_hot_rows_is_their_token():
    tokens = jax.random.randint(jax.random.key(1), (64,), 0, 8192)
    draws = sample(jax.random.key(2), jax.nn.one_hot(tokens, 8192))
    np.testing.assert_array_equal(np.asarray(draws), np.asarray(tokens))


def _running_sum_draws(key: jax.Array, probs: jax.Array, n: int) -> np.ndarray:
    """n draws of the sampler jspec used before (the negative control): inverse CDF over a float32
    running sum, `sum(cdf <= u)` over the same XLA cumsum, counted by a binary search in the sorted
    cdf (XLA's parallel prefix sum is not exactly monotone) instead of an [n, V] comparison."""
    cdf = np.asarray(jnp.cumsum(probs, axis=-1))
    u = np.asarray(jax.random.uniform(key, (n,))) * cdf[-1]
    return np.minimum(np.searchsorted(np.sort(cdf), u, side="right"), len(cdf) - 1)


def _long_tail(vocab: int = 49152) -> tuple[np.ndarray, list[np.ndarray]]:
    """A real-vocabulary law with a long tail past a few dominant tokens, and the bins to test it on.

    8 leaders, then three tail groups of 16k tokens at 2.5e-8, 1.5e-7 and 1e-6 (below, near and
    above float32's 6e-8 spacing next to 1, where a running sum places them). Bins: each leader,
    and each tail group split into the tokens whose interval in a float32 running sum is empty and
    the rest, so that a sampler must give every token its own mass, not only each group its total.
    """
    p = np.zeros(vocab, np.float64)
    groups = [np.arange(8, 16392), np.arange(16392, 32776), np.arange(32776, vocab)]
    for group, mass in zip(groups, (2.5e-8, 1.5e-7, 1e-6)):
        p[group] = mass
    p[:8] = (1 - p.sum()) * np.asarray([0.3, 0.2, 0.15, 0.1, 0.1, 0.07, 0.05, 0.03])
    cdf = np.asarray(jnp.cumsum(jnp.asarray(p, jnp.float32)))
    empty = np.diff(cdf, prepend=np.float32(0)) == 0
    bins = [np.asarray([i]) for i in range(8)]
    for group in groups:
        bins += [b for b in (group[empty[group]], group[~empty[group]]) if len(b)]
    return p, bins


def _binned_pvalue(draws: np.ndarray, p: np.ndarray, bins: list[np.ndarray]) -> float:
    which = np.zeros(len(p), np.int64)
    for b, ids in enumerate(bins):
        which[ids] = b
    return chi_square_pvalue(which[draws], np.asarray([p[ids].sum() for ids in bins]))


@pytest.mark.parametrize("sampler", ["sample", "running_sum"])
def test_sample_gives_each_tail_token_its_mass_at_a_real_vocabulary_size(sampler):
    """At V = 49152, 300k draws follow the exact law, binned so that tail tokens a float32 running
    sum would never draw form bins of their own; the same test rejects that running sum (the
    inverse-CDF sampler jspec used before)."""
    p, bins = _long_tail()
    assert len(bins) > 11  # some tail tokens do get an empty running-sum interval
    probs, n = jnp.asarray(p, jnp.float32), 300_000  # 67 draws expected in the bin a running sum never reaches
    if sampler == "sample":
        draws = np.asarray(jax.jit(jax.vmap(sample, in_axes=(0, None)))(jax.random.split(jax.random.key(0), n), probs))
    else:
        draws = _running_sum_draws(jax.random.key(0), probs, n)
    pvalue = _binned_pvalue(draws, p, bins)
    assert pvalue > 1e-3 if sampler == "sample" else pvalue < 1e-6


def _successive_law(p: np.ndarray) -> np.ndarray:
    """P(first = i, second = j) of two draws without replacement: p_i p_j / (1 - p_i), `[V * V]`."""
    joint = p[:, None] * p[None, :] / (1 - p[:, None])
    np.fill_diagonal(joint, 0.0)
    return joint.ravel()


@pytest.mark.parametrize("draw", ["without_replacement", "iid"])
def test_sample_without_replacement_has_the_law_of_gumbel_top_k(draw):
    """The ordered pair of the first two draws follows the successive-sampling law (Gumbel-top-2);
    two independent draws (the negative control) do not: they repeat tokens."""
    p = np.asarray([0.5, 0.25, 0.15, 0.1], np.float32)
    probs = jnp.broadcast_to(jnp.asarray(p), (200_000, 4))
    if draw == "without_replacement":
        x = np.asarray(sample_without_replacement(jax.random.key(0), probs, 2))
    else:
        x = np.stack([np.asarray(sample(k, probs)) for k in jax.random.split(jax.random.key(0))], axis=-1)
    pvalue = chi_square_pvalue(x[:, 0] * 4 + x[:, 1], _successive_law(p.astype(np.float64)))
    assert pvalue > 1e-3 if draw == "without_replacement" else pvalue < 1e-6


def test_sample_without_replacement_past_the_support_gives_zero_mass_tokens():
    x = np.asarray(sample_without_replacement(jax.random.key(1), jnp.asarray([[0.0, 0.7, 0.0, 0.3]]), 3))[0]
    assert sorted(x[:2]) == [1, 3] and x[2] in (0, 2)


def test_row_sampling_warps_each_row_by_its_own_settings():
    """RowSampling: row i's warp is `warp` with row i's Sampling (greedy, nucleus, plain), over
    logits with extra axes; one row cutting does not cut a row with top_p 1."""
    logits = jnp.concatenate([LOGITS, LOGITS[:1] * 0.5], axis=0)[:, None, :].repeat(2, axis=1)  # [3, 2, 5]
    rows = [Sampling(), Sampling(temperature=0.7, top_p=0.6), Sampling(temperature=1.3)]
    warped = warp(logits, RowSampling.of(rows))
    for i, s in enumerate(rows):
        np.testing.assert_allclose(np.asarray(warped[i]), np.asarray(warp(logits[i], s)), atol=1e-6)
    assert np.asarray(warped[2] > 0).all()
    with pytest.raises(ValueError, match="top_k"):
        RowSampling.of([Sampling(temperature=1.0, top_k=2)])
