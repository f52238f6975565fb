"""A byte-level BPE tokenizer (Hugging Face `tokenizers`), trained on a corpus and saved with models."""

from __future__ import annotations

import os
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"  # separates documents; the only special token


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
    """Byte-level BPE: every byte is a base token, so any text round-trips exactly."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 bytes + EOS), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def eos_id(tokenizer: Tokenizer) -> int:
    return tokenizer.token_to_id(EOS)


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike) -> None:
    tokenizer.save(os.fspath(path))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    return Tokenizer.from_file(os.fspath(path))
