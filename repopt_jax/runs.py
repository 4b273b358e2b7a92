"""A run's work directory after training: its config, evaluating it, and fusing a RepVGG run for deployment.

A run started by the CLI (or `write_run_config`) keeps its resolved config in `<workdir>/config.json`, so
later commands need only the directory:

    from repopt_jax import runs
    runs.evaluate_run('/tmp/run')                       # {'eval_top1': ..., 'step': ...}
    runs.fuse_run('/tmp/repvgg_run', '/tmp/deploy')     # RepVGG -> plain target model checkpoint
    runs.evaluate_run('/tmp/deploy')                    # the same accuracy, one 3x3 conv per block
    model, config = runs.load_model('/tmp/run')         # the trained nnx model (eval mode), for your own code

Reading a run (`load_model`, `evaluate_run`, `fuse_run`'s source) is read-only: nothing is created, renamed
or deleted in it, and it works on a read-only mount.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np

from repopt_jax.config import Config, ConfigError, load_config

__all__ = ["CONFIG_FILE", "write_run_config", "read_run_config", "load_model", "evaluate_run", "fuse_run"]

CONFIG_FILE = "config.json"


def write_run_config(config: Config, workdir: str) -> str:
  """Writes the resolved config to `<workdir>/config.json` (process 0 only); returns the path."""
  import jax  # pylint: disable=g-import-not-at-top
  from repopt_jax.train import WorkdirError  # pylint: disable=g-import-not-at-top

  path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), CONFIG_FILE)
  if jax.process_index() == 0:
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(config.to_dict(), f, indent=2)
      os.replace(path + ".tmp", path)
    except OSError as e:
      raise WorkdirError(f"work directory {os.path.dirname(path)} cannot be written: {e.strerror or e}") from None
  return path


def read_run_config(workdir: str, overrides: Sequence[str] = ()) -> Config:
  """The config a run was started with (`<workdir>/config.json`), with overrides applied.

  Raises:
    WorkdirError: the directory holds no `config.json` (not a run started by the CLI).
  """
  from repopt_jax.config import WorkdirError  # pylint: disable=g-import-not-at-top

  path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), CONFIG_FILE)
  if not os.path.isfile(path):
    raise WorkdirError(f"{workdir} holds no {CONFIG_FILE} (not a run directory written by repopt_jax); give the "
                       "run's config explicitly")
  return load_config(path, overrides)


def _run_dir(workdir: str) -> str:
  from repopt_jax.config import WorkdirError  # pylint: disable=g-import-not-at-top

  path = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
  if not os.path.exists(path):
    raise WorkdirError(f"run directory {workdir} does not exist")
  if not os.path.isdir(path):
    raise WorkdirError(f"run directory {workdir} is not a directory (give the folder a run was trained in)")
  return path


def _model_dims(config: Config, meta: Optional[dict]) -> tuple[int, int, int]:
  """`(num_classes, in_channels, image_size)` of a run: from its checkpoint, else from its dataset."""
  dims = (meta or {}).get("model") or {}
  if all(k in dims for k in ("num_classes", "in_channels", "image_size")):
    return int(dims["num_classes"]), int(dims["in_channels"]), int(dims["image_size"])
  from repopt_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  spec = data_lib.dataset_info(config.data.dataset, config.data.data_dir)
  return (int(config.model.num_classes or spec.num_classes), int(spec.channels),
          int(config.data.image_size or spec.image_size))


def _read_meta_only(ckpt, step: Optional[int]) -> Optional[dict]:
  steps = ckpt.steps if step is None else [step]
  for s in reversed(steps):
    try:
      return ckpt._read_meta(s)  # pylint: disable=protected-access
    except Exception:  # pylint: disable=broad-except
      continue
  return None


def _open_run(workdir: str, config, overrides, step: Optional[int], compiler_options=None, mesh=None):
  """`(run, params, batch_stats, step, path)`: a run's eval-only `build_run` with its checkpoint restored
  (replicated over the run's mesh), opened read-only."""
  from repopt_jax.config import WorkdirError  # pylint: disable=g-import-not-at-top

  path = _run_dir(workdir)
  config = _resolve_config(workdir, config, overrides)
  from repopt_jax.train.build import build_run  # pylint: disable=g-import-not-at-top
  from repopt_jax.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  ckpt = Checkpointer(os.path.join(path, "checkpoints"), read_only=True)
  try:
    if not ckpt.steps:
      raise WorkdirError(f"{path} holds no checkpoint (train it first)")
    meta = _read_meta_only(ckpt, step)
    dims = dict(zip(("num_classes", "in_channels", "image_size"), _model_dims(config, meta)))
    run = build_run(config, train=False, compiler_options=compiler_options, mesh=mesh, dims=dims)
    out = ckpt.restore({"params": run.params, "batch_stats": run.batch_stats, "step": np.zeros((), np.int32)},
                       mesh=run.mesh, step=step)
  finally:
    ckpt.close()
  if out is None:
    raise WorkdirError(f"{path} holds no checkpoint (train it first)")
  restored, _ = out
  return run, restored["params"], restored["batch_stats"], int(np.asarray(restored["step"].addressable_data(0))), path


def load_model(workdir: str, config: Config | str | None = None, *, overrides: Sequence[str] = (),
               step: Optional[int] = None):
  """A trained run's model, in eval mode, with the newest readable checkpoint restored.

  The run is opened read-only: nothing is created in its directory (it may be on a read-only mount), no
  optimizer and no data iterator are built. A checkpoint that cannot be read (or fails its checksums) is
  skipped with a `CheckpointWarning` and the previous one is used.

  Args:
    workdir: the run's directory (holding `config.json` and `checkpoints/`).
    config: the run's config (default: its `config.json`).
    overrides: `section.key=value` strings applied to it.
    step: restore this step instead of the newest one.

  Returns:
    `(model, config)`: an `nnx.Module` in eval mode (float32 params) and the run's `Config`.

  Raises:
    WorkdirError: no such directory, not a directory, no `config.json`, or no checkpoint.
    CheckpointError: there are checkpoints, but none can be read.

  Example:
    >>> model, config = load_model('runs/repopt')            # doctest: +SKIP
    >>> logits = model(images)                               # doctest: +SKIP
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  run, params, batch_stats, _, _ = _open_run(workdir, config, overrides, step)
  model = nnx.merge(run.graphdef, params, batch_stats, run.rest)
  model.eval()
  return model, run.config


def _resolve_config(workdir, config, overrides) -> Config:
  if config is None:
    return read_run_config(workdir, overrides)
  if not isinstance(config, Config) or overrides:
    return load_config(config, overrides)
  return config


def evaluate_run(workdir: str, config: Config | str | None = None, *, overrides: Sequence[str] = (),
                 compiler_options: Optional[dict] = None) -> dict:
  """Evaluates the newest checkpoint of a run on its `data.eval_split`, opening the run read-only.

  Args:
    workdir: the run's directory.
    config: the run's config (default: its `config.json`).
    overrides: `section.key=value` strings, e.g. `data.eval_split=train`.
    compiler_options: XLA options for the eval step.

  Returns:
    `{'eval_top1', 'eval_top5', 'eval_loss', 'eval_examples', 'step', 'mode', 'arch', 'params'}`.

  Raises:
    WorkdirError: no such directory, no config, or no checkpoint. CheckpointError: none can be read.
  """
  _run_dir(workdir)  # a mistyped path or a missing config fails before jax is imported
  config = _resolve_config(workdir, config, overrides)
  from repopt_jax.models import count_params  # pylint: disable=g-import-not-at-top
  from repopt_jax.train.build import evaluate  # pylint: disable=g-import-not-at-top

  run, params, batch_stats, step, _ = _open_run(workdir, config, (), None, compiler_options)
  out = evaluate(run, params, batch_stats)
  arch = run.config.model.arch
  out.update(step=step, mode=run.config.model.mode, arch=arch if isinstance(arch, str) else str(arch),
             params=count_params(run.model))
  return out


def _logits(model, x, compiler_options):
  """`model(x)` as one compiled program (eagerly, every op of the network would compile on its own)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  graphdef, state = nnx.split(model)
  return jax.jit(lambda st, x: nnx.merge(graphdef, st)(x), compiler_options=compiler_options)(state, x)


def fuse_run(workdir: str, out_dir: str, config: Config | str | None = None, *, overrides: Sequence[str] = (),
             compiler_options: Optional[dict] = None) -> dict:
  """Structural re-parameterization of a trained RepVGG run into a plain (target-mode) run directory.

  Every multi-branch block becomes one 3x3 conv (`repopt_jax.models.reparam.fuse_repvgg`); the result is
  saved as a checkpoint (same step) in `out_dir` with a target-mode config, so `evaluate_run(out_dir)` (or
  `repopt-jax eval`) and further training work on it. The largest difference between the two models'
  logits on one test batch is reported.

  Args:
    workdir: a run directory whose config has `model.mode` 'repvgg'.
    out_dir: the deployment run directory (created; must hold no checkpoint yet).
    config: the run's config (default: its `config.json`).
    overrides: `section.key=value` strings for the run's config.
    compiler_options: XLA options for the steps built on the way.

  Returns:
    `{'step', 'params_train', 'params_deploy', 'max_abs_logit_diff', 'max_abs_logit', 'out_dir'}`.

  Raises:
    ConfigError: the run is not a RepVGG run. WorkdirError: no checkpoint, or `out_dir` already holds one.
  """
  _run_dir(workdir)  # a mistyped path, or a run of another mode, fails before jax is imported
  config = _resolve_config(workdir, config, overrides)
  if config.model.mode != "repvgg":
    already = {"target": "a target-mode run is already plain",
               "csla": "a csla run's branches have constant scales; its plain model is trained by a RepOptimizer",
               "hs": "a Hyper-Search run gives scales (search), not a model to deploy"}.get(config.model.mode, "")
    raise ConfigError(f"fuse turns a RepVGG run into a plain model, but {workdir} has 'model.mode' = "
                      f"{config.model.mode!r}" + (f" ({already})" if already else ""))
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from repopt_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from repopt_jax.models import count_params, reparam  # pylint: disable=g-import-not-at-top
  from repopt_jax.train import Trainer, WorkdirError, split_model  # pylint: disable=g-import-not-at-top
  from repopt_jax.train.mesh import put_replicated  # pylint: disable=g-import-not-at-top

  if os.path.abspath(os.path.expanduser(out_dir)) == os.path.abspath(os.path.expanduser(workdir)):
    raise WorkdirError(f"fuse: the output directory must differ from the run directory {workdir}")
  run, src_params, src_stats, step, _ = _open_run(workdir, config, (), None, compiler_options)
  source = nnx.merge(run.graphdef, src_params, src_stats, run.rest)
  source.eval()
  fused = reparam.fuse_repvgg(source)

  # The deploy run: the same config as a plain model (a RepVGG run's optimizer is a plain one already); saved
  # synchronously so that the checkpoint is complete when this returns.
  deploy_config = config.replace("model.mode=target", "scales=null", "train.async_checkpointing=false")
  deploy = Trainer(deploy_config, out_dir, progress=False, tensorboard=False, compiler_options=compiler_options)
  if deploy.restore() is not None:
    raise WorkdirError(f"{deploy.workdir} already holds a checkpoint; fuse into an empty directory")
  _, params, batch_stats, _ = split_model(fused)
  deploy.state = deploy.state._replace(
      step=put_replicated(np.asarray(step, np.int32), deploy.mesh),
      params=put_replicated(params, deploy.mesh), batch_stats=put_replicated(batch_stats, deploy.mesh))
  deploy.save()
  write_run_config(deploy_config, out_dir)

  d = config.data
  batch = next(iter(data_lib.make_iterator(d.dataset, d.eval_split, global_batch_size=run.eval_batch_size,
                                           train=False, seed=0, image_size=run.image_size,
                                           data_dir=d.data_dir, num_epochs=1)))
  x = jax.numpy.asarray(batch["image"])
  a, b = (np.asarray(_logits(m, x, compiler_options), np.float64) for m in (source, fused))
  return {"step": step, "params_train": count_params(source), "params_deploy": count_params(fused),
          "max_abs_logit_diff": float(np.max(np.abs(a - b))), "max_abs_logit": float(np.max(np.abs(a))),
          "out_dir": deploy.workdir}
