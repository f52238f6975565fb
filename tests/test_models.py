"""jspec.models: cached decoding equals a full causal pass; commits; checkpoints."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jspec.models import (
    KVCache,
    RopeScaling,
    attention_mask,
    causal_mask,
    commit,
    commit_path,
    init_cache,
    load,
    save,
    transformer,
    truncate,
)
from jspec.models.kv_cache import from_storage, to_storage, write_layer
from jspec.models.transformer import matmul_dot_general

from conftest import TINY, causal_logits, forward, random_model

VARIANTS = {
    "llama-gqa": TINY,
    "qwen-like": dataclasses.replace(TINY, n_kv_heads=4, qkv_bias=True, qk_norm=True),
    "gpt2-like": dataclasses.replace(TINY, norm="layer", mlp="gelu", positions="learned", tie_embeddings=True),
    "gemma-like": dataclasses.replace(TINY, n_kv_heads=1, mlp="geglu", scale_embeddings=True, head_dim=16),
    "gemma2-like": dataclasses.replace(
        TINY,
        n_kv_heads=1,
        mlp="geglu",
        scale_embeddings=True,
        head_dim=16,
        post_norms=True,
        attn_scale=0.3,
        attn_softcap=2.0,
        final_softcap=3.0,
        sliding_window=4,
        sliding_window_layers=(0,),
        rope_scaling=RopeScaling("llama3", 8.0, original_max_len=8),
        o_bias=True,
        mlp_bias=True,
    ),
    "bfloat16": dataclasses.replace(TINY, dtype="bfloat16"),
}
TOLERANCE = {"bfloat16": 0.1}  # bf16 activations and cache: rounding differs between chunk shapes


@pytest.mark.parametrize("name", list(VARIANTS))
def test_incremental_decoding_matches_full_causal_forward(name):
    model = random_model(VARIANTS[name], seed=1)
    b, t = 3, 12
    tokens = jax.random.randint(jax.random.key(2), (b, t), 0, TINY.vocab_size)
    full = causal_logits(model, tokens)

    cache = init_cache(model.config, b, 16)
    pieces, start = [], 0
    for size in (4, 1, 3, 1, 1, 2):  # multi-token chunks (as speculative rounds) and single steps
        chunk = tokens[:, start : start + size]
        positions = cache.lengths[:, None] + jnp.arange(size)
        logits, cache = forward(model, chunk, positions, causal_mask(b, size), cache)
        cache = commit(cache, jnp.full((b,), size, jnp.int32))
        pieces.append(logits)
        start += size
    incremental = jnp.concatenate(pieces, axis=1)
    atol = TOLERANCE.get(name, 2e-4)
    np.testing.assert_allclose(incremental, full, atol=atol, rtol=atol / 2)
    assert (np.asarray(cache.lengths) == t).all()
    assert cache.dtype == model.config.dtype
    assert cache.layer(0)[0].dtype == jnp.dtype(model.config.dtype)


@pytest.mark.parametrize("head_tokens", [None, 40])
def test_logits_at_selects_positions_and_writes_the_same_cache(head_tokens):
    model = random_model(dataclasses.replace(TINY, head_tokens=head_tokens, tie_embeddings=head_tokens is None), seed=3)
    b, t = 2, 6
    tokens = jax.random.randint(jax.random.key(4), (b, t), 0, TINY.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    cache = init_cache(model.config, b, 8)
    full, full_cache = model(tokens, positions, causal_mask(b, t), cache)
    at = jnp.asarray([[5, 0], [2, 2]], jnp.int32)
    some, some_cache = model(tokens, positions, causal_mask(b, t), cache, logits_at=at)
    assert some.shape == (b, 2, TINY.vocab_size)
    np.testing.assert_allclose(some, jnp.take_along_axis(full, at[:, :, None], axis=1), atol=1e-5)
    np.testing.assert_array_equal(some_cache.keys, full_cache.keys)


def test_rows_commit_independently_and_rejected_entries_are_overwritten():
    """Per-row commits: each row continues after exactly what it committed; entries written past
    its length (rejected tokens) do not leak into later passes."""
    model = random_model(TINY, seed=3)
    b = 3
    rng = np.random.RandomState(0)
    prefix = rng.randint(0, TINY.vocab_size, (b, 5))
    proposed = rng.randint(0, TINY.vocab_size, (b, 4))
    follow = rng.randint(0, TINY.vocab_size, (b, 3))
    keep = np.array([0, 2, 4])

    cache = init_cache(TINY, b, 16)
    _, cache = forward(model, jnp.asarray(prefix), jnp.broadcast_to(jnp.arange(5), (b, 5)), causal_mask(b, 5), cache)
    cache = commit(cache, jnp.full((b,), 5, jnp.int32))
    positions = cache.lengths[:, None] + jnp.arange(4)
    _, cache = forward(model, jnp.asarray(proposed), positions, causal_mask(b, 4), cache)
    cache = commit(cache, jnp.asarray(keep, jnp.int32))
    positions = cache.lengths[:, None] + jnp.arange(3)
    logits, cache = forward(model, jnp.asarray(follow), positions, causal_mask(b, 3), cache)

    for row in range(b):
        seq = np.concatenate([prefix[row], proposed[row, : keep[row]], follow[row]])[None]
        expected = causal_logits(model, jnp.asarray(seq))[0, -3:]
        np.testing.assert_allclose(logits[row], expected, atol=2e-4, rtol=1e-4)


def test_commit_path_keeps_only_the_accepted_path():
    """Score 5 new tokens as a tree (branches 0->2->4 and 0->1, 2->3), keep the path [0, 2, 4];
    the next pass must see exactly prefix + that path."""
    model = random_model(TINY, seed=4)
    b = 2
    rng = np.random.RandomState(1)
    prefix = jnp.asarray(rng.randint(0, TINY.vocab_size, (b, 4)))
    nodes = jnp.asarray(rng.randint(0, TINY.vocab_size, (b, 5)))
    parent = [-1, 0, 0, 2, 2]
    depth = [0, 1, 1, 2, 2]
    ancestor = np.eye(5, dtype=bool)
    for i in range(5):
        j = parent[i]
        while j >= 0:
            ancestor[i, j] = True
            j = parent[j]

    cache = init_cache(TINY, b, 16)
    _, cache = forward(model, prefix, jnp.broadcast_to(jnp.arange(4), (b, 4)), causal_mask(b, 4), cache)
    cache = commit(cache, jnp.full((b,), 4, jnp.int32))
    tree_logits, cache = forward(
        model, nodes, 4 + jnp.broadcast_to(jnp.asarray(depth), (b, 5)), jnp.broadcast_to(jnp.asarray(ancestor), (b, 5, 5)), cache
    )
    # Row 0 keeps the whole path, row 1 only its first two nodes (a padded path entry is ignored).
    path = jnp.asarray([[0, 2, 4], [0, 2, 4]], jnp.int32)
    path_length = jnp.asarray([3, 2], jnp.int32)
    cache = commit_path(cache, path, path_length)
    assert list(np.asarray(cache.lengths)) == [7, 6]

    nxt = jnp.asarray(rng.randint(0, TINY.vocab_size, (b, 1)))
    logits, _ = forward(model, nxt, cache.lengths[:, None], causal_mask(b, 1), cache)
    for row, n in enumerate([3, 2]):
        seq = jnp.concatenate([prefix[row], nodes[row, jnp.asarray([0, 2, 4][:n])], nxt[row]])[None]
        np.testing.assert_allclose(logits[row, 0], causal_logits(model, seq)[0, -1], atol=2e-4, rtol=1e-4)
        # Every tree node's logits equal those of a causal pass over its root path.
    for i in range(5):
        root_path = [j for j in range(5) if ancestor[i, j]]
        seq = jnp.concatenate([prefix[0], nodes[0, jnp.asarray(root_path)]])[None]
        np.testing.assert_allclose(tree_logits[0, i], causal_logits(model, seq)[0, -1], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_cache_writes_and_path_commits_are_exact_in_every_dtype(dtype):
    """16-bit caches are stored and scattered as integer bits (XLA's CPU backend would upcast or
    copy the whole buffer): the values written and moved must be exactly those given, slots past
    S dropped, and read back in the cache's dtype."""
    rng = np.random.RandomState(3)
    shape = (2, 3, 8, 1, 4)  # [L, B, S, H, D]
    keys, values = (jnp.asarray(rng.randn(*shape), dtype) for _ in range(2))
    cache = KVCache(
        keys=to_storage(keys, dtype), values=to_storage(values, dtype), lengths=jnp.asarray([2, 5, 7], jnp.int32), dtype=dtype
    )
    assert cache.keys.dtype == (jnp.uint16 if dtype != "float32" else jnp.float32)
    new = jnp.asarray(rng.randn(3, 2, 1, 4), dtype)
    written = jax.jit(write_layer, static_argnums=1)(cache.keys, 1, new, cache.lengths)
    expected = np.asarray(keys).copy()
    for row, start in enumerate([2, 5, 7]):
        for i in range(2):
            if start + i < 8:  # row 2's second token falls past the cache: dropped
                expected[1, row, start + i] = np.asarray(new)[row, i]
    written = dataclasses.replace(cache, keys=written)
    np.testing.assert_array_equal(np.stack([np.asarray(written.layer(layer)[0]) for layer in range(2)]), expected)
    assert written.layer(1)[0].dtype == jnp.dtype(dtype)

    path = jnp.asarray([[1], [0], [0]], jnp.int32)
    moved = jax.jit(commit_path)(cache, path, jnp.asarray([1, 1, 0], jnp.int32))
    expected = np.asarray(values).copy()
    expected[:, 0, 2] = expected[:, 0, 3]  # row 0: new token 1 moves to its first new slot
    np.testing.assert_array_equal(np.stack([np.asarray(moved.layer(layer)[1]) for layer in range(2)]), expected)
    assert list(np.asarray(moved.lengths)) == [3, 6, 7]
    assert moved.dtype == dtype


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_writes_past_the_cache_land_in_its_spare_slots_only(dtype):
    """A cache from `init_cache` has spare slots past its S; a pass over up to that many tokens
    writes each row with a dynamic_update_slice, which clamps a start that runs past the buffer.
    Seen through `KVCache.layer`, writes that run past S are dropped and no slot below S other
    than the written ones changes, whatever the start (past S included)."""
    config = dataclasses.replace(TINY, dtype=dtype)
    cache = init_cache(config, 3, 8)
    assert cache.spare > 0 and cache.size == 8 and cache.keys.shape[2] == 8 + cache.spare
    rng = np.random.RandomState(5)
    full = cache.keys.shape[2]
    old = jnp.asarray(rng.randn(*cache.keys.shape[:2], full, *cache.keys.shape[3:]), dtype)
    buffer = to_storage(old, dtype)
    t = min(cache.spare, 4)
    new = jnp.asarray(rng.randn(3, t, *cache.keys.shape[3:]), dtype)
    start = jnp.asarray([2, 6, full - 1], jnp.int32)  # row 1 runs past S; row 2 starts past it
    written = jax.jit(write_layer, static_argnums=(1, 4))(buffer, 1, to_storage(new, dtype), start, cache.spare)
    view = dataclasses.replace(cache, keys=written).layer(1)[0]
    expected = np.asarray(old[1, :, :8]).copy()
    for row, first in enumerate([2, 6, full - 1]):
        for i in range(t):
            if first + i < 8:
                expected[row, first + i] = np.asarray(new)[row, i]
    np.testing.assert_array_equal(np.asarray(view), expected)
    np.testing.assert_array_equal(np.asarray(from_storage(written[0], dtype)), np.asarray(old[0]))  # other layers


@pytest.mark.parametrize("amx", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 127, 128, 300])
def test_bfloat16_products_equal_the_float32_product_at_every_row_count(rows, amx, monkeypatch):
    """On CPU a one-row bf16 product is computed as two rows and, without AMX, one of 128 rows or
    more in float32 (faster kernels); either way the result is the float32-accumulated product, in
    the requested dtype."""
    monkeypatch.setattr(transformer, "cpu_has_amx_bf16", lambda: amx)
    rng = np.random.RandomState(4)
    x = jnp.asarray(rng.randn(rows, 1, 16), jnp.bfloat16)
    w = jnp.asarray(rng.randn(16, 8), jnp.bfloat16)
    numbers = (((2,), (0,)), ((), ()))
    got = jax.jit(lambda x, w: matmul_dot_general(x, w, numbers, preferred_element_type=jnp.float32))(x, w)
    want = jax.lax.dot_general(x.astype(jnp.float32), w.astype(jnp.float32), numbers)
    assert got.shape == (rows, 1, 8) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    rounded = jax.jit(lambda x, w: matmul_dot_general(x, w, numbers))(x, w)
    assert rounded.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(rounded, np.float32), np.asarray(want), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_products_flatten_their_leading_axes_and_pass_other_dimension_numbers_through(dtype):
    rng = np.random.RandomState(5)
    x = jnp.asarray(rng.randn(2, 3, 16), dtype)
    w = jnp.asarray(rng.randn(16, 8), dtype)
    dense = (((2,), (0,)), ((), ()))
    got = jax.jit(lambda x, w: matmul_dot_general(x, w, dense, preferred_element_type=jnp.float32))(x, w)
    want = jax.lax.dot_general(x.astype(jnp.float32), w.astype(jnp.float32), dense)
    assert got.shape == (2, 3, 8)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # A batched product (attention's) is not a dense layer: computed exactly as lax.dot_general.
    y = jnp.asarray(rng.randn(2, 16, 5), dtype)
    batched = (((2,), (1,)), ((0,), (0,)))
    got = matmul_dot_general(x, y, batched, preferred_element_type=jnp.float32)
    want = jax.lax.dot_general(x, y, batched, preferred_element_type=jnp.float32)
    assert got.shape == (2, 3, 5)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_cpu_has_amx_bf16_reads_the_flags_of_cpuinfo(tmp_path):
    amx, avx2 = tmp_path / "amx", tmp_path / "avx2"
    amx.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n")
    avx2.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 amx_bf16x\n")
    assert transformer.cpu_has_amx_bf16(str(amx))
    assert not transformer.cpu_has_amx_bf16(str(avx2))
    assert not transformer.cpu_has_amx_bf16(str(tmp_path / "missing"))  # not Linux


def test_truncate_rewinds_lengths():
    cache = init_cache(TINY, 2, 8)
    cache = commit(cache, jnp.asarray([5, 3], jnp.int32))
    assert list(np.asarray(truncate(cache, jnp.asarray([2, 3])).lengths)) == [2, 3]


def test_attention_mask_sees_prefix_and_allowed_new_tokens():
    mask = jnp.asarray([[[True, False], [True, True]]])  # causal over 2 new tokens
    visible = np.asarray(attention_mask(mask, jnp.asarray([3]), 6))[0]
    expected = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
    np.testing.assert_array_equal(visible, expected)


def test_a_tree_scored_level_by_level_in_a_window_equals_one_pass():
    """Nodes written at window offsets by separate calls, each level attending to the levels before
    it through the wide mask, get the logits (and cache entries) of one pass over the whole tree."""
    model = random_model(TINY, seed=3)
    b, parent, depth = 2, [-1, 0, 0, 1, 2, 2], [0, 1, 1, 2, 2, 2]
    ancestor = np.eye(6, dtype=bool)
    for i in range(6):
        j = parent[i]
        while j >= 0:
            ancestor[i, j], j = True, parent[j]
    rng = np.random.RandomState(2)
    prefix = jnp.asarray(rng.randint(0, TINY.vocab_size, (b, 4)))
    nodes = jnp.asarray(rng.randint(0, TINY.vocab_size, (b, 6)))
    cache = init_cache(TINY, b, 16)
    _, cache = forward(model, prefix, jnp.broadcast_to(jnp.arange(4), (b, 4)), causal_mask(b, 4), cache)
    cache = commit(cache, jnp.full((b,), 4, jnp.int32))
    positions = 4 + jnp.broadcast_to(jnp.asarray(depth), (b, 6))
    one_pass, one_cache = forward(model, nodes, positions, jnp.broadcast_to(jnp.asarray(ancestor), (b, 6, 6)), cache)

    call = jax.jit(lambda m, *a, write_at: m(*a, write_at=write_at), static_argnums=0, static_argnames="write_at")
    for level in ([0], [1, 2], [3, 4, 5]):
        rows = jnp.asarray(level)
        mask = jnp.broadcast_to(jnp.asarray(ancestor)[rows], (b, len(level), 6))
        logits, cache = call(model, nodes[:, rows], positions[:, rows], mask, cache, write_at=level[0])
        np.testing.assert_allclose(logits, one_pass[:, rows], atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(cache.keys[:, :, :10], one_cache.keys[:, :, :10], atol=1e-5)


@pytest.mark.parametrize("name", ["qwen-like", "gemma2-like"])
def test_save_load_round_trip(tmp_path, name):
    model = random_model(VARIANTS[name], seed=5)
    save(model, tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt")
    assert loaded.config == model.config
    tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, TINY.vocab_size)
    np.testing.assert_array_equal(causal_logits(loaded, tokens), causal_logits(model, tokens))
    with pytest.raises(ValueError, match="already exists"):
        save(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="not a jspec checkpoint"):
        load(tmp_path / "missing")


@pytest.mark.parametrize(
    "field, value",
    [
        ("vocab_size", 0),
        ("n_heads", 3),
        ("mlp", "relu"),
        ("norm", "batch"),
        ("dtype", "float33"),
        ("sliding_window", 0),
        ("sliding_window_layers", (0,)),
        ("attn_softcap", -1.0),
        ("rope_scaling", "llama3"),
    ],
)
def test_bad_config_raises(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **{field: value})
    with pytest.raises(ValueError, match="RopeScaling"):
        RopeScaling("yarn", 4.0)
