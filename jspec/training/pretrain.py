"""Next-token pretraining of a `jspec.models.Transformer` (on `jspec.training.loop.fit`)."""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jspec.models import Transformer, causal_mask, init_cache
from jspec.training.data import batch_at, eval_batches
from jspec.training.loop import TrainConfig, fit

__all__ = ["TrainConfig", "evaluate", "next_token_logits", "next_token_loss", "train"]


def next_token_logits(model: Transformer, tokens: jax.Array) -> jax.Array:
    """Logits `[B, T, V]` of a plain causal pass over tokens `[B, T]` (no prefix)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    return model(tokens, positions, causal_mask(b, t), init_cache(model.config, b, t))[0]


def next_token_loss(model: Transformer, batch: jax.Array, extra=None) -> jax.Array:
    """Mean cross-entropy of predicting `batch[:, 1:]` from `batch[:, :-1]` (batch int32 `[B, T+1]`)."""
    del extra
    logits = next_token_logits(model, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


@functools.partial(jax.jit, static_argnames=("graph",))
def _eval_loss(graph, params, batch: jax.Array) -> jax.Array:
    return next_token_loss(nnx.merge(graph, params), batch)


def evaluate(model: Transformer, batches: list[np.ndarray]) -> float:
    """Mean next-token loss over `batches` (perplexity is its exp)."""
    graph, params = nnx.split(model)
    return float(np.mean([_eval_loss(graph, params, jnp.asarray(b)) for b in batches]))


@functools.partial(jax.jit, static_argnames=("graph",))
def _token_losses(graph, state, batch: jax.Array) -> jax.Array:
    logits = next_token_logits(nnx.merge(graph, state), batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:])


def evaluate_covered(model: Transformer, batches: list[np.ndarray]) -> tuple[float, float]:
    """(mean next-token loss over the positions whose label the model can emit, share of such
    positions). A trimmed head gives probability 0 (loss inf) to tokens outside it; for every
    other model the share is 1 and the loss equals `evaluate`'s."""
    graph, state = nnx.split(model)
    losses = np.concatenate([np.asarray(_token_losses(graph, state, jnp.asarray(b))).ravel() for b in batches])
    covered = np.isfinite(losses)
    return float(losses[covered].mean()), float(covered.mean())


def train(
    model: Transformer,
    train_stream: np.ndarray,
    held_out_stream: np.ndarray,
    config: TrainConfig,
    checkpoint_dir: str,
    *,
    metadata: dict | None = None,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> tuple[Transformer, list[dict]]:
    """Pretrain `model` on windows of `train_stream`; history records held-out loss and perplexity."""
    held_out = eval_batches(held_out_stream, config.batch_size, config.seq_len, config.eval_batches)

    def batch_fn(step: int, _model) -> jax.Array:
        return jnp.asarray(batch_at(train_stream, step, config.batch_size, config.seq_len, config.seed))

    def eval_fn(model: Transformer) -> dict[str, float]:
        loss = evaluate(model, held_out)
        return {"held_out_loss": loss, "held_out_ppl": math.exp(loss)}

    return fit(
        model,
        next_token_loss,
        batch_fn,
        eval_fn,
        config,
        checkpoint_dir,
        metadata=metadata,
        stop_after=stop_after,
        log=log,
        progress=progress,
    )
