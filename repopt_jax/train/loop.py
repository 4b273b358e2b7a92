"""The training loop: one `Trainer` for every model mode and optimizer, on one CPU or many hosts.

`Trainer(config, workdir).fit()` builds the data pipeline, the model and optimizer, restores the newest
readable checkpoint in `workdir` (if any), trains to the configured number of steps with periodic
evaluation, checkpoints and metric records, and returns the final metrics. The hot path is one compiled
function, `TrainStep`, called with the same shapes every step.

The run directory (`repopt_jax.rundir.RunDir`) is written only under its lock: `fit`, `restore` and `save`
take it (process 0 does, for every process of a multi-process run), so a second process on the same
`workdir` is refused in one line naming the holder, instead of both corrupting each other's checkpoints.

Stopping: SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and returns
(`'preempted': True` in the metrics). A non-finite loss (or gradient, or parameter) raises
`NonFiniteLossError` before anything is saved from that step on, so the last good checkpoint stays intact.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np

from repopt_jax.config import Config, ConfigError, WorkdirError, load_config
from repopt_jax import rundir
from repopt_jax.rundir import RunDir
from repopt_jax.train import mesh as mesh_lib
from repopt_jax.train.checkpoint import Checkpointer, run_meta
from repopt_jax.train.metrics import MetricsWriter, Progress

__all__ = ["Trainer", "NonFiniteLossError", "WorkdirError", "exit_status", "family_name"]

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/Inf loss, gradient or parameter; the run stopped without saving it."""


# Exit status of a run stopped by a signal after saving (the shell's convention, 128 + the signal number).
def exit_status(signal_name: Optional[str]) -> int:
  """`128 + signum` for a run stopped by `signal_name` ('SIGTERM' -> 143, 'SIGINT' -> 130); 1 otherwise."""
  try:
    return 128 + int(signal.Signals[signal_name])
  except (KeyError, TypeError):
    return 1


def _due(step: int, every) -> bool:
  """Whether `step` is a multiple of a `train.*_every` setting (0 or None: never)."""
  every = int(every or 0)
  return every > 0 and step % every == 0


class Trainer:
  """Trains and evaluates the model a config describes, checkpointing into `workdir`.

  Args:
    config: a `Config`, a shipped config name, or a JSON path.
    workdir: the run's directory (checkpoints, metrics.jsonl, tensorboard/); resumed from if it holds a
      checkpoint.
    overrides: `section.key=value` strings applied when `config` is a name or path.
    devices: the devices of the data-parallel mesh (default: every device of every process).
    progress: show a tqdm bar (process 0 only).
    tensorboard: write TensorBoard event files (process 0 only).
    compiler_options: XLA options for the train and eval steps (default none), e.g.
      `{'xla_backend_optimization_level': 0}` to compile short CPU runs faster.
    fresh: ignore the work directory's checkpoints and start from step 0, exactly like a new run; the old
      `checkpoints/`, `metrics.jsonl` and `tensorboard/` are moved aside (`*.old`), not deleted.
    write_config: write `<workdir>/config.json` (for `eval`, `fuse`, `load_model`, `train --workdir`) once
      the workdir's checkpoints are known to belong to this run.

  Attributes:
    run: the assembled run (`repopt_jax.train.build.Run`: mesh, batch sizes, steps, model, steps, ...).
    run_dir: the `RunDir` of `workdir`.
    state: the current `TrainState` (replicated over `run.mesh`).
    summary: the model/data/optimizer facts the banner prints and `metrics.jsonl` records.

  Raises (before anything is created on disk):
    ConfigError: an invalid config, clipping with a RepOptimizer, a batch size the devices cannot split or
      larger than the train split.
    WorkdirError: `workdir` cannot be written.
    DatasetError: unknown or unprepared dataset (from `repopt_jax.data`).
    ScalesError: unreadable scales, scales of another architecture, or a block whose scales are all zero.

  Example:
    >>> trainer = Trainer('digits_tiny', '/tmp/run', overrides=['train.epochs=1'])  # doctest: +SKIP
    >>> metrics = trainer.fit()          # doctest: +SKIP
    >>> metrics['eval_top1']             # doctest: +SKIP
  """

  def __init__(self, config: Config | str, workdir: str, *, overrides: Sequence[str] = (),
               devices: Optional[Sequence[jax.Device]] = None, progress: bool = True, tensorboard: bool = True,
               compiler_options: Optional[dict] = None, fresh: bool = False, write_config: bool = False):
    from repopt_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    from repopt_jax.train.build import build_run  # pylint: disable=g-import-not-at-top

    if not isinstance(config, Config) or overrides:
      config = load_config(config, overrides)
    mesh_lib.maybe_initialize_distributed()
    self.process_index, self.process_count = jax.process_index(), jax.process_count()
    self.is_main = self.process_index == 0
    self.run_dir = RunDir(workdir).check_not_a_file()
    self._data = data_lib
    self._progress_enabled = progress and self.is_main
    self._tensorboard, self._fresh, self._write_config = tensorboard, fresh, write_config
    # Everything is validated and built before the work directory is touched.
    self.run = build_run(config, devices=devices, compiler_options=compiler_options)
    # The iterator is built here so that an unprepared dataset is reported before anything else happens.
    self._train_iter = self._make_iterator()
    self.state = self.run.state
    self.summary = _summary(self.run, self.process_count)
    self.run_dir.create()
    self._stop_signal: Optional[int] = None
    self._saving = False
    self._last_train: dict = {}
    self._checkpointer: Optional[Checkpointer] = None
    self._lock = self.run_dir.lock()
    self._lock_depth = 0
    self.resumed_from: Optional[int] = None

  @property
  def config(self) -> Config:
    return self.run.config

  @property
  def workdir(self) -> str:
    """The run directory (absolute)."""
    return self.run_dir.path

  @property
  def total_steps(self) -> int:
    return self.run.total_steps

  # ----------------------------------------------------------------------------------------------- data
  def _make_iterator(self):
    c, r = self.config, self.run
    return self._data.make_iterator(
        c.data.dataset, c.data.train_split, global_batch_size=r.batch_size, train=True, seed=int(c.train.seed),
        image_size=r.image_size, data_dir=c.data.data_dir, num_epochs=None, worker_count=int(c.data.worker_count),
        process_index=self.process_index, process_count=self.process_count,
        # bf16 compute: the first conv rounds its input to bf16 anyway; half the host-to-device bytes.
        dtype=c.train.compute_dtype)

  def _next_batch(self):
    return self._data.global_batch(next(self._train_iter), self.run.mesh)

  def _rederive_data(self, step: int, reason: str) -> None:
    """The saved data position does not fit this run (another topology): derive it from the step."""
    workers = int(self.config.data.worker_count)
    self._data.seek(self._train_iter, step, process_index=self.process_index, process_count=self.process_count,
                    worker_count=workers)
    if self.is_main:
      log.warning("data position re-derived from step %d: the checkpoint's iterator state does not fit this "
                  "run (%s processes, data.worker_count=%d); %s", step, self.process_count, workers, reason[:160])

  # ----------------------------------------------------------------------------------------------- model
  @property
  def step(self) -> int:
    """Optimizer steps taken by the current state."""
    return int(jax.device_get(self.state.step))

  @property
  def params(self):
    """The current params (`nnx.State`)."""
    return self.state.params

  def model(self):
    """An `nnx` model holding the current params and statistics (eval mode), e.g. to fuse or export."""
    from flax import nnx  # pylint: disable=g-import-not-at-top
    model = nnx.merge(self.run.graphdef, self.state.params, self.state.batch_stats, self.run.rest)
    model.eval()
    return model

  # ----------------------------------------------------------------------------------------------- the lock
  @contextlib.contextmanager
  def locked(self) -> Iterator["Trainer"]:
    """Holds the run directory's lock for the block (re-entrant; `fit`, `restore` and `save` take it).

    The checkpoint manager lives only while the lock is held: it is opened under it and closed (pending
    saves written) before it is released.

    Raises:
      WorkdirError: another process holds the run (its pid and host are named).
    """
    if self._lock_depth == 0:
      self._acquire_lock()
    self._lock_depth += 1
    ok = False
    try:
      yield self
      ok = True
    finally:
      self._lock_depth -= 1
      if self._lock_depth == 0:
        try:
          self._close_checkpointer(raise_errors=ok)
        finally:
          self._lock.release()

  def _acquire_lock(self) -> None:
    # Process 0 locks the run for all of its processes (they share the directory); every process learns the
    # outcome, so that all of them refuse together instead of waiting for a peer that has left.
    error, notice = None, None
    if self.is_main:
      try:
        notice = self._lock.acquire()
      except WorkdirError as e:
        error = e
    if self.process_count > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      refused = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
      if refused and error is None:
        error = WorkdirError(f"another process holds the run {self.workdir} (process 0 could not lock it)")
    if error is not None:
      raise error
    if notice:
      log.warning("%s", notice)

  # ----------------------------------------------------------------------------------------------- checkpoints
  def _ckpt(self) -> Checkpointer:
    if self._checkpointer is None:
      t = self.config.train
      self._checkpointer = Checkpointer(self.run_dir.checkpoints, keep=int(t.keep_checkpoints),
                                        async_save=bool(t.async_checkpointing))
    return self._checkpointer

  def _close_checkpointer(self, raise_errors: bool) -> None:
    ckpt, self._checkpointer = self._checkpointer, None
    if ckpt is None:
      return
    try:
      ckpt.close()
    except Exception:  # pylint: disable=broad-except
      if raise_errors:
        raise  # e.g. the last background save failed

  def _start_fresh(self) -> None:
    """`fresh=True`: moves the old checkpoints, metrics and event files aside; the run starts at step 0."""
    moved = self._ckpt().move_all_aside()
    self._checkpointer = None
    if self.is_main:
      for name in (rundir.METRICS_FILE, rundir.TENSORBOARD):
        self.run_dir.move_aside(name)
      if moved:
        log.info("--fresh: starting over from step 0; the previous checkpoints are in %s", moved)
    self._fresh = False

  def restore(self) -> Optional[int]:
    """Restores the newest readable checkpoint of the workdir (state and data position); its step or None.

    Raises:
      CheckpointError: the workdir holds checkpoints but none can be read (nothing was changed).
      ConfigError: they belong to another run (a config key or the scales differ).
      WorkdirError: another process holds the run.
    """
    with self.locked():
      if self._fresh:
        self._start_fresh()
        return None
      out = self._ckpt().restore(self.state, self._train_iter, self.run.mesh, check_meta=self._check_same_run,
                                 rederive=self._rederive_data)
      if out is None:
        return None
      self.state, meta = out
      self._last_train = dict(meta.get("train") or {})
      return self.step

  # Config keys a resumed run must share with the checkpoint: everything that changes the trajectory up to
  # the saved step (model, optimizer, data stream, scales). What may change: train.epochs/steps (a longer or
  # shorter run; the schedule is recomputed for the new length), evaluation, logging and checkpoint
  # frequency, eval split and batch, data.data_dir and data.worker_count (same batches), async saving.
  _SAME_RUN_KEYS = ("model.arch", "model.mode", "model.num_classes", "model.hs_init", "model.reinit_identity",
                    "model.reinit", "data.dataset", "data.image_size", "data.train_split", "optim.name",
                    "optim.lr", "optim.momentum", "optim.nesterov", "optim.weight_decay", "optim.warmup_epochs",
                    "optim.schedule", "optim.label_smoothing", "optim.grad_clip", "optim.b1", "optim.b2",
                    "optim.eps", "optim.exact", "train.batch_size", "train.seed", "train.compute_dtype")

  def _check_same_run(self, meta: dict) -> None:
    saved = meta.get("config")
    if not isinstance(saved, dict):
      return
    mine = self.config.to_dict()
    for key in self._SAME_RUN_KEYS:
      section, name = key.split(".")
      theirs = saved.get(section, {}).get(name, mine[section][name])
      if theirs != mine[section][name]:
        raise ConfigError(f"work directory {self.workdir} holds checkpoints of another run: {key!r} is "
                          f"{theirs!r} there and {mine[section][name]!r} here; use another workdir, the "
                          "same value to resume, or --fresh to start over")
    theirs = meta.get("scales_sha256", self.run.scales_fingerprint)
    if theirs != self.run.scales_fingerprint:
      raise ConfigError(f"work directory {self.workdir} holds checkpoints of another run: the scales file "
                        f"{self.config.scales!r} holds other values than the scales that run was trained with; "
                        "use the same scales to resume, another workdir, or --fresh to start over")

  def save(self) -> None:
    """Checkpoints the current state and data position (blocking only for the device-to-host copy).

    Raises:
      CheckpointError: the save (or an earlier background one) failed, e.g. the disk is full.
      WorkdirError: another process holds the run.
    """
    with self.locked():
      meta = run_meta(self.config, self.run.dims, self.run.scales_fingerprint, self._last_train)
      self._ckpt().save(self.step, self.state, self._train_iter, meta)

  # ----------------------------------------------------------------------------------------------- signals
  def _install_signal_handlers(self):
    if threading.current_thread() is not threading.main_thread():
      return {}

    def handler(signum, frame):
      del frame
      if self._stop_signal is not None:
        if self._saving:  # a second signal while the last checkpoint is written: finish writing it
          if self.is_main:
            print("saving the checkpoint; it will stop as soon as it is written", file=sys.stderr, flush=True)
          return
        if signum == signal.SIGINT:
          raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for the step boundary
      self._stop_signal = signum

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      previous[sig] = signal.signal(sig, handler)
    return previous

  def _restore_signal_handlers(self, previous) -> None:
    for sig, h in previous.items():
      signal.signal(sig, h)
    self._stop_signal, self._saving = None, False

  def _stop_requested(self, step: int) -> bool:
    local = self._stop_signal is not None
    if self.process_count == 1:
      return local
    # Every process must stop (and save) at the same step: agree every log_every steps.
    if step % max(int(self.config.train.log_every), 1):
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(local))
    return bool(np.any(flags))

  def _stopped(self) -> dict:
    name = signal.Signals(self._stop_signal).name if self._stop_signal else "SIGTERM"
    return {"preempted": True, "signal": name, "exit_status": exit_status(name)}

  # ----------------------------------------------------------------------------------------------- loop
  def evaluate(self) -> dict:
    """Top-1/top-5 accuracy and mean loss of the current state on `data.eval_split` (one full pass).

    Evaluates `self.state` as it is: call `restore()` first to evaluate the workdir's newest checkpoint.

    Returns:
      `{'eval_top1', 'eval_top5', 'eval_loss', 'eval_examples'}`.
    """
    from repopt_jax.train.build import evaluate  # pylint: disable=g-import-not-at-top
    return evaluate(self.run, self.state.params, self.state.batch_stats, self.config.data.eval_split,
                    process_index=self.process_index, process_count=self.process_count)

  def fit(self, on_step: Optional[Callable[[int], Any]] = None, evaluate: bool = True) -> dict:
    """Trains from the newest checkpoint (or from scratch) to `total_steps`; evaluates; returns metrics.

    Args:
      on_step: called as `on_step(step)` after every optimizer step (at the step boundary, before any
        save), e.g. for custom logging.
      evaluate: run the evaluations (every `train.eval_every` steps and at the end).

    Returns:
      `{'step', 'epoch', 'train_loss', 'train_accuracy', 'images_per_sec', 'eval_top1', 'eval_top5',
      'eval_loss', 'preempted', 'resumed_from', 'already_finished', ...}` (eval keys when an evaluation ran at
      the end; `signal` and `exit_status` when stopped by a signal).

    Raises:
      NonFiniteLossError: a NaN/Inf loss, gradient or parameter; nothing from that step on was saved.
      CheckpointError: no checkpoint of the workdir can be read, or a save failed (the run stops at once).
      WorkdirError: another process holds the run (nothing was read or written).
    """
    with self.locked():
      start = step = self._begin()
      result = {"preempted": False, "resumed_from": self.resumed_from, "already_finished": start >= self.total_steps}
      book = _TrainLog(self, start)
      previous = self._install_signal_handlers()
      try:
        while step < self.total_steps:
          self.state, metrics = self.run.train_step(self.state, self._next_batch())
          step += 1
          book.add(step, metrics)
          if on_step is not None:
            on_step(step)
          if self._step_boundary(step, book, result, evaluate):
            break
        book.flush()
        if start >= self.total_steps and evaluate:  # nothing left to train: report the restored state
          result.update(self.evaluate())
        self._saving = True
        self._ckpt().wait()  # the last save is complete (or its failure raised) before the signal handlers go
      except BaseException as e:
        self._abandon(e, step)
        raise
      finally:
        self._restore_signal_handlers(previous)
        book.close()
    result.update(step=step, epoch=step / self.run.steps_per_epoch, **(self._last_train if start < step else {}))
    return result

  def _begin(self) -> int:
    """Restores (or starts fresh), then writes `config.json`: the step training starts from."""
    start = self.restore() or 0
    if self._write_config and self.is_main:
      self.run_dir.write_config(self.config)
    self.resumed_from = start or None
    return start

  def _step_boundary(self, step: int, book: "_TrainLog", result: dict, evaluate: bool) -> bool:
    """After step `step`: the save, evaluation and stop decisions; True when the run stops here."""
    t = self.config.train
    self._ckpt().check()  # a background save that failed (disk full, ...) stops the run here, at once
    stop = self._stop_requested(step)
    at_end = step == self.total_steps
    want_eval = evaluate and not stop and (at_end or _due(step, t.eval_every))
    want_save = at_end or stop or _due(step, t.checkpoint_every)
    if want_eval or want_save:
      book.flush()  # this step's metrics are checked (finite) and recorded before they are saved or evaluated
    if want_save:
      self._saving = stop or at_end
      self.save()
    if want_eval:
      result.update(book.write("eval", step, self.evaluate()))
    if stop:
      result.update(self._stopped())
      book.write("preempted", step, {"signal": result["signal"]})
    return stop

  def _abandon(self, error: BaseException, step: int) -> None:
    """A run that stops on an error: the checkpointer is dropped, not waited for when a peer is gone."""
    lost = mesh_lib.peer_error(error, step) if isinstance(error, Exception) else None
    if lost is not None:  # waiting for the checkpointer's cross-process barriers would hang
      self._checkpointer = None
      raise lost from None
    self._close_checkpointer(raise_errors=False)  # the error being raised says what went wrong


class _TrainLog:
  """A fit's bookkeeping: the banner, the train metrics (read one step late), their records and the bar.

  A step's metrics are read when the next step has been dispatched, so that the host never waits for the
  step it just started; `flush` reads the pending one at once (before a save, an evaluation or the end).
  """

  def __init__(self, trainer: Trainer, start: int):
    self.trainer = trainer
    total = trainer.total_steps
    self.writer = MetricsWriter(trainer.run_dir, enabled=trainer.is_main, tensorboard=trainer._tensorboard,  # pylint: disable=protected-access
                                after_step=start)
    self.progress = Progress(total, start, enabled=trainer._progress_enabled and start < total)  # pylint: disable=protected-access
    self.window = _Window()
    self.pending = None  # (step, metrics on device) of the last dispatched step
    self.log_every = max(int(trainer.config.train.log_every), 1)
    self._announce(start)
    self._compile_started = None
    if trainer._progress_enabled and start < total:  # pylint: disable=protected-access
      # The first call compiles (tens of seconds for a large model): say so, not a bar at 0%.
      cached = jax.config.jax_compilation_cache_dir
      log.info("compiling the train step%s ...", f" (compilation cache: {cached})" if cached else "")
      self._compile_started = time.perf_counter()

  def _announce(self, start: int) -> None:
    t = self.trainer
    if start == 0:
      text = _summary_text(t.summary)
      log.info("%s", text)
      self.writer.write_text("summary", 0, text, **t.summary)
    elif start >= t.total_steps:
      log.info("already finished at step %d; nothing to train (%s)", start, t.workdir)
    else:
      log.info("resumed from step %d of %d (%s)", start, t.total_steps, t.run_dir.checkpoints)
      self.writer.write("resume", start, {"from_step": start})

  def add(self, step: int, metrics) -> None:
    """Step `step` was dispatched: the previous step's metrics are consumed."""
    if self._compile_started is not None:  # jit compiles synchronously in the first call; the step runs on
      log.info("compiled in %.1f s", time.perf_counter() - self._compile_started)
      self.progress.start()
      self._compile_started = None
    self.flush()
    self.pending = (step, metrics)

  def flush(self) -> None:
    if self.pending is not None:
      pending, self.pending = self.pending, None
      self._consume(*pending)

  def write(self, kind: str, step: int, record: dict) -> dict:
    self.writer.write(kind, step, record)
    return record

  def _consume(self, step: int, metrics) -> None:
    """Reads a step's metrics (blocking), stops on non-finite values, logs every `log_every` steps."""
    t = self.trainer
    m = jax.device_get(metrics)
    if not bool(m["finite"]):
      latest = t._ckpt().latest_step()  # pylint: disable=protected-access
      kept = f"the last good checkpoint (step {latest}) is kept" if latest is not None else "no checkpoint saved"
      raise NonFiniteLossError(f"non-finite training loss at step {step} (loss={float(m['loss'])}, "
                               f"grad_norm={float(m['grad_norm'])}, lr={float(m['lr']):.3g}): stopped; {kept} "
                               f"in {t.run_dir.checkpoints}")
    self.window.add(m, t.run.batch_size)
    if step % self.log_every == 0 or step == t.total_steps:
      rec = self.window.flush(step, t.run.steps_per_epoch)
      t._last_train = {"train_loss": rec["loss"], "train_accuracy": rec["accuracy"],  # pylint: disable=protected-access
                       "images_per_sec": rec["images_per_sec"]}
      self.writer.write("train", step, rec)
      self.progress.update(rec["steps"], rec["loss"], rec["accuracy"], rec["images_per_sec"])

  def close(self) -> None:
    self.progress.close()
    self.writer.close()


class _Window:
  """Averages the train metrics between two log records and measures images/s over them."""

  def __init__(self):
    self.reset(time.perf_counter())

  def reset(self, now):
    self.t0, self.n, self.images, self.sums = now, 0, 0, {"loss": 0.0, "accuracy": 0.0, "grad_norm": 0.0}
    self.lr = 0.0

  def add(self, m, batch_size):
    self.n += 1
    self.images += batch_size
    for k in self.sums:
      self.sums[k] += float(m[k])
    self.lr = float(m["lr"])

  def flush(self, step, steps_per_epoch):
    now = time.perf_counter()
    rec = {k: v / max(self.n, 1) for k, v in self.sums.items()}
    rec.update(lr=self.lr, images_per_sec=self.images / max(now - self.t0, 1e-9), steps=self.n,
               epoch=step / steps_per_epoch)
    self.reset(now)
    return rec


# ------------------------------------------------------------------------------------------------ the banner
# Architecture families of the non-VGG names in `models.registry.GENERIC_ARCHS` (by prefix), and whether the
# family's name takes "RepOpt-" when the method is applied (as the paper names RepOpt-VGG and RepOpt-GhostNet).
_FAMILIES = (("repopt_ghostnet_", "GhostNet"), ("resnet18_cifar", "ResNet-18 (CIFAR)"))


def family_name(arch, mode: str, optimizer: str) -> str:
  """The architecture family a run trains, as the banner names it.

  RepOpt-VGG sizes: 'RepVGG' in mode 'repvgg', 'RepOpt-VGG' when the RepOptimizer method is at work (a
  `repopt_*` optimizer, or the Hyper-Search / CSLA models), else 'VGG' (the plain baseline). Other
  architectures: their family ('GhostNet', 'ResNet-18 (CIFAR)'), prefixed 'RepOpt-' in the same cases; a
  name registered by the user (`register_arch`) is its own family.

  Example:
    >>> family_name('B1', 'target', 'repopt_sgd'), family_name('B1', 'repvgg', 'sgd'), family_name('B1', 'target', 'sgd')
    ('RepOpt-VGG', 'RepVGG', 'VGG')
    >>> family_name('resnet18_cifar', 'target', 'sgd'), family_name('repopt_ghostnet_0_5x', 'hs', 'sgd')
    ('ResNet-18 (CIFAR)', 'RepOpt-GhostNet')
  """
  from repopt_jax.models import family  # pylint: disable=g-import-not-at-top

  repopt = str(optimizer).startswith("repopt_") or mode in ("hs", "csla")
  if family(arch) == "vgg":
    base = "VGG"
    if mode == "repvgg":
      return "RepVGG"
  else:
    base = next((name for prefix, name in _FAMILIES if str(arch).startswith(prefix)), None)
    if base is None:
      return str(arch)
  return f"RepOpt-{base}" if repopt else base


def _summary(run, process_count: int) -> dict:
  """The facts of a run the banner prints (and `metrics.jsonl` records as its `summary`)."""
  from repopt_jax.models import count_params, flops  # pylint: disable=g-import-not-at-top

  c = run.config
  arch = c.model.arch if isinstance(c.model.arch, str) else str(c.model.arch)
  return {
      "arch": arch, "family": family_name(c.model.arch, c.model.mode, c.optim.name), "mode": c.model.mode,
      "optimizer": c.optim.name, "params": count_params(run.model),
      "macs_per_image": flops(c.model.arch, run.image_size, run.num_classes, mode=c.model.mode,
                              in_channels=run.in_channels),
      "image_size": run.image_size, "num_classes": run.num_classes, "dataset": c.data.dataset,
      "train_examples": run.train_size, "batch_size": run.batch_size, "steps_per_epoch": run.steps_per_epoch,
      "total_steps": run.total_steps, "devices": run.mesh.size, "processes": process_count,
      "platform": run.mesh.devices.flat[0].platform, "compute_dtype": c.train.compute_dtype,
  }


def _summary_text(s: dict) -> str:
  name = s["arch"] if s["family"] == s["arch"] else f"{s['family']} {s['arch']}"
  return (f"{name} ({s['mode']}), {s['params'] / 1e6:.3f}M params, "
          f"{s['macs_per_image'] / 1e9:.4f} GMACs/image at {s['image_size']}px, {s['num_classes']} classes; "
          f"{s['dataset']} ({s['train_examples']} train examples), optimizer {s['optimizer']}, "
          f"batch {s['batch_size']} on {s['devices']} {s['platform']} device(s) / {s['processes']} process(es), "
          f"{s['total_steps']} steps ({s['steps_per_epoch']} per epoch), compute {s['compute_dtype']}")
