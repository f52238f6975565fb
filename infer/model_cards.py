"""Measure the bundled code models and write their model cards (jspec/demo/cards/NAME.md).

SmolLM2's cards are written by `python -m train.smollm2_drafter --export` (infer/smollm2_card.py).

    python -m infer.model_cards [--json docs/demo_models.json]

For every model: held-out loss and perplexity on the stdlib files held out from training. For
each drafter, with the target: alpha = mean(1 - TV(p, q)) on held-out windows, and tau, tokens/s
and speedup of Chain(k) speculative decoding over autoregressive decoding, at temperature 0 and 1,
on the demo prompts, all timed in this process (compile excluded). The trimmed drafter's card adds
the memory-bound speedup (MBSU). Training details come from jspec/demo/training.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import jax
import numpy as np

import jspec
from infer import bench
from infer.bench import machine
from jspec import demo
from jspec.training.corpus import STDLIB, read_corpus, split_corpus
from jspec.training.data import eval_batches, token_stream
from jspec.training.distill import measure_alpha
from jspec.training.pretrain import evaluate_covered
from jspec.training.vocab_trim import memory_bound_speedup, weights_read_per_token

ROLES = {
    "target": "the target: the model whose output speculative decoding reproduces",
    "drafter": "a drafter pretrained on the same corpus as the target, on its own",
    "drafter-distilled": "the drafter after DistillSpec distillation towards the target",
    "drafter-trimmed": "the distilled drafter with its output head trimmed to the most frequent tokens (VocabTrim)",
}


def parameter_count(model: jspec.models.Transformer) -> int:
    from flax import nnx

    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def decode_speed(target, drafter, prompts: np.ndarray, k: int, temperature: float, max_new_tokens: int, repeats: int) -> dict:
    """Decode each prompt row alone (batch 1, the latency case) as `infer.bench` does. Returns
    tokens/s (median of `repeats` per row, summed over rows) and tau over all rows."""
    common = dict(max_new_tokens=max_new_tokens, sampling=jspec.Sampling(temperature=temperature), rng=jax.random.key(0))
    if drafter is None:
        fn = lambda prompt: jspec.generate(target, prompt, **common)
    else:
        fn = lambda prompt: jspec.speculative_generate(target, drafter, prompt, strategy=jspec.Chain(k=k), **common)
    measured = bench.measure(fn, [prompts[row : row + 1] for row in range(prompts.shape[0])], repeats)
    return {"tokens_per_s": measured.tokens / measured.seconds, "tau": measured.tau}


def measure(args) -> dict:
    tokenizer = demo.tokenizer()
    _, held_docs = split_corpus(read_corpus(STDLIB), 0.05, seed=0)
    held_stream = token_stream(held_docs, tokenizer)
    loss_batches = eval_batches(held_stream, 16, 256, args.eval_batches)
    alpha_windows = [b[:, :-1] for b in loss_batches[: args.alpha_batches]]
    prompts = demo.encode_prompts(demo.prompts()[: args.prompts], args.prompt_len)
    models = {name: demo.load(name) for name in demo.CODE_MODELS}
    target = models["target"]

    results = {
        "machine": machine(),
        "held_out_tokens": int(len(held_stream)),
        "held_out_files": len(held_docs),
        "loss_tokens": int(sum(b[:, 1:].size for b in loss_batches)),
        "alpha_tokens": int(sum(w.size for w in alpha_windows)),
        "prompts": args.prompts,
        "prompt_len": args.prompt_len,
        "max_new_tokens": args.max_new_tokens,
        "k": args.k,
        "repeats": args.repeats,
        "models": {},
    }
    for name, model in models.items():
        loss, covered = evaluate_covered(model, loss_batches)
        row = {
            "parameters": parameter_count(model),
            "held_out_loss": loss,
            "held_out_ppl": math.exp(loss),
            "held_out_covered": covered,
            "weights_read_per_token": weights_read_per_token(model),
        }
        results["models"][name] = row
        print(f"{name}: {row}", flush=True)
    for t in (0.0, 1.0):
        ar = decode_speed(target, None, prompts, args.k, t, args.max_new_tokens, args.repeats)
        results["models"]["target"][f"ar_tokens_per_s_t{t:g}"] = ar["tokens_per_s"]
        for name in demo.DRAFTERS:
            row = results["models"][name]
            spec = decode_speed(target, models[name], prompts, args.k, t, args.max_new_tokens, args.repeats)
            row[f"alpha_t{t:g}"] = measure_alpha(target, models[name], alpha_windows, t)
            row[f"tau_t{t:g}"] = spec["tau"]
            row[f"tokens_per_s_t{t:g}"] = spec["tokens_per_s"]
            row[f"speedup_t{t:g}"] = spec["tokens_per_s"] / ar["tokens_per_s"]
            row[f"mbsu_t{t:g}"] = memory_bound_speedup(spec["tau"], args.k, models[name], target)
            print(
                f"T={t:g} {name}: alpha {row[f'alpha_t{t:g}']:.3f} tau {spec['tau']:.2f} "
                f"{spec['tokens_per_s']:.1f} tok/s vs AR {ar['tokens_per_s']:.1f} -> {row[f'speedup_t{t:g}']:.2f}x",
                flush=True,
            )
    return results


def _config_table(config: jspec.models.ModelConfig, parameters: int) -> str:
    rows = [
        ("parameters", f"{parameters:,}"),
        ("layers", config.n_layers),
        ("d_model", config.d_model),
        ("heads / kv heads", f"{config.n_heads} / {config.n_kv_heads}"),
        ("d_ff", config.d_ff),
        ("vocabulary", config.vocab_size),
        ("output head tokens", config.head_tokens or config.vocab_size),
        ("max_seq_len", config.max_seq_len),
        ("tied embeddings", config.tie_embeddings),
    ]
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def _tokens_seen(summary: dict) -> str:
    train = summary.get("train_config")
    if not train:
        return "none (no gradient steps: the head is sliced from the distilled drafter)"
    steps, batch, length = train["steps"], train["batch_size"], train["seq_len"]
    return f"{steps * batch * length:,} ({steps} steps x {batch} x {length})"


def bench_section(records: list[dict], path: str) -> list[str]:
    """The target card's summary of an `infer.bench` run (its JSON records)."""
    first = records[0]
    return [
        "",
        "## infer.bench",
        "",
        f"`python -m infer.bench --json {path}` on {first['machine']}: {first['models'].splitlines()[-1]}; "
        f"{first['prompts'].removeprefix('prompts: ')}; {first['max_new_tokens']} new tokens; speedup over "
        "autoregressive decoding in the same process; nodes = tokens the target scores per round; theoretical = "
        "tau x t_target(1) / (t_draft_round + t_target(nodes)) from the measured costs (docs/benchmarks.md).",
        "",
        bench.markdown_table(records),
    ]


def write_card(name: str, results: dict, training: dict, path: str, bench_records: tuple[str, list[dict]] | None = None) -> None:
    model = demo.load(name)
    row = results["models"][name]
    summary = training[name]["summary"]
    lines = [
        f"# jspec demo model: `{name}`",
        "",
        f"{ROLES[name][0].upper()}{ROLES[name][1:]}. Load it with `jspec.demo.load({name!r})`; the tokenizer is "
        "`jspec.demo.tokenizer()` (byte-level BPE, 8192 tokens, trained on the training split).",
        "",
        "## Config",
        "",
        _config_table(model.config, row["parameters"]),
        "",
        "## Data and training",
        "",
        f"- Corpus: the Python {'.'.join(map(str, __import__('sys').version_info[:3]))} standard library's `.py` files "
        "(no site-packages), split by file: 95% train, 5% held out (sha256 of the file name, seed 0).",
        f"- Tokens seen: {_tokens_seen(summary)}.",
    ]
    if "distill_config" in summary:
        d = summary["distill_config"]
        lines.append(
            f"- Distillation: divergence {d['divergence']}, data `{d['data']}` (sequences sampled at temperature "
            f"{d['temperature']:g} after {d['prompt_len']}-token corpus prompts), from `drafter`."
        )
    if "keep" in summary:
        lines.append(
            f"- Vocabulary trimming: kept {summary['keep']} of {summary['vocab_size']} output tokens, the most frequent "
            f"in the target's own generations (covering {summary['coverage']:.1%} of them); the token map is stored "
            "in the checkpoint and drafting scatters q back to the full vocabulary, so verification stays exact."
        )
    if summary.get("seconds_this_run"):
        lines.append(f"- Training time: {summary['seconds_this_run'] / 60:.0f} min on {results['machine'].split(';')[0]}.")
    lines += [
        "- Command (from the repository root; the whole recipe is `python -m train.demo_models`):",
        "",
        f"      {training[name]['command']}",
        "",
    ]
    lines += [
        "## Measured",
        "",
        f"Measured by `python -m infer.model_cards` on {results['machine']}.",
        "",
        f"- Held-out loss {row['held_out_loss']:.3f} nats/token, perplexity {row['held_out_ppl']:.2f} "
        f"({results['loss_tokens']:,} tokens of {results['held_out_files']} held-out files).",
    ]
    if row["held_out_covered"] < 1:
        lines[-1] = lines[-1][:-1] + (
            f", over the {row['held_out_covered']:.1%} of positions whose next token its head covers: it gives "
            "the others probability 0 (infinite loss), which speculative decoding repairs by resampling from the target."
        )
    if name == "target":
        lines.append(
            f"- Autoregressive decoding, batch 1: {row['ar_tokens_per_s_t0']:.1f} tokens/s at T=0, "
            f"{row['ar_tokens_per_s_t1']:.1f} at T=1."
        )
        if bench_records is not None:
            lines += bench_section(bench_records[1], bench_records[0])
    else:
        lines += [
            "",
            f"With the target, Chain(k={results['k']}) speculative decoding, sampling verifier, batch 1, "
            f"{results['prompts']} held-out code prompts of {results['prompt_len']} tokens, {results['max_new_tokens']} new "
            f"tokens each (speedup: tokens/s over autoregressive decoding of the target in the same process, "
            f"median of {results['repeats']} timed calls per prompt):",
            "",
            "| temperature | alpha | tau | tokens/s | speedup | MBSU |",
            "|---|---|---|---|---|---|",
        ]
        for t in ("0", "1"):
            lines.append(
                f"| {t} | {row[f'alpha_t{t}']:.3f} | {row[f'tau_t{t}']:.2f} | {row[f'tokens_per_s_t{t}']:.1f} | "
                f"{row[f'speedup_t{t}']:.2f}x | {row[f'mbsu_t{t}']:.2f}x |"
            )
        lines += [
            "",
            f"alpha over {results['alpha_tokens']:,} held-out positions; tau = tokens per target pass; MBSU = "
            "memory-bound speedup from weights read per token (VocabTrim, arXiv 2506.22694).",
        ]
        if name == "drafter-trimmed":
            ratio = {
                t: row[f"tokens_per_s_t{t}"] / results["models"]["drafter-distilled"][f"tokens_per_s_t{t}"] for t in ("0", "1")
            }
            lines += [
                "",
                f"Against the untrimmed (distilled) drafter in the same measurement: {ratio['0']:.2f}x its tokens/s at "
                f"T=0, {ratio['1']:.2f}x at T=1; MBSU {row['mbsu_t0'] / results['models']['drafter-distilled']['mbsu_t0']:.2f}x "
                "its MBSU at T=0.",
            ]
        if "before" in summary:
            b, a = summary["before"], summary.get("after", {})
            lines += [
                "",
                "Distillation, as reported by `train.distill` on its own held-out measurement (k=4, 16 prompts):",
                "",
                "| | alpha T=0 | alpha T=1 | tau T=0 | tau T=1 |",
                "|---|---|---|---|---|",
                f"| before | {b['alpha_t0']:.3f} | {b['alpha_t1']:.3f} | {b['tau_t0']:.2f} | {b['tau_t1']:.2f} |",
                f"| after | {a['alpha_t0']:.3f} | {a['alpha_t1']:.3f} | {a['tau_t0']:.2f} | {a['tau_t1']:.2f} |",
            ]
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m infer.model_cards", description=__doc__.split("\n")[0])
    p.add_argument("--json", default="docs/demo_models.json", help="where to write the measurements")
    p.add_argument("--cards", default=str(demo.DEMO_DIR / "cards"), help="folder of the model cards")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eval-batches", type=int, default=16, help="held-out batches (16 x 256 tokens) of the loss")
    p.add_argument("--alpha-batches", type=int, default=4, help="of those, the batches alpha is measured on")
    p.add_argument(
        "--bench",
        default="docs/bench_cpu_demo.json",
        help="an `infer.bench --json` file summarised in the target's card, if it exists",
    )
    p.add_argument("--cards-only", action="store_true", help="measure nothing: rewrite the cards from --json")
    args = p.parse_args(argv)
    if args.cards_only:
        with open(args.json) as f:
            results = json.load(f)
    else:
        results = measure(args)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    with open(demo.DEMO_DIR / "training.json") as f:
        training = json.load(f)
    bench_records = None
    if os.path.exists(args.bench):
        with open(args.bench) as f:
            bench_records = (args.bench, json.load(f))
    os.makedirs(args.cards, exist_ok=True)
    for name in demo.CODE_MODELS:
        write_card(name, results, training, os.path.join(args.cards, f"{name}.md"), bench_records)
    print(f"wrote {args.json} and {len(demo.CODE_MODELS)} cards in {args.cards}")
    return results


if __name__ == "__main__":
    main()
