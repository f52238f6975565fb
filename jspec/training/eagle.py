"""Training EAGLE heads (`jspec.eagle`) on the target's own features, with training-time test.

Data: packed rows of token sequences (`jspec.training.self_distill.PackedRows`, answer positions
weighted) run once through the target (`target_rows`), which records at every position the hidden
states the head reads and the target's top-K next-token log-probabilities. The head is then
trained on those arrays alone: the target is never run again.

Training-time test (EAGLE-3, arXiv 2503.01840): the head is unrolled for `steps` draft steps. Step 1
reads the target's features; step s > 1 reads at position i the head's own step-(s-1) output at
position i - 1 (its prediction of feature i), paired with the true token x_{i+1}, exactly what
drafting s tokens ahead feeds it. Step s's query at position i sees the real entries of positions
<= i - s + 1 and its own draft entries at positions i - s + 2 .. i (one per earlier step), the
attention pattern of a drafted chain. Every step's output at i is trained toward the target's
distribution of x_{i+2} (forward KL to its top-K, as DistillSpec); EAGLE-1 adds the regression of
step 1's output onto the target's next feature (smooth L1, as the paper).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jspec.eagle import EagleHead
from jspec.models import init_cache
from jspec.training.self_distill import PackedRows, head_columns, segment_causal_mask, sparse_cross_entropy

# Trained: everything but the embedding table the head shares with its target.
HEAD_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("embed")))
# EAGLE-1 also keeps the target's LM head frozen (its output is a target feature).
HEAD_PARAMS_FROZEN_LM_HEAD = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("embed")), nnx.Not(nnx.PathContains("lm_head")))


@dataclasses.dataclass
class FeatureRows:
    """Packed rows with the target's view of them. rows: the `PackedRows` (its target_ids /
    target_logp replaced by the target's own top-K); features: `[R, T, F, d]` (float16) at the
    head's feature_layers."""

    rows: PackedRows
    features: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, index: np.ndarray) -> tuple[jax.Array, ...]:
        """(tokens, positions, segments, features, target_ids, target_logp, weight) of rows `index`."""
        r = self.rows
        return tuple(
            jnp.asarray(a[index])
            for a in (r.tokens, r.positions, r.segments, self.features, r.target_ids, r.target_logp, r.weight)
        )


def sequence_rows(tokens: np.ndarray, answer_start: int, top_k: int = 32) -> PackedRows:
    """Unpacked rows, one sequence each: tokens int32 `[R, T]` whose positions >= answer_start are
    the target's own continuation (the distributions trained on; the prompt's are not). The
    target_ids / target_logp placeholders are filled by `target_rows`."""
    tokens = np.asarray(tokens, np.int32)
    shape = tokens.shape
    weight = np.zeros(shape, np.float32)
    weight[:, answer_start - 1 : -1] = 1.0  # position i holds the distribution of token i + 1
    return PackedRows(
        tokens=tokens,
        positions=np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
        segments=np.ones(shape, np.int32),
        target_ids=np.zeros(shape + (top_k,), np.int32),
        target_logp=np.zeros(shape + (top_k,), np.float32),
        weight=weight,
    )


@functools.partial(jax.jit, static_argnames=("graph", "layers", "top_k"))
def _target_rows(graph, state, tokens, positions, segments, *, layers, top_k):
    target = nnx.merge(graph, state)
    b, t = tokens.shape
    mask = segment_causal_mask(segments) | jnp.eye(t, dtype=bool)[None]
    logits, _, hidden = target(tokens, positions, mask, init_cache(target.config, b, t), features=layers)
    logp, ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), top_k)
    return hidden.astype(jnp.float16), ids.astype(jnp.int32), logp


def target_rows(
    target, rows: PackedRows, layers: tuple[int, ...], *, top_k: int = 32, batch_size: int = 4, log=None
) -> FeatureRows:
    """Run packed `rows` through `target` once: its features at `layers` and its top-K next-token
    log-probabilities at every position (the distillation targets)."""
    graph, state = nnx.split(target)
    feats, ids, logps = [], [], []
    for start in range(0, len(rows), batch_size):
        index = np.arange(start, min(start + batch_size, len(rows)))
        h, i, lp = _target_rows(
            graph,
            state,
            *(jnp.asarray(a[index]) for a in (rows.tokens, rows.positions, rows.segments)),
            layers=layers,
            top_k=top_k,
        )
        feats.append(np.asarray(h))
        ids.append(np.asarray(i))
        logps.append(np.asarray(lp))
        if log is not None:
            log(f"target features: {index[-1] + 1}/{len(rows)} rows")
    rows = dataclasses.replace(rows, target_ids=np.concatenate(ids), target_logp=np.concatenate(logps))
    return FeatureRows(rows, np.concatenate(feats))


def ttt_masks(segments: jax.Array, steps: int) -> list[jax.Array]:
    """bool `[B, T, steps * T]` per step s = 1 .. steps: what step s's queries see among the entries
    of steps 1 .. s (laid out step after step; later steps' slots are never visible)."""
    b, t = segments.shape
    same = segments[:, :, None] == segments[:, None, :]
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    masks = []
    for s in range(1, steps + 1):
        blocks = [same & (j <= i - (s - 1))[None]]  # real entries
        blocks += [same & (j == i - (s - u))[None] for u in range(2, s + 1)]  # draft entries of steps 2 .. s
        blocks += [jnp.zeros((b, t, t), bool)] * (steps - s)
        masks.append(jnp.concatenate(blocks, axis=2))
    return masks


def _shift_right(x: jax.Array) -> jax.Array:
    """x `[B, T, ...]` moved one position later (position 0 gets zeros)."""
    return jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)


def unrolled_outputs(head: EagleHead, batch: tuple, steps: int):
    """Run the training-time test: per step s, the head's logits `[B, T, C]` (trimmed columns),
    its outputs `[B, T, d]` and the positions where step s is trained, bool `[B, T]`; and the
    vocabulary id of each logit column."""
    tokens, positions, segments, features, target_ids, target_logp, weight = batch
    b, t = tokens.shape
    following = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
    next_same = jnp.concatenate([segments[:, 1:] == segments[:, :-1], jnp.zeros((b, 1), bool)], axis=1) & (segments > 0)
    target_weight = jnp.concatenate([weight[:, 1:], jnp.zeros((b, 1))], axis=1)  # x_{i+2}'s distribution sits at i + 1
    cache = init_cache(head.config.layer, b, steps * t)
    feature = head.fuse_features(features.astype(jnp.float32))
    out = []
    for s, mask in enumerate(ttt_masks(segments, steps), start=1):
        logits, h, cache = head(feature, following, positions, mask, cache, write_at=(s - 1) * t, scatter_head=False)
        # Step s at i needs real features up to i - s + 1 within the example.
        reached = positions >= s - 1
        out.append((logits, h, next_same & reached & (target_weight > 0)))
        feature = _shift_right(h)
    column_ids = head.head_token_ids[...] if head.config.head_tokens is not None else jnp.arange(head.config.target.vocab_size)
    return out, column_ids


@dataclasses.dataclass(frozen=True)
class EagleLoss:
    """loss_fn for `jspec.training.loop.fit` on `FeatureRows.batch` batches: the step-weighted
    (decay**(s-1)) forward KL of every unrolled step to the target's top-K, plus for EAGLE-1
    `feature_weight` times the smooth-L1 regression of step 1's output on the next feature."""

    steps: int = 3
    decay: float = 0.8
    feature_weight: float = 0.0

    def __call__(self, head: EagleHead, batch: tuple, extra=None) -> jax.Array:
        del extra
        _, _, _, features, target_ids, target_logp, _ = batch
        out, column_ids = unrolled_outputs(head, batch, self.steps)
        ids = jnp.concatenate([target_ids[:, 1:], target_ids[:, :1]], axis=1)  # the distribution at i + 1
        logp = jnp.concatenate([target_logp[:, 1:], target_logp[:, :1]], axis=1)
        columns = head_columns(ids, column_ids, head.config.target.vocab_size)
        total, norm = 0.0, 0.0
        for s, (logits, h, trained) in enumerate(out):
            w = trained.astype(jnp.float32)
            ce = jnp.sum(sparse_cross_entropy(logits, columns, logp) * w) / jnp.maximum(jnp.sum(w), 1.0)
            total += self.decay**s * ce
            norm += self.decay**s
        loss = total / norm
        if self.feature_weight > 0:
            logits, h, trained = out[0]
            next_feature = jnp.concatenate([features[:, 1:, 0], features[:, :1, 0]], axis=1).astype(jnp.float32)
            w = trained.astype(jnp.float32)[..., None]
            l1 = optax.huber_loss(h, next_feature)  # smooth L1 (delta 1), elementwise
            loss = loss + self.feature_weight * jnp.sum(l1 * w) / jnp.maximum(jnp.sum(w) * h.shape[-1], 1.0)
        return loss


@functools.partial(jax.jit, static_argnames=("graph", "steps"))
def _acceptance_stats(graph, state, batch, *, steps):
    head = nnx.merge(graph, state)
    _, _, _, _, target_ids, _, _ = batch
    out, column_ids = unrolled_outputs(head, batch, steps)
    top1 = jnp.concatenate([target_ids[:, 1:, 0], target_ids[:, :1, 0]], axis=1)
    hits, counts = [], []
    ok = None
    for logits, _, trained in out:
        agree = column_ids[jnp.argmax(logits, axis=-1)] == top1
        # Step s counts where steps 1 .. s-1 agreed one position earlier each: a chain accepted so far.
        ok = agree if ok is None else agree & _shift_right(ok)
        hits.append(jnp.sum(ok & trained))
        counts.append(jnp.sum(trained))
    return jnp.stack(hits), jnp.stack(counts)


def held_out_acceptance(head: EagleHead, rows: FeatureRows, steps: int = 3, batch_size: int = 4) -> dict[str, float]:
    """Greedy acceptance on held-out rows: `alpha_1` the share of positions where the head's first
    draft is the target's argmax, and `alpha_s` (s > 1) the share of positions where drafts 1 .. s
    all are (given the true prefix), from which tau of a chain of `steps` drafts follows:
    tau = 1 + sum_s alpha_s (`tau_chain`)."""
    graph, state = nnx.split(head)
    hits, counts = np.zeros(steps), np.zeros(steps)
    for start in range(0, len(rows), batch_size):
        index = np.arange(start, min(start + batch_size, len(rows)))
        h, c = _acceptance_stats(graph, state, rows.batch(index), steps=steps)
        hits += np.asarray(h)
        counts += np.asarray(c)
    alphas = hits / np.maximum(counts, 1)
    out = {f"alpha_{s + 1}": float(a) for s, a in enumerate(alphas)}
    out["tau_chain"] = float(1 + alphas.sum())
    return out


__all__ = [
    "EagleLoss",
    "FeatureRows",
    "HEAD_PARAMS",
    "HEAD_PARAMS_FROZEN_LM_HEAD",
    "held_out_acceptance",
    "target_rows",
    "ttt_masks",
]
