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

Prompts. With a chat target (the default, SmolLM2-135M-Instruct, or a GGUF file): Spec-Bench's
questions (`--prompts-jsonl`, default `$JSPEC_SPEC_BENCH` or the project's
shared/data/spec_bench/question.jsonl), the first turn of the first `--per-category` (default 3)
questions of every category rendered with the chat template at their own lengths; answers stop at
the model's end-of-turn token or --max-new-tokens; Sequoia is calibrated on held-out generated
instructions (`jspec.training.chat_prompts`), never on the benchmark. With the code models: the
held-out stdlib code snippets (category "code"), or a Spec-Bench-style JSONL encoded with the
models' tokenizer keeping the last --prompt-len tokens (shorter prompts are right-padded and
decoded with their own lengths). Each record also holds, per category, tau, tokens/s and speedup
over AR, and the acceptance by draft position: the fraction of rounds that accepted at least i
drafted tokens, i = 1, 2, ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from typing import Callable

import jax
import numpy as np
from tqdm import tqdm

import jspec
from infer.methods import TREE_METHODS, Method, chain_method, tree_method, tree_width
from infer.models import (
    DEMO_DRAFTER,
    add_model_arguments,
    cast_drafter,
    chat_tokenizer,
    describe_drafter,
    load_drafter,
    models_from_args,
    prompt_batches,
    text_tokenizer,
)
from infer.spec_bench import default_spec_bench
from infer.timing import draft_round_seconds, forward_seconds, theoretical_round_speedup
from jspec.decode import bucket_size
from jspec.methods.sequoia import measure_acceptance
from jspec.models import cast
from jspec.verify.chain import CHAIN_VERIFIERS

TABLE_COLUMNS = [
    ("method", "method", "{}"),
    ("drafter", "drafter", "{}"),
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
        "--verifiers",
        nargs="+",
        choices=sorted(CHAIN_VERIFIERS),
        default=["sampling", "block"],
        help="chain verifiers (default: sampling block); greedy runs at temperature 0 only",
    )
    parser.add_argument(
        "--node-budgets",
        type=int,
        nargs="*",
        default=[5, 9, 17],
        help="tree node budgets N, tokens scored per round; each also adds Chain(k=N-1) (default: 5 9 17)",
    )
    parser.add_argument(
        "--trees",
        nargs="*",
        choices=TREE_METHODS,
        default=list(TREE_METHODS),
        help="tree methods run at every node budget (default: all; see infer/methods.py)",
    )
    parser.add_argument(
        "--calibration-batches",
        type=int,
        default=2,
        help="extra prompt batches, not benchmarked, on which Sequoia's acceptance vector is measured (default: 2)",
    )
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0], help="sampling temperatures (default: 0 1)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per row (default: 128)")
    parser.add_argument("--prompt-batches", type=int, default=8, help="prompt batches every method decodes (default: 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per batch, after an untimed one (default: 3)")
    parser.add_argument(
        "--prompts-jsonl",
        metavar="FILE",
        help="prompts from a Spec-Bench-style JSONL (category, turns) instead of the held-out code snippets",
    )
    parser.add_argument(
        "--per-category",
        type=int,
        default=None,
        help="prompts per category of the JSONL (default: 3 with a chat target, else 2)",
    )
    parser.add_argument("--plots", metavar="DIR", help="also write speedup.png and acceptance.png here")
    parser.add_argument(
        "--cost-passes", type=int, default=32, help="passes per timed loop of the per-pass cost measurement (default: 32)"
    )
    parser.add_argument("--cost-runs", type=int, default=7, help="timed loops per cost (median; default: 7)")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=("float32", "bfloat16"),
        default=["float32"],
        help="parameter and activation dtypes, in order (default: float32); every dtype after the first runs AR and "
        "sampling-verifier chains of --secondary-ks only, on --secondary-per-category prompts per category",
    )
    parser.add_argument("--secondary-per-category", type=int, default=1, help="see --dtypes (default: 1)")
    parser.add_argument(
        "--secondary-ks", type=int, nargs="+", default=None, help="chain lengths of the later dtypes (default: the first --ks)"
    )
    parser.add_argument(
        "--hf-compare",
        type=int,
        default=None,
        metavar="K",
        help="also run transformers' greedy and assisted generation (Chain(K)) against jspec on the same prompts and "
        "weights, per dtype, at temperature 0 (SmolLM2; the hf extra)",
    )
    parser.add_argument("--hf-per-category", type=int, default=1, help="prompts per category of --hf-compare (default: 1)")
    parser.add_argument(
        "--extra-drafters",
        nargs="*",
        default=[],
        metavar="NAME|PATH",
        help="more drafters run with the same methods, side by side with --drafter: demo names (e.g. smollm2-135m-eagle, "
        "an EAGLE head) or paths (a jspec checkpoint or a jspec.eagle.save_head directory); Sequoia runs with "
        "language-model drafters only",
    )
    return parser


# Instruction sets that change which dtype XLA:CPU runs fastest: with AMX, bfloat16 passes over
# 1-8 tokens cost about the same; without AVX-512, float32 one-token passes win (docs/benchmarks.md).
_CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name and which of `_CPU_FEATURES` it has, from cpuinfo (Linux); the
    architecture alone where that file is missing."""
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)  # the last CPU's values
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    name = fields.get("model name") or platform.processor() or platform.machine()
    features = ", ".join(f for f in _CPU_FEATURES if f in flags) or "none of " + "/".join(_CPU_FEATURES)
    return f"{name} ({platform.machine()}; {features})"


def machine() -> str:
    """The processor and the JAX devices the timings come from."""
    return f"{cpu_model()}, {os.cpu_count()} CPU cores; jax {jax.__version__} devices: {jax.devices()}"


def forward_costs(
    target: jspec.models.Transformer,
    drafter,
    prompts: jax.Array,
    sizes: list[int],
    cache_size: int,
    *,
    passes: int = 32,
    runs: int = 7,
) -> dict[str, float]:
    """Median seconds of t_target(1), t_draft (one drafter step) and t_target(n) for each n in sizes
    (`infer.timing.forward_seconds`: the median of `runs` compiled loops of `passes` passes). For a
    drafter that is not a language model (an EAGLE head) t_draft is its round of Chain(k=1):
    catch-up and one draft."""
    timing = dict(passes=passes, runs=runs)
    if isinstance(drafter, jspec.models.Transformer):
        t_draft = forward_seconds(drafter, prompts, cache_size, 1, **timing)
    else:
        t_draft = draft_round_seconds(jspec.Chain(k=1), drafter, prompts, cache_size, jspec.Sampling(), target=target, **timing)
    costs = {"t_target_1": forward_seconds(target, prompts, cache_size, 1, **timing), "t_draft": t_draft}
    for n in sorted(set(sizes)):
        costs[f"t_target_{n}"] = forward_seconds(target, prompts, cache_size, n, **timing)
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
            self.seconds + other.seconds,
            self.tokens + other.tokens,
            self.emitted + other.emitted,
            self.passes + other.passes,
            self.rows + other.rows,
            tuple(a + b for a, b in zip(pad(self.at_least), pad(other.at_least))),
        )


def rounds_at_least(emitted_per_round: np.ndarray) -> tuple[int, ...]:
    """Counts of rounds (emitted > 0) that emitted >= 1, >= 2, ... tokens, from `Stats.emitted_per_round` `[B, R]`."""
    emitted = np.asarray(emitted_per_round).reshape(-1)
    emitted = emitted[emitted > 0]
    top = int(emitted.max()) if emitted.size else 0
    return tuple(int(np.sum(emitted >= i)) for i in range(1, top + 1))


def measured_call(seconds: float, output: jspec.Output) -> Measured:
    """One timed call's `Measured`: its seconds and the counts of its output."""
    return Measured(
        seconds,
        int(np.sum(output.lengths)),
        int(np.sum(output.stats.emitted_per_round)),
        int(np.sum(output.stats.target_passes)),
        output.lengths.shape[0],
        rounds_at_least(output.stats.emitted_per_round),
    )


def measure(fn: Callable, batches: list, repeats: int, compiled: set | None = None) -> Measured:
    """fn(batch) on every batch (a prompts array or a `Batch`): the median of `repeats` timed calls
    each, after an untimed call that compiles the batch's shape (once per shape in `compiled`, a set
    shared by the calls that reuse the same programs; None: before every batch)."""
    total = Measured(0.0, 0, 0, 0, 0)
    for batch in batches:
        if compiled is None or batch.shape not in compiled:
            jax.block_until_ready(fn(batch))
            if compiled is not None:
                compiled.add(batch.shape)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            output = jax.block_until_ready(fn(batch))
            times.append(time.perf_counter() - start)
        total = total + measured_call(statistics.median(times), output)
    return total


class LastOutputs:
    """Wraps a decode function `(Batch) -> Output` and keeps its last output on each batch: the
    timing loops keep none, and a strategy's own counts (`Output.stats.strategy`) or a greedy
    identity check read them here. `outputs`: one per batch, in the order first called."""

    def __init__(self, fn: Callable[[Batch], jspec.Output]):
        self.fn, self.by_batch = fn, {}

    def __call__(self, batch: Batch) -> jspec.Output:
        out = self.fn(batch)
        self.by_batch[id(batch)] = out  # a Batch holds arrays (unhashable); the loops reuse each object
        return out

    @property
    def outputs(self) -> list[jspec.Output]:
        return list(self.by_batch.values())


def measure_by_category(fn: Callable[[Batch], jspec.Output], batches: list[Batch], repeats: int) -> dict[str, Measured]:
    """`measure` per category, in the batches' order; each shape compiles once."""
    return measure_interleaved({"method": fn}, batches, repeats)["method"]


def measure_interleaved(
    fns: dict[str, Callable[[Batch], jspec.Output]],
    batches: list[Batch],
    repeats: int,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Measured]]:
    """Several methods measured by category at once, interleaved: on each batch, an untimed
    compiling call of every method (once per shape), then `repeats` rounds that time every method in
    turn. A machine whose speed drifts during a long run (this project's shared CPUs drift by up to
    2x within an hour) then slows every method alike, instead of whichever ran in the slow stretch.
    Returns {method: {category: Measured}}, categories in the batches' order; `progress` gets a
    line per batch."""
    compiled: dict[str, set] = {name: set() for name in fns}
    out: dict[str, dict[str, Measured]] = {name: {} for name in fns}
    for index, batch in enumerate(batches):
        for name, fn in fns.items():
            if batch.shape not in compiled[name]:
                jax.block_until_ready(fn(batch))
                compiled[name].add(batch.shape)
        times: dict[str, list[float]] = {name: [] for name in fns}
        outputs = {}
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                outputs[name] = jax.block_until_ready(fn(batch))
                times[name].append(time.perf_counter() - start)
        for name, output in outputs.items():
            so_far = out[name].get(batch.category, Measured(0.0, 0, 0, 0, 0))
            out[name][batch.category] = so_far + measured_call(statistics.median(times[name]), output)
        if progress is not None:
            line = ", ".join(f"{name} {statistics.median(t):.2f} s" for name, t in times.items())
            progress(f"batch {index + 1}/{len(batches)} ({batch.category}, {batch.shape[1]} wide): {line}")
    return out


def total(by_category: dict[str, Measured]) -> Measured:
    out = Measured(0.0, 0, 0, 0, 0)
    for measured in by_category.values():
        out = out + measured
    return out


def make_record(
    method: Method | None,
    temperature: float,
    measured: Measured,
    ar_tokens_per_s: float | None,
    costs: dict[str, float],
    t_draft_round: float | None,
    context: dict,
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
    cell = lambda r, key, fmt: "-" if r.get(key) is None else fmt.format(r[key])  # noqa: E731
    rows = ["| " + " | ".join(cell(r, key, fmt) for _, key, fmt in TABLE_COLUMNS) + " |" for r in records]
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


def read_jsonl_prompts(
    parser: argparse.ArgumentParser, path: str, per_category: int, categories: list[str] | None = None
) -> dict[str, list[str]]:
    """The first turn of the first `per_category` questions of each category of a Spec-Bench JSONL
    (of `categories` only, if given: each must occur in the file)."""
    if per_category < 1:
        parser.error(f"--per-category must be >= 1, got {per_category}")
    by_category: dict[str, list[str]] = {}
    seen: set[str] = set()
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                category, text = str(item["category"]), item["turns"][0]
            except (ValueError, KeyError, IndexError, TypeError) as error:
                parser.error(f"--prompts-jsonl line {number}: needs 'category' and a non-empty 'turns' list ({error})")
            seen.add(category)
            if categories is not None and category not in categories:
                continue
            by_category.setdefault(category, [])
            if len(by_category[category]) < per_category:
                by_category[category].append(text)
    missing = sorted(set(categories or ()) - seen)
    if missing:
        parser.error(f"--categories {missing} not in {path} (it has: {', '.join(sorted(seen))})")
    return by_category


def _padded(rows: list[list[int]], category: str, vocab_size: int, parser) -> Batch:
    prompts = np.zeros((len(rows), max(len(r) for r in rows)), np.int32)
    for i, ids in enumerate(rows):
        prompts[i, : len(ids)] = ids
    if prompts.max() >= vocab_size:
        parser.error(f"the tokenizer produced ids >= the target's vocabulary ({vocab_size})")
    lengths = np.array([len(ids) for ids in rows], np.int32)
    return Batch(jax.numpy.asarray(prompts), jax.numpy.asarray(lengths), category)


def chat_batches(
    tokenizer, by_category: dict[str, list[str]], batch_size: int, vocab_size: int, parser, min_width: int = 64
) -> list[Batch]:
    """Each text as a user message in the chat template, at its own length, batched within categories.

    Widths are padded to `jspec.decode.bucket_size` (at least 64: four sizes per doubling, at most
    25% of padding; the padding is never attended to, each row decodes at its own length) so that a
    handful of compiled programs serve every prompt length. A power of two padded Spec-Bench's
    769-token summarization prompt to 1024 tokens: a third more prefill than its 896-token bucket.
    A larger `min_width` puts more prompts in one shape: fewer programs to compile, more padding.
    """
    batches = []
    for category, texts in by_category.items():
        rows = [tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
        for start in range(0, len(rows), batch_size):
            batch = _padded(rows[start : start + batch_size], category, vocab_size, parser)
            width = bucket_size(max(min_width, batch.prompts.shape[1]))
            prompts = jax.numpy.pad(batch.prompts, ((0, 0), (0, width - batch.prompts.shape[1])))
            batches.append(dataclasses.replace(batch, prompts=prompts))
    return batches


def jsonl_batches(parser: argparse.ArgumentParser, args: argparse.Namespace, vocab_size: int) -> tuple[list[Batch], str]:
    """--per-category prompts of each category of a Spec-Bench JSONL, batched within categories:
    chat-templated at their own lengths for a chat target, else the last --prompt-len tokens."""
    chat = chat_tokenizer(args)
    if chat is not None:
        by_category = read_jsonl_prompts(parser, args.prompts_jsonl, args.per_category, getattr(args, "categories", None))
        min_width = getattr(args, "min_prompt_width", None) or 64
        batches = chat_batches(chat, by_category, args.batch_size, vocab_size, parser, min_width)
        n = sum(len(t) for t in by_category.values())
        widths = [int(w) for b in batches for w in np.asarray(b.lengths)]
        return batches, (
            f"prompts: {n} from {args.prompts_jsonl} ({len(by_category)} categories x up to {args.per_category}; "
            f"first turn in the chat template, at their own lengths {min(widths)}..{max(widths)} tokens, "
            f"padded to bucket_size(max({min_width}, length))), "
            f"batches of up to {args.batch_size}"
        )
    tokenizer = text_tokenizer(args)
    if tokenizer is None:
        parser.error(
            "--prompts-jsonl needs a tokenizer: a chat target, the code models, or a Hugging Face --target with tokenizer.json"
        )
    by_category = read_jsonl_prompts(parser, args.prompts_jsonl, args.per_category, getattr(args, "categories", None))
    batches = []
    for category, texts in by_category.items():
        for start in range(0, len(texts), args.batch_size):
            rows = [e.ids[-args.prompt_len :] or [0] for e in tokenizer.encode_batch(texts[start : start + args.batch_size])]
            batch = _padded(rows, category, vocab_size, parser)
            if batch.prompts.shape[1] < args.prompt_len:  # the code models' fixed width
                pad = args.prompt_len - batch.prompts.shape[1]
                batch = dataclasses.replace(batch, prompts=jax.numpy.pad(batch.prompts, ((0, 0), (0, pad))))
            batches.append(batch)
    n = sum(len(t) for t in by_category.values())
    return batches, (
        f"prompts: {n} from {args.prompts_jsonl} ({len(by_category)} categories x up to {args.per_category}; "
        f"first turn, last {args.prompt_len} tokens, right-padded), batches of up to {args.batch_size}"
    )


def chat_calibration(args: argparse.Namespace, n_batches: int, vocab_size: int, parser) -> list[jax.Array]:
    """Sequoia's calibration prompts for a chat target: held-out generated instructions, never the benchmark's."""
    from jspec.training.chat_prompts import chat_instructions

    texts = [i["text"] for i in chat_instructions("held_out", n_batches * args.batch_size, seed=args.seed + 1)]
    batches = chat_batches(chat_tokenizer(args), {"calibration": texts}, args.batch_size, vocab_size, parser)
    return [b.prompts for b in batches]


def sequoia_acceptance(target, drafter, batches, sampling, seed, max_new_tokens) -> Callable[[int], tuple[float, ...]]:
    """Sequoia's positional acceptance vector measured on calibration batches (`max_new_tokens`
    target-generated positions per row), per width (cached)."""
    cache: dict[int, tuple[float, ...]] = {}

    def acceptance(width: int) -> tuple[float, ...]:
        if width not in cache:
            vectors = [
                measure_acceptance(
                    target,
                    drafter,
                    prompts,
                    width=width,
                    sampling=sampling,
                    rng=jax.random.key(seed + i),
                    max_new_tokens=max_new_tokens,
                )
                for i, prompts in enumerate(batches)
            ]
            cache[width] = tuple(float(x) for x in np.mean(vectors, axis=0))
            print(
                f"sequoia acceptance vector (T={sampling.temperature:g}, width {width}): "
                + " ".join(f"{x:.3f}" for x in cache[width])
            )
        return cache[width]

    return acceptance


def run_methods(target, drafters, batches, calibration, chains, costs_for, args, context, eos_id, progress) -> list[dict]:
    """AR and every method with every drafter (`drafters`: (name, model) pairs) at every temperature on
    `batches`; one record per (method, drafter, temperature)."""
    records, ar_runs = [], {}
    for i, (name, drafter) in enumerate(drafters):
        run = _run_drafter(
            target, drafter, name, batches, calibration, chains, costs_for, args, context, eos_id, progress, ar_runs
        )
        for record in run:  # method names stay unique across drafters (tables, plots)
            if i > 0 and record["drafter"] is not None:
                record["method"] = f"{record['method']} [{name}]"
        records += run
    return records


def _run_drafter(target, drafter, name, batches, calibration, chains, costs_for, args, context, eos_id, progress, ar_runs):
    """`run_methods` for one drafter; AR runs once per temperature (`ar_runs` keeps it for the next drafters)."""
    context = {**context, "drafter": name}
    rng = jax.random.key(args.seed)
    typical = typical_prompts(batches)
    sizes = [m.nodes for m in chains] + list(args.node_budgets if context["trees"] else [])
    # Costs are measured after the median prompt, with the decode loop's cache size for the largest
    # round (bucketed as decoding buckets it), so attention spans as many slots as in decoding.
    cache_size = bucket_size(typical.shape[1]) + bucket_size(args.max_new_tokens) + max(sizes) + 1
    costs = costs_for(target, drafter, typical, sizes, cache_size, passes=args.cost_passes, runs=args.cost_runs)
    print(
        f"costs ({context['dtype']}, median ms): " + ", ".join(f"{name} {seconds * 1e3:.2f}" for name, seconds in costs.items())
    )
    records = []
    language_model = isinstance(drafter, jspec.models.Transformer)
    for temperature in args.temperatures:
        sampling = jspec.Sampling(temperature=temperature)
        methods = [m for m in chains if not (m.verifier == "greedy" and not sampling.greedy)]  # greedy: T=0 only
        common = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, rng=rng, eos_id=eos_id)
        if temperature not in ar_runs:
            progress.set_postfix_str(f"{context['dtype']} T={temperature:g} ar")
            ar_by_category = measure_by_category(
                lambda b: jspec.generate(target, b.prompts, prompt_lengths=b.lengths, **common), batches, args.repeats
            )
            ar = make_record(None, temperature, total(ar_by_category), None, costs, None, {**context, "drafter": None})
            ar["by_category"] = category_records(ar_by_category, None, True)
            records.append(ar)
            ar_runs[temperature] = ar, ar_by_category
            progress.update()
        ar, ar_by_category = ar_runs[temperature]
        trees = [t for t in args.trees if language_model or t != "sequoia"]
        if context["trees"] and args.node_budgets and trees:
            uses_sequoia = "sequoia" in trees and calibration
            acceptance = (
                sequoia_acceptance(target, drafter, calibration, sampling, args.seed, args.max_new_tokens)
                if uses_sequoia
                else None
            )
            methods = methods + [tree_method(tree, n, acceptance) for n in args.node_budgets for tree in trees]
        for method in methods:
            progress.set_postfix_str(f"{context['dtype']} T={temperature:g} {method.name} ({name})")
            by_category = measure_by_category(
                lambda b: jspec.speculative_generate(
                    target, drafter, b.prompts, prompt_lengths=b.lengths, strategy=method.strategy, **common
                ),
                batches,
                args.repeats,
            )
            t_draft_round = draft_round_seconds(
                method.strategy, drafter, typical, cache_size, sampling, target=target,
                passes=max(1, args.cost_passes // 2), runs=args.cost_runs,
            )  # fmt: skip
            record = make_record(method, temperature, total(by_category), ar["tokens_per_s"], costs, t_draft_round, context)
            record["by_category"] = category_records(by_category, ar_by_category, False)
            records.append(record)
            tqdm.write(markdown_table([record]).splitlines()[-1])
            progress.update()
            # Each method's programs are used once: drop them, or the XLA:CPU code mappings of ~60
            # methods pass Linux's 65,530 maps per process and compilation aborts.
            jax.clear_caches()
    return records


def typical_prompts(batches: list[Batch]) -> jax.Array:
    """The prompts `[B, P]` of the batch of median width: the shape the pass costs are measured at."""
    return sorted(batches, key=lambda b: b.prompts.shape[1])[len(batches) // 2].prompts


def first_per_category(batches: list[Batch], n: int) -> list[Batch]:
    """The first n batches of each category."""
    seen: dict[str, int] = {}
    out = []
    for b in batches:
        if seen.get(b.category, 0) < n:
            out.append(b)
            seen[b.category] = seen.get(b.category, 0) + 1
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, write --json and print the table. Returns the records."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dtype is not None:
        parser.error("infer.bench takes --dtypes (a list), not --dtype")
    target, drafter, description = models_from_args(parser, args)
    for budget in args.node_budgets:
        try:
            tree_width(budget)
        except ValueError as error:
            parser.error(f"--node-budgets: {error}")
    n_calibration = args.calibration_batches if "sequoia" in args.trees and args.node_budgets else 0
    chat = chat_tokenizer(args)
    if args.per_category is None:
        args.per_category = 3 if chat is not None else 2
    if chat is not None and args.prompts_jsonl is None:
        args.prompts_jsonl = default_spec_bench()
        if args.prompts_jsonl is None:
            parser.error("a chat target needs --prompts-jsonl (Spec-Bench's question.jsonl; or set $JSPEC_SPEC_BENCH)")
    if args.prompts_jsonl:
        batches, prompts_description = jsonl_batches(parser, args, target.config.vocab_size)
        if chat is not None:
            calibration = chat_calibration(args, n_calibration, target.config.vocab_size, parser) if n_calibration else []
            calibration_note = f" (Sequoia calibrated on {n_calibration} batch(es) of held-out generated instructions)"
        else:
            calibration = prompt_batches(parser, args, target.config.vocab_size, n_calibration)[0] if n_calibration else []
            calibration_note = f" (Sequoia calibrated on {n_calibration} batch(es) of held-out code)"
    else:
        all_batches, prompts_description = prompt_batches(
            parser, args, target.config.vocab_size, args.prompt_batches + n_calibration
        )
        code, calibration = all_batches[: args.prompt_batches], all_batches[args.prompt_batches :]
        batches = [Batch(p, jax.numpy.full((p.shape[0],), p.shape[1], jax.numpy.int32), "code") for p in code]
        calibration_note = f" (the last {n_calibration} calibrate Sequoia only)"
    eos_id = None if chat is None else chat.eos_id
    base_context = {
        "batch_size": args.batch_size,
        "prompt_batches": args.prompt_batches,
        "prompt_len": args.prompt_len if chat is None else None,
        "max_new_tokens": args.max_new_tokens,
        "eos_id": eos_id,
        "repeats": args.repeats,
        "models": description,
        "prompts": prompts_description + (calibration_note if n_calibration else ""),
        "machine": machine(),
    }
    print(description)
    print(base_context["prompts"])
    print(f"machine: {base_context['machine']}")

    chains = [chain_method(k, v) for v in args.verifiers for k in args.ks]
    chains += [
        chain_method(n - 1, "sampling") for n in args.node_budgets if n - 1 not in args.ks or "sampling" not in args.verifiers
    ]
    secondary_chains = [chain_method(k, "sampling") for k in args.secondary_ks or args.ks[:1]]
    plan = []  # (dtype, batches, chains, trees?) in run order
    for i, dtype in enumerate(args.dtypes):
        if i == 0:
            plan.append((dtype, batches, chains, True))
        else:  # the later dtypes: a reduced run (see --secondary-per-category)
            plan.append((dtype, first_per_category(batches, args.secondary_per_category), secondary_chains, False))
    drafters = [(args.drafter or DEMO_DRAFTER.get(args.target) or "drafter", drafter)]
    for name in args.extra_drafters:
        if name not in jspec.demo.MODELS and not os.path.exists(name):
            parser.error(f"--extra-drafters: {name!r} is neither a demo model nor an existing path")
        extra = load_drafter(name, target)
        print(f"drafter: {name} ({describe_drafter(extra)})")
        drafters.append((name, extra))
    n_runs = sum(
        len(args.temperatures) * (1 + len(drafters) * (len(c) + (len(args.node_budgets) * len(args.trees) if trees else 0)))
        for _, _, c, trees in plan
    )
    progress = tqdm(total=n_runs, desc="infer.bench", unit="method")
    records, head_to_head = [], []
    for dtype, dtype_batches, dtype_chains, trees in plan:
        same = dtype == target.config.param_dtype
        t = target if same else cast(target, dtype)
        ds = drafters if same else [(name, cast_drafter(d, dtype)) for name, d in drafters]
        context = {**base_context, "dtype": dtype, "trees": trees, "rows": sum(b.prompts.shape[0] for b in dtype_batches)}
        records += run_methods(t, ds, dtype_batches, calibration, dtype_chains, forward_costs, args, context, eos_id, progress)
        if args.hf_compare:
            head_to_head.append(hf_head_to_head(args, dtype, dtype_batches, eos_id))
            jax.clear_caches()
    progress.close()

    with open(args.json, "w") as f:
        json.dump(records, f, indent=2)
    if head_to_head:
        hf_path = os.path.splitext(args.json)[0] + "_hf.json"
        with open(hf_path, "w") as f:
            json.dump(head_to_head, f, indent=2)
        print(f"wrote the Hugging Face head-to-head to {hf_path}")
    print(markdown_table(records))
    if len(records[0]["by_category"]) > 1:
        print("\nspeedup over AR by prompt category:")
        print(category_table(records))
    for result in head_to_head:
        print(f"\nHugging Face head-to-head ({result['dtype']}, k={result['k']}, {result['rows']} prompts):")
        print_hf_table(result)
    if args.plots:
        print("plots: " + ", ".join(write_plots(records, args.plots)))
    print(f"wrote {len(records)} records to {args.json}")
    return records


def hf_head_to_head(args, dtype: str, batches: list[Batch], eos_id: int | None) -> dict:
    """transformers' greedy and assisted generation against jspec on the same prompts and weights
    (`infer.hf_compare.head_to_head`), at temperature 0 with Chain(--hf-compare)."""
    from infer import hf_compare

    if args.target != "smollm2-135m":
        raise SystemExit("--hf-compare runs with the default SmolLM2 target and drafter")
    target, drafter = hf_compare.smollm2_pair()
    chosen = first_per_category(batches, args.hf_per_category)
    rows = [np.asarray(b.prompts[i, : int(b.lengths[i])]) for b in chosen for i in range(b.prompts.shape[0])]
    result = hf_compare.head_to_head(
        target, drafter, rows, k=args.hf_compare, max_new_tokens=args.max_new_tokens, eos_id=eos_id,
        repeats=args.repeats, dtype=dtype,
    )  # fmt: skip
    result.update(rows=len(rows), machine=hf_compare.versions())
    return result


def print_hf_table(result: dict) -> None:
    from infer import hf_compare

    hf_compare.print_table(result)


if __name__ == "__main__":
    main()
