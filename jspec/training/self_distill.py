"""Self-distillation data: the target's own answers with its next-token distributions, stored once.

DistillSpec (arXiv 2310.08461) trains on data the target generates. For a target that costs far
more than the drafter (a 135M chat model against a 1-layer drafter on a CPU), recomputing the
target's logits at every training step would dominate training, so they are recorded while the
target writes its answers, where they come for free: at every answer position the top-`K`
log-probabilities (temperature 1) of the target's distribution and their token ids.

- `generate_with_top_k`: batched decoding (one compiled `lax.while_loop`) that returns the answers
  and the target's top-K log-probabilities at each answer position.
- `pack_examples`: answers packed into fixed-length rows with per-example causal masks, so short
  answers waste no compute; the loss is taken at answer positions only.
- `SparseDistillLoss`: forward KL from the renormalised top-K target distribution to the drafter,
  i.e. cross-entropy against it (the dropped tail holds little mass for a chat model's answers).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jspec.decode import prefill
from jspec.models import Transformer, causal_mask, commit
from jspec.sampling import Sampling, sample, warp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _GenState:
    step: jax.Array  # int32 []
    cache: object
    logits: jax.Array  # [B, V], the target's logits for the next token
    done: jax.Array  # bool [B]
    tokens: jax.Array  # int32 [B, N]
    top_ids: jax.Array  # int32 [B, N, K]
    top_logp: jax.Array  # float32 [B, N, K]


@functools.partial(jax.jit, static_argnames=("graph", "sampling", "max_new_tokens", "top_k"))
def _generate_with_top_k(graph, state, prompts, prompt_lengths, key, eos_id, *, sampling, max_new_tokens, top_k):
    model = nnx.merge(graph, state)
    b = prompts.shape[0]
    logits, cache = prefill(model, prompts, prompt_lengths, prompts.shape[1] + max_new_tokens + 1)
    init = _GenState(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        logits=logits,
        done=jnp.zeros((b,), bool),
        tokens=jnp.full((b, max_new_tokens), -1, jnp.int32),
        top_ids=jnp.zeros((b, max_new_tokens, top_k), jnp.int32),
        top_logp=jnp.zeros((b, max_new_tokens, top_k), jnp.float32),
    )

    def cond(s: _GenState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: _GenState):
        token = sample(jax.random.fold_in(key, s.step), warp(s.logits, sampling))
        token = jnp.where(s.done, -1, token)
        top_logp, top_ids = jax.lax.top_k(jax.nn.log_softmax(s.logits), top_k)
        new_logits, cache = model(jnp.maximum(token, 0)[:, None], s.cache.lengths[:, None], causal_mask(b, 1), s.cache)
        return _GenState(
            step=s.step + 1,
            cache=commit(cache, (~s.done).astype(jnp.int32)),
            logits=new_logits[:, 0],
            done=s.done | (token == eos_id),
            tokens=s.tokens.at[:, s.step].set(token),
            top_ids=s.top_ids.at[:, s.step].set(top_ids.astype(jnp.int32)),
            top_logp=s.top_logp.at[:, s.step].set(top_logp),
        )

    final = jax.lax.while_loop(cond, body, init)
    return final.tokens, final.top_ids, final.top_logp


def generate_with_top_k(
    target: Transformer,
    prompts: np.ndarray,
    prompt_lengths: np.ndarray,
    *,
    max_new_tokens: int,
    sampling: Sampling,
    top_k: int,
    eos_id: int,
    rng: jax.Array,
) -> list[dict]:
    """The target's answers to right-padded prompts `[B, P]` and its distributions along them.

    Returns one dict per row: `prompt` (int32 `[P_b]`), `answer` (int32 `[N_b]`, ending with EOS
    unless cut at max_new_tokens), `top_ids` (int32 `[N_b, K]`) and `top_logp` (float32 `[N_b, K]`):
    the K most likely next tokens at each answer position and their log-probabilities at
    temperature 1, whatever `sampling` wrote the answer.
    """
    graph, state = nnx.split(target)
    tokens, top_ids, top_logp = _generate_with_top_k(
        graph, state, jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_lengths, jnp.int32), rng, jnp.int32(eos_id),
        sampling=sampling, max_new_tokens=max_new_tokens, top_k=top_k,
    )  # fmt: skip
    tokens, top_ids, top_logp = np.asarray(tokens), np.asarray(top_ids), np.asarray(top_logp)
    rows = []
    for i in range(tokens.shape[0]):
        n = int(np.sum(tokens[i] >= 0))
        rows.append(
            {
                "prompt": np.asarray(prompts[i, : prompt_lengths[i]], np.int32),
                "answer": tokens[i, :n],
                "top_ids": top_ids[i, :n],
                "top_logp": top_logp[i, :n],
            }
        )
    return rows


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """Examples packed into rows of `T` tokens. tokens, positions, segments: int32 `[R, T]`
    (segment 0 is padding); target_ids int32 `[R, T, K]` and target_logp float32 `[R, T, K]`: the
    target's top-K distribution of the token after each position; weight float32 `[R, T]`: 1 where
    that distribution is a training target (answer positions), else 0."""

    tokens: np.ndarray
    positions: np.ndarray
    segments: np.ndarray
    target_ids: np.ndarray
    target_logp: np.ndarray
    weight: np.ndarray

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def rows(self, index: np.ndarray) -> tuple[jax.Array, ...]:
        """The rows `index` as a batch tuple (tokens, positions, segments, target_ids, target_logp, weight)."""
        return tuple(
            jnp.asarray(a[index])
            for a in (self.tokens, self.positions, self.segments, self.target_ids, self.target_logp, self.weight)
        )


def pack_examples(examples: list[dict], row_len: int, max_prompt: int | None = None) -> PackedRows:
    """Pack `generate_with_top_k` examples (in order, first fit) into rows of `row_len` tokens.

    Each example occupies prompt + answer tokens (its last answer token is input to nothing, so it
    is dropped); prompts longer than max_prompt (default: what leaves room for the answer) keep
    their last tokens. Positions restart at 0 for each example.
    """
    k = examples[0]["top_ids"].shape[1]
    rows: list[list[dict]] = []
    free: list[int] = []
    for ex in examples:
        n = min(len(ex["answer"]), row_len)  # an answer longer than a row keeps its start
        if n == 0:
            continue
        # Inputs are the prompt and the answer but its last token: p + n - 1 <= row_len.
        limit = row_len - n + 1 if max_prompt is None else min(max_prompt, row_len - n + 1)
        prompt = ex["prompt"][-limit:]
        length = len(prompt) + n - 1
        item = {"prompt": prompt, "answer": ex["answer"][:n], "top_ids": ex["top_ids"][:n], "top_logp": ex["top_logp"][:n]}
        for r, room in enumerate(free):
            if room >= length:
                rows[r].append(item)
                free[r] -= length
                break
        else:
            rows.append([item])
            free.append(row_len - length)
    shape = (len(rows), row_len)
    tokens, positions, segments = np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    target_ids = np.zeros(shape + (k,), np.int32)
    target_logp = np.full(shape + (k,), -np.inf, np.float32)
    target_logp[..., 0] = 0.0  # padding: a harmless one-hot distribution, weighted 0
    weight = np.zeros(shape, np.float32)
    for r, items in enumerate(rows):
        at = 0
        for s, item in enumerate(items, start=1):
            p, n = len(item["prompt"]), len(item["answer"])
            seq = np.concatenate([item["prompt"], item["answer"][:-1]])  # inputs: the last answer token predicts nothing
            span = slice(at, at + len(seq))
            tokens[r, span], positions[r, span], segments[r, span] = seq, np.arange(len(seq)), s
            # The distribution of answer token j is predicted at input position p - 1 + j.
            answer_span = slice(at + p - 1, at + p - 1 + n)
            target_ids[r, answer_span] = item["top_ids"]
            target_logp[r, answer_span] = item["top_logp"]
            weight[r, answer_span] = 1.0
            at += len(seq)
    return PackedRows(tokens, positions, segments, target_ids, target_logp, weight)


def segment_causal_mask(segments: jax.Array) -> jax.Array:
    """bool `[B, T, T]`: position i sees j <= i of the same (non-padding) example."""
    t = segments.shape[1]
    same = segments[:, :, None] == segments[:, None, :]
    return same & jnp.tril(jnp.ones((t, t), bool))[None] & (segments[:, :, None] > 0)


def packed_logits(
    model: Transformer, tokens: jax.Array, positions: jax.Array, segments: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Logits of packed rows, each example attending only to itself, and the vocabulary id of each
    logit column: `[B, T, V]` and `arange(V)`, or for a trimmed head `[B, T, K]` and its token map
    (the full-vocabulary tensor of a trimmed model is never built)."""
    from jspec.models import init_cache

    b, t = tokens.shape
    # Padding rows see nothing; give them themselves so the softmax stays finite.
    mask = segment_causal_mask(segments) | jnp.eye(t, dtype=bool)[None]
    logits = model(tokens, positions, mask, init_cache(model.config, b, t), scatter_head=False)[0]
    if model.config.head_tokens is None:
        return logits, jnp.arange(model.config.vocab_size, dtype=jnp.int32)
    return logits, model.head_token_ids[...]


def head_columns(target_ids: jax.Array, column_ids: jax.Array, vocab_size: int) -> jax.Array:
    """The logit column of each target id `[..., K]` for a head whose columns are the vocabulary ids
    `column_ids` `[C]`; -1 where the head does not cover the id."""
    inverse = jnp.full((vocab_size,), -1, jnp.int32).at[column_ids].set(jnp.arange(column_ids.shape[0], dtype=jnp.int32))
    return inverse[target_ids]


def sparse_cross_entropy(logits: jax.Array, columns: jax.Array, target_logp: jax.Array) -> jax.Array:
    """Cross-entropy `[...]` of drafter logits `[..., C]` against the renormalised top-K target
    distribution: its tokens' logit columns `[..., K]` (-1: not covered by the head) and their
    log-probabilities `[..., K]`. This is the forward KL up to the target's entropy. Tokens the head
    does not cover are dropped and p renormalised over the rest, the distribution a trimmed drafter
    can match; a position with none covered contributes 0.
    """
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    covered = columns >= 0
    logp = jnp.where(covered, target_logp, -jnp.inf)
    any_covered = jnp.any(covered, axis=-1, keepdims=True)
    p = jnp.where(any_covered, jax.nn.softmax(jnp.where(any_covered, logp, 0.0), axis=-1), 0.0)
    picked = jnp.take_along_axis(log_q, jnp.maximum(columns, 0), axis=-1)
    return -jnp.sum(jnp.where(covered & (p > 0), p * picked, 0.0), axis=-1)


@dataclasses.dataclass(frozen=True)
class SparseDistillLoss:
    """loss_fn for `jspec.training.loop.fit` on `PackedRows.rows` batches: the weighted mean of
    `sparse_cross_entropy` over answer positions."""

    def __call__(self, drafter: Transformer, batch: tuple, extra=None) -> jax.Array:
        del extra
        tokens, positions, segments, target_ids, target_logp, weight = batch
        logits, column_ids = packed_logits(drafter, tokens, positions, segments)
        columns = head_columns(target_ids, column_ids, drafter.config.vocab_size)
        ce = sparse_cross_entropy(logits, columns, target_logp)
        return jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)


@functools.partial(jax.jit, static_argnames=("graph",))
def _agreement_stats(graph, state, batch):
    tokens, positions, segments, target_ids, target_logp, weight = batch
    model = nnx.merge(graph, state)
    logits, column_ids = packed_logits(model, tokens, positions, segments)
    columns = head_columns(target_ids, column_ids, model.config.vocab_size)
    ce = sparse_cross_entropy(logits, columns, target_logp)
    greedy = (column_ids[jnp.argmax(logits, axis=-1)] == target_ids[..., 0]).astype(jnp.float32)
    # sum_x min(p, q) over the target's top K: alpha at temperature 1, short of the tail's share.
    q = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    q_top = jnp.where(columns >= 0, jnp.take_along_axis(q, jnp.maximum(columns, 0), axis=-1), 0.0)
    overlap = jnp.sum(jnp.minimum(jnp.exp(target_logp), q_top), axis=-1)
    return jnp.sum(ce * weight), jnp.sum(greedy * weight), jnp.sum(overlap * weight), jnp.sum(weight)


def agreement(drafter: Transformer, rows: PackedRows, batch_size: int = 8) -> dict[str, float]:
    """On packed held-out rows: mean sparse cross-entropy, alpha at temperature 0 (argmax agreement
    with the target) and at temperature 1 (sum of min(p, q) over the target's top K, a lower bound)."""
    graph, state = nnx.split(drafter)
    totals = np.zeros(4)
    for start in range(0, len(rows), batch_size):
        index = np.arange(start, min(start + batch_size, len(rows)))
        totals += np.asarray([float(x) for x in _agreement_stats(graph, state, rows.rows(index))])
    ce, greedy, overlap, n = totals
    return {"cross_entropy": ce / n, "alpha_t0": greedy / n, "alpha_t1_top_k": overlap / n}


__all__ = [
    "PackedRows",
    "SparseDistillLoss",
    "agreement",
    "generate_with_top_k",
    "head_columns",
    "pack_examples",
    "packed_logits",
    "segment_causal_mask",
    "sparse_cross_entropy",
]
