"""Named model configurations for the demo models (vocabulary of the 8192-token BPE tokenizer)."""

from __future__ import annotations

from jspec.models.config import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    # ~15.7M parameters (3.1M of them the tied embedding).
    "target-16m": ModelConfig(vocab_size=8192, d_model=384, n_layers=8, n_heads=6, n_kv_heads=2, d_ff=1024, max_seq_len=1024),
    # ~3.7M parameters (2.1M of them the tied embedding).
    "drafter-4m": ModelConfig(vocab_size=8192, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=768, max_seq_len=1024),
    # The bundled demo models (jspec.demo), sized to train on a 2-core CPU in under an hour.
    # ~6.8M parameters (2.1M of them the tied embedding); ~1,750 training tokens/s on 2 CPU cores.
    "target-7m": ModelConfig(vocab_size=8192, d_model=256, n_layers=6, n_heads=4, n_kv_heads=2, d_ff=768, max_seq_len=1024),
    # ~1.5M parameters (1.0M of them the tied embedding); ~8,000 training tokens/s on 2 CPU cores.
    "drafter-1.5m": ModelConfig(vocab_size=8192, d_model=128, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=384, max_seq_len=1024),
    # A hybrid (Bamba-style: an MLP after every mixer) of 4 Mamba-2 and 2 attention layers, the
    # bundled state-space demo target; ~7.6M parameters (2.1M of them the tied embedding).
    "hybrid-7m": ModelConfig(
        vocab_size=8192,
        d_model=256,
        n_layers=6,
        n_heads=4,
        n_kv_heads=2,
        d_ff=768,
        max_seq_len=1024,
        layer_types=("mamba", "mamba", "attention", "mamba", "mamba", "attention"),
        ssm_state=64,
        ssm_head_dim=64,
    ),
    # For tests and smoke runs.
    "tiny": ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=256),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]
