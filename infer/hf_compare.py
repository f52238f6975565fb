"""Head-to-head with Hugging Face: greedy `generate` and assisted generation against jspec, same models.

    python -m infer.hf_compare [--models smollm2|code] [--dtype float32|bfloat16] [--json FILE] [--k 4]

The target and drafter (SmolLM2 and its drafter by default; `--models code` for the small code
models) are exported with `jspec.models.to_hf` and loaded by `transformers` (torch on the CPU: the
`hf` extra), so both libraries run the very same weights. Hugging Face cannot represent a trimmed
output head, so SmolLM2's drafter runs on both sides as a full-vocabulary copy (`untrim_drafter`:
its trained head rows, SmolLM2's head elsewhere). Every prompt (held-out generated instructions in
the chat template, or the held-out code snippets; batch 1, as assisted generation decodes one row)
is decoded four ways: Hugging Face greedy `generate`, Hugging Face assisted generation
(`assistant_model=`, a constant `num_assistant_tokens=k`, no confidence early exit: the chain jspec
runs), jspec `generate` and jspec `speculative_generate` with `Chain(k)`. All four must emit the
same tokens (greedy decoding is deterministic, up to floating-point ties); the script says whether
they did and reports tokens/s and speedup over its own library's greedy decoding for each, timed
as the median of --repeats calls after an untimed warm-up (jspec's compilation excluded).
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
    parser.add_argument(
        "--models", choices=("smollm2", "code"), default="smollm2",
        help="SmolLM2-135M-Instruct and its drafter (default), or the small code models",
    )  # fmt: skip
    parser.add_argument(
        "--drafter", choices=demo.DRAFTERS, default="drafter-distilled", help="with --models code: the bundled code drafter"
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="both libraries (default: float32)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts, decoded one at a time (default: 8)")
    parser.add_argument("--prompt-len", type=int, default=64, help="code prompt tokens (default: 64)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt (default: 128)")
    parser.add_argument("--k", type=int, default=4, help="draft tokens per round, both libraries (default: 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per prompt after a warm-up (default: 3)")
    return parser


def hf_model(model, directory: str, dtype: str):
    """A jspec Llama-family model as a `transformers` model (eval mode, in `dtype`), through `to_hf`."""
    import torch
    import transformers

    jspec.models.to_hf(jspec.models.cast(model, "float32"), directory)
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype)).eval()


def smollm2_pair() -> tuple:
    """SmolLM2 and a full-vocabulary copy of its drafter (`untrim_drafter`: the trimmed head's rows,
    SmolLM2's head elsewhere), which Hugging Face's assisted generation can run; jspec runs the same copy."""
    from jspec.training.vocab_trim import untrim_drafter

    target, drafter = demo.load(demo.SMOLLM2), demo.load(demo.SMOLLM2_DRAFTER)
    return target, untrim_drafter(drafter, target.embed.embedding[...].T)


def head_to_head(target, drafter, rows: list[np.ndarray], *, k: int, max_new_tokens: int, eos_id: int | None,
                 repeats: int, dtype: str = "float32") -> dict:  # fmt: skip
    """Decode each prompt row (int32 `[P]`, batch 1) four ways, timed: HF greedy and assisted
    generation, jspec greedy and Chain(k). Returns seconds and tokens per decoder, tau, identical."""
    import torch
    import transformers

    n = max_new_tokens
    # Greedy: no length penalty, no sampling; a constant-length draft without the assistant's
    # confidence early exit (so HF runs the same chain as jspec); EOS ends an answer in both.
    greedy = dict(max_new_tokens=n, do_sample=False, eos_token_id=eos_id, pad_token_id=0 if eos_id is None else eos_id)
    if eos_id is None:
        greedy["min_new_tokens"] = n
    plain = transformers.GenerationConfig(**greedy)
    chain = transformers.GenerationConfig(
        **greedy, num_assistant_tokens=k, num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0
    )
    target, drafter = jspec.models.cast(target, dtype), jspec.models.cast(drafter, dtype)
    seconds = {"hf_greedy": 0.0, "hf_assisted": 0.0, "jspec_greedy": 0.0, "jspec_chain": 0.0}
    tokens = dict.fromkeys(seconds, 0)
    identical, same_within_library, emitted, passes = True, True, 0, 0
    common = dict(max_new_tokens=n, eos_id=eos_id)
    with tempfile.TemporaryDirectory() as directory, torch.inference_mode():
        hf_target, hf_drafter = hf_model(target, f"{directory}/target", dtype), hf_model(drafter, f"{directory}/drafter", dtype)
        for row in rows:
            ids = torch.tensor(row[None].astype(np.int64))
            mask = torch.ones_like(ids)
            # time_calls' block_until_ready passes torch tensors through: torch runs synchronously on the CPU.
            times, hf_ar = time_calls(lambda: hf_target.generate(ids, attention_mask=mask, generation_config=plain), repeats)
            seconds["hf_greedy"] += statistics.median(times)
            times, hf_as = time_calls(
                lambda: hf_target.generate(ids, attention_mask=mask, assistant_model=hf_drafter, generation_config=chain),
                repeats,
            )
            seconds["hf_assisted"] += statistics.median(times)
            times, ar = time_calls(lambda: jspec.generate(target, row[None], **common), repeats)
            seconds["jspec_greedy"] += statistics.median(times)
            times, spec = time_calls(
                lambda: jspec.speculative_generate(target, drafter, row[None], strategy=jspec.Chain(k=k), **common), repeats
            )
            seconds["jspec_chain"] += statistics.median(times)
            outputs = {
                "hf_greedy": hf_ar[0, row.size :].numpy().tolist(),
                "hf_assisted": hf_as[0, row.size :].numpy().tolist(),
                "jspec_greedy": np.asarray(ar.tokens[0, : ar.lengths[0]]).tolist(),
                "jspec_chain": np.asarray(spec.tokens[0, : spec.lengths[0]]).tolist(),
            }
            for name, out in outputs.items():
                tokens[name] += len(out)
            identical &= all(out == outputs["hf_greedy"] for out in outputs.values())
            # Lossless within each library, whatever the other's floating-point rounding does.
            same_within_library &= (
                outputs["hf_assisted"] == outputs["hf_greedy"] and outputs["jspec_chain"] == outputs["jspec_greedy"]
            )
            emitted += int(np.sum(spec.stats.emitted_per_round))
            passes += int(np.sum(spec.stats.target_passes))
    tokens_per_s = {name: tokens[name] / s for name, s in seconds.items()}
    return {
        "dtype": dtype,
        "k": k,
        "identical": bool(identical),
        "same_within_library": bool(same_within_library),
        "jspec_tau": emitted / max(passes, 1),
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens_per_s,
        "hf_assisted_speedup": tokens_per_s["hf_assisted"] / tokens_per_s["hf_greedy"],
        "jspec_chain_speedup": tokens_per_s["jspec_chain"] / tokens_per_s["jspec_greedy"],
        "jspec_greedy_over_hf_greedy": tokens_per_s["jspec_greedy"] / tokens_per_s["hf_greedy"],
        "jspec_chain_over_hf_assisted": tokens_per_s["jspec_chain"] / tokens_per_s["hf_assisted"],
    }


def versions() -> str:
    import torch
    import transformers

    return (
        f"{platform.processor() or platform.machine()}; jax {jax.__version__} {jax.devices()}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}"
    )


def print_table(result: dict) -> None:
    print("| decoder | tokens/s | speedup over its own greedy |")
    print("|---|---|---|")
    rates = result["tokens_per_s"]
    for name, base in (
        ("hf_greedy", "hf_greedy"),
        ("hf_assisted", "hf_greedy"),
        ("jspec_greedy", "jspec_greedy"),
        ("jspec_chain", "jspec_greedy"),
    ):
        print(f"| {name} | {rates[name]:.1f} | {rates[name] / rates[base]:.2f}x |")
    print(f"all four decoders emitted identical tokens: {result['identical']}; jspec tau {result['jspec_tau']:.2f}")


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k must be >= 1, got {args.k}")
    for name in ("prompts", "prompt_len", "max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.models == "code":
        if args.prompts > len(demo.prompts()):
            parser.error(f"--prompts must lie in [1, {len(demo.prompts())}] with the code models, got {args.prompts}")
        target, drafter = demo.load("target"), demo.load(args.drafter)
        rows = list(demo.encode_prompts(demo.prompts()[: args.prompts], args.prompt_len))  # int32 [P] each
        eos_id, models = None, f"jspec.demo target + {args.drafter}, exported with jspec.models.to_hf"
        prompts = f"{args.prompts} held-out code prompts x {args.prompt_len} tokens"
    else:
        from jspec.training.chat_prompts import chat_instructions

        target, drafter = smollm2_pair()
        chat = demo.tokenizer(demo.SMOLLM2)
        texts = [i["text"] for i in chat_instructions("held_out", args.prompts, seed=1)]
        rows = [np.asarray(chat.apply_chat_template([{"role": "user", "content": t}]), np.int32) for t in texts]
        eos_id = chat.eos_id
        models = "SmolLM2-135M-Instruct + smollm2-135m-drafter with a full-vocabulary head (untrim_drafter), via to_hf"
        prompts = f"{args.prompts} held-out generated instructions in the chat template (answers end at <|im_end|>)"
    result = head_to_head(
        target, drafter, rows, k=args.k, max_new_tokens=args.max_new_tokens, eos_id=eos_id, repeats=args.repeats,
        dtype=args.dtype,
    )  # fmt: skip
    result.update(machine=versions(), models=models, prompts=prompts, max_new_tokens=args.max_new_tokens)
    print(f"{models}; {prompts}; up to {args.max_new_tokens} new tokens, batch 1, greedy, k={args.k}, {args.dtype}")
    print(result["machine"])
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
