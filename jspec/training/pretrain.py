"""Next-token pretraining of a `jspec.models.Transformer` with optax.

`train` runs AdamW with linear warmup and cosine decay and global-norm clipping, evaluates on a
held-out stream, and checkpoints with Orbax. It resumes from the latest checkpoint in its
directory; since batches are a pure function of the step, a resumed run ends with exactly the
parameters of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from jspec.models import Transformer, causal_mask, init_cache
from jspec.training.checkpoints import TrainCheckpoints
from jspec.training.data import batch_at, eval_batches


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    min_learning_rate_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 200
    keep_checkpoints: int = 2

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate!r}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"TrainConfig.warmup_steps must lie in [0, steps), got {self.warmup_steps!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # int32 []
    params: Any  # nnx.State of the model's parameters
    opt_state: Any


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.steps,
        end_value=config.learning_rate * config.min_learning_rate_ratio,
    )
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=config.weight_decay),
    )


def next_token_loss(model: Transformer, batch: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting `batch[:, 1:]` from `batch[:, :-1]` (batch int32 `[B, T+1]`)."""
    tokens, targets = batch[:, :-1], batch[:, 1:]
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    logits, _ = model(tokens, positions, causal_mask(b, t), init_cache(model.config, b, t))
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@functools.partial(jax.jit, static_argnames=("graph", "optimizer"), donate_argnames=("state",))
def train_step(graph, optimizer, state: TrainState, batch: jax.Array) -> tuple[TrainState, jax.Array]:
    loss, grads = jax.value_and_grad(lambda params: next_token_loss(nnx.merge(graph, params), batch))(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), loss


@functools.partial(jax.jit, static_argnames=("graph",))
def _eval_loss(graph, params, batch: jax.Array) -> jax.Array:
    return next_token_loss(nnx.merge(graph, params), batch)


def evaluate(model: Transformer, batches: list[np.ndarray]) -> float:
    """Mean next-token loss over `batches` (perplexity is its exp)."""
    graph, params = nnx.split(model)
    return float(np.mean([_eval_loss(graph, params, jnp.asarray(b)) for b in batches]))


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
    """Train `model` (its initial parameters are used unless a checkpoint exists) to `config.steps`.

    Resumes from the latest checkpoint in `checkpoint_dir`. `stop_after` ends this run after that
    many steps, as an interruption would (tests and time-boxed jobs). Returns the trained model and
    the evaluation history (`step`, `train_loss`, `held_out_loss`, `held_out_ppl`).
    """
    graph, params = nnx.split(model)
    params = jax.tree.map(jnp.copy, params)  # train_step donates its state; the caller's model stays valid
    optimizer = make_optimizer(config)
    state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
    checkpoints = TrainCheckpoints(checkpoint_dir, keep=config.keep_checkpoints)
    history: list[dict] = []
    recent: list[float] = []  # train losses since the last evaluation, checkpointed so logs resume identically
    latest = checkpoints.latest_step()
    if latest is not None:
        state, saved = checkpoints.restore(latest, state)
        history, recent = saved["history"], saved["recent_losses"]
        log(f"resumed from step {latest} in {checkpoints.directory}")
    held_out = eval_batches(held_out_stream, config.batch_size, config.seq_len, config.eval_batches)

    start = int(state.step)
    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    bar = tqdm(range(start, end), initial=start, total=config.steps, disable=not progress, desc="train")
    for step in bar:
        batch = jnp.asarray(batch_at(train_stream, step, config.batch_size, config.seq_len, config.seed))
        state, loss = train_step(graph, optimizer, state, batch)
        recent.append(float(loss))
        done = step + 1
        bar.set_postfix(loss=f"{recent[-1]:.3f}")
        if done % config.eval_every == 0 or done == config.steps:
            held = evaluate(nnx.merge(graph, state.params), held_out)
            record = {"step": done, "train_loss": float(np.mean(recent)), "held_out_loss": held, "held_out_ppl": math.exp(held)}
            history.append(record)
            recent = []
            log(f"step {done}: train loss {record['train_loss']:.4f}, held-out loss {held:.4f}, ppl {record['held_out_ppl']:.2f}")
        if done % config.checkpoint_every == 0 or done == config.steps:
            checkpoints.save(done, state, {**(metadata or {}), "history": history, "recent_losses": recent})
    checkpoints.close()
    return nnx.merge(graph, state.params), history
