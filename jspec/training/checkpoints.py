"""Training checkpoints with Orbax's CheckpointManager.

Each save goes to a temporary directory that is renamed when complete, so an interrupted save
never corrupts the last good checkpoint; `latest_step` only ever sees finished ones.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class TrainCheckpoints:
    """Numbered checkpoints of a training-state pytree plus JSON metadata, `keep` most recent kept."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        self.directory = os.path.abspath(os.fspath(directory))
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, metadata: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)))
        self.manager.wait_until_finished()

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """The state saved at `step`, with the structure, shapes and dtypes of `like`."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), metadata=ocp.args.JsonRestore())
        )
        return restored["state"], restored["metadata"]

    def close(self) -> None:
        self.manager.close()
