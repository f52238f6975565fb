"""jspec.training.self_distill, shards, chat_prompts, drafter_init and the trimmed/shared pieces the
SmolLM2 drafter recipe is built from, on tiny random models."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jspec
from jspec.models import load, save
from jspec.training.chat_prompts import CATEGORIES, chat_instructions
from jspec.training.drafter_init import ALL_BUT_EMBEDDING, scratch_drafter, shallow_drafter
from jspec.training.loop import TrainConfig, fit
from jspec.training.self_distill import (
    SparseDistillLoss,
    agreement,
    generate_with_top_k,
    head_columns,
    pack_examples,
    packed_logits,
    sparse_cross_entropy,
)
from jspec.training.shards import read_shards, write_shard
from jspec.training.vocab_trim import most_frequent, trim_drafter, untrim_drafter

from conftest import TINY, causal_logits, random_model

EOS = 13  # the greedy answer to the second prompt below emits it after 5 tokens


@pytest.fixture(scope="module")
def target():
    return random_model(TINY, seed=3)  # varied greedy text (seed 0 repeats one token)


@pytest.fixture(scope="module")
def examples(target):
    """Greedy answers to 4 ragged prompts, one stopped by EOS after 5 tokens."""
    rng = np.random.default_rng(0)
    prompts = rng.integers(4, TINY.vocab_size, (4, 6)).astype(np.int32)
    lengths = np.asarray([6, 3, 5, 2], np.int32)
    return (
        prompts,
        lengths,
        generate_with_top_k(
            target, prompts, lengths, max_new_tokens=12, sampling=jspec.Sampling(), top_k=8, eos_id=EOS, rng=jax.random.key(0)
        ),
    )


def test_answers_are_the_targets_greedy_output_with_its_distributions(target, examples):
    prompts, lengths, rows = examples
    reference = jspec.generate(target, prompts, prompt_lengths=lengths, max_new_tokens=12, eos_id=EOS)
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(row["prompt"], prompts[i, : lengths[i]])
        np.testing.assert_array_equal(row["answer"], np.asarray(reference.tokens[i, : reference.lengths[i]]))
        np.testing.assert_array_equal(row["top_ids"][:, 0], row["answer"])  # greedy: the answer is the argmax
        assert (np.diff(row["top_logp"], axis=1) <= 0).all() and (row["top_logp"] <= 0).all()
        # Each position's distribution is the target's next-token law after prompt + answer so far.
        seq = np.concatenate([row["prompt"], row["answer"]])[None]
        logp = np.asarray(jax.nn.log_softmax(causal_logits(target, seq)[0]))
        p = len(row["prompt"])
        expected = np.take_along_axis(logp[p - 1 : p - 1 + len(row["answer"])], row["top_ids"], axis=1)
        np.testing.assert_allclose(row["top_logp"], expected, atol=1e-4)


def test_shards_round_trip_and_skip_partial_files(tmp_path, examples):
    rows = examples[2]
    write_shard(tmp_path / "shard-00000.npz", rows[:2], [{"i": 0}, {"i": 1}])
    write_shard(tmp_path / "shard-00001.npz", rows[2:], [{"i": 2}, {"i": 3}])
    (tmp_path / "shard-00002.npz.partial.npz").write_bytes(b"interrupted")
    got, meta = read_shards(tmp_path)
    assert [m["i"] for m in meta] == [0, 1, 2, 3]
    for a, b in zip(got, rows):
        for key in ("prompt", "answer", "top_ids", "top_logp"):
            np.testing.assert_array_equal(a[key], b[key])
    assert len(read_shards(tmp_path, limit=1)[0]) == 2


def test_packed_rows_give_each_example_its_own_causal_logits(target, examples):
    """Packing is invisible to the model: each packed example's logits equal a causal pass over it
    alone, and the targets line up with the positions that predict each answer token."""
    prompts, lengths, rows = examples
    assert len(rows[1]["answer"]) == 5 and rows[1]["answer"][-1] == EOS and len(rows[0]["answer"]) == 12
    packed = pack_examples(rows, row_len=40)
    assert len(packed) < len(rows)  # examples share rows
    assert packed.weight.sum() == sum(len(r["answer"]) for r in rows)
    logits, columns = packed_logits(target, *map(jnp.asarray, (packed.tokens, packed.positions, packed.segments)))
    np.testing.assert_array_equal(np.asarray(columns), np.arange(TINY.vocab_size))
    for r in range(len(packed)):
        for s in set(packed.segments[r].tolist()) - {0}:
            span = np.flatnonzero(packed.segments[r] == s)
            alone = causal_logits(target, packed.tokens[r, span][None])[0]
            np.testing.assert_allclose(np.asarray(logits[r, span]), np.asarray(alone), atol=2e-4, rtol=1e-4)
            weighted = span[packed.weight[r, span] > 0]
            # The target's top-1 at each answer position is the greedy answer token that follows it
            # (the last answer token is input to nothing, so it is not in the row).
            np.testing.assert_array_equal(packed.target_ids[r, weighted[:-1], 0], packed.tokens[r, weighted[:-1] + 1])


def test_sparse_cross_entropy_is_the_forward_kl_plus_entropy_and_drops_uncovered_tokens():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(5, 16)), jnp.float32)
    p = jax.nn.softmax(jnp.asarray(rng.normal(size=(5, 16)) * 2))
    ids = jnp.argsort(-p, axis=-1)  # all 16: the "top-K" is the whole distribution
    logp = jnp.log(jnp.take_along_axis(p, ids, axis=-1))
    ce = sparse_cross_entropy(logits, ids, logp)
    expected = -jnp.sum(p * jax.nn.log_softmax(logits), axis=-1)
    np.testing.assert_allclose(np.asarray(ce), np.asarray(expected), rtol=1e-5)
    # A head over 8 tokens: the target's mass outside them is dropped and the rest renormalised.
    keep = jnp.arange(0, 16, 2)
    columns = head_columns(ids, keep, 16)
    ce_trim = sparse_cross_entropy(logits[:, keep], columns, logp)
    p_kept = p[:, keep] / p[:, keep].sum(-1, keepdims=True)
    np.testing.assert_allclose(
        np.asarray(ce_trim), np.asarray(-jnp.sum(p_kept * jax.nn.log_softmax(logits[:, keep]), -1)), rtol=1e-5
    )
    assert float(sparse_cross_entropy(logits[:, :1], jnp.full((5, 4), -1), logp[:, :4]).max()) == 0.0  # nothing covered


def test_distilling_a_trimmed_drafter_with_a_frozen_embedding(target, examples, tmp_path):
    """A shallow, trimmed drafter trained with SparseDistillLoss: the loss to the target's
    distributions falls, the shared embedding does not move, and the drafter saves without it."""
    rows = pack_examples(examples[2] * 4, row_len=32)
    keep = most_frequent(np.bincount(np.concatenate([r["answer"] for r in examples[2]]), minlength=64), 32, always_keep=(EOS,))
    drafter = trim_drafter(shallow_drafter(target, 1, untie_head=True), keep)
    before = agreement(drafter, rows)
    config = TrainConfig(
        steps=30, batch_size=2, seq_len=32, learning_rate=3e-3, warmup_steps=2, eval_every=30, checkpoint_every=30
    )
    batch_fn = lambda step, _: rows.rows(np.arange(2 * step, 2 * step + 2) % len(rows))
    trained, history = fit(
        drafter, SparseDistillLoss(), batch_fn, lambda m: agreement(m, rows), config, str(tmp_path / "ckpt"),
        progress=False, trainable=ALL_BUT_EMBEDDING,
    )  # fmt: skip
    after = history[-1]
    assert after["cross_entropy"] < before["cross_entropy"] - 0.5
    np.testing.assert_array_equal(np.asarray(trained.embed.embedding[...]), np.asarray(target.embed.embedding[...]))
    save(trained, tmp_path / "model", shared=("embed",))
    with pytest.raises(ValueError, match="saved without \\['embed'\\]"):
        load(tmp_path / "model")
    with pytest.raises(ValueError, match="shapes"):
        load(tmp_path / "model", shared={"embed": {"embedding": np.zeros((3, 3))}})
    restored = load(tmp_path / "model", shared={"embed": {"embedding": target.embed.embedding[...]}})
    tokens = np.asarray([[5, 9, 11, 2]])
    np.testing.assert_array_equal(np.asarray(causal_logits(restored, tokens)), np.asarray(causal_logits(trained, tokens)))


def test_shallow_drafter_with_every_layer_is_the_target(target):
    full = shallow_drafter(target, TINY.n_layers)
    tokens = np.asarray([[1, 5, 9, 11, 2]])
    np.testing.assert_array_equal(np.asarray(causal_logits(full, tokens)), np.asarray(causal_logits(target, tokens)))
    first = shallow_drafter(target, [0])
    assert first.config.n_layers == 1
    with pytest.raises(ValueError, match="layers"):
        shallow_drafter(target, [TINY.n_layers])
    small = scratch_drafter(TINY, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32)
    assert small.config.vocab_size == TINY.vocab_size and small.config.d_model == 16


def test_untrim_drafter_fills_the_columns_the_trimmed_head_lacks():
    tied = dataclasses.replace(TINY, tie_embeddings=True)
    drafter = trim_drafter(shallow_drafter(random_model(tied, 3), 1, untie_head=True), np.arange(0, 64, 4))
    fill = jnp.full((TINY.d_model, TINY.vocab_size), 0.0)
    full = untrim_drafter(drafter, fill)
    assert full.config.head_tokens is None
    tokens = np.asarray([[1, 5, 9]])
    a, b = np.asarray(causal_logits(drafter, tokens)), np.asarray(causal_logits(full, tokens))
    np.testing.assert_allclose(b[..., ::4], a[..., ::4], atol=1e-5)
    assert np.all(np.isneginf(a[..., 1::4])) and np.all(b[..., 1::4] == 0.0)
    with pytest.raises(ValueError, match="not trimmed"):
        untrim_drafter(full, fill)


def test_chat_instructions_are_deterministic_varied_and_split():
    train = chat_instructions("train", 120)
    assert train == chat_instructions("train", 120)
    assert len({i["text"] for i in train}) == 120
    assert {i["category"] for i in train} <= set(CATEGORIES) and len({i["category"] for i in train}) >= 10
    held = chat_instructions("held_out", 40)
    # Passage-based items come from different files in the two splits.
    passages = lambda items: {i["text"] for i in items if "\n\n" in i["text"]}  # noqa: E731
    assert not passages(train) & passages(held)
    with pytest.raises(ValueError, match="split"):
        chat_instructions("test", 3)
