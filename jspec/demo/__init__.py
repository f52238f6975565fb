"""The demo models: SmolLM2-135M-Instruct with a drafter trained for it, and small code models.

    target = jspec.demo.load("smollm2-135m")            # fetched once per machine (jspec.demo.smollm2)
    drafter = jspec.demo.load("smollm2-135m-drafter")   # bundled; shares the target's embedding table
    head = jspec.demo.load("smollm2-135m-eagle")        # bundled EAGLE head (jspec.eagle), likewise
    tok = jspec.demo.tokenizer("smollm2-135m")          # a ChatTokenizer: encode, decode, chat template
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}])

The small code models are a target and three drafters trained on the Python standard library's
source, bundled in the package (fast enough for tests), and a hybrid target of Mamba-2 and
attention layers trained on the same source (`jspec.demo.load("hybrid")`, drafted by "drafter"):

    target = jspec.demo.load("target")
    drafter = jspec.demo.load("drafter-distilled")
    tok = jspec.demo.tokenizer()
    prompts = jspec.demo.encode_prompts(jspec.demo.prompts()[:4], length=64)
    out = jspec.speculative_generate(target, drafter, prompts, max_new_tokens=64)
    print(tok.decode(out.tokens[0, : out.lengths[0]].tolist()))

Each model has a card (`jspec.demo.card(name)`, also jspec/demo/cards/NAME.md) with its config,
data, training command, held-out perplexity and, for drafters, alpha, tau and speedup measured
with the target. They were trained by `python -m train.demo_models`.
"""

from __future__ import annotations

import functools
import json
import pathlib

import numpy as np
from flax import nnx
from tokenizers import Tokenizer

from jspec.demo import smollm2
from jspec.models import cast
from jspec.models import load as load_checkpoint
from jspec.training.tokenizer import load_tokenizer

CODE_MODELS = ("target", "drafter", "drafter-distilled", "drafter-trimmed")
DRAFTERS = CODE_MODELS[1:]
# A hybrid state-space target (Mamba-2 and attention layers) trained on the same code; it drafts
# with the attention-only code drafters (`jspec.models.mamba2`).
HYBRID = "hybrid"
SMOLLM2 = "smollm2-135m"
SMOLLM2_DRAFTER = "smollm2-135m-drafter"
SMOLLM2_EAGLE = "smollm2-135m-eagle"
MODELS = (SMOLLM2, SMOLLM2_DRAFTER, SMOLLM2_EAGLE) + CODE_MODELS + (HYBRID,)
DEMO_DIR = pathlib.Path(__file__).parent


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"name must be one of {MODELS}, got {name!r}")


def model_path(name: str) -> pathlib.Path:
    """The Orbax checkpoint directory of a bundled demo model (every model but smollm2-135m)."""
    _check_name(name)
    if name == SMOLLM2:
        raise ValueError(f"{SMOLLM2} is not bundled; jspec.demo.smollm2.gguf_path() fetches it")
    return DEMO_DIR / "models" / name


def load(name: str, *, param_dtype: str | None = None):
    """A fresh copy of the demo model `name` (see `MODELS`): a `jspec.models.Transformer`, or for
    "smollm2-135m-eagle" a `jspec.eagle.EagleHead`.

    "smollm2-135m" is read from its GGUF file (fetched and verified once per machine, see
    `jspec.demo.smollm2`); "smollm2-135m-drafter" and "smollm2-135m-eagle" are bundled without
    the embedding table they share with the target, and take it from the same file. param_dtype:
    cast the parameters (e.g. "bfloat16"); default float32.
    """
    _check_name(name)
    if name == SMOLLM2:
        graph, state = _smollm2_state()  # dequantized once per process; every call gets its own module
        model = nnx.merge(graph, state)
        return model if param_dtype is None else cast(model, param_dtype)
    path = model_path(name)
    if not path.is_dir():
        raise FileNotFoundError(f"demo model {name!r} is missing at {path}; see its card for the training recipe")
    if name == SMOLLM2_EAGLE:
        from jspec.eagle import cast_head, load_head

        head = load_head(path, nnx.merge(*_smollm2_state()))
        return head if param_dtype is None else cast_head(head, param_dtype)
    if name == SMOLLM2_DRAFTER:
        model = load_checkpoint(path, shared=_smollm2_embedding())
    else:
        model = load_checkpoint(path)
    return model if param_dtype is None else cast(model, param_dtype)


@functools.cache
def _smollm2_state():
    from jspec.models.gguf import from_gguf

    return nnx.split(from_gguf(smollm2.gguf_path()))


def _smollm2_embedding() -> dict:
    return {"embed": {"embedding": _smollm2_state()[1]["embed"]["embedding"][...]}}


@functools.cache
def _code_tokenizer() -> Tokenizer:
    return load_tokenizer(DEMO_DIR / "tokenizer.json")


@functools.cache
def _chat_tokenizer():
    from jspec.models.gguf_tokenizer import gguf_tokenizer

    return gguf_tokenizer(smollm2.gguf_path())


def tokenizer(name: str = "target"):
    """The tokenizer of a demo model: for the SmolLM2 models a `ChatTokenizer` (encode, decode,
    apply_chat_template, eos_id) read from the GGUF file; for the code models the 8192-token
    byte-level BPE `tokenizers.Tokenizer` they share (the default)."""
    _check_name(name)
    return _chat_tokenizer() if name in (SMOLLM2, SMOLLM2_DRAFTER, SMOLLM2_EAGLE) else _code_tokenizer()


def prompts() -> list[str]:
    """Code-completion prompts: 12-line snippets of held-out stdlib files (none was trained on),
    each ending with a newline."""
    with open(DEMO_DIR / "prompts.json") as f:
        return [p["text"] for p in json.load(f)]


def encode_prompts(texts: list[str], length: int, tokenizer_=None) -> np.ndarray:
    """The last `length` tokens of each text: int32 `[len(texts), length]`, so all rows end where
    their snippet ends and need no padding. `tokenizer_`: a `tokenizers.Tokenizer` (default: the
    demo models'), e.g. a Hugging Face checkpoint's (`jspec.models.load_tokenizer`)."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    rows = []
    for i, ids in enumerate(e.ids for e in (tokenizer_ or tokenizer()).encode_batch(texts)):
        if len(ids) < length:
            raise ValueError(f"texts[{i}] has {len(ids)} tokens, fewer than length={length}")
        rows.append(ids[-length:])
    return np.asarray(rows, np.int32)


def card(name: str) -> str:
    """The model card (markdown) of a demo model."""
    _check_name(name)
    return (DEMO_DIR / "cards" / f"{name}.md").read_text()


__all__ = [
    "CODE_MODELS",
    "DRAFTERS",
    "HYBRID",
    "MODELS",
    "SMOLLM2",
    "SMOLLM2_DRAFTER",
    "card",
    "encode_prompts",
    "load",
    "model_path",
    "prompts",
    "smollm2",
    "tokenizer",
]
