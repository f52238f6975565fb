"""Models and prompts for the demos: SmolLM2 and its drafter by default, the small code models,
random-init models or checkpoints on request.

`--target` names a demo model or a path. By default the target is SmolLM2-135M-Instruct
(`jspec.demo.load("smollm2-135m")`, a chat model: prompts go through its chat template) drafted by
`smollm2-135m-drafter`. `--target target` takes the small code model with the `--drafter` of the
bundled code drafters (default drafter-distilled), prompted with held-out stdlib code
(`jspec.demo.prompts`). A path is a jspec checkpoint, a Hugging Face directory or a GGUF file, and
needs `--drafter` (a path or a demo drafter's name); a GGUF target is a chat model with the file's
tokenizer.

`--preset` builds random-init models instead, which the tests use because they compile in
seconds. Two choices make a random pair honest rather than degenerate:

* Weight scales. At its default init a random model's blocks barely move the residual stream, so
  greedy decoding falls into a short cycle of tokens. Its weight matrices are scaled up so that
  generations are varied and depend on the context.
* A drafter that agrees with the target. The drafter is a layer-truncated self-drafter: the
  target's embedding, first block(s), final norm and lm_head (self-speculative layer skipping).
  With every block scaled x5 a random network is chaotic: the truncated drafter almost never
  agrees with it (greedy tau about 1.0 at k=4). A drafter made of the target plus weight noise
  agrees only at small noise and costs as much as the target, so it cannot speed anything up.
  So the blocks the drafter skips are scaled less (x2) than the ones it keeps (x5): later layers
  refine rather than overwrite, as they tend to in trained models, and the 1-layer drafter
  reaches greedy tau 3.1 at k=4 (docs/benchmarks.md) while costing a fraction of the target.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax
from flax import nnx

import jspec
from jspec import demo
from jspec.models import ModelConfig, Transformer

RANDOM_MODELS_NOTE = "models: random-init"
DEMO_MODELS_NOTE = "models: jspec.demo (trained on the Python standard library)"
CHAT_MODELS_NOTE = "models: SmolLM2-135M-Instruct (jspec.demo) and a drafter distilled for it"
DEMO_DRAFTER = {demo.SMOLLM2: demo.SMOLLM2_DRAFTER, "target": "drafter-distilled", demo.HYBRID: "drafter"}
DEMO_TARGETS = tuple(DEMO_DRAFTER)

# The drafter's blocks and the lm_head: large enough that generations are varied (see module doc).
KEPT_SCALE = 5.0
# The blocks only the target runs: smaller, so that the truncated drafter often agrees with it.
SKIPPED_SCALE = 2.0


@dataclasses.dataclass(frozen=True)
class Preset:
    """A random target's config and how many of its first blocks the drafter keeps."""

    config: ModelConfig
    drafter_layers: int


_TINY = ModelConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=512, tie_embeddings=False
)

PRESETS: dict[str, Preset] = {
    # For tests: compiles in seconds.
    "tiny": Preset(_TINY, drafter_layers=1),
    # The default. On a 2-core CPU one target pass costs ~7 drafter steps. Of the sizes tried
    # (d_model 384/512/640, 6 or 8 layers) this measured among the best speedups; d_model 640 did
    # as well but takes the default bench well past 2 minutes.
    "small": Preset(
        ModelConfig(
            vocab_size=2048,
            d_model=384,
            n_layers=8,
            n_heads=6,
            n_kv_heads=6,
            d_ff=1024,
            max_seq_len=1024,
            tie_embeddings=False,
        ),
        drafter_layers=1,
    ),
    # A hybrid state-space target: attention first (what the truncated drafter keeps), then Mamba-2.
    "hybrid-tiny": Preset(
        dataclasses.replace(_TINY, n_layers=3, layer_types=("attention", "mamba", "mamba"), ssm_state=8, ssm_head_dim=16),
        drafter_layers=1,
    ),
}


def _scale_matrices(params: dict, factor: float) -> dict:
    """Multiply every 2-D parameter (weight matrix) in a pure-dict subtree by factor; norms stay."""
    return jax.tree.map(lambda x: x * factor if x.ndim == 2 else x, params)


def random_target(preset: Preset, seed: int) -> Transformer:
    """A random-init target whose first `preset.drafter_layers` blocks and lm_head are scaled by
    KEPT_SCALE and its other blocks by SKIPPED_SCALE."""
    model = Transformer(preset.config, rngs=nnx.Rngs(seed))
    graph, state = nnx.split(model)
    params = state.to_pure_dict()
    for i in range(preset.config.n_layers):
        factor = KEPT_SCALE if i < preset.drafter_layers else SKIPPED_SCALE
        params["blocks"][i] = _scale_matrices(params["blocks"][i], factor)
    params["lm_head"] = _scale_matrices(params["lm_head"], KEPT_SCALE)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graph, state)


def truncated_drafter(target: Transformer, n_layers: int) -> Transformer:
    """A drafter of the target's embedding, first n_layers blocks, final norm and lm_head."""
    types = target.config.layer_types
    config = dataclasses.replace(target.config, n_layers=n_layers, layer_types=None if types is None else types[:n_layers])
    # Abstract init: every parameter is replaced by the target's below, so none is computed.
    graph, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    params = nnx.state(target).to_pure_dict()
    params["blocks"] = {i: params["blocks"][i] for i in range(n_layers)}
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graph, state)


def _blocks(start: int, stop: int) -> str:
    """'block 0' or 'blocks 1-7'."""
    return f"block {start}" if stop - start == 1 else f"blocks {start}-{stop - 1}"


def describe_drafter(drafter) -> str:
    """A drafter's shape in words: a Transformer's config, or an EAGLE head's kind and features."""
    if isinstance(drafter, Transformer):
        return _describe_config(drafter.config)
    c = drafter.config
    head = f", output head {c.head_tokens} tokens" if c.head_tokens else ""
    return f"{c.kind} head (1 layer, d_model {c.target.d_model}) on the target's hidden states {c.feature_layers}{head}"


def load_drafter(path: str, target: Transformer, dtype: str | None = None):
    """`load_checkpoint`, or an EAGLE head (`jspec.eagle.save_head` directory or the demo head) for `target`."""
    from jspec.eagle import cast_head, is_head_checkpoint, load_head

    if path not in demo.MODELS and is_head_checkpoint(path):
        head = load_head(path, target)
        return head if dtype is None else cast_head(head, dtype)
    return load_checkpoint(path, dtype)


def cast_drafter(drafter, dtype: str):
    """`jspec.models.cast` for a Transformer, `jspec.eagle.cast_head` for an EAGLE head."""
    from jspec.eagle import cast_head

    return jspec.models.cast(drafter, dtype) if isinstance(drafter, Transformer) else cast_head(drafter, dtype)


def _describe_config(config: ModelConfig) -> str:
    layers = "1 layer" if config.n_layers == 1 else f"{config.n_layers} layers"
    head = f", output head {config.head_tokens} tokens" if config.head_tokens else ""
    return f"{layers}, d_model {config.d_model}, d_ff {config.d_ff}, vocab {config.vocab_size}{head}"


def random_models(seed: int = 0, preset: str = "small") -> tuple[Transformer, Transformer, str]:
    """(target, drafter, description) for a random-init preset (see the module docstring); the
    description is three lines, the first RANDOM_MODELS_NOTE."""
    chosen = PRESETS[preset]
    target = random_target(chosen, seed)
    drafter = truncated_drafter(target, chosen.drafter_layers)
    n, total = chosen.drafter_layers, target.config.n_layers
    description = "\n".join(
        [
            RANDOM_MODELS_NOTE,
            f"target: preset {preset!r} ({_describe_config(target.config)}), seed {seed}; weight matrices of "
            f"{_blocks(0, n)} and lm_head x{KEPT_SCALE:g}, of {_blocks(n, total)} x{SKIPPED_SCALE:g}",
            f"drafter: layer-truncated self-drafter, the target's embedding, {_blocks(0, n)}, final norm and lm_head "
            f"({_describe_config(drafter.config)})",
        ]
    )
    return target, drafter, description


def is_hf_checkpoint(path: str) -> bool:
    """A Hugging Face checkpoint directory (config.json beside safetensors), not a jspec one."""
    return os.path.exists(os.path.join(path, "config.json"))


def load_checkpoint(path: str, dtype: str | None = None) -> Transformer:
    """A demo model by name, a GGUF file, a `jspec.models.save` checkpoint or a Hugging Face
    checkpoint directory (`jspec.models.from_hf`), in `dtype` (default its own)."""
    if path in demo.MODELS:
        return demo.load(path, param_dtype=dtype)
    if path.endswith(".gguf"):
        return jspec.models.from_gguf(path, param_dtype=dtype)
    model = jspec.models.from_hf(path) if is_hf_checkpoint(path) else jspec.models.load(path)
    return model if dtype is None or dtype == model.config.param_dtype else jspec.models.cast(model, dtype)


def loaded_models(
    target_path: str, drafter_path: str, dtype: str | None = None, drafter_dtype: str | None = None
) -> tuple[Transformer, Transformer, str]:
    """(target, drafter, description) from two checkpoints or demo names; the drafter in
    `drafter_dtype` (default: `dtype`)."""
    target = load_checkpoint(target_path, dtype)
    drafter = load_drafter(drafter_path, target, drafter_dtype or dtype)
    if target_path == demo.SMOLLM2 and drafter_path == demo.SMOLLM2_DRAFTER:
        first = CHAT_MODELS_NOTE
    elif target_path in demo.CODE_MODELS + (demo.HYBRID,) and drafter_path in demo.CODE_MODELS:
        first = DEMO_MODELS_NOTE
    else:
        first = "models: checkpoints"
    description = "\n".join(
        [
            first,
            f"target: {target_path} ({_describe_config(target.config)})",
            f"drafter: {drafter_path} ({describe_drafter(drafter)})",
        ]
    )
    return target, drafter, description


def random_prompts(vocab_size: int, batch_size: int, prompt_len: int, seed: int) -> jax.Array:
    """int32 `[batch_size, prompt_len]` token ids drawn uniformly from a fixed seed."""
    return jax.random.randint(jax.random.key(seed), (batch_size, prompt_len), 0, vocab_size)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and prompt flags both demo scripts share."""
    parser.add_argument(
        "--target",
        metavar="NAME|PATH",
        default=demo.SMOLLM2,
        help=f"target: a demo model ({', '.join(DEMO_TARGETS)}), a GGUF file, a jspec checkpoint or a Hugging Face "
        f"directory (default: {demo.SMOLLM2})",
    )
    parser.add_argument(
        "--drafter",
        metavar="NAME|PATH",
        help="drafter: a demo drafter's name or a path as --target (default: the demo target's own drafter, "
        f"{DEMO_DRAFTER[demo.SMOLLM2]} or {DEMO_DRAFTER['target']})",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="random-init models of this size instead")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="parameter and activation dtype of both models (default: their own, float32 for the demo models)",
    )
    parser.add_argument(
        "--drafter-dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="the drafter's dtype, if not --dtype's (on CPU a small drafter's one-token pass is faster in "
        "float32, a target's multi-token pass in bfloat16)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random models, prompts and sampling (default: 0)")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts decoded together (default: 1)")
    parser.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per row, code prompts (default: 64)")


def uses_demo_models(args: argparse.Namespace) -> bool:
    """The small code models (`--target target`, or the hybrid code model `--target hybrid`)."""
    return args.preset is None and args.target in ("target", demo.HYBRID)


def is_chat(args: argparse.Namespace) -> bool:
    """A chat target: SmolLM2 or any GGUF file (whose tokenizer and chat template come with it)."""
    return args.preset is None and (args.target == demo.SMOLLM2 or args.target.endswith(".gguf"))


def chat_tokenizer(args: argparse.Namespace):
    """The chat target's `ChatTokenizer`, or None for other targets."""
    if not is_chat(args):
        return None
    if args.target == demo.SMOLLM2:
        return demo.tokenizer(demo.SMOLLM2)
    return jspec.models.gguf_tokenizer(args.target)


def text_tokenizer(args: argparse.Namespace):
    """The tokenizer code prompts are encoded with: the code models', a Hugging Face target's
    tokenizer.json, or None (random token prompts; chat targets use `chat_tokenizer`)."""
    if uses_demo_models(args):
        return demo.tokenizer()
    if args.preset is None and not is_chat(args) and os.path.exists(os.path.join(args.target, "tokenizer.json")):
        return jspec.models.load_tokenizer(args.target)
    return None


def models_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Transformer, Transformer, str]:
    """The random-init --preset models, or the --target/--drafter models (demo names or paths)."""
    if args.preset is not None:
        if args.drafter is not None or args.target != demo.SMOLLM2:
            parser.error("--preset (random-init models) and --target/--drafter exclude each other")
        target, drafter, description = random_models(args.seed, args.preset)
        if args.dtype is not None:
            target = jspec.models.cast(target, args.dtype)
        if (args.drafter_dtype or args.dtype) is not None:
            drafter = jspec.models.cast(drafter, args.drafter_dtype or args.dtype)
        return target, drafter, description
    drafter = args.drafter or DEMO_DRAFTER.get(args.target)
    if drafter is None:
        parser.error(f"--target {args.target} needs --drafter (a path, or a demo drafter's name)")
    if args.target in demo.MODELS and args.target not in DEMO_TARGETS:
        parser.error(f"--target must be one of {DEMO_TARGETS} or a path, got the drafter {args.target!r}")
    for flag, value in (("--target", args.target), ("--drafter", drafter)):
        if value not in demo.MODELS and not os.path.exists(value):
            parser.error(f"{flag} {value!r} is neither a demo model ({', '.join(demo.MODELS)}) nor an existing path")
    return loaded_models(args.target, drafter, args.dtype, args.drafter_dtype)


def prompts_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, vocab_size: int) -> tuple[jax.Array, str]:
    """(prompts `[batch_size, prompt_len]`, description): the last prompt_len tokens of the first
    batch_size demo code prompts with the demo models, else random token ids."""
    batches, description = prompt_batches(parser, args, vocab_size, 1)
    return batches[0], description


def prompt_batches(
    parser: argparse.ArgumentParser, args: argparse.Namespace, vocab_size: int, n_batches: int
) -> tuple[list[jax.Array], str]:
    """n_batches different prompt batches `[batch_size, prompt_len]` and their description: the
    demo code prompts in order (batch i holds prompts i*B .. i*B+B-1), in the demo tokenizer's or a
    Hugging Face target's own tokens (`text_tokenizer`), else random token ids (batch i from seed + i)."""
    if n_batches < 1:
        parser.error(f"the number of prompt batches must be >= 1, got {n_batches}")
    tokenizer = text_tokenizer(args)
    if tokenizer is not None:  # the demo models, or a Hugging Face target with its tokenizer.json: held-out code
        texts = demo.prompts()
        own = uses_demo_models(args)
        models = "the demo models" if own else f"{args.target}/tokenizer.json"
        if args.batch_size < 1 or args.batch_size * n_batches > len(texts):
            parser.error(
                f"--batch-size x batches must lie in [1, {len(texts)}] (the demo prompts) with {models}, "
                f"got {args.batch_size} x {n_batches}"
            )
        batches = [
            jax.numpy.asarray(
                demo.encode_prompts(texts[i * args.batch_size : (i + 1) * args.batch_size], args.prompt_len, tokenizer)
            )
            for i in range(n_batches)
        ]
        source = "(jspec.demo.prompts)" if own else f"encoded with {args.target}/tokenizer.json"
        return batches, (
            f"prompts: the last {args.prompt_len} tokens of {args.batch_size * n_batches} held-out stdlib code "
            f"snippet(s) {source}, {n_batches} batch(es) of {args.batch_size}"
        )
    batches = [random_prompts(vocab_size, args.batch_size, args.prompt_len, args.seed + i) for i in range(n_batches)]
    return (
        batches,
        f"prompts: {n_batches} batch(es) of {args.batch_size} x {args.prompt_len} random token ids (seeds {args.seed}..)",
    )
