"""Distil a drafter on a target's own answers (DistillSpec with self-generated data, stored targets).

    python -m train.self_distill --target smollm2-135m --data runs/smollm2/data/train \\
        --held-out runs/smollm2/data/held_out --init shallow:1 --out runs/smollm2/drafter-l1

Data: shards written by `python -m train.chat_data` (answers plus the target's top-K distribution
at every answer position), packed into rows of --row-len tokens with per-example masks. The loss is
the forward KL from the target's renormalised top-K distribution (`SparseDistillLoss`); the target
itself is not run during training. Drafter initialisations (`--init`):
  shallow:N        the target's embedding, first N blocks, final norm and output head (untied copy);
  scratch:D:L:F    a random model of width D, L layers, MLP width F, over the target's vocabulary.
A shallow drafter keeps the target's embedding table frozen and is saved without it
(`jspec.models.save(..., shared=("embed",))`); load it with `shared={"embed": ...}` from the target.

Held-out agreement (sparse cross-entropy, alpha at temperature 0 and 1) is logged every
--eval-every steps. Checkpoints with Orbax into OUT/checkpoints and resumes when re-run; writes
OUT/model and OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from flax import nnx

from jspec.models import save
from jspec.training.drafter_init import ALL_BUT_EMBEDDING, scratch_drafter, shallow_drafter
from jspec.training.loop import TrainConfig, epoch_rows, fit
from jspec.training.self_distill import SparseDistillLoss, agreement, pack_examples
from jspec.training.shards import read_shards
from jspec.training.vocab_trim import most_frequent, token_counts, trim_drafter
from train.chat_data import load_chat_target


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m train.self_distill", description=__doc__.split("\n")[0])
    p.add_argument("--target", default="smollm2-135m", help="smollm2-135m or a .gguf file (default: smollm2-135m)")
    p.add_argument("--data", required=True, help="training shard directory (train.chat_data)")
    p.add_argument("--held-out", required=True, help="held-out shard directory")
    p.add_argument("--max-shards", type=int, default=None, help="train on the first N shards only (design comparisons)")
    p.add_argument("--init", default="shallow:1", help="shallow:N or scratch:D:L:F (default: shallow:1)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument(
        "--keep",
        type=int,
        default=None,
        help="VocabTrim first: cut the drafter's head to the K tokens the target emits most often in the "
        "training answers (plus EOS; ties to tokens frequent in the prompts), and distil over those "
        "(default: the full vocabulary)",
    )
    p.add_argument("--row-len", type=int, default=512, help="packed row length in tokens (default: 512)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=4, help="packed rows per step (default: 4)")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--stop-after", type=int, help="stop this run after N steps (resume with the same command)")
    p.add_argument("--no-progress", action="store_true")
    return p


def initial_drafter(spec: str, target):
    """(drafter, frozen embedding?) for an --init spec."""
    kind, _, rest = spec.partition(":")
    try:
        if kind == "shallow":
            return shallow_drafter(target, int(rest), untie_head=True), True
        if kind == "scratch":
            d, layers, ff = (int(x) for x in rest.split(":"))
            heads = max(1, d // 64)
            return scratch_drafter(target.config, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=heads, d_ff=ff), False
    except ValueError as e:
        raise SystemExit(f"--init {spec!r}: {e}")
    raise SystemExit(f"--init must be shallow:N or scratch:D:L:F, got {spec!r}")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    started = time.time()
    target, tokenizer = load_chat_target(args.target)
    drafter, frozen_embedding = initial_drafter(args.init, target)
    train_examples, _ = read_shards(args.data, limit=args.max_shards)
    held_examples, _ = read_shards(args.held_out)
    if not train_examples or not held_examples:
        raise SystemExit(f"no shards in {args.data if not train_examples else args.held_out}")
    trim = None
    if args.keep is not None:
        vocab = target.config.vocab_size
        counts = token_counts(np.concatenate([e["answer"] for e in train_examples]), vocab)
        prompt_counts = token_counts(np.concatenate([e["prompt"] for e in train_examples]), vocab)
        keep = most_frequent(counts, args.keep, always_keep=(tokenizer.eos_id,), tie_break=prompt_counts)
        drafter = trim_drafter(drafter, keep)
        held_counts = token_counts(np.concatenate([e["answer"] for e in held_examples]), target.config.vocab_size)
        trim = {
            "keep": args.keep,
            "train_coverage": float(counts[keep].sum() / counts.sum()),
            "held_out_coverage": float(held_counts[keep].sum() / held_counts.sum()),
        }
        print(
            f"VocabTrim: {args.keep} tokens cover {trim['train_coverage']:.2%} of the training answers' tokens, "
            f"{trim['held_out_coverage']:.2%} of the held-out answers'",
            flush=True,
        )
    train_rows = pack_examples(train_examples, args.row_len)
    held_rows = pack_examples(held_examples, args.row_len)
    print(
        f"train: {len(train_examples)} answers, {int(train_rows.weight.sum())} answer tokens in {len(train_rows)} rows; "
        f"held-out: {len(held_examples)} answers, {int(held_rows.weight.sum())} tokens",
        flush=True,
    )
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.row_len, learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, seed=args.seed,
        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
    )  # fmt: skip

    def batch_fn(step: int, _model):
        return train_rows.rows(epoch_rows(step, len(train_rows), args.batch_size, args.seed))

    before = agreement(drafter, held_rows)
    print("before: " + ", ".join(f"{k} {v:.4f}" for k, v in before.items()), flush=True)
    drafter, history = fit(
        drafter, SparseDistillLoss(), batch_fn, lambda m: agreement(m, held_rows), config,
        os.path.join(args.out, "checkpoints"), metadata={"argv": sys.argv[1:] if argv is None else argv},
        stop_after=args.stop_after, progress=not args.no_progress,
        trainable=ALL_BUT_EMBEDDING if frozen_embedding else nnx.Param,
    )  # fmt: skip
    summary = {
        "init": args.init,
        "frozen_embedding": frozen_embedding,
        "vocab_trim": trim,
        "train_answers": len(train_examples),
        "train_answer_tokens": int(train_rows.weight.sum()),
        "held_out_answers": len(held_examples),
        "before": before,
        "history": history,
        "args": vars(args),
        "seconds_this_run": time.time() - started,
    }
    if args.stop_after is None or (history and history[-1]["step"] == args.steps):
        model_dir = os.path.join(args.out, "model")
        if not os.path.exists(model_dir):
            save(drafter, model_dir, shared=("embed",) if frozen_embedding else ())
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
