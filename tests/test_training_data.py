"""jspec.training corpus, tokenizer and data: deterministic splits and batches, exact round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jspec.training.corpus import Document, read_corpus, split_corpus
from jspec.training.data import batch_at, eval_batches, token_stream
from jspec.training.tokenizer import EOS, eos_id, load_tokenizer, save_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def stdlib_docs():
    return read_corpus("stdlib")


@pytest.fixture(scope="module")
def small_tokenizer(stdlib_docs):
    return train_tokenizer([d.text for d in stdlib_docs[:40]], vocab_size=512)


def test_stdlib_corpus_excludes_site_packages(stdlib_docs):
    assert len(stdlib_docs) > 500
    assert not any("site-packages" in d.name for d in stdlib_docs)
    assert all(d.name.endswith(".py") for d in stdlib_docs)


def test_split_is_by_file_deterministic_and_disjoint(stdlib_docs):
    train, held = split_corpus(stdlib_docs, 0.05, seed=0)
    again_train, again_held = split_corpus(list(reversed(stdlib_docs)), 0.05, seed=0)
    assert {d.name for d in held} == {d.name for d in again_held}
    assert not {d.name for d in train} & {d.name for d in held}
    assert len(train) + len(held) == len(stdlib_docs)
    assert 0.02 < len(held) / len(stdlib_docs) < 0.08
    assert {d.name for d in split_corpus(stdlib_docs, 0.05, seed=1)[1]} != {d.name for d in held}


def test_folder_and_jsonl_sources(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("hello\n")
    (tmp_path / "skip.bin").write_text("nope")
    assert [d.name for d in read_corpus(str(tmp_path))] == ["a.py", "sub/b.txt"]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in ["one", "two"]) + "\n")
    assert [d.text for d in read_corpus(str(jsonl))] == ["one", "two"]
    with pytest.raises(ValueError, match="source must be"):
        read_corpus(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="held_out_fraction"):
        split_corpus([Document("a", "x")], 1.5)


def test_tokenizer_round_trips_and_saves(small_tokenizer, stdlib_docs, tmp_path):
    text = stdlib_docs[-1].text  # not in the tokenizer's training files
    ids = small_tokenizer.encode(text).ids
    assert small_tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode()) / 2  # BPE merges compress code
    assert small_tokenizer.get_vocab_size() == 512
    assert small_tokenizer.id_to_token(eos_id(small_tokenizer)) == EOS
    save_tokenizer(small_tokenizer, tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path / "tokenizer.json").encode(text).ids == ids
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["x"], vocab_size=100)


def test_batches_are_a_function_of_the_step(small_tokenizer, stdlib_docs):
    stream = token_stream(stdlib_docs[:5], small_tokenizer)
    assert stream.dtype == np.int32 and (stream == eos_id(small_tokenizer)).sum() == 5
    a = batch_at(stream, 7, batch_size=4, seq_len=32, seed=0)
    assert a.shape == (4, 33)
    np.testing.assert_array_equal(a, batch_at(stream, 7, 4, 32, 0))
    assert not np.array_equal(a, batch_at(stream, 8, 4, 32, 0))
    held = eval_batches(stream, batch_size=2, seq_len=32, max_batches=3)
    assert len(held) == 3 and all(b.shape == (2, 33) for b in held)
    np.testing.assert_array_equal(held[0][0], stream[:33])
    np.testing.assert_array_equal(held[-1][-1], stream[-33:])  # the whole stream, not only its start
    starts = [int(np.flatnonzero((np.lib.stride_tricks.sliding_window_view(stream, 33) == w).all(1))[0]) for b in held for w in b]
    assert np.all(np.diff(starts) >= 33)  # non-overlapping
    with pytest.raises(ValueError, match="no batch"):
        eval_batches(stream[:40], batch_size=2, seq_len=32, max_batches=3)
    with pytest.raises(ValueError, match="shorter than seq_len"):
        batch_at(stream[:10], 0, 1, 32, 0)
