"""Model configuration: one frozen dataclass covers every supported architecture family.

Llama-style blocks are the default; Qwen2/Qwen3/Gemma/Gemma 2/GPT-2 differ only by the switches
below (biases, q/k RMSNorm, MLP kind, norm kind, learned positions, embedding scale, RoPE scaling,
post-norms, soft-capping, sliding windows), so a new family is a config, not a copy of the
transformer. State-space and hybrid models (Mamba-2, Bamba) are configs too: `layer_types` says
which blocks mix tokens with a Mamba-2 (SSD) layer instead of attention, and the `ssm_*` fields
size those layers. `jspec.models.hf` maps Hugging Face configs onto these switches.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

MlpKind = Literal["swiglu", "geglu", "gelu", "none"]  # "none": blocks without an MLP (Mamba-2)
NormKind = Literal["rms", "layer"]
PositionKind = Literal["rope", "learned"]
RopeScalingKind = Literal["linear", "llama3"]
LayerKind = Literal["attention", "mamba"]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling for long contexts (Hugging Face's `rope_scaling` / `rope_parameters`).

    "linear": every inverse frequency divided by `factor` (position interpolation).
    "llama3": Llama 3.1's rule: wavelengths above original_max_len / low_freq_factor divided by
    `factor`, below original_max_len / high_freq_factor kept, smoothly interpolated in between.
    """

    kind: RopeScalingKind
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def __post_init__(self):
        if self.kind not in RopeScalingKind.__args__:
            raise ValueError(f"RopeScaling.kind must be one of {RopeScalingKind.__args__}, got {self.kind!r}")
        if not self.factor > 0:
            raise ValueError(f"RopeScaling.factor must be > 0, got {self.factor!r}")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(
                "RopeScaling needs high_freq_factor > low_freq_factor > 0 for llama3, got "
                f"{self.high_freq_factor!r}, {self.low_freq_factor!r}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer.

    `max_seq_len` bounds prompt plus generated tokens (validated before decoding); the KV cache
    itself is sized per call. `param_dtype` / `dtype` are dtype names (hashable, JSON-friendly).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_seq_len: int
    head_dim: int | None = None  # None: d_model // n_heads
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    param_dtype: str = "float32"
    dtype: str = "float32"
    # Family switches.
    mlp: MlpKind = "swiglu"
    norm: NormKind = "rms"
    positions: PositionKind = "rope"
    qkv_bias: bool = False
    qk_norm: bool = False
    scale_embeddings: bool = False  # Gemma multiplies embeddings by sqrt(d_model)
    o_bias: bool = False  # bias on the attention output projection (GPT-2; Llama's attention_bias)
    mlp_bias: bool | None = None  # None: biases iff mlp == "gelu" (GPT-2); Llama's mlp_bias sets True
    gelu_approximate: bool = True  # tanh GELU (GPT-2's gelu_new, Gemma's gelu_pytorch_tanh); False: erf
    rope_scaling: RopeScaling | None = None
    post_norms: bool = False  # Gemma 2: also normalise the attention and MLP outputs before the residual add
    attn_scale: float | None = None  # query scale; None: head_dim ** -0.5 (Gemma 2: query_pre_attn_scalar ** -0.5)
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    sliding_window: int | None = None  # a query at position p sees keys at positions > p - sliding_window
    sliding_window_layers: tuple[int, ...] | None = None  # layers that use it; None: every layer
    # VocabTrim: the output head covers only `head_tokens` of the vocabulary (a token map stored in
    # the model); logits of the other tokens are -inf, so q stays a distribution over vocab_size.
    head_tokens: int | None = None
    rope_fraction: float = 1.0  # rotate only the first fraction of each head's dims (Bamba: 0.5)
    # Mamba-2 layers (arXiv 2405.21060). layer_types None: every block is attention.
    layer_types: tuple[LayerKind, ...] | None = None
    ssm_state: int = 64  # N, the state size per head
    ssm_head_dim: int = 64  # P; the layer's inner width is ssm_expand * d_model = heads * P
    ssm_expand: int = 2
    ssm_groups: int = 1  # G, groups of heads sharing B and C
    ssm_conv: int = 4  # the causal depthwise convolution's width
    ssm_conv_bias: bool = True
    ssm_proj_bias: bool = False
    ssm_dt_limit: tuple[float, float] = (0.0, float("inf"))

    def __post_init__(self):
        # JSON (checkpoints) turns tuples into lists and dataclasses into dicts; restore them so the
        # config stays hashable (it is static in every jitted function).
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        for name in ("sliding_window_layers", "layer_types", "ssm_dt_limit"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.head_tokens is not None:
            if (
                isinstance(self.head_tokens, bool)
                or not isinstance(self.head_tokens, int)
                or not 1 <= self.head_tokens <= self.vocab_size
            ):
                raise ValueError(f"ModelConfig.head_tokens must be None or in [1, vocab_size], got {self.head_tokens!r}")
            if self.tie_embeddings:
                raise ValueError("ModelConfig.head_tokens needs tie_embeddings=False (the trimmed head is its own matrix)")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) when head_dim is not given"
            )
        if self.positions == "rope" and self.resolved_head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.resolved_head_dim}")
        for name, allowed in (("mlp", MlpKind), ("norm", NormKind), ("positions", PositionKind)):
            if getattr(self, name) not in allowed.__args__:
                raise ValueError(f"ModelConfig.{name} must be one of {allowed.__args__}, got {getattr(self, name)!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"ModelConfig.rope_scaling must be None or a RopeScaling, got {self.rope_scaling!r}")
        for name in ("attn_scale", "attn_softcap", "final_softcap"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
                raise ValueError(f"ModelConfig.{name} must be None or a positive number, got {value!r}")
        if self.sliding_window is not None:
            if isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int) or self.sliding_window < 1:
                raise ValueError(f"ModelConfig.sliding_window must be None or a positive int, got {self.sliding_window!r}")
        if self.sliding_window_layers is not None:
            if self.sliding_window is None:
                raise ValueError("ModelConfig.sliding_window_layers needs sliding_window")
            bad = [i for i in self.sliding_window_layers if not (isinstance(i, int) and 0 <= i < self.n_layers)]
            if bad:
                raise ValueError(f"ModelConfig.sliding_window_layers must be layer indices in [0, n_layers), got {bad!r}")
        if not (isinstance(self.rope_fraction, (int, float)) and 0 < self.rope_fraction <= 1):
            raise ValueError(f"ModelConfig.rope_fraction must be in (0, 1], got {self.rope_fraction!r}")
        if self.positions == "rope" and self.rotary_dim % 2:
            raise ValueError(f"ModelConfig.rope_fraction * head_dim must be even, got {self.rotary_dim}")
        self._check_ssm()
        for name in ("param_dtype", "dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError as e:
                raise ValueError(f"ModelConfig.{name} is not a dtype name: {getattr(self, name)!r}") from e

    def _check_ssm(self) -> None:
        if self.layer_types is None:
            return
        if len(self.layer_types) != self.n_layers or any(t not in LayerKind.__args__ for t in self.layer_types):
            raise ValueError(
                f"ModelConfig.layer_types must be None or {self.n_layers} entries of {LayerKind.__args__}, "
                f"got {self.layer_types!r}"
            )
        if "mamba" not in self.layer_types:
            return
        for name in ("ssm_state", "ssm_head_dim", "ssm_expand", "ssm_groups", "ssm_conv"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.ssm_inner % self.ssm_head_dim:
            raise ValueError(
                f"ModelConfig.ssm_expand * d_model ({self.ssm_inner}) must be a multiple of ssm_head_dim ({self.ssm_head_dim})"
            )
        if self.ssm_heads % self.ssm_groups:
            raise ValueError(f"ModelConfig.ssm_groups ({self.ssm_groups}) must divide the SSM heads ({self.ssm_heads})")
        low, high = self.ssm_dt_limit
        if not 0 <= low < high:
            raise ValueError(f"ModelConfig.ssm_dt_limit must be (low, high) with 0 <= low < high, got {self.ssm_dt_limit!r}")

    @property
    def kinds(self) -> tuple[LayerKind, ...]:
        """Each block's token mixer."""
        return self.layer_types if self.layer_types is not None else ("attention",) * self.n_layers

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, kind in enumerate(self.kinds) if kind == "attention")

    @property
    def mamba_layers(self) -> tuple[int, ...]:
        return tuple(i for i, kind in enumerate(self.kinds) if kind == "mamba")

    @property
    def ssm_inner(self) -> int:
        """A Mamba-2 layer's inner width (heads * head_dim)."""
        return self.ssm_expand * self.d_model

    @property
    def ssm_heads(self) -> int:
        return self.ssm_inner // self.ssm_head_dim

    @property
    def ssm_conv_dim(self) -> int:
        """Channels of the convolution: x, B and C."""
        return self.ssm_inner + 2 * self.ssm_groups * self.ssm_state

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (the first ones)."""
        return int(self.resolved_head_dim * self.rope_fraction)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_mlp_bias(self) -> bool:
        return self.mlp == "gelu" if self.mlp_bias is None else self.mlp_bias

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None for full attention."""
        if self.sliding_window is None or (self.sliding_window_layers is not None and layer not in self.sliding_window_layers):
            return None
        return self.sliding_window

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**d)
