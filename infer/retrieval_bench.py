"""Benchmark retrieval drafting and adaptive speculation length against the best fixed chain and
tree, in one process, on Spec-Bench's prompts by category.

    python -m infer.retrieval_bench --json FILE [--datastore DIR] [--temperatures 0 1] [--per-category 1]
        [--categories summarization rag] [--methods pld-k4 ...]

Methods (SmolLM2-135M-Instruct and its bundled drafter by default; `infer/methods.py`'s naming):

    chain-k1..k4    Chain(k=1) .. Chain(k=4): fixed lengths (k=1 the best in docs/benchmarks.md's 2026-12-07 run)
    eagle-n5        EagleTree(top_k=2, depth=2, size=5): the best fixed tree there
    pld-k2..k8      PromptLookup(k=2), (k=3), (k=4), (k=8): no model
    pld-k4+drafter  PromptLookup(k=4) falling back on the drafter where the lookup finds nothing
    rest-n8         Rest(size=8, depth=4) on the --datastore (python -m train.datastore --stdlib)
    rasd-n5+r6      RASD: the eagle-n5 tree fused with a prompt-lookup trie of 6 nodes
    rasd-n5+r6+ds   the same with a REST trie of 6 more nodes from the --datastore
    stop-k4         Chain(k=4, stop=ConfidenceStop(0.3)): SpecDec++-style confidence stop
    adaptive-k4     AdaptiveK from the measured costs (t_draft, t_target(1..5)), k in 1..4
    smartspec-k4    SmartSpec from the same costs: one k for the batch, k = 0 (plain decoding) included

Each prompt is decoded once untimed by every method (compiling its shape), then timed --repeats
times (median), the methods in turn on each prompt (`infer.bench.measure_interleaved`: a machine
whose speed drifts slows every method alike); a method's tokens/s is all its tokens over the sum of
those medians. tau: emitted tokens per target pass; target passes per prompt (rounds) show the
rounds an adaptive method saves or spends, and AdaptiveK's and SmartSpec's records hold
`rounds_per_k`, the rounds they ran at each k (the k their cost model chose; {"k": rounds}).
Speedup is against AR at the same temperature, in the same run.

Both are reported end to end (the prompt's prefill included, as a user waits for it) and for the
decoding alone: the target's prefill of each prompt, timed on its own (median of --repeats after a
compiling call), is subtracted from every method's time. On a CPU a long prompt's prefill costs as
much as dozens of decoding steps and is the same for every method, so it dilutes every speedup;
the drafter's own prefill stays in a speculative method's decoding time.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import numpy as np
from flax import nnx

import jspec
from infer.bench import (
    Batch,
    LastOutputs,
    category_records,
    jsonl_batches,
    machine,
    measure_interleaved,
    total,
    typical_prompts,
)
from infer.models import add_model_arguments, models_from_args
from infer.spec_bench import default_spec_bench
from infer.timing import forward_seconds
from jspec.decode import bucket_size, prefill
from jspec.retrieval import Retrieval, load_datastore


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m infer.retrieval_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, metavar="FILE")
    add_model_arguments(parser)
    parser.add_argument("--datastore", metavar="DIR", help="a REST datastore (python -m train.datastore); none: no rest rows")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--per-category", type=int, default=1, help="Spec-Bench prompts per category (default: 1)")
    parser.add_argument("--categories", nargs="+", default=None, help="only these Spec-Bench categories (default: all)")
    parser.add_argument("--prompts-jsonl", metavar="FILE", default=None)
    parser.add_argument(
        "--min-prompt-width",
        type=int,
        default=None,
        metavar="N",
        help="pad chat prompts to at least N tokens (default 64): fewer prompt shapes, so fewer programs to compile, "
        "at the price of padding in every prefill",
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per prompt (default: 1)")
    parser.add_argument("--methods", nargs="*", default=None, help="a subset of the method names (default: all)")
    return parser


def methods(drafter, retrieval, costs: dict[str, float]) -> list[tuple[str, object, object]]:
    """(name, strategy, drafter argument) of every method; rest and rasd+ds only with a datastore."""
    t_target = [costs[f"t_target_{n}"] for n in range(1, 6)]
    out = [
        *((f"chain-k{k}", jspec.Chain(k=k), drafter) for k in (1, 2, 3, 4)),
        ("eagle-n5", jspec.EagleTree(top_k=2, depth=2, size=5), drafter),
        *((f"pld-k{k}", jspec.PromptLookup(k=k), None) for k in (2, 3, 4, 8)),
        ("pld-k4+drafter", jspec.PromptLookup(k=4), drafter),
    ]
    if retrieval is not None:
        out.append(("rest-n8", jspec.Rest(size=8, depth=4), retrieval))
    rasd = dict(top_k=2, depth=2, size=5, retrieval_size=6, retrieval_depth=6)
    out.append(("rasd-n5+r6", jspec.RASD(**rasd), drafter))
    if retrieval is not None:
        out.append(("rasd-n5+r6+ds", jspec.RASD(**rasd, use_datastore=True), Retrieval(retrieval.datastore, drafter)))
    out += [
        ("stop-k4", jspec.Chain(k=4, stop=jspec.ConfidenceStop(0.3)), drafter),
        ("adaptive-k4", jspec.AdaptiveK.from_costs(costs["t_draft"], t_target, k_max=4), drafter),
        ("smartspec-k4", jspec.SmartSpec.from_costs(costs["t_draft"], t_target, k_max=4), drafter),
    ]
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    target, drafter, description = models_from_args(parser, args)
    args.prompts_jsonl = args.prompts_jsonl or default_spec_bench()
    if args.prompts_jsonl is None:
        parser.error("needs --prompts-jsonl (Spec-Bench's question.jsonl; or set $JSPEC_SPEC_BENCH)")
    if args.min_prompt_width is not None and args.min_prompt_width < 1:
        parser.error(f"--min-prompt-width must be >= 1, got {args.min_prompt_width}")
    batches, prompts_description = jsonl_batches(parser, args, target.config.vocab_size)
    retrieval = None
    if args.datastore:
        datastore = jax.device_put(load_datastore(args.datastore))
        retrieval = Retrieval(datastore)
        print(f"datastore: {args.datastore}, {datastore.corpus.shape[0]} tokens")
    eos_id = target_eos(args)
    typical = typical_prompts(batches)
    cache_size = bucket_size(typical.shape[1]) + bucket_size(args.max_new_tokens) + 32
    costs = {f"t_target_{n}": forward_seconds(target, typical, cache_size, n, passes=16, runs=5) for n in (1, 2, 3, 4, 5, 8, 10)}
    costs["t_draft"] = forward_seconds(drafter, typical, cache_size, 1, passes=16, runs=5)
    print("costs (median ms): " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in costs.items()))
    context = {"target": description, "machine": machine(), "prompts": prompts_description, "max_new_tokens": args.max_new_tokens}
    records = []
    prefills = None
    started = time.time()
    for temperature in args.temperatures:
        sampling = jspec.Sampling(temperature=temperature)
        common = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, rng=jax.random.key(args.seed), eos_id=eos_id)
        chosen = [m for m in methods(drafter, retrieval, costs) if not args.methods or m[0] in args.methods]
        fns = {"ar": functools.partial(_autoregressive, target, common)}
        for name, strategy, drafter_arg in chosen:
            fns[name] = LastOutputs(functools.partial(_speculative, target, drafter_arg, strategy, common))
        if prefills is None:
            prefills = prefill_seconds(target, batches, args.max_new_tokens, args.repeats)
            print("prefill (s, by category): " + ", ".join(f"{c} {t:.2f}" for c, t in prefills.items()), flush=True)
        measured = measure_interleaved(fns, batches, args.repeats, progress=lambda m: print(m, flush=True))
        ar = measured["ar"]
        ar_total = total(ar)
        ar_rate = ar_total.tokens / ar_total.seconds
        records.append(record("ar", temperature, ar, None, ar_rate, costs, context, prefills))
        save(args.json, records)
        for name, strategy, _ in chosen:
            context_ = {**context, "strategy": repr(strategy)}
            records.append(record(name, temperature, measured[name], ar, ar_rate, costs, context_, prefills))
            if (chosen_k := rounds_per_k(strategy, fns[name].outputs)) is not None:
                records[-1]["rounds_per_k"] = chosen_k
            save(args.json, records)
        jax.clear_caches()
    print_summary(records, started)
    return records


def rounds_per_k(strategy, outputs: list[jspec.Output]) -> dict[str, int] | None:
    """An adaptive strategy's rounds at each k it chose, summed over the outputs' rows, as
    {"k": rounds}: AdaptiveK's k = 1 .. k_max (`Output.stats.strategy["rounds_per_k"]`, `[B, k_max]`),
    SmartSpec's k = 0 .. k_max (`Output.stats.strategy`, `[k_max + 1]`, rounds of the batch); None
    for a strategy that does not count them."""
    if isinstance(strategy, jspec.AdaptiveK):
        counts, first = [np.asarray(out.stats.strategy["rounds_per_k"]).sum(axis=0) for out in outputs], 1
    elif isinstance(strategy, jspec.SmartSpec):
        counts, first = [np.asarray(out.stats.strategy) for out in outputs], 0
    else:
        return None
    return {str(first + k): int(n) for k, n in enumerate(sum(counts))} if counts else None


def _autoregressive(target, common: dict, batch: Batch) -> jspec.Output:
    return jspec.generate(target, batch.prompts, prompt_lengths=batch.lengths, **common)


def _speculative(target, drafter, strategy, common: dict, batch: Batch) -> jspec.Output:
    return jspec.speculative_generate(target, drafter, batch.prompts, prompt_lengths=batch.lengths, strategy=strategy, **common)


def print_summary(records: list[dict], started: float) -> None:
    """The run's time and its speedup tables, end to end and for the decoding alone."""
    print(f"total {time.time() - started:.0f} s")
    print(category_table(records))
    print("decoding alone (prefill excluded):")
    print(category_table(records, "decode_speedup_vs_ar"))


@functools.partial(jax.jit, static_argnames=("graph", "cache_size"))
def _prefill(graph, state, prompts: jax.Array, lengths: jax.Array, cache_size: int):
    return prefill(nnx.merge(graph, state), prompts, lengths, cache_size)


def prefill_seconds(target, batches, max_new_tokens: int, repeats: int) -> dict[str, float]:
    """Seconds the target's prefill of each category's prompts takes (the sum over its batches of
    the median of `repeats` timed calls after a compiling one), in the cache shape AR decodes with."""
    graph, state = nnx.split(target)
    out: dict[str, float] = {}
    for batch in batches:
        width = bucket_size(batch.prompts.shape[1])
        prompts = jax.numpy.pad(batch.prompts, ((0, 0), (0, width - batch.prompts.shape[1])))
        call = lambda: _prefill(graph, state, prompts, batch.lengths, width + bucket_size(max_new_tokens) + 1)  # noqa: E731
        jax.block_until_ready(call())
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(call())
            times.append(time.perf_counter() - start)
        out[batch.category] = out.get(batch.category, 0.0) + statistics.median(times)
    return out


def save(path: str, records: list[dict]) -> None:
    """Write the records so far (a long run keeps what it measured) and print the newest."""
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    print_row(records[-1])


def target_eos(args):
    from infer.models import chat_tokenizer

    chat = chat_tokenizer(args)
    return None if chat is None else chat.eos_id


def decode_rate(by_category: dict, prefills: dict[str, float]) -> float | None:
    """Tokens per second of decoding alone: each category's prefill seconds subtracted (None where
    that leaves no time, as it can for a few tokens of a tiny model)."""
    seconds = sum(m.seconds - prefills[c] for c, m in by_category.items())
    return sum(m.tokens for m in by_category.values()) / seconds if seconds > 0 else None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def record(name, temperature, by_category, ar, ar_rate, costs, context, prefills: dict[str, float]) -> dict:
    """One method's record: end to end and, with each category's prefill seconds subtracted, for
    the decoding alone (`decode_*`), overall and by category."""
    measured = total(by_category)
    rate = measured.tokens / measured.seconds
    ar = ar or by_category
    categories = category_records(by_category, ar, ar is by_category)
    for c in by_category:
        rate_c = decode_rate({c: by_category[c]}, prefills)
        speedup = ratio(rate_c, decode_rate({c: ar[c]}, prefills))
        categories[c].update(decode_tokens_per_s=rate_c, decode_speedup_vs_ar=speedup, prefill_s=prefills[c])
    decode = decode_rate(by_category, prefills)
    return {
        "method": name,
        "temperature": temperature,
        "tau": 1.0 if ar is by_category else measured.tau,
        "tokens_per_s": rate,
        "speedup_vs_ar": rate / ar_rate,
        "decode_tokens_per_s": decode,
        "decode_speedup_vs_ar": ratio(decode, decode_rate(ar, prefills)),
        "target_passes": measured.passes / measured.rows,
        "tokens_per_row": measured.tokens / measured.rows,
        "by_category": categories,
        "costs_ms": {k: v * 1e3 for k, v in costs.items()},
        **context,
    }


def print_row(r: dict) -> None:
    print(
        f"| {r['method']} | {r['temperature']:g} | tau {r['tau']:.2f} | {r['tokens_per_s']:.1f} tok/s | "
        f"{r['speedup_vs_ar']:.2f}x | decoding alone {_fmt(r['decode_tokens_per_s'], '{:.1f} tok/s')}, "
        f"{_fmt(r['decode_speedup_vs_ar'], '{:.2f}x')} | passes/prompt {r['target_passes']:.1f} |"
        + (f" rounds per k: {r['rounds_per_k']} |" if "rounds_per_k" in r else ""),
        flush=True,
    )


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def category_table(records: list[dict], key: str = "speedup_vs_ar") -> str:
    """Speedups (`key`: end to end, or decode_speedup_vs_ar) by method and category."""
    categories = list(records[0]["by_category"])
    lines = ["| method | T | " + " | ".join(categories) + " | overall | tau |", "|" + "---|" * (len(categories) + 4)]
    for r in records:
        cells = " | ".join(_fmt(r["by_category"][c][key], "{:.2f}x") for c in categories)
        lines.append(f"| {r['method']} | {r['temperature']:g} | {cells} | {_fmt(r[key], '{:.2f}x')} | {r['tau']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
