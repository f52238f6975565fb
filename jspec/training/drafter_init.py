"""Initial drafters for a given target: a shallow copy of the target, or a small model from scratch.

A shallow drafter is the target's embedding, a few of its blocks, its final norm and its output head
(self-speculative layer skipping, here as a separate model that distillation then adapts). It costs
a fraction of the target (one block of 30 for SmolLM2-135M, plus the head) and starts from
representations that already match the target's. A scratch drafter shares only the vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from jspec.models import ModelConfig, Transformer

# Train everything but the input embedding table: a drafter that keeps its target's table can ship
# without it (`jspec.models.save(..., shared=("embed",))`).
ALL_BUT_EMBEDDING = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("embed")))


def shallow_drafter(target: Transformer, layers: int | Sequence[int], *, untie_head: bool = False) -> Transformer:
    """The target's embedding, blocks `layers` (an int n: the first n), final norm and output head.

    untie_head: give the drafter its own output head, initialised to the target's (the embedding
    table when tied), so that training it leaves the shared embedding alone and VocabTrim can cut it.
    """
    chosen = list(range(layers)) if isinstance(layers, int) else list(layers)
    if not chosen or any(not 0 <= i < target.config.n_layers for i in chosen):
        raise ValueError(f"layers must pick blocks in [0, {target.config.n_layers}), got {layers!r}")
    if target.config.head_tokens is not None:
        raise ValueError("the target has a trimmed head; shallow drafters copy a full one")
    tie = target.config.tie_embeddings and not untie_head
    config = dataclasses.replace(target.config, n_layers=len(chosen), tie_embeddings=tie)
    graph, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    params = nnx.state(target).to_pure_dict()
    params["blocks"] = {new: params["blocks"][old] for new, old in enumerate(chosen)}
    if target.config.tie_embeddings and not tie:
        params["lm_head"] = {"kernel": jnp.asarray(params["embed"]["embedding"]).T}
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graph, state)


def scratch_drafter(
    target_config: ModelConfig, *, d_model: int, n_layers: int, n_heads: int, n_kv_heads: int, d_ff: int, seed: int = 0
) -> Transformer:
    """A randomly initialised drafter over the target's vocabulary and context length."""
    config = dataclasses.replace(
        target_config, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, d_ff=d_ff,
        head_dim=None, tie_embeddings=True, head_tokens=None,
    )  # fmt: skip
    return Transformer(config, rngs=nnx.Rngs(seed))


__all__ = ["ALL_BUT_EMBEDDING", "scratch_drafter", "shallow_drafter"]
