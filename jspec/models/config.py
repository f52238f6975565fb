"""Model configuration: one frozen dataclass covers every supported architecture family.

Llama-style blocks are the default; Qwen2/Qwen3/Gemma/GPT-2 differ only by the switches below
(bias on q/k/v, q/k RMSNorm, MLP kind, norm kind, learned positions, embedding scale), so a new
family is a config, not a copy of the transformer.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

MlpKind = Literal["swiglu", "geglu", "gelu"]
NormKind = Literal["rms", "layer"]
PositionKind = Literal["rope", "learned"]


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
    # VocabTrim: the output head covers only `head_tokens` of the vocabulary (a token map stored in
    # the model); logits of the other tokens are -inf, so q stays a distribution over vocab_size.
    head_tokens: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.head_tokens is not None:
            if isinstance(self.head_tokens, bool) or not isinstance(self.head_tokens, int) or not 1 <= self.head_tokens <= self.vocab_size:
                raise ValueError(f"ModelConfig.head_tokens must be None or in [1, vocab_size], got {self.head_tokens!r}")
            if self.tie_embeddings:
                raise ValueError("ModelConfig.head_tokens needs tie_embeddings=False (the trimmed head is its own matrix)")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) "
                "when head_dim is not given"
            )
        if self.positions == "rope" and self.resolved_head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.resolved_head_dim}")
        for name, allowed in (("mlp", MlpKind), ("norm", NormKind), ("positions", PositionKind)):
            if getattr(self, name) not in allowed.__args__:
                raise ValueError(f"ModelConfig.{name} must be one of {allowed.__args__}, got {getattr(self, name)!r}")
        for name in ("param_dtype", "dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError as e:
                raise ValueError(f"ModelConfig.{name} is not a dtype name: {getattr(self, name)!r}") from e

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**d)
