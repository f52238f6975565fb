"""Serving benchmark: throughput and latency of `jspec.serve.Engine` at several concurrencies, for
plain decoding (AR), fixed-k chain speculation and SmartSpec.

    python -m infer.serve_bench --json runs/serve_bench.json --plots docs/plots/serve \\
        --dtype bfloat16 --drafter-dtype float32 --concurrency 1 2 4 8 16 32

For each concurrency c, each method gets an engine of c slots (the compiled batch) and c closed-loop
clients: every client submits its next request as soon as its last one finished, until
`--requests-per-client` each are done. The prompts are Spec-Bench's first turns (chat template),
in a fixed order, greedy (random prompts with `--preset` models). Compilation is excluded (each
engine first compiles every program, `Engine.warm_up`). Reported per run: completion tokens per
second, requests per second, TTFT and TPOT percentiles (time to the first token from submission;
time per later token), tau (tokens per target pass per request, prefill excluded), SmartSpec's
rounds at each k, and the throughput over AR the cost model predicts from the measured costs and
tau (`predicted_speedup`).

SmartSpec's cost model is measured on the engine that serves it, at its batch size, before the run
(`jspec.serve.calibrate_smartspec`): whole rounds at each forced k = 0 .. k_max, every slot busy;
while it serves, each step's timing moves the cost at that step's k (`SmartSpec.cost_memory`).

A machine whose speed drifts within minutes favours whichever method runs when it is fast. With
`--passes 2` or more each concurrency runs the methods again, every other pass in reverse order
(AR, chain, SmartSpec, then SmartSpec, chain, AR): a record per run (`pass`), and each run's
speedup is over the mean of AR's runs at that concurrency (`speedup`; `mean_speedup`: the
method's mean throughput over that mean).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

import jspec
from infer.bench import machine, read_jsonl_prompts
from infer.models import add_model_arguments, chat_tokenizer, models_from_args
from infer.spec_bench import default_spec_bench
from jspec.analysis import alpha_from_tau, expected_tau
from jspec.serve import Engine, alternating_passes, calibrate_smartspec


def smartspec_strategy(k_max: int, prior: float) -> jspec.SmartSpec:
    """SmartSpec up to k_max drafts, its cost model to be measured on the engine that serves it
    (`jspec.serve.calibrate_smartspec`; the flat placeholder is never used for serving)."""
    return jspec.SmartSpec(k_max=k_max, t_target=(1.0,) * (k_max + 1), prior=prior)


def percentiles(values: list[float]) -> dict:
    """p50 / p90 / p99 in milliseconds (None without values)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    return {f"p{q}": 1000 * float(np.percentile(values, q)) for q in (50, 90, 99)}


def closed_loop(engine: Engine, prompts: list[list[int]], *, clients: int, per_client: int, max_new_tokens: int, eos_id) -> dict:
    """Serve `clients * per_client` requests (prompts in order, cycling), at most `clients` in flight."""
    total = clients * per_client
    submitted_at, first_at, finished_at, ids = {}, {}, {}, []

    def submit() -> None:
        prompt = prompts[len(ids) % len(prompts)]
        ids.append(engine.submit(prompt, max_new_tokens=max_new_tokens, eos_id=eos_id))
        submitted_at[ids[-1]] = time.perf_counter()

    start = time.perf_counter()
    for _ in range(min(clients, total)):
        submit()
    while not engine.idle:
        for event in engine.step():
            now = time.perf_counter()
            if event.tokens and event.request_id not in first_at:
                first_at[event.request_id] = now
            if event.finish_reason is not None:
                finished_at[event.request_id] = now
                if len(ids) < total:
                    submit()
    seconds = time.perf_counter() - start
    done = [engine.completions[i] for i in ids]
    tokens = sum(len(c.tokens) for c in done)
    ttft = [first_at[i] - submitted_at[i] for i in ids]
    tpot = [(finished_at[i] - first_at[i]) / (len(c.tokens) - 1) for i, c in zip(ids, done) if len(c.tokens) > 1]
    rounds = sum(c.rounds for c in done)
    return {
        "requests": total,
        "completion_tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "requests_per_second": total / seconds,
        "ttft_ms": percentiles(ttft),
        "tpot_ms": percentiles(tpot),
        "latency_ms": percentiles([finished_at[i] - submitted_at[i] for i in ids]),
        "tau": (tokens - total) / max(rounds, 1),
        "outputs": [c.tokens for c in done],
    }


def warm_up(engine: Engine, prompts: list[list[int]], eos_id, max_new_tokens: int) -> None:
    """Compile outside the timing: every width an admission or a drafter restart can take (a
    SmartSpec row restarted mid-request restarts on its prompt and output, wider than any prompt)
    and the step (`Engine.warm_up`), then a full batch of real prompts."""
    lengths = range(min(map(len, prompts)), max(map(len, prompts)) + max_new_tokens)
    engine.warm_up(widths={engine.prompt_width(n) for n in lengths})
    for p in prompts[: engine.slots]:
        engine.submit(p, max_new_tokens=2, eos_id=eos_id)
    engine.run()
    engine.completions.clear()


def predicted_speedup(round_seconds, k: int, tau: float) -> float:
    """Throughput over AR the cost model predicts for rounds of k drafts emitting tau tokens each,
    from the measured seconds per round at each k (`round_seconds[0]`: a plain round)."""
    return tau * round_seconds[0] / round_seconds[k]


def add_predictions(rows: list[dict], k: int) -> None:
    """`predicted_speedup` of the fixed chain and of SmartSpec at one concurrency, from SmartSpec's
    measured round costs: the chain's from its tau; SmartSpec's, the best k's, with alpha from the
    chain's tau (`jspec.analysis.alpha_from_tau`)."""
    by_method = {r["method"]: r for r in rows}
    if "smartspec" not in by_method:
        return
    seconds = by_method["smartspec"]["round_ms"]
    if "chain" in by_method and k < len(seconds):
        chain = by_method["chain"]
        chain["predicted_speedup"] = predicted_speedup(seconds, k, chain["tau"])
        alpha = alpha_from_tau(min(chain["tau"], k + 1.0), k)
        by_method["smartspec"]["predicted_speedup"] = max(
            predicted_speedup(seconds, j, expected_tau(alpha, j) if j else 1.0) for j in range(len(seconds))
        )


def add_speedups(records: list[dict]) -> None:
    """Each record's `speedup` (its throughput over the mean of AR's runs at its concurrency) and
    `mean_speedup` (its method's mean throughput there over that mean); none without an AR run."""
    for c in {r["concurrency"] for r in records}:
        rows = [r for r in records if r["concurrency"] == c]
        ar = [r["tokens_per_second"] for r in rows if r["method"] == "ar"]
        if not ar:
            continue
        for r in rows:
            same = [x["tokens_per_second"] for x in rows if x["method"] == r["method"]]
            r["speedup"] = r["tokens_per_second"] / float(np.mean(ar))
            r["mean_speedup"] = float(np.mean(same) / np.mean(ar))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--json", required=True, metavar="FILE", help="where to write the records")
    parser.add_argument("--plots", metavar="DIR", help="also write throughput.png and latency.png here")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--methods", nargs="+", default=["ar", "chain", "smartspec"], choices=["ar", "chain", "smartspec"])
    parser.add_argument("--k", type=int, default=2, help="the fixed chain's k (default: 2, SmolLM2's best chain)")
    parser.add_argument("--k-max", type=int, default=3, help="SmartSpec's longest chain (default: 3)")
    parser.add_argument(
        "--prior",
        type=float,
        default=0.28,
        help="SmartSpec's acceptance before it has drafted (default: 0.28, the SmolLM2 drafter's measured first-draft "
        "acceptance on Spec-Bench, jspec.methods.adaptive; the library's default is 0.5)",
    )
    parser.add_argument("--requests-per-client", type=int, default=2, help="requests each client sends (default: 2)")
    parser.add_argument("--min-requests", type=int, default=8, help="at least this many requests per run (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per request (default: 64)")
    parser.add_argument("--max-len", type=int, default=256, help="the engines' max_len (default: 256)")
    parser.add_argument(
        "--max-prompt-tokens", type=int, default=128, help="leave out longer prompts (fewer prefill programs; default: 128)"
    )
    parser.add_argument("--rounds-per-step", type=int, default=4, help="rounds per compiled step (default: 4)")
    parser.add_argument(
        "--passes", type=int, default=1, help="runs of each method per concurrency, in alternating order (default: 1)"
    )
    parser.add_argument("--prompts-jsonl", default=default_spec_bench(), help="Spec-Bench's question.jsonl")
    parser.add_argument("--per-category", type=int, default=2, help="prompts per Spec-Bench category (default: 2)")
    return parser


def chat_prompts(parser, args, tokenizer, max_len: int, max_new_tokens: int) -> list[list[int]]:
    """Spec-Bench first turns through the chat template, categories interleaved; those longer than
    --max-prompt-tokens or leaving no room for max_new_tokens are left out."""
    if args.prompts_jsonl is None:
        parser.error("needs --prompts-jsonl (Spec-Bench's question.jsonl; or set $JSPEC_SPEC_BENCH)")
    by_category = read_jsonl_prompts(parser, args.prompts_jsonl, args.per_category)
    texts = [ts[i] for i in range(args.per_category) for ts in by_category.values() if i < len(ts)]
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    return [p for p in ids if len(p) <= args.max_prompt_tokens and len(p) + max_new_tokens <= max_len]


def write_plots(records: list[dict], directory: str) -> list[str]:
    """throughput.png (tokens/s against concurrency) and latency.png (TPOT p50 and TTFT p50)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    methods = sorted({r["method"] for r in records})
    paths = []
    for name, panels in (
        ("throughput.png", [("tokens_per_second", "completion tokens / s")]),
        ("latency.png", [("tpot_ms", "TPOT p50 (ms)"), ("ttft_ms", "TTFT p50 (ms)")]),
    ):
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
        for ax, (key, label) in zip(axes[0], panels):
            for method in methods:
                value = lambda r: r[key]["p50"] if isinstance(r[key], dict) else r[key]  # noqa: E731
                levels = sorted({r["concurrency"] for r in records if r["method"] == method})
                values = [np.mean([value(r) for r in records if r["method"] == method and r["concurrency"] == c]) for c in levels]
                ax.plot(levels, values, marker="o", label=method)  # the mean over passes
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency (= engine slots)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        path = os.path.join(directory, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.passes < 1:
        parser.error(f"--passes must be >= 1, got {args.passes}")
    target, drafter, description = models_from_args(parser, args)
    tokenizer = chat_tokenizer(args)
    if tokenizer is not None:
        prompts, eos_id = chat_prompts(parser, args, tokenizer, args.max_len, args.max_new_tokens), tokenizer.eos_id
    else:  # random-init models (--preset): random prompts of 8 to 40 tokens, no EOS
        rng = np.random.default_rng(args.seed)
        prompts = [rng.integers(0, target.config.vocab_size, n).tolist() for n in rng.integers(8, 41, 8)]
        eos_id = None
    print(f"{description}; {len(prompts)} prompts; {machine()}")
    records = []
    for c in args.concurrency:
        strategies = {
            "ar": (None, jspec.Autoregressive()),
            "chain": (drafter, jspec.Chain(k=args.k)),
            "smartspec": (drafter, smartspec_strategy(args.k_max, args.prior)),
        }
        reference = None
        for run, method in alternating_passes(args.methods, args.passes):
            engine_drafter, strategy = strategies[method]
            engine = Engine(target, engine_drafter, strategy, slots=c, max_len=args.max_len, rounds_per_step=args.rounds_per_step)
            warm_up(engine, prompts, eos_id, args.max_new_tokens)
            record = {"method": method, "concurrency": c, "slots": c, "pass": run}
            if method == "smartspec":
                seconds = calibrate_smartspec(engine)
                record["round_ms"] = [1000 * float(t) for t in seconds]
                print(f"concurrency {c}: a round at k = 0..{args.k_max} costs {[round(t, 1) for t in record['round_ms']]} ms")
            per_client = max(args.requests_per_client, -(-args.min_requests // c))
            result = closed_loop(
                engine, prompts, clients=c, per_client=per_client, max_new_tokens=args.max_new_tokens, eos_id=eos_id
            )
            outputs = result.pop("outputs")
            reference = reference or outputs
            record.update(result, machine=machine(), outputs_equal_first=outputs == reference)
            if method == "smartspec":
                record["rounds_per_k"] = [int(n) for n in engine.strategy_stats()]
                record["drafter_restarts"] = engine.drafter_restarts
            records.append(record)
            print(
                f"  {method:9s} {result['tokens_per_second']:7.1f} tok/s  tau {result['tau']:.2f}  "
                f"TTFT p50 {result['ttft_ms']['p50']:.0f} ms  TPOT p50 {result['tpot_ms']['p50']:.1f} ms"
                + (f"  rounds per k {record['rounds_per_k']}" if "rounds_per_k" in record else "")
                + (f"  drafter restarts {record['drafter_restarts']}" if "drafter_restarts" in record else "")
                + ("" if record["outputs_equal_first"] else f"  outputs differ from {args.methods[0]}'s")
            )
            del engine
            jax.clear_caches()
        add_predictions([r for r in records if r["concurrency"] == c and r["pass"] == 0], args.k)
        with open(args.json, "w") as f:  # after every concurrency: a stopped run keeps what it measured
            json.dump(records, f, indent=1)
    add_speedups(records)
    with open(args.json, "w") as f:
        json.dump(records, f, indent=1)
    if args.plots:
        print("plots:", ", ".join(write_plots(records, args.plots)))
    return records


if __name__ == "__main__":
    main()
