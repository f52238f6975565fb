"""Generate with autoregressive and speculative decoding on the same prompts and compare them.

    python -m infer.generate [--k 4] [--verifier sampling] [--temperature 0] ...
    python -m infer.generate --tree eagle --nodes 9        # a token-tree strategy instead of a chain

Prints row 0 of both outputs, whether they are identical (they must be at temperature 0), tau
and the tokens/s of each method, timed in this process with the compile excluded.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import numpy as np

import jspec
from infer.methods import TREE_METHODS, tree_method
from infer.models import add_model_arguments, models_from_args, prompts_from_args, text_tokenizer
from infer.timing import time_calls
from jspec.sequoia import measure_acceptance
from jspec.verify import CHAIN_VERIFIERS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m infer.generate", description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--k", type=int, default=4, help="draft tokens per round (default: 4)")
    parser.add_argument("--verifier", choices=sorted(CHAIN_VERIFIERS), default="sampling", help="chain verifier (default: sampling)")
    parser.add_argument(
        "--tree", choices=TREE_METHODS, default=None,
        help="decode with this token-tree method (infer/methods.py) instead of Chain(--k) (default: the chain)",
    )
    parser.add_argument("--nodes", type=int, default=9, help="the tree's node budget, tokens scored per round (default: 9)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default: 0)")
    parser.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default: all)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: 1, off)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per row (default: 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method, after the compile call (default: 3)")
    return parser


def _valid_tokens(output: jspec.Output, row: int) -> list[int]:
    return np.asarray(output.tokens[row, : int(output.lengths[row])]).tolist()


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison and print it. Returns the numbers printed, for tests: `identical` (bool,
    None when sampling), `tau`, `ar_tokens_per_s`, `spec_tokens_per_s`, `speedup`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    target, drafter, description = models_from_args(parser, args)
    sampling = jspec.Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    prompts, prompts_description = prompts_from_args(parser, args, target.config.vocab_size)
    rng = jax.random.key(args.seed)
    if args.tree is None:
        strategy = jspec.Chain(k=args.k, verifier=args.verifier)
    else:
        # Sequoia's acceptance vector is measured on these prompts (infer.bench uses separate ones).
        acceptance = lambda width: tuple(
            float(x) for x in measure_acceptance(target, drafter, prompts, width=width, sampling=sampling, rng=rng)
        )
        try:
            strategy = tree_method(args.tree, args.nodes, acceptance).strategy
        except ValueError as error:
            parser.error(f"--nodes: {error}")
    common = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, rng=rng)

    # The median of --repeats timed calls each, after an untimed one that compiles it.
    ar_times, ar = time_calls(lambda: jspec.generate(target, prompts, **common), args.repeats)
    spec_times, spec = time_calls(
        lambda: jspec.speculative_generate(target, drafter, prompts, strategy=strategy, **common), args.repeats
    )
    ar_seconds, spec_seconds = statistics.median(ar_times), statistics.median(spec_times)

    ar_tokens_per_s = float(np.sum(ar.lengths)) / ar_seconds
    spec_tokens_per_s = float(np.sum(spec.lengths)) / spec_seconds
    tau = float(spec.stats.mean_accepted)
    identical = None
    if sampling.greedy:
        identical = all(_valid_tokens(ar, b) == _valid_tokens(spec, b) for b in range(args.batch_size))

    print(description)
    print(f"{prompts_description}; max_new_tokens {args.max_new_tokens}; {sampling}; strategy {strategy}")
    tokenizer = text_tokenizer(args)
    if tokenizer is not None:
        for title, tokens in (("prompt", np.asarray(prompts[0]).tolist()), ("AR", _valid_tokens(ar, 0)), ("speculative", _valid_tokens(spec, 0))):
            print(f"----- row 0, {title} -----\n{tokenizer.decode(tokens)}")
        print("-----")
    else:
        print(f"AR row 0:          {_valid_tokens(ar, 0)}")
        print(f"speculative row 0: {_valid_tokens(spec, 0)}")
    if identical is None:
        print("identical: not expected (sampling; the outputs agree in distribution, not token for token)")
    else:
        print(f"greedy outputs identical (all {args.batch_size} rows): {identical}")
    print(
        f"tau (tokens per target pass): {tau:.2f}; target passes per row: speculative "
        f"{float(np.mean(spec.stats.target_passes)):.1f}, AR {float(np.mean(ar.stats.target_passes)):.1f}"
    )
    print(f"AR:          {ar_tokens_per_s:8.1f} tokens/s ({ar_seconds:.3f} s)")
    print(f"speculative: {spec_tokens_per_s:8.1f} tokens/s ({spec_seconds:.3f} s)")
    print(f"speedup: {spec_tokens_per_s / ar_tokens_per_s:.2f}x (same process, compile excluded, median of {args.repeats})")
    return {
        "identical": identical,
        "tau": tau,
        "ar_tokens_per_s": ar_tokens_per_s,
        "spec_tokens_per_s": spec_tokens_per_s,
        "speedup": spec_tokens_per_s / ar_tokens_per_s,
    }


if __name__ == "__main__":
    main()
