"""jspec.models.hf: Hugging Face checkpoints of every supported family load with the same logits and
the same greedy generations (also speculative), and jspec -> HF -> jspec is exact.

The reference models are tiny random-weight `transformers` models on torch CPU (the `hf` extra).
Every parameter is perturbed away from its initial value (norm weights of 1 or 0, zero biases), so
a mis-mapped norm or bias shows in the logits.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the hf extra (torch, transformers) is not installed")
tf = pytest.importorskip("transformers", reason="the hf extra (torch, transformers) is not installed")

from flax import nnx  # noqa: E402

import jspec  # noqa: E402
from jspec.models import ModelConfig, RopeScaling, from_hf, load_tokenizer, to_hf  # noqa: E402
from jspec.models.hf import FAMILIES, config_from_hf  # noqa: E402

from conftest import TINY, causal_logits, random_model  # noqa: E402

VOCAB = 256
MAX_ERR = 1e-4  # float32 on both sides; measured 3e-6 .. 1.3e-5
SSM_FAMILIES = ("mamba2", "bamba")  # state-space targets: they cannot draft (jspec.models.mamba2)


def hf_config(family: str, layers: int = 2):
    """A tiny config of `family` that exercises its distinctive features."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,  # peaked logits: greedy argmax far from ties
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "llama":  # Llama 3.1 RoPE scaling, short enough an original context to matter here
        rope = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
            "rope_theta": 10000.0,
        }
        return tf.LlamaConfig(**common, rope_parameters=rope)
    if family == "qwen2":  # layers from max_window_layers on use a sliding window
        return tf.Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=32)
    if family == "gemma":
        return tf.GemmaConfig(**{**common, "num_key_value_heads": 1}, head_dim=16)
    if family == "gemma2":  # a window of 4 and small caps, so sliding layers and soft-capping matter
        return tf.Gemma2Config(
            **common,
            head_dim=16,
            sliding_window=4,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        )
    if family == "mamba2":  # 2 groups of heads, a convolution bias; no attention, no MLP
        return tf.Mamba2Config(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=layers,
            num_heads=8,
            head_dim=16,
            state_size=16,
            n_groups=2,
            expand=2,
            initializer_range=0.2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    if family == "bamba":  # Mamba-2 then attention (partial RoPE), projection biases on the Mamba-2 layers
        return tf.BambaConfig(
            **{k: v for k, v in common.items() if k != "max_position_embeddings"},
            max_position_embeddings=128,
            attn_layer_indices=[1],
            mamba_n_heads=8,
            mamba_d_head=16,
            mamba_d_state=16,
            mamba_n_groups=2,
            mamba_proj_bias=True,
        )
    assert family == "gpt2"
    return tf.GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=layers,
        n_head=4,
        n_positions=128,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
    )


def hf_model(family: str, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_config(family, layers), attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def hf_greedy(model, ids: np.ndarray, n: int) -> np.ndarray:
    """Greedy continuation by full re-scoring (no cache, no generation config): the plain definition."""
    ids = torch.tensor(ids, dtype=torch.long)
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids.numpy()


def jspec_logits(model, ids: np.ndarray) -> np.ndarray:
    return np.asarray(causal_logits(model, ids))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (directory, HF model) for a 2-layer target; family + "-drafter": a 1-layer drafter."""
    out = {}
    for family in FAMILIES:
        drafters = () if family in SSM_FAMILIES else ((family + "-drafter", 1, 1),)  # SSM targets use llama's
        for name, layers, seed in ((family, 2, 0), *drafters):
            model = hf_model(family, layers, seed)
            directory = tmp_path_factory.mktemp(name)
            model.save_pretrained(directory)
            out[name] = (directory, model)
    return out


IDS = np.random.default_rng(0).integers(3, VOCAB, (2, 12))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hugging_face(checkpoints, family):
    directory, reference = checkpoints[family]
    model = from_hf(directory)
    err = np.abs(jspec_logits(model, IDS) - hf_logits(reference, IDS)).max()
    print(f"{family}: max |logits - HF logits| = {err:.2e}")
    assert err < MAX_ERR


# Each distinctive feature of a family, switched off in the imported config with the same weights:
# the logits must then disagree with Hugging Face's (so the parity above is not vacuous).
FEATURES = {
    "llama": {"rope_scaling": None},
    "qwen2": {"sliding_window": None, "sliding_window_layers": None},
    "gemma": {"scale_embeddings": False},
    "gemma2": [
        {"sliding_window": None, "sliding_window_layers": None},
        {"attn_softcap": None},
        {"final_softcap": None},
        {"attn_scale": None},
    ],
    "gpt2": {"gelu_approximate": False},
    "mamba2": {"ssm_dt_limit": (0.0, 1e-3)},  # the time-step clamp is applied
    "bamba": {"rope_fraction": 1.0},  # half the head dims rotate
}


@pytest.mark.parametrize("family", sorted(FEATURES))
def test_each_family_feature_changes_the_logits(checkpoints, family):
    directory, reference = checkpoints[family]
    model = from_hf(directory)
    expected = hf_logits(reference, IDS)
    noise = np.abs(jspec_logits(model, IDS) - expected).max()  # float32 rounding between the two
    changes = FEATURES[family] if isinstance(FEATURES[family], list) else [FEATURES[family]]
    for change in changes:
        other = _with_config(model, dataclasses.replace(model.config, **change))
        err = np.abs(jspec_logits(other, IDS) - expected).max()
        assert err > 30 * noise, (family, change, err, noise)


def _with_config(model, config: ModelConfig):
    """The same parameters under another config of identical parameter shapes."""
    abstract = nnx.eval_shape(lambda: jspec.models.Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    return nnx.merge(graphdef, nnx.state(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_hugging_face_also_speculative(checkpoints, family):
    target = from_hf(checkpoints[family][0])
    # A Mamba-2 state cannot rewind, so state-space targets draft with an attention model.
    drafter = from_hf(checkpoints[("llama" if family in SSM_FAMILIES else family) + "-drafter"][0])
    n = 12
    prompts = IDS[:, :8]
    expected = hf_greedy(checkpoints[family][1], prompts, n)[:, 8:]
    ar = jspec.generate(target, prompts.astype(np.int32), max_new_tokens=n)
    np.testing.assert_array_equal(np.asarray(ar.tokens), expected)
    spec = jspec.speculative_generate(target, drafter, prompts.astype(np.int32), max_new_tokens=n, strategy=jspec.Chain(k=3))
    np.testing.assert_array_equal(np.asarray(spec.tokens), expected)
    if family in ("llama", "gemma2"):  # a token tree too, on the plain and on the most unusual family
        tree = jspec.speculative_generate(
            target, drafter, prompts.astype(np.int32), max_new_tokens=n, strategy=jspec.StaticTree(branching=(2, 1))
        )
        np.testing.assert_array_equal(np.asarray(tree.tokens), expected)


EXPORT_CONFIGS = {
    "llama": dataclasses.replace(TINY, rope_scaling=RopeScaling("llama3", 8.0, original_max_len=16)),
    "llama-biases": dataclasses.replace(TINY, qkv_bias=True, o_bias=True, mlp_bias=True, tie_embeddings=True),
    "qwen2": dataclasses.replace(TINY, qkv_bias=True),
    "qwen3": dataclasses.replace(TINY, qk_norm=True, head_dim=16, rope_scaling=RopeScaling("linear", 2.0)),
}


@pytest.mark.parametrize("name", sorted(EXPORT_CONFIGS))
def test_jspec_to_hf_to_jspec_is_exact_and_hf_agrees(tmp_path, name):
    model = random_model(EXPORT_CONFIGS[name], seed=3)
    graph, state = nnx.split(model)  # random_model leaves biases and norms at 0 / 1: perturb them all
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    state = jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    model = nnx.merge(graph, state)
    to_hf(model, tmp_path / "hf")
    back = from_hf(tmp_path / "hf")
    assert back.config == model.config
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(back)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    reference = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = IDS % model.config.vocab_size
    err = np.abs(jspec_logits(model, ids) - hf_logits(reference, ids)).max()
    assert err < MAX_ERR, err
    with pytest.raises(ValueError, match="never overwrites"):
        to_hf(model, tmp_path / "hf")


def test_sharded_bfloat16_checkpoint_loads_in_its_dtype(tmp_path):
    reference = hf_model("qwen3").to(torch.bfloat16)
    reference.save_pretrained(tmp_path, max_shard_size="100KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len({f for f in os.listdir(tmp_path) if f.endswith(".safetensors")}) > 1
    model = from_hf(tmp_path, mesh=jspec.sharding.make_mesh(data=1, model=1))
    assert model.config.param_dtype == "bfloat16" and model.embed.embedding[...].dtype == jnp.bfloat16
    assert isinstance(model.embed.embedding[...].sharding, jax.sharding.NamedSharding)  # laid out on the mesh
    as_float32 = from_hf(tmp_path, param_dtype="float32")
    # A fresh float32 load (reference.float() would keep RoPE's inverse frequencies rounded to bf16).
    reference = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    np.testing.assert_allclose(jspec_logits(as_float32, IDS), hf_logits(reference.eval(), IDS), atol=MAX_ERR)


def test_bad_checkpoints_raise_clear_errors(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        from_hf(tmp_path)
    llama = json.loads((checkpoints["llama"][0] / "config.json").read_text())
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf({**llama, "model_type": "mixtral"})
    with pytest.raises(ValueError, match="rope scaling type"):
        config_from_hf({**llama, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}})
    with pytest.raises(ValueError, match="hidden_act"):
        config_from_hf({**llama, "hidden_act": "relu"})
    # A tensor missing from the weights.
    from safetensors.flax import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(llama))
    tensors = load_file(str(checkpoints["llama"][0] / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        from_hf(broken)
    # Only the Llama family is written back.
    with pytest.raises(ValueError, match="Llama family"):
        to_hf(from_hf(checkpoints["gpt2"][0]), tmp_path / "gpt2")


def test_tokenizer_json_loads(tmp_path):
    tokenizer = jspec.demo.tokenizer()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    text = "def f(x):\n    return x + 1\n"
    assert loaded.encode(text).ids == tokenizer.encode(text).ids
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "nowhere")
