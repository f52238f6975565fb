"""jspec: lossless speculative decoding for JAX / Flax NNX."""

from jspec import (
    analysis,
    demo,
    drafters,
    eagle,
    methods,
    models,
    parallel,
    retrieval,
    rounds,
    sampling,
    serve,
    sharding,
    trees,
    verify,
)
from jspec.decode import PAD_ID, Output, Stats, generate, speculative_generate
from jspec.methods.adaptive import AdaptiveK
from jspec.methods.chain import Chain
from jspec.methods.dynamic_tree import DynamicTree
from jspec.methods.eagle_tree import EagleTree
from jspec.methods.early_stop import ConfidenceStop, EarlyStop
from jspec.methods.multi_candidate import MultiCandidate
from jspec.methods.pearl import PEARL
from jspec.methods.prompt_lookup import PromptLookup
from jspec.methods.rasd import RASD
from jspec.methods.rest import Rest
from jspec.methods.rsd import RSD
from jspec.methods.sequoia import SequoiaTree
from jspec.methods.smartspec import SmartSpec
from jspec.methods.ssd import SSD
from jspec.methods.static_tree import StaticTree
from jspec.rounds import Autoregressive
from jspec.sampling import Sampling
from jspec.verify.lossy import LossySpecDec, LossyTypical

__all__ = [
    "PAD_ID",
    "PEARL",
    "RASD",
    "RSD",
    "SSD",
    "AdaptiveK",
    "Autoregressive",
    "Chain",
    "ConfidenceStop",
    "DynamicTree",
    "EagleTree",
    "EarlyStop",
    "LossySpecDec",
    "LossyTypical",
    "MultiCandidate",
    "Output",
    "PromptLookup",
    "Rest",
    "Sampling",
    "SequoiaTree",
    "SmartSpec",
    "StaticTree",
    "Stats",
    "analysis",
    "demo",
    "drafters",
    "eagle",
    "generate",
    "methods",
    "models",
    "parallel",
    "retrieval",
    "rounds",
    "sampling",
    "serve",
    "sharding",
    "speculative_generate",
    "trees",
    "verify",
]
