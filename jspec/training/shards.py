"""Self-distillation examples on disk: numbered `.npz` shards, each written atomically.

A shard holds a batch of `generate_with_top_k` examples as flat arrays plus offsets. It is written
under a temporary name and renamed when complete, so a data job that is interrupted and re-run
skips the finished shards and never reads a partial one.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np


def write_shard(path: str | os.PathLike, examples: list[dict], meta: list[dict]) -> None:
    """Write examples (`prompt`, `answer`, `top_ids`, `top_logp`) and one JSON-able dict per example."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prompt_lengths = np.asarray([len(e["prompt"]) for e in examples], np.int64)
    answer_lengths = np.asarray([len(e["answer"]) for e in examples], np.int64)
    k = examples[0]["top_ids"].shape[1]
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(
        partial,
        prompts=np.concatenate([e["prompt"] for e in examples]).astype(np.int32),
        prompt_lengths=prompt_lengths,
        answers=np.concatenate([e["answer"] for e in examples] + [np.zeros(0, np.int32)]).astype(np.int32),
        answer_lengths=answer_lengths,
        top_ids=np.concatenate([e["top_ids"] for e in examples] + [np.zeros((0, k), np.int32)]).astype(np.int32),
        top_logp=np.concatenate([e["top_logp"] for e in examples] + [np.zeros((0, k), np.float32)]).astype(np.float32),
        meta=np.asarray(json.dumps(meta)),
    )
    os.replace(partial, path)


def read_shard(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(examples, meta) of one shard."""
    with np.load(path) as data:
        p_off = np.concatenate([[0], np.cumsum(data["prompt_lengths"])])
        a_off = np.concatenate([[0], np.cumsum(data["answer_lengths"])])
        prompts, answers, top_ids, top_logp = data["prompts"], data["answers"], data["top_ids"], data["top_logp"]
        examples = [
            {
                "prompt": prompts[p_off[i] : p_off[i + 1]],
                "answer": answers[a_off[i] : a_off[i + 1]],
                "top_ids": top_ids[a_off[i] : a_off[i + 1]],
                "top_logp": top_logp[a_off[i] : a_off[i + 1]],
            }
            for i in range(len(p_off) - 1)
        ]
        return examples, json.loads(str(data["meta"]))


def read_shards(directory: str | os.PathLike, limit: int | None = None) -> tuple[list[dict], list[dict]]:
    """Every finished shard of a directory (or the first `limit`), in name order."""
    examples, meta = [], []
    paths = [p for p in sorted(pathlib.Path(directory).glob("*.npz")) if not p.name.endswith(".partial.npz")]
    for path in paths[:limit]:
        e, m = read_shard(path)
        examples += e
        meta += m
    return examples, meta


__all__ = ["read_shard", "read_shards", "write_shard"]
