"""Token streams and batches that are a pure function of the step, so a resumed run sees the
same data as an uninterrupted one without any iterator state in the checkpoint."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from jspec.training.corpus import Document
from jspec.training.tokenizer import eos_id


def token_stream(docs: list[Document], tokenizer: Tokenizer) -> np.ndarray:
    """All documents tokenized and concatenated, each followed by EOS: int32 `[N]`."""
    eos = eos_id(tokenizer)
    encodings = tokenizer.encode_batch([d.text for d in docs])
    pieces = [np.append(np.asarray(e.ids, np.int32), np.int32(eos)) for e in encodings]
    return np.concatenate(pieces).astype(np.int32)


def batch_at(stream: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int) -> np.ndarray:
    """Windows of seq_len + 1 tokens at random offsets drawn from (seed, step): int32 `[B, T+1]`
    (inputs are `[:, :-1]`, targets `[:, 1:]`)."""
    if len(stream) <= seq_len + 1:
        raise ValueError(f"the token stream ({len(stream)} tokens) is shorter than seq_len + 1 = {seq_len + 1}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - seq_len - 1, batch_size)
    return np.stack([stream[s : s + seq_len + 1] for s in starts])


def eval_batches(stream: np.ndarray, batch_size: int, seq_len: int, max_batches: int) -> list[np.ndarray]:
    """Non-overlapping windows of seq_len + 1 tokens spread evenly over a held-out stream, the same
    every time: `max_batches` (or as many as fit) int32 `[B, T+1]` batches.

    Spread rather than taken from the start, because a corpus's files are not alike (the stdlib's
    first held-out files include codec tables that any model predicts almost perfectly).
    """
    window = seq_len + 1
    n = min(max_batches * batch_size, len(stream) // window)
    n -= n % batch_size
    if n == 0:
        raise ValueError(f"the held-out stream ({len(stream)} tokens) holds no batch of {batch_size} x {window} tokens")
    starts = np.linspace(0, len(stream) - window, n).astype(np.int64)
    windows = np.stack([stream[s : s + window] for s in starts])
    return [windows[i : i + batch_size] for i in range(0, n, batch_size)]
