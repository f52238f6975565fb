"""Train the bundled demo models end to end and export them into the package (`jspec.demo`).

    python -m train.demo_models [--runs runs] [--export]

Runs, in order, the training commands of RECIPE (each one of this repository's `train/` scripts),
into RUNS/<name>; a step whose model already exists is skipped and an interrupted step resumes from
its last checkpoint, so re-running the command finishes the job. With --export it then copies the
five models (the four code models and the hybrid target), the tokenizer and held-out demo prompts
into jspec/demo/ (the model cards are written
by `python -m infer.model_cards`). The recipe is sized for a 2-core CPU: the bundled models took
41 minutes (target), 37 (drafter, trained at the same time as the target, sharing the cores) and
21 (distillation), plus a few for the tokenizer and the trim; the hybrid target took 58 (sharing
the cores with a test run). On an accelerator, use the larger
presets (target-16m, drafter-4m) and more steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

from jspec.training.corpus import STDLIB, code_prompts, read_corpus, split_corpus

DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jspec", "demo")

# name -> the training command (a module of train/ and its arguments); {runs} is the runs folder.
RECIPE: dict[str, list[str]] = {
    "target": [
        "train.pretrain",
        "--preset",
        "target-7m",
        "--out",
        "{runs}/target",
        "--tokenizer",
        "{runs}/tokenizer.json",
        "--steps",
        "1000",
        "--learning-rate",
        "1.5e-3",
        "--warmup-steps",
        "100",
        "--eval-every",
        "100",
        "--checkpoint-every",
        "100",
        "--no-progress",
    ],
    "drafter": [
        "train.pretrain",
        "--preset",
        "drafter-1.5m",
        "--out",
        "{runs}/drafter",
        "--tokenizer",
        "{runs}/tokenizer.json",
        "--steps",
        "1000",
        "--learning-rate",
        "2e-3",
        "--warmup-steps",
        "100",
        "--eval-every",
        "100",
        "--checkpoint-every",
        "100",
        "--no-progress",
    ],
    "drafter-distilled": [
        "train.distill",
        "--target",
        "{runs}/target/model",
        "--drafter",
        "{runs}/drafter/model",
        "--tokenizer",
        "{runs}/tokenizer.json",
        "--out",
        "{runs}/drafter-distilled",
        "--divergence",
        "fkl",
        "--data",
        "target",
        "--temperature",
        "1",
        "--prompt-len",
        "32",
        "--seq-len",
        "128",
        "--batch-size",
        "16",
        "--steps",
        "800",
        "--learning-rate",
        "5e-4",
        "--warmup-steps",
        "80",
        "--eval-every",
        "200",
        "--checkpoint-every",
        "100",
        "--no-progress",
    ],
    "drafter-trimmed": [
        "train.vocab_trim",
        "--target",
        "{runs}/target/model",
        "--drafter",
        "{runs}/drafter-distilled/model",
        "--tokenizer",
        "{runs}/tokenizer.json",
        "--out",
        "{runs}/drafter-trimmed",
        "--keep",
        "2048",
    ],
    # The hybrid state-space target (Mamba-2 and attention layers, jspec.models.mamba2); drafted by "drafter".
    "hybrid": [
        "train.pretrain",
        "--preset",
        "hybrid-7m",
        "--out",
        "{runs}/hybrid",
        "--tokenizer",
        "{runs}/tokenizer.json",
        "--steps",
        "500",
        "--learning-rate",
        "1.5e-3",
        "--warmup-steps",
        "50",
        "--eval-every",
        "100",
        "--checkpoint-every",
        "50",
        "--no-progress",
    ],
}


def command(name: str, runs: str) -> list[str]:
    """The recipe's command for `name` as `python -m ...` arguments."""
    return ["python", "-m", *(arg.format(runs=runs) for arg in RECIPE[name])]


def export(runs: str, demo_dir: str = DEMO_DIR, n_prompts: int = 32) -> None:
    """Copy the trained models and the tokenizer into demo_dir, with held-out prompts and the
    training summaries (the model cards' sources)."""
    os.makedirs(os.path.join(demo_dir, "models"), exist_ok=True)
    shutil.copyfile(os.path.join(runs, "tokenizer.json"), os.path.join(demo_dir, "tokenizer.json"))
    summaries = {}
    for name in RECIPE:
        dst = os.path.join(demo_dir, "models", name)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        shutil.copytree(os.path.join(runs, name, "model"), dst)
        with open(os.path.join(runs, name, "summary.json")) as f:
            summaries[name] = {"command": " ".join(command(name, "runs")), "summary": json.load(f)}
    with open(os.path.join(demo_dir, "training.json"), "w") as f:
        json.dump(summaries, f, indent=2)
    _, held = split_corpus(read_corpus(STDLIB), 0.05, seed=0)
    with open(os.path.join(demo_dir, "prompts.json"), "w") as f:
        json.dump(code_prompts(held, n_prompts), f, indent=1)
    print(f"exported {len(RECIPE)} models, the tokenizer and {n_prompts} prompts to {demo_dir}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.demo_models", description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="runs", help="folder of the training runs (default: runs)")
    p.add_argument("--only", choices=sorted(RECIPE), nargs="+", help="run only these steps")
    p.add_argument("--export", action="store_true", help="copy the results into jspec/demo/")
    args = p.parse_args(argv)
    for name in args.only or RECIPE:
        if os.path.exists(os.path.join(args.runs, name, "model")):
            print(f"{name}: done ({args.runs}/{name}/model exists)")
            continue
        cmd = command(name, args.runs)
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run([sys.executable, *cmd[1:]], check=True)
    if args.export:
        export(args.runs)


if __name__ == "__main__":
    main()
