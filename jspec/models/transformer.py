"""A decoder-only transformer (Flax NNX) that scores T new tokens under an arbitrary mask.

`Transformer.__call__(tokens [B, T], positions [B, T], mask [B, T, T], cache)` returns logits
`[B, T, V]` and the cache with the new keys/values written at each row's current length. Each new
token attends to its row's committed prefix (`cache.lengths`) plus the new tokens `mask` allows:
a causal mask scores a chain, a tree's ancestor mask scores a token tree, in one pass.

A wider mask `[B, T, W]` with `write_at` scores new tokens against uncommitted entries written by
earlier calls: the W slots after the committed prefix form a window, the new tokens are written at
window offset `write_at`, and `mask` says which window slots each new token sees. A drafter grows a
token tree this way, one level per call, without re-scoring the levels before it.

Blocks mix tokens with attention or, where `config.layer_types` says "mamba", with a Mamba-2 layer
(`jspec.models.mamba2`) that reads the same mask as each token's path: hybrid models score trees in
one pass too.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jspec.models.config import ModelConfig, RopeScaling
from jspec.models.kv_cache import KVCache, to_storage, write_layer

_NEG_INF = -1e30  # finite, so fully masked rows (padding) give uniform weights, never NaN


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Inverse frequencies `[D/2]` (float32), computed as Hugging Face does, scaling included."""
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))).astype(
        np.float32
    )
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    low_wavelen = scaling.original_max_len / scaling.low_freq_factor
    high_wavelen = scaling.original_max_len / scaling.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotary embedding, rotate-half convention (as Hugging Face Llama). x `[B, T, H, D]`, positions `[B, T]`.

    With fewer frequencies than D/2 (partial rotary, Bamba) only the first 2 * len(inv_freq) dims rotate.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, R/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    rotary = 2 * len(inv_freq)
    x1, x2 = jnp.split(x[..., :rotary].astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rotary:].astype(jnp.float32)], axis=-1)
    return out.astype(x.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2's soft-capping, `cap * tanh(x / cap)`; identity for cap None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def attention_mask(mask: jax.Array, lengths: jax.Array, size: int) -> jax.Array:
    """Where each new token may look in the cache after its keys are written.

    mask: bool `[B, T, W]` over the W slots after the committed prefix (W = T: the new tokens
    themselves); lengths: `[B]` committed slots. Returns bool `[B, T, S]`: slot s is visible iff
    s < lengths (committed prefix) or s = lengths + j with mask[:, i, j].
    """
    t = mask.shape[-1]
    slots = jnp.arange(size)[None, :]  # [1, S]
    offset = slots - lengths[:, None]  # [B, S]
    in_new = (offset >= 0) & (offset < t)
    new_visible = jnp.take_along_axis(mask, jnp.clip(offset, 0, t - 1)[:, None, :], axis=2)  # [B, T, S]
    return (offset < 0)[:, None, :] | (in_new[:, None, :] & new_visible)


def sliding_window_mask(visible: jax.Array, positions: jax.Array, window: int) -> jax.Array:
    """Restrict `visible [B, T, S]` to keys at positions > p - window for a query at position p.

    A committed slot's position is its index. An uncommitted window slot (a drafted tree node)
    has position <= its index, so this is exact whenever a tree is shallower than the window.
    """
    slots = jnp.arange(visible.shape[-1])[None, None, :]
    return visible & (slots > positions[:, :, None] - window)


# From this many rows on, XLA's CPU backend multiplies bfloat16 matrices faster as float32 (the
# weights converted on each call): 28 -> 20 ms for 896 rows by SmolLM2's 576x1536 MLP matrix, break
# even at 64 rows, on a 2-core x86 CPU. A long prompt's prefill is made of such products.
_CPU_BF16_AS_F32_ROWS = 128


@functools.cache
def cpu_has_amx_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU multiplies bfloat16 matrices in AMX tiles (`amx_bf16` in cpuinfo's flags;
    False where that file is missing, i.e. not Linux)."""
    try:
        with open(cpuinfo) as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


def matmul_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """`lax.dot_general` for a dense layer (lhs `[..., d_in]` contracted on its last axis, no batch
    axes), as one matrix product `[rows, d_in]`, around slow paths of XLA's CPU backend for bfloat16.

    - The leading axes are flattened first. A `[1, T, d_in]` operand is slower for T >= 2:
      SmolLM2's passes over 2 / 4 / 8 tokens at 768 cached tokens took 30.3-30.8 / 31.1-31.8 /
      34.7-35.5 ms, flattened 27.8-29.0 / 29.4-30.4 / 33.3-33.8 (bfloat16, 2-core Xeon; float32
      unchanged). Every speculative round scores several tokens, plain decoding one.
    - Its fast bfloat16 kernel is for matrices only, so a one-row product is computed as two rows
      (SmolLM2's output head, one row: 41 ms; two rows: 4.6 ms on a 2-core x86 CPU).
    - Without AMX, from `_CPU_BF16_AS_F32_ROWS` rows on its float32 kernel is faster, so such
      products run in float32 (a bfloat16 result is rounded back). With AMX (`cpu_has_amx_bf16`)
      bfloat16 stays: a 896 x 576 x 1536 product took 1.2 ms against 4.8 ms in float32 on a 2-core
      Xeon, and SmolLM2's 896-token prefill 1.0 s against 1.6 s.

    Other dimension numbers go to `lax.dot_general` as they are."""
    (lhs_contracting, rhs_contracting), batch = dimension_numbers
    if tuple(lhs_contracting) != (lhs.ndim - 1,) or any(batch):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kwargs)
    lead = lhs.shape[:-1]
    rows = int(np.prod(lead))
    x = lhs.reshape(rows, lhs.shape[-1])
    numbers = (((1,), tuple(rhs_contracting)), ((), ()))
    on_cpu_bf16 = lhs.dtype == jnp.bfloat16 and jax.default_backend() == "cpu"
    if on_cpu_bf16 and rows == 1:
        out = jax.lax.dot_general(jnp.concatenate([x, x]), rhs, numbers, precision, preferred_element_type, **kwargs)[:1]
    elif on_cpu_bf16 and rows >= _CPU_BF16_AS_F32_ROWS and rhs.dtype == jnp.bfloat16 and not cpu_has_amx_bf16():
        out = jax.lax.dot_general(x.astype(jnp.float32), rhs.astype(jnp.float32), numbers, precision, **kwargs)
        out = out.astype(preferred_element_type or jnp.bfloat16)
    else:
        out = jax.lax.dot_general(x, rhs, numbers, precision, preferred_element_type, **kwargs)
    return out.reshape(lead + out.shape[1:])


def _norm(config: ModelConfig, features: int, rngs: nnx.Rngs) -> nnx.Module:
    kw = dict(epsilon=config.norm_eps, dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
    if config.norm == "rms":
        return nnx.RMSNorm(features, **kw)
    return nnx.LayerNorm(features, **kw)


def _linear(config: ModelConfig, d_in: int, d_out: int, *, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=bias,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        kernel_init=nnx.initializers.normal(0.02),
        # float32 accumulation: with a bfloat16 result XLA's CPU backend upcasts the weights on every call.
        preferred_element_type=jnp.float32,
        dot_general=matmul_dot_general,
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Grouped-query attention over the KV cache plus the masked new tokens."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        h, hkv, d = config.n_heads, config.n_kv_heads, config.resolved_head_dim
        self.q_proj = _linear(config, config.d_model, h * d, bias=config.qkv_bias, rngs=rngs)
        self.k_proj = _linear(config, config.d_model, hkv * d, bias=config.qkv_bias, rngs=rngs)
        self.v_proj = _linear(config, config.d_model, hkv * d, bias=config.qkv_bias, rngs=rngs)
        self.o_proj = _linear(config, h * d, config.d_model, bias=config.o_bias, rngs=rngs)
        if config.qk_norm:
            self.q_norm = _norm(config, d, rngs)
            self.k_norm = _norm(config, d, rngs)

    def __call__(
        self,
        x: jax.Array,  # [B, T, d_model]
        positions: jax.Array,  # [B, T]
        visible: jax.Array,  # bool [B, T, S]
        cache: KVCache,  # all layers; this layer's new keys/values are written at `layer`
        layer: int,
        start: jax.Array,  # int32 [B], the slot of the first new token
    ) -> tuple[jax.Array, KVCache]:
        cfg = self.config
        b, t, _ = x.shape
        h, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        q = self.q_proj(x).astype(x.dtype).reshape(b, t, h, d)
        k = self.k_proj(x).astype(x.dtype).reshape(b, t, hkv, d)
        v = self.v_proj(x).astype(x.dtype).reshape(b, t, hkv, d)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.positions == "rope":
            inv_freq = rope_frequencies(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)  # a trace-time constant
            q = rope(q, positions, inv_freq)
            k = rope(k, positions, inv_freq)
        cache = dataclasses.replace(
            cache,
            keys=write_layer(cache.keys, layer, to_storage(k, cache.dtype), start, cache.spare),
            values=write_layer(cache.values, layer, to_storage(v, cache.dtype), start, cache.spare),
        )
        keys, values = cache.layer(layer)  # [B, S, H_kv, D]

        g = h // hkv
        scale = cfg.attn_scale if cfg.attn_scale is not None else d**-0.5
        # Attention in float32 whatever the cache's dtype: the layer's slice is small, and a bf16
        # batched product would make XLA's CPU backend convert the whole stacked cache. Head-major
        # operands ([B, H_kv, T*G, D] against [B, H_kv, S, D]) make both products plain batched
        # matrix products: on a 2-core CPU a 769-token prefill and a 5-token pass over a long
        # context ran 10-20% faster than with the heads between tokens and slots.
        q = q.astype(jnp.float32).reshape(b, t, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv, t * g, d)
        keys = keys.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, H_kv, S, D]
        values = values.astype(jnp.float32).transpose(0, 2, 1, 3)
        scores = (jnp.einsum("bkmd,bksd->bkms", q, keys) * scale).reshape(b, hkv, t, g, -1)
        scores = softcap(scores, cfg.attn_softcap)
        scores = jnp.where(visible[:, None, :, None, :], scores, _NEG_INF)
        weights = jax.nn.softmax(scores, axis=-1).reshape(b, hkv, t * g, -1)
        out = jnp.einsum("bkms,bksd->bkmd", weights, values)  # [B, H_kv, T*G, D]
        out = out.reshape(b, hkv, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h * d)
        return self.o_proj(out.astype(x.dtype)).astype(x.dtype), cache


class Mlp(nnx.Module):
    """The feed-forward layer: SwiGLU, GeGLU or a plain GELU MLP."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.kind = config.mlp
        self.gelu_approximate = config.gelu_approximate
        gated = config.mlp in ("swiglu", "geglu")
        bias = config.resolved_mlp_bias
        if gated:
            self.gate_proj = _linear(config, config.d_model, config.d_ff, bias=bias, rngs=rngs)
        self.up_proj = _linear(config, config.d_model, config.d_ff, bias=bias, rngs=rngs)
        self.down_proj = _linear(config, config.d_ff, config.d_model, bias=bias, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._mlp(x).astype(x.dtype)

    def _mlp(self, x: jax.Array) -> jax.Array:
        if self.kind == "swiglu":
            return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
        if self.kind == "geglu":
            return self.down_proj(jax.nn.gelu(self.gate_proj(x), approximate=self.gelu_approximate) * self.up_proj(x))
        return self.down_proj(jax.nn.gelu(self.up_proj(x), approximate=self.gelu_approximate))


class Block(nnx.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)) (no MLP for mlp "none").

    The mixer is attention (`attn`) or a Mamba-2 layer (`mamba`); `attn_norm` is its input norm
    either way. With `post_norms` (Gemma 2) each branch's output is normalised again before the
    residual add.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, kind: str = "attention"):
        self.kind = kind
        self.attn_norm = _norm(config, config.d_model, rngs)
        if kind == "attention":
            self.attn = Attention(config, rngs=rngs)
        else:
            from jspec.models.mamba2 import Mamba2Mixer  # it builds on this module's dense layer

            self.mamba = Mamba2Mixer(config, rngs=rngs)
        self.has_mlp = config.mlp != "none"
        if self.has_mlp:
            self.mlp_norm = _norm(config, config.d_model, rngs)
            self.mlp = Mlp(config, rngs=rngs)
        self.post_norms = config.post_norms
        if config.post_norms:
            self.post_attn_norm = _norm(config, config.d_model, rngs)
            self.post_mlp_norm = _norm(config, config.d_model, rngs)

    def __call__(
        self, x, positions, visible, cache: KVCache, layer: int, start, mask=None, write_at=None
    ) -> tuple[jax.Array, KVCache]:
        """`layer` indexes this block's kind of cache (attention or Mamba-2 layers); attention reads
        `visible [B, T, S]` and writes at `start`, a Mamba-2 layer reads `mask [B, T, W]` and `write_at [B]`."""
        if self.kind == "attention":
            a, cache = self.attn(self.attn_norm(x), positions, visible, cache, layer, start)
        else:
            a, cache = self.mamba(self.attn_norm(x), mask, cache, layer, write_at)
        if self.post_norms:
            a = self.post_attn_norm(a)
        x = x + a
        if not self.has_mlp:
            return x, cache
        m = self.mlp(self.mlp_norm(x))
        if self.post_norms:
            m = self.post_mlp_norm(m)
        return x + m, cache


class TokenMap(nnx.Variable):
    """Vocabulary ids of a trimmed output head, int32 `[K]`: a model variable, never trained."""


class Transformer(nnx.Module):
    """Decoder-only transformer with an explicit KV cache (see module docstring)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        self.embed = nnx.Embed(
            config.vocab_size,
            config.d_model,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(config.d_model**-0.5),  # logits of unit scale
            rngs=rngs,
        )
        if config.positions == "learned":
            self.position_embed = nnx.Embed(
                config.max_seq_len,
                config.d_model,
                dtype=dtype,
                param_dtype=param_dtype,
                embedding_init=nnx.initializers.normal(0.02),
                rngs=rngs,
            )
        self.blocks = nnx.List([Block(config, rngs=rngs, kind=kind) for kind in config.kinds])
        self.final_norm = _norm(config, config.d_model, rngs)
        if not config.tie_embeddings:
            head = config.vocab_size if config.head_tokens is None else config.head_tokens
            self.lm_head = _linear(config, config.d_model, head, bias=False, rngs=rngs)
        if config.head_tokens is not None:
            self.head_token_ids = TokenMap(jnp.arange(config.head_tokens, dtype=jnp.int32))

    def __call__(
        self,
        tokens: jax.Array,  # int32 [B, T]
        positions: jax.Array,  # int32 [B, T]
        mask: jax.Array,  # bool [B, T, W], W >= T
        cache: KVCache,
        logits_at: jax.Array | None = None,  # int32 [B, K], indices into the T new tokens
        write_at: jax.Array | int = 0,  # int32 [] or [B], window offset of the first new token
        scatter_head: bool = True,
        features: tuple[int, ...] = (),
    ):
        """Logits `[B, T, V]` (float32) and the cache with the new keys/values written (lengths unchanged).

        With `logits_at`, only the logits of those new tokens, `[B, K, V]`: the output head is most
        of a small model's cost, and prefill or a drafter's catch-up needs one position's logits.
        `mask` and `write_at`: see the module docstring (defaults: a window of the T new tokens).
        scatter_head=False: a trimmed head's logits stay `[..., head_tokens]` in `head_token_ids`
        order (training over the kept tokens only, without a full-vocabulary tensor).

        features: hidden states to return as well, in Hugging Face's `hidden_states` numbering: l < L
        is the input of block l (0: the embeddings), l = L the final normed output. Then the call
        returns `(logits, cache, hidden)` with hidden `[B, T, len(features), d_model]` over all T new
        tokens (whatever `logits_at`): what a feature-level drafter (EAGLE) reads from the same pass.
        """
        cfg = self.config
        x = self.embed(tokens)
        if cfg.scale_embeddings:
            x = x * jnp.asarray(cfg.d_model**0.5, x.dtype)
        if cfg.positions == "learned":
            x = x + self.position_embed(jnp.clip(positions, 0, cfg.max_seq_len - 1))
        visible = attention_mask(mask, cache.lengths, cache.size)
        write_at = jnp.broadcast_to(jnp.asarray(write_at, jnp.int32), cache.lengths.shape)
        start = cache.lengths + write_at
        check_feature_layers(features, cfg.n_layers)
        hidden = {}
        ordinal = {kind: 0 for kind in ("attention", "mamba")}  # each kind's cache counts its own layers
        for layer, block in enumerate(self.blocks):
            if layer in features:
                hidden[layer] = x
            window = cfg.layer_window(layer)
            layer_visible = visible if window is None else sliding_window_mask(visible, positions, window)
            x, cache = block(x, positions, layer_visible, cache, ordinal[block.kind], start, mask, write_at)
            ordinal[block.kind] += 1
        if cfg.n_layers in features:
            hidden[cfg.n_layers] = self.final_norm(x)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, :, None], axis=1)
        x = self.final_norm(x)
        if cfg.tie_embeddings:
            dtype = jnp.dtype(cfg.dtype)  # as nnx.Embed.attend, with float32 accumulation
            e, x = self.embed.embedding[...].astype(dtype), x.astype(dtype)
            logits = matmul_dot_general(x, e, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(x)
        logits = softcap(logits.astype(jnp.float32), cfg.final_softcap)
        if cfg.head_tokens is not None and scatter_head:  # scatter the K head logits back over the full vocabulary
            full = jnp.full(logits.shape[:-1] + (cfg.vocab_size,), -jnp.inf, jnp.float32)
            logits = full.at[..., self.head_token_ids[...]].set(logits)
        if features:
            return logits, cache, jnp.stack([hidden[layer] for layer in features], axis=2)
        return logits, cache


def check_feature_layers(features: tuple[int, ...], n_layers: int) -> None:
    """Raise ValueError unless `features` is a tuple of distinct layer indices in [0, n_layers]."""
    if (
        not isinstance(features, tuple)
        or len(set(features)) != len(features)
        or any(isinstance(f, bool) or not isinstance(f, int) or not 0 <= f <= n_layers for f in features)
    ):
        raise ValueError(f"features must be a tuple of distinct ints in [0, {n_layers}], got {features!r}")


def causal_mask(batch_size: int, t: int) -> jax.Array:
    """bool `[B, T, T]` lower-triangular mask for a chain of T new tokens."""
    return jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (batch_size, t, t))


def cast(model: Transformer, dtype: str) -> Transformer:
    """A copy of `model` with parameters and activations in `dtype` (a dtype name, e.g. "bfloat16");
    integer variables (a trimmed head's token map) keep theirs."""
    config = dataclasses.replace(model.config, param_dtype=dtype, dtype=dtype)
    graph, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    params = nnx.state(model).to_pure_dict()
    cast_leaf = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
    nnx.replace_by_pure_dict(state, jax.tree.map(cast_leaf, params))
    return nnx.merge(graph, state)
