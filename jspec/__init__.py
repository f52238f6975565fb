"""jspec: lossless speculative decoding for JAX / Flax NNX."""

from jspec import demo, models, sampling, trees, verify
from jspec.chain import Chain
from jspec.decode import PAD_ID, Output, Stats, generate, speculative_generate
from jspec.sampling import Sampling
from jspec.static_tree import StaticTree

__all__ = [
    "PAD_ID",
    "Chain",
    "Output",
    "Sampling",
    "StaticTree",
    "Stats",
    "demo",
    "generate",
    "models",
    "sampling",
    "speculative_generate",
    "trees",
    "verify",
]
