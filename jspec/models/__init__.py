"""jspec models: configuration, the NNX transformer, its explicit KV cache, and checkpoints."""

from jspec.models.checkpoint import load, save
from jspec.models.config import ModelConfig
from jspec.models.kv_cache import KVCache, commit, commit_path, init_cache, truncate
from jspec.models.presets import PRESETS, preset
from jspec.models.transformer import Transformer, attention_mask, causal_mask

__all__ = [
    "KVCache",
    "ModelConfig",
    "Transformer",
    "attention_mask",
    "causal_mask",
    "commit",
    "commit_path",
    "init_cache",
    "load",
    "PRESETS",
    "preset",
    "save",
    "truncate",
]
