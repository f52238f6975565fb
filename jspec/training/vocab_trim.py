"""VocabTrim (arXiv 2506.22694): a drafter whose output head covers only the K most frequent tokens.

The trimmed drafter's logits are scattered back to the full vocabulary with -inf elsewhere, so its
q is a proper distribution over the target's vocabulary (zero outside the K tokens) and every
verifier stays exact. Trimming saves (V - K) * d_model of the weights the drafter reads per step.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jspec.analysis import mbsu
from jspec.decode import generate
from jspec.models import Transformer
from jspec.sampling import Sampling


def token_counts(tokens: np.ndarray, vocab_size: int, lengths: np.ndarray | None = None) -> np.ndarray:
    """Occurrences of each token id in `tokens` (`[N]` or `[B, T]` with valid `lengths [B]`): int64 `[V]`."""
    tokens = np.asarray(tokens)
    if lengths is not None:
        tokens = tokens[np.arange(tokens.shape[1])[None, :] < np.asarray(lengths)[:, None]]
    return np.bincount(tokens.ravel(), minlength=vocab_size)[:vocab_size]


def target_generation_counts(
    target: Transformer, prompts: np.ndarray, *, max_new_tokens: int, sampling: Sampling, rng: jax.Array
) -> np.ndarray:
    """Token counts over the target's own generations from `prompts` `[B, P]` (VocabTrim's recommended source)."""
    out = generate(target, prompts, max_new_tokens=max_new_tokens, sampling=sampling, rng=rng)
    return token_counts(np.asarray(out.tokens), target.config.vocab_size, np.asarray(out.lengths))


def most_frequent(
    counts: np.ndarray, k: int, always_keep: tuple[int, ...] = (), tie_break: np.ndarray | None = None
) -> np.ndarray:
    """The k most frequent token ids, plus `always_keep` within the k, sorted: int32 `[k]`.

    Ties (notably the many tokens counted 0 when the counted text is small) go to the higher
    `tie_break` count (e.g. tokens seen in the prompts, which a chat model copies from), then to
    the lower id.
    """
    if not 1 <= k <= len(counts):
        raise ValueError(f"k must lie in [1, {len(counts)}], got {k}")
    secondary = np.zeros(len(counts)) if tie_break is None else np.asarray(tie_break)
    order = np.lexsort((np.arange(len(counts)), -secondary, -np.asarray(counts)))  # count, tie_break desc; id asc
    chosen = list(dict.fromkeys([*always_keep, *order.tolist()]))[:k]
    return np.sort(np.asarray(chosen, np.int32))


def trim_drafter(drafter: Transformer, keep: np.ndarray) -> Transformer:
    """A copy of `drafter` whose output head covers only the token ids `keep` `[K]`."""
    keep = np.asarray(keep, np.int32)
    if keep.ndim != 1 or len(np.unique(keep)) != len(keep) or keep.min() < 0 or keep.max() >= drafter.config.vocab_size:
        raise ValueError(f"keep must be distinct token ids in [0, {drafter.config.vocab_size}), got {keep!r}")
    config = dataclasses.replace(drafter.config, tie_embeddings=False, head_tokens=len(keep))
    trimmed = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graph, state = nnx.split(trimmed)
    params = nnx.state(drafter).to_pure_dict()
    if drafter.config.head_tokens is not None:
        raise ValueError("drafter is already trimmed")
    full_head = params["embed"]["embedding"].T if drafter.config.tie_embeddings else params["lm_head"]["kernel"]
    params["lm_head"] = {"kernel": full_head[:, keep]}
    params["head_token_ids"] = jnp.asarray(keep)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graph, state)


def untrim_drafter(drafter: Transformer, fill: jax.Array) -> Transformer:
    """A full-vocabulary copy of a trimmed drafter: its head's K columns where it has them, `fill`
    `[d_model, V]` elsewhere (e.g. the target's output head, the trimmed drafter's initialisation).

    For libraries that cannot represent a trimmed head (Hugging Face's assisted generation): the
    copy drafts the same tokens wherever the trimmed drafter's choice outscores the filled columns.
    """
    if drafter.config.head_tokens is None:
        raise ValueError("drafter is not trimmed")
    config = dataclasses.replace(drafter.config, head_tokens=None)
    graph, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    params = nnx.state(drafter).to_pure_dict()
    keep = params.pop("head_token_ids")
    fill = jnp.asarray(fill, params["lm_head"]["kernel"].dtype)
    if fill.shape != (config.d_model, config.vocab_size):
        raise ValueError(f"fill must have shape {(config.d_model, config.vocab_size)}, got {fill.shape}")
    params["lm_head"] = {"kernel": fill.at[:, keep].set(params["lm_head"]["kernel"])}
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graph, state)


def weights_read_per_token(model: Transformer) -> int:
    """Parameters a decoding step reads: everything but the input embedding table (one row is read),
    plus the output head (the embedding itself when tied). The N of the memory-bound speedup."""
    params = nnx.state(model, nnx.Param)
    total = sum(x.size for x in jax.tree.leaves(params))
    embedding = model.embed.embedding.size
    return total - embedding + (embedding if model.config.tie_embeddings else 0)


def memory_bound_speedup(tau: float, k: int, drafter: Transformer, target: Transformer) -> float:
    """MBSU = tau / (1 + k * N_draft / N_target), N = `weights_read_per_token` (`jspec.analysis.mbsu`)."""
    return mbsu(tau, k, weights_read_per_token(drafter), weights_read_per_token(target))
