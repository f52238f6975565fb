"""jspec.models.gguf_tokenizer: SmolLM2's GGUF tokenizer and chat template give transformers' ids,
and bad tokenizer metadata raises a ValueError naming the key.

transformers' GGUF tokenizer converter builds SmolLM2's tokenizer with GPT-2's pre-tokenizer only;
llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json) first split digits one by
one, which changes the ids of whitespace before a digit ("x  1"). The comparison therefore gives
transformers' tokenizer that digit split, and one test shows the difference it makes.
"""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest

from jspec.demo.smollm2 import gguf_path
from jspec.models import gguf_tokenizer

TEXTS = [
    "Hello, world! 12345 héllo 日本語 🤗 ça coûte 3,50 € — d'accord? I'll've",
    "def f(x):\n    return x  +  1\n\n\n\t\tz = [i ** 2 for i in range(10)]  # squares\n",
    "  leading   spaces and trailing   \r\n\r\n",
    "x  1   22    333 \u00a0nbsp\u2003em-space",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_end|><|im_end|>text<|endoftext|><repo_name>",
]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2 + 2?"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return gguf_tokenizer(gguf_path())


def test_round_trip_and_special_tokens(tokenizer):
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("<|im_start|><|im_end|>") == [1, 2]
    assert tokenizer.eos_id == 2 and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.vocab_size == 49152
    assert tokenizer.decode(tokenizer.encode("<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"


def test_chat_template_renders_the_default_system_prompt(tokenizer):
    rendered = tokenizer.render_chat([{"role": "user", "content": "What is 2+2?"}])
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not tokenizer.render_chat(CONVERSATION, add_generation_prompt=False).endswith("assistant\n")
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        tokenizer.apply_chat_template([{"content": "no role"}])


@pytest.fixture(scope="module")
def hf_tokenizer():
    pytest.importorskip("torch", reason="the hf extra (torch, transformers) is not installed")
    tf = pytest.importorskip("transformers", reason="the hf extra (torch, transformers) is not installed")
    path = gguf_path()
    return tf.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def test_ids_equal_transformers_with_the_digit_split(tokenizer, hf_tokenizer):
    from tokenizers import pre_tokenizers

    backend = hf_tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer])
    for text in TEXTS:
        assert tokenizer.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert tokenizer.decode(tokenizer.encode(text)) == hf_tokenizer.decode(
            hf_tokenizer.encode(text, add_special_tokens=False)
        )
    assert hf_tokenizer.chat_template == tokenizer.chat_template
    for generation_prompt in (True, False):
        ids = hf_tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=generation_prompt, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=generation_prompt) == list(ids)


def test_transformers_without_the_digit_split_differs_only_before_digits(tokenizer):
    """The converter's plain GPT-2 pre-tokenizer (the reference above corrects it) splits 'x  1'
    differently; text without digits after whitespace runs is tokenized alike."""
    pytest.importorskip("torch", reason="the hf extra (torch, transformers) is not installed")
    tf = pytest.importorskip("transformers", reason="the hf extra (torch, transformers) is not installed")
    path = gguf_path()
    plain = tf.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    assert tokenizer.encode("x  1") != plain.encode("x  1", add_special_tokens=False)
    assert tokenizer.encode(TEXTS[2]) == plain.encode(TEXTS[2], add_special_tokens=False)


# --- Bad tokenizer metadata: a ValueError naming the key. ----------------------------------------


def _write(path, *, model="gpt2", pre="smollm", merges=("a b",), eos=True):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(["a", "b", "ab", "<eos>"])
    writer.add_token_types([1, 1, 1, 3])
    writer.add_token_merges(list(merges))
    if eos:
        writer.add_eos_token_id(3)
    writer.add_tensor("x", np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_tiny_tokenizer_file_works(tmp_path):
    _write(tmp_path / "t.gguf")
    tok = gguf_tokenizer(tmp_path / "t.gguf")
    assert tok.encode("abab<eos>") == [2, 2, 3] and tok.eos_id == 3 and tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(model="llama"), "tokenizer.ggml.model"),
        (dict(pre="some-new-regex"), "tokenizer.ggml.pre"),
        (dict(merges=("ab",)), "tokenizer.ggml.merges"),
        (dict(eos=False), "tokenizer.ggml.eos_token_id"),
    ],
)
def test_bad_tokenizer_metadata_is_named(tmp_path, kwargs, key):
    _write(tmp_path / "t.gguf", **kwargs)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        gguf_tokenizer(tmp_path / "t.gguf")
