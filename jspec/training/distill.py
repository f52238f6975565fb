"""DistillSpec: train a drafter to agree with a frozen target (Zhou et al. arXiv 2310.08461).

Minimises mean_t D(p || q_theta)(. | y_<t) over sequences y from a fixed corpus, from the target's
samples, from the drafter's own samples (on-policy), or a per-step mix. Generated data is prefixed
with a corpus prompt and only the generated positions are trained on. Batches depend only on the
step (and, on-policy, the current drafter), so `jspec.training.loop.fit` resumes exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jspec.decode import generate, speculative_generate
from jspec.methods.chain import Chain
from jspec.models import Transformer
from jspec.sampling import Sampling
from jspec.training.data import batch_at
from jspec.training.divergences import DIVERGENCES, acceptance, divergence
from jspec.training.loop import TrainConfig, fit
from jspec.training.pretrain import next_token_logits

DATA_SOURCES = ("corpus", "target", "drafter", "mix")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    divergence: str = "fkl"
    data: str = "corpus"  # corpus | target | drafter (on-policy) | mix
    temperature: float = 1.0  # of the divergence and of sampled data
    prompt_len: int = 32  # corpus prefix of generated sequences
    on_policy_fraction: float = 0.5  # with data="mix": share of steps whose data the drafter samples

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if self.data not in DATA_SOURCES:
            raise ValueError(f"data must be one of {DATA_SOURCES}, got {self.data!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 <= self.on_policy_fraction <= 1:
            raise ValueError(f"on_policy_fraction must lie in [0, 1], got {self.on_policy_fraction!r}")


@dataclasses.dataclass(frozen=True)
class DistillLoss:
    """loss_fn for `fit`: mean divergence over the masked positions. The target's state comes in as
    `extra` (a jit argument) and receives no gradient."""

    kind: str
    temperature: float
    target_graph: Any

    def __call__(self, drafter: Transformer, batch: tuple[jax.Array, jax.Array], target_state) -> jax.Array:
        tokens, mask = batch  # int32 [B, T], float32 [B, T]
        target = nnx.merge(self.target_graph, jax.lax.stop_gradient(target_state))
        per_position = divergence(
            self.kind, next_token_logits(target, tokens), next_token_logits(drafter, tokens), self.temperature
        )
        return jnp.sum(per_position * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@functools.partial(jax.jit, static_argnames=("target_graph", "drafter_graph", "temperature"))
def _agreement(target_graph, target_state, drafter_graph, drafter_state, tokens, *, temperature):
    target_logits = next_token_logits(nnx.merge(target_graph, target_state), tokens)
    drafter_logits = next_token_logits(nnx.merge(drafter_graph, drafter_state), tokens)
    return target_logits, drafter_logits


def measure_alpha(target: Transformer, drafter: Transformer, windows: list[np.ndarray], temperature: float) -> float:
    """alpha = mean over positions of 1 - TV(p, q) (argmax agreement at temperature 0) on `windows` `[B, T]`."""
    tg, ts = nnx.split(target)
    dg, ds = nnx.split(drafter)
    values = []
    for w in windows:
        p, q = _agreement(tg, ts, dg, ds, jnp.asarray(w), temperature=temperature)
        values.append(np.asarray(acceptance(p, q, temperature)).mean())
    return float(np.mean(values))


def measure_divergence(
    target: Transformer, drafter: Transformer, windows: list[np.ndarray], kind: str, temperature: float
) -> float:
    tg, ts = nnx.split(target)
    dg, ds = nnx.split(drafter)
    values = [
        np.asarray(divergence(kind, *_agreement(tg, ts, dg, ds, jnp.asarray(w), temperature=temperature), temperature)).mean()
        for w in windows
    ]
    return float(np.mean(values))


def measure_tau(
    target: Transformer,
    drafter: Transformer,
    prompts: np.ndarray,
    *,
    k: int,
    temperature: float,
    max_new_tokens: int,
    seed: int = 0,
) -> float:
    """tau (tokens per target pass) of Chain(k) speculative decoding on `prompts` `[B, P]`."""
    out = speculative_generate(
        target,
        drafter,
        prompts,
        max_new_tokens=max_new_tokens,
        strategy=Chain(k=k),
        sampling=Sampling(temperature=temperature),
        rng=jax.random.key(seed),
    )
    return float(out.stats.mean_accepted)


def distill_batches(
    target: Transformer, stream: np.ndarray, config: TrainConfig, distill: DistillConfig
) -> Callable[[int, Transformer], tuple[jax.Array, jax.Array]]:
    """batch_fn for `fit`: (tokens `[B, T]`, mask `[B, T]`) of the step."""
    b, t, p = config.batch_size, config.seq_len, distill.prompt_len
    if distill.data != "corpus" and not 0 < p < t:
        raise ValueError(f"prompt_len must lie in (0, seq_len={t}) for generated data, got {p}")
    sampling = Sampling(temperature=distill.temperature)
    generated_mask = jnp.broadcast_to((jnp.arange(t) >= p - 1).astype(jnp.float32), (b, t))

    def batch_fn(step: int, drafter: Transformer):
        if distill.data == "corpus":
            return jnp.asarray(batch_at(stream, step, b, t, config.seed)[:, :t]), jnp.ones((b, t), jnp.float32)
        on_policy = distill.data == "drafter" or (
            distill.data == "mix" and np.random.default_rng([config.seed, step, 1]).random() < distill.on_policy_fraction
        )
        prompts = batch_at(stream, step, b, p, config.seed)[:, :p]
        sampler = drafter if on_policy else target
        out = generate(
            sampler, prompts, max_new_tokens=t - p, sampling=sampling, rng=jax.random.key(config.seed * 1_000_003 + step)
        )
        return jnp.concatenate([jnp.asarray(prompts), out.tokens], axis=1), generated_mask

    return batch_fn


def distill(
    target: Transformer,
    drafter: Transformer,
    train_stream: np.ndarray,
    held_out_windows: list[np.ndarray],
    config: TrainConfig,
    distill_config: DistillConfig,
    checkpoint_dir: str,
    *,
    metadata: dict | None = None,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> tuple[Transformer, list[dict]]:
    """Distil `drafter` towards `target`. History records the held-out divergence and alpha."""
    if target.config.vocab_size != drafter.config.vocab_size:
        raise ValueError(f"drafter vocab_size={drafter.config.vocab_size} differs from the target's {target.config.vocab_size}")
    target_graph, target_state = nnx.split(target)
    loss_fn = DistillLoss(distill_config.divergence, distill_config.temperature, target_graph)

    def eval_fn(model: Transformer) -> dict[str, float]:
        return {
            f"held_out_{distill_config.divergence}": measure_divergence(
                target, model, held_out_windows, distill_config.divergence, distill_config.temperature
            ),
            "held_out_alpha": measure_alpha(target, model, held_out_windows, distill_config.temperature),
        }

    return fit(
        drafter,
        loss_fn,
        distill_batches(target, train_stream, config, distill_config),
        eval_fn,
        config,
        checkpoint_dir,
        extra=target_state,
        metadata=metadata,
        stop_after=stop_after,
        log=log,
        progress=progress,
    )
