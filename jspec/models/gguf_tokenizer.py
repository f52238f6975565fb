"""A GGUF file's tokenizer and chat template as one object: `gguf_tokenizer(path) -> ChatTokenizer`.

llama.cpp stores a byte-level BPE tokenizer as its vocabulary (`tokenizer.ggml.tokens`), merges,
token types (control tokens are the special ones) and the name of its pre-tokenizer
(`tokenizer.ggml.pre`), which selects a regular expression inside llama.cpp. This module rebuilds
the same `tokenizers.Tokenizer` Hugging Face ships for the model, and renders the chat template
(`tokenizer.chat_template`) with jinja2 the way `transformers`' `apply_chat_template` does.
"""

from __future__ import annotations

import os
from typing import Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from jspec.models.gguf import GGUFFile

# llama.cpp's pre-tokenizer names and the Hugging Face pre-tokenizers that split text the same way.
_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_LLAMA3_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _pre_tokenizer(name: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    bytes_only = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    if name in ("gpt2", "gpt-2", "default"):
        return byte_level
    if name == "smollm":  # SmolLM/SmolLM2: digits one by one, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if name == "qwen2":
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"), bytes_only])
    if name in ("llama-bpe", "llama3"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), bytes_only])
    raise ValueError(f"GGUF tokenizer.ggml.pre must be one of gpt2, default, smollm, qwen2, llama-bpe, got {name!r}")


_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types that are never split by the pre-tokenizer


class ChatTokenizer:
    """A `tokenizers.Tokenizer` with its special tokens and chat template.

    encode(text) -> ids (no special tokens added; special tokens written in the text are matched);
    decode(ids) -> text; apply_chat_template(messages) -> ids of the rendered conversation;
    eos_id: the token that ends an answer.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        eos_id: int,
        bos_id: int | None = None,
        chat_template: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.eos_id = int(eos_id)
        self.bos_id = None if bos_id is None else int(bos_id)
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token(self) -> str:
        return self.tokenizer.id_to_token(self.eos_id)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.tokenizer.id_to_token(self.bos_id)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
        """The conversation as text, rendered by the chat template (as `transformers` renders it)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        return _compiled_template(self.chat_template).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token,
        )

    def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation; with add_generation_prompt, ending where the
        assistant's answer starts."""
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt))


_TEMPLATES: dict[str, object] = {}


def _compiled_template(source: str):
    """The chat template compiled in the environment `transformers` uses (sandboxed, trim_blocks,
    lstrip_blocks, loop controls, `raise_exception`, `tojson`, `strftime_now`)."""
    if source not in _TEMPLATES:
        import datetime
        import json

        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


def gguf_tokenizer(path: str | os.PathLike | GGUFFile) -> ChatTokenizer:
    """The tokenizer stored in a GGUF file (byte-level BPE: `tokenizer.ggml.model` "gpt2"), with its
    special tokens, EOS and chat template. Raises ValueError naming the missing or unsupported key."""
    file = path if isinstance(path, GGUFFile) else GGUFFile(path)
    kind = file.require("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model must be 'gpt2' (byte-level BPE), got {kind!r}")
    tokens = file.require("tokenizer.ggml.tokens")
    merges = file.require("tokenizer.ggml.merges")
    types = file.get("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ValueError(f"GGUF tokenizer.ggml.merges holds {merge!r}, not a pair 'left right'")
        pairs.append((left, right))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(file.get("tokenizer.ggml.pre", "default"))
    tokenizer.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == _CONTROL]
    added = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == _USER_DEFINED]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(added)
    eos = file.require("tokenizer.ggml.eos_token_id")
    return ChatTokenizer(
        tokenizer,
        eos_id=eos,
        bos_id=file.get("tokenizer.ggml.bos_token_id"),
        chat_template=file.get("tokenizer.chat_template"),
    )


__all__ = ["ChatTokenizer", "gguf_tokenizer"]
