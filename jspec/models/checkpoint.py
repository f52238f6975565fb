"""Save and load models with Orbax, config included, in one atomic checkpoint."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jspec.models.config import ModelConfig
from jspec.models.transformer import Transformer


def save(model: Transformer, path: str | os.PathLike) -> None:
    """Write `model` (parameters and config) to the new directory `path`.

    Orbax writes into a temporary directory and renames it when complete, so an interrupted save
    never leaves a readable-but-corrupt checkpoint at `path`.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise ValueError(f"path {path!r} already exists; jspec.models.save never overwrites a checkpoint")
    state = nnx.state(model)  # parameters and other variables (a trimmed head's token map)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(
            path,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state),
                config=ocp.args.JsonSave(model.config.to_dict()),
            ),
        )


def load(path: str | os.PathLike) -> Transformer:
    """Read a model written by `save`."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise ValueError(f"path {path!r} is not a jspec checkpoint directory")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        config_dict = ckptr.restore(path, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        config = ModelConfig.from_dict(config_dict)
        abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
        graphdef, abstract_state = nnx.split(abstract)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        state = ckptr.restore(path, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    return nnx.merge(graphdef, state)
