"""Head-to-head with Hugging Face: greedy `generate` and assisted generation against jspec, same models.

    python -m infer.hf_compare [--json FILE] [--prompts 8] [--max-new-tokens 128] [--k 4]

The demo target and drafter are exported with `jspec.models.to_hf` and loaded by `transformers`
(torch, float32, on the CPU: the `hf` extra), so both libraries run the very same weights. Every
prompt (the held-out code snippets, batch 1: assisted generation decodes one row) is decoded four
ways: Hugging Face greedy `generate`, Hugging Face assisted generation (`assistant_model=`, a
constant `num_assistant_tokens=k`, no confidence early exit: the chain jspec runs), jspec
`generate` and jspec `speculative_generate` with `Chain(k)`. All four must emit the same tokens
(greedy decoding is deterministic); the script says whether they did and reports tokens/s and
speedup over its own library's greedy decoding for each, timed as the median of --repeats calls
after an untimed warm-up (jspec's compilation excluded).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile

import jax
import numpy as np

import jspec
from infer.timing import time_calls
from jspec import demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m infer.hf_compare", description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    parser.add_argument("--drafter", choices=demo.DRAFTERS, default="drafter-distilled", help="bundled drafter (default: drafter-distilled)")
    parser.add_argument("--prompts", type=int, default=8, help="held-out code prompts, decoded one at a time (default: 8)")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default: 64)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt (default: 128)")
    parser.add_argument("--k", type=int, default=4, help="draft tokens per round, both libraries (default: 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per prompt after a warm-up (default: 3)")
    return parser


def hf_models(target, drafter, directory: str):
    """The two jspec models as `transformers` models (float32, eval mode), through `to_hf`."""
    import torch  # noqa: F401  (the hf extra)
    import transformers

    loaded = []
    for name, model in (("target", target), ("drafter", drafter)):
        jspec.models.to_hf(model, f"{directory}/{name}")
        loaded.append(transformers.AutoModelForCausalLM.from_pretrained(f"{directory}/{name}").eval())
    return loaded


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k must be >= 1, got {args.k}")
    if not 1 <= args.prompts <= len(demo.prompts()):
        parser.error(f"--prompts must lie in [1, {len(demo.prompts())}], got {args.prompts}")
    for name in ("prompt_len", "max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    import torch
    import transformers

    target, drafter = demo.load("target"), demo.load(args.drafter)
    prompts = demo.encode_prompts(demo.prompts()[: args.prompts], args.prompt_len)  # int32 [n, P]
    n = args.max_new_tokens
    # Greedy to exactly n tokens: no EOS, no length penalty, no sampling, and a constant-length
    # draft without the assistant's confidence early exit (so HF runs the same chain as jspec).
    greedy = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    plain = transformers.GenerationConfig(**greedy)
    chain = transformers.GenerationConfig(
        **greedy, num_assistant_tokens=args.k, num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0
    )

    seconds = {"hf_greedy": 0.0, "hf_assisted": 0.0, "jspec_greedy": 0.0, "jspec_chain": 0.0}
    identical = True
    emitted = passes = 0
    with tempfile.TemporaryDirectory() as directory, torch.inference_mode():
        hf_target, hf_drafter = hf_models(target, drafter, directory)
        for row in prompts:
            ids = torch.tensor(row[None].astype(np.int64))
            mask = torch.ones_like(ids)
            # time_calls' block_until_ready passes torch tensors through: torch runs synchronously on the CPU.
            times, hf_ar = time_calls(lambda: hf_target.generate(ids, attention_mask=mask, generation_config=plain), args.repeats)
            seconds["hf_greedy"] += statistics.median(times)
            times, hf_as = time_calls(
                lambda: hf_target.generate(ids, attention_mask=mask, assistant_model=hf_drafter, generation_config=chain),
                args.repeats,
            )
            seconds["hf_assisted"] += statistics.median(times)
            times, ar = time_calls(lambda: jspec.generate(target, row[None], max_new_tokens=n), args.repeats)
            seconds["jspec_greedy"] += statistics.median(times)
            times, spec = time_calls(
                lambda: jspec.speculative_generate(target, drafter, row[None], max_new_tokens=n, strategy=jspec.Chain(k=args.k)),
                args.repeats,
            )
            seconds["jspec_chain"] += statistics.median(times)
            outputs = [hf_ar[0, row.size :].numpy(), hf_as[0, row.size :].numpy(), np.asarray(ar.tokens[0]), np.asarray(spec.tokens[0])]
            identical &= all(np.array_equal(outputs[0], o) for o in outputs[1:])
            emitted += int(np.sum(spec.stats.emitted_per_round))
            passes += int(np.sum(spec.stats.target_passes))

    tokens = n * args.prompts
    tokens_per_s = {name: tokens / s for name, s in seconds.items()}
    result = {
        "machine": f"{platform.processor() or platform.machine()}; jax {jax.__version__} {jax.devices()}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}",
        "models": f"jspec.demo target + {args.drafter}, exported with jspec.models.to_hf",
        "prompts": args.prompts,
        "prompt_len": args.prompt_len,
        "max_new_tokens": n,
        "k": args.k,
        "identical": bool(identical),
        "jspec_tau": emitted / max(passes, 1),
        "tokens_per_s": tokens_per_s,
        "hf_assisted_speedup": tokens_per_s["hf_assisted"] / tokens_per_s["hf_greedy"],
        "jspec_chain_speedup": tokens_per_s["jspec_chain"] / tokens_per_s["jspec_greedy"],
        "jspec_chain_over_hf_assisted": tokens_per_s["jspec_chain"] / tokens_per_s["hf_assisted"],
    }
    print(f"{result['models']}; {args.prompts} prompts x {args.prompt_len} tokens, {n} new tokens each, batch 1, greedy, k={args.k}")
    print(result["machine"])
    print("| decoder | tokens/s | speedup over its own greedy |")
    print("|---|---|---|")
    for name, base in (("hf_greedy", "hf_greedy"), ("hf_assisted", "hf_greedy"), ("jspec_greedy", "jspec_greedy"), ("jspec_chain", "jspec_greedy")):
        print(f"| {name} | {tokens_per_s[name]:.1f} | {tokens_per_s[name] / tokens_per_s[base]:.2f}x |")
    print(f"all four decoders emitted identical tokens: {identical}; jspec tau {result['jspec_tau']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
