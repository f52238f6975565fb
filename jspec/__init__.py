"""jspec: lossless speculative decoding for JAX / Flax NNX."""

from jspec import analysis, demo, drafters, eagle, methods, models, rounds, sampling, sharding, trees, verify
from jspec.decode import PAD_ID, Output, Stats, generate, speculative_generate
from jspec.methods.chain import Chain
from jspec.methods.dynamic_tree import DynamicTree
from jspec.methods.eagle_tree import EagleTree
from jspec.methods.multi_candidate import MultiCandidate
from jspec.methods.rsd import RSD
from jspec.methods.sequoia import SequoiaTree
from jspec.methods.static_tree import StaticTree
from jspec.sampling import Sampling
from jspec.verify.lossy import LossySpecDec, LossyTypical

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
    "drafters",
    "eagle",
    "generate",
    "methods",
    "models",
    "rounds",
    "sampling",
    "sharding",
    "speculative_generate",
    "trees",
    "verify",
]
