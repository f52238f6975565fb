"""EAGLE feature-level drafters: a one-layer head that drafts from the target's own hidden states.

EAGLE-1 (Li et al., arXiv 2401.15077) drafts in feature space: at position i the head reads the
target's last hidden state f_i (after the final norm) and the embedding of the token after it,
`fc([f_i; e(x_{i+1})])`, runs one decoder layer over them (attending to its own earlier entries),
and predicts f_{i+1}; the target's LM head turns that into the distribution of x_{i+2}. Drafting
further feeds the head its own predicted feature. EAGLE-2 (arXiv 2406.16858) drafts a dynamic tree
with it (`jspec.EagleTree`). EAGLE-3 (arXiv 2503.01840) fuses low, middle and high layers'
features (`fuse`: 3d -> d), drops the feature regression, normalises before its LM head, and
trains with "training-time test": the head is unrolled over several draft steps, feeding its own
outputs, under the attention pattern drafting will see (`jspec.training.eagle`).

`EagleHead` holds the target's embedding table (frozen, shared: never saved with the head) and an
LM head that starts as a copy of the target's and may be trimmed to the tokens the target emits
most (VocabTrim). `EagleHead.as_drafter()` is its drafter of the protocol (`jspec.drafters`):
every strategy drafts with it, and the existing verifiers keep decoding lossless at any
temperature, whatever the head proposes.

The head's cache: entry i pairs feature f_i with token x_{i+1} and sits at position i. Between
rounds it holds the entries of positions 0 .. n-3 for a sequence of n tokens, and the pending
pairs of the last round's accepted path (whose features the verify pass returned) wait in the
state; the next round's catch-up feeds them (at most tokens_per_round entries, one call).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jspec.drafters import Accepted, Prefill
from jspec.models import KVCache, ModelConfig, attention_mask, causal_mask, commit, init_cache, truncate
from jspec.models.transformer import Block, TokenMap, _linear, _norm, check_feature_layers

KINDS = ("eagle1", "eagle3")


def eagle3_layers(n_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low, middle and high features of an L-layer target, in Hugging Face
    `hidden_states` numbering: the inputs of blocks 2, L // 2 and L - 3."""
    return (min(2, n_layers - 1), n_layers // 2, max(n_layers - 3, 0))


@dataclasses.dataclass(frozen=True)
class EagleConfig:
    """target: the target's `ModelConfig` (the head's layer has its shape); kind: "eagle1" (the
    final normed feature) or "eagle3" (fused features); feature_layers: the target hidden states
    read (default: (L,) for EAGLE-1, `eagle3_layers(L)` for EAGLE-3); head_tokens: the LM head's
    rows when trimmed (None: the full vocabulary)."""

    target: ModelConfig
    kind: str = "eagle1"
    feature_layers: tuple[int, ...] | None = None
    head_tokens: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.feature_layers is None:
            layers = (self.target.n_layers,) if self.kind == "eagle1" else eagle3_layers(self.target.n_layers)
            object.__setattr__(self, "feature_layers", tuple(dict.fromkeys(layers)))
        object.__setattr__(self, "feature_layers", tuple(self.feature_layers))
        check_feature_layers(self.feature_layers, self.target.n_layers)
        if self.kind == "eagle1" and len(self.feature_layers) != 1:
            raise ValueError(f"feature_layers of an eagle1 head must be one layer, got {self.feature_layers!r}")
        if self.head_tokens is not None and not (
            isinstance(self.head_tokens, int) and 1 <= self.head_tokens <= self.target.vocab_size
        ):
            raise ValueError(f"head_tokens must be None or an int in [1, {self.target.vocab_size}], got {self.head_tokens!r}")

    @property
    def layer(self) -> ModelConfig:
        """The config of the head's one decoder layer (and its cache)."""
        return dataclasses.replace(self.target, n_layers=1, sliding_window=None, head_tokens=None)

    def to_dict(self) -> dict:
        return {"target": self.target.to_dict(), "kind": self.kind, "feature_layers": list(self.feature_layers),
                "head_tokens": self.head_tokens}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> EagleConfig:
        return cls(ModelConfig.from_dict(d["target"]), d["kind"], tuple(d["feature_layers"]), d["head_tokens"])


class EagleHead(nnx.Module):
    """An EAGLE-1 or EAGLE-3 head (see the module docstring)."""

    def __init__(self, config: EagleConfig, *, rngs: nnx.Rngs):
        self.config = config
        cfg = config.layer
        d = cfg.d_model
        self.embed = nnx.Embed(cfg.vocab_size, d, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        if len(config.feature_layers) > 1:
            self.fuse = _linear(cfg, len(config.feature_layers) * d, d, bias=False, rngs=rngs)
        self.fc = _linear(cfg, 2 * d, d, bias=False, rngs=rngs)
        self.block = Block(cfg, rngs=rngs)
        if config.kind == "eagle3":
            self.norm = _norm(cfg, d, rngs)
        self.lm_head = _linear(cfg, d, config.head_tokens or cfg.vocab_size, bias=False, rngs=rngs)
        if config.head_tokens is not None:
            self.head_token_ids = TokenMap(jnp.arange(config.head_tokens, dtype=jnp.int32))

    @classmethod
    def from_target(cls, target, *, kind: str = "eagle1", feature_layers=None, keep_ids=None, seed: int = 0) -> EagleHead:
        """A new head for `target` (a `jspec.models.Transformer`): the target's embedding, its LM
        head copied (only the rows `keep_ids` if given: VocabTrim), the rest initialised."""
        tcfg = target.config
        keep = None if keep_ids is None else np.asarray(keep_ids, np.int32)
        config = EagleConfig(tcfg, kind, feature_layers, None if keep is None else len(keep))
        head = cls(config, rngs=nnx.Rngs(seed))
        table = target.embed.embedding[...]
        head.embed.embedding[...] = table
        out = table.T if tcfg.tie_embeddings else target.lm_head.kernel[...]  # [d, V]
        if tcfg.head_tokens is not None:
            raise ValueError("target must have an untrimmed output head")
        head.lm_head.kernel[...] = out if keep is None else out[:, keep]
        if keep is not None:
            head.head_token_ids[...] = jnp.asarray(keep)
        return head

    def fuse_features(self, features: jax.Array) -> jax.Array:
        """The target's hidden states `[..., F, d]` at `feature_layers` -> the head's feature `[..., d]`."""
        if len(self.config.feature_layers) == 1:
            return features[..., 0, :]
        return self.fuse(features.reshape(features.shape[:-2] + (-1,)))

    def __call__(
        self,
        feature: jax.Array,  # [B, T, d]: fused target features or the head's own outputs
        tokens: jax.Array,  # int32 [B, T]: the token after each feature's position
        positions: jax.Array,  # int32 [B, T]
        mask: jax.Array,  # bool [B, T, W]
        cache: KVCache,
        write_at=0,
        scatter_head: bool = True,
    ) -> tuple[jax.Array, jax.Array, KVCache]:
        """Logits `[B, T, V]` of the token two after each position, the head's outputs `[B, T, d]`
        (the predicted next features, what drafting feeds back) and the cache with the T entries
        written at window offset `write_at` (lengths unchanged), as `jspec.models.Transformer`."""
        h, cache = self.hidden(feature, tokens, positions, mask, cache, write_at)
        return self.logits(h, scatter_head), h, cache

    def hidden(self, feature, tokens, positions, mask, cache: KVCache, write_at=0) -> tuple[jax.Array, KVCache]:
        """The head's outputs `[B, T, d]` and the cache, without the output head (see `__call__`)."""
        cfg = self.config.layer
        e = self.embed(tokens)
        if cfg.scale_embeddings:
            e = e * jnp.asarray(cfg.d_model**0.5, e.dtype)
        x = self.fc(jnp.concatenate([feature.astype(e.dtype), e], axis=-1))
        visible = attention_mask(mask, cache.lengths, cache.size)
        return self.block(x, positions, visible, cache, 0, cache.lengths + jnp.asarray(write_at, jnp.int32))

    def logits(self, h: jax.Array, scatter_head: bool = True) -> jax.Array:
        """The LM head over the head's outputs `[..., d]` -> float32 `[..., V]` (or `[..., K]`
        in `head_token_ids` order, for a trimmed head with scatter_head=False)."""
        x = self.norm(h) if self.config.kind == "eagle3" else h
        logits = self.lm_head(x).astype(jnp.float32)
        if self.config.head_tokens is not None and scatter_head:
            full = jnp.full(logits.shape[:-1] + (self.config.target.vocab_size,), -jnp.inf, jnp.float32)
            logits = full.at[..., self.head_token_ids[...]].set(logits)
        return logits

    def as_drafter(self) -> EagleDrafter:
        return EagleDrafter(self)

    def check_target(self, target) -> None:
        """Raise ValueError unless `target` has the shape this head was made for."""
        mine, theirs = self.config.target, target.config
        fields = ("vocab_size", "d_model", "n_layers")
        bad = [
            f"{f}: head {getattr(mine, f)}, target {getattr(theirs, f)}" for f in fields if getattr(mine, f) != getattr(theirs, f)
        ]
        if bad:
            raise ValueError(f"drafter (an EAGLE head) was made for another target: {'; '.join(bad)}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EagleState:
    """cache: the head's (1 layer); pending: the entries the next catch-up feeds, features `[B, W, d]`
    (fused) and tokens int32 `[B, W]`, the first `n` ([B]) of them real."""

    cache: KVCache
    features: jax.Array
    tokens: jax.Array
    n: jax.Array


@dataclasses.dataclass(frozen=True)
class EagleDrafter:
    """`EagleHead` as a drafter of the protocol (`jspec.drafters`)."""

    head: EagleHead

    @property
    def vocab_size(self) -> int:
        return self.head.config.target.vocab_size

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return self.head.config.feature_layers

    def prefill(self, prefill: Prefill, first_token: jax.Array, width: int) -> EagleState:
        prompts, lengths = prefill.prompts, prefill.lengths
        b, p = prompts.shape
        features = self.head.fuse_features(prefill.features)  # [B, P, d]
        # Entry i pairs f_i with x_{i+1}: the prompt shifted by one, and the first token after the last.
        following = jnp.concatenate([prompts[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
        following = jnp.where(jnp.arange(p)[None, :] == (lengths - 1)[:, None], first_token[:, None], following)
        cache = init_cache(self.head.config.layer, b, prefill.cache.size)
        positions = jnp.broadcast_to(jnp.arange(p), (b, p))
        _, cache = self.head.hidden(features, following, positions, causal_mask(b, p), cache)
        # The last pair waits, pending, for the first round's catch-up (rounds all start alike).
        cache = truncate(commit(cache, lengths), lengths - 1)
        last_feature = jnp.take_along_axis(features, (lengths - 1)[:, None, None], axis=1)  # [B, 1, d]
        pending = jnp.zeros((b, width, features.shape[-1]), features.dtype).at[:, :1].set(last_feature)
        tokens = jnp.zeros((b, width), jnp.int32).at[:, 0].set(first_token)
        return EagleState(cache, pending, tokens, jnp.ones((b,), jnp.int32))

    def catch_up(self, state: EagleState, last: jax.Array) -> tuple[jax.Array, jax.Array, EagleState]:
        del last  # the last pending token
        b, w = state.tokens.shape
        positions = state.cache.lengths[:, None] + jnp.arange(w)
        h, cache = self.head.hidden(state.features, state.tokens, positions, causal_mask(b, w), state.cache)
        # Only the last real entry's logits are needed: the output head runs on one position.
        context = jnp.take_along_axis(h, jnp.maximum(state.n - 1, 0)[:, None, None], axis=1)[:, 0]
        return self.head.logits(context), context.astype(jnp.float32), dataclasses.replace(state, cache=commit(cache, state.n))

    def extend(self, state: EagleState, tokens, context, depth, mask, write_at):
        positions = state.cache.lengths[:, None] + depth - 1
        logits, h, cache = self.head(context, tokens, positions, mask, state.cache, write_at=write_at)
        return logits, h.astype(jnp.float32), dataclasses.replace(state, cache=cache)

    def commit(self, state: EagleState, accepted: Accepted) -> EagleState:
        # The accepted path's real features pair with the token after each node: the next draft,
        # and after the last one the emitted token. An inactive row un-commits its catch-up.
        active = accepted.active
        features = self.head.fuse_features(accepted.features).astype(state.features.dtype)
        w = state.tokens.shape[1]
        index = jnp.arange(w)[None, :]
        following = jnp.concatenate([accepted.tokens[:, 1:], jnp.zeros_like(accepted.tokens[:, :1])], axis=1)
        following = jnp.where(index == accepted.accepted[:, None], accepted.next_token[:, None], following)
        cache = truncate(state.cache, jnp.where(active, state.cache.lengths, state.cache.lengths - state.n))
        return EagleState(
            cache=cache,
            features=jnp.where(active[:, None, None], features, state.features),
            tokens=jnp.where(active[:, None], following, state.tokens),
            n=jnp.where(active, accepted.accepted + 1, state.n),
        )


def cast_head(head: EagleHead, dtype: str) -> EagleHead:
    """A copy of `head` with parameters and activations in `dtype` (e.g. "bfloat16")."""
    target = dataclasses.replace(head.config.target, param_dtype=dtype, dtype=dtype)
    config = dataclasses.replace(head.config, target=target)
    graph, state = nnx.split(nnx.eval_shape(lambda: EagleHead(config, rngs=nnx.Rngs(0))))
    cast_leaf = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
    nnx.replace_by_pure_dict(state, jax.tree.map(cast_leaf, nnx.state(head).to_pure_dict()))
    return nnx.merge(graph, state)


def _shared(path, value) -> bool:
    return bool(path) and path[0] == "embed"


def save_head(head: EagleHead, path: str | os.PathLike) -> None:
    """Write `head` to the new directory `path` (Orbax, atomic), without the embedding table it
    shares with its target; `load_head(path, target)` restores it."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise ValueError(f"path {path!r} already exists; save_head never overwrites a checkpoint")
    _, _, state = nnx.split(head, _shared, ...)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(
            path,
            args=ocp.args.Composite(params=ocp.args.StandardSave(state), config=ocp.args.JsonSave(head.config.to_dict())),
        )


def is_head_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory written by `save_head` (its config names an EAGLE kind)."""
    config = os.path.join(os.fspath(path), "config", "metadata")
    if not os.path.isfile(config):
        return False
    try:
        with open(config) as f:
            return json.load(f).get("kind") in KINDS
    except (OSError, ValueError):
        return False


def load_head(path: str | os.PathLike, target) -> EagleHead:
    """Read a head written by `save_head`, taking the embedding table from `target`."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise ValueError(f"path {path!r} is not an EAGLE head checkpoint directory")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        config = EagleConfig.from_dict(ckptr.restore(path, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])
        abstract = nnx.eval_shape(lambda: EagleHead(config, rngs=nnx.Rngs(0)))
        graph, embed, rest = nnx.split(abstract, _shared, ...)
        like = jax.tree.map(ocp.utils.to_shape_dtype_struct, rest)
        state = ckptr.restore(path, args=ocp.args.Composite(params=ocp.args.StandardRestore(like)))["params"]
    head = nnx.merge(graph, embed, state)
    head.check_target(target)
    head.embed.embedding = nnx.Param(jnp.asarray(target.embed.embedding[...], head.embed.embedding.dtype))
    return head
