"""Benchmark autoregressive decoding against chains and every tree strategy, in one process, on the same prompts.

    python -m infer.bench --json FILE [--ks 2 4 6] [--node-budgets 5 9 17] [--trees ...] [--temperatures 0 1] ...

Every method decodes the same --prompt-batches batches of --batch-size prompts (acceptance varies
a lot between prompts, so one prompt says little). Each batch is called once untimed (compile only
on the first) and timed as the median of --repeats calls; a method's tokens/s is all its tokens
over the sum of those medians, and its tau all emitted tokens over all target passes. Tree methods
run at every --node-budgets N (tokens the target scores per round), next to Chain(k = N - 1), so
methods are compared at equal verification cost (infer/methods.py). Next to the measured speedup
over AR (at the same temperature) each record gives the speedup predicted from measured costs,
tau * t_target(1) / (t_draft_round + t_target(N)), with t_draft_round the drafter's time per round
(catch-up and every drafting call) and t_target(N) one target pass over N tokens, and the ratio
achieved / theoretical, which shows how much verification and the loop's bookkeeping cost.
Writes a JSON list of records and prints a markdown table.
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
from infer.methods import TREE_METHODS, Method, chain_method, tree_method, tree_width
from infer.models import add_model_arguments, models_from_args, prompt_batches
from infer.timing import draft_round_seconds, forward_seconds, theoretical_round_speedup, time_calls

from jspec.sequoia import measure_acceptance
from jspec.verify import CHAIN_VERIFIERS

TABLE_COLUMNS = [
    ("method", "method", "{}"),
    ("nodes", "nodes", "{}"),
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
    parser.add_argument(
        "--node-budgets", type=int, nargs="*", default=[5, 9, 17],
        help="tree node budgets N, tokens scored per round; each also adds Chain(k=N-1) (default: 5 9 17)",
    )
    parser.add_argument(
        "--trees", nargs="*", choices=TREE_METHODS, default=list(TREE_METHODS),
        help="tree methods run at every node budget (default: all; see infer/methods.py)",
    )
    parser.add_argument(
        "--calibration-batches", type=int, default=2,
        help="extra prompt batches, not benchmarked, on which Sequoia's acceptance vector is measured (default: 2)",
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
    target: jspec.models.Transformer, drafter: jspec.models.Transformer, prompts: jax.Array, sizes: list[int], cache_size: int
) -> dict[str, float]:
    """Median seconds of t_target(1), t_draft (one drafter step) and t_target(n) for each n in sizes."""
    costs = {
        "t_target_1": forward_seconds(target, prompts, cache_size, 1),
        "t_draft": forward_seconds(drafter, prompts, cache_size, 1),
    }
    for n in sorted(set(sizes)):
        costs[f"t_target_{n}"] = forward_seconds(target, prompts, cache_size, n)
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
    method: Method | None, temperature: float, measured: Measured, ar_tokens_per_s: float | None,
    costs: dict[str, float], t_draft_round: float | None, context: dict,
) -> dict:
    """One JSON record; method None is the AR run itself (speedup 1 by definition)."""
    tokens_per_s = measured.tokens / measured.seconds
    tau = 1.0 if method is None else measured.tau
    speedup = 1.0 if ar_tokens_per_s is None else tokens_per_s / ar_tokens_per_s
    record = {
        "method": "ar" if method is None else method.name,
        "family": "ar" if method is None else method.family,
        "strategy": None if method is None else repr(method.strategy),
        "nodes": 1 if method is None else method.nodes,
        "k": None if method is None else method.k,
        "verifier": None if method is None else method.verifier,
        "temperature": temperature,
        "tau": tau,
        "tokens_per_s": tokens_per_s,
        "seconds": measured.seconds,
        "speedup_vs_ar": speedup,
        "target_passes": measured.passes / measured.rows,
        "t_target_1_ms": costs["t_target_1"] * 1e3,
        "t_draft_ms": costs["t_draft"] * 1e3,
        "t_verify_ms": None,
        "t_draft_round_ms": None,
        # AR is its own baseline: one target pass per token, no drafter.
        "theoretical_speedup": 1.0,
    }
    if method is not None:
        t_verify = costs[f"t_target_{method.nodes}"]
        record["t_verify_ms"] = t_verify * 1e3
        record["t_draft_round_ms"] = t_draft_round * 1e3
        record["theoretical_speedup"] = theoretical_round_speedup(tau, costs["t_target_1"], t_verify, t_draft_round)
    record["achieved_over_theoretical"] = speedup / record["theoretical_speedup"]
    return {**record, **context}


def markdown_table(records: list[dict]) -> str:
    header = "| " + " | ".join(name for name, _, _ in TABLE_COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    rows = ["| " + " | ".join(fmt.format(r[key]) for _, key, fmt in TABLE_COLUMNS) + " |" for r in records]
    return "\n".join([header, rule, *rows])


def sequoia_acceptance(target, drafter, batches, sampling, seed, max_new_tokens) -> Callable[[int], tuple[float, ...]]:
    """Sequoia's positional acceptance vector measured on calibration batches (`max_new_tokens`
    target-generated positions per row), per width (cached)."""
    cache: dict[int, tuple[float, ...]] = {}

    def acceptance(width: int) -> tuple[float, ...]:
        if width not in cache:
            vectors = [
                measure_acceptance(
                    target, drafter, prompts, width=width, sampling=sampling, rng=jax.random.key(seed + i),
                    max_new_tokens=max_new_tokens,
                )
                for i, prompts in enumerate(batches)
            ]
            cache[width] = tuple(float(x) for x in np.mean(vectors, axis=0))
            print(f"sequoia acceptance vector (T={sampling.temperature:g}, width {width}): "
                  + " ".join(f"{x:.3f}" for x in cache[width]))
        return cache[width]

    return acceptance


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, write --json and print the table. Returns the records."""
    parser = build_parser()
    args = parser.parse_args(argv)
    target, drafter, description = models_from_args(parser, args)
    for budget in args.node_budgets:
        try:
            tree_width(budget)
        except ValueError as error:
            parser.error(f"--node-budgets: {error}")
    n_calibration = args.calibration_batches if "sequoia" in args.trees and args.node_budgets else 0
    all_batches, prompts_description = prompt_batches(
        parser, args, target.config.vocab_size, args.prompt_batches + n_calibration
    )
    batches, calibration = all_batches[: args.prompt_batches], all_batches[args.prompt_batches :]
    rng = jax.random.key(args.seed)
    context = {
        "batch_size": args.batch_size,
        "prompt_batches": args.prompt_batches,
        "prompt_len": args.prompt_len,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "models": description,
        "prompts": prompts_description + (f" (the last {n_calibration} calibrate Sequoia only)" if n_calibration else ""),
        "machine": machine(),
    }
    print(description)
    print(context["prompts"])
    print(f"machine: {context['machine']}")

    chains = [chain_method(k, v) for v in args.verifiers for k in args.ks]
    chains += [chain_method(n - 1, "sampling") for n in args.node_budgets if n - 1 not in args.ks or "sampling" not in args.verifiers]
    sizes = [m.nodes for m in chains] + list(args.node_budgets)
    # The decode loop's cache size for the largest round, so attention spans as many slots as in decoding.
    cache_size = args.prompt_len + args.max_new_tokens + max(sizes) + 2
    costs = forward_costs(target, drafter, batches[0], sizes, cache_size)
    print("costs (median ms): " + ", ".join(f"{name} {seconds * 1e3:.2f}" for name, seconds in costs.items()))

    records = []
    for temperature in args.temperatures:
        sampling = jspec.Sampling(temperature=temperature)
        common = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, rng=rng)
        measured = measure(lambda prompts: jspec.generate(target, prompts, **common), batches, args.repeats)
        ar = make_record(None, temperature, measured, None, costs, None, context)
        records.append(ar)
        acceptance = sequoia_acceptance(target, drafter, calibration, sampling, args.seed, args.max_new_tokens) if n_calibration else None
        methods = [m for m in chains if not (m.verifier == "greedy" and not sampling.greedy)]  # greedy: T=0 only
        methods += [tree_method(name, n, acceptance) for n in args.node_budgets for name in args.trees]
        for method in methods:
            measured = measure(
                lambda prompts: jspec.speculative_generate(target, drafter, prompts, strategy=method.strategy, **common),
                batches, args.repeats,
            )
            t_draft_round = draft_round_seconds(method.strategy, drafter, batches[0], cache_size, sampling)
            record = make_record(method, temperature, measured, ar["tokens_per_s"], costs, t_draft_round, context)
            records.append(record)
            print(markdown_table([record]).splitlines()[-1], flush=True)
            # Each method's programs are used once: drop them, or the XLA:CPU code mappings of ~60
            # methods pass Linux's 65,530 maps per process and compilation aborts.
            jax.clear_caches()

    with open(args.json, "w") as f:
        json.dump(records, f, indent=2)
    print(markdown_table(records))
    print(f"wrote {len(records)} records to {args.json}")
    return records


if __name__ == "__main__":
    main()
