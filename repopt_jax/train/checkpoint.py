"""Checkpoints with orbax `CheckpointManager`: the train state, the data iterator's position, and metadata.

One checkpoint per saved step under `<workdir>/checkpoints/<step>/`, holding three items:
- `state`: the `TrainState` arrays (params, BatchNorm statistics, optimizer state, step, RNG key),
- `data`: every process's grain iterator state (`grain.checkpoint`, one JSON file per process),
- `meta`: JSON (the config, the step, the metrics of the last log record).
Orbax writes a step to a temporary directory and renames it when complete, so a process killed mid-save
leaves the previous checkpoints as they were. A checkpoint that exists but cannot be read (truncated or
corrupt files) is moved aside to `<step>.corrupt` with a warning, and the previous one is restored instead.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Callable, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from repopt_jax.train import mesh as mesh_lib
from repopt_jax.train.state import TrainState

__all__ = ["Checkpointer", "CheckpointWarning"]

log = logging.getLogger(__name__)


class CheckpointWarning(UserWarning):
  """A checkpoint could not be read and an older one is used instead."""


class Checkpointer:
  """Saves and restores `(TrainState, data iterator, metadata)` in a directory, keeping the last `keep`.

  Args:
    directory: where the step folders go (created).
    keep: how many of the latest checkpoints to keep.
    async_save: write in a background thread (arrays are copied to host before `save` returns).
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    # cleanup_tmp_directories: a process killed mid-save leaves a temporary folder; drop it on the next start.
    self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                                 enable_async_checkpointing=async_save)
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self.directory, options=self._options,
                                 item_names=("state", "data", "meta"))

  @property
  def steps(self) -> list[int]:
    """The saved steps, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The newest saved step, or None."""
    return self._manager.latest_step()

  def save(self, step: int, state: TrainState, data_iterator: Any, meta: Optional[dict] = None,
           force: bool = True) -> bool:
    """Saves a checkpoint for `step` (the iterator's state must be the one after the step's batch).

    The state is copied to host memory first (it is replicated, so this is the whole state): the caller may
    donate or overwrite its device buffers right after, and writing runs in the background.
    """
    host = mesh_lib.to_host(state._asdict())
    args = ocp.args.Composite(state=ocp.args.StandardSave(host),
                              data=grain.checkpoint.CheckpointSave(data_iterator),
                              meta=ocp.args.JsonSave(dict(meta or {}, step=int(step))))
    return self._manager.save(int(step), args=args, force=force)

  def restore(self, like: TrainState, data_iterator: Any, mesh,
              check_meta: Optional[Callable[[dict], None]] = None) -> Optional[tuple[TrainState, dict]]:
    """Restores the newest readable checkpoint, replicated over `mesh`, into `like`'s structure.

    `data_iterator` is set to the saved position. Checkpoints that fail to load are moved aside
    (`<step>.corrupt`) with a `CheckpointWarning`, and the previous one is tried.

    Args:
      like: a state of this run (structure, shapes and dtypes to restore into).
      data_iterator: the grain iterator to set to the saved position.
      mesh: where the restored (replicated) arrays go.
      check_meta: called with a checkpoint's metadata before its arrays are read; the exceptions it raises
        (e.g. "this workdir holds another run") propagate and leave the checkpoint untouched.

    Returns:
      `(state, meta)`, or None when there is no readable checkpoint.
    """
    self.wait()
    target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), like._asdict())
    for step in reversed(self.steps):
      try:
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict):
          raise ValueError("its metadata is not a JSON object")
      except Exception as e:  # pylint: disable=broad-except
        self._unreadable(step, e)
        continue
      if check_meta is not None:
        check_meta(meta)
      try:
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(data_iterator)))
        restored = out["state"]
        if jax.tree.structure(restored) != jax.tree.structure(target):
          raise ValueError("its state does not have the structure of this run's state")
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
          if np.shape(a) != np.shape(b) or np.asarray(a).dtype != b.dtype:
            raise ValueError(f"an array of shape {np.shape(a)} where this run has {np.shape(b)}")
        if int(restored["step"]) != step:
          raise ValueError(f"holds step {int(restored['step'])}")
      except Exception as e:  # pylint: disable=broad-except
        self._unreadable(step, e)
        continue
      return TrainState(**mesh_lib.put_replicated(restored, mesh)), meta
    return None

  def _unreadable(self, step: int, error: Exception) -> None:
    text = str(error).strip()
    reason = text.splitlines()[0][:300] if text else type(error).__name__
    warnings.warn(f"checkpoint {os.path.join(self.directory, str(step))} is unreadable ({reason}); "
                  "moved aside to .corrupt, falling back to the previous checkpoint", CheckpointWarning,
                  stacklevel=3)
    self._move_aside(step)

  def _move_aside(self, step: int) -> None:
    """Renames an unreadable step folder so that the manager no longer lists it (and can save that step)."""
    path = os.path.join(self.directory, str(step))
    if jax.process_index() == 0 and os.path.isdir(path):
      dest, n = path + ".corrupt", 1
      while os.path.exists(dest):
        dest, n = f"{path}.corrupt{n}", n + 1
      os.rename(path, dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"repopt_ckpt_move_aside_{step}")
    self._manager.close()
    self._manager = self._open()

  def wait(self) -> None:
    """Blocks until a background save has been written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
