"""jspec models: configuration, the NNX transformer, its explicit KV cache, checkpoints, Hugging Face
import/export, and GGUF (llama.cpp) import with the file's tokenizer and chat template."""

from jspec.models.checkpoint import load, save
from jspec.models.config import ModelConfig, RopeScaling
from jspec.models.gguf import from_gguf
from jspec.models.gguf_tokenizer import ChatTokenizer, gguf_tokenizer
from jspec.models.hf import from_hf, load_tokenizer, to_hf
from jspec.models.kv_cache import KVCache, commit, commit_path, init_cache, truncate
from jspec.models.presets import PRESETS, preset
from jspec.models.transformer import Transformer, attention_mask, cast, causal_mask

__all__ = [
    "ChatTokenizer",
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "attention_mask",
    "cast",
    "causal_mask",
    "commit",
    "from_gguf",
    "from_hf",
    "gguf_tokenizer",
    "commit_path",
    "init_cache",
    "load",
    "load_tokenizer",
    "PRESETS",
    "preset",
    "save",
    "to_hf",
    "truncate",
]
