"""Hugging Face checkpoints: `config.json` + safetensors weights <-> a jspec `Transformer`.

`from_hf(directory)` reads a checkpoint written by `transformers`' `save_pretrained` (one
`model.safetensors` or a sharded `model.safetensors.index.json`) and returns a jspec model whose
logits match the Hugging Face model's. Families: Llama (Llama 2/3, with Llama 3.1 and linear RoPE
scaling), Qwen2 (q/k/v biases, optional sliding window), Qwen3 (q/k RMSNorm), Gemma (scaled
embeddings, (1 + w) RMSNorm, GeGLU), Gemma 2 (also post-norms, attention and final logit
soft-capping, sliding-window layers, query_pre_attn_scalar), GPT-2 (learned positions,
LayerNorm, GELU, fused Conv1D q/k/v), and the state-space families Mamba-2 (Mamba-2 layers only,
no MLP) and Bamba (a hybrid of Mamba-2 and attention layers, each followed by a SwiGLU MLP,
partial RoPE). `to_hf(model, directory)` writes the Llama family (Llama,
Qwen2, Qwen3) back in the same format, so jspec -> HF -> jspec is exact.

Gemma's RMSNorm multiplies by (1 + w): jspec stores 1 + w as the norm scale, in the parameter
dtype, so in bfloat16 that sum is rounded once at load where Hugging Face adds 1 in float32 at
every call (last-bit differences; the parity tests run in float32).

Weights are read into host memory first and then placed on the default device, or straight over a
device mesh with `from_hf(directory, mesh=...)` (`jspec.sharding`), so a model larger than one chip
loads.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from jspec.models.config import ModelConfig, RopeScaling
from jspec.models.transformer import Transformer

FAMILIES = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gpt2", "mamba2", "bamba")
EXPORT_FAMILIES = ("llama", "qwen2", "qwen3")

_LLAMA_LIKE = ("llama", "qwen2", "qwen3", "gemma", "gemma2")
# Tensors some checkpoints carry that are buffers, not parameters (recomputed by every implementation).
_BUFFER_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


# ----------------------------------------------------------------------------- config


def _family(hf: dict) -> str:
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"config.json model_type must be one of {FAMILIES}, got {family!r}")
    return family


def _rope(hf: dict) -> tuple[float, RopeScaling | None]:
    """rope_theta and scaling from either the legacy keys (rope_theta, rope_scaling) or
    transformers 5's `rope_parameters`."""
    params = hf.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"per-layer-type rope_parameters are not supported, got {params!r}")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", float(scaling["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3",
            float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_len=int(scaling["original_max_position_embeddings"]),
        )
    raise ValueError(f"rope scaling type must be default, linear or llama3, got {kind!r}")


def _checkpoint_dtype(hf: dict) -> str:
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"config.json dtype must be float32, bfloat16 or float16, got {name!r}")
    return name


def _sliding_layers(hf: dict, n_layers: int) -> tuple[int | None, tuple[int, ...] | None]:
    """(window, layers using it) from layer_types, or Qwen2's use_sliding_window/max_window_layers."""
    window = hf.get("sliding_window")
    if "use_sliding_window" in hf and not hf["use_sliding_window"]:
        return None, None
    types = hf.get("layer_types")
    if types is None and hf.get("use_sliding_window"):
        first = hf.get("max_window_layers", 0)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    if window is None or types is None:
        return None, None
    layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ValueError(f"config.json layer_types must be sliding_attention or full_attention, got {unknown!r}")
    return (int(window), layers) if layers else (None, None)


def config_from_hf(hf: dict, *, param_dtype: str | None = None, dtype: str | None = None) -> ModelConfig:
    """The jspec `ModelConfig` equivalent to a Hugging Face `config.json` (as a dict).

    Raises ValueError for anything jspec would compute differently (an unsupported activation,
    RoPE type, attention variant), naming the field.
    """
    family = _family(hf)
    param_dtype = param_dtype or _checkpoint_dtype(hf)
    dtype = dtype or param_dtype
    if family in ("mamba2", "bamba"):
        return _ssm_config(hf, family, param_dtype, dtype)
    if family == "gpt2":
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if hf.get(flag):
                raise ValueError(f"config.json {flag}=True is not supported for gpt2")
        if not hf.get("scale_attn_weights", True):
            raise ValueError("config.json scale_attn_weights=False is not supported for gpt2")
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu"):
            raise ValueError(f"config.json activation_function must be a GELU for gpt2, got {act!r}")
        d = hf["n_embd"]
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            d_model=d,
            n_layers=hf["n_layer"],
            n_heads=hf["n_head"],
            n_kv_heads=hf["n_head"],
            d_ff=hf.get("n_inner") or 4 * d,
            max_seq_len=hf["n_positions"],
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=hf.get("tie_word_embeddings", True),
            param_dtype=param_dtype,
            dtype=dtype,
            mlp="gelu",
            norm="layer",
            positions="learned",
            qkv_bias=True,
            o_bias=True,
            gelu_approximate=act != "gelu",
        )

    act = hf.get("hidden_activation") or hf.get("hidden_act")
    gemma = family in ("gemma", "gemma2")
    if gemma:
        # transformers maps Gemma's legacy hidden_act="gelu" to the tanh approximation.
        if act not in ("gelu", "gelu_pytorch_tanh"):
            raise ValueError(f"config.json hidden_activation must be gelu_pytorch_tanh for {family}, got {act!r}")
    elif act != "silu":
        raise ValueError(f"config.json hidden_act must be silu for {family}, got {act!r}")
    if family == "qwen3" and hf.get("attention_bias"):
        raise ValueError("config.json attention_bias=True is not supported for qwen3")
    theta, scaling = _rope(hf)
    n_heads = hf["num_attention_heads"]
    n_layers = hf["num_hidden_layers"]
    window, window_layers = _sliding_layers(hf, n_layers)
    if family == "llama" and hf.get("sliding_window"):
        raise ValueError(f"config.json sliding_window is not supported for llama, got {hf['sliding_window']!r}")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    attention_bias = bool(hf.get("attention_bias", False))
    mlp_bias = bool(hf.get("mlp_bias", False))
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_ff=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"],
        # Implicit where jspec's default agrees, so that jspec -> HF -> jspec returns an equal config.
        head_dim=None if head_dim == hf["hidden_size"] // n_heads else head_dim,
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", gemma),
        param_dtype=param_dtype,
        dtype=dtype,
        mlp="geglu" if gemma else "swiglu",
        mlp_bias=mlp_bias or None,
        qkv_bias=family == "qwen2" or attention_bias,
        o_bias=family == "llama" and attention_bias,
        qk_norm=family == "qwen3",
        scale_embeddings=gemma,
        post_norms=family == "gemma2",
        attn_scale=hf["query_pre_attn_scalar"] ** -0.5 if family == "gemma2" else None,
        attn_softcap=hf.get("attn_logit_softcapping") if family == "gemma2" else None,
        final_softcap=hf.get("final_logit_softcapping") if family == "gemma2" else None,
        sliding_window=window,
        sliding_window_layers=window_layers,
    )


def _json_float(value) -> float:
    """A float from config.json; transformers writes infinity as {"__float__": "Infinity"}."""
    return float(value["__float__"] if isinstance(value, dict) else value)


# The Mamba-2 layer's config.json keys per family, for (ssm_state, ssm_head_dim, ssm_expand,
# ssm_groups, ssm_conv, heads) and, with their defaults, (ssm_conv_bias, ssm_proj_bias).
_SSM_KEYS = {
    "mamba2": (("state_size", "head_dim", "expand", "n_groups", "conv_kernel", "num_heads"), ("use_conv_bias", "use_bias")),
    "bamba": (
        ("mamba_d_state", "mamba_d_head", "mamba_expand", "mamba_n_groups", "mamba_d_conv", "mamba_n_heads"),
        ("mamba_conv_bias", "mamba_proj_bias"),
    ),
}


def _ssm_config(hf: dict, family: str, param_dtype: str, dtype: str) -> ModelConfig:
    """Mamba-2 (no attention, no MLP) and Bamba (attention at `attn_layer_indices`, SwiGLU MLPs)."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json hidden_act must be silu for {family}, got {act!r}")
    n_layers = hf["num_hidden_layers"]
    d = hf["hidden_size"]
    (state, head_dim, expand, groups, conv, heads), (conv_bias, proj_bias) = _SSM_KEYS[family]
    ssm = dict(
        ssm_state=hf[state],
        ssm_head_dim=hf[head_dim],
        ssm_expand=hf[expand],
        ssm_groups=hf[groups],
        ssm_conv=hf[conv],
        ssm_conv_bias=hf.get(conv_bias, True),
        ssm_proj_bias=hf.get(proj_bias, False),
    )
    heads = hf[heads]
    if family == "mamba2":
        types = ("mamba",) * n_layers
        # Attention fields unused (no attention layer); no position limit of its own.
        arch = dict(n_heads=1, n_kv_heads=1, d_ff=1, max_seq_len=1 << 20, mlp="none")
        eps, tied = hf.get("layer_norm_epsilon", 1e-5), hf.get("tie_word_embeddings", False)
    else:
        attn = set(hf.get("attn_layer_indices") or ())
        types = tuple("attention" if i in attn else "mamba" for i in range(n_layers))
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError("config.json attention_bias / mlp_bias are not supported for bamba")
        if hf.get("num_experts", 1) != 1:
            raise ValueError(f"config.json num_experts must be 1 for bamba, got {hf['num_experts']!r}")
        theta, scaling = _rope(hf)
        n_heads = hf["num_attention_heads"]
        arch = dict(
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            d_ff=hf["intermediate_size"],
            max_seq_len=hf["max_position_embeddings"],
            rope_theta=theta,
            rope_scaling=scaling,
            rope_fraction=float((hf.get("rope_parameters") or {}).get("partial_rotary_factor", 0.5)),
        )
        eps, tied = hf.get("rms_norm_eps", 1e-5), hf.get("tie_word_embeddings", False)
    limit = hf.get("time_step_limit") or (0.0, float("inf"))
    config = ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=d,
        n_layers=n_layers,
        norm_eps=eps,
        tie_embeddings=tied,
        param_dtype=param_dtype,
        dtype=dtype,
        layer_types=types,
        ssm_dt_limit=tuple(_json_float(x) for x in limit),
        **ssm,
        **arch,
    )
    if config.ssm_heads != heads:
        raise ValueError(
            f"config.json: {family} needs expand * hidden_size = heads * head_dim, got {config.ssm_inner} vs {heads} heads"
        )
    return config


def _export_family(config: ModelConfig) -> str:
    """Which Llama-family architecture a jspec config is, or ValueError if none."""
    llama_like = (
        config.mlp == "swiglu"
        and config.norm == "rms"
        and config.positions == "rope"
        and not config.scale_embeddings
        and not config.post_norms
        and config.attn_scale is None
        and config.attn_softcap is None
        and config.final_softcap is None
        and config.sliding_window is None
        and config.head_tokens is None
    )
    if not llama_like:
        raise ValueError(f"to_hf writes the Llama family (Llama, Qwen2, Qwen3) only; this config is not one: {config!r}")
    if config.qk_norm:
        if config.qkv_bias or config.o_bias:
            raise ValueError("to_hf: q/k norm with attention biases matches no Hugging Face family")
        return "qwen3"
    if config.qkv_bias and not config.o_bias:
        return "qwen2"
    if config.qkv_bias != config.o_bias:
        raise ValueError("to_hf: an output-projection bias without q/k/v biases matches no Hugging Face family")
    return "llama"


def config_to_hf(config: ModelConfig) -> dict:
    """A Hugging Face `config.json` dict for a Llama-family jspec config."""
    family = _export_family(config)
    architecture = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    hf = {
        "architectures": [architecture],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.resolved_head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "torch_dtype": config.param_dtype,
    }
    if family == "llama":
        hf["attention_bias"] = config.qkv_bias
        hf["mlp_bias"] = config.resolved_mlp_bias
    elif config.resolved_mlp_bias:
        raise ValueError(f"to_hf: {family} has no MLP biases")
    if family in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = False
    if config.rope_scaling is not None:
        s = config.rope_scaling
        hf["rope_scaling"] = {"rope_type": s.kind, "factor": s.factor}
        if s.kind == "llama3":
            hf["rope_scaling"].update(
                low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_len,
            )
    return hf


# ----------------------------------------------------------------------------- weights

# A parameter's place: a path into `nnx.to_pure_dict(state)`, its Hugging Face name, and how the
# Hugging Face tensor becomes the jspec one ("linear": torch's [out, in] -> [in, out]).
Entry = tuple[tuple, str, str]


def _llama_like_entries(config: ModelConfig, family: str) -> list[Entry]:
    norm = "gemma_norm" if family in ("gemma", "gemma2") else "copy"
    entries: list[Entry] = [(("embed", "embedding"), "model.embed_tokens.weight", "copy")]
    for i in range(config.n_layers):
        hf, js = f"model.layers.{i}.", ("blocks", i)
        entries.append((js + ("attn_norm", "scale"), hf + "input_layernorm.weight", norm))
        if config.post_norms:  # Gemma 2: four norms per block
            entries.append((js + ("post_attn_norm", "scale"), hf + "post_attention_layernorm.weight", norm))
            entries.append((js + ("mlp_norm", "scale"), hf + "pre_feedforward_layernorm.weight", norm))
            entries.append((js + ("post_mlp_norm", "scale"), hf + "post_feedforward_layernorm.weight", norm))
        else:
            entries.append((js + ("mlp_norm", "scale"), hf + "post_attention_layernorm.weight", norm))
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            entries.append((js + ("attn", name, "kernel"), hf + f"self_attn.{name}.weight", "linear"))
            if (config.qkv_bias and name != "o_proj") or (config.o_bias and name == "o_proj"):
                entries.append((js + ("attn", name, "bias"), hf + f"self_attn.{name}.bias", "copy"))
        if config.qk_norm:
            entries.append((js + ("attn", "q_norm", "scale"), hf + "self_attn.q_norm.weight", norm))
            entries.append((js + ("attn", "k_norm", "scale"), hf + "self_attn.k_norm.weight", norm))
        for name in ("gate_proj", "up_proj", "down_proj"):
            entries.append((js + ("mlp", name, "kernel"), hf + f"mlp.{name}.weight", "linear"))
            if config.resolved_mlp_bias:
                entries.append((js + ("mlp", name, "bias"), hf + f"mlp.{name}.bias", "copy"))
    entries.append((("final_norm", "scale"), "model.norm.weight", norm))
    if not config.tie_embeddings:
        entries.append((("lm_head", "kernel"), "lm_head.weight", "linear"))
    return entries


def _gpt2_entries(config: ModelConfig) -> list[Entry]:
    """GPT-2's Conv1D weights are already [in, out]; its fused c_attn is split into q, k, v."""
    entries: list[Entry] = [
        (("embed", "embedding"), "wte.weight", "copy"),
        (("position_embed", "embedding"), "wpe.weight", "copy"),
    ]
    for i in range(config.n_layers):
        hf, js = f"h.{i}.", ("blocks", i)
        for norm, name in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            entries.append((js + (norm, "scale"), hf + f"{name}.weight", "copy"))
            entries.append((js + (norm, "bias"), hf + f"{name}.bias", "copy"))
        for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
            entries.append((js + ("attn", name, "kernel"), hf + "attn.c_attn.weight", f"qkv{part}"))
            entries.append((js + ("attn", name, "bias"), hf + "attn.c_attn.bias", f"qkv{part}"))
        entries.append((js + ("attn", "o_proj", "kernel"), hf + "attn.c_proj.weight", "copy"))
        entries.append((js + ("attn", "o_proj", "bias"), hf + "attn.c_proj.bias", "copy"))
        for js_name, hf_name in (("up_proj", "mlp.c_fc"), ("down_proj", "mlp.c_proj")):
            entries.append((js + ("mlp", js_name, "kernel"), hf + f"{hf_name}.weight", "copy"))
            entries.append((js + ("mlp", js_name, "bias"), hf + f"{hf_name}.bias", "copy"))
    entries += [(("final_norm", "scale"), "ln_f.weight", "copy"), (("final_norm", "bias"), "ln_f.bias", "copy")]
    return entries


def _mamba2_mixer_entries(js: tuple, hf: str, config: ModelConfig) -> list[Entry]:
    """One Mamba-2 mixer: jspec path prefix `js`, Hugging Face prefix `hf` (ending in '.')."""
    entries: list[Entry] = [
        (js + ("in_proj", "kernel"), hf + "in_proj.weight", "linear"),
        (js + ("out_proj", "kernel"), hf + "out_proj.weight", "linear"),
        (js + ("conv_kernel",), hf + "conv1d.weight", "conv"),
        (js + ("A_log",), hf + "A_log", "copy"),
        (js + ("dt_bias",), hf + "dt_bias", "copy"),
        (js + ("D",), hf + "D", "copy"),
        (js + ("norm", "scale"), hf + "norm.weight", "copy"),
    ]
    if config.ssm_conv_bias:
        entries.append((js + ("conv_bias",), hf + "conv1d.bias", "copy"))
    if config.ssm_proj_bias:
        entries.append((js + ("in_proj", "bias"), hf + "in_proj.bias", "copy"))
        entries.append((js + ("out_proj", "bias"), hf + "out_proj.bias", "copy"))
    return entries


def _ssm_entries(config: ModelConfig, family: str) -> list[Entry]:
    """Mamba-2 (`backbone.*`, one norm per block) and Bamba (`model.*`, Llama-style attention and MLP)."""
    if family == "mamba2":
        entries: list[Entry] = [(("embed", "embedding"), "backbone.embeddings.weight", "copy")]
        for i in range(config.n_layers):
            hf, js = f"backbone.layers.{i}.", ("blocks", i)
            entries.append((js + ("attn_norm", "scale"), hf + "norm.weight", "copy"))
            entries += _mamba2_mixer_entries(js + ("mamba",), hf + "mixer.", config)
        entries.append((("final_norm", "scale"), "backbone.norm_f.weight", "copy"))
    else:
        entries = [(("embed", "embedding"), "model.embed_tokens.weight", "copy")]
        for i, kind in enumerate(config.kinds):
            hf, js = f"model.layers.{i}.", ("blocks", i)
            entries.append((js + ("attn_norm", "scale"), hf + "input_layernorm.weight", "copy"))
            entries.append((js + ("mlp_norm", "scale"), hf + "pre_ff_layernorm.weight", "copy"))
            if kind == "mamba":
                entries += _mamba2_mixer_entries(js + ("mamba",), hf + "mamba.", config)
            else:
                for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    entries.append((js + ("attn", name, "kernel"), hf + f"self_attn.{name}.weight", "linear"))
            for name in ("gate_proj", "up_proj", "down_proj"):
                entries.append((js + ("mlp", name, "kernel"), hf + f"feed_forward.{name}.weight", "linear"))
        entries.append((("final_norm", "scale"), "model.final_layernorm.weight", "copy"))
    if not config.tie_embeddings:
        entries.append((("lm_head", "kernel"), "lm_head.weight", "linear"))
    return entries


def _entries(config: ModelConfig, family: str) -> list[Entry]:
    if family in ("mamba2", "bamba"):
        return _ssm_entries(config, family)
    return _gpt2_entries(config) if family == "gpt2" else _llama_like_entries(config, family)


def _to_jspec(tensor: jax.Array, how: str) -> jax.Array:
    if how == "linear":
        return tensor.T
    if how == "gemma_norm":  # Gemma's RMSNorm multiplies by (1 + w), computed in float32 as HF does
        return 1.0 + tensor.astype(jnp.float32)
    if how == "conv":  # torch Conv1d's depthwise weight [C, 1, K] -> [K, C]
        return tensor[:, 0, :].T
    if how.startswith("qkv"):  # [d, 3d] (or [3d]) -> the q, k or v third
        return jnp.split(tensor, 3, axis=-1)[int(how[3:])]
    return tensor


def _to_hf(value: jax.Array, how: str) -> jax.Array:
    if how == "linear":
        return value.T
    if how != "copy":
        raise ValueError(f"to_hf cannot invert the {how!r} mapping")
    return value


def _set_path(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _get_path(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _leaf_paths(tree, prefix=()) -> list[tuple]:
    if isinstance(tree, dict):
        return [p for key, sub in tree.items() for p in _leaf_paths(sub, prefix + (key,))]
    return [prefix]


# ----------------------------------------------------------------------------- files


def _host():
    """Read weights into host memory: a model may not fit on one accelerator before it is sharded."""
    return jax.default_device(jax.devices("cpu")[0])


def read_safetensors(directory: str | os.PathLike) -> dict[str, jax.Array]:
    """Every tensor of a checkpoint directory (`model.safetensors` or a sharded index), on the host."""
    from safetensors import safe_open

    directory = os.fspath(directory)
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(directory, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ValueError(f"directory {directory!r} has neither model.safetensors nor model.safetensors.index.json")
    tensors = {}
    with _host():
        for name in files:
            with safe_open(os.path.join(directory, name), framework="flax") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
    return tensors


def _strip_prefix(tensors: dict[str, jax.Array], family: str) -> dict[str, jax.Array]:
    """GPT-2 checkpoints name tensors `transformer.h.0...` (GPT2LMHeadModel) or `h.0...` (GPT2Model)."""
    if family != "gpt2":
        return tensors
    return {k.removeprefix("transformer."): v for k, v in tensors.items()}


def from_hf(
    directory: str | os.PathLike,
    *,
    param_dtype: str | None = None,
    dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> Transformer:
    """Load a Hugging Face checkpoint directory (config.json + safetensors) as a jspec Transformer.

    param_dtype / dtype: parameter and activation dtype names; default the checkpoint's dtype.
    mesh: lay the parameters out over this ('data', 'model') mesh (`jspec.sharding.shard_model`);
    without one they go to the default device (`jax.devices()[0]`, an accelerator if there is one).
    Raises ValueError for an unsupported family or option (see `FAMILIES`), a missing tensor, a
    tensor of the wrong shape, or a tensor the model would silently ignore.
    """
    directory = os.fspath(directory)
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"directory {directory!r} has no config.json")
    with open(config_path) as f:
        hf = json.load(f)
    config = config_from_hf(hf, param_dtype=param_dtype, dtype=dtype)
    family = _family(hf)
    tensors = _strip_prefix(read_safetensors(directory), family)
    return model_from_tensors(config, family, tensors, source=f"checkpoint {directory!r}", mesh=mesh)


def model_from_tensors(
    config: ModelConfig,
    family: str,
    tensors: dict,
    *,
    source: str,
    mesh: jax.sharding.Mesh | None = None,
    norms_hold_one: bool = False,
) -> Transformer:
    """A Transformer of `config` from host tensors under their Hugging Face names (torch layout).

    Every jspec parameter must be filled and every tensor used (`_BUFFER_SUFFIXES` and a stored
    copy of a tied head excepted); `source` names the file in the errors. norms_hold_one: Gemma's
    norm scales are stored as 1 + w already (llama.cpp's GGUF files), so they are copied as they are.
    """
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shapes = nnx.to_pure_dict(state)
    params = nnx.to_pure_dict(state)
    used = set()
    with _host():
        for path, name, how in _entries(config, family):
            if name not in tensors:
                raise ValueError(f"{source} lacks tensor {name!r} ({family})")
            if how == "gemma_norm" and norms_hold_one:
                how = "copy"
            value = _to_jspec(jnp.asarray(tensors[name]), how)
            want = _get_path(shapes, path)
            if value.shape != want.shape:
                raise ValueError(f"tensor {name!r} of {source} has shape {value.shape}, the model expects {want.shape}")
            _set_path(params, path, value.astype(want.dtype))
            used.add(name)
    tied_head = config.tie_embeddings and "lm_head.weight" in tensors  # some checkpoints store the tied copy
    unused = sorted(
        k for k in tensors if k not in used and not k.endswith(_BUFFER_SUFFIXES) and not (tied_head and k == "lm_head.weight")
    )
    if unused:
        raise ValueError(f"{source} has tensors jspec's {family} model does not use: {unused[:8]}")
    missing = [p for p in _leaf_paths(params) if isinstance(_get_path(params, p), jax.ShapeDtypeStruct)]
    if missing:
        raise ValueError(f"no tensor of {source} for jspec parameters {missing[:8]}")
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)
    if mesh is not None:
        from jspec.sharding import shard_model  # jspec.sharding imports jspec.models

        return shard_model(model, mesh)
    nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[0]))  # off the host, onto the accelerator
    return model


def to_hf(model: Transformer, directory: str | os.PathLike) -> None:
    """Write a Llama-family model (Llama, Qwen2, Qwen3) as a Hugging Face checkpoint directory:
    `config.json` and `model.safetensors`, loadable by `transformers.AutoModelForCausalLM`."""
    from safetensors.flax import save_file

    config = model.config
    family = _export_family(config)
    directory = os.fspath(directory)
    if os.path.exists(os.path.join(directory, "config.json")):
        raise ValueError(f"directory {directory!r} already holds a checkpoint; to_hf never overwrites one")
    params = nnx.to_pure_dict(nnx.state(model))
    tensors = {name: jnp.asarray(_to_hf(_get_path(params, path), how)) for path, name, how in _entries(config, family)}
    os.makedirs(directory, exist_ok=True)
    # Weights first, config last: a directory with a config.json is a complete checkpoint.
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json.tmp"), "w") as f:
        json.dump(config_to_hf(config), f, indent=2)
    os.replace(os.path.join(directory, "config.json.tmp"), os.path.join(directory, "config.json"))


def load_tokenizer(directory: str | os.PathLike):
    """The checkpoint's `tokenizer.json` as a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer

    path = os.path.join(os.fspath(directory), "tokenizer.json")
    if not os.path.exists(path):
        raise ValueError(f"directory {os.fspath(directory)!r} has no tokenizer.json")
    return Tokenizer.from_file(path)


__all__: list[str] = [
    "EXPORT_FAMILIES",
    "FAMILIES",
    "config_from_hf",
    "config_to_hf",
    "from_hf",
    "load_tokenizer",
    "model_from_tensors",
    "read_safetensors",
    "to_hf",
]
