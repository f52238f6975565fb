"""jspec.models.mamba2 and the Mamba-2 part of jspec.models.kv_cache: state-space (SSM) and hybrid
targets score chains and token trees in one pass, commit the accepted path's state, and decode
exactly (T=0) and in law (T=1) with chain and tree speculation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_decode import SMALL, first3_pvalue

import jspec
from jspec.models import ModelConfig, causal_mask, commit, commit_path, init_cache, truncate
from jspec.models import kv_cache as kv_cache_module
from jspec.models.mamba2 import node_states, path_slots

from conftest import PLAIN_PROMPTS, RAGGED_LENGTHS, REPEATING_PROMPTS, TINY, causal_logits, forward, perturbed, random_model

SSM_FIELDS = dict(ssm_state=8, ssm_head_dim=8, ssm_groups=2)
# Pure Mamba-2 (no attention, no MLP) and a hybrid (attention between Mamba-2 layers, MLPs).
MAMBA = dataclasses.replace(TINY, mlp="none", layer_types=("mamba", "mamba"), **SSM_FIELDS)
HYBRID = dataclasses.replace(TINY, n_layers=3, layer_types=("mamba", "attention", "mamba"), **SSM_FIELDS)
CONFIGS = {"mamba": MAMBA, "hybrid": HYBRID}
TOKENS = np.asarray(jax.random.randint(jax.random.key(1), (2, 14), 0, 64), np.int32)

# A tree of 7 nodes below a root: parents[i] < i.
PARENTS = np.array([-1, 0, 0, 1, 1, 2, 4, 6])


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return random_model(CONFIGS[request.param], seed=0)


@pytest.fixture(scope="module")
def hybrid():
    """The hybrid alone, for what it covers for both kinds of layer."""
    return random_model(HYBRID, seed=0)


@nnx.jit
def forward_at(model, tokens, positions, mask, cache, write_at):
    """`forward` with the new tokens written at window offset `write_at`."""
    return model(tokens, positions, mask, cache, write_at=write_at)


def ancestor_mask(parents, b: int = 2) -> jax.Array:
    """bool `[B, N, N]`: node j is node i or one of its ancestors."""
    paths = root_paths(np.asarray(parents))
    mask = np.zeros((len(paths), len(paths)), bool)
    for node, path in enumerate(paths):
        mask[node, path] = True
    return jnp.asarray(np.broadcast_to(mask, (b,) + mask.shape))


def root_paths(parents: np.ndarray) -> list[list[int]]:
    paths = []
    for node in range(len(parents)):
        path = [node]
        while parents[path[0]] >= 0:
            path.insert(0, int(parents[path[0]]))
        paths.append(path)
    return paths


def prefill(model, tokens, n: int, size: int = 32):
    b = tokens.shape[0]
    positions = jnp.broadcast_to(jnp.arange(n), (b, n))
    _, cache = forward(model, jnp.asarray(tokens[:, :n]), positions, causal_mask(b, n), init_cache(model.config, b, size))
    return commit(cache, jnp.full((b,), n, jnp.int32), n)


def test_cached_incremental_decoding_equals_a_full_pass(model):
    full = np.asarray(causal_logits(model, TOKENS))
    b, t = TOKENS.shape
    cache, outputs = prefill(model, TOKENS, 5), []
    for i, chunk in ((5, 1), (6, 3), (9, 1), (10, 4)):  # one token at a time and chunks, all committed
        positions = jnp.broadcast_to(jnp.arange(i, i + chunk), (b, chunk))
        logits, cache = forward(model, jnp.asarray(TOKENS[:, i : i + chunk]), positions, causal_mask(b, chunk), cache)
        cache = commit(cache, jnp.full((b,), chunk, jnp.int32), chunk)
        outputs.append(logits)
    np.testing.assert_allclose(np.concatenate(outputs, 1), full[:, 5:], atol=2e-5)


def score_tree(model, seed: int, b: int = 2):
    """Random tokens `[B, N]` on the PARENTS tree, scored in one pass after 6 committed prompt
    tokens. Returns (nodes, root paths, logits, cache)."""
    nodes = np.random.default_rng(seed).integers(0, 64, (b, len(PARENTS))).astype(np.int32)
    paths = root_paths(PARENTS)
    depth = jnp.asarray([len(p) - 1 for p in paths])[None].repeat(b, 0)
    logits, cache = forward(model, jnp.asarray(nodes), 6 + depth, ancestor_mask(PARENTS, b), prefill(model, TOKENS, 6))
    return nodes, paths, logits, cache


def test_a_tree_pass_gives_every_node_the_outputs_of_its_root_path(model):
    """Random tokens on a branching tree after a committed prefix: each node's logits equal those of
    a causal pass over the prefix and the node's root path alone."""
    nodes, paths, logits, _ = score_tree(model, seed=0)
    for node, path in enumerate(paths):
        reference = causal_logits(model, np.concatenate([TOKENS[:, :6], nodes[:, path]], 1))[:, -1]
        np.testing.assert_allclose(np.asarray(logits[:, node]), np.asarray(reference), atol=2e-5, err_msg=f"node {node}")


def test_committing_a_path_continues_as_if_only_that_path_had_been_fed(model):
    b = 2
    nodes, paths, _, cache = score_tree(model, seed=1, b=b)
    # Row 0 keeps the path to node 6 (0 -> 1 -> 4 -> 6), row 1 the root and node 2 only.
    kept = [paths[6], paths[2]]
    path = jnp.asarray([kept[0], kept[1] + [0, 0]], jnp.int32)
    cache = commit_path(cache, path, jnp.asarray([4, 2], jnp.int32))
    following = np.random.default_rng(2).integers(0, 64, (b, 3)).astype(np.int32)
    positions = cache.lengths[:, None] + jnp.arange(3)
    logits, _ = forward(model, jnp.asarray(following), positions, causal_mask(b, 3), cache)
    for row in range(b):
        fed = np.concatenate([TOKENS[row, :6], nodes[row, kept[row]], following[row]])[None]
        reference = causal_logits(model, fed)[0, -3:]
        np.testing.assert_allclose(np.asarray(logits[row]), np.asarray(reference), atol=2e-5)


def test_a_drafter_style_window_scores_a_tree_level_by_level(hybrid):
    """write_at: the levels of a tree scored in separate calls against the uncommitted levels
    before them give the one-pass tree's outputs (the convolution and the SSM read the window)."""
    model, b, n = hybrid, 2, len(PARENTS)
    nodes = jnp.asarray(np.random.default_rng(3).integers(0, 64, (b, n)), jnp.int32)
    paths = root_paths(PARENTS)
    depth = jnp.asarray([len(p) - 1 for p in paths])[None].repeat(b, 0)
    mask = ancestor_mask(PARENTS, b)
    cache = prefill(model, TOKENS, 6)
    whole, _ = forward(model, nodes, 6 + depth, mask, cache)
    parts = []
    for start, stop in ((0, 3), (3, 6), (6, 8)):
        level = (nodes[:, start:stop], 6 + depth[:, start:stop], mask[:, start:stop])
        logits, cache = forward_at(model, *level, cache, jnp.int32(start))
        parts.append(logits)
    np.testing.assert_allclose(np.concatenate(parts, 1), np.asarray(whole), atol=2e-5)


def test_path_slots_follow_each_path_back_into_the_committed_prefix():
    parents = [-1, 0, 1, 0]  # 0 -> 1 -> 2 and 0 -> 3
    mask = ancestor_mask(parents, 1)
    slots = np.asarray(path_slots(mask, jnp.asarray([5]), 4))[0]
    # Node 2 at slot 7: itself, node 1 (slot 6), the root (slot 5), the last committed slot 4.
    np.testing.assert_array_equal(slots[2], [7, 6, 5, 4])
    np.testing.assert_array_equal(slots[3], [8, 5, 4, 3])  # node 3 skips node 1's branch
    np.testing.assert_array_equal(np.asarray(path_slots(mask, jnp.asarray([1]), 4))[0, 0], [1, 0, -1, -1])


def test_every_node_state_equals_the_sequential_recurrence():
    """`node_states` (keeping each node's state) against h <- a h + x B^T along each root path."""
    rng = np.random.default_rng(4)
    b, w, h, p, g, n = 1, len(PARENTS), 4, 3, 2, 5
    log_decay = -rng.uniform(0.01, 1.0, (b, w, h))
    x, bb = rng.normal(size=(b, w, h, p)), rng.normal(size=(b, w, g, n))
    state = rng.normal(size=(b, h, p, n))
    mask = ancestor_mask(PARENTS, 1)
    got = np.asarray(node_states(*(jnp.asarray(a, jnp.float32) for a in (log_decay, x, bb, state)), mask))
    for node, path in enumerate(root_paths(PARENTS)):
        s = state[0]
        for j in path:
            s = np.exp(log_decay[0, j])[:, None, None] * s + x[0, j][:, :, None] * np.repeat(bb[0, j], h // g, 0)[:, None, :]
        np.testing.assert_allclose(got[0, node], s, rtol=1e-5, atol=1e-5)


def test_commit_bounds_and_refusals(hybrid):
    model = hybrid
    cache = prefill(model, TOKENS, 6)
    b = TOKENS.shape[0]
    positions = jnp.broadcast_to(jnp.arange(6, 9), (b, 3))
    _, scored = forward(model, jnp.asarray(TOKENS[:, 6:9]), positions, causal_mask(b, 3), cache)
    n = jnp.asarray([2, 0], jnp.int32)
    bounded, unbounded = commit(scored, n, 3), commit(scored, n)  # max_new only sizes the work
    np.testing.assert_allclose(np.asarray(bounded.ssm.state), np.asarray(unbounded.ssm.state), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(bounded.ssm.state[:, 1]), np.asarray(cache.ssm.state[:, 1]))  # n = 0
    with pytest.raises(ValueError, match="cannot be truncated"):
        truncate(cache, cache.lengths - 1)


def test_a_model_with_mamba_layers_cannot_draft():
    target = random_model(TINY, seed=0)
    with pytest.raises(ValueError, match="drafter: a model with Mamba-2 layers"):
        jspec.speculative_generate(target, random_model(MAMBA, seed=1), PLAIN_PROMPTS, max_new_tokens=4)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(layer_types=("mamba",)), "layer_types"),
        (dict(layer_types=("mamba", "conv")), "layer_types"),
        (dict(layer_types=("mamba", "mamba"), ssm_head_dim=5), "ssm_head_dim"),
        (dict(layer_types=("mamba", "mamba"), ssm_groups=3), "ssm_groups"),
        (dict(layer_types=("mamba", "mamba"), ssm_dt_limit=(0.1, 0.0)), "ssm_dt_limit"),
        (dict(rope_fraction=0.0), "rope_fraction"),
    ],
)
def test_bad_ssm_configs_raise(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **change)


def attention_drafter(target_config: ModelConfig, target, noise: float):
    """A drafter for an SSM target: an attention model over the same vocabulary whose embedding and
    head are the target's, perturbed (so that it agrees with the target often, not always)."""
    drafter = random_model(dataclasses.replace(target_config, n_layers=1, layer_types=None, mlp="swiglu"), seed=5)
    drafter.embed.embedding.value = target.embed.embedding[...]
    drafter.lm_head.kernel.value = target.lm_head.kernel[...]
    return perturbed(drafter, noise, seed=1)


@pytest.mark.parametrize("strategy", [jspec.Chain(k=3), jspec.StaticTree(branching=(2, 2, 1))], ids=["chain", "tree"])
def test_greedy_speculation_equals_the_target_s_greedy_output(model, strategy):
    prompts = np.concatenate([REPEATING_PROMPTS, PLAIN_PROMPTS])
    lengths = np.concatenate([RAGGED_LENGTHS, RAGGED_LENGTHS])
    expected = jspec.generate(model, prompts, prompt_lengths=lengths, max_new_tokens=16)
    drafter = attention_drafter(model.config, model, 0.2)  # agrees often, not always
    out = jspec.speculative_generate(model, drafter, prompts, prompt_lengths=lengths, max_new_tokens=16, strategy=strategy)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
    assert float(out.stats.mean_accepted) > 1.05  # some drafts accepted: multi-token paths were committed


# Exact law at T=1: SMALL's vocabulary of 4, with Mamba-2 layers.
SMALL_MAMBA = dataclasses.replace(SMALL, mlp="none", layer_types=("mamba",), ssm_state=4, ssm_head_dim=8)
SMALL_HYBRID = dataclasses.replace(SMALL, n_layers=2, layer_types=("mamba", "attention"), ssm_state=4, ssm_head_dim=8)


def small_ssm_pair(config: ModelConfig):
    """The target's Mamba-2 layers remember through their state alone (the convolution sees the
    current token only, no D skip), with time steps near 1 and decays near 0.6 per token: a wrong
    state then shows in the next tokens' law (at initialisation dt ~ 0.01 leaves the state a small term)."""
    target = random_model(config, seed=11, scale=3.0)
    for block in target.blocks:
        if block.kind == "mamba":
            mixer = block.mamba
            mixer.dt_bias.value = jnp.full_like(mixer.dt_bias[...], 0.5)
            mixer.A_log.value = jnp.full_like(mixer.A_log[...], np.log(0.5))
            mixer.D.value = jnp.zeros_like(mixer.D[...])
            mixer.conv_kernel.value = mixer.conv_kernel[...].at[:-1].set(0.0)
    return target, random_model(SMALL, seed=12, scale=3.0)


# A chain on the pure Mamba-2 target and a tree on the hybrid: each cache kind and each commit (a
# chain's prefix, a tree's gathered path) once; greedy exactness covers all four pairs above.
@pytest.mark.slow
@pytest.mark.parametrize(
    "config, strategy",
    [(SMALL_MAMBA, jspec.Chain(k=2)), (SMALL_HYBRID, jspec.StaticTree(branching=(2, 1)))],
    ids=["chain-mamba", "tree-hybrid"],
)
def test_the_first_three_tokens_follow_the_target_s_law_at_t1(config, strategy):
    assert first3_pvalue(strategy, pair=small_ssm_pair(config)) > 1e-3


@pytest.mark.slow
def test_the_law_test_rejects_a_state_that_keeps_rejected_drafts(monkeypatch):
    """Negative control: committing advances the SSM state over the whole scored chain, rejected
    drafts included (no rollback); the same test rejects the output."""
    advance = kv_cache_module.advance_ssm

    def advance_over_the_scored_chain(ssm, slots, n):  # slots[:, 0] is the root's: the chain follows it
        chain = slots[:, :1] + jnp.arange(slots.shape[1])
        return advance(ssm, chain, jnp.full_like(n, slots.shape[1]))

    monkeypatch.setattr(kv_cache_module, "advance_ssm", advance_over_the_scored_chain)
    jax.clear_caches()  # no program compiled with the real commit may be reused
    try:
        assert first3_pvalue(jspec.Chain(k=2), pair=small_ssm_pair(SMALL_MAMBA)) < 1e-3
    finally:
        jax.clear_caches()


# The tree builders other than the static tree (the target scores and commits every tree the same
# way, `jspec.rounds`; what differs is the tree's shape and verification). Sequoia builds a static
# tree; RASD and prompt lookup score their trees and chains as these do (checked by hand, kept out
# of the suite's time budget).
TREE_STRATEGIES = [
    jspec.EagleTree(top_k=2, depth=3, size=7),
    jspec.DynamicTree(size=7, width=2, max_children=2),
    jspec.MultiCandidate((2, 2, 1)),
    jspec.RSD(beam=2, depth=3),
]


@pytest.mark.slow
def test_every_tree_builder_decodes_a_hybrid_target_exactly(hybrid):
    """Each tree builder (beyond the static tree above) at T=0 on the hybrid target."""
    target = hybrid
    drafter = attention_drafter(HYBRID, target, 0.3)
    prompts, lengths = REPEATING_PROMPTS, RAGGED_LENGTHS
    expected = np.asarray(jspec.generate(target, prompts, prompt_lengths=lengths, max_new_tokens=12).tokens)
    for strategy in TREE_STRATEGIES:
        out = jspec.speculative_generate(target, drafter, prompts, prompt_lengths=lengths, max_new_tokens=12, strategy=strategy)
        np.testing.assert_array_equal(np.asarray(out.tokens), expected, err_msg=repr(strategy))
