"""Orbax checkpoints of a run's `TrainState`: periodic asynchronous saves, keep-last-N, resume.

Restores go into an abstract state (shapes, dtypes and shardings from `jax.eval_shape` of the state
the run would build), so a checkpoint comes back laid out for the current devices.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """A run's checkpoints under `directory`: `save(step, state)`, `restore_latest(like)`."""

    def __init__(self, directory: str, every: int, keep: int, async_save: bool = True):
        if every < 1:
            raise ValueError(f"checkpoint.every must be >= 1, got {every}")
        self.every = every
        # The interval is applied in `save`: Orbax's own would also save the first step of every run.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def save(self, step: int, state, force: bool = False) -> bool:
        """Saves if `step` is on the interval (or `force`); the write finishes in the background."""
        if not force and step % self.every:
            return False
        return self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, like):
        """The newest checkpoint restored into the structure, dtypes and shardings of `like`
        (a state or its `jax.eval_shape`), or None when there is none yet."""
        step = self.manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(_abstract, like)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _abstract(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
