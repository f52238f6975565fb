"""Answer a prompt with autoregressive and speculative decoding on the same models and compare them.

    python -m infer.generate                                  # SmolLM2-135M-Instruct and its drafter
    python -m infer.generate --prompt "Explain recursion." --k 6 --temperature 1
    python -m infer.generate --interactive                    # a chat that streams each answer
    python -m infer.generate --tree eagle --nodes 9           # a token-tree strategy instead of a chain
    python -m infer.generate --compare-dtypes float32 bfloat16  # AR and speculation with the target in each
    python -m infer.generate --target target --batch-size 2   # the small code models, code prompts

Prints both outputs, whether they are identical (they must be at temperature 0), tau (tokens per
target pass) and the tokens/s of each method, timed in this process with the compile excluded.
With --interactive it keeps a conversation: every answer is decoded speculatively and printed as
its tokens are accepted, followed by that turn's tau and tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import numpy as np

import jspec
from infer.bench import Batch, LastOutputs, measure_interleaved
from infer.methods import TREE_METHODS, tree_method
from infer.models import add_model_arguments, chat_tokenizer, models_from_args, prompts_from_args, text_tokenizer
from infer.timing import time_calls
from jspec.methods.sequoia import measure_acceptance
from jspec.verify.chain import CHAIN_VERIFIERS

DEFAULT_PROMPT = "Explain what a Python dictionary is and show a short example of how to use one."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m infer.generate", description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help="the user message, chat targets (default: a question about dicts)"
    )
    parser.add_argument("--interactive", action="store_true", help="chat in a loop, streaming each speculative answer")
    parser.add_argument(
        "--k",
        type=int,
        default=1,
        help="draft tokens per round (default: 1, the best measured on SmolLM2 on a 2-core CPU, float32 and bfloat16)",
    )
    parser.add_argument(
        "--verifier", choices=sorted(CHAIN_VERIFIERS), default="sampling", help="chain verifier (default: sampling)"
    )
    parser.add_argument(
        "--tree",
        choices=TREE_METHODS,
        default=None,
        help="decode with this token-tree method (infer/methods.py) instead of Chain(--k) (default: the chain)",
    )
    parser.add_argument("--nodes", type=int, default=9, help="the tree's node budget, tokens scored per round (default: 9)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default: 0)")
    parser.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (default: all)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: 1, off)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per row (default: 128)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method, after the compile call (default: 3)")
    parser.add_argument(
        "--compare-dtypes",
        nargs="+",
        choices=["float32", "bfloat16"],
        default=None,
        metavar="DTYPE",
        help="also time AR and speculative decoding with the target in each of these dtypes (the drafter as set), "
        "interleaved in this process, each against the fastest AR: which dtype decodes fastest here",
    )
    return parser


def _valid_tokens(output: jspec.Output, row: int) -> list[int]:
    return np.asarray(output.tokens[row, : int(output.lengths[row])]).tolist()


def _same_tokens(a: jspec.Output, b: jspec.Output, row: int) -> bool:
    return _valid_tokens(a, row) == _valid_tokens(b, row)


def _strategy(parser, args, target, drafter, prompts, sampling, rng):
    if args.tree is None:
        return jspec.Chain(k=args.k, verifier=args.verifier)
    # Sequoia's acceptance vector is measured on these prompts (infer.bench uses separate ones).
    acceptance = lambda width: tuple(  # noqa: E731
        float(x) for x in measure_acceptance(target, drafter, prompts, width=width, sampling=sampling, rng=rng)
    )
    try:
        return tree_method(args.tree, args.nodes, acceptance).strategy
    except ValueError as error:
        parser.error(f"--nodes: {error}")


class StreamPrinter:
    """A `stream` callback for row 0: prints each round's kept tokens as text as they arrive.

    The same object serves every turn, so the compiled program is reused (it is a static argument).
    Text is printed by the difference of the decoded answer so far, so multi-byte characters split
    across tokens appear whole.
    """

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.reset()

    def reset(self) -> None:
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, tokens, counts) -> None:
        self.ids += np.asarray(tokens[0, : int(counts[0])]).tolist()
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            self.out.write(text[len(self.printed) :])
            self.out.flush()
            self.printed = text


def interactive(target, drafter, tokenizer, strategy, sampling, args) -> None:
    """A chat loop: each answer is decoded speculatively and streamed; tau per turn."""
    printer = StreamPrinter(tokenizer)
    messages: list[dict] = []
    rng = jax.random.key(args.seed)
    print(f"chatting with speculative decoding ({strategy}, {sampling}); an empty line or Ctrl-D ends")
    for turn in range(10**9):
        try:
            text = input("\nyou> ").strip()
        except EOFError:
            break
        if not text:
            break
        messages.append({"role": "user", "content": text})
        ids = np.asarray([tokenizer.apply_chat_template(messages)], np.int32)
        budget = target.config.max_seq_len - ids.shape[1]
        if budget < 1:
            print("(the conversation is longer than the model's context; start a new one)")
            break
        printer.reset()
        print("assistant> ", end="", flush=True)
        start = time.perf_counter()
        out = jspec.speculative_generate(
            target, drafter, ids, max_new_tokens=min(args.max_new_tokens, budget), strategy=strategy, sampling=sampling,
            rng=jax.random.fold_in(rng, turn), eos_id=tokenizer.eos_id, stream=printer,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        answer = _valid_tokens(out, 0)
        messages.append({"role": "assistant", "content": tokenizer.decode(answer, skip_special_tokens=True)})
        print(
            f"\n[tau {float(out.stats.mean_accepted):.2f} tokens per target pass, {len(answer)} tokens in "
            f"{seconds:.2f} s{' (incl. compile)' if turn == 0 else ''}]"
        )


def compare_dtypes(target, drafter, strategy, prompts, common: dict, dtypes: list[str], repeats: int, greedy: bool):
    """Tokens/s of AR and speculative decoding with the target cast to each of `dtypes`, timed
    interleaved (`infer.bench.measure_interleaved`: a compiling call of each, then `repeats` rounds
    calling each in turn, so a machine whose speed drifts slows all alike). Returns
    ({(dtype, "ar" | "speculative"): tokens/s}, {dtype: whether the speculative output equals AR's
    in that dtype, every row; None when sampling}).
    """
    fns = {}
    for dtype in dtypes:
        cast = target if dtype == target.config.param_dtype else jspec.models.cast(target, dtype)
        fns[dtype, "ar"] = LastOutputs(lambda _, t=cast: jspec.generate(t, prompts, **common))
        fns[dtype, "speculative"] = LastOutputs(
            lambda _, t=cast: jspec.speculative_generate(t, drafter, prompts, strategy=strategy, **common)
        )
    batch = Batch(prompts, np.full((prompts.shape[0],), prompts.shape[1], np.int32), "prompt")
    measured = measure_interleaved(fns, [batch], repeats)
    tokens_per_s = {name: by_category["prompt"].tokens / by_category["prompt"].seconds for name, by_category in measured.items()}
    identical = {
        dtype: all(
            _same_tokens(fns[dtype, "ar"].outputs[0], fns[dtype, "speculative"].outputs[0], b) for b in range(prompts.shape[0])
        )
        if greedy
        else None
        for dtype in dtypes
    }
    return tokens_per_s, identical


def print_dtype_comparison(tokens_per_s: dict, identical: dict, repeats: int) -> None:
    fastest = max(v for (_, method), v in tokens_per_s.items() if method == "ar")
    print(f"target dtype comparison (same process, interleaved, median of {repeats}; speedup against the fastest AR):")
    for (dtype, method), value in tokens_per_s.items():
        same = (
            f"  greedy output identical to {dtype} AR: {identical[dtype]}"
            if method == "speculative" and identical[dtype] is not None
            else ""
        )
        print(f"  {dtype:9s} {method:12s} {value:8.1f} tokens/s  {value / fastest:.2f}x{same}")


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison and print it. Returns the numbers printed, for tests: `identical` (bool,
    None when sampling), `tau`, `ar_tokens_per_s`, `spec_tokens_per_s`, `speedup`, and `by_dtype`
    (with --compare-dtypes `compare_dtypes`'s two results as "tokens_per_s" and "identical", else None)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    target, drafter, description = models_from_args(parser, args)
    sampling = jspec.Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    rng = jax.random.key(args.seed)
    chat = chat_tokenizer(args)
    if args.interactive and chat is None:
        parser.error("--interactive needs a chat target (smollm2-135m or a GGUF file)")
    lengths, eos_id = None, None
    if chat is not None:
        ids = chat.apply_chat_template([{"role": "user", "content": args.prompt}])
        prompts = np.asarray([ids] * args.batch_size, np.int32)
        prompts_description = f"prompt: {args.prompt!r} in the chat template ({len(ids)} tokens) x {args.batch_size}"
        eos_id = chat.eos_id
    else:
        prompts, prompts_description = prompts_from_args(parser, args, target.config.vocab_size)
    strategy = _strategy(parser, args, target, drafter, prompts, sampling, rng)
    print(description)
    if args.interactive:
        interactive(target, drafter, chat, strategy, sampling, args)
        return {}
    common = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, rng=rng, prompt_lengths=lengths, eos_id=eos_id)

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
        identical = all(_same_tokens(ar, spec, b) for b in range(prompts.shape[0]))

    print(f"{prompts_description}; max_new_tokens {args.max_new_tokens}; {sampling}; strategy {strategy}")
    if chat is not None:
        print(f"----- user -----\n{args.prompt}")
        for title, output in (("autoregressive", ar), ("speculative", spec)):
            print(f"----- assistant ({title}) -----\n{chat.decode(_valid_tokens(output, 0), skip_special_tokens=True)}")
        print("-----")
    elif (tokenizer := text_tokenizer(args)) is not None:
        for title, tokens in (
            ("prompt", np.asarray(prompts[0]).tolist()),
            ("AR", _valid_tokens(ar, 0)),
            ("speculative", _valid_tokens(spec, 0)),
        ):
            print(f"----- row 0, {title} -----\n{tokenizer.decode(tokens)}")
        print("-----")
    else:
        print(f"AR row 0:          {_valid_tokens(ar, 0)}")
        print(f"speculative row 0: {_valid_tokens(spec, 0)}")
    if identical is None:
        print("identical: not expected (sampling; the outputs agree in distribution, not token for token)")
    else:
        print(f"greedy outputs identical (all {prompts.shape[0]} rows): {identical}")
    print(
        f"tau (tokens per target pass): {tau:.2f}; target passes per row: speculative "
        f"{float(np.mean(spec.stats.target_passes)):.1f}, AR {float(np.mean(ar.stats.target_passes)):.1f}"
    )
    print(f"AR:          {ar_tokens_per_s:8.1f} tokens/s ({ar_seconds:.3f} s)")
    print(f"speculative: {spec_tokens_per_s:8.1f} tokens/s ({spec_seconds:.3f} s)")
    print(f"speedup: {spec_tokens_per_s / ar_tokens_per_s:.2f}x (same process, compile excluded, median of {args.repeats})")
    by_dtype = None
    if args.compare_dtypes:
        tokens_per_s, same = compare_dtypes(
            target, drafter, strategy, prompts, common, args.compare_dtypes, args.repeats, sampling.greedy
        )
        print_dtype_comparison(tokens_per_s, same, args.repeats)
        by_dtype = {"tokens_per_s": tokens_per_s, "identical": same}
    return {
        "by_dtype": by_dtype,
        "identical": identical,
        "tau": tau,
        "ar_tokens_per_s": ar_tokens_per_s,
        "spec_tokens_per_s": spec_tokens_per_s,
        "speedup": spec_tokens_per_s / ar_tokens_per_s,
    }


if __name__ == "__main__":
    main()
