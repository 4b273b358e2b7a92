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
import threading
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from repopt_jax.config import Config, ConfigError, load_config
from repopt_jax.train import mesh as mesh_lib
from repopt_jax.train import state as state_lib
from repopt_jax.train.checkpoint import Checkpointer
from repopt_jax.train.metrics import MetricsWriter, Progress
from repopt_jax.train.step import EvalStep, TrainStep

__all__ = ["Trainer", "NonFiniteLossError", "WorkdirError"]

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN/Inf loss, gradient or parameter; the run stopped without saving it."""


class WorkdirError(OSError):
  """The work directory cannot be created or written."""


def _check_workdir(workdir: str) -> str:
  """Creates `workdir` and proves it writable, or raises one clear `WorkdirError` before any training."""
  path = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
  probe = os.path.join(path, f".write_test.{os.getpid()}.{jax.process_index()}")
  try:
    os.makedirs(path, exist_ok=True)
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"work directory {path} cannot be written: {e.strerror or e}") from None
  return path


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

  Raises (before any training):
    ConfigError: an invalid config, clipping with a RepOptimizer, a batch size the devices cannot split.
    WorkdirError: `workdir` cannot be written.
    DatasetError: unknown or unprepared dataset (from `repopt_jax.data`).
    ScalesError: unreadable scales, or scales of another architecture.

  Example:
    >>> trainer = Trainer('digits_tiny', '/tmp/run', overrides=['train.epochs=1'])  # doctest: +SKIP
    >>> metrics = trainer.fit()          # doctest: +SKIP
    >>> metrics['eval_top1']             # doctest: +SKIP
  """

  def __init__(self, config: Config | str, workdir: str, *, overrides: Sequence[str] = (),
               devices: Optional[Sequence[jax.Device]] = None, progress: bool = True, tensorboard: bool = True,
               compiler_options: Optional[dict] = None):
    from repopt_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    from repopt_jax import load_scales  # pylint: disable=g-import-not-at-top
    from repopt_jax.models import count_params, flops  # pylint: disable=g-import-not-at-top

    if not isinstance(config, Config) or overrides:
      config = load_config(config, overrides)
    self.config = config
    mesh_lib.maybe_initialize_distributed()
    self.process_index, self.process_count = jax.process_index(), jax.process_count()
    self.is_main = self.process_index == 0
    self.workdir = _check_workdir(workdir)
    self.mesh = mesh_lib.make_mesh(devices)
    self._progress_enabled = progress and self.is_main
    self._tensorboard = tensorboard

    t, d = config.train, config.data
    n_dev = self.mesh.size
    self.batch_size = int(t.batch_size)
    self.eval_batch_size = int(t.eval_batch_size or t.batch_size)
    for key, value in (("train.batch_size", self.batch_size), ("train.eval_batch_size", self.eval_batch_size)):
      if value % n_dev:
        raise ConfigError(f"{key!r} = {value} is not divisible by the {n_dev} devices of the mesh "
                          f"({self.process_count} process(es)); use a multiple of {n_dev}")

    self.data = data_lib
    self.spec = data_lib.dataset_info(d.dataset, d.data_dir)
    self.num_classes = int(config.model.num_classes or self.spec.num_classes)
    self.image_size = int(d.image_size or self.spec.image_size)
    self.train_split = d.train_split
    self.eval_split = d.eval_split
    # The iterator is built here so that an unprepared dataset is reported before anything else happens.
    self._train_iter = self._make_iterator(self.train_split, train=True)
    train_size = self._split_size(self.train_split)
    self.steps_per_epoch = state_lib.steps_per_epoch(train_size, self.batch_size)
    self.total_steps = state_lib.total_steps(config, self.steps_per_epoch)

    self.scales = None
    if config.scales:
      self.scales, _ = load_scales(os.path.expanduser(config.scales))
    model = state_lib.build_model(config, self.scales, num_classes=self.num_classes,
                                  in_channels=self.spec.channels)
    self.schedule = state_lib.make_schedule(config, self.steps_per_epoch, self.total_steps)
    self.tx = state_lib.build_optimizer(config, model, self.scales, schedule=self.schedule)
    self.graphdef, state = state_lib.init_state(model, self.tx, int(t.seed))
    _, _, _, self._rest = state_lib.split_model(model)
    self.state = mesh_lib.put_replicated(state, self.mesh)
    self.train_step = TrainStep(self.graphdef, self._rest, self.tx, self.mesh, num_classes=self.num_classes,
                                label_smoothing=float(config.optim.label_smoothing), schedule=self.schedule,
                                compiler_options=compiler_options)
    self.eval_step = EvalStep(self.graphdef, self._rest, self.mesh, num_classes=self.num_classes,
                              compiler_options=compiler_options)

    self.summary = {
        "arch": config.model.arch if isinstance(config.model.arch, str) else str(config.model.arch),
        "mode": config.model.mode, "optimizer": config.optim.name, "params": count_params(model),
        "macs_per_image": flops(config.model.arch, self.image_size, self.num_classes, mode=config.model.mode,
                                in_channels=self.spec.channels),
        "image_size": self.image_size, "num_classes": self.num_classes, "dataset": d.dataset,
        "train_examples": train_size, "batch_size": self.batch_size, "steps_per_epoch": self.steps_per_epoch,
        "total_steps": self.total_steps, "devices": n_dev, "processes": self.process_count,
        "platform": self.mesh.devices.flat[0].platform, "compute_dtype": t.compute_dtype,
    }
    self._stop_signal: Optional[int] = None
    self._last_train: dict = {}
    self._checkpointer: Optional[Checkpointer] = None

  # ----------------------------------------------------------------------------------------------- data
  def _split_size(self, split: str) -> int:
    sizes = dict(self.spec.splits or {})
    if split not in sizes:
      sizes = dict(self.data.dataset_info(self.config.data.dataset, self.config.data.data_dir).splits or {})
    if split not in sizes:
      raise ConfigError(f"'data.train_split' / 'data.eval_split': dataset {self.spec.name!r} has no split "
                        f"{split!r} (splits: {', '.join(sizes) or 'unknown'})")
    return int(sizes[split])

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

  def restore(self) -> Optional[int]:
    """Restores the newest readable checkpoint of the workdir (state and data position); its step or None."""
    out = self._ckpt().restore(self.state, self._train_iter, self.mesh, check_meta=self._check_same_run)
    if out is None:
      return None
    self.state, meta = out
    self._last_train = dict(meta.get("train") or {})
    return self.step

  # Config keys a resumed run must share with the checkpoint (the state's structure and the data stream
  # depend on them); the rest (learning rate, epochs, logging, ...) may change between runs.
  _SAME_RUN_KEYS = ("model.arch", "model.mode", "model.num_classes", "data.dataset", "data.image_size",
                    "data.train_split", "optim.name", "train.batch_size", "train.seed", "train.compute_dtype")

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
                          f"{theirs!r} there and {mine[section][name]!r} here; use another workdir, or the "
                          "same value to resume")

  def save(self) -> None:
    """Checkpoints the current state and data position (blocking only for the device-to-host copy)."""
    meta = {"config": self.config.to_dict(), "train": self._last_train}
    self._ckpt().save(self.step, self.state, self._train_iter, meta)

  # ----------------------------------------------------------------------------------------------- signals
  def _install_signal_handlers(self):
    if threading.current_thread() is not threading.main_thread():
      return {}

    def handler(signum, frame):
      del frame
      if signum == signal.SIGINT and self._stop_signal is not None:
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
    sums = None
    for batch in self._make_iterator(self.eval_split, train=False):
      # The data layer pads the last batch to a whole global batch; `mask` marks the real examples.
      out = self.eval_step(self.state.params, self.state.batch_stats, self._global_batch(batch))
      sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
    if sums is None:
      raise ConfigError(f"'data.eval_split' = {self.eval_split!r} gave no batch")
    sums = jax.device_get(sums)
    n = float(sums["count"])
    return {"eval_top1": float(sums["top1"]) / n, "eval_top5": float(sums["top5"]) / n,
            "eval_loss": float(sums["loss"]) / n, "eval_examples": int(n)}

  def fit(self, on_step: Optional[Callable[[int], Any]] = None, evaluate: bool = True) -> dict:
    """Trains from the newest checkpoint (or from scratch) to `total_steps`; evaluates; returns metrics.

    Args:
      on_step: called as `on_step(step)` after every optimizer step (at the step boundary, before any
        save), e.g. for custom logging.
      evaluate: run the evaluations (every `train.eval_every` steps and at the end).

    Returns:
      `{'step', 'epoch', 'train_loss', 'train_accuracy', 'images_per_sec', 'eval_top1', 'eval_top5',
      'eval_loss', 'preempted', ...}` (eval keys when an evaluation ran at the end).

    Raises:
      NonFiniteLossError: a NaN/Inf loss, gradient or parameter; nothing from that step on was saved.
    """
    t = self.config.train
    writer = MetricsWriter(self.workdir, enabled=self.is_main, tensorboard=self._tensorboard)
    ckpt = self._ckpt()
    start = self.restore() or 0
    if start == 0:
      text = _summary_text(self.summary)
      log.info("%s", text)
      writer.write_text("summary", 0, text, **self.summary)
    else:
      writer.write("resume", start, {"from_step": start})
    progress = Progress(self.total_steps, start, enabled=self._progress_enabled)
    previous_handlers = self._install_signal_handlers()
    log_every, ckpt_every, eval_every = max(int(t.log_every), 1), int(t.checkpoint_every), int(t.eval_every)
    result: dict = {"preempted": False}
    window = _Window()
    pending = None  # (step, metrics on device) of the last dispatched step: read one step late.
    step = start
    try:
      while step < self.total_steps:
        batch = self._global_batch(next(self._train_iter))
        self.state, metrics = self.train_step(self.state, batch)
        step += 1
        if pending is not None:
          self._consume(*pending, window, writer, progress, log_every)
        pending = (step, metrics)
        if on_step is not None:
          on_step(step)
        stop = self._stop_requested(step)
        at_end = step == self.total_steps
        want_eval = evaluate and (at_end or (eval_every and step % eval_every == 0))
        want_save = at_end or stop or (ckpt_every and step % ckpt_every == 0)
        if want_eval or want_save:
          self._consume(*pending, window, writer, progress, log_every)
          pending = None
        if want_save:
          self.save()
        if want_eval and not stop:
          ev = self.evaluate()
          writer.write("eval", step, ev)
          result.update(ev)
        if stop:
          result["preempted"] = True
          result["signal"] = signal.Signals(self._stop_signal).name if self._stop_signal else "peer"
          writer.write("preempted", step, {"signal": result["signal"]})
          break
      if pending is not None:
        self._consume(*pending, window, writer, progress, log_every)
      if start >= self.total_steps and evaluate:  # Nothing left to train: report the restored state.
        ev = self.evaluate()
        result.update(ev)
    finally:
      self._restore_signal_handlers(previous_handlers)
      self._stop_signal = None
      progress.close()
      ckpt.wait()
      writer.close()
    result.update({"step": step, "epoch": step / self.steps_per_epoch, **self._last_train})
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
