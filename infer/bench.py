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
Writes a JSON list of records and prints a markdown table; `--plots DIR` also draws the speedup
against k / node budget and the acceptance by draft position (PNG).

Prompts: the held-out stdlib code snippets (category "code"), or `--prompts-jsonl FILE` in
Spec-Bench's format (one JSON object per line with "category" and "turns"; the first turn is the
prompt), `--per-category` of each category, encoded with the models' tokenizer (the demo models',
or a Hugging Face target's tokenizer.json), keeping the last --prompt-len tokens (shorter prompts
are right-padded and decoded with their own lengths). Each record also holds, per category, tau,
tokens/s and speedup over AR, and the acceptance by draft position: the fraction of rounds that
accepted at least i drafted tokens, i = 1, 2, ...
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
from tqdm import tqdm

import jspec
from infer.methods import TREE_METHODS, Method, chain_method, tree_method, tree_width
from infer.models import add_model_arguments, models_from_args, prompt_batches, text_tokenizer
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
    parser.add_argument(
        "--prompts-jsonl", metavar="FILE",
        help="prompts from a Spec-Bench-style JSONL (category, turns) instead of the held-out code snippets",
    )
    parser.add_argument("--per-category", type=int, default=2, help="with --prompts-jsonl: prompts per category (default: 2)")
    parser.add_argument("--plots", metavar="DIR", help="also write speedup.png and acceptance.png here")
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
class Batch:
    """Prompts int32 `[B, P]` (right-padded), their lengths int32 `[B]`, and their category."""

    prompts: jax.Array
    lengths: jax.Array
    category: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.prompts.shape


@dataclasses.dataclass(frozen=True)
class Measured:
    """One method over prompt batches: summed median seconds, tokens, emitted tokens and target
    passes, and `at_least[i]`: rounds that emitted at least i + 1 tokens (accepted >= i drafts)."""

    seconds: float
    tokens: int
    emitted: int
    passes: int
    rows: int
    at_least: tuple[int, ...] = ()

    @property
    def tau(self) -> float:
        return self.emitted / max(self.passes, 1)

    def acceptance_by_position(self) -> list[float]:
        """[fraction of rounds accepting >= i drafts for i = 1 ..]; trailing never-reached positions dropped."""
        rounds = max(self.at_least[0], 1) if self.at_least else 1
        out = [n / rounds for n in self.at_least[1:]]
        while out and out[-1] == 0:
            out.pop()
        return out

    def __add__(self, other: "Measured") -> "Measured":
        width = max(len(self.at_least), len(other.at_least))
        pad = lambda t: tuple(t) + (0,) * (width - len(t))  # noqa: E731
        return Measured(
            self.seconds + other.seconds, self.tokens + other.tokens, self.emitted + other.emitted,
            self.passes + other.passes, self.rows + other.rows,
            tuple(a + b for a, b in zip(pad(self.at_least), pad(other.at_least))),
        )


def rounds_at_least(emitted_per_round: np.ndarray) -> tuple[int, ...]:
    """Counts of rounds (emitted > 0) that emitted >= 1, >= 2, ... tokens, from `Stats.emitted_per_round` `[B, R]`."""
    emitted = np.asarray(emitted_per_round).reshape(-1)
    emitted = emitted[emitted > 0]
    top = int(emitted.max()) if emitted.size else 0
    return tuple(int(np.sum(emitted >= i)) for i in range(1, top + 1))


def measure(fn: Callable, batches: list, repeats: int) -> Measured:
    """fn(batch) on every batch (a prompts array or a `Batch`): an untimed call, then the median of
    `repeats` timed calls each."""
    total = Measured(0.0, 0, 0, 0, 0)
    for batch in batches:
        times, output = time_calls(lambda: fn(batch), repeats)
        total = total + Measured(
            statistics.median(times), int(np.sum(output.lengths)), int(np.sum(output.stats.emitted_per_round)),
            int(np.sum(output.stats.target_passes)), batch.shape[0], rounds_at_least(output.stats.emitted_per_round),
        )
    return total


def measure_by_category(fn: Callable[[Batch], jspec.Output], batches: list[Batch], repeats: int) -> dict[str, Measured]:
    """`measure` per category, in the batches' order."""
    categories = list(dict.fromkeys(b.category for b in batches))
    return {c: measure(fn, [b for b in batches if b.category == c], repeats) for c in categories}


def total(by_category: dict[str, Measured]) -> Measured:
    out = Measured(0.0, 0, 0, 0, 0)
    for measured in by_category.values():
        out = out + measured
    return out


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
    record["acceptance_by_position"] = [] if method is None else measured.acceptance_by_position()
    return {**record, **context}


def category_records(by_category: dict[str, Measured], ar: dict[str, Measured] | None, is_ar: bool) -> dict[str, dict]:
    """Per category: tau, tokens/s and speedup over AR on that category's prompts."""
    out = {}
    for category, measured in by_category.items():
        tokens_per_s = measured.tokens / measured.seconds
        ar_tokens_per_s = tokens_per_s if ar is None else ar[category].tokens / ar[category].seconds
        out[category] = {
            "tau": 1.0 if is_ar else measured.tau,
            "tokens_per_s": tokens_per_s,
            "speedup_vs_ar": tokens_per_s / ar_tokens_per_s,
            "rows": measured.rows,
        }
    return out


def markdown_table(records: list[dict]) -> str:
    header = "| " + " | ".join(name for name, _, _ in TABLE_COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    rows = ["| " + " | ".join(fmt.format(r[key]) for _, key, fmt in TABLE_COLUMNS) + " |" for r in records]
    return "\n".join([header, rule, *rows])


def category_table(records: list[dict]) -> str:
    """Speedup over AR per method (rows) and prompt category (columns), Spec-Bench style."""
    categories = list(records[0]["by_category"])
    header = "| method | T | " + " | ".join(categories) + " | overall |"
    rule = "|" + "|".join("---" for _ in range(len(categories) + 3)) + "|"
    rows = [
        f"| {r['method']} | {r['temperature']:g} | "
        + " | ".join(f"{r['by_category'][c]['speedup_vs_ar']:.2f}x" for c in categories)
        + f" | {r['speedup_vs_ar']:.2f}x |"
        for r in records
    ]
    return "\n".join([header, rule, *rows])


def write_plots(records: list[dict], directory: str) -> list[str]:
    """speedup.png: speedup over AR against tokens scored per round (k + 1 for a chain, N for a
    tree), a line per method family and verifier, a panel per temperature; acceptance.png: the
    acceptance by draft position of every chain. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    temperatures = sorted({r["temperature"] for r in records})
    paths = []
    fig, axes = plt.subplots(1, len(temperatures), figsize=(6 * len(temperatures), 4.5), squeeze=False)
    for ax, temperature in zip(axes[0], temperatures):
        lines: dict[str, list[tuple[int, float]]] = {}
        for r in records:
            if r["temperature"] != temperature or r["family"] == "ar":
                continue
            name = f"chain-{r['verifier']}" if r["family"] == "chain" else r["method"].rsplit("-n", 1)[0]
            lines.setdefault(name, []).append((r["nodes"], r["speedup_vs_ar"]))
        for name, points in sorted(lines.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set(title=f"T = {temperature:g}", xlabel="tokens scored per round (k + 1, or tree nodes N)", ylabel="speedup over AR")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(directory, "speedup.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(temperatures), figsize=(6 * len(temperatures), 4.5), squeeze=False)
    for ax, temperature in zip(axes[0], temperatures):
        for r in records:
            if r["temperature"] == temperature and r["family"] == "chain" and r["acceptance_by_position"]:
                a = r["acceptance_by_position"]
                ax.plot(range(1, len(a) + 1), a, marker="o", label=r["method"])
        ax.set(title=f"T = {temperature:g}", xlabel="draft position i", ylabel="P(round accepts >= i drafts)", ylim=(0, 1))
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(directory, "acceptance.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def jsonl_batches(parser: argparse.ArgumentParser, args: argparse.Namespace, vocab_size: int) -> tuple[list[Batch], str]:
    """--per-category prompts of each category of a Spec-Bench JSONL, batched within categories."""
    tokenizer = text_tokenizer(args)
    if tokenizer is None:
        parser.error("--prompts-jsonl needs a tokenizer: the demo models, or a Hugging Face --target with tokenizer.json")
    if args.per_category < 1:
        parser.error(f"--per-category must be >= 1, got {args.per_category}")
    by_category: dict[str, list[str]] = {}
    with open(args.prompts_jsonl) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                category, text = str(item["category"]), item["turns"][0]
            except (ValueError, KeyError, IndexError, TypeError) as error:
                parser.error(f"--prompts-jsonl line {number}: needs 'category' and a non-empty 'turns' list ({error})")
            by_category.setdefault(category, [])
            if len(by_category[category]) < args.per_category:
                by_category[category].append(text)
    batches = []
    for category, texts in by_category.items():
        for start in range(0, len(texts), args.batch_size):
            rows = [e.ids[-args.prompt_len :] or [0] for e in tokenizer.encode_batch(texts[start : start + args.batch_size])]
            prompts = np.zeros((len(rows), args.prompt_len), np.int32)
            for i, ids in enumerate(rows):
                prompts[i, : len(ids)] = ids
            lengths = np.array([len(ids) for ids in rows], np.int32)
            if prompts.max() >= vocab_size:
                parser.error(f"--prompts-jsonl: the tokenizer produced ids >= the target's vocabulary ({vocab_size})")
            batches.append(Batch(jax.numpy.asarray(prompts), jax.numpy.asarray(lengths), category))
    n = sum(len(t) for t in by_category.values())
    return batches, (
        f"prompts: {n} from {args.prompts_jsonl} ({len(by_category)} categories x up to {args.per_category}; "
        f"first turn, last {args.prompt_len} tokens, right-padded), batches of up to {args.batch_size}"
    )


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
    if args.prompts_jsonl:
        batches, prompts_description = jsonl_batches(parser, args, target.config.vocab_size)
        calibration = prompt_batches(parser, args, target.config.vocab_size, n_calibration)[0] if n_calibration else []
        calibration_note = f" (Sequoia calibrated on {n_calibration} batch(es) of held-out code)"
    else:
        all_batches, prompts_description = prompt_batches(
            parser, args, target.config.vocab_size, args.prompt_batches + n_calibration
        )
        code, calibration = all_batches[: args.prompt_batches], all_batches[args.prompt_batches :]
        batches = [Batch(p, jax.numpy.full((p.shape[0],), p.shape[1], jax.numpy.int32), "code") for p in code]
        calibration_note = f" (the last {n_calibration} calibrate Sequoia only)"
    rng = jax.random.key(args.seed)
    context = {
        "batch_size": args.batch_size,
        "prompt_batches": args.prompt_batches,
        "prompt_len": args.prompt_len,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "models": description,
        "prompts": prompts_description + (calibration_note if n_calibration else ""),
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
    costs = forward_costs(target, drafter, batches[0].prompts, sizes, cache_size)
    print("costs (median ms): " + ", ".join(f"{name} {seconds * 1e3:.2f}" for name, seconds in costs.items()))

    records = []
    plan = []  # (temperature, methods) in run order, for the progress bar
    for temperature in args.temperatures:
        greedy = jspec.Sampling(temperature=temperature).greedy
        plan.append([m for m in chains if not (m.verifier == "greedy" and not greedy)])  # greedy: T=0 only
    n_runs = sum(len(m) + 1 + len(args.node_budgets) * len(args.trees) for m in plan)
    progress = tqdm(total=n_runs, desc="infer.bench", unit="method")
    for temperature, methods in zip(args.temperatures, plan):
        sampling = jspec.Sampling(temperature=temperature)
        common = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, rng=rng)
        ar_by_category = measure_by_category(
            lambda b: jspec.generate(target, b.prompts, prompt_lengths=b.lengths, **common), batches, args.repeats
        )
        ar = make_record(None, temperature, total(ar_by_category), None, costs, None, context)
        ar["by_category"] = category_records(ar_by_category, None, True)
        records.append(ar)
        progress.update()
        acceptance = sequoia_acceptance(target, drafter, calibration, sampling, args.seed, args.max_new_tokens) if n_calibration else None
        methods = methods + [tree_method(name, n, acceptance) for n in args.node_budgets for name in args.trees]
        for method in methods:
            progress.set_postfix_str(f"T={temperature:g} {method.name}")
            by_category = measure_by_category(
                lambda b: jspec.speculative_generate(
                    target, drafter, b.prompts, prompt_lengths=b.lengths, strategy=method.strategy, **common
                ),
                batches, args.repeats,
            )
            t_draft_round = draft_round_seconds(method.strategy, drafter, batches[0].prompts, cache_size, sampling)
            record = make_record(method, temperature, total(by_category), ar["tokens_per_s"], costs, t_draft_round, context)
            record["by_category"] = category_records(by_category, ar_by_category, False)
            records.append(record)
            tqdm.write(markdown_table([record]).splitlines()[-1])
            progress.update()
            # Each method's programs are used once: drop them, or the XLA:CPU code mappings of ~60
            # methods pass Linux's 65,530 maps per process and compilation aborts.
            jax.clear_caches()
    progress.close()

    with open(args.json, "w") as f:
        json.dump(records, f, indent=2)
    print(markdown_table(records))
    if len(records[0]["by_category"]) > 1:
        print("\nspeedup over AR by prompt category:")
        print(category_table(records))
    if args.plots:
        print("plots: " + ", ".join(write_plots(records, args.plots)))
    print(f"wrote {len(records)} records to {args.json}")
    return records


if __name__ == "__main__":
    main()
