"""Checkpoints with orbax `CheckpointManager`: the train state, the data iterator's position, and metadata.

One checkpoint per saved step under `<workdir>/checkpoints/<step>/`, holding three items:
- `state`: the `TrainState` arrays (params, BatchNorm statistics, optimizer state, step, RNG key),
- `data`: every process's grain iterator state (`grain.checkpoint`, one JSON file per process),
- `meta`: JSON (the config, the step, the metrics of the last log record, and a CRC32 of every saved array).

Orbax writes a step to a temporary directory and renames it when complete, so a process killed mid-save
leaves the previous checkpoints as they were. On restore, the newest checkpoint whose arrays read back with
the recorded checksums is used:
- a newer one that cannot be read (truncated, corrupt, or a checksum mismatch) is reported with a
  `CheckpointWarning` and, when training resumes (not for a read-only open), moved aside to `<step>.corrupt`
  so that the step can be saved again;
- when no checkpoint can be read at all, `CheckpointError` names every step and why; nothing is renamed
  (`move_all_aside` starts over, e.g. `train --fresh`);
- a saved data position that does not fit the current pipeline (another number of processes or grain
  workers) is re-derived from the step by the caller (`rederive`); the model state restores either way.

A save that fails (disk full, ...) raises `CheckpointError` at the next step boundary (`check()`), or at
once for a synchronous save; the previous checkpoints stay as they were.
"""

from __future__ import annotations

import asyncio
import logging
import os
import warnings
import zlib
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from repopt_jax.rundir import free_name, resolve
from repopt_jax.train import mesh as mesh_lib
from repopt_jax.train.state import TrainState

__all__ = ["Checkpointer", "CheckpointError", "CheckpointWarning", "checksums", "run_meta"]

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "meta")


class CheckpointWarning(UserWarning):
  """A checkpoint could not be read and an older one is used instead."""


class CheckpointError(OSError):
  """No checkpoint of a run can be read, or a checkpoint could not be saved (the message says which)."""


def _leaf_name(path) -> str:
  return jax.tree_util.keystr(path)


def checksums(tree) -> dict[str, str]:
  """`{leaf path: CRC32 (hex) of its host bytes}` of a pytree of arrays (what a checkpoint records)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.ascontiguousarray(np.asarray(leaf)).reshape(-1)
    out[_leaf_name(path)] = f"{zlib.crc32(a.view(np.uint8)) & 0xFFFFFFFF:08x}"
  return out


def _first_line(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return text[:300] if text else type(error).__name__


class _Unreadable(Exception):
  """A checkpoint failed a check; `reason` says which."""


def run_meta(config, dims: dict, scales_fingerprint: Optional[str], train: Optional[dict] = None) -> dict:
  """The `meta` item of a run's checkpoint: what restoring (and checking "the same run") needs besides arrays.

  Args:
    config: the run's `Config` (its keys are compared on resume).
    dims: `{'num_classes', 'in_channels', 'image_size'}` (the model is rebuilt from them without the dataset).
    scales_fingerprint: the SHA-256 of the run's scales, or None.
    train: the metrics of the last log record (`train_loss`, ...), reported again by a finished run.
  """
  return {"config": config.to_dict(), "train": dict(train or {}), "model": dict(dims),
          "scales_sha256": scales_fingerprint}


class _EveryReadAwaited(ocp.type_handlers.NumpyHandler):
  """orbax's NumPy array handler, reading each array in a task of its own and awaiting every one of them.

  orbax reads all arrays of a checkpoint in one `asyncio.gather`, on an event loop that it closes as soon as
  the gather ends. When an unreadable checkpoint makes several reads fail, the gather ends at the first
  failure: the reads still in flight either finish with an exception nobody retrieves (asyncio prints "Task
  exception was never retrieved" with a traceback when they are collected, at an arbitrary later moment,
  often at exit) or call back into the closed loop ("Event loop is closed"). Gathering the per-array reads
  with `return_exceptions=True` ends only when every read has ended, and retrieves every exception; the first
  one is raised, as before.
  """

  async def deserialize(self, infos, args=None):
    args = args or [ocp.RestoreArgs()] * len(infos)
    parent = super()
    results = await asyncio.gather(*(parent.deserialize([info], [arg]) for info, arg in zip(infos, args)),
                                   return_exceptions=True)
    for r in results:
      if isinstance(r, BaseException):
        raise r
    return [r[0] for r in results]


def _type_handlers():
  """The arrays of a checkpoint are NumPy host copies (`mesh_lib.to_host`): one handler reads and writes them."""
  th = ocp.type_handlers
  scalar = th.ScalarHandler()
  return th.create_type_handler_registry((int, scalar), (float, scalar), (np.number, scalar),
                                         (np.ndarray, _EveryReadAwaited()), (jax.Array, th.ArrayHandler()),
                                         (str, th.StringHandler()))


class Checkpointer:
  """Saves and restores `(TrainState, data iterator, metadata)` in a directory, keeping the last `keep`.

  Args:
    directory: where the step folders go (created on the first save, not before).
    keep: how many of the latest checkpoints to keep.
    async_save: write in a background thread (arrays are copied to host before `save` returns).
    read_only: open an existing run for reading: nothing is created, renamed or deleted, and `save` refuses
      (works on a read-only mount).
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True, read_only: bool = False):
    self.directory = resolve(directory)
    self.read_only = read_only
    if read_only:
      self._options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    else:
      # cleanup_tmp_directories: a process killed mid-save leaves a temporary folder; drop it on the next start.
      self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                                   enable_async_checkpointing=async_save)
    self._manager: Optional[ocp.CheckpointManager] = None
    self._in_flight: Optional[int] = None  # the step of the last save started (async: maybe still writing)

  def _handlers(self) -> dict:
    import grain  # pylint: disable=g-import-not-at-top
    return {"state": ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
            "data": grain.checkpoint.CheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}

  @property
  def manager(self) -> Optional[ocp.CheckpointManager]:
    """The orbax manager (None for a read-only open of a directory that does not exist)."""
    if self._manager is None:
      if self.read_only and not os.path.isdir(self.directory):
        return None
      self._manager = ocp.CheckpointManager(self.directory, options=self._options, item_handlers=self._handlers())
    return self._manager

  def _reopen(self) -> None:
    if self._manager is not None:
      self._manager.close()
      self._manager = None

  @property
  def steps(self) -> list[int]:
    """The saved steps, oldest first."""
    return sorted(self.manager.all_steps()) if self.manager is not None else []

  def latest_step(self) -> Optional[int]:
    """The newest saved step, or None."""
    return self.manager.latest_step() if self.manager is not None else None

  # ----------------------------------------------------------------------------------------------- save
  def save(self, step: int, state: TrainState, data_iterator: Any, meta: Optional[dict] = None,
           force: bool = True) -> bool:
    """Saves a checkpoint for `step` (the iterator's state must be the one after the step's batch).

    The state is copied to host memory first (it is replicated, so this is the whole state): the caller may
    donate or overwrite its device buffers right after, and writing runs in the background. The CRC32 of
    every array's host bytes goes into the metadata and is verified on restore. Without a data iterator
    (a fused deployment run) no data position is saved: a run resumed from it derives it from the step.

    Raises:
      CheckpointError: this save (when synchronous) or an earlier background save failed.
    """
    import grain  # pylint: disable=g-import-not-at-top

    if self.read_only:
      raise CheckpointError(f"{self.directory} is opened read-only; not saving step {step}")
    self.wait()  # the previous background save must have succeeded (orbax would wait for it anyway)
    host = mesh_lib.to_host(state._asdict() if isinstance(state, TrainState) else state)
    meta = dict(meta or {}, step=int(step), checksums=checksums(host))
    items = dict(state=ocp.args.PyTreeSave(host), meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    args = ocp.args.Composite(**items)
    self._in_flight = int(step)
    try:
      saved = self.manager.save(int(step), args=args, force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from None
    if not self._options.enable_async_checkpointing:
      self.check()
    return saved

  def _save_error(self, step, error: BaseException) -> CheckpointError:
    step = self._in_flight if self._in_flight is not None else step
    kept = [s for s in self._listed_steps() if s != step]
    last = f"the last good checkpoint (step {kept[-1]}) is kept" if kept else "no earlier checkpoint exists"
    return CheckpointError(f"saving the checkpoint of step {step} in {self.directory} failed "
                           f"({_first_line(error)}); stopped, {last}")

  def _listed_steps(self) -> list[int]:
    try:
      return sorted(int(d) for d in os.listdir(self.directory) if d.isdigit())
    except OSError:
      return []

  def check(self) -> None:
    """Raises `CheckpointError` if a background save has failed (e.g. the disk is full)."""
    if self._manager is None:
      return
    try:
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(None, e) from None

  # ----------------------------------------------------------------------------------------------- restore
  def restore(self, like, data_iterator: Any = None, mesh=None,
              check_meta: Optional[Callable[[dict], None]] = None,
              rederive: Optional[Callable[[int, str], None]] = None,
              step: Optional[int] = None) -> Optional[tuple[Any, dict]]:
    """Restores the newest readable checkpoint into `like`'s structure.

    Args:
      like: a `TrainState` of this run, or a dict holding some of its fields (e.g. params and batch_stats:
        only those are read), giving the structure, shapes and dtypes to restore.
      data_iterator: the grain iterator to set to the saved position (None: not restored).
      mesh: where the restored (replicated) arrays go; None: NumPy arrays.
      check_meta: called with a checkpoint's metadata before its arrays are read; the exceptions it raises
        (e.g. "this workdir holds another run") propagate and leave the checkpoint untouched.
      rederive: `rederive(step, reason)` sets `data_iterator` from the step when the saved iterator state
        does not restore (another topology); without it, that error propagates.
      step: restore this step only (default: the newest readable one).

    Returns:
      `(state, meta)` (a `TrainState` when `like` is one, else a dict), or None when there is no checkpoint.

    Raises:
      CheckpointError: there are checkpoints, but none can be read (nothing is moved aside).
    """
    self.wait()
    as_state = isinstance(like, TrainState)
    like = like._asdict() if as_state else dict(like)
    target = jax.tree.map(lambda x: np.zeros(np.shape(x), x.dtype), like)
    bad: list[tuple[int, str]] = []
    found = None
    candidates = list(reversed(self.steps))
    if step is not None:
      if step not in candidates:
        raise CheckpointError(f"{self.directory} holds no checkpoint of step {step} (steps: "
                              f"{', '.join(map(str, sorted(candidates))) or 'none'})")
      candidates = [step]
    for step in candidates:
      try:
        meta = self._read_meta(step)
      except _Unreadable as e:
        bad.append((step, str(e)))
        continue
      if check_meta is not None:
        check_meta(meta)
      try:
        restored = self._read_state(step, target, meta)
      except _Unreadable as e:
        bad.append((step, str(e)))
        continue
      found = (step, restored, meta)
      break
    if found is None:
      if bad:
        listed = "; ".join(f"step {s}: {r}" for s, r in bad)
        raise CheckpointError(f"no checkpoint in {self.directory} can be read ({listed}); nothing was changed. "
                              "Run with --fresh to start over from step 0 (the old checkpoints are kept aside)")
      return None
    step, restored, meta = found
    for s, reason in bad:
      what = "moved aside to .corrupt, " if not self.read_only else ""
      warnings.warn(f"checkpoint {os.path.join(self.directory, str(s))} is unreadable ({reason}); {what}"
                    f"using the previous checkpoint (step {step})", CheckpointWarning, stacklevel=2)
    if bad and not self.read_only:
      for s, _ in bad:
        self._move_aside(s)
      self._reopen()
    if data_iterator is not None:
      self._restore_data(step, data_iterator, rederive)
    if mesh is not None:
      restored = mesh_lib.put_replicated(restored, mesh)
    return (TrainState(**restored) if as_state else restored), meta

  def _read_meta(self, step: int) -> dict:
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # pylint: disable=broad-except
      raise _Unreadable(f"its metadata cannot be read: {_first_line(e)}") from None
    if not isinstance(meta, dict):
      raise _Unreadable("its metadata is not a JSON object")
    return meta

  def _read_state(self, step: int, target: dict, meta: dict) -> dict:
    try:
      saved = self.manager.item_metadata(step)["state"]
      saved_keys = set(saved.tree.keys()) if saved is not None and hasattr(saved, "tree") else set(target)
    except Exception:  # pylint: disable=broad-except
      saved_keys = set(target)
    partial = not set(saved_keys) <= set(target)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, restore_args=restore_args, partial_restore=partial)))
      restored = dict(out["state"])
    except Exception as e:  # pylint: disable=broad-except
      raise _Unreadable(_first_line(e)) from None
    if jax.tree.structure(restored) != jax.tree.structure(target):
      raise _Unreadable("its state does not have the structure of this run's state")
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(target)):
      if np.shape(a) != np.shape(b) or np.asarray(a).dtype != b.dtype:
        raise _Unreadable(f"{_leaf_name(path)} has shape {np.shape(a)} where this run has {np.shape(b)}")
    if "step" in restored and int(restored["step"]) != step:
      raise _Unreadable(f"it holds step {int(restored['step'])}")
    recorded = meta.get("checksums")
    if isinstance(recorded, dict):  # checkpoints written before checksums were recorded have none
      for name, crc in checksums(restored).items():
        if name in recorded and recorded[name] != crc:
          raise _Unreadable(f"checksum mismatch in {name} (recorded {recorded[name]}, read {crc})")
    return restored

  def _restore_data(self, step: int, data_iterator, rederive) -> None:
    import grain  # pylint: disable=g-import-not-at-top
    if rederive is not None and not os.path.isdir(os.path.join(self.directory, str(step), "data")):
      rederive(step, "the checkpoint holds no data position (a fused run)")
      return
    try:
      self.manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator)))
    except Exception as e:  # pylint: disable=broad-except
      if rederive is None:
        raise
      rederive(step, _first_line(e))

  def _move_aside(self, step: int) -> None:
    """Renames an unreadable step folder so that the manager no longer lists it (and can save that step)."""
    path = os.path.join(self.directory, str(step))
    if jax.process_index() == 0 and os.path.isdir(path):
      os.rename(path, free_name(path, ".corrupt"))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"repopt_ckpt_move_aside_{step}")

  def move_all_aside(self) -> Optional[str]:
    """Moves the whole checkpoint directory aside (`checkpoints.old`, `.old1`, ...): a fresh start that loses
    nothing. Returns the new path, or None when there was nothing to move."""
    if self.read_only:
      raise CheckpointError(f"{self.directory} is opened read-only")
    self._reopen()
    dest = None
    if jax.process_index() == 0 and os.path.isdir(self.directory):
      dest = free_name(self.directory, ".old")
      os.rename(self.directory, dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("repopt_ckpt_move_all_aside")
    return dest

  def wait(self) -> None:
    """Blocks until a background save has been written; raises `CheckpointError` if it failed."""
    if self._manager is None:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(None, e) from None

  def close(self) -> None:
    """Waits for pending saves and releases the manager (errors of a failed save are raised)."""
    if self._manager is None:
      return
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        pass
      self._manager = None
