"""The training loop shared by pretraining and distillation.

`fit` optimises a model's parameters on a loss, with batches that are a pure function of the step
(and of the current parameters, for on-policy data), periodic evaluation, and Orbax checkpoints.
It resumes from the latest checkpoint and then ends with exactly the parameters, history and logs
of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from jspec.models import Transformer
from jspec.training.checkpoints import TrainCheckpoints

# loss_fn(model, batch, extra) -> scalar; `extra` carries arrays the loss needs besides the model
# (a frozen target's state), passed as a jit argument rather than baked into the program.
LossFn = Callable[[Transformer, Any, Any], jax.Array]


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
    params: Any  # nnx.State of the model's Params
    opt_state: Any


def epoch_rows(step: int, n_rows: int, batch_size: int, seed: int) -> np.ndarray:
    """The row indices of training step `step` over `n_rows` rows: each epoch a seeded permutation
    (seed, epoch), cut to whole batches. A pure function of the step, so a resumed run sees the
    batches an uninterrupted one would."""
    rows_per_epoch = n_rows - n_rows % batch_size
    epoch, at = divmod(step * batch_size, rows_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_rows)[:rows_per_epoch]
    return order[at : at + batch_size]


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup, cosine decay to min_learning_rate_ratio, global-norm clipping."""
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


@functools.partial(jax.jit, static_argnames=("graph", "optimizer", "loss_fn"), donate_argnames=("state",))
def train_step(graph, optimizer, loss_fn: LossFn, state: TrainState, rest, batch, extra) -> tuple[TrainState, jax.Array]:
    """One optimizer step on the Params; `rest` holds the model's untrained variables."""
    loss, grads = jax.value_and_grad(lambda params: loss_fn(nnx.merge(graph, params, rest), batch, extra))(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), loss


def fit(
    model: Transformer,
    loss_fn: LossFn,
    batch_fn: Callable[[int, Transformer], Any],
    eval_fn: Callable[[Transformer], dict[str, float]],
    config: TrainConfig,
    checkpoint_dir: str,
    *,
    extra: Any = None,
    metadata: dict | None = None,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    trainable: nnx.filterlib.Filter = nnx.Param,
) -> tuple[Transformer, list[dict]]:
    """Optimise `model` to `config.steps`, resuming from the latest checkpoint in checkpoint_dir.

    batch_fn(step, model) gives the batch of a step (deterministic in step and model); eval_fn(model)
    gives held-out metrics, recorded every `eval_every` steps with the mean train loss since the last
    evaluation. `stop_after` ends this run after that many steps, as an interruption would. Returns
    the trained model and the history of evaluation records. `trainable`: the variables optimised
    (an nnx filter; default every Param), e.g. `nnx.All(nnx.Param, nnx.Not(nnx.PathContains("embed")))`
    for a drafter that keeps its target's embedding table frozen.
    """
    # Only the trainable Params are trained; other variables (a trimmed head's token map, frozen
    # parameters) ride along unchanged.
    graph, params, rest = nnx.split(model, trainable, ...)
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

    start = int(state.step)
    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    bar = tqdm(range(start, end), initial=start, total=config.steps, disable=not progress, desc="train")
    for step in bar:
        batch = batch_fn(step, nnx.merge(graph, state.params, rest))
        state, loss = train_step(graph, optimizer, loss_fn, state, rest, batch, extra)
        recent.append(float(loss))
        done = step + 1
        bar.set_postfix(loss=f"{recent[-1]:.4f}")
        if done % config.eval_every == 0 or done == config.steps:
            record = {"step": done, "train_loss": float(np.mean(recent)), **eval_fn(nnx.merge(graph, state.params, rest))}
            history.append(record)
            recent = []
            log(", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        if done % config.checkpoint_every == 0 or done == config.steps:
            checkpoints.save(done, state, {**(metadata or {}), "history": history, "recent_losses": recent})
    checkpoints.close()
    return nnx.merge(graph, state.params, rest), history
