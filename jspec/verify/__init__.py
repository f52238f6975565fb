"""The verifiers, each in one place: `chain` (lossless chain rules: speculative sampling, block
verification, greedy), `tree` (lossless tree walks for each way of choosing children) and `lossy`
(the opt-in lossy rules, never selected by name). The package re-exports the chain verifiers."""

from jspec.verify.chain import (
    CHAIN_VERIFIERS,
    Verdict,
    block_weights,
    verify_block,
    verify_greedy,
    verify_sampling,
)

__all__ = [
    "CHAIN_VERIFIERS",
    "Verdict",
    "block_weights",
    "verify_block",
    "verify_greedy",
    "verify_sampling",
]
