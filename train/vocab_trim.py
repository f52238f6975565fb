"""Trim a drafter's output head to the K most frequent tokens (VocabTrim).

    python -m train.vocab_trim --target runs/target/model --drafter runs/drafter-distilled/model \\
        --tokenizer runs/target/tokenizer.json --out runs/drafter-trimmed --keep 2048

Counts token frequencies on the target's own generations from held-out prompts (default) or on the
training corpus, keeps the K most frequent (plus EOS), and writes the trimmed drafter to OUT/model
with its token map. Reports, for the untrimmed and the trimmed drafter in the same run: alpha, tau,
the memory-bound speedup MBSU and measured tokens/s of speculative decoding (compile excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

import jspec
from jspec.models import load, save
from jspec.sampling import Sampling
from jspec.training.corpus import STDLIB, read_corpus, split_corpus
from jspec.training.data import batch_at, eval_batches, token_stream
from jspec.training.distill import measure_alpha, measure_tau
from jspec.training.tokenizer import eos_id, load_tokenizer, save_tokenizer
from jspec.training.vocab_trim import (
    memory_bound_speedup,
    most_frequent,
    target_generation_counts,
    token_counts,
    trim_drafter,
    weights_read_per_token,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.vocab_trim", description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True)
    p.add_argument("--drafter", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--keep", type=int, required=True, help="K, tokens the trimmed head keeps")
    p.add_argument("--count-on", choices=["target", "corpus"], default="target", help="where frequencies are counted")
    p.add_argument("--count-prompts", type=int, default=64, help="prompts the target generates from (count-on target)")
    p.add_argument("--count-new-tokens", type=int, default=128, help="tokens generated per prompt for counting")
    p.add_argument("--count-temperature", type=float, default=1.0)
    p.add_argument("--corpus", default=STDLIB)
    p.add_argument("--held-out-fraction", type=float, default=0.05)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--k", type=int, default=4, help="draft length of the tau / speed measurement")
    p.add_argument("--eval-prompts", type=int, default=16)
    p.add_argument("--eval-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _tokens_per_s(target, drafter, prompts, args, sampling) -> float:
    call = lambda: jspec.speculative_generate(
        target,
        drafter,
        prompts,
        max_new_tokens=args.eval_new_tokens,
        strategy=jspec.Chain(k=args.k),
        sampling=sampling,
        rng=jax.random.key(args.seed),
    )
    out = jax.block_until_ready(call())  # compile
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return float(np.sum(out.lengths)) / statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    target, drafter, tokenizer = load(args.target), load(args.drafter), load_tokenizer(args.tokenizer)
    save_tokenizer(tokenizer, os.path.join(args.out, "tokenizer.json"))
    train_docs, held_docs = split_corpus(read_corpus(args.corpus), args.held_out_fraction, seed=0)
    train_stream, held_stream = token_stream(train_docs, tokenizer), token_stream(held_docs, tokenizer)
    vocab = target.config.vocab_size

    if args.count_on == "target":
        prompts = batch_at(train_stream, 0, args.count_prompts, args.prompt_len, args.seed)[:, : args.prompt_len]
        counts = target_generation_counts(
            target,
            prompts,
            max_new_tokens=args.count_new_tokens,
            sampling=Sampling(args.count_temperature),
            rng=jax.random.key(args.seed),
        )
    else:
        counts = token_counts(train_stream, vocab)
    keep = most_frequent(counts, args.keep, always_keep=(eos_id(tokenizer),))
    trimmed = trim_drafter(drafter, keep)
    coverage = float(counts[keep].sum() / max(counts.sum(), 1))
    print(f"kept {args.keep} of {vocab} tokens, covering {coverage:.1%} of the counted ({args.count_on}) tokens")

    windows = [w[:, :-1] for w in eval_batches(held_stream, 8, 128, 4)]
    eval_prompts = eval_batches(held_stream[len(held_stream) // 2 :], args.eval_prompts, args.prompt_len, 1)[0][
        :, : args.prompt_len
    ]
    report = {"keep": args.keep, "count_on": args.count_on, "coverage": coverage, "vocab_size": vocab}
    for name, model in (("untrimmed", drafter), ("trimmed", trimmed)):
        row = {"weights_read_per_token": weights_read_per_token(model)}
        for t in (0.0, 1.0):
            tau = measure_tau(
                target, model, eval_prompts, k=args.k, temperature=t, max_new_tokens=args.eval_new_tokens, seed=args.seed
            )
            row[f"alpha_t{t:g}"] = measure_alpha(target, model, windows, t)
            row[f"tau_t{t:g}"] = tau
            row[f"mbsu_t{t:g}"] = memory_bound_speedup(tau, args.k, model, target)
            row[f"tokens_per_s_t{t:g}"] = _tokens_per_s(target, model, eval_prompts, args, Sampling(t))
        report[name] = row
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
    for t in ("t0", "t1"):
        report[f"speedup_vs_untrimmed_{t}"] = report["trimmed"][f"tokens_per_s_{t}"] / report["untrimmed"][f"tokens_per_s_{t}"]
    print(
        f"measured speedup of the trimmed drafter over the untrimmed one: "
        f"{report['speedup_vs_untrimmed_t0']:.3f}x (T=0), {report['speedup_vs_untrimmed_t1']:.3f}x (T=1)"
    )
    if not os.path.exists(os.path.join(args.out, "model")):
        save(trimmed, os.path.join(args.out, "model"))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
