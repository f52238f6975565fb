"""Benchmark autoregressive decoding against every chain strategy, in one process, on the same prompts.

    python -m infer.bench --json FILE [--ks 2 4 6] [--verifiers sampling block] [--temperatures 0 1] ...

Every method decodes the same --prompt-batches batches of --batch-size prompts (acceptance varies
a lot between prompts, so one prompt says little). Each batch is called once untimed (compile only
on the first) and timed as the median of --repeats calls; a method's tokens/s is all its tokens
over the sum of those medians, and its tau all emitted tokens over all target passes. Next to
the measured speedup over AR (at the same temperature) each record gives the speedup predicted
from measured per-pass costs, tau * t_target(1) / (k * t_draft + t_target(k+1)), and the ratio
achieved / theoretical, which shows how much the decode loop's overheads cost. Writes a JSON list
of records and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
from typing import Callable

import jax
import numpy as np

import jspec
from infer.models import add_model_arguments, models_from_args, prompt_batches
from infer.timing import forward_seconds, theoretical_speedup, time_calls
from jspec.verify import CHAIN_VERIFIERS

TABLE_COLUMNS = [
    ("method", "method", "{}"),
    ("T", "temperature", "{:g}"),
    ("tau", "tau", "{:.2f}"),
    ("tokens/s", "tokens_per_s", "{:.1f}"),
    ("speedup vs AR", "speedup_vs_ar", "{:.2f}x"),
    ("target passes", "target_passes", "{:.1f}"),
    ("theoretical", "theoretical_speedup", "{:.2f}x"),
    ("achieved/theoretical", "achieved_over_theoretical", "{:.2f}"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m infer.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, metavar="FILE", help="where to write the records (a JSON list)")
    add_model_arguments(parser)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6], help="draft lengths k (default: 2 4 6)")
    parser.add_argument(
        "--verifiers", nargs="+", choices=sorted(CHAIN_VERIFIERS), default=["sampling", "block"],
        help="chain verifiers (default: sampling block); greedy runs at temperature 0 only",
    )
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0], help="sampling temperatures (default: 0 1)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per row (default: 128)")
    parser.add_argument("--prompt-batches", type=int, default=8, help="prompt batches every method decodes (default: 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per batch, after an untimed one (default: 3)")
    return parser


def machine() -> str:
    """The processor and the JAX devices the timings come from."""
    processor = platform.processor() or platform.machine()
    return f"{processor}, {os.cpu_count()} CPU cores; jax {jax.__version__} devices: {jax.devices()}"


def forward_costs(
    target: jspec.models.Transformer, drafter: jspec.models.Transformer, prompts: jax.Array, ks: list[int], cache_size: int
) -> dict[str, float]:
    """Median seconds of t_target(1), t_draft (one drafter step) and t_target(k+1) for each k."""
    costs = {
        "t_target_1": forward_seconds(target, prompts, cache_size, 1),
        "t_draft": forward_seconds(drafter, prompts, cache_size, 1),
    }
    for k in ks:
        costs[f"t_target_{k + 1}"] = forward_seconds(target, prompts, cache_size, k + 1)
    return costs


@dataclasses.dataclass(frozen=True)
class Measured:
    """One method over all prompt batches: summed median seconds, tokens, emitted tokens and target passes."""

    seconds: float
    tokens: int
    emitted: int
    passes: int
    rows: int

    @property
    def tau(self) -> float:
        return self.emitted / max(self.passes, 1)


def measure(fn: Callable[[jax.Array], jspec.Output], batches: list[jax.Array], repeats: int) -> Measured:
    """fn(prompts) on every batch: an untimed call, then the median of `repeats` timed calls each."""
    seconds = tokens = emitted = passes = rows = 0
    for prompts in batches:
        times, output = time_calls(lambda: fn(prompts), repeats)
        seconds += statistics.median(times)
        tokens += int(np.sum(output.lengths))
        emitted += int(np.sum(output.stats.emitted_per_round))
        passes += int(np.sum(output.stats.target_passes))
        rows += prompts.shape[0]
    return Measured(seconds, tokens, emitted, passes, rows)


def make_record(
    method: str, k: int | None, verifier: str | None, temperature: float, measured: Measured,
    ar_tokens_per_s: float | None, costs: dict[str, float], context: dict,
) -> dict:
    """One JSON record. ar_tokens_per_s None marks the AR run itself (speedup 1 by definition)."""
    tokens_per_s = measured.tokens / measured.seconds
    tau = 1.0 if k is None else measured.tau
    speedup = 1.0 if ar_tokens_per_s is None else tokens_per_s / ar_tokens_per_s
    record = {
        "method": method,
        "k": k,
        "verifier": verifier,
        "temperature": temperature,
        "tau": tau,
        "tokens_per_s": tokens_per_s,
        "seconds": measured.seconds,
        "speedup_vs_ar": speedup,
        "target_passes": measured.passes / measured.rows,
        "t_target_1_ms": costs["t_target_1"] * 1e3,
        "t_draft_ms": costs["t_draft"] * 1e3,
        "t_target_k1_ms": None,
        # AR is its own baseline: one target pass per token, no drafter.
        "theoretical_speedup": 1.0,
    }
    if k is not None:
        t_k1 = costs[f"t_target_{k + 1}"]
        record["t_target_k1_ms"] = t_k1 * 1e3
        record["theoretical_speedup"] = theoretical_speedup(tau, k, costs["t_target_1"], t_k1, costs["t_draft"])
    record["achieved_over_theoretical"] = speedup / record["theoretical_speedup"]
    return {**record, **context}


def markdown_table(records: list[dict]) -> str:
    header = "| " + " | ".join(name for name, _, _ in TABLE_COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    rows = ["| " + " | ".join(fmt.format(r[key]) for _, key, fmt in TABLE_COLUMNS) + " |" for r in records]
    return "\n".join([header, rule, *rows])


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, write --json and print the table. Returns the records."""
    parser = build_parser()
    args = parser.parse_args(argv)
    target, drafter, description = models_from_args(parser, args)
    batches, prompts_description = prompt_batches(parser, args, target.config.vocab_size, args.prompt_batches)
    rng = jax.random.key(args.seed)
    context = {
        "batch_size": args.batch_size,
        "prompt_batches": args.prompt_batches,
        "prompt_len": args.prompt_len,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "models": description,
        "prompts": prompts_description,
        "machine": machine(),
    }
    print(description)
    print(prompts_description)
    print(f"machine: {context['machine']}")

    # The decode loop's cache size for the largest k, so attention spans as many slots as in decoding.
    costs = forward_costs(target, drafter, batches[0], args.ks, args.prompt_len + args.max_new_tokens + max(args.ks) + 2)
    print("costs (median ms): " + ", ".join(f"{name} {seconds * 1e3:.2f}" for name, seconds in costs.items()))

    records = []
    for temperature in args.temperatures:
        sampling = jspec.Sampling(temperature=temperature)
        common = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, rng=rng)
        measured = measure(lambda prompts: jspec.generate(target, prompts, **common), batches, args.repeats)
        ar = make_record("ar", None, None, temperature, measured, None, costs, context)
        records.append(ar)
        for verifier in args.verifiers:
            if verifier == "greedy" and not sampling.greedy:
                continue  # not lossless when sampling; jspec rejects it
            for k in args.ks:
                strategy = jspec.Chain(k=k, verifier=verifier)
                measured = measure(
                    lambda prompts: jspec.speculative_generate(target, drafter, prompts, strategy=strategy, **common),
                    batches, args.repeats,
                )
                records.append(make_record(
                    f"chain-{verifier}-k{k}", k, verifier, temperature, measured, ar["tokens_per_s"], costs, context
                ))

    with open(args.json, "w") as f:
        json.dump(records, f, indent=2)
    print(markdown_table(records))
    print(f"wrote {len(records)} records to {args.json}")
    return records


if __name__ == "__main__":
    main()
