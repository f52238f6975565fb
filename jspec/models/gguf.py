"""GGUF files (llama.cpp's format) -> a jspec `Transformer`, dequantized with the `gguf` package.

`from_gguf(path)` reads the metadata and tensors of a GGUF file, dequantizes every tensor with
gguf's (llama.cpp's reference) dequantizers, undoes the rotary permutation llama.cpp's converter
applies to Llama's q/k projections, renames the tensors to their Hugging Face names and builds the
model through the same mapping as `from_hf`. Families: llama (SmolLM2, Llama 2/3, Mistral-style
Llama files), qwen2, qwen3, gemma and gemma2.

What llama.cpp's converter changed, undone here:
- llama: q and k rows are interleaved per head for llama.cpp's rotary kernel (`permute` in
  convert_hf_to_gguf.py); qwen2/qwen3/gemma files keep Hugging Face's layout.
- gemma, gemma2: norm scales are stored as 1 + w, which is what jspec stores too.
- gemma2: the query scale is not stored; llama.cpp uses head_dim ** -0.5, except for the 27B model
  (46 layers), where it uses (d_model / n_heads) ** -0.5. So does this reader.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from jspec.models.config import ModelConfig
from jspec.models.hf import config_from_hf, model_from_tensors
from jspec.models.transformer import Transformer

GGUF_FAMILIES = ("llama", "qwen2", "qwen3", "gemma", "gemma2")

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.").
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# Gemma 2 has four norms per block; llama.cpp's ffn_norm is its pre-feed-forward norm.
_GEMMA2_LAYER_TENSORS = {
    **_LAYER_TENSORS,
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Buffers llama.cpp stores that every implementation recomputes (and that jspec therefore ignores).
_IGNORED_TENSORS = ("rope_freqs.weight",)


# GGUF metadata value types (the numbers of `gguf.GGUFValueType`, written out so that `import jspec`
# does not import gguf) -> little-endian numpy scalars.
_GGUF_UINT32, _GGUF_FLOAT32, _GGUF_STRING, _GGUF_ARRAY, _GGUF_UINT64 = 4, 6, 8, 9, 10
_GGUF_SCALARS = {
    0: np.dtype("<u1"),
    1: np.dtype("<i1"),
    2: np.dtype("<u2"),
    3: np.dtype("<i2"),
    4: np.dtype("<u4"),
    5: np.dtype("<i4"),
    6: np.dtype("<f4"),
    7: np.dtype("?"),
    10: np.dtype("<u8"),
    11: np.dtype("<i8"),
    12: np.dtype("<f8"),
}
_GGUF_MAGIC, _GGUF_VERSIONS, _GGUF_DEFAULT_ALIGNMENT = b"GGUF", (2, 3), 32


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor's entry: `dims` as GGUF lists them (innermost first), its ggml type and where its
    bytes lie in the file."""

    name: str
    dims: tuple[int, ...]
    tensor_type: int
    offset: int
    n_bytes: int


class _Reader:
    """Reads GGUF's little-endian fields in order from a buffer."""

    def __init__(self, buffer):
        self.buffer, self.offset = buffer, 0

    def scalar(self, dtype: np.dtype):
        value = np.frombuffer(self.buffer, dtype, 1, self.offset)[0]
        self.offset += dtype.itemsize
        return value.item()

    def string(self) -> str:
        n = int.from_bytes(self.buffer[self.offset : self.offset + 8], "little")
        start, self.offset = self.offset + 8, self.offset + 8 + n
        return bytes(self.buffer[start : self.offset]).decode("utf-8")

    def value(self, value_type: int):
        if value_type == _GGUF_STRING:
            return self.string()
        if value_type in _GGUF_SCALARS:
            return self.scalar(_GGUF_SCALARS[value_type])
        if value_type != _GGUF_ARRAY:
            raise ValueError(f"unknown metadata value type {value_type}")
        item_type, count = self.scalar(_GGUF_SCALARS[_GGUF_UINT32]), self.scalar(_GGUF_SCALARS[_GGUF_UINT64])
        if item_type in _GGUF_SCALARS:  # one read for the whole array (a tokenizer's scores, token types)
            dtype = _GGUF_SCALARS[item_type]
            values = np.frombuffer(self.buffer, dtype, count, self.offset)
            self.offset += dtype.itemsize * count
            return values.tolist()
        return [self.value(item_type) for _ in range(count)]


class GGUFFile:
    """A GGUF file's metadata (`fields`: key -> Python value) and tensors (`tensors`: name ->
    `GGUFTensor`), the tensors read lazily from a memory map.

    The reader is jspec's own (the format is a header, key/value pairs and tensor entries): gguf's
    `GGUFReader` builds a numpy view per array item, which takes seconds for a tokenizer's 100k
    strings. Dequantizing uses gguf's (llama.cpp's reference) dequantizers.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ValueError(f"path {self.path!r} is not a file")
        try:
            self._data = np.memmap(self.path, mode="r")
            self._parse()
        except Exception as e:  # a truncated or foreign file: struct, index or decoding errors
            raise ValueError(f"path {self.path!r} is not a readable GGUF file: {e}") from e

    def _parse(self) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        if bytes(self._data[:4]) != _GGUF_MAGIC:
            raise ValueError(f"GGUF magic invalid: {bytes(self._data[:4])!r}")
        reader = _Reader(memoryview(self._data))
        reader.offset = 4
        version = reader.scalar(_GGUF_SCALARS[_GGUF_UINT32])
        if version not in _GGUF_VERSIONS:
            raise ValueError(f"GGUF version must be one of {_GGUF_VERSIONS} (little-endian), got {version}")
        n_tensors, n_fields = reader.scalar(_GGUF_SCALARS[_GGUF_UINT64]), reader.scalar(_GGUF_SCALARS[_GGUF_UINT64])
        self.fields = {}
        for _ in range(n_fields):
            key = reader.string()
            value_type = reader.scalar(_GGUF_SCALARS[_GGUF_UINT32])
            value = reader.value(value_type)
            if value_type == _GGUF_FLOAT32:
                # 1e-5 stored as float32 reads back as 9.99999974e-06: take the shortest decimal
                # that rounds to the same float32, which is the value the converter was given.
                value = float(str(np.float32(value)))
            self.fields[key] = value
        entries = []
        for _ in range(n_tensors):
            name = reader.string()
            n_dims = reader.scalar(_GGUF_SCALARS[_GGUF_UINT32])
            dims = tuple(reader.scalar(_GGUF_SCALARS[_GGUF_UINT64]) for _ in range(n_dims))
            entries.append((name, dims, reader.scalar(_GGUF_SCALARS[_GGUF_UINT32]), reader.scalar(_GGUF_SCALARS[_GGUF_UINT64])))
        alignment = self.fields.get("general.alignment", _GGUF_DEFAULT_ALIGNMENT)
        start = -(-reader.offset // alignment) * alignment
        self.tensors = {}
        for name, dims, tensor_type, offset in entries:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(tensor_type)]
            n_bytes = int(np.prod(dims, dtype=np.int64)) // block * type_size
            if start + offset + n_bytes > len(self._data):
                raise ValueError(f"tensor {name!r} runs past the end of the file")
            self.tensors[name] = GGUFTensor(name, dims, tensor_type, start + offset, n_bytes)

    def get(self, key: str, default=None):
        return self.fields.get(key, default)

    def require(self, key: str):
        if key not in self.fields:
            raise ValueError(f"GGUF file {self.path!r} lacks metadata key {key!r}")
        return self.fields[key]

    def dequantized(self, name: str) -> np.ndarray:
        """Tensor `name` as float32, in llama.cpp's row-major order (torch's [out, in] for weights)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        tensor = self.tensors[name]
        qtype = GGMLQuantizationType(tensor.tensor_type)
        shape = tuple(reversed(tensor.dims))  # GGUF lists the innermost dimension first
        raw = np.asarray(self._data[tensor.offset : tensor.offset + tensor.n_bytes])
        try:  # gguf's dequantizers take rows of bytes: [..., bytes per row]
            values = dequantize(raw.reshape(*shape[:-1], -1), qtype)
        except (NotImplementedError, KeyError) as e:
            raise ValueError(f"GGUF tensor {name!r} has type {qtype.name}, which the gguf package cannot dequantize") from e
        return np.asarray(values, np.float32).reshape(shape)


def _architecture(file: GGUFFile) -> str:
    arch = file.require("general.architecture")
    if arch not in GGUF_FAMILIES:
        raise ValueError(f"GGUF general.architecture must be one of {GGUF_FAMILIES}, got {arch!r}")
    return arch


def hf_config_from_gguf(file: GGUFFile) -> dict:
    """The Hugging Face `config.json` dict equivalent to a GGUF file's metadata."""
    arch = _architecture(file)
    key = lambda name: f"{arch}.{name}"  # noqa: E731
    n_heads = int(file.require(key("attention.head_count")))
    n_kv = file.get(key("attention.head_count_kv"), n_heads)
    if isinstance(n_kv, list):
        raise ValueError(f"GGUF {key('attention.head_count_kv')} varies per layer ({n_kv[:4]}...), which jspec does not support")
    d_model = int(file.require(key("embedding_length")))
    n_layers = int(file.require(key("block_count")))
    head_dim = file.get(key("attention.key_length"), file.get(key("rope.dimension_count")))
    head_dim = int(head_dim) if head_dim is not None else d_model // n_heads
    value_dim = file.get(key("attention.value_length"), head_dim)
    if int(value_dim) != head_dim:
        raise ValueError(f"GGUF {key('attention.value_length')}={value_dim} differs from the key length {head_dim}")
    if file.get(key("rope.dimension_count")) not in (None, head_dim):
        raise ValueError(
            f"GGUF {key('rope.dimension_count')}={file.get(key('rope.dimension_count'))} (partial RoPE) is not supported"
        )
    vocab = file.get(key("vocab_size"))
    if vocab is None:
        vocab = len(file.require("tokenizer.ggml.tokens"))
    hf = {
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": d_model,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": head_dim,
        "intermediate_size": int(file.require(key("feed_forward_length"))),
        "max_position_embeddings": int(file.get(key("context_length"), 2048)),
        "rms_norm_eps": float(file.get(key("attention.layer_norm_rms_epsilon"), 1e-6)),
        "rope_theta": float(file.get(key("rope.freq_base"), 10_000.0)),
        "tie_word_embeddings": "output.weight" not in file.tensors,
        "hidden_act": "gelu_pytorch_tanh" if arch in ("gemma", "gemma2") else "silu",
        "attention_bias": arch == "llama" and "blk.0.attn_q.bias" in file.tensors,
        "torch_dtype": "float32",
    }
    scaling = file.get(key("rope.scaling.type"), "none")
    if scaling == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(file.require(key("rope.scaling.factor")))}
    elif scaling not in ("none", None):
        raise ValueError(f"GGUF {key('rope.scaling.type')} must be none or linear, got {scaling!r}")
    if "rope_freqs.weight" in file.tensors:
        raise ValueError(
            "GGUF tensor 'rope_freqs.weight' (per-frequency RoPE factors, e.g. Llama 3.1's scaling) is not supported"
        )
    if arch == "gemma2":
        window = file.get(key("attention.sliding_window"))
        if window is not None:
            hf["sliding_window"] = int(window)
            hf["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        hf["attn_logit_softcapping"] = file.get(key("attn_logit_softcapping"))
        hf["final_logit_softcapping"] = file.get(key("final_logit_softcapping"))
        hf["query_pre_attn_scalar"] = d_model // n_heads if n_layers == 46 else head_dim
    elif file.get(key("attention.sliding_window")) is not None:
        raise ValueError(f"GGUF {key('attention.sliding_window')} is not supported for {arch}")
    return hf


def config_from_gguf(file: GGUFFile, *, param_dtype: str | None = None, dtype: str | None = None) -> ModelConfig:
    """The jspec `ModelConfig` of a GGUF file (default dtypes float32: tensors are dequantized)."""
    return config_from_hf(hf_config_from_gguf(file), param_dtype=param_dtype or "float32", dtype=dtype)


def unpermute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: rows `[n_heads * D, ...]`, each head's rows interleaved
    (pairs for llama.cpp's rotary kernel) back to Hugging Face's rotate-half order."""
    d = weight.shape[0] // n_heads
    return weight.reshape(n_heads, d // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _hf_name(arch: str, name: str) -> str | None:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        table = _GEMMA2_LAYER_TENSORS if arch == "gemma2" else _LAYER_TENSORS
        if parts[2] in table:
            return f"model.layers.{parts[1]}.{table[parts[2]]}"
    return None


def hf_tensors_from_gguf(file: GGUFFile, hf: dict) -> dict[str, np.ndarray]:
    """Every tensor of the file, dequantized to float32 and named and laid out as Hugging Face's."""
    arch = hf["model_type"]
    tensors = {}
    for name in file.tensors:
        if name in _IGNORED_TENSORS:
            continue
        hf_name = _hf_name(arch, name)
        if hf_name is None:
            raise ValueError(f"GGUF file {file.path!r} has tensor {name!r}, which jspec's {arch} model does not use")
        value = file.dequantized(name)
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
            value = unpermute_rotary(value, hf["num_attention_heads"])
        elif arch == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
            value = unpermute_rotary(value, hf["num_key_value_heads"])
        tensors[hf_name] = value
    return tensors


def from_gguf(
    path: str | os.PathLike,
    *,
    param_dtype: str | None = None,
    dtype: str | None = None,
    mesh=None,
) -> Transformer:
    """Load a GGUF file (llama, qwen2, qwen3, gemma, gemma2) as a jspec Transformer.

    Every tensor type the `gguf` package dequantizes is read (F32, F16, BF16, Q4_0, Q4_1, Q5_0,
    Q5_1, Q8_0, the K-quants Q2_K..Q6_K, the IQ types, ...); the weights become float32, then
    `param_dtype` (default float32). dtype: activations (default param_dtype). mesh: lay the
    parameters out over this ('data', 'model') mesh, as `from_hf` does. Raises ValueError naming
    the field for an unsupported architecture, tensor type or option, or a missing key or tensor.
    """
    file = GGUFFile(path)
    hf = hf_config_from_gguf(file)
    config = config_from_hf(hf, param_dtype=param_dtype or "float32", dtype=dtype)
    tensors = hf_tensors_from_gguf(file, hf)
    gemma = hf["model_type"] in ("gemma", "gemma2")
    return model_from_tensors(
        config, hf["model_type"], tensors, source=f"GGUF file {file.path!r}", mesh=mesh, norms_hold_one=gemma
    )


__all__ = [
    "GGUFFile",
    "GGUFTensor",
    "GGUF_FAMILIES",
    "config_from_gguf",
    "from_gguf",
    "hf_config_from_gguf",
    "hf_tensors_from_gguf",
    "unpermute_rotary",
]
