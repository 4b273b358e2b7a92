"""A run's work directory after training: its config, evaluating it, and fusing a RepVGG run for deployment.

A run started by the CLI (or a `Trainer` with `write_config=True`) keeps its resolved config in
`<workdir>/config.json` (the layout: `repopt_jax.rundir`), so later commands need only the directory:

    from repopt_jax import runs
    runs.evaluate_run('/tmp/run')                       # {'eval_top1': ..., 'step': ...}
    runs.fuse_run('/tmp/repvgg_run', '/tmp/deploy')     # RepVGG -> plain target model checkpoint
    runs.evaluate_run('/tmp/deploy')                    # the same accuracy, one 3x3 conv per block
    model, config = runs.load_model('/tmp/run')         # the trained nnx model (eval mode), for your own code

Reading a run (`load_model`, `evaluate_run`, `fuse_run`'s source) is read-only: nothing is created, renamed
or deleted in it, no lock is taken, and it works on a read-only mount. `fuse_run` writes its output run under
that run's lock.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import numpy as np

from repopt_jax.config import Config, ConfigError, WorkdirError, load_config
from repopt_jax.rundir import CONFIG_FILE, RunDir

__all__ = ["CONFIG_FILE", "read_run_config", "load_model", "evaluate_run", "fuse_run"]


def read_run_config(workdir: str, overrides: Sequence[str] = ()) -> Config:
  """The config a run was started with (`<workdir>/config.json`), with overrides applied.

  Raises:
    WorkdirError: the directory holds no `config.json` (not a run started by the CLI).
  """
  return RunDir(workdir).read_config(overrides)


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
  run_dir = RunDir(workdir).check_exists()
  path = run_dir.path
  config = _resolve_config(run_dir, config, overrides)
  from repopt_jax.train.build import build_run  # pylint: disable=g-import-not-at-top
  from repopt_jax.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  ckpt = Checkpointer(run_dir.checkpoints, read_only=True)
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
    return RunDir(workdir).read_config(overrides)
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
  RunDir(workdir).check_exists()  # a mistyped path or a missing config fails before jax is imported
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
  saved as a checkpoint (same step, a fresh optimizer state, no data position) in `out_dir` with a
  target-mode config, so `evaluate_run(out_dir)` (or `repopt-jax eval`) and further training (`train
  --workdir out_dir`, which derives the data position from the step) work on it. The source run is only
  read; `out_dir` is written under its lock. The largest difference between the two models' logits on one
  test batch is reported.

  Args:
    workdir: a run directory whose config has `model.mode` 'repvgg'.
    out_dir: the deployment run directory (created; must hold no checkpoint yet).
    config: the run's config (default: its `config.json`).
    overrides: `section.key=value` strings for the run's config.
    compiler_options: XLA options for the steps built on the way.

  Returns:
    `{'step', 'params_train', 'params_deploy', 'max_abs_logit_diff', 'max_abs_logit', 'out_dir'}`.

  Raises:
    ConfigError: the run is not a RepVGG run. WorkdirError: no checkpoint, `out_dir` already holds one, or
    another process holds `out_dir`.
  """
  source_dir, out = RunDir(workdir).check_exists(), RunDir(out_dir)
  config = _resolve_config(source_dir, config, overrides)  # a mistyped path, or a run of another mode, fails
  if config.model.mode != "repvgg":                         # before jax is imported
    already = {"target": "a target-mode run is already plain",
               "csla": "a csla run's branches have constant scales; its plain model is trained by a RepOptimizer",
               "hs": "a Hyper-Search run gives scales (search), not a model to deploy"}.get(config.model.mode, "")
    raise ConfigError(f"fuse turns a RepVGG run into a plain model, but {workdir} has 'model.mode' = "
                      f"{config.model.mode!r}" + (f" ({already})" if already else ""))
  if out == source_dir:
    raise WorkdirError(f"fuse: the output directory must differ from the run directory {workdir}")
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from repopt_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from repopt_jax.models import count_params, reparam  # pylint: disable=g-import-not-at-top

  run, src_params, src_stats, step, _ = _open_run(source_dir, config, (), None, compiler_options)
  source = nnx.merge(run.graphdef, src_params, src_stats, run.rest)
  source.eval()
  fused = reparam.fuse_repvgg(source)
  # The same config as a plain model: a RepVGG run's optimizer is a plain one already.
  deploy_config = config.replace("model.mode=target", "scales=null")
  _write_fused_run(out, deploy_config, fused, step, run, compiler_options)

  d = config.data
  batch = next(iter(data_lib.make_iterator(d.dataset, d.eval_split, global_batch_size=run.eval_batch_size,
                                           train=False, seed=0, image_size=run.image_size,
                                           data_dir=d.data_dir, num_epochs=1)))
  x = jax.numpy.asarray(batch["image"])
  a, b = (np.asarray(_logits(m, x, compiler_options), np.float64) for m in (source, fused))
  return {"step": step, "params_train": count_params(source), "params_deploy": count_params(fused),
          "max_abs_logit_diff": float(np.max(np.abs(a - b))), "max_abs_logit": float(np.max(np.abs(a))),
          "out_dir": out.path}


def _write_fused_run(out: RunDir, config: Config, fused, step: int, source_run, compiler_options) -> None:
  """Writes the fused model as a run: a checkpoint of `step` (synchronously: complete when this returns),
  then its `config.json`; under the output run's lock, into a folder that holds no checkpoint."""
  import jax  # pylint: disable=g-import-not-at-top
  from repopt_jax.train.build import build_run  # pylint: disable=g-import-not-at-top
  from repopt_jax.train.checkpoint import Checkpointer, run_meta  # pylint: disable=g-import-not-at-top
  from repopt_jax.train.state import split_model  # pylint: disable=g-import-not-at-top

  # The train state of a plain run (its optimizer state is what a further training run resumes), holding the
  # fused params and statistics.
  deploy = build_run(config, mesh=source_run.mesh, dims=source_run.dims, compiler_options=compiler_options)
  _, params, batch_stats, _ = split_model(fused)
  state = deploy.state._replace(step=np.asarray(step, np.int32), params=params, batch_stats=batch_stats)
  main = jax.process_index() == 0
  out.check_not_a_file().create()
  with out.lock() if main else contextlib.nullcontext():  # other processes write under process 0's lock
    ckpt = Checkpointer(out.checkpoints, async_save=False)
    try:
      if ckpt.steps:
        raise WorkdirError(f"{out.path} already holds a checkpoint; fuse into an empty directory")
      ckpt.save(step, state, None, run_meta(config, deploy.dims, None))
    finally:
      ckpt.close()
    if main:
      out.write_config(config)

