"""Train an EAGLE head (`jspec.eagle`) for a chat target on its own answers, with optax.

    python -m train.eagle --target smollm2-135m --data runs/smollm2/data/train \\
        --held-out runs/smollm2/data/held_out --kind eagle1 --keep 8192 --out runs/smollm2/eagle1

Data: shards written by `python -m train.chat_data` (the target's answers to instructions built
on this machine, never Spec-Bench), packed into rows of --row-len tokens. The target runs over the
rows once (`jspec.training.eagle.target_rows`), giving the features the head reads and its top-K
next-token distribution at every position; training then never runs the target again. The loss
is the training-time test of `jspec.training.eagle.EagleLoss` over --ttt-steps draft steps (plus
the feature regression for EAGLE-1). --keep K trims the head's vocabulary to the K tokens the
target emits most (VocabTrim). EAGLE-1 keeps the target's output head (its rows) frozen, as the
paper does; EAGLE-3 trains its own.

The target's pass is saved in OUT/features-*.npz. Orbax checkpoints go to OUT/checkpoints every
--checkpoint-every steps and a re-run resumes from the latest, ending exactly as an uninterrupted
run. Held-out acceptance (alpha by draft position,
greedy chain tau) is logged every --eval-every steps. Writes OUT/head (without the embedding table
it shares with the target: `jspec.eagle.load_head(path, target)`) and OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from jspec.eagle import EagleHead, save_head
from jspec.training.eagle import (
    HEAD_PARAMS,
    HEAD_PARAMS_FROZEN_LM_HEAD,
    EagleLoss,
    FeatureRows,
    held_out_acceptance,
    target_rows,
)
from jspec.training.loop import TrainConfig, epoch_rows, fit
from jspec.training.self_distill import PackedRows, pack_examples
from jspec.training.shards import read_shards
from jspec.training.vocab_trim import most_frequent, token_counts


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m train.eagle", description=__doc__.split("\n")[0])
    p.add_argument("--target", default="smollm2-135m", help="smollm2-135m or a .gguf file (default: smollm2-135m)")
    p.add_argument("--data", required=True, help="training shards (train.chat_data)")
    p.add_argument("--held-out", required=True, help="held-out shards (train.chat_data)")
    p.add_argument("--max-shards", type=int, default=None, help="use the first N training shards (default: all)")
    p.add_argument("--max-held-out-rows", type=int, default=16, help="held-out rows evaluated (default: 16)")
    p.add_argument("--out", required=True)
    p.add_argument("--kind", choices=("eagle1", "eagle3"), default="eagle1")
    p.add_argument("--keep", type=int, default=None, help="VocabTrim: keep the K tokens the target emits most (default: all)")
    p.add_argument("--ttt-steps", type=int, default=3, help="draft steps unrolled in training (default: 3)")
    p.add_argument(
        "--feature-weight",
        type=float,
        default=None,
        help="EAGLE-1 feature regression weight (default: 1 for eagle1, 0 for eagle3)",
    )
    p.add_argument("--row-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--stop-after", type=int, help="stop this run after N steps (resume with the same command)")
    p.add_argument("--no-progress", action="store_true")
    return p


PACKED_FIELDS = ("tokens", "positions", "segments", "target_ids", "target_logp", "weight")


def cached_target_rows(path: str, target, rows: PackedRows, layers: tuple[int, ...]) -> FeatureRows:
    """`target_rows`, saved to `path` (written atomically) and read back when it exists."""
    if os.path.exists(path):
        with np.load(path) as f:
            packed = PackedRows(*(f[name] for name in PACKED_FIELDS))
            return FeatureRows(packed, f["features"])
    out = target_rows(target, rows, layers, batch_size=8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = path + ".partial.npz"
    np.savez(partial, features=out.features, **{name: getattr(out.rows, name) for name in PACKED_FIELDS})
    os.replace(partial, path)
    return out


def main(argv: list[str] | None = None) -> dict:
    from train.chat_data import load_chat_target

    args = build_parser().parse_args(argv)
    started = time.time()
    target, tokenizer = load_chat_target(args.target)
    train_examples, _ = read_shards(args.data, limit=args.max_shards)
    held_examples, _ = read_shards(args.held_out)
    if not train_examples or not held_examples:
        raise SystemExit(f"no shards in {args.data if not train_examples else args.held_out}")
    keep, trim = None, None
    if args.keep is not None:
        vocab = target.config.vocab_size
        counts = token_counts(np.concatenate([e["answer"] for e in train_examples]), vocab)
        prompt_counts = token_counts(np.concatenate([e["prompt"] for e in train_examples]), vocab)
        keep = most_frequent(counts, args.keep, always_keep=(tokenizer.eos_id,), tie_break=prompt_counts)
        held_counts = token_counts(np.concatenate([e["answer"] for e in held_examples]), vocab)
        trim = {
            "keep": args.keep,
            "train_coverage": float(counts[keep].sum() / counts.sum()),
            "held_out_coverage": float(held_counts[keep].sum() / held_counts.sum()),
        }
    head = EagleHead.from_target(target, kind=args.kind, keep_ids=keep, seed=args.seed)
    layers = head.config.feature_layers
    log = lambda s: print(s, flush=True)  # noqa: E731
    held_packed = pack_examples(held_examples, args.row_len)
    held_packed = type(held_packed)(*(a[: args.max_held_out_rows] for a in vars(held_packed).values()))
    # One pass of the target over the rows, kept in OUT so that a resumed run does not repeat it.
    train = cached_target_rows(
        os.path.join(args.out, "features-train.npz"), target, pack_examples(train_examples, args.row_len), layers
    )
    held = cached_target_rows(os.path.join(args.out, "features-held-out.npz"), target, held_packed, layers)
    log(
        f"{args.kind} head, features {layers}; train: {int(train.rows.weight.sum())} answer tokens in {len(train)} rows; "
        f"held-out: {int(held.rows.weight.sum())} tokens in {len(held)} rows ({time.time() - started:.0f} s)"
    )
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.row_len, learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps, weight_decay=0.0, seed=args.seed, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
    )  # fmt: skip

    def batch_fn(step: int, _model):
        return train.batch(epoch_rows(step, len(train), args.batch_size, args.seed))

    feature_weight = args.feature_weight if args.feature_weight is not None else (1.0 if args.kind == "eagle1" else 0.0)
    loss = EagleLoss(steps=args.ttt_steps, feature_weight=feature_weight)
    evaluate = lambda m: held_out_acceptance(m, held, steps=args.ttt_steps)  # noqa: E731
    before = evaluate(head)
    log("before: " + ", ".join(f"{k} {v:.4f}" for k, v in before.items()))
    head, history = fit(
        head, loss, batch_fn, evaluate, config, os.path.join(args.out, "checkpoints"),
        metadata={"argv": sys.argv[1:] if argv is None else argv}, stop_after=args.stop_after,
        progress=not args.no_progress, log=log,
        trainable=HEAD_PARAMS_FROZEN_LM_HEAD if args.kind == "eagle1" else HEAD_PARAMS,
    )  # fmt: skip
    summary = {
        "kind": args.kind,
        "feature_layers": list(layers),
        "vocab_trim": trim,
        "train_answers": len(train_examples),
        "train_answer_tokens": int(train.rows.weight.sum()),
        "held_out_rows": len(held),
        "before": before,
        "history": history,
        "args": vars(args),
        "seconds_this_run": time.time() - started,
    }
    if args.stop_after is None or (history and history[-1]["step"] == args.steps):
        head_dir = os.path.join(args.out, "head")
        if not os.path.exists(head_dir):
            save_head(head, head_dir)
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
