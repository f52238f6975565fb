"""Measure an EAGLE head trained for SmolLM2-135M-Instruct, bundle it and write its model card.

    python -m infer.eagle_card --run runs/smollm2/eagle1 [--export]

Measured on held-out instructions (those of the held-out shards, never Spec-Bench), batch 1, in one
process: tau, tokens/s and speedup over autoregressive decoding of chains and EAGLE-2 trees drafted
by the head, next to the bundled language-model drafter's Chain(k=2); the cost of the head's round
against one target pass. Alpha by draft position comes from the training run's held-out report
(`train.eagle`). With --export the head is copied into jspec/demo/models/smollm2-135m-eagle (without
the embedding table it shares with SmolLM2), the numbers into jspec/demo/smollm2_eagle.json and the
card into jspec/demo/cards/smollm2-135m-eagle.md; without it, the card is only printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import jax

import jspec
from infer import bench
from infer.bench import machine
from infer.smollm2_card import held_out_chat_batches
from infer.timing import draft_round_seconds, forward_seconds
from jspec import demo
from jspec.eagle import load_head

DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jspec", "demo")
METHODS = {
    "Chain(k=2)": jspec.Chain(k=2),
    "Chain(k=3)": jspec.Chain(k=3),
    "EagleTree(top_k=2, depth=2, size=5)": jspec.EagleTree(top_k=2, depth=2, size=5),
    "EagleTree(top_k=2, depth=4, size=9)": jspec.EagleTree(top_k=2, depth=4, size=9),
}


def _parameters(model, *, shipped: bool) -> int:
    from flax import nnx

    state = nnx.state(model, nnx.Param).to_pure_dict()
    if shipped:
        state = {k: v for k, v in state.items() if k != "embed"}
    return int(sum(x.size for x in jax.tree.leaves(state)))


def measure(target, head, runs: str, prompts: int, max_new_tokens: int) -> dict:
    drafter = demo.load(demo.SMOLLM2_DRAFTER)
    chat = demo.tokenizer(demo.SMOLLM2)
    texts, batches, typical, cache = held_out_chat_batches(runs, prompts, max_new_tokens, target.config.vocab_size)
    t_target = forward_seconds(target, typical, cache, 1)
    out = {
        "machine": machine(),
        "prompts": len(texts),
        "max_new_tokens": max_new_tokens,
        "t_target_1_ms": t_target * 1e3,
        "head_parameters_shipped": _parameters(head, shipped=True),
        "rows": [],
    }
    for t in (0.0, 1.0):
        sampling = jspec.Sampling(temperature=t)
        common = dict(max_new_tokens=max_new_tokens, sampling=sampling, rng=jax.random.key(0), eos_id=chat.eos_id)
        ar = bench.measure(lambda b: jspec.generate(target, b.prompts, prompt_lengths=b.lengths, **common), batches, 1)
        runs_ = [(name, "eagle head", head, s) for name, s in METHODS.items()]
        runs_.append(("Chain(k=2)", demo.SMOLLM2_DRAFTER, drafter, jspec.Chain(k=2)))
        for name, drafter_name, model, strategy in runs_:
            spec = bench.measure(
                lambda b: jspec.speculative_generate(
                    target, model, b.prompts, prompt_lengths=b.lengths, strategy=strategy, **common
                ),
                batches, 1,
            )  # fmt: skip
            round_s = draft_round_seconds(strategy, model, typical, cache, sampling, target=target)
            row = {
                "temperature": t, "method": name, "drafter": drafter_name, "tokens_scored": strategy.tokens_scored,
                "tau": spec.tau, "ar_tokens_per_s": ar.tokens / ar.seconds, "tokens_per_s": spec.tokens / spec.seconds,
                "speedup": (spec.tokens / spec.seconds) / (ar.tokens / ar.seconds),
                "draft_round_over_target": round_s / t_target, "acceptance_by_position": spec.acceptance_by_position(),
            }  # fmt: skip
            out["rows"].append(row)
            print(
                f"T={t:g} {name} ({drafter_name}): tau {row['tau']:.2f}, {row['tokens_per_s']:.1f} tok/s vs AR "
                f"{row['ar_tokens_per_s']:.1f} -> {row['speedup']:.2f}x, draft round {row['draft_round_over_target']:.1%} "
                "of a target pass",
                flush=True,
            )
            jax.clear_caches()
    return out


def card(record: dict) -> str:
    m, s = record["measured"], record["summary"]
    final = s["history"][-1]
    steps = len([k for k in final if k.startswith("alpha_")])
    trim = s["vocab_trim"]
    lines = [
        f"# jspec demo model: `{demo.SMOLLM2_EAGLE}`",
        "",
        f"An {s['kind'].upper().replace('EAGLE', 'EAGLE-')} head (`jspec.eagle`) for SmolLM2-135M-Instruct: it reads SmolLM2's "
        f"hidden states {tuple(s['feature_layers'])} (Hugging Face `hidden_states` numbering; 30 is the final normed "
        "output) from the same pass that verifies, and drafts with one decoder layer and SmolLM2's own output head"
        + (f" cut to the {trim['keep']} tokens SmolLM2 emits most (VocabTrim)" if trim else "")
        + ". Load it with `jspec.demo.load('smollm2-135m-eagle')` (the embedding table it shares with SmolLM2 comes "
        "from SmolLM2's file) and pass it as the drafter: `jspec.speculative_generate(target, head, prompts, "
        "strategy=jspec.EagleTree(top_k=2, depth=4, size=9))` is EAGLE-2.",
        "",
        "## Size",
        "",
        f"- Parameters shipped: {m['head_parameters_shipped']:,} (the 28.3M-parameter embedding is SmolLM2's).",
        "",
        "## Data and training",
        "",
        f"- Data: SmolLM2's own answers to instructions built on this machine (`train.chat_data`, the same shards as "
        f"`smollm2-135m-drafter`; never Spec-Bench): {s['train_answers']} answers, {s['train_answer_tokens']:,} answer "
        f"tokens; the target ran over them once for its features and top-32 distributions.",
        f"- Loss: training-time test over {s['args']['ttt_steps']} draft steps (each step reads the head's own "
        "previous outputs under a drafted chain's attention), forward KL to SmolLM2's top-32 distribution"
        + (", plus the regression onto SmolLM2's next feature (EAGLE-1)" if s["kind"] == "eagle1" else "")
        + ".",
        f"- {s['args']['steps']} steps of {s['args']['batch_size']} rows x {s['args']['row_len']} tokens, AdamW, "
        f"peak learning rate {s['args']['learning_rate']:g}.",
        f"- Command: `python -m train.eagle {' '.join(s['args_argv'])}`",
        "",
        "## Held-out acceptance (greedy, by draft position)",
        "",
        "alpha_s: the share of held-out answer positions where the head's drafts 1 .. s all equal SmolLM2's argmax "
        "(given the true prefix); a greedy chain of s drafts then has tau = 1 + sum of alpha_1 .. alpha_s.",
        "",
        "| | " + " | ".join(f"alpha_{i + 1}" for i in range(steps)) + " | tau (chain) |",
        "|---|" + "---|" * (steps + 1),
        "| untrained | "
        + " | ".join(f"{s['before'][f'alpha_{i + 1}']:.3f}" for i in range(steps))
        + f" | {s['before']['tau_chain']:.2f} |",
        f"| step {final['step']} | "
        + " | ".join(f"{final[f'alpha_{i + 1}']:.3f}" for i in range(steps))
        + f" | {final['tau_chain']:.2f} |",
        "",
        "## Measured",
        "",
        f"On {m['prompts']} held-out instructions, batch 1, up to {m['max_new_tokens']} new tokens, one run on "
        f"{m['machine']}. A SmolLM2 pass over 1 token: {m['t_target_1_ms']:.2f} ms.",
        "",
        "| T | method | drafter | tokens scored | tau | tokens/s | AR tokens/s | speedup | draft round / target pass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in m["rows"]:
        lines.append(
            f"| {r['temperature']:g} | {r['method']} | {r['drafter']} | {r['tokens_scored']} | {r['tau']:.2f} | "
            f"{r['tokens_per_s']:.1f} | {r['ar_tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['draft_round_over_target']:.1%} |"
        )
    lines += [
        "",
        "Decoding with the head is lossless: greedy output equals SmolLM2's greedy output token for token "
        "(tests/test_smollm2.py), and at T=1 the verifiers keep SmolLM2's distribution whatever the head proposes.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m infer.eagle_card", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="the train.eagle output directory (head/, summary.json)")
    p.add_argument("--runs", default="runs/smollm2", help="where the chat data shards are (default: runs/smollm2)")
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--export", action="store_true")
    args = p.parse_args(argv)
    with open(os.path.join(args.run, "summary.json")) as f:
        summary = json.load(f)
    summary["args_argv"] = _argv(summary["args"])
    target = demo.load(demo.SMOLLM2)
    head = load_head(os.path.join(args.run, "head"), target)
    record = {"summary": summary, "measured": measure(target, head, args.runs, args.prompts, args.max_new_tokens)}
    text = card(record)
    print(text)
    if args.export:
        dest = os.path.join(DEMO_DIR, "models", demo.SMOLLM2_EAGLE)
        if os.path.exists(dest):
            shutil.rmtree(dest)
        shutil.copytree(os.path.join(args.run, "head"), dest)
        with open(os.path.join(DEMO_DIR, "smollm2_eagle.json"), "w") as f:
            json.dump(record, f, indent=2)
        with open(os.path.join(DEMO_DIR, "cards", f"{demo.SMOLLM2_EAGLE}.md"), "w") as f:
            f.write(text)
        print(f"exported to {dest}")


def _argv(args: dict) -> list[str]:
    """The train.eagle command line of a summary's args."""
    out = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False or key in ("no_progress", "stop_after"):
            continue
        out += [flag] if value is True else [flag, str(value)]
    return out


if __name__ == "__main__":
    main()
