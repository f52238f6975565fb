"""Save and load models with Orbax, config included, in one atomic checkpoint."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jspec.models.config import ModelConfig
from jspec.models.transformer import Transformer


def _in_groups(groups: tuple[str, ...]):
    """An nnx filter for the variables under the top-level attributes `groups`."""
    return lambda path, value: bool(path) and path[0] in groups


def save(model: Transformer, path: str | os.PathLike, *, shared: tuple[str, ...] = ()) -> None:
    """Write `model` (parameters and config) to the new directory `path`.

    shared: top-level parameter groups (e.g. ("embed",)) left out because the model shares them
    with another one (a drafter using its target's embedding table); `load` must be given them.
    Orbax writes into a temporary directory and renames it when complete, so an interrupted save
    never leaves a readable-but-corrupt checkpoint at `path`.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise ValueError(f"path {path!r} already exists; jspec.models.save never overwrites a checkpoint")
    shared = tuple(shared)
    names = set(nnx.state(model).to_pure_dict())
    if not set(shared) <= names:
        raise ValueError(f"shared names parameter groups the model does not have: {sorted(set(shared) - names)}")
    # Parameters and other variables (a trimmed head's token map), without the shared groups.
    _, _, state = nnx.split(model, _in_groups(shared), ...)
    items = {"params": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(model.config.to_dict())}
    if shared:
        items["shared"] = ocp.args.JsonSave(list(shared))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(path, args=ocp.args.Composite(**items))


def load(path: str | os.PathLike, *, shared: dict | None = None) -> Transformer:
    """Read a model written by `save`.

    shared: the parameter groups it was saved without (`save(..., shared=...)`), as a pure dict such
    as {"embed": {"embedding": array}}, each array of the model's shape.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise ValueError(f"path {path!r} is not a jspec checkpoint directory")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        config_dict = ckptr.restore(path, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        groups: tuple[str, ...] = ()
        if os.path.isdir(os.path.join(path, "shared")):
            groups = tuple(ckptr.restore(path, args=ocp.args.Composite(shared=ocp.args.JsonRestore()))["shared"])
        config = ModelConfig.from_dict(config_dict)
        abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
        graphdef, abstract_shared, abstract_state = nnx.split(abstract, _in_groups(groups), ...)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        state = ckptr.restore(path, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    given = dict(shared or {})
    if sorted(given) != sorted(groups):
        raise ValueError(
            f"checkpoint {path!r} was saved without {sorted(groups)}; shared must give exactly those, got {sorted(given)}"
        )
    like = abstract_shared.to_pure_dict()
    want = jax.tree.map(lambda x: tuple(x.shape), like)
    got = jax.tree.map(lambda x: tuple(np.shape(x)), given)
    if got != want:
        raise ValueError(f"shared arrays have shapes {got}, the checkpoint's model expects {want}")
    abstract_shared.replace_by_pure_dict(jax.tree.map(lambda x, w: jnp.asarray(x, w.dtype), given, like))
    return nnx.merge(graphdef, abstract_shared, state)
