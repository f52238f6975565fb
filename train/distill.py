"""Distil a drafter towards a target with DistillSpec (divergence fkl | rkl | jsd | tvd).

    python -m train.distill --target runs/target/model --drafter runs/drafter/model \\
        --tokenizer runs/target/tokenizer.json --out runs/drafter-distilled --data drafter

Data: the corpus, target samples, the drafter's own samples (on-policy) or a per-step mix, all
prefixed by corpus prompts. Reports alpha = mean(1 - TV(p, q)) and tau (Chain(k) speculative
decoding) on held-out code at temperature 0 and 1, before and after. Checkpoints with Orbax into
OUT/checkpoints and resumes when re-run; writes OUT/model, OUT/tokenizer.json and OUT/summary.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from jspec.models import load, save
from jspec.training.corpus import STDLIB, read_corpus, split_corpus
from jspec.training.data import eval_batches, token_stream
from jspec.training.distill import DATA_SOURCES, DistillConfig, distill, measure_alpha, measure_tau
from jspec.training.divergences import DIVERGENCES
from jspec.training.loop import TrainConfig
from jspec.training.tokenizer import load_tokenizer, save_tokenizer


def build_parser() -> argparse.ArgumentParser:
    defaults, d = TrainConfig(learning_rate=3e-4, warmup_steps=50), DistillConfig()
    p = argparse.ArgumentParser(prog="python -m train.distill", description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True, help="target model directory (jspec.models.save)")
    p.add_argument("--drafter", required=True, help="initial drafter model directory")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json shared by both models")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--divergence", choices=DIVERGENCES, default=d.divergence)
    p.add_argument("--data", choices=DATA_SOURCES, default=d.data, help="where training sequences come from")
    p.add_argument("--temperature", type=float, default=d.temperature, help="of the divergence and of sampled data")
    p.add_argument("--prompt-len", type=int, default=d.prompt_len, help="corpus prefix of generated sequences")
    p.add_argument("--on-policy-fraction", type=float, default=d.on_policy_fraction, help="with --data mix")
    p.add_argument("--corpus", default=STDLIB)
    p.add_argument("--held-out-fraction", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--seq-len", type=int, default=defaults.seq_len)
    p.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    p.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    p.add_argument("--eval-every", type=int, default=defaults.eval_every)
    p.add_argument("--eval-batches", type=int, default=defaults.eval_batches)
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--k", type=int, default=4, help="draft length of the tau measurement")
    p.add_argument("--tau-prompts", type=int, default=16, help="held-out prompts of the tau measurement")
    p.add_argument("--tau-new-tokens", type=int, default=64, help="tokens generated per prompt for tau")
    p.add_argument("--stop-after", type=int, help="stop this run after N steps (resume with the same command)")
    p.add_argument("--no-progress", action="store_true")
    return p


def agreement(target, drafter, windows, prompts, args) -> dict[str, float]:
    """alpha and tau at temperatures 0 and 1 on held-out data."""
    out = {}
    for t in (0.0, 1.0):
        out[f"alpha_t{t:g}"] = measure_alpha(target, drafter, windows, t)
        out[f"tau_t{t:g}"] = measure_tau(
            target, drafter, prompts, k=args.k, temperature=t, max_new_tokens=args.tau_new_tokens, seed=args.seed
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    target, drafter, tokenizer = load(args.target), load(args.drafter), load_tokenizer(args.tokenizer)
    save_tokenizer(tokenizer, os.path.join(args.out, "tokenizer.json"))
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        checkpoint_every=args.checkpoint_every,
    )
    distill_config = DistillConfig(
        divergence=args.divergence,
        data=args.data,
        temperature=args.temperature,
        prompt_len=args.prompt_len,
        on_policy_fraction=args.on_policy_fraction,
    )
    train_docs, held_docs = split_corpus(read_corpus(args.corpus), args.held_out_fraction, seed=0)
    train_stream, held_stream = token_stream(train_docs, tokenizer), token_stream(held_docs, tokenizer)
    windows = [w[:, : config.seq_len] for w in eval_batches(held_stream, config.batch_size, config.seq_len, config.eval_batches)]
    prompt_windows = eval_batches(held_stream[len(held_stream) // 2 :], args.tau_prompts, args.prompt_len, 1)
    prompts = prompt_windows[0][:, : args.prompt_len]

    before = agreement(target, drafter, windows, prompts, args)
    print("before: " + ", ".join(f"{k} {v:.4f}" for k, v in before.items()))
    metadata = {
        "train_config": dataclasses.asdict(config),
        "distill_config": dataclasses.asdict(distill_config),
        "target": args.target,
        "drafter": args.drafter,
        "corpus": args.corpus,
    }
    start = time.perf_counter()
    trained, history = distill(
        target,
        drafter,
        train_stream,
        windows,
        config,
        distill_config,
        os.path.join(args.out, "checkpoints"),
        metadata=metadata,
        stop_after=args.stop_after,
        progress=not args.no_progress,
    )
    summary = {**metadata, "before": before, "history": history, "seconds_this_run": time.perf_counter() - start}
    if history and history[-1]["step"] == config.steps:
        summary["after"] = agreement(target, trained, windows, prompts, args)
        print("after:  " + ", ".join(f"{k} {v:.4f}" for k, v in summary["after"].items()))
        if not os.path.exists(os.path.join(args.out, "model")):
            save(trained, os.path.join(args.out, "model"))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
