"""Orbax checkpoints of a run's `TrainState`: periodic asynchronous saves, keep-last-N, resume.

Restores go into an abstract state (shapes, dtypes and shardings from `jax.eval_shape` of the state
the run would build), so a checkpoint comes back laid out for the current devices.

A checkpoint that cannot be restored (a damaged file, a disk that filled up) is named in one warning
line and the next older one is tried; when none restores the error names each step and its reason.
Orbax commits a checkpoint by renaming its finished folder, so a process killed while saving leaves
only a temporary folder, which is never taken for a checkpoint.
"""

from __future__ import annotations

import logging
import os
import re

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

CORRUPT_DIR = "checkpoints_corrupt"  # beside the checkpoints folder: checkpoints set aside by a resume


def saved_steps(directory: str) -> list[int]:
    """The steps of the committed checkpoints in `directory` (its all-digit folders), oldest first,
    without opening any of them; [] when there is no such folder."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def error_reason(error: BaseException, limit: int = 200) -> str:
    """One short line saying why a restore failed: the innermost cause's first line (TensorStore's
    outer messages carry only a spec), its type named."""
    root = error
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    text = re.sub(r"\s+", " ", lines[0]) if lines else ""
    text = f"{type(root).__name__}: {text}" if text else type(root).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Checkpointer:
    """A run's checkpoints under `directory`: `save(step, state)`, `restore_latest(like)`."""

    def __init__(self, directory: str, every: int, keep: int, async_save: bool = True):
        if every < 1:
            raise ValueError(f"checkpoint.every must be >= 1, got {every}")
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        self.every = every
        self.directory = os.path.abspath(directory)
        # The interval is applied in `save`: Orbax's own would also save the first step of every run.
        self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                     create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=self._options)

    def _renew(self) -> None:
        """A fresh manager: one whose restore failed may keep what it guessed from the damaged folder
        (Orbax takes a step without its item folder for a multi-item checkpoint, then fails them all)."""
        self.manager.close()
        self.manager = ocp.CheckpointManager(self.directory, options=self._options)

    def due(self, step: int, force: bool = False) -> bool:
        """Whether `save(step, state, force)` would write a checkpoint."""
        return force or step % self.every == 0

    def save(self, step: int, state, force: bool = False) -> bool:
        """Saves if `step` is on the interval (or `force`); the write finishes in the background."""
        if not self.due(step, force):
            return False
        return self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, like, set_aside: bool = False):
        """The newest checkpoint that restores, into the structure, dtypes and shardings of `like`
        (a state or its `jax.eval_shape`), or None when there is none yet.

        A checkpoint that fails is named in a warning and the next older one is tried. With
        `set_aside` (a resuming run, which will save those steps again) the failed ones newer than
        the restored one are moved to `checkpoints_corrupt/` beside the folder, never deleted. When
        none restores (a damaged folder, or a state that no longer matches the run's) nothing is
        moved and a ValueError names each step and its reason.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        abstract = jax.tree.map(_abstract, like)
        failed = []
        for i, step in enumerate(steps):
            try:
                state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
            except MemoryError:
                raise
            except Exception as e:  # Orbax and TensorStore raise many types (bare Exception too)
                reason = error_reason(e)
                failed.append((step, reason))
                self._renew()
                then = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint"
                log.warning("checkpoint step %d in %s cannot be restored (%s); %s",
                            step, self.directory, reason, then)
                continue
            if failed and set_aside:
                self._set_aside([s for s, _ in failed])
            return state
        raise ValueError(f"no checkpoint in {self.directory} can be restored: "
                         + "; ".join(f"step {s}: {r}" for s, r in failed))

    def _set_aside(self, steps) -> None:
        """Moves the folders of `steps` to checkpoints_corrupt/ beside this folder (kept for a look)."""
        corrupt = os.path.join(os.path.dirname(self.directory), CORRUPT_DIR)
        os.makedirs(corrupt, exist_ok=True)
        for step in steps:
            target, n = os.path.join(corrupt, str(step)), 1
            while os.path.exists(target):
                target, n = os.path.join(corrupt, f"{step}.{n}"), n + 1
            os.replace(os.path.join(self.directory, str(step)), target)
            log.warning("moved the checkpoint of step %d that cannot be restored to %s", step, target)
        self._renew()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _abstract(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
