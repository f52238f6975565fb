"""EAGLE heads (`jspec.eagle`) and their training (`jspec.training.eagle`), on tiny random targets."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_decode import first3_pvalue, unrelated_small_pair

import jspec
from jspec.drafters import ModelDrafter
from jspec.eagle import EagleConfig, EagleHead, load_head, save_head
from jspec.models import causal_mask, init_cache
from jspec.rounds import score_tree
from jspec.sampling import Sampling
from jspec.training.eagle import HEAD_PARAMS, EagleLoss, held_out_acceptance, sequence_rows, target_rows, ttt_masks
from jspec.training.loop import TrainConfig, fit
from jspec.training.self_distill import PackedRows

from conftest import TINY, random_model

ROWS, ROW_LEN, STEPS = 24, 48, 3


@pytest.fixture(scope="module")
def target():
    return random_model(TINY, seed=0)


def _rows(target, n: int, seed: int) -> PackedRows:
    """The target's own samples (temperature 1) after random 4-token prompts, one per row."""
    prompts = np.asarray(jax.random.randint(jax.random.key(seed), (n, 4), 0, TINY.vocab_size), np.int32)
    sampling, key = Sampling(temperature=1.0), jax.random.key(seed)
    out = jspec.generate(target, prompts, max_new_tokens=ROW_LEN - 4, sampling=sampling, rng=key)
    return sequence_rows(np.concatenate([prompts, np.asarray(out.tokens)], axis=1), answer_start=4, top_k=8)


def _train(target, kind: str, steps: int, directory, stop_after=None):
    head = EagleHead.from_target(target, kind=kind, seed=1)
    data = target_rows(target, _rows(target, ROWS, seed=1), head.config.feature_layers, top_k=8)
    config = TrainConfig(steps=steps, batch_size=8, seq_len=ROW_LEN, learning_rate=3e-3, warmup_steps=10, eval_every=steps,
                         checkpoint_every=10, weight_decay=0.0)  # fmt: skip

    def batch_fn(step, _):
        order = np.random.default_rng(step // 3).permutation(ROWS)
        return data.batch(order[(step % 3) * 8 : (step % 3 + 1) * 8])

    loss = EagleLoss(steps=STEPS, feature_weight=1.0 if kind == "eagle1" else 0.0)
    return fit(head, loss, batch_fn, lambda m: {}, config, str(directory), stop_after=stop_after, progress=False,
               log=lambda s: None, trainable=HEAD_PARAMS)  # fmt: skip


@pytest.fixture(scope="module")
def trained(target, tmp_path_factory):
    """EAGLE-1 and EAGLE-3 heads trained for 150 steps on the target's own samples."""
    return {kind: _train(target, kind, 150, tmp_path_factory.mktemp(kind))[0] for kind in ("eagle1", "eagle3")}


@pytest.fixture(scope="module")
def held_out(target):
    return _rows(target, 8, seed=2)


# --- The target's features, from the same pass that verifies. ----------------------------------


def test_verify_pass_features_equal_a_separate_forward(target):
    """A drafted tree scored with features: every node's features equal those of a plain causal
    pass over its root path (the last layer, its normed output and an inner one)."""
    layers = (1, 2)
    prompt = np.asarray(jax.random.randint(jax.random.key(3), (1, 7), 0, 64), np.int32)
    lengths = jnp.array([7])
    strategy = jspec.StaticTree((2, 2))
    drafter = ModelDrafter(random_model(TINY, seed=4))

    @jax.jit
    def draft_and_score(prompt):
        _, cache, prompt_features = jspec.drafters.prefill_model(target, prompt, lengths, 32, layers)
        state = drafter.prefill(jspec.drafters.Prefill(prompt, lengths, cache, prompt_features), jnp.array([5]), 3)
        drafted = strategy.draft(drafter, state, jnp.array([5]), Sampling(), jax.random.key(0))
        return drafted, prompt_features, score_tree(target, cache, drafted, layers)[2]

    @jax.jit
    def full_pass(seq):  # [1, T]: every position's features, in a plain causal pass
        t = seq.shape[1]
        return target(seq, jnp.arange(t)[None], causal_mask(1, t), init_cache(TINY, 1, t), features=layers)[2]

    drafted, prompt_features, features = draft_and_score(jnp.asarray(prompt))
    tree = jax.tree.map(lambda x: np.asarray(x)[0], drafted.tree)
    for node in range(strategy.size):
        path, u = [], node
        while u >= 0:
            path.append(int(tree.tokens[u]))
            u = int(tree.parent[u])
        full = full_pass(jnp.asarray(np.concatenate([prompt[0], path[::-1]])[None]))
        np.testing.assert_allclose(np.asarray(features[0, node]), np.asarray(full[0, -1]), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(prompt_features[0]), np.asarray(full[0, :7]), rtol=2e-5, atol=2e-5)


def test_bad_feature_layers_raise(target):
    with pytest.raises(ValueError, match="features"):
        target(
            jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), causal_mask(1, 1), init_cache(TINY, 1, 4), features=(3,)
        )
    with pytest.raises(ValueError, match="feature_layers"):
        EagleConfig(TINY, "eagle1", feature_layers=(1, 2))


# --- Training. ---------------------------------------------------------------------------------


def test_ttt_masks_are_the_attention_of_a_drafted_chain():
    """Step s's query at i sees the real entries <= i - s + 1 and its own draft entries i - s + 2 .. i."""
    masks = ttt_masks(jnp.ones((1, 6), jnp.int32), 3)
    m3 = np.asarray(masks[2][0]).reshape(6, 3, 6)  # [query, step, key]
    i = 4
    assert list(np.flatnonzero(m3[i, 0])) == [0, 1, 2]
    assert list(np.flatnonzero(m3[i, 1])) == [3] and list(np.flatnonzero(m3[i, 2])) == [4]
    assert not np.asarray(masks[0][0])[:, 6:].any()  # step 1 sees no draft entries


def test_trained_head_beats_untrained_on_held_out_acceptance(target, trained, held_out):
    held = target_rows(target, held_out, trained["eagle1"].config.feature_layers, top_k=8)
    before = held_out_acceptance(EagleHead.from_target(target, kind="eagle1", seed=1), held)
    after = held_out_acceptance(trained["eagle1"], held)
    assert after["alpha_1"] > before["alpha_1"] + 0.2, (before, after)
    assert after["tau_chain"] > 1.4, after


def test_training_resumes_identically(target, tmp_path):
    straight, _ = _train(target, "eagle3", 20, tmp_path / "straight")
    _train(target, "eagle3", 20, tmp_path / "resumed", stop_after=10)
    resumed, _ = _train(target, "eagle3", 20, tmp_path / "resumed")
    for a, b in zip(jax.tree.leaves(nnx.state(straight)), jax.tree.leaves(nnx.state(resumed))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_save_load_roundtrip_without_the_shared_embedding(target, trained, tmp_path):
    head = trained["eagle3"]
    save_head(head, tmp_path / "head")
    loaded = load_head(tmp_path / "head", target)
    for a, b in zip(jax.tree.leaves(nnx.state(head)), jax.tree.leaves(nnx.state(loaded))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = random_model(dataclasses.replace(TINY, d_model=16, n_heads=2, n_kv_heads=1), seed=0)
    with pytest.raises(ValueError, match="d_model"):
        load_head(tmp_path / "head", other)


# --- Decoding with a head. ---------------------------------------------------------------------

PROMPTS = np.asarray(jax.random.randint(jax.random.key(7), (3, 9), 0, 64), np.int32)
LENGTHS = np.array([9, 4, 6], np.int32)


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
@pytest.mark.parametrize(
    "strategy",
    [jspec.Chain(k=3), jspec.EagleTree(top_k=2, depth=3, size=7), jspec.StaticTree((2, 1, 1))],
    ids=["chain", "eagle-tree", "static-tree"],
)
def test_greedy_equals_target_greedy(target, trained, kind, strategy):
    expected = jspec.generate(target, PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=24)
    out = jspec.speculative_generate(target, trained[kind], PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=24, strategy=strategy)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
    assert float(out.stats.mean_accepted) > 1.3  # the head drafts well: the test exercises acceptance


def test_head_for_another_target_is_refused(target, trained):
    other = random_model(dataclasses.replace(TINY, n_layers=3), seed=0)
    with pytest.raises(ValueError, match="n_layers"):
        jspec.speculative_generate(other, trained["eagle1"], PROMPTS, max_new_tokens=4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy, kind",
    [(jspec.Chain(k=2), "eagle1"), (jspec.EagleTree(top_k=2, depth=2, size=5), "eagle3")],
    ids=["chain-eagle1", "eagle-tree-eagle3"],
)
def test_first_three_tokens_follow_the_target_law_at_t1(strategy, kind):
    target, _ = unrelated_small_pair()
    head = EagleHead.from_target(target, kind=kind, seed=5)
    assert first3_pvalue(strategy, pair=(target, head)) > 1e-3
