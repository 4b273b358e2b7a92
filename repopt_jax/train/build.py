"""Assembling a run from its config: one `build_run` for the trainer, `runs` (eval, fuse, load_model) and the
experiments. It validates everything a run needs (devices, dataset, splits, batch sizes, scales) before
building anything, and touches no file: creating the work directory is the trainer's business.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import numpy as np

from repopt_jax.config import Config, ConfigError
from repopt_jax.train import mesh as mesh_lib
from repopt_jax.train import state as state_lib
from repopt_jax.train.run_scales import RunScales, read_run_scales
from repopt_jax.train.step import EvalStep, TrainStep

__all__ = ["Run", "build_run"]


@dataclasses.dataclass
class Run:
  """What a config assembles to (see `build_run`). `tx`, `schedule`, `state` and `train_step` are None for an
  eval-only run (`train=False`), whose `params`/`batch_stats` are the model's initial ones."""
  config: Config
  mesh: Any
  spec: Any                   # the dataset's `DatasetSpec`
  num_classes: int
  in_channels: int
  image_size: int
  batch_size: int
  eval_batch_size: int
  train_size: Optional[int]
  steps_per_epoch: Optional[int]
  total_steps: Optional[int]
  scales: Optional[RunScales]         # read once and checked once against the model (None: no scales)
  scales_fingerprint: Optional[str]
  model: Any                  # the initialised nnx model (train mode)
  graphdef: Any
  rest: Any
  params: Any
  batch_stats: Any
  eval_step: EvalStep
  tx: Any = None
  schedule: Any = None
  state: Optional[state_lib.TrainState] = None   # replicated over `mesh`
  train_step: Optional[TrainStep] = None

  @property
  def dims(self) -> dict:
    """`{'num_classes', 'in_channels', 'image_size'}`: what a checkpoint records to rebuild the model."""
    return {"num_classes": self.num_classes, "in_channels": self.in_channels, "image_size": self.image_size}


def _split_size(spec, config: Config, split: str, key: str) -> int:
  sizes = dict(spec.splits or {})
  if split not in sizes:
    raise ConfigError(f"{key!r}: dataset {spec.name!r} has no split {split!r} "
                      f"(splits: {', '.join(sizes) or 'unknown'})")
  return int(sizes[split])


def build_run(config: Config, *, devices: Optional[Sequence[jax.Device]] = None, train: bool = True,
              compiler_options: Optional[dict] = None, mesh=None, dims: Optional[dict] = None,
              scales: Any = "config") -> Run:
  """The model, state, optimizer, schedule and train/eval steps a config describes; no file is touched.

  Validation comes first, so that a bad config fails before anything is built: batch sizes divisible by the
  devices, the dataset and its splits known, the global batch no larger than the train split, the scales
  file readable and usable (`read_run_scales`: the one read of the file) and fitting the model
  (`RunScales.for_dims`: the one check, before the model is built), then the model and the optimizer's
  own checks. The model, the optimizer, the `Run` and its checkpoints' fingerprint all use that one
  `RunScales`.

  Args:
    config: a validated `Config`.
    devices: the mesh's devices (default: all of them); ignored when `mesh` is given.
    train: also build the optimizer, schedule, train state and train step (False: eval only).
    compiler_options: XLA options for the steps.
    mesh: an existing mesh.
    dims: `{'num_classes', 'in_channels', 'image_size'}` known from a checkpoint (skips the dataset lookup
      for them).
    scales: a `RunScales` or `{name: CSLAScales}` already read, or "config" to read the config's scales
      file.

  Raises:
    ConfigError, DatasetError, ScalesError, ModelError: naming the offending key, file or block.
  """
  from repopt_jax import data as data_lib  # pylint: disable=g-import-not-at-top

  t, d = config.train, config.data
  mesh = mesh if mesh is not None else mesh_lib.make_mesh(devices)
  n_dev = mesh.size
  batch_size = int(t.batch_size)
  eval_batch_size = int(t.eval_batch_size or t.batch_size)
  keys = (("train.batch_size", batch_size),) if train else ()
  for key, value in keys + (("train.eval_batch_size", eval_batch_size),):
    if value % n_dev:
      raise ConfigError(f"{key!r} = {value} is not divisible by the {n_dev} devices of the mesh "
                        f"({jax.process_count()} process(es)); use a multiple of {n_dev}")
  spec = data_lib.dataset_info(d.dataset, d.data_dir) if dims is None or train else None
  if dims is not None:
    num_classes, in_channels, image_size = (int(dims["num_classes"]), int(dims["in_channels"]),
                                            int(dims["image_size"]))
  else:
    num_classes = int(config.model.num_classes or spec.num_classes)
    in_channels, image_size = int(spec.channels), int(d.image_size or spec.image_size)
  train_size = steps_per_epoch = total = None
  if train:
    train_size = _split_size(spec, config, d.train_split, "data.train_split")
    if batch_size > train_size:
      raise ConfigError(f"'train.batch_size' = {batch_size} is larger than the {train_size} examples of "
                        f"{d.dataset!r} split {d.train_split!r}: not one full batch per epoch; use at most "
                        f"{train_size}")
    steps_per_epoch = state_lib.steps_per_epoch(train_size, batch_size)
    total = state_lib.total_steps(config, steps_per_epoch)
  if isinstance(scales, str) and scales == "config":
    # An eval-only run needs the scales only where they are part of the model (csla): a trained RepOpt-VGG is
    # a plain model, evaluated even if its scales file has moved since.
    needed = train or config.model.mode == "csla"
    scales = read_run_scales(config) if needed else None
  elif scales is not None:
    scales = RunScales.of(scales, config.model.arch)
  if scales is not None and config.model.mode in ("target", "csla"):
    scales = scales.for_dims(num_classes, in_channels)  # ScalesError naming the block or kernel path
  fingerprint = None if scales is None else scales.fingerprint

  model_config = config
  if not train and config.model.mode == "target" and config.model.reinit:
    model_config = config.replace("model.reinit=false")  # the checkpoint replaces the initial params anyway
  model = state_lib.build_model(model_config, scales if (train or config.model.mode == "csla") else None,
                                num_classes=num_classes, in_channels=in_channels)
  graphdef, params, batch_stats, rest = state_lib.split_model(model)
  eval_step = EvalStep(graphdef, rest, mesh, num_classes=num_classes, compiler_options=compiler_options)
  run = Run(config=config, mesh=mesh, spec=spec, num_classes=num_classes, in_channels=in_channels,
            image_size=image_size, batch_size=batch_size, eval_batch_size=eval_batch_size, train_size=train_size,
            steps_per_epoch=steps_per_epoch, total_steps=total, scales=scales, scales_fingerprint=fingerprint,
            model=model, graphdef=graphdef, rest=rest, params=params, batch_stats=batch_stats,
            eval_step=eval_step)
  if train:
    run.schedule = state_lib.make_schedule(config, steps_per_epoch, total)
    run.tx = state_lib.build_optimizer(config, model, scales, schedule=run.schedule)
    _, state = state_lib.init_state(model, run.tx, int(t.seed))
    run.state = mesh_lib.put_replicated(state, mesh)
    run.train_step = TrainStep(graphdef, rest, run.tx, mesh, num_classes=num_classes,
                               label_smoothing=float(config.optim.label_smoothing), schedule=run.schedule,
                               compiler_options=compiler_options)
  return run


def evaluate(run: Run, params, batch_stats, split: Optional[str] = None, *, process_index: Optional[int] = None,
             process_count: Optional[int] = None) -> dict:
  """Top-1/top-5 accuracy and mean loss of `(params, batch_stats)` (replicated on `run.mesh`) on a split.

  Returns:
    `{'eval_top1', 'eval_top5', 'eval_loss', 'eval_examples'}`.
  """
  from repopt_jax import data as data_lib  # pylint: disable=g-import-not-at-top

  c = run.config
  split = split or c.data.eval_split
  sums = None
  it = data_lib.make_iterator(
      c.data.dataset, split, global_batch_size=run.eval_batch_size, train=False, seed=int(c.train.seed),
      image_size=run.image_size, data_dir=c.data.data_dir, num_epochs=1,
      process_index=jax.process_index() if process_index is None else process_index,
      process_count=jax.process_count() if process_count is None else process_count,
      dtype=c.train.compute_dtype)
  for batch in it:
    # The data layer pads the last batch to a whole global batch; `mask` marks the real examples.
    out = run.eval_step(params, batch_stats, data_lib.global_batch(batch, run.mesh))
    sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
  if sums is None:
    raise ConfigError(f"'data.eval_split' = {split!r} gave no batch")
  sums = jax.device_get(sums)
  n = float(sums["count"])
  return {"eval_top1": float(sums["top1"]) / n, "eval_top5": float(sums["top5"]) / n,
          "eval_loss": float(sums["loss"]) / n, "eval_examples": int(n)}


def as_numpy(tree):
  """Host NumPy copies of a pytree (replicated arrays: this process's replica)."""
  return jax.tree.map(np.asarray, mesh_lib.to_host(tree))
