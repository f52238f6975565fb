"""Train SmolLM2-135M-Instruct's drafter end to end and bundle it (`jspec.demo.load("smollm2-135m-drafter")`).

    python -m train.smollm2_drafter [--runs runs/smollm2] [--export]

Runs, in order, the training commands of RECIPE (each one of this repository's `train/` scripts)
into RUNS/<name>; a step whose output exists is skipped and an interrupted step resumes (data
shards and Orbax checkpoints), so re-running the command finishes the job. The steps:

1. data: SmolLM2 answers instructions built here (`jspec.training.chat_prompts`: templates over
   seed lists written here, stdlib docstrings and code, arithmetic problems; never Spec-Bench),
   recording its top-32 next-token distribution at every answer position (`train.chat_data`). The
   plan answers 60% of 3200 instructions greedily and 40% at temperature 1; the bundled drafter was
   trained on the shards of TRAIN_SHARDS (81 greedy, 10 sampled). A held-out set comes from
   held-out stdlib files.
2. compare: the drafter designs of DESIGNS, each distilled for the same steps on the same first
   COMPARE_SHARDS shards, scored on the held-out answers (alpha) and by cost (one drafter step
   against one target pass on this machine): the design with the best predicted speedup wins.
3. drafter: the winner, VocabTrim'd to the KEEP tokens the target emits most and distilled
   (DistillSpec, forward KL to the target's top-32 distribution) on all shards.

With --export it then measures the drafter (alpha and tau at temperature 0 and 1, the cost of a
drafter step against a target pass, the speedup of Chain(k) decoding on held-out instructions) and
copies it into jspec/demo/models/smollm2-135m-drafter, without the embedding table it shares with
the target, with its card (jspec/demo/cards/smollm2-135m-drafter.md) and the recipe's numbers in
jspec/demo/smollm2_drafter.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jspec", "demo")
NAME = "smollm2-135m-drafter"
KEEP = 8192
COMPARE_SHARDS = 50
COMPARE_STEPS = 150
# --init of train.self_distill: the target's first block(s), or a small model from scratch.
DESIGNS = {"shallow-1": "shallow:1", "shallow-2": "shallow:2", "scratch-256-4": "scratch:256:4:768"}

_COMPARE = [
    "train.self_distill", "--data", "{runs}/data/train", "--held-out", "{runs}/data/held_out",
    "--max-shards", str(COMPARE_SHARDS), "--keep", str(KEEP), "--steps", str(COMPARE_STEPS), "--eval-every", "50",
    "--checkpoint-every", "50", "--warmup-steps", "15", "--no-progress",
]  # fmt: skip
# The training answers are the first 81 (greedy) and 10 of the sampled (temperature 1) shards of a
# 3200-instruction plan: what two generation jobs wrote in the time this recipe was given (about
# 55 answer tokens/s each on 2 shared cores). The whole plan is `--shard-range 0:200`.
TRAIN_SHARDS = ("0:81", "120:130")
RECIPE: dict[str, list[str]] = {
    **{
        f"data/train[{r}]": [
            "train.chat_data", "--out", "{runs}/data/train", "--split", "train", "--n", "3200", "--shard-range", r,
        ]
        for r in TRAIN_SHARDS
    },
    "data/held_out": [
        "train.chat_data", "--out", "{runs}/data/held_out", "--split", "held_out", "--n", "200", "--exclude-train", "3200",
    ],
    **{
        f"compare-{name}": [*_COMPARE, "--init", init, "--learning-rate", "2e-3" if name.startswith("scratch") else "1e-3",
                            "--out", f"{{runs}}/compare-{name}"]
        for name, init in DESIGNS.items()
    },
    "drafter": [
        "train.self_distill", "--data", "{runs}/data/train", "--held-out", "{runs}/data/held_out", "--init", "{winner}",
        "--keep", str(KEEP), "--steps", "2000", "--learning-rate", "2e-3", "--warmup-steps", "60", "--eval-every", "250",
        "--checkpoint-every", "100", "--out", "{runs}/drafter", "--no-progress",
    ],
}  # fmt: skip


def command(step: str, runs: str, winner: str = "shallow:1") -> list[str]:
    return [sys.executable, "-m", *(a.format(runs=runs, winner=winner) for a in RECIPE[step])]


def _done(step: str, runs: str) -> bool:
    if step.startswith("data/train["):
        first, last = (int(x) for x in step[len("data/train[") : -1].split(":"))
        return all(os.path.exists(os.path.join(runs, "data", "train", f"shard-{b:05d}.npz")) for b in range(first, last))
    if step.startswith("data/"):
        return os.path.exists(os.path.join(runs, step, "summary.json"))
    return os.path.exists(os.path.join(runs, step, "summary.json")) and os.path.exists(os.path.join(runs, step, "model"))


def run_step(step: str, runs: str, winner: str = "shallow:1") -> float:
    """Run a recipe step unless it is done; returns the seconds it took (0 if skipped)."""
    if _done(step, runs):
        print(f"[{step}] done, skipped")
        return 0.0
    cmd = command(step, runs, winner)
    print(f"[{step}] {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - start


def design_costs(target, runs: str) -> dict[str, dict]:
    """Per design: held-out alpha (from its summary) and the cost of a drafter step and of target
    passes over 1..9 tokens, measured here; with them the best chain length and its predicted speedup."""
    import jax.numpy as jnp

    from infer.timing import forward_seconds
    from jspec import analysis
    from jspec.models import load

    prompts = jnp.arange(1, 129, dtype=jnp.int32)[None] + 1000
    cache = 128 + 160 + 16
    t_target = {n: forward_seconds(target, prompts, cache, n) for n in range(1, 10)}
    out = {}
    for name in DESIGNS:
        summary = json.load(open(os.path.join(runs, f"compare-{name}", "summary.json")))
        shared = {"embed": {"embedding": target.embed.embedding[...]}} if summary["frozen_embedding"] else None
        drafter = load(os.path.join(runs, f"compare-{name}", "model"), shared=shared)
        t_draft = forward_seconds(drafter, prompts, cache, 1)
        final = summary["history"][-1]
        predicted = {
            k: analysis.speedup_from_costs(analysis.expected_tau(final["alpha_t0"], k), k * t_draft, t_target[k + 1], t_target[1])
            for k in range(1, 9)
        }
        best = max(predicted, key=predicted.get)
        out[name] = {
            "init": DESIGNS[name],
            "alpha_t0": final["alpha_t0"],
            "alpha_t1_top_k": final["alpha_t1_top_k"],
            "cross_entropy": final["cross_entropy"],
            "t_draft_over_t_target": t_draft / t_target[1],
            "best_k": best,
            "predicted_speedup_t0": predicted[best],
        }
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in out[name].items()))
    out["_t_target_ms"] = {n: t * 1e3 for n, t in t_target.items()}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.smollm2_drafter", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs/smollm2", help="run directory (default: runs/smollm2)")
    parser.add_argument("--export", action="store_true", help="measure the drafter and bundle it into jspec/demo")
    args = parser.parse_args(argv)
    import jspec

    seconds = {}
    for step in (*(f"data/train[{r}]" for r in TRAIN_SHARDS), "data/held_out", *(f"compare-{n}" for n in DESIGNS)):
        seconds[step] = run_step(step, args.runs)
    target = jspec.demo.load("smollm2-135m")
    comparison = design_costs(target, args.runs)
    winner = max(DESIGNS, key=lambda n: comparison[n]["predicted_speedup_t0"])
    print(f"winner: {winner} ({DESIGNS[winner]})")
    seconds["drafter"] = run_step("drafter", args.runs, DESIGNS[winner])
    record_path = os.path.join(args.runs, "recipe.json")
    record = json.load(open(record_path)) if os.path.exists(record_path) else {"seconds": {}}
    record["seconds"].update({k: v for k, v in seconds.items() if v})
    record.update(
        comparison=comparison,
        winner=winner,
        commands={step: " ".join(["python", "-m", *command(step, args.runs, DESIGNS[winner])[2:]]) for step in RECIPE},
        machine=f"{platform.machine()}, {os.cpu_count()} CPU cores",
    )
    with open(record_path, "w") as f:
        json.dump(record, f, indent=2)
    if args.export:
        export(target, args.runs, record)


def export(target, runs: str, record: dict) -> None:
    """Measure the trained drafter, bundle it and write its card."""
    from infer.smollm2_card import smollm2_measurements, write_smollm2_cards

    destination = os.path.join(DEMO_DIR, "models", NAME)
    if os.path.exists(destination):
        shutil.rmtree(destination)
    shutil.copytree(os.path.join(runs, "drafter", "model"), destination)
    record["drafter_summary"] = json.load(open(os.path.join(runs, "drafter", "summary.json")))
    record["measured"] = smollm2_measurements(target, runs)
    with open(os.path.join(DEMO_DIR, "smollm2_drafter.json"), "w") as f:
        json.dump(record, f, indent=2)
    write_smollm2_cards(record)
    print(f"exported {NAME} to {destination}")


if __name__ == "__main__":
    main()
