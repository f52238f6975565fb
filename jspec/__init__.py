"""jspec: lossless speculative decoding for JAX / Flax NNX."""

from jspec import analysis, demo, models, sampling, sharding, trees, verify
from jspec.chain import Chain
from jspec.decode import PAD_ID, Output, Stats, generate, speculative_generate
from jspec.dynamic_tree import DynamicTree
from jspec.eagle_tree import EagleTree
from jspec.lossy_verify import LossySpecDec, LossyTypical
from jspec.multi_candidate import MultiCandidate
from jspec.rsd import RSD
from jspec.sampling import Sampling
from jspec.sequoia import SequoiaTree
from jspec.static_tree import StaticTree

__all__ = [
    "PAD_ID",
    "RSD",
    "Chain",
    "DynamicTree",
    "EagleTree",
    "LossySpecDec",
    "LossyTypical",
    "MultiCandidate",
    "Output",
    "Sampling",
    "SequoiaTree",
    "StaticTree",
    "Stats",
    "analysis",
    "demo",
    "generate",
    "models",
    "sampling",
    "sharding",
    "speculative_generate",
    "trees",
    "verify",
]
