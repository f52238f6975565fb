"""Benchmark parallel drafting (SSD, arXiv 2603.03251) with the drafter on a device of its own,
against sequential speculative decoding and AR in the same process, on Spec-Bench's prompts.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m infer.parallel_bench --json FILE

(on CPU the two devices are simulated and share the machine's cores; on two GPUs or a TPU slice
drop XLA_FLAGS: the first two devices are used, see docs/parallel.md). Rows, each timed as in
`infer.retrieval_bench` (end to end, and decoding alone with the target's prefill subtracted):

    ar                 jspec.generate on the target's device
    chain-k{k}         Chain(k): sequential speculative decoding, the drafter waiting for the target
    ssd-k{k}-1dev      SSD(k) through speculative_generate: pre-drafting and verification in turn
    ssd-k{k}-2dev      SSD(k) through jspec.parallel.parallel_generate: both at once
    pearl-g{g}-1dev    PEARL(gamma) through speculative_generate
    pearl-g{g}-2dev    PEARL(gamma) through parallel_generate

with tau, SSD's cache hit rate, PEARL's share of post-verify steps, and the predictions of
`jspec.analysis.ssd_speedup` and `pearl_speedup` from the measured costs (t_target(1),
t_target(k+1), t_target(gamma), t_draft, SSD's pre-drafting cost), alpha from the chain's tau.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import jspec
from infer.bench import LastOutputs, jsonl_batches, machine, measure_by_category, total
from infer.models import add_model_arguments, models_from_args
from infer.retrieval_bench import prefill_seconds, print_summary, record, save, target_eos
from infer.spec_bench import default_spec_bench
from infer.timing import forward_seconds
from jspec.analysis import alpha_from_tau, pearl_speedup, speedup_from_costs, ssd_speedup
from jspec.decode import bucket_size
from jspec.methods.ssd import SSD
from jspec.parallel import Placement, parallel_generate, place


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m infer.parallel_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, metavar="FILE")
    add_model_arguments(parser)
    parser.add_argument("--k", type=int, default=3, help="drafts per round of the chain and of SSD (default: 3)")
    parser.add_argument("--gamma", type=int, default=4, help="PEARL's draft length (default: 4)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--per-category", type=int, default=1, help="Spec-Bench prompts per category (default: 1)")
    parser.add_argument("--prompts-jsonl", metavar="FILE", default=None)
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per prompt (default: 1)")
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(jax.devices()) < 2:
        parser.error("needs 2 devices: on CPU run with XLA_FLAGS=--xla_force_host_platform_device_count=2")
    target, drafter, description = models_from_args(parser, args)
    args.prompts_jsonl = args.prompts_jsonl or default_spec_bench()
    if args.prompts_jsonl is None:
        parser.error("needs --prompts-jsonl (Spec-Bench's question.jsonl; or set $JSPEC_SPEC_BENCH)")
    batches, prompts_description = jsonl_batches(parser, args, target.config.vocab_size)
    placement = Placement.two_devices()
    placed = place(target, drafter, placement)
    k, ssd, gamma = args.k, SSD(k=args.k), args.gamma
    pearl = jspec.PEARL(gamma=gamma)

    typical = sorted(batches, key=lambda b: b.prompts.shape[1])[len(batches) // 2].prompts
    cache_size = bucket_size(typical.shape[1]) + bucket_size(args.max_new_tokens) + ssd.tokens_scored + 1
    timed = lambda model, n: forward_seconds(model, typical, cache_size, n, passes=16, runs=5)  # noqa: E731
    costs = {f"t_target_{n}": timed(target, n) for n in sorted({1, k + 1, gamma})}
    costs["t_draft"] = timed(drafter, 1)
    # The drafter's work during verification: the chain (k tokens), then k passes over the M branches.
    costs["t_predraft"] = timed(drafter, k) + k * timed(drafter, ssd.branches)
    print("costs (median ms): " + ", ".join(f"{name} {v * 1e3:.2f}" for name, v in costs.items()))
    context = {
        "target": description, "machine": machine(), "prompts": prompts_description, "max_new_tokens": args.max_new_tokens,
        "placement": f"target on {placement.target_device}, drafter on {placement.drafter_device}",
    }  # fmt: skip

    records, prefills = [], prefill_seconds(target, batches, args.max_new_tokens, args.repeats)
    eos_id = target_eos(args)
    started = time.time()
    for temperature in args.temperatures:
        sampling = jspec.Sampling(temperature=temperature)
        common = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, rng=jax.random.key(args.seed), eos_id=eos_id)

        def one_device(strategy):
            return lambda b: jspec.speculative_generate(
                target, drafter, b.prompts, prompt_lengths=b.lengths, strategy=strategy, **common
            )  # noqa: E501

        def two_devices(strategy):
            return lambda b: parallel_generate(placed, b.prompts, prompt_lengths=b.lengths, strategy=strategy, **common)

        def plain(b):
            return jspec.generate(target, b.prompts, prompt_lengths=b.lengths, **common)

        ar = measure_by_category(plain, batches, args.repeats)
        ar_rate = total(ar).tokens / total(ar).seconds
        records.append(record("ar", temperature, ar, None, ar_rate, costs, context, prefills))
        save(args.json, records)
        methods = [
            (f"chain-k{k}", jspec.Chain(k=k), one_device),
            (f"ssd-k{k}-1dev", ssd, one_device),
            (f"ssd-k{k}-2dev", ssd, two_devices),
            (f"pearl-g{gamma}-1dev", pearl, one_device),
            (f"pearl-g{gamma}-2dev", pearl, two_devices),
        ]
        chain_tau = None
        for name, strategy, placed_as in methods:
            recorder = LastOutputs(placed_as(strategy))
            by_category = measure_by_category(recorder, batches, args.repeats)
            rec = record(name, temperature, by_category, ar, ar_rate, costs, {**context, "strategy": repr(strategy)}, prefills)
            tau = total(by_category).tau
            counts = lambda key: sum(float(np.sum(out.stats.strategy[key])) for out in recorder.outputs)  # noqa: E731
            if name.startswith("chain"):
                chain_tau = tau
                t_round = costs[f"t_target_{k + 1}"]
                rec["predicted_speedup"] = speedup_from_costs(tau, k * costs["t_draft"], t_round, costs["t_target_1"])
            alpha = alpha_from_tau(min(max(chain_tau, 1.0), k + 1.0), k)
            if name.startswith("pearl"):
                rec["post_verify_share"] = counts("post_steps") / counts("steps")
                if name.endswith("2dev"):  # the analysis models both devices at once
                    t_target_gamma = costs[f"t_target_{gamma}"]
                    rec.update(alpha_from_chain=alpha)
                    rec["predicted_speedup"] = pearl_speedup(alpha, gamma, costs["t_draft"], t_target_gamma, costs["t_target_1"])
            elif name.startswith("ssd"):
                rate = counts("hits") / counts("rounds")
                rec.update(hit_rate=rate, rounds_per_row=counts("rounds") / sum(out.tokens.shape[0] for out in recorder.outputs))
                if name.endswith("2dev"):
                    rec.update(alpha_from_chain=alpha)
                    t_round = costs[f"t_target_{k + 1}"]
                    rec["predicted_speedup"] = ssd_speedup(
                        alpha, k, rate, costs["t_draft"], t_round, costs["t_target_1"], costs["t_predraft"]
                    )
            records.append(rec)
            save(args.json, records)
            extra = f"hit rate {rec['hit_rate']:.2f}, " if "hit_rate" in rec else ""
            extra += f"post-verify steps {rec['post_verify_share']:.2f}, " if "post_verify_share" in rec else ""
            predicted = f"predicted {rec['predicted_speedup']:.2f}x" if "predicted_speedup" in rec else ""
            print(f"  {name}: {extra}{predicted}", flush=True)
            jax.clear_caches()
    print_summary(records, started)
    return records


if __name__ == "__main__":
    main()
