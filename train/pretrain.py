"""Pretrain a jspec Transformer on a text corpus (default: the Python standard library's source).

    python -m train.pretrain --preset target-16m --out runs/target --steps 4000

Trains (or loads) a byte-level BPE tokenizer, splits the corpus into train and held-out by file,
runs AdamW with warmup and cosine decay, prints held-out loss and perplexity, and checkpoints with
Orbax into OUT/checkpoints. Re-running the same command resumes from the latest checkpoint and ends
with the same parameters as an uninterrupted run. The final model is written to OUT/model
(`jspec.models.load`) with OUT/tokenizer.json and OUT/summary.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from flax import nnx

from jspec.models import PRESETS, Transformer, preset, save
from jspec.training.corpus import STDLIB, read_corpus, split_corpus
from jspec.training.data import token_stream
from jspec.training.pretrain import TrainConfig, train
from jspec.training.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m train.pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="run directory: checkpoints, final model, tokenizer, summary")
    p.add_argument("--preset", choices=sorted(PRESETS), default="target-16m", help="model configuration")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype (params stay float32)")
    p.add_argument("--corpus", default=STDLIB, help="'stdlib', a folder of text files, or a .jsonl of {'text': ...}")
    p.add_argument("--held-out-fraction", type=float, default=0.05, help="share of files held out (by file)")
    p.add_argument("--tokenizer", help="tokenizer.json to use; default: OUT/tokenizer.json, trained if missing")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--seq-len", type=int, default=defaults.seq_len)
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    p.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--grad-clip", type=float, default=defaults.grad_clip)
    p.add_argument("--eval-every", type=int, default=defaults.eval_every)
    p.add_argument("--eval-batches", type=int, default=defaults.eval_batches)
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    p.add_argument("--seed", type=int, default=defaults.seed, help="seeds the initialisation and the batches")
    p.add_argument("--stop-after", type=int, help="stop this run after N steps (resume later with the same command)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    config = dataclasses.replace(preset(args.preset), dtype=args.dtype)
    train_config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        seed=args.seed,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        checkpoint_every=args.checkpoint_every,
    )
    if args.seq_len > config.max_seq_len:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the preset's max_seq_len {config.max_seq_len}")

    train_docs, held_docs = split_corpus(read_corpus(args.corpus), args.held_out_fraction, seed=0)
    tokenizer_path = args.tokenizer or os.path.join(args.out, "tokenizer.json")
    if os.path.exists(tokenizer_path):
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        start = time.perf_counter()
        tokenizer = train_tokenizer((d.text for d in train_docs), vocab_size=config.vocab_size)
        save_tokenizer(tokenizer, tokenizer_path)
        print(f"trained a {config.vocab_size}-token BPE tokenizer in {time.perf_counter() - start:.0f} s: {tokenizer_path}")
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.get_vocab_size()} tokens but preset {args.preset!r} has vocab_size {config.vocab_size}"
        )
    if args.tokenizer and os.path.abspath(tokenizer_path) != os.path.abspath(os.path.join(args.out, "tokenizer.json")):
        save_tokenizer(tokenizer, os.path.join(args.out, "tokenizer.json"))
    train_stream = token_stream(train_docs, tokenizer)
    held_stream = token_stream(held_docs, tokenizer)
    print(
        f"corpus {args.corpus}: {len(train_docs)} train files ({len(train_stream)} tokens), "
        f"{len(held_docs)} held-out files ({len(held_stream)} tokens)"
    )

    model = Transformer(config, rngs=nnx.Rngs(args.seed))
    metadata = {"model_config": config.to_dict(), "train_config": dataclasses.asdict(train_config), "corpus": args.corpus}
    start = time.perf_counter()
    model, history = train(
        model,
        train_stream,
        held_stream,
        train_config,
        os.path.join(args.out, "checkpoints"),
        metadata=metadata,
        stop_after=args.stop_after,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    summary = {
        **metadata,
        "history": history,
        "tokens_per_step": train_config.batch_size * train_config.seq_len,
        "seconds_this_run": seconds,
    }
    finished = bool(history) and history[-1]["step"] == train_config.steps
    if finished:
        model_dir = os.path.join(args.out, "model")
        if not os.path.exists(model_dir):
            save(model, model_dir)
        print(
            f"final held-out loss {history[-1]['held_out_loss']:.4f} (ppl {history[-1]['held_out_ppl']:.2f}); model: {model_dir}"
        )
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
