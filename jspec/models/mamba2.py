"""The Mamba-2 (SSD) token mixer, scoring T new tokens under a tree mask in one pass (STree).

Mamba-2 (arXiv 2405.21060) keeps, per head, a state `h [P, N]` that each token updates as
`h_t = a_t h_{t-1} + (dt_t x_t) B_t^T` with a scalar decay `a_t = exp(dt_t A)`, and outputs
`y_t = h_t C_t + D x_t`. Unrolled, token i's output is a masked sum over the tokens before it,

    y_i = exp(S_i) h_0 C_i + sum_{j <= i} exp(S_i - S_j) (C_i . B_j) (dt x)_j + D x_i,

with `S_i` the summed log-decays up to i (the "dual", attention-like form of SSD). STree (arXiv
2505.14969) observes that replacing "j <= i" by "j is an ancestor of i" scores every node of a
token tree as if its root path alone had been fed, in one pass; so does the causal convolution
before the SSM when it reads each node's path instead of the previous slots. This module computes
exactly that: the `mask [B, T, W]` that gives attention layers a tree's ancestors gives the Mamba-2
layers the same paths, and `write_at` windows work as for attention (`jspec.models.transformer`).

The new tokens' per-token terms are written to the cache (`jspec.models.kv_cache.SsmCache`); the
committed state `h_0` only moves when a path is committed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jspec.models.config import ModelConfig
from jspec.models.kv_cache import KVCache, SsmCache, scatter_set
from jspec.models.transformer import _linear  # the dense layer every block uses (it imports this module lazily)

_NEG_INF = -1e30


def path_slots(mask: jax.Array, lengths: jax.Array, lags: int) -> jax.Array:
    """The slot of each new token's `lag`-th predecessor along its path, for lag 0 .. lags-1.

    mask: bool `[B, T, W]`, the window slots (after the committed prefix) each new token sees, its
    own slot included (wherever the token was written); lengths: int32 `[B]`. A path's window slots
    are its ancestors in slot order, so the lag-th predecessor of a token with a window ancestors is
    its ancestor of rank a - lag, or, past the window's start, the committed slot
    lengths - 1 - (lag - a). Returns int32 `[B, T, lags]`; -1 before the sequence's start (the
    convolution's zero padding).
    """
    rank = jnp.cumsum(mask.astype(jnp.int32), axis=-1)  # [B, T, W], 1-based rank of each ancestor
    count = rank[..., -1]  # [B, T] window ancestors, the token itself included
    lag = jnp.arange(lags, dtype=jnp.int32)
    want = count[..., None] - lag  # [B, T, K] the rank wanted
    is_rank = mask[:, :, None, :] & (rank[:, :, None, :] == want[..., None])  # [B, T, K, W]
    in_window = jnp.argmax(is_rank, axis=-1).astype(jnp.int32)
    slot = jnp.where(want >= 1, lengths[:, None, None] + in_window, lengths[:, None, None] + want - 1)
    return jnp.where(slot >= 0, slot, -1)


def path_decay(log_decay: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Decays along each new token's path: `total [B, T, H]`, its summed log-decays S_i (from the
    committed state through the token), and `weight [B, T, W, H]`, exp(S_i - S_j) for each window
    ancestor j (0 elsewhere). log_decay: `[B, W, H]`, the window slots' log a; mask: bool `[B, T, W]`.

    One masked cumulative sum gives every ancestor's prefix along the path; the exponent is masked
    before the exp so that nothing overflows.
    """
    masked = jnp.where(mask[..., None], log_decay[:, None], 0.0)  # [B, T, W, H]
    upto = jnp.cumsum(masked, axis=2)  # log-decay from the committed state through each ancestor
    total = upto[:, :, -1]
    weight = jnp.exp(jnp.where(mask[..., None], total[:, :, None] - upto, _NEG_INF))
    return total, weight


def tree_ssm_scan(
    log_decay: jax.Array,  # [B, W, H] window slots' log a
    x: jax.Array,  # [B, W, H, P] window slots' dt * x
    b: jax.Array,  # [B, W, G, N]
    c: jax.Array,  # [B, T, G, N] the new tokens' C
    state: jax.Array,  # [B, H, P, N] the committed state
    mask: jax.Array,  # bool [B, T, W]
) -> jax.Array:
    """The SSM output (without the D skip) of each new token over its path: `[B, T, H, P]`."""
    h, g = x.shape[2], b.shape[2]
    total, weight = path_decay(log_decay, mask)
    cb = jnp.einsum("btgn,bwgn->btwg", c, b)
    cb = jnp.repeat(cb, h // g, axis=-1)  # [B, T, W, H]
    y = jnp.einsum("btwh,bwhp->bthp", weight * cb, x)
    c_heads = jnp.repeat(c, h // g, axis=2)  # [B, T, H, N]
    return y + jnp.exp(total)[..., None] * jnp.einsum("bhpn,bthn->bthp", state, c_heads)


def node_states(log_decay: jax.Array, x: jax.Array, b: jax.Array, state: jax.Array, mask: jax.Array) -> jax.Array:
    """The SSM state after each new token's path, `[B, T, H, P, N]` (inputs as `tree_ssm_scan`).

    Not used by decoding (a commit recomputes only the accepted node's state,
    `kv_cache.advance_ssm`): the alternative of keeping every node's state, measured against it by
    `python -m infer.ssm_bench`, and a reference for tests.
    """
    h, g = x.shape[2], b.shape[2]
    total, weight = path_decay(log_decay, mask)
    b_heads = jnp.repeat(b, h // g, axis=2)  # [B, W, H, N]
    return jnp.exp(total)[..., None, None] * state[:, None] + jnp.einsum("btwh,bwhp,bwhn->bthpn", weight, x, b_heads)


def window(buffer: jax.Array, lengths: jax.Array, w: int) -> jax.Array:
    """Slots `lengths[b] .. lengths[b] + w - 1` of `buffer [B, S, ...]` (clipped at the end)."""
    slots = jnp.clip(lengths[:, None] + jnp.arange(w), 0, buffer.shape[1] - 1)
    return jnp.take_along_axis(buffer, slots.reshape(slots.shape + (1,) * (buffer.ndim - 2)), axis=1)


class GatedRMSNorm(nnx.Module):
    """Mamba-2's output norm: RMS-normalise `y * silu(z)` over each group of channels, then scale."""

    def __init__(self, features: int, groups: int, eps: float, param_dtype):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))
        self.groups, self.eps = groups, eps

    def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
        y = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        grouped = y.reshape(y.shape[:-1] + (self.groups, -1))
        grouped = grouped * jax.lax.rsqrt(jnp.mean(grouped**2, axis=-1, keepdims=True) + self.eps)
        return grouped.reshape(y.shape) * self.scale[...].astype(jnp.float32)


class Mamba2Mixer(nnx.Module):
    """A Mamba-2 layer: in-projection to (z, xBC, dt), causal depthwise convolution over each
    token's path, the SSD recurrence over the path, gated RMSNorm, out-projection."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, inner, h = config.d_model, config.ssm_inner, config.ssm_heads
        proj = 2 * inner + 2 * config.ssm_groups * config.ssm_state + h
        param_dtype = jnp.dtype(config.param_dtype)
        self.in_proj = _linear(config, d, proj, bias=config.ssm_proj_bias, rngs=rngs)
        k, conv_dim = config.ssm_conv, config.ssm_conv_dim
        # conv_kernel[k] multiplies the input k - (K - 1) tokens back (torch Conv1d's weight[:, 0, k]).
        self.conv_kernel = nnx.Param(nnx.initializers.normal(k**-0.5)(rngs.params(), (k, conv_dim), param_dtype))
        if config.ssm_conv_bias:
            self.conv_bias = nnx.Param(jnp.zeros((conv_dim,), param_dtype))
        # Mamba's initialisation: A in [1, 16], dt in [1e-3, 1e-1] log-uniformly (through softplus).
        self.A_log = nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (h,), jnp.float32, 1.0, 16.0)).astype(param_dtype))
        dt = jnp.exp(jax.random.uniform(rngs.params(), (h,), jnp.float32, jnp.log(1e-3), jnp.log(1e-1)))
        self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype))
        self.D = nnx.Param(jnp.ones((h,), param_dtype))
        self.norm = GatedRMSNorm(inner, config.ssm_groups, config.norm_eps, param_dtype)
        self.out_proj = _linear(config, inner, d, bias=config.ssm_proj_bias, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,  # [B, T, d_model]
        mask: jax.Array,  # bool [B, T, W], window slots each new token sees (its path)
        cache: KVCache,
        layer: int,  # this layer's index among the Mamba-2 layers
        write_at: jax.Array,  # int32 [B], window offset of the first new token
    ) -> tuple[jax.Array, KVCache]:
        cfg = self.config
        bsz, t, _ = x.shape
        inner, h, p, g, n = cfg.ssm_inner, cfg.ssm_heads, cfg.ssm_head_dim, cfg.ssm_groups, cfg.ssm_state
        ssm, lengths = cache.ssm, cache.lengths
        rows = jnp.arange(bsz)[:, None]
        slots = lengths[:, None] + write_at[:, None] + jnp.arange(t)  # [B, T]

        z, xbc, dt = jnp.split(self.in_proj(x).astype(jnp.float32), [inner, 2 * inner + 2 * g * n], axis=-1)
        conv = scatter_set(ssm.conv, (layer, rows, slots), xbc.astype(ssm.conv.dtype))
        lags = path_slots(mask, lengths, cfg.ssm_conv)  # [B, T, K]
        inputs = conv[layer][rows[:, :, None], jnp.maximum(lags, 0)].astype(jnp.float32)  # [B, T, K, C]
        inputs = jnp.where(lags[..., None] >= 0, inputs, 0.0)
        kernel = self.conv_kernel[...].astype(jnp.float32)[::-1]  # [K, C], lag order
        xbc = jnp.einsum("btkc,kc->btc", inputs, kernel)
        if cfg.ssm_conv_bias:
            xbc = xbc + self.conv_bias[...].astype(jnp.float32)
        xs, b, c = jnp.split(jax.nn.silu(xbc), [inner, inner + g * n], axis=-1)
        xs, b, c = xs.reshape(bsz, t, h, p), b.reshape(bsz, t, g, n), c.reshape(bsz, t, g, n)

        dt = jax.nn.softplus(dt + self.dt_bias[...].astype(jnp.float32))
        dt = jnp.clip(dt, *cfg.ssm_dt_limit)
        log_decay = dt * -jnp.exp(self.A_log[...].astype(jnp.float32))  # [B, T, H]
        index = (layer, rows, slots)
        ssm = SsmCache(
            conv=conv,
            log_decay=scatter_set(ssm.log_decay, index, log_decay),
            x=scatter_set(ssm.x, index, xs * dt[..., None]),
            b=scatter_set(ssm.b, index, b),
            state=ssm.state,
        )
        w = mask.shape[-1]
        y = tree_ssm_scan(
            window(ssm.log_decay[layer], lengths, w),
            window(ssm.x[layer], lengths, w),
            window(ssm.b[layer], lengths, w),
            c,
            ssm.state[layer],
            mask,
        )
        y = y + self.D[...].astype(jnp.float32)[:, None] * xs
        y = self.norm(y.reshape(bsz, t, inner), z)
        out = self.out_proj(y.astype(x.dtype)).astype(x.dtype)
        return out, dataclasses.replace(cache, ssm=ssm)
