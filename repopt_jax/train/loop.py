"""The training loop: one `Trainer` for every model mode and optimizer, on one CPU or many hosts.

`Trainer(config, workdir).fit()` builds the data pipeline, the model and optimizer, restores the newest
readable checkpoint in `workdir` (if any), trains to the configured number of steps with periodic
evaluation, checkpoints and metric records, and returns the final metrics. The hot path is one compiled
function, `TrainStep`, called with the same shapes every step.

Stopping: SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and returns
(`'preempted': True` in the metrics). A non-finite loss (or gradient, or parameter) raises
`NonFiniteLossError` before anything is saved from that step on, so the last good checkpoint stays intact.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from repopt_jax.config import Config, ConfigError, WorkdirError, load_config
from repopt_jax.train import mesh as mesh_lib
from repopt_jax.train.checkpoint import Checkpointer
from repopt_jax.train.metrics import MetricsWriter, Progress

__all__ = ["Trainer", "NonFiniteLossError", "WorkdirError", "exit_status"]

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/Inf loss, gradient or parameter; the run stopped without saving it."""




def _check_workdir(workdir: str) -> str:
  """Creates `workdir` and proves it writable, or raises one clear `WorkdirError` before any training.

  The probe is an `os.access` check, not a file: nothing but the directory itself is created.
  """
  path = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"work directory {path} cannot be written: {e.strerror or e}") from None
  if not os.path.isdir(path):
    raise WorkdirError(f"work directory {path} is not a directory")
  if not os.access(path, os.W_OK | os.X_OK):
    raise WorkdirError(f"work directory {path} cannot be written: permission denied")
  return path


# Exit status of a run stopped by a signal after saving (the shell's convention, 128 + the signal number).
def exit_status(signal_name: Optional[str]) -> int:
  """`128 + signum` for a run stopped by `signal_name` ('SIGTERM' -> 143, 'SIGINT' -> 130); 1 otherwise."""
  try:
    return 128 + int(signal.Signals[signal_name])
  except (KeyError, TypeError):
    return 1


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
    write_config: write `<workdir>/config.json` (for `eval`, `fuse`, `load_model`) once the workdir's
      checkpoints are known to belong to this run.

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
    from repopt_jax.models import count_params, flops  # pylint: disable=g-import-not-at-top
    from repopt_jax.train.build import build_run  # pylint: disable=g-import-not-at-top

    if not isinstance(config, Config) or overrides:
      config = load_config(config, overrides)
    self.config = config
    mesh_lib.maybe_initialize_distributed()
    self.process_index, self.process_count = jax.process_index(), jax.process_count()
    self.is_main = self.process_index == 0
    path = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
    if os.path.exists(path) and not os.path.isdir(path):
      raise WorkdirError(f"work directory {path} is not a directory")
    self._progress_enabled = progress and self.is_main
    self._tensorboard = tensorboard
    self._fresh = fresh
    self._write_config = write_config

    d = config.data
    self.data = data_lib
    # Everything is validated and built before the work directory is touched.
    self.run = run = build_run(config, devices=devices, compiler_options=compiler_options)
    self.mesh = run.mesh
    self.spec = run.spec
    self.batch_size, self.eval_batch_size = run.batch_size, run.eval_batch_size
    self.num_classes, self.image_size = run.num_classes, run.image_size
    self.train_split, self.eval_split = d.train_split, d.eval_split
    # The iterator is built here so that an unprepared dataset is reported before anything else happens.
    self._train_iter = self._make_iterator(self.train_split, train=True)
    self.steps_per_epoch, self.total_steps = run.steps_per_epoch, run.total_steps
    self.scales = run.scales
    self.schedule, self.tx = run.schedule, run.tx
    self.graphdef, self._rest, self.state = run.graphdef, run.rest, run.state
    self.train_step, self.eval_step = run.train_step, run.eval_step
    model = run.model
    t = config.train
    self.summary = {
        "arch": config.model.arch if isinstance(config.model.arch, str) else str(config.model.arch),
        "mode": config.model.mode, "optimizer": config.optim.name, "params": count_params(model),
        "macs_per_image": flops(config.model.arch, self.image_size, self.num_classes, mode=config.model.mode,
                                in_channels=run.in_channels),
        "image_size": self.image_size, "num_classes": self.num_classes, "dataset": d.dataset,
        "train_examples": run.train_size, "batch_size": self.batch_size, "steps_per_epoch": self.steps_per_epoch,
        "total_steps": self.total_steps, "devices": self.mesh.size, "processes": self.process_count,
        "platform": self.mesh.devices.flat[0].platform, "compute_dtype": t.compute_dtype,
    }
    self.workdir = _check_workdir(path)
    self._stop_signal: Optional[int] = None
    self._saving = False
    self._last_train: dict = {}
    self._checkpointer: Optional[Checkpointer] = None
    self.resumed_from: Optional[int] = None

  # ----------------------------------------------------------------------------------------------- data
  def _make_iterator(self, split: str, train: bool):
    d = self.config.data
    return self.data.make_iterator(
        d.dataset, split, global_batch_size=self.batch_size if train else self.eval_batch_size, train=train,
        seed=int(self.config.train.seed), image_size=self.image_size, data_dir=d.data_dir,
        num_epochs=None if train else 1, worker_count=int(d.worker_count), process_index=self.process_index,
        process_count=self.process_count,
        # bf16 compute: the first conv rounds its input to bf16 anyway; half the host-to-device bytes.
        dtype=self.config.train.compute_dtype)

  def _global_batch(self, batch):
    return self.data.global_batch(batch, self.mesh)

  def _rederive_data(self, step: int, reason: str) -> None:
    """The saved data position does not fit this run (another topology): derive it from the step."""
    self.data.seek(self._train_iter, step, process_index=self.process_index, process_count=self.process_count,
                   worker_count=int(self.config.data.worker_count))
    if self.is_main:
      log.warning("data position re-derived from step %d: the checkpoint's iterator state does not fit this "
                  "run (%s processes, data.worker_count=%d); %s", step, self.process_count,
                  int(self.config.data.worker_count), reason[:160])

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
    model = nnx.merge(self.graphdef, self.state.params, self.state.batch_stats, self._rest)
    model.eval()
    return model

  # ----------------------------------------------------------------------------------------------- checkpoints
  def _ckpt(self) -> Checkpointer:
    if self._checkpointer is None:
      t = self.config.train
      self._checkpointer = Checkpointer(os.path.join(self.workdir, "checkpoints"), keep=int(t.keep_checkpoints),
                                        async_save=bool(t.async_checkpointing))
    return self._checkpointer

  def _start_fresh(self) -> None:
    """`fresh=True`: moves the old checkpoints, metrics and event files aside; the run starts at step 0."""
    moved = self._ckpt().move_all_aside()
    self._checkpointer = None
    if self.is_main:
      for name in ("metrics.jsonl", "tensorboard"):
        src = os.path.join(self.workdir, name)
        if os.path.exists(src):
          dest, n = src + ".old", 1
          while os.path.exists(dest):
            dest, n = f"{src}.old{n}", n + 1
          os.rename(src, dest)
      if moved:
        log.info("--fresh: starting over from step 0; the previous checkpoints are in %s", moved)
    self._fresh = False

  def restore(self) -> Optional[int]:
    """Restores the newest readable checkpoint of the workdir (state and data position); its step or None.

    Raises:
      CheckpointError: the workdir holds checkpoints but none can be read (nothing was changed).
      ConfigError: they belong to another run (a config key or the scales differ).
    """
    if self._fresh:
      self._start_fresh()
      return None
    out = self._ckpt().restore(self.state, self._train_iter, self.mesh, check_meta=self._check_same_run,
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
    """
    meta = {"config": self.config.to_dict(), "train": self._last_train, "model": self.run.dims,
            "scales_sha256": self.run.scales_fingerprint}
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

  @staticmethod
  def _restore_signal_handlers(previous):
    for sig, h in previous.items():
      signal.signal(sig, h)

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

  # ----------------------------------------------------------------------------------------------- loop
  def evaluate(self) -> dict:
    """Top-1/top-5 accuracy and mean loss of the current state on `data.eval_split` (one full pass).

    Evaluates `self.state` as it is: call `restore()` first to evaluate the workdir's newest checkpoint.

    Returns:
      `{'eval_top1', 'eval_top5', 'eval_loss', 'eval_examples'}`.
    """
    from repopt_jax.train.build import evaluate  # pylint: disable=g-import-not-at-top
    return evaluate(self.run, self.state.params, self.state.batch_stats, self.eval_split,
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
    """
    t = self.config.train
    ckpt = self._ckpt()
    start = self.restore() or 0
    ckpt = self._ckpt()
    if self._write_config:
      from repopt_jax.runs import write_run_config  # pylint: disable=g-import-not-at-top
      write_run_config(self.config, self.workdir)
    self.resumed_from = start or None
    writer = MetricsWriter(self.workdir, enabled=self.is_main, tensorboard=self._tensorboard, after_step=start)
    result: dict = {"preempted": False, "resumed_from": self.resumed_from,
                    "already_finished": start >= self.total_steps}
    if start == 0:
      text = _summary_text(self.summary)
      log.info("%s", text)
      writer.write_text("summary", 0, text, **self.summary)
    elif start >= self.total_steps:
      log.info("already finished at step %d; nothing to train (%s)", start, self.workdir)
    else:
      log.info("resumed from step %d of %d (%s)", start, self.total_steps, os.path.join(self.workdir, "checkpoints"))
      writer.write("resume", start, {"from_step": start})
    progress = Progress(self.total_steps, start, enabled=self._progress_enabled and start < self.total_steps)
    previous_handlers = self._install_signal_handlers()
    log_every, ckpt_every, eval_every = max(int(t.log_every), 1), int(t.checkpoint_every), int(t.eval_every)
    window = _Window()
    pending = None  # (step, metrics on device) of the last dispatched step: read one step late.
    step = start
    compiling = self._progress_enabled and start < self.total_steps
    if compiling:  # the first call compiles (tens of seconds for a large model): say so, not a bar at 0%
      cached = jax.config.jax_compilation_cache_dir
      log.info("compiling the train step%s ...", f" (compilation cache: {cached})" if cached else "")
      t_compile = time.perf_counter()
    try:
      while step < self.total_steps:
        batch = self._global_batch(next(self._train_iter))
        self.state, metrics = self.train_step(self.state, batch)
        if compiling:  # jit compiles synchronously in the first call; the step itself runs on
          log.info("compiled in %.1f s", time.perf_counter() - t_compile)
          progress.start()
          compiling = False
        step += 1
        if pending is not None:
          self._consume(*pending, window, writer, progress, log_every)
        pending = (step, metrics)
        if on_step is not None:
          on_step(step)
        ckpt.check()  # a background save that failed (disk full, ...) stops the run here, at once
        stop = self._stop_requested(step)
        at_end = step == self.total_steps
        want_eval = evaluate and (at_end or (eval_every and step % eval_every == 0))
        want_save = at_end or stop or (ckpt_every and step % ckpt_every == 0)
        if want_eval or want_save:
          self._consume(*pending, window, writer, progress, log_every)
          pending = None
        if want_save:
          self._saving = stop or at_end
          self.save()
        if want_eval and not stop:
          ev = self.evaluate()
          writer.write("eval", step, ev)
          result.update(ev)
        if stop:
          result["preempted"] = True
          result["signal"] = signal.Signals(self._stop_signal).name if self._stop_signal else "SIGTERM"
          result["exit_status"] = exit_status(result["signal"])
          writer.write("preempted", step, {"signal": result["signal"]})
          break
      if pending is not None:
        self._consume(*pending, window, writer, progress, log_every)
      if start >= self.total_steps and evaluate:  # Nothing left to train: report the restored state.
        ev = self.evaluate()
        result.update(ev)
      self._saving = True
      ckpt.wait()  # the last save is complete (or its failure raised) before the signal handlers go
    except BaseException as e:
      lost = mesh_lib.peer_error(e, step) if isinstance(e, Exception) else None
      if lost is not None:  # a peer is gone: waiting for the checkpointer's cross-process barriers would hang
        raise lost from None
      try:
        ckpt.close()
      except Exception:  # pylint: disable=broad-except
        pass  # the error being raised says what went wrong; a second one from the same save adds nothing
      self._checkpointer = None
      raise
    finally:
      self._restore_signal_handlers(previous_handlers)
      self._stop_signal = None
      self._saving = False
      progress.close()
      writer.close()
    result.update({"step": step, "epoch": step / self.steps_per_epoch})
    if start < self.total_steps:
      result.update(self._last_train)
    return result

  def _consume(self, step: int, metrics, window: "_Window", writer: MetricsWriter, progress: Progress,
               log_every: int) -> None:
    """Reads a step's metrics (blocking), stops on non-finite values, logs every `log_every` steps."""
    m = jax.device_get(metrics)
    if not bool(m["finite"]):
      latest = self._ckpt().latest_step()
      kept = f"the last good checkpoint (step {latest}) is kept" if latest is not None else "no checkpoint saved"
      raise NonFiniteLossError(f"non-finite training loss at step {step} (loss={float(m['loss'])}, "
                               f"grad_norm={float(m['grad_norm'])}, lr={float(m['lr']):.3g}): stopped; {kept} "
                               f"in {os.path.join(self.workdir, 'checkpoints')}")
    window.add(m, self.batch_size)
    if step % log_every == 0 or step == self.total_steps:
      rec = window.flush(step, self.steps_per_epoch)
      self._last_train = {"train_loss": rec["loss"], "train_accuracy": rec["accuracy"],
                          "images_per_sec": rec["images_per_sec"]}
      writer.write("train", step, rec)
      progress.update(rec["steps"], rec["loss"], rec["accuracy"], rec["images_per_sec"])


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


def _summary_text(s: dict) -> str:
  return (f"RepOpt-VGG {s['arch']} ({s['mode']}), {s['params'] / 1e6:.3f}M params, "
          f"{s['macs_per_image'] / 1e9:.4f} GMACs/image at {s['image_size']}px, {s['num_classes']} classes; "
          f"{s['dataset']} ({s['train_examples']} train examples), optimizer {s['optimizer']}, "
          f"batch {s['batch_size']} on {s['devices']} {s['platform']} device(s) / {s['processes']} process(es), "
          f"{s['total_steps']} steps ({s['steps_per_epoch']} per epoch), compute {s['compute_dtype']}")
