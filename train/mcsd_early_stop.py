"""Train the early-stop decision model of MultiCandidate (Improved MCSD) from real decoding rounds.

    python -m train.mcsd_early_stop --out runs/mcsd-early-stop             # demo target + drafter-distilled
    python -m train.mcsd_early_stop --target DIR --drafter DIR --prompt-source random --out ...

Runs MultiCandidate(k_config) rounds of the drafter and target on prompts (the demo prompts by
default), and records for every round and level l >= 1 that the walk reached (accepted >= l) the
features of `jspec.methods.early_stop.level_features` and whether the next level was accepted
(accepted >= l + 1). Prompts are split into train and held-out ones; a tiny MLP is fitted with
optax, held-out accuracy is printed (with the majority-class baseline), and the model is saved
with Orbax to OUT/early_stop (load it with `jspec.methods.early_stop.load`), with OUT/summary.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jspec import demo
from jspec.drafters import ModelDrafter, Prefill, prefill_model
from jspec.methods import early_stop as es
from jspec.methods.multi_candidate import MultiCandidate, draft_levels
from jspec.models import load
from jspec.sampling import Sampling, sample, warp


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.mcsd_early_stop", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--target", help="target model directory (default: jspec.demo 'target')")
    p.add_argument("--drafter", help="drafter model directory (default: jspec.demo 'drafter-distilled')")
    p.add_argument(
        "--prompt-source",
        choices=("demo", "random"),
        default="demo",
        help="jspec.demo.prompts() or uniform random tokens (for models without a tokenizer)",
    )
    p.add_argument("--prompts", type=int, default=64, help="number of prompts (demo: at most the bundled ones)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=16, help="speculative rounds recorded per prompt")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per decoding call")
    p.add_argument("--k-config", default="2,2,2,1", help="the maximal tree, comma-separated")
    p.add_argument("--without-replacement", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--held-out-fraction", type=float, default=0.25)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--learning-rate", type=float, default=1e-2)
    p.add_argument("--hidden", type=int, default=8)
    p.add_argument("--threshold", type=float, default=0.5, help="saved with the model")
    p.add_argument("--seed", type=int, default=0)
    return p


@functools.partial(jax.jit, static_argnames=("target_graph", "drafter_graph", "strategy", "sampling", "rounds"))
def _collect(target_graph, target_state, drafter_graph, drafter_state, prompts, key, *, strategy, sampling, rounds):
    """features `[R, B, L-1, F]` of each round's levels 1 .. L-1 and accepted drafts `[R, B]`."""
    target, drafter = nnx.merge(target_graph, target_state), nnx.merge(drafter_graph, drafter_state)
    b, p = prompts.shape
    lengths = jnp.full((b,), p, jnp.int32)
    size = p + rounds * strategy.tokens_per_round + strategy.tokens_scored + 1
    key_prefill, key_rounds = jax.random.split(key)
    drafter = ModelDrafter(drafter)
    logits, target_cache, _ = prefill_model(target, prompts, lengths, size)
    first = sample(key_prefill, warp(logits, sampling))
    carry = strategy.init(target, drafter, Prefill(prompts, lengths, target_cache, None), first, sampling)
    active = jnp.ones((b,), bool)

    def one_round(carry, key):
        # A round drafts with the first half of split(key): re-drafting with it gives the same
        # tree, whose features we record (the drafter is cheap next to the target).
        key_draft, _ = jax.random.split(key)
        _, features = draft_levels(strategy, drafter, carry.drafter, carry.last, sampling, key_draft)
        carry, _, n_emitted = strategy.round(target, drafter, carry, active, sampling, key)
        return carry, (features, n_emitted - 1)

    _, (features, accepted) = jax.lax.scan(one_round, carry, jax.random.split(key_rounds, rounds))
    return features, accepted


def examples(features: np.ndarray, accepted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(features [R, B, L-1, F], accepted [R, B]) -> the examples of levels the walk reached:
    features `[S, F]` and labels `[S]` (1: the next level was accepted too)."""
    level = np.arange(1, features.shape[2] + 1)[None, None, :]
    reached = accepted[:, :, None] >= level
    labels = (accepted[:, :, None] >= level + 1)[reached]
    return features[reached].astype(np.float32), labels.astype(np.float32)


def _prompts(args, vocab_size: int) -> np.ndarray:
    if args.prompt_source == "demo":
        texts = demo.prompts()[: args.prompts]
        return demo.encode_prompts(texts, args.prompt_len)
    rng = np.random.default_rng(args.seed)
    return rng.integers(0, vocab_size, (args.prompts, args.prompt_len), dtype=np.int32)


def collect(target, drafter, prompts: np.ndarray, strategy, sampling, rounds: int, batch_size: int, seed: int):
    """Examples from decoding `prompts` in batches (the last batch padded by repetition)."""
    tg, ts = nnx.split(target)
    dg, ds = nnx.split(drafter)
    feats, accs = [], []
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        batch = prompts[start : start + batch_size]
        n = len(batch)
        batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - n, 0)]) if n < batch_size else batch
        f, a = _collect(
            tg,
            ts,
            dg,
            ds,
            jnp.asarray(batch),
            jax.random.key(seed * 1000 + i),
            strategy=strategy,
            sampling=sampling,
            rounds=rounds,
        )
        feats.append(np.asarray(f)[:, :n])
        accs.append(np.asarray(a)[:, :n])
    return examples(np.concatenate(feats, axis=1), np.concatenate(accs, axis=1))


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    path = os.path.join(args.out, "early_stop")
    if os.path.exists(path):
        raise ValueError(f"{path} already exists; choose another --out")
    os.makedirs(args.out, exist_ok=True)
    target = load(args.target) if args.target else demo.load("target")
    drafter = load(args.drafter) if args.drafter else demo.load("drafter-distilled")
    k_config = tuple(int(k) for k in args.k_config.split(","))
    strategy = MultiCandidate(k_config, replacement=not args.without_replacement)
    sampling = Sampling(temperature=args.temperature)
    needed = args.prompt_len + args.rounds * strategy.tokens_per_round + strategy.tokens_scored + 1
    for name, model in (("target", target), ("drafter", drafter)):
        if model.config.max_seq_len < needed:
            raise ValueError(f"{name} max_seq_len={model.config.max_seq_len} < {needed} needed by --prompt-len and --rounds")

    prompts = _prompts(args, target.config.vocab_size)
    n_held = max(1, int(round(len(prompts) * args.held_out_fraction)))
    if n_held >= len(prompts):
        raise ValueError(f"--held-out-fraction leaves no training prompts out of {len(prompts)}")
    train_x, train_y = collect(target, drafter, prompts[:-n_held], strategy, sampling, args.rounds, args.batch_size, args.seed)
    held_x, held_y = collect(target, drafter, prompts[-n_held:], strategy, sampling, args.rounds, args.batch_size, args.seed + 1)
    print(f"examples: {len(train_y)} train, {len(held_y)} held out; P(next level accepted) = {train_y.mean():.3f}")

    params, history = es.fit(
        train_x, train_y, steps=args.steps, learning_rate=args.learning_rate, hidden=args.hidden, seed=args.seed
    )
    summary = {
        "k_config": list(k_config),
        "temperature": args.temperature,
        "features": list(es.FEATURES),
        "train_examples": len(train_y),
        "held_out_examples": len(held_y),
        "loss_first": history[0],
        "loss_last": history[-1],
        "train_accuracy": es.accuracy(params, train_x, train_y),
        "held_out_accuracy": es.accuracy(params, held_x, held_y),
        "held_out_majority_baseline": float(max(held_y.mean(), 1 - held_y.mean())),
        "threshold": args.threshold,
    }
    print(
        f"loss {history[0]:.4f} -> {history[-1]:.4f}; held-out accuracy {summary['held_out_accuracy']:.3f} "
        f"(majority baseline {summary['held_out_majority_baseline']:.3f})"
    )
    es.save(es.EarlyStop.from_params(params, args.threshold), path)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
