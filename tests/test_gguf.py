"""jspec.models.gguf: GGUF files of every supported family load as the same model `from_hf` builds
from the same weights, whatever the tensor types, and bad files raise a ValueError naming the field.

Each test writes a tiny GGUF file with gguf's own writer, laid out as llama.cpp's converter lays
it out (q/k rows permuted for llama, Gemma norms stored as 1 + w, 1-D tensors in F32), with its
matrices in a rotation of tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K. The
reference is a Hugging Face directory (config.json written here by hand, safetensors) holding the
dequantized weights, loaded with `from_hf`, whose own parity with `transformers` is tested in
tests/test_hf.py. Under the `hf` extra, `transformers`' GGUF loader is a second reference.
"""

from __future__ import annotations

import json

import gguf
import jax
import numpy as np
import pytest
from flax import nnx
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import save_file

from jspec.models import from_gguf, from_hf
from jspec.models.gguf import GGUFFile, unpermute_rotary

from conftest import causal_logits

VOCAB = 320
D, FF, HEADS, KV, LAYERS = 256, 512, 4, 2, 2  # K-quants need rows of 256


def head_dim(family: str) -> int:
    """Qwen3 sets head_dim apart from d_model / heads (128 in every Qwen3 model), the others do not."""
    return 128 if family == "qwen3" else D // HEADS


MATRIX_TYPES = (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16, Q.BF16, Q.F32)
# Where each K-quant block keeps its float16 scale(s), and a scale that gives weights of ~0.1.
_K_SCALES = {Q.Q4_K: ((0, 2), 2e-4), Q.Q5_K: ((0, 2), 1e-4), Q.Q6_K: ((-2,), 4e-5)}


def quantized(rng: np.random.Generator, shape: tuple[int, int], qtype: Q) -> np.ndarray:
    """Random data of `shape` (torch layout [rows, row_len]) stored as `qtype`: float32/16 arrays,
    or the quantized bytes gguf's writer takes with raw_dtype."""
    values = rng.normal(0, 0.1, shape).astype(np.float32)
    if qtype == Q.F32:
        return values
    if qtype == Q.F16:
        return values.astype(np.float16)
    if qtype in _K_SCALES:  # no numpy quantizer: random blocks with sane float16 scales
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        data = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
        offsets, scale = _K_SCALES[qtype]
        for offset in offsets:
            start = offset % size
            data[:, :, start : start + 2] = np.full(data.shape[:2], scale, np.float16)[..., None].view(np.uint8)
        return data.reshape(shape[0], -1)
    return gguf.quants.quantize(values, qtype)


def dequantized(data: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype in (Q.F32, Q.F16):
        return data.astype(np.float32)
    return gguf.quants.dequantize(data, qtype).astype(np.float32)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (rows of each head interleaved for its RoPE)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


FAMILIES = ("llama", "llama-untied", "qwen2", "qwen3", "gemma", "gemma2")


def hf_config(family: str) -> dict:
    """The Hugging Face config.json the GGUF metadata below describes, written independently."""
    arch, hd = family.removesuffix("-untied"), head_dim(family)
    config = {
        "model_type": arch, "vocab_size": VOCAB, "hidden_size": D, "intermediate_size": FF,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": hd,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 50000.0,
        "tie_word_embeddings": family in ("llama", "gemma", "gemma2"), "torch_dtype": "float32",
        "hidden_act": "gelu_pytorch_tanh" if arch.startswith("gemma") else "silu",
    }  # fmt: skip
    if arch == "qwen2":
        config["use_sliding_window"] = False
    if arch == "gemma2":
        config.update(
            sliding_window=4, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=hd,
            attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
        )  # fmt: skip
    return config


def hf_tensors(family: str, rng: np.random.Generator) -> tuple[dict, dict]:
    """(Hugging Face tensors [dequantized float32], GGUF tensors {name: (data, qtype)}) of one model."""
    arch, hd = family.removesuffix("-untied"), head_dim(family)
    hf, gg = {}, {}
    types = iter(MATRIX_TYPES * 20)

    def matrix(hf_name, gg_name, shape, permute_heads=None):
        qtype = next(types)
        data = quantized(rng, shape, qtype)
        hf[hf_name] = dequantized(data, qtype)
        gg[gg_name] = (data if permute_heads is None else llama_cpp_permute(data, permute_heads), qtype)

    def vector(hf_name, gg_name, size, norm=False):
        value = rng.normal(0.0 if not norm else 0.2, 0.1, size).astype(np.float32)
        hf[hf_name] = value
        # llama.cpp stores Gemma's norm scales as 1 + w (computed in float32, as here).
        gg[gg_name] = (value + np.float32(1.0) if norm and arch.startswith("gemma") else value, Q.F32)

    matrix("model.embed_tokens.weight", "token_embd.weight", (VOCAB, D))
    vector("model.norm.weight", "output_norm.weight", D, norm=True)
    if family in ("llama-untied", "qwen2", "qwen3"):
        matrix("lm_head.weight", "output.weight", (VOCAB, D))
    for i in range(LAYERS):
        h, g = f"model.layers.{i}.", f"blk.{i}."
        vector(h + "input_layernorm.weight", g + "attn_norm.weight", D, norm=True)
        if arch == "gemma2":
            vector(h + "post_attention_layernorm.weight", g + "post_attention_norm.weight", D, norm=True)
            vector(h + "pre_feedforward_layernorm.weight", g + "ffn_norm.weight", D, norm=True)
            vector(h + "post_feedforward_layernorm.weight", g + "post_ffw_norm.weight", D, norm=True)
        else:
            vector(h + "post_attention_layernorm.weight", g + "ffn_norm.weight", D, norm=True)
        permute = arch == "llama"
        matrix(h + "self_attn.q_proj.weight", g + "attn_q.weight", (HEADS * hd, D), HEADS if permute else None)
        matrix(h + "self_attn.k_proj.weight", g + "attn_k.weight", (KV * hd, D), KV if permute else None)
        matrix(h + "self_attn.v_proj.weight", g + "attn_v.weight", (KV * hd, D))
        matrix(h + "self_attn.o_proj.weight", g + "attn_output.weight", (D, HEADS * hd))
        if arch == "qwen2":
            for name, rows in (("q", HEADS), ("k", KV), ("v", KV)):
                vector(h + f"self_attn.{name}_proj.bias", g + f"attn_{name}.bias", rows * hd)
        if arch == "qwen3":
            vector(h + "self_attn.q_norm.weight", g + "attn_q_norm.weight", hd, norm=True)
            vector(h + "self_attn.k_norm.weight", g + "attn_k_norm.weight", hd, norm=True)
        matrix(h + "mlp.gate_proj.weight", g + "ffn_gate.weight", (FF, D))
        matrix(h + "mlp.up_proj.weight", g + "ffn_up.weight", (FF, D))
        matrix(h + "mlp.down_proj.weight", g + "ffn_down.weight", (D, FF))
    return hf, gg


def write_gguf(path, family: str, tensors: dict, *, drop_key: str | None = None, arch: str | None = None) -> None:
    arch = arch or family.removesuffix("-untied")
    writer = gguf.GGUFWriter(str(path), arch)
    keys = {
        "block_count": LAYERS, "context_length": 256, "embedding_length": D, "feed_forward_length": FF,
        "head_count": HEADS, "head_count_kv": KV, "rope_freq_base": 50000.0, "layer_norm_rms_eps": 1e-5,
    }  # fmt: skip
    for key, value in keys.items():
        if key != drop_key:
            getattr(writer, f"add_{key}")(value)
    if arch in ("qwen3", "gemma", "gemma2"):
        writer.add_key_length(head_dim(family))
        writer.add_value_length(head_dim(family))
    else:
        writer.add_rope_dimension_count(head_dim(family))
    if arch == "gemma2":
        writer.add_sliding_window(4)
        writer.add_attn_logit_softcapping(5.0)
        writer.add_final_logit_softcapping(3.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    for name, (data, qtype) in tensors.items():
        if data.dtype == np.uint8:
            writer.add_tensor(name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def make_files(directory, family: str):
    """DIRECTORY/model.gguf and the same weights as a Hugging Face directory DIRECTORY/hf."""
    hf, gg = hf_tensors(family, np.random.default_rng(FAMILIES.index(family)))
    write_gguf(directory / "model.gguf", family, gg)
    (directory / "hf").mkdir()
    save_file(hf, str(directory / "hf" / "model.safetensors"))
    (directory / "hf" / "config.json").write_text(json.dumps(hf_config(family)))
    return family, directory


@pytest.fixture(scope="module", params=FAMILIES)
def family_files(request, tmp_path_factory):
    return make_files(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def llama_files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("llama"), "llama")


def test_rotary_unpermute_inverts_llama_cpp_permute():
    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
    for heads in (1, 2, 6):
        np.testing.assert_array_equal(unpermute_rotary(llama_cpp_permute(w, heads), heads), w)
    assert not np.array_equal(llama_cpp_permute(w, 2), w)


def test_the_test_files_use_every_required_tensor_type(family_files):
    family, directory = family_files
    used = {Q(t.tensor_type) for t in gguf.GGUFReader(str(directory / "model.gguf")).tensors}
    assert set(MATRIX_TYPES) <= used


def assert_reader_agrees_with_gguf_s(path) -> None:
    """jspec's GGUF reader gives the metadata and tensors gguf's own `GGUFReader` does."""
    ours, theirs = GGUFFile(path), gguf.GGUFReader(str(path))
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.fields.keys() == expected.keys()
    for key, value in expected.items():
        assert ours.fields[key] == (pytest.approx(value, rel=1e-7) if isinstance(value, float) else value), key
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        expected_entry = (tuple(t.shape.tolist()), t.tensor_type, t.data_offset, t.n_bytes)
        assert (mine.dims, mine.tensor_type, mine.offset, mine.n_bytes) == expected_entry, t.name
        if Q(t.tensor_type) in MATRIX_TYPES:
            want = gguf.quants.dequantize(np.asarray(t.data), Q(t.tensor_type)).reshape(tuple(reversed(mine.dims)))
            np.testing.assert_array_equal(ours.dequantized(t.name), want, err_msg=t.name)


def test_the_reader_agrees_with_gguf_s_reader(family_files):
    assert_reader_agrees_with_gguf_s(family_files[1] / "model.gguf")


def test_the_reader_agrees_with_gguf_s_reader_on_smollm2():
    """A real file: a 49k-token vocabulary and merge list, Q4_1 / Q8_0 / F32 tensors."""
    from jspec.demo.smollm2 import gguf_path

    assert_reader_agrees_with_gguf_s(gguf_path())


def test_from_gguf_equals_from_hf_on_the_same_weights(family_files):
    family, directory = family_files
    model, reference = from_gguf(directory / "model.gguf"), from_hf(directory / "hf")
    assert model.config == reference.config
    ours, theirs = nnx.state(model).to_pure_dict(), nnx.state(reference).to_pure_dict()
    # Exact but for Gemma's norms: (1 + w) stored, against 1 + w recomputed from w = stored - 1.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-7), ours, theirs)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 12))
    np.testing.assert_allclose(causal_logits(model, tokens), causal_logits(reference, tokens), rtol=0, atol=1e-5)


def test_without_the_unpermute_llama_logits_differ(llama_files, monkeypatch):
    """The negative control of the rotary permutation: skipping its undo changes llama's logits."""
    family, directory = llama_files
    reference = from_hf(directory / "hf")
    monkeypatch.setattr("jspec.models.gguf.unpermute_rotary", lambda w, n: w)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 12))
    diff = np.abs(np.asarray(causal_logits(from_gguf(directory / "model.gguf"), tokens) - causal_logits(reference, tokens)))
    assert diff.max() > 100 * 1e-5  # 100x the tolerance of the test above


def test_param_dtype_casts_the_dequantized_weights(llama_files):
    family, directory = llama_files
    model = from_gguf(directory / "model.gguf", param_dtype="bfloat16")
    assert model.config.param_dtype == "bfloat16" and model.embed.embedding[...].dtype == np.dtype("bfloat16")


# --- Bad files: a ValueError naming the field. ---------------------------------------------------


def _llama_tensors():
    return hf_tensors("llama", np.random.default_rng(7))[1]


def test_unsupported_architecture_is_named(tmp_path):
    write_gguf(tmp_path / "m.gguf", "llama", _llama_tensors(), arch="mamba")
    with pytest.raises(ValueError, match="general.architecture.*mamba"):
        from_gguf(tmp_path / "m.gguf")


def test_missing_metadata_key_is_named(tmp_path):
    write_gguf(tmp_path / "m.gguf", "llama", _llama_tensors(), drop_key="block_count")
    with pytest.raises(ValueError, match="llama.block_count"):
        from_gguf(tmp_path / "m.gguf")


def test_missing_and_unknown_tensors_are_named(tmp_path):
    tensors = _llama_tensors()
    del tensors["blk.1.ffn_up.weight"]
    write_gguf(tmp_path / "missing.gguf", "llama", tensors)
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        from_gguf(tmp_path / "missing.gguf")
    tensors = {**_llama_tensors(), "blk.0.ssm_a": (np.zeros(4, np.float32), Q.F32)}
    write_gguf(tmp_path / "unknown.gguf", "llama", tensors)
    with pytest.raises(ValueError, match="blk.0.ssm_a"):
        from_gguf(tmp_path / "unknown.gguf")


def test_tensor_type_without_a_dequantizer_is_named(tmp_path):
    tensors = {**_llama_tensors(), "output_norm.weight": (np.arange(D, dtype=np.int32), Q.I32)}
    write_gguf(tmp_path / "m.gguf", "llama", tensors)
    with pytest.raises(ValueError, match="output_norm.weight.*I32"):
        from_gguf(tmp_path / "m.gguf")


def test_not_a_gguf_file_is_named(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        from_gguf(tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="is not a file"):
        from_gguf(tmp_path / "absent.gguf")


# --- transformers' own GGUF loader (the hf extra). ----------------------------------------------


@pytest.mark.parametrize("family", ["llama", "llama-untied", "qwen2", "qwen3"])
def test_from_gguf_matches_transformers_gguf_loading(family, tmp_path):
    """transformers' GGUF reader as a second reference. It reads no gemma files, and for gemma2
    it ignores the stored soft-caps, window and query scale (its defaults stand in), so those two
    families are compared through from_hf above only."""
    torch = pytest.importorskip("torch", reason="the hf extra (torch, transformers) is not installed")
    tf = pytest.importorskip("transformers", reason="the hf extra (torch, transformers) is not installed")
    family, directory = make_files(tmp_path, family)
    model = from_gguf(directory / "model.gguf")
    theirs = tf.AutoModelForCausalLM.from_pretrained(str(directory), gguf_file="model.gguf", dtype=torch.float32).eval()
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, 12))
    with torch.no_grad():
        expected = theirs(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(causal_logits(model, tokens)), expected, rtol=0, atol=1e-4)
