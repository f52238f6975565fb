"""What prompt lookup can reach on a model and prompts, from the target's greedy outputs and its
measured pass costs, without running the lookup.

    python -m infer.lookup_ceiling --json FILE [--categories summarization rag] [--per-category 7]
        [--ks 1 2 3 4 6 8] [--max-new-tokens 192] [--min-prompt-width 896]

At T=0 every lossless method emits the target's greedy text, so the rounds `jspec.PromptLookup`
runs are fixed by that text: `prompt_lookup_rounds` replays them on the host (the same search,
chain and stop rule) and counts the drafts each round proposes and the target accepts. With the
target's measured pass costs t(n) (`infer.timing.forward_seconds`, n tokens per pass) the
ceiling is

    speedup <= tokens * t(1) / sum over rounds of t(1 + drafts),

the speedup of a lookup that costs nothing and a round that costs only its target pass. A
measured speedup below it is what the rest of the round costs (search, verification, commit).
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

import jspec
from infer.bench import jsonl_batches, machine, typical_prompts
from infer.models import add_model_arguments, models_from_args
from infer.retrieval_bench import target_eos
from infer.spec_bench import default_spec_bench
from infer.timing import forward_seconds
from jspec.decode import bucket_size
from jspec.retrieval.lookup import check_ngram_sizes


def lookup_proposal(history: list[int], tail: list[int], ngram_sizes: tuple[int, ...]) -> int | None:
    """The token `jspec.PromptLookup` proposes after `tail` (the sequence so far, its last tokens
    possibly drafted): among the positions j of `history` (the committed sequence, root included)
    whose preceding n tokens equal the last n of `tail`, for the longest n of `ngram_sizes` that
    matches anywhere, the latest one's token `history[j]`; None where nothing matches."""
    for n in sorted(ngram_sizes, reverse=True):
        if len(tail) < n:
            continue
        gram = tail[-n:]
        for j in range(len(history) - 1, n - 1, -1):
            if history[j - n : j] == gram:
                return history[j]
    return None


def prompt_lookup_rounds(
    prompt: list[int], output: list[int], k: int, ngram_sizes: tuple[int, ...] = (3, 2, 1)
) -> list[tuple[int, int]]:
    """The rounds `jspec.PromptLookup(k, ngram_sizes)` (no model, its default stop) runs at T=0
    when the target's greedy text after `prompt` is `output`: (drafts proposed, drafts accepted)
    per round. A chain stops at the first node with no proposal; each round emits its accepted
    drafts and one more token, the last round as many as `output` has left."""
    ngram_sizes = check_ngram_sizes(ngram_sizes)
    prompt, output = [int(t) for t in prompt], [int(t) for t in output]
    rounds, emitted = [], 1  # the prefill emits output[0]
    while emitted < len(output):
        history = prompt + output[:emitted]
        drafts: list[int] = []
        while len(drafts) < k:
            token = lookup_proposal(history, history + drafts, ngram_sizes)
            if token is None:
                break
            drafts.append(token)
        truth = output[emitted : emitted + len(drafts)]
        accepted = next((i for i, (d, t) in enumerate(zip(drafts, truth)) if d != t), len(truth))
        rounds.append((len(drafts), accepted))
        emitted += accepted + 1
    return rounds


def ceiling(rounds: list[tuple[int, int]], tokens: int, pass_seconds) -> dict[str, float]:
    """tau and the speedup bound for `rounds` (`prompt_lookup_rounds`) emitting `tokens` after the
    prefill, with `pass_seconds(n)` the target's pass over n tokens."""
    seconds = sum(pass_seconds(1 + drafts) for drafts, _ in rounds)
    return {"tau": tokens / max(len(rounds), 1), "rounds": len(rounds), "speedup_bound": tokens * pass_seconds(1) / seconds}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m infer.lookup_ceiling", description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, metavar="FILE")
    add_model_arguments(parser)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    parser.add_argument("--ngram-sizes", type=int, nargs="+", default=[3, 2, 1])
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--per-category", type=int, default=7)
    parser.add_argument("--categories", nargs="+", default=["summarization", "rag"])
    parser.add_argument("--prompts-jsonl", metavar="FILE", default=None)
    parser.add_argument("--min-prompt-width", type=int, default=896, metavar="N")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.ks) < 1:
        parser.error(f"--ks must be >= 1, got {args.ks}")
    target, _, description = models_from_args(parser, args)
    args.prompts_jsonl = args.prompts_jsonl or default_spec_bench()
    if args.prompts_jsonl is None:
        parser.error("needs --prompts-jsonl (Spec-Bench's question.jsonl; or set $JSPEC_SPEC_BENCH)")
    args.batch_size = 1
    batches, prompts_description = jsonl_batches(parser, args, target.config.vocab_size)
    common = dict(max_new_tokens=args.max_new_tokens, sampling=jspec.Sampling(), eos_id=target_eos(args))
    texts = []
    for batch in batches:
        out = jspec.generate(target, batch.prompts, prompt_lengths=batch.lengths, **common)
        length = int(batch.lengths[0])
        texts.append((batch.category, np.asarray(batch.prompts[0, :length]), np.asarray(out.tokens[0, : int(out.lengths[0])])))
    typical = typical_prompts(batches)
    cache_size = bucket_size(typical.shape[1]) + bucket_size(args.max_new_tokens) + 32
    costs = {n: forward_seconds(target, typical, cache_size, n, passes=16, runs=5) for n in range(1, max(args.ks) + 2)}
    print("pass costs (ms): " + ", ".join(f"t({n}) {t * 1e3:.2f}" for n, t in costs.items()), flush=True)
    result = {
        "target": description,
        "machine": machine(),
        "prompts": prompts_description,
        "max_new_tokens": args.max_new_tokens,
        "ngram_sizes": args.ngram_sizes,
        "pass_costs_ms": {str(n): t * 1e3 for n, t in costs.items()},
        "by_category": {},
    }
    for category in dict.fromkeys(c for c, _, _ in texts):
        rows = {}
        tokens = sum(len(o) - 1 for c, _, o in texts if c == category)
        for k in args.ks:
            rounds = [r for c, p, o in texts if c == category for r in prompt_lookup_rounds(p, o, k, tuple(args.ngram_sizes))]
            rows[str(k)] = ceiling(rounds, tokens, costs.__getitem__)
            print(f"{category} k={k}: tau {rows[str(k)]['tau']:.2f}, bound {rows[str(k)]['speedup_bound']:.2f}x", flush=True)
        result["by_category"][category] = rows
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    jax.clear_caches()
    return result


if __name__ == "__main__":
    main()
