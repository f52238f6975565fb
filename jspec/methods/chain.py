"""Chain speculative decoding (Leviathan et al. arXiv 2211.17192, Chen et al. arXiv 2302.01318):
the `Chain` strategy.

One round: `draft_chain` samples k tokens from the drafter, one target pass scores the last
emitted token plus the k drafts, a chain verifier (`jspec.verify`, or an opted-in lossy rule of
`jspec.verify.lossy`) keeps a prefix, and `jspec.rounds.commit_round` keeps it in both models. A
chain is drafted and committed as a tree that is a single path, so it shares every step with the
tree strategies but the verifier.

With a stop rule (`Chain(k, stop=ConfidenceStop(h))`, SpecDec++-style adaptive length, arXiv
2405.19715) a row stops drafting once the rule says so after a node (the drafter's top
probability below h): the nodes after it are invalid, a mask over the k slots. Drafter calls after
every row has stopped are skipped and the target scores only the prefix holding the valid nodes
(`jspec.rounds.score_tree`), so a short round costs less, in one compiled program. Lossless: the
decision to draft node i + 1 reads only the drafter's output up to node i, never the token it
would draw, and the cut chain is verified by the tree walk (on a path, exactly speculative
sampling).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jspec.methods.early_stop import level_features
from jspec.models import causal_mask
from jspec.rounds import RoundCarry, SpeculativeStrategy, commit_round, prefix_sizes, score_tree
from jspec.sampling import Sampling, sample, warp
from jspec.trees.draft import DraftedTree
from jspec.trees.tree import Tree
from jspec.verify.chain import CHAIN_VERIFIERS, ChainVerifier
from jspec.verify.lossy import LossyVerifier
from jspec.verify.tree import TreeVerdict, verify_tree_greedy, verify_tree_iid


@dataclasses.dataclass(frozen=True)
class Chain(SpeculativeStrategy):
    """Draft a chain of k tokens per round and verify it with `verifier`.

    verifier: "sampling" (Leviathan/Chen speculative sampling), "block" (Sun et al. block
    verification) or "greedy" (temperature 0 only), all lossless; or, as an explicit opt-in, a
    lossy rule object from `jspec.verify.lossy` (`LossyTypical()`, `LossySpecDec()`), which makes
    `lossy` True. No string selects a lossy rule.
    stop: None, or a stop rule (`jspec.methods.early_stop.ConfidenceStop(h)` or a learned
    `EarlyStop`): drafting stops for a row once `stop.continue_probability` of the last node falls
    below `stop.threshold` (see the module docstring). With "sampling" or "greedy" only.
    """

    k: int = 4
    verifier: str | LossyVerifier = "sampling"
    stop: Any = None

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int >= 1, got {self.k!r}")
        if self.stop is not None:
            if not (hasattr(self.stop, "continue_probability") and hasattr(self.stop, "threshold")):
                raise ValueError(f"stop must be None or a stop rule (e.g. ConfidenceStop(0.3)), got {self.stop!r}")
            if self.verifier not in ("sampling", "greedy"):
                raise ValueError(f"a stop rule needs verifier 'sampling' or 'greedy', got {self.verifier!r}")
        if not isinstance(self.verifier, LossyVerifier) and not (
            isinstance(self.verifier, str) and self.verifier in CHAIN_VERIFIERS
        ):
            raise ValueError(
                f"verifier must be one of {sorted(CHAIN_VERIFIERS)} or a lossy rule object "
                f"(jspec.LossyTypical(), jspec.LossySpecDec()), got {self.verifier!r}"
            )

    @property  # type: ignore[override]
    def lossy(self) -> bool:
        """Whether the output may differ in distribution from the target's (an opt-in lossy rule)."""
        return isinstance(self.verifier, LossyVerifier)

    @property
    def verify_rule(self) -> ChainVerifier:
        """The chain verifier: `verify(key, draft_tokens, draft_probs, target_probs) -> Verdict`."""
        return self.verifier.verify if self.lossy else CHAIN_VERIFIERS[self.verifier]

    def scoring(self, sampling: Sampling) -> Sampling:
        """The warp of the target's logits the verifier sees (the decoding's own, for lossless rules)."""
        return self.verifier.scoring(sampling) if self.lossy else sampling

    @property
    def tokens_per_round(self) -> int:
        """Most tokens one round emits."""
        return self.k + 1

    @property
    def tokens_scored(self) -> int:
        """Tokens the target scores per round (cache slots written past the committed length)."""
        return self.k + 1

    @property
    def max_depth(self) -> int:
        return self.k

    @property
    def score_sizes(self) -> tuple[int, ...] | None:
        """With a stop rule, the prefixes the target may score (`jspec.rounds.score_tree`)."""
        return None if self.stop is None else prefix_sizes(self.k + 1)

    def check(self, sampling: Sampling) -> None:
        """Reject combinations that would not be lossless (a lossy rule, asked for, runs at any temperature)."""
        if self.verifier == "greedy" and not sampling.greedy:
            raise ValueError(f"verifier 'greedy' is only lossless at temperature 0, got temperature={sampling.temperature}")

    def draft(self, drafter, state, last, sampling, key) -> DraftedTree:
        return draft_chain(drafter, state, last, self.k, sampling, key, stop=self.stop)

    def verify(self, key, drafted: DraftedTree, logits: jax.Array, sampling: Sampling) -> TreeVerdict:
        """The chain rule on the path; the accepted node is the depth reached. A lossy rule may see
        another warp of the same logits (SpecDec: logit gaps at temperature 0)."""
        if self.stop is not None:
            return verify_cut_chain(key, drafted, logits, sampling)
        target_probs = warp(logits, self.scoring(sampling))
        verdict = self.verify_rule(key, drafted.tree.tokens[:, 1:], drafted.draft_probs[:, : self.k], target_probs)
        return TreeVerdict(verdict.accepted, verdict.accepted, verdict.next_token)


def verify_cut_chain(key, drafted: DraftedTree, logits: jax.Array, sampling: Sampling) -> TreeVerdict:
    """A chain whose nodes may stop early (valid flags), verified by the tree walk: on a path the
    i.i.d. rule is exactly speculative sampling (accept x if U < p(x)/q(x), else draw from
    norm((p - q)+)), and a one-hot q makes it the deterministic-proposal rule (accept with p(x))."""
    verifier = verify_tree_greedy if sampling.greedy else verify_tree_iid
    return verifier(key, drafted.tree, drafted.draft_probs, warp(logits, sampling))


def fixed_chain_round(target, drafter, carry: RoundCarry, k: int, active, sampling: Sampling, key):
    """A round of a chain of exactly k drafts (a static int), drafted, scored in one target pass,
    verified by the chain walk (`verify_cut_chain`) and committed: what an adaptive strategy runs
    once it has chosen k (`AdaptiveK` at batch 1, `SmartSpec`). Returns the carry, the emitted
    tokens `[B, k + 1]`, how many each row emitted `[B]` and the drafts it accepted `[B]`."""
    key_draft, key_verify = jax.random.split(key)
    drafted = draft_chain(drafter, carry.drafter, carry.last, k, sampling, key_draft)
    logits, cache, features = score_tree(target, carry.target_cache, drafted, drafter.feature_layers)
    verdict = verify_cut_chain(key_verify, drafted, logits, sampling)
    carry, tokens, n_new = commit_round(carry, drafter, drafted, cache, features, verdict, active, k + 1)
    return carry, tokens, n_new, verdict.accepted


def keeps_drafting(stop, logits: jax.Array, log_path: jax.Array, depth: int) -> jax.Array:
    """bool `[B]`: whether the stop rule drafts a child of a node with drafter logits `[B, V]`
    and path log-probability `[B]` at `depth` (always, without a rule)."""
    if stop is None:
        return jnp.ones(logits.shape[:1], bool)
    b = logits.shape[0]
    features = level_features(logits[:, None], log_path[:, None], jnp.ones((b, 1), bool), depth)
    return stop.continue_probability(features) >= stop.threshold


def _log_prob(logits: jax.Array, x: jax.Array) -> jax.Array:
    """log softmax(logits)[x] `[B]`: the drafter's confidence in x, at temperature 1."""
    return jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), x[:, None], axis=1)[:, 0]


def score_chain(drafter, state, last: jax.Array, tokens: jax.Array, width: int, strategy: str):
    """Catch a language-model drafter up to `last` [B] and score the given chain `tokens [B, n]`
    (n >= 0) in one pass, at window slots 0..n-1 of a window of `width` slots (node i at depth i + 1
    sees slots 0..i). Returns the drafter's logits `[B, n + 1, V]` (float32; entry i: for the token
    after i chain tokens) and the state, uncommitted. What a strategy that drafts past tokens it did
    not just sample (SSD's pre-drafting, PEARL's pending drafts) scores them with. `strategy` names
    the caller in the error for a feature-level drafter, whose contexts this pass cannot supply."""
    b, n = tokens.shape
    logits_root, context, state = drafter.catch_up(state, last)
    if context.shape[-1] != 0:
        raise ValueError(f"{strategy} needs a language-model drafter (a jspec.models.Transformer), not a feature-level head")
    if n == 0:
        return logits_root[:, None].astype(jnp.float32), state
    window = jnp.arange(width)
    mask = jnp.broadcast_to(window[None, :] <= jnp.arange(n)[:, None], (b, n, width))
    depth = jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.int32), (b, n))
    logits_chain, _, state = drafter.extend(state, tokens, jnp.zeros((b, n, 0), jnp.float32), depth, mask, 0)
    return jnp.concatenate([logits_root[:, None], logits_chain], axis=1).astype(jnp.float32), state


def draft_chain(
    drafter,
    state,
    last: jax.Array,
    k: int,
    sampling: Sampling,
    key: jax.Array,
    *,
    stop=None,
    limit: jax.Array | None = None,
) -> DraftedTree:
    """Sample k draft tokens one after another from any drafter (`jspec.drafters`): the tree
    `[B, k+1]` of the path `last, x_1 .. x_k`, whose node i (depth i) lies at drafter window slot
    i - 1, and draft_probs `[B, k+1, V]`, node i's entry the warped distribution x_{i+1} was drawn
    from (zero for the leaf).

    stop (a stop rule, see `Chain`) and limit (int32 `[B]`, most drafts per row) cut a row's chain:
    node i + 1 is valid only if node i is, `stop` keeps drafting after node i and i + 1 <= limit.
    Once no row has a valid node left, the remaining drafter calls are skipped (`lax.cond`)."""
    b = last.shape[0]
    keys = jax.random.split(key, k)
    cut = stop is not None or limit is not None
    limit = jnp.full((b,), k, jnp.int32) if limit is None else limit
    logits, context, state = drafter.catch_up(state, last)
    q = warp(logits, sampling)
    x = sample(keys[0], q)
    valid = keeps_drafting(stop, logits, jnp.zeros((b,)), 0) & (limit >= 1)
    log_path = _log_prob(logits, x)
    window = jnp.arange(k)[None, None, :]

    def step(carry, i):
        state, x, context, valid, log_path = carry  # node i: token x, valid, path log-probability
        # Node i sees window slots 0 .. i - 1 (its ancestors x_1 .. x_{i-1} and itself).
        mask = jnp.broadcast_to(window < i, (b, 1, k))
        extend = lambda state: drafter.extend(state, x[:, None], context[:, None], jnp.full((b, 1), i), mask, i - 1)  # noqa: E731
        if cut:  # skip the drafter once every row has stopped: zeros for nodes no one drafts
            shapes = jax.eval_shape(extend, state)
            skip = lambda state: (jnp.zeros(shapes[0].shape, shapes[0].dtype), jnp.zeros(shapes[1].shape, shapes[1].dtype), state)  # noqa: E731
            logits, context, state = jax.lax.cond(valid.any(), extend, skip, state)
        else:
            logits, context, state = extend(state)
        q = warp(logits[:, 0], sampling)
        x_next = sample(keys[i], q)
        valid_next = valid & keeps_drafting(stop, logits[:, 0], log_path, i) & (limit >= i + 1)
        carry = (state, x_next, context[:, 0], valid_next, log_path + _log_prob(logits[:, 0], x_next))
        return carry, (x_next, q, valid_next)

    (state, _, _, _, _), (xs, qs, valids) = jax.lax.scan(step, (state, x, context, valid, log_path), jnp.arange(1, k))
    tokens = jnp.concatenate([last[:, None], x[:, None], xs.T], axis=1)
    probs = jnp.concatenate([q[:, None], jnp.swapaxes(qs, 0, 1), jnp.zeros_like(q)[:, None]], axis=1)
    valid = jnp.concatenate([jnp.ones((b, 1), bool), valid[:, None], valids.T], axis=1)
    return drafted_chain(tokens, valid, probs, state)


def drafted_chain(tokens: jax.Array, valid: jax.Array, probs: jax.Array, state) -> DraftedTree:
    """The `DraftedTree` of a path: tokens `[B, N]` (node 0 the root, node i at depth i and
    drafter window slot i - 1), valid bool `[B, N]`, draft_probs `[B, N, V]` and the drafter's
    state; a causal ancestor mask, committed without a move (`DraftedTree.chain`)."""
    b, n = tokens.shape
    index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    tree = Tree(tokens.astype(jnp.int32), index - 1, index, valid)
    return DraftedTree(tree, causal_mask(b, n), probs, state, index - 1, chain=True)
