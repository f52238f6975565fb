"""Early stop for multi-candidate drafting (Improved MCSD, arXiv 2409.10644): a tiny decision model.

After the drafter has scored tree level l (l >= 1), `level_features` summarises its distributions
at the level's nodes; a decision rule maps them to the probability that the walk, having reached
depth l, will also accept a node at depth l + 1. Drafting stops (deeper levels are marked invalid)
when that probability falls below a threshold.

Why this is lossless with every tree verifier: the decision after level l reads only the drafter's
distributions at depths <= l, which depend only on tokens already in the tree; it never reads the
tokens it removes. Given everything drawn up to depth l, the children of a depth-l node are still
i.i.d. (or without-replacement) samples from its q, and how many there are (0 or k) is fixed
before they are drawn, which is all the verifiers' proof needs (tests/test_multi_candidate.py
checks the end-to-end distribution with early stop on).

Two rules share one interface (`continue_probability(features) -> [B]` and `threshold`):
`EarlyStop`, a tiny MLP trained by `train/mcsd_early_stop.py`, and `ConfidenceStop`, which just
thresholds the drafter's confidence. Both are frozen, hashable dataclasses (they are static jit
arguments): `EarlyStop` stores its weights as nested tuples of floats, hashed by value, so two
copies of the same model share compiled programs.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Per level l, over the level's valid nodes u (weights w_u proportional to the drafter's path probability):
FEATURES = (
    "max_prob",  # sum_u w_u max_x q_u(x): how peaked the distributions the next level is drawn from are
    "entropy",  # sum_u w_u H(q_u) / log V
    "log_path_value",  # max_u log prod of q along u's path: the drafter's belief in its best path
    "depth",  # l
)
PARAM_NAMES = ("mean", "scale", "w1", "b1", "w2", "b2")


def level_features(
    logits: jax.Array,  # [B, M, V], the drafter's raw logits at the level's M nodes
    log_path: jax.Array,  # [B, M], log q of each node's path (sum over its ancestors' edges)
    valid: jax.Array,  # bool [B, M]
    depth,  # int or int32 []
) -> jax.Array:
    """The decision model's inputs for one tree level: float32 `[B, len(FEATURES)]`.

    Computed from the temperature-1 softmax of the raw logits at every sampling setting, so the
    features are informative at temperature 0 too (where the warped q is one-hot)."""
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    q = jnp.exp(log_q)
    entropy = -jnp.sum(q * log_q, axis=-1) / math.log(logits.shape[-1])  # [B, M]
    masked_path = jnp.where(valid, log_path, -jnp.inf)
    weights = jax.nn.softmax(jnp.where(valid.any(axis=1, keepdims=True), masked_path, 0.0), axis=1)  # [B, M]
    best = jnp.max(jnp.where(valid, log_path, -1e9), axis=1)
    return jnp.stack(
        [
            jnp.sum(weights * q.max(axis=-1), axis=1),
            jnp.sum(weights * entropy, axis=1),
            jnp.maximum(best, -50.0),  # bounded: an invalid level must not feed -inf to the model
            jnp.full(best.shape, depth, jnp.float32),  # depth may be traced (a chain's scan)
        ],
        axis=-1,
    )


# --- The model: features -> standardise -> tanh MLP -> sigmoid ---------------------------------


def init_params(key: jax.Array, mean: np.ndarray, scale: np.ndarray, hidden: int = 8) -> dict[str, jax.Array]:
    """Fresh MLP parameters; `mean` and `scale` `[F]` standardise the features (fixed, not trained)."""
    f = len(FEATURES)
    k1, k2 = jax.random.split(key)
    return {
        "mean": jnp.asarray(mean, jnp.float32),
        "scale": jnp.asarray(scale, jnp.float32),
        "w1": jax.random.normal(k1, (f, hidden)) / math.sqrt(f),
        "b1": jnp.zeros((hidden,)),
        "w2": jax.random.normal(k2, (hidden,)) / math.sqrt(hidden),
        "b2": jnp.zeros(()),
    }


def predict_logit(params: dict, features: jax.Array) -> jax.Array:
    """features `[..., F]` -> the logit of P(next level accepted) `[...]`."""
    x = (features - params["mean"]) / params["scale"]
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def loss(params: dict, features: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean binary cross-entropy; labels float `[S]` in {0, 1}."""
    return jnp.mean(optax.sigmoid_binary_cross_entropy(predict_logit(params, features), labels))


def accuracy(params: dict, features, labels, threshold: float = 0.5) -> float:
    """Fraction of examples where `P >= threshold` equals the label."""
    predicted = jax.nn.sigmoid(predict_logit(params, jnp.asarray(features))) >= threshold
    return float(jnp.mean(predicted == (jnp.asarray(labels) > 0.5)))


def fit(
    features: np.ndarray,  # [S, F]
    labels: np.ndarray,  # [S]
    *,
    steps: int = 500,
    learning_rate: float = 1e-2,
    hidden: int = 8,
    seed: int = 0,
) -> tuple[dict[str, jax.Array], list[float]]:
    """Full-batch Adam on the cross-entropy. Returns the parameters and the loss before each step."""
    features = jnp.asarray(features, jnp.float32)
    labels = jnp.asarray(labels, jnp.float32)
    mean, scale = features.mean(axis=0), jnp.maximum(features.std(axis=0), 1e-3)  # constant features stay finite
    params = init_params(jax.random.key(seed), mean, scale, hidden)
    trainable = {k: v for k, v in params.items() if k not in ("mean", "scale")}
    fixed = {"mean": params["mean"], "scale": params["scale"]}
    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(trainable, opt_state):
        value, grads = jax.value_and_grad(lambda t: loss({**fixed, **t}, features, labels))(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    opt_state = optimizer.init(trainable)
    history = []
    for _ in range(steps):
        trainable, opt_state, value = step(trainable, opt_state)
        history.append(float(value))
    return {**fixed, **trainable}, history


# --- Decision rules (static jit arguments) -------------------------------------------------------


def _check_threshold(threshold) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")


@dataclasses.dataclass(frozen=True)
class EarlyStop:
    """The learned rule: stop after a level whose predicted P(next level accepted) < threshold.

    weights: ((name, shape, values), ...) in `PARAM_NAMES` order, values a flat tuple of floats:
    hashable by value. Build it with `EarlyStop.from_params(params, threshold)` or `load(path)`.
    """

    weights: tuple
    threshold: float = 0.5

    def __post_init__(self):
        _check_threshold(self.threshold)
        names = tuple(w[0] for w in self.weights) if isinstance(self.weights, tuple) else None
        if names != PARAM_NAMES:
            raise ValueError(f"weights must hold {PARAM_NAMES} (use EarlyStop.from_params), got names {names!r}")

    @classmethod
    def from_params(cls, params: dict, threshold: float = 0.5) -> EarlyStop:
        weights = tuple(
            (name, tuple(np.shape(params[name])), tuple(float(x) for x in np.ravel(params[name]))) for name in PARAM_NAMES
        )
        return cls(weights, threshold)

    @property
    def params(self) -> dict[str, jax.Array]:
        return {name: jnp.asarray(np.reshape(values, shape), jnp.float32) for name, shape, values in self.weights}

    def continue_probability(self, features: jax.Array) -> jax.Array:
        """features `[B, F]` -> P(the next level is accepted) `[B]`."""
        return jax.nn.sigmoid(predict_logit(self.params, features))


@dataclasses.dataclass(frozen=True)
class ConfidenceStop:
    """The untrained rule: stop after a level whose (path-weighted) drafter max probability < threshold."""

    threshold: float = 0.3

    def __post_init__(self):
        _check_threshold(self.threshold)

    def continue_probability(self, features: jax.Array) -> jax.Array:
        return features[:, FEATURES.index("max_prob")]


# --- Orbax checkpoint ------------------------------------------------------------------------------


def save(early_stop: EarlyStop, path: str | os.PathLike) -> None:
    """Write the model (weights and threshold) to the new directory `path` with Orbax."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise ValueError(f"path {path!r} already exists; save never overwrites a checkpoint")
    params = {k: np.asarray(v) for k, v in early_stop.params.items()}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(
            path,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                config=ocp.args.JsonSave({"threshold": early_stop.threshold, "features": list(FEATURES)}),
            ),
        )


def load(path: str | os.PathLike, threshold: float | None = None) -> EarlyStop:
    """Read a model written by `save`; `threshold` overrides the saved one."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise ValueError(f"path {path!r} is not an early-stop checkpoint directory")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        config = ckptr.restore(path, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        if tuple(config["features"]) != FEATURES:
            raise ValueError(f"checkpoint features {config['features']} differ from {list(FEATURES)}")
        params = ckptr.restore(path, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]
    return EarlyStop.from_params(params, config["threshold"] if threshold is None else threshold)
