"""A run's work directory after training: its config, evaluating it, and fusing a RepVGG run for deployment.

A run started by the CLI (or `write_run_config`) keeps its resolved config in `<workdir>/config.json`, so
later commands need only the directory:

    from repopt_jax import runs
    runs.evaluate_run('/tmp/run')                       # {'eval_top1': ..., 'step': ...}
    runs.fuse_run('/tmp/repvgg_run', '/tmp/deploy')     # RepVGG -> plain target model checkpoint
    runs.evaluate_run('/tmp/deploy')                    # the same accuracy, one 3x3 conv per block
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np

from repopt_jax.config import Config, ConfigError, load_config

__all__ = ["CONFIG_FILE", "write_run_config", "read_run_config", "evaluate_run", "fuse_run"]

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
  from repopt_jax.train import WorkdirError  # pylint: disable=g-import-not-at-top

  path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), CONFIG_FILE)
  if not os.path.isfile(path):
    raise WorkdirError(f"{workdir} holds no {CONFIG_FILE} (not a run directory written by repopt_jax); give the "
                       "run's config explicitly")
  return load_config(path, overrides)


def _restored_trainer(workdir: str, config, overrides, compiler_options):
  from repopt_jax.train import Trainer, WorkdirError  # pylint: disable=g-import-not-at-top

  if not os.path.isdir(os.path.expanduser(workdir)):
    raise WorkdirError(f"run directory {workdir} does not exist")
  if config is None:
    config = read_run_config(workdir, overrides)
  elif not isinstance(config, Config) or overrides:
    config = load_config(config, overrides)
  trainer = Trainer(config, workdir, progress=False, tensorboard=False, compiler_options=compiler_options)
  step = trainer.restore()
  if step is None:
    raise WorkdirError(f"{trainer.workdir} holds no readable checkpoint (train it first)")
  return trainer, step


def evaluate_run(workdir: str, config: Config | str | None = None, *, overrides: Sequence[str] = (),
                 compiler_options: Optional[dict] = None) -> dict:
  """Evaluates the newest checkpoint of a run on its `data.eval_split`.

  Args:
    workdir: the run's directory.
    config: the run's config (default: its `config.json`).
    overrides: `section.key=value` strings, e.g. `data.eval_split=train`.
    compiler_options: XLA options for the eval step.

  Returns:
    `{'eval_top1', 'eval_top5', 'eval_loss', 'eval_examples', 'step', 'mode', 'arch', 'params'}`.

  Raises:
    WorkdirError: no such directory, no config, or no checkpoint; and the `Trainer`'s errors.
  """
  trainer, step = _restored_trainer(workdir, config, overrides, compiler_options)
  out = trainer.evaluate()
  out.update(step=step, mode=trainer.config.model.mode, arch=trainer.summary["arch"],
             params=trainer.summary["params"])
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
  import jax  # pylint: disable=g-import-not-at-top
  from repopt_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from repopt_jax.models import count_params, reparam  # pylint: disable=g-import-not-at-top
  from repopt_jax.train import Trainer, WorkdirError, split_model  # pylint: disable=g-import-not-at-top
  from repopt_jax.train.mesh import put_replicated  # pylint: disable=g-import-not-at-top

  if config is None:
    config = read_run_config(workdir, overrides)
  elif not isinstance(config, Config) or overrides:
    config = load_config(config, overrides)
  if config.model.mode != "repvgg":
    raise ConfigError(f"fuse turns a RepVGG run into a plain model, but {workdir} has 'model.mode' = "
                      f"{config.model.mode!r} (a target-mode run is already plain)")
  if os.path.abspath(os.path.expanduser(out_dir)) == os.path.abspath(os.path.expanduser(workdir)):
    raise WorkdirError(f"fuse: the output directory must differ from the run directory {workdir}")
  trainer, step = _restored_trainer(workdir, config, (), compiler_options)
  source = trainer.model()
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
  batch = next(iter(data_lib.make_iterator(d.dataset, d.eval_split, global_batch_size=trainer.eval_batch_size,
                                           train=False, seed=0, image_size=trainer.image_size,
                                           data_dir=d.data_dir, num_epochs=1)))
  x = jax.numpy.asarray(batch["image"])
  a, b = (np.asarray(_logits(m, x, compiler_options), np.float64) for m in (source, fused))
  return {"step": step, "params_train": count_params(source), "params_deploy": count_params(fused),
          "max_abs_logit_diff": float(np.max(np.abs(a - b))), "max_abs_logit": float(np.max(np.abs(a))),
          "out_dir": deploy.workdir}
