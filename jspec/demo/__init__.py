"""The bundled demo models: a target and three drafters trained on the Python standard library's source.

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
from tokenizers import Tokenizer

from jspec.models import Transformer
from jspec.models import load as load_checkpoint
from jspec.training.tokenizer import load_tokenizer

MODELS = ("target", "drafter", "drafter-distilled", "drafter-trimmed")
DRAFTERS = MODELS[1:]
DEMO_DIR = pathlib.Path(__file__).parent


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"name must be one of {MODELS}, got {name!r}")


def model_path(name: str) -> pathlib.Path:
    """The Orbax checkpoint directory of a demo model."""
    _check_name(name)
    return DEMO_DIR / "models" / name


def load(name: str) -> Transformer:
    """A fresh copy of the demo model `name`: one of "target", "drafter", "drafter-distilled",
    "drafter-trimmed"."""
    path = model_path(name)
    if not path.is_dir():
        raise FileNotFoundError(f"demo model {name!r} is missing at {path}; run `python -m train.demo_models --export`")
    return load_checkpoint(path)


@functools.cache
def tokenizer() -> Tokenizer:
    """The 8192-token byte-level BPE tokenizer all demo models share."""
    return load_tokenizer(DEMO_DIR / "tokenizer.json")


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


__all__ = ["DRAFTERS", "MODELS", "card", "encode_prompts", "load", "model_path", "prompts", "tokenizer"]
