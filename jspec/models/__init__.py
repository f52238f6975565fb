"""jspec models: configuration, the NNX transformer, its explicit KV cache, checkpoints, and Hugging Face import/export."""

from jspec.models.checkpoint import load, save
from jspec.models.config import ModelConfig, RopeScaling
from jspec.models.hf import from_hf, load_tokenizer, to_hf
from jspec.models.kv_cache import KVCache, commit, commit_path, init_cache, truncate
from jspec.models.presets import PRESETS, preset
from jspec.models.transformer import Transformer, attention_mask, causal_mask

__all__ = [
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "attention_mask",
    "causal_mask",
    "commit",
    "from_hf",
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
