"""Self-distillation data: a chat target answers generated instructions; its distributions are kept.

    python -m train.chat_data --target smollm2-135m --out runs/smollm2/data/train --split train --n 3200

Instructions come from `jspec.training.chat_prompts` (seed-list templates, stdlib docstrings and
code of the chosen split, arithmetic problems; never Spec-Bench). Each is rendered with the
target's chat template; the target answers it (a `--greedy-fraction` of them greedily, the rest
sampled at temperature 1) and at every answer position its top-K next-token log-probabilities are
recorded (`jspec.training.self_distill.generate_with_top_k`). Shards of `--batch-size` examples are
written atomically; re-running the command skips finished shards, so an interrupted job resumes.
With `--exclude-train N`, instructions that are among the first N training instructions (same seed)
are skipped: a held-out set disjoint from the training set even where templates repeat.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import time

import jax
import numpy as np

from jspec.sampling import Sampling
from jspec.training.chat_prompts import chat_instructions
from jspec.training.self_distill import generate_with_top_k
from jspec.training.shards import write_shard


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.chat_data", description=__doc__.split("\n")[0])
    p.add_argument("--target", default="smollm2-135m", help="smollm2-135m or a .gguf file (default: smollm2-135m)")
    p.add_argument("--out", required=True, help="shard directory")
    p.add_argument("--split", choices=("train", "held_out"), default="train", help="stdlib split the passages come from")
    p.add_argument("--n", type=int, default=3200, help="instructions (default: 3200)")
    p.add_argument("--exclude-train", type=int, default=0, help="skip the first N training instructions (default: 0)")
    p.add_argument("--max-prompt-tokens", type=int, default=384, help="skip longer rendered prompts (default: 384)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default: 256)")
    p.add_argument("--greedy-fraction", type=float, default=0.6, help="share answered greedily (default: 0.6)")
    p.add_argument("--top-k", type=int, default=32, help="target log-probabilities kept per position (default: 32)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation call and shard (default: 16)")
    p.add_argument("--bucket", type=int, default=64, help="prompt widths are padded to a multiple of this (default: 64)")
    p.add_argument(
        "--shard-range",
        default=None,
        metavar="A:B",
        help="write only shards A..B-1 of the plan (parallel jobs, or a subset; default: all)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def load_chat_target(name: str):
    """(model, ChatTokenizer) for "smollm2-135m" or a GGUF file."""
    from jspec import demo
    from jspec.models.gguf import from_gguf
    from jspec.models.gguf_tokenizer import gguf_tokenizer

    if name == "smollm2-135m":
        return demo.load("smollm2-135m"), demo.tokenizer("smollm2-135m")
    return from_gguf(name), gguf_tokenizer(name)


def plan_batches(items: list[dict], batch_size: int, greedy_fraction: float, seed: int) -> list[dict]:
    """Batches `{"sampling": "greedy"|"t1", "items": [...]}`: items shuffled, the first
    greedy_fraction answered greedily, each group sorted by prompt length (less padding)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_greedy = round(greedy_fraction * len(items))
    batches = []
    for mode, chosen in (("greedy", order[:n_greedy]), ("t1", order[n_greedy:])):
        chosen = sorted(chosen, key=lambda i: (len(items[i]["ids"]), i))
        for start in range(0, len(chosen), batch_size):
            batches.append({"sampling": mode, "items": [items[i] for i in chosen[start : start + batch_size]]})
    return batches


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out = pathlib.Path(args.out)
    model, tokenizer = load_chat_target(args.target)
    excluded = set()
    if args.exclude_train:
        excluded = {i["text"] for i in chat_instructions("train", args.exclude_train, seed=args.seed)}
    instructions = [i for i in chat_instructions(args.split, args.n, seed=args.seed) if i["text"] not in excluded]
    items = []
    for i, inst in enumerate(instructions):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": inst["text"]}])
        if len(ids) <= args.max_prompt_tokens:
            items.append({**inst, "index": i, "ids": ids})
    batches = plan_batches(items, args.batch_size, args.greedy_fraction, args.seed)
    print(f"{len(items)} instructions ({len(instructions) - len(items)} skipped as too long), {len(batches)} shards -> {out}")
    first, last = 0, len(batches)
    if args.shard_range:
        first, last = (int(x) for x in args.shard_range.split(":"))
    total_tokens, started = 0, time.perf_counter()
    for b, batch in enumerate(batches):
        path = out / f"shard-{b:05d}.npz"
        if path.exists() or not first <= b < last:
            continue
        rows = batch["items"]
        width = -(-max(len(r["ids"]) for r in rows) // args.bucket) * args.bucket
        prompts = np.zeros((args.batch_size, width), np.int32)  # a full batch always: one program per width
        lengths = np.ones((args.batch_size,), np.int32)
        for i, r in enumerate(rows):
            prompts[i, : len(r["ids"])] = r["ids"]
            lengths[i] = len(r["ids"])
        sampling = Sampling() if batch["sampling"] == "greedy" else Sampling(temperature=1.0)
        examples = generate_with_top_k(
            model, prompts, lengths, max_new_tokens=args.max_new_tokens, sampling=sampling, top_k=args.top_k,
            eos_id=tokenizer.eos_id, rng=jax.random.key(args.seed * 1_000_003 + b),
        )[: len(rows)]  # fmt: skip
        meta = [{"category": r["category"], "text": r["text"], "index": r["index"], "sampling": batch["sampling"]} for r in rows]
        write_shard(path, examples, meta)
        total_tokens += sum(len(e["answer"]) for e in examples)
        rate = total_tokens / (time.perf_counter() - started)
        print(
            f"shard {b + 1}/{len(batches)}: width {width}, {batch['sampling']}, {total_tokens} answer tokens, "
            f"{rate:.0f} tokens/s",
            flush=True,
        )
    if (first, last) == (0, len(batches)):  # the whole plan is written
        with open(out / "summary.json.partial", "w") as f:
            json.dump({"args": vars(args), "instructions": len(items), "shards": len(batches)}, f, indent=2)
        (out / "summary.json.partial").replace(out / "summary.json")


if __name__ == "__main__":
    main()
