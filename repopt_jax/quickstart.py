"""The quickstart: the whole method on the embedded digits, on a CPU, in a few minutes.

1. Hyper-Search: the `hs` model (trainable branch scales) is trained; its scales are written to a file.
2. RepOpt-VGG: the plain target model trained by RepOpt-SGD with those scales (Rule of Initialization +
   Rule of Iteration).
3. Two baselines with the same architecture, steps, schedule and seed: RepVGG (multi-branch blocks, plain
   SGD, fused into plain blocks for inference) and a plain VGG (target model, plain SGD, no scales).

Every run is a `Trainer` run of one base config (`configs/quickstart.json`, the plain VGG) with a few
overrides, so the runs differ only where the methods do. The results: a table (test accuracy, train
images/s, parameters at train and inference time) as Markdown and JSON, training curves and the scale plots.

    from repopt_jax.quickstart import quickstart
    result = quickstart('/tmp/qs')
    print(result.table)
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shutil
import time
from typing import Callable, Optional, Sequence

import numpy as np

from repopt_jax.config import Config, WorkdirError, load_config
from repopt_jax.rundir import RunDir

__all__ = ["QuickstartResult", "quickstart", "format_table", "plot_curves", "steady_images_per_sec", "RUNS",
           "HS_OVERRIDES", "DEFAULT_CONFIG", "DEFAULT_OUT"]

DEFAULT_CONFIG = "quickstart"
DEFAULT_OUT = "quickstart_out"
_MARKER = ".repopt_quickstart"

# The Hyper-Search run: the base config with trainable scales and the paper's HS gradient clipping.
HS_OVERRIDES = ("model.mode=hs", "optim.grad_clip=5.0", "scales=null")


@dataclasses.dataclass(frozen=True)
class _Run:
  key: str          # sub-folder of the output folder
  name: str         # row label
  overrides: tuple  # on top of the base config (`{scales}` is replaced by the searched scales file)


RUNS = (
    _Run("repopt_vgg", "RepOpt-VGG", ("model.mode=target", "optim.name=repopt_sgd", "optim.grad_clip=null",
                                      "scales={scales}")),
    _Run("repvgg", "RepVGG", ("model.mode=repvgg", "optim.name=sgd", "optim.grad_clip=null", "scales=null")),
    _Run("vgg", "VGG", ("model.mode=target", "optim.name=sgd", "optim.grad_clip=null", "scales=null")),
)
_HS = _Run("hs", "Hyper-Search (CSLA, trainable scales)", HS_OVERRIDES)


@dataclasses.dataclass
class QuickstartResult:
  """What `quickstart` produced.

  Attributes:
    rows: one dict per run (Hyper-Search, RepOpt-VGG, RepVGG, VGG): `name`, `mode`, `optimizer`,
      `eval_top1`, `images_per_sec`, `params_train`, `params_inference`, `train_seconds`, `steps`, `workdir`.
    table: the Markdown table of `rows` (what the CLI prints).
    files: `{'markdown', 'json', 'curves', 'scales', 'scales_distribution', 'identity_variance_ratio'}` paths.
    seconds: wall time of the whole quickstart.
    stopped: None, or `{'signal', 'exit_status', 'stage'}` when a signal (SIGTERM, SIGINT) stopped a run:
      the later runs did not start, and `rows` holds the finished ones only (`table` and `files` are
      empty).
  """
  rows: list
  table: str
  files: dict
  seconds: float
  stopped: Optional[dict] = None


def steady_images_per_sec(records: Sequence[dict]) -> Optional[float]:
  """Median training throughput of a run's `train` records, leaving out the first (it pays for compiling).

  None when there is no record after the first (a run too short to measure).

  Example:
    >>> steady_images_per_sec([{'kind': 'train', 'images_per_sec': 5.0}] +
    ...                       [{'kind': 'train', 'images_per_sec': v} for v in (90., 100., 300.)])
    100.0
  """
  values = [float(r["images_per_sec"]) for r in records if r.get("kind") == "train" and "images_per_sec" in r]
  if len(values) < 2:
    return None
  return float(np.median(values[1:]))


def format_table(rows: Sequence[dict]) -> str:
  """The results as a Markdown table (accuracy in %, throughput in images/s, parameters in thousands).

  Example:
    >>> print(format_table([{'name': 'VGG', 'mode': 'target', 'optimizer': 'sgd', 'eval_top1': 0.9,
    ...                      'images_per_sec': 1234.5, 'params_train': 37362, 'params_inference': 37362,
    ...                      'train_seconds': 12.0}]))
    | model | mode | optimizer | test top-1 (%) | train images/s | params train (k) | params inference (k) | train wall (s) |
    |---|---|---|---:|---:|---:|---:|---:|
    | VGG | target | sgd | 90.00 | 1234 | 37.36 | 37.36 | 12.0 |
  """
  head = ("| model | mode | optimizer | test top-1 (%) | train images/s | params train (k) | params inference (k) "
          "| train wall (s) |")
  lines = [head, "|---|---|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    ips = r.get("images_per_sec")
    lines.append(f"| {r['name']} | {r['mode']} | {r['optimizer']} | {100 * r['eval_top1']:.2f} | "
                 f"{'n/a' if ips is None else f'{ips:.0f}'} | {r['params_train'] / 1e3:.2f} | "
                 f"{r['params_inference'] / 1e3:.2f} | {r['train_seconds']:.1f} |")
  return "\n".join(lines)


def plot_curves(runs: Sequence[tuple], path: str, title: str = "") -> str:
  """Training curves of several runs from their `metrics.jsonl`: train loss and test top-1 against step.

  Args:
    runs: `(label, workdir)` pairs, or `(label, workdir, matplotlib line style)`.
    path: the PNG to write.
    title: the figure title.

  Returns:
    `path`.
  """
  from repopt_jax.search import _figure  # pylint: disable=g-import-not-at-top
  from repopt_jax.train import read_jsonl  # pylint: disable=g-import-not-at-top

  fig = _figure(12.0, 4.2)
  ax_loss, ax_acc = fig.subplots(1, 2)
  for run in runs:
    label, workdir = run[0], run[1]
    style = run[2] if len(run) > 2 else "-"
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], style, label=label, linewidth=1.2)
    ax_acc.plot([r["step"] for r in evals], [100 * r["eval_top1"] for r in evals], style, marker="o",
                markersize=3, label=label, linewidth=1.2)
  ax_loss.set_yscale("log")
  ax_loss.set(xlabel="step", ylabel="train loss (log)", title="training loss")
  ax_acc.set(xlabel="step", ylabel="test top-1 (%)", title="test accuracy")
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  return path


def _check_out(out: RunDir) -> None:
  """Refuses an output folder that holds anything but an earlier quickstart's files."""
  if os.path.isdir(out.path) and os.listdir(out.path) and not os.path.exists(out.join(_MARKER)):
    raise WorkdirError(f"output folder {out} is not empty and was not written by the quickstart; "
                       "choose another one with --out")


def _prepare_out(out: RunDir) -> None:
  """Clears the run folders of an earlier quickstart (under the output folder's lock) and marks the folder."""
  try:
    for run in (_HS,) + RUNS:  # every run starts from scratch (a run folder would otherwise be resumed)
      shutil.rmtree(out.join(run.key), ignore_errors=True)
    with open(out.join(_MARKER), "w", encoding="utf-8") as f:
      f.write("written by repopt_jax.quickstart; its run folders are replaced on every run\n")
  except OSError as e:
    raise WorkdirError(f"output folder {out} cannot be written: {e.strerror or e}") from None


def quickstart(out_dir: str = DEFAULT_OUT, *, config: Config | str = DEFAULT_CONFIG, overrides: Sequence[str] = (),
               progress: bool = False, tensorboard: bool = False, compiler_options: Optional[dict] = None,
               log: Optional[Callable[[str], None]] = None) -> QuickstartResult:
  """Runs Hyper-Search, RepOpt-VGG with the searched scales, and the RepVGG and VGG baselines; writes results.

  Args:
    out_dir: the output folder: one run folder per model (`hs`, `repopt_vgg`, `repvgg`, `vgg`; each with its
      `config.json`, so `repopt-jax eval/fuse --workdir` work on them), replaced on every call, and
      `results.md`, `results.json`, `curves.png`, `scales_distribution.png`, `identity_variance_ratio.png`.
    config: the base config (the plain VGG run), default `quickstart`; the other runs derive from it.
    overrides: `section.key=value` strings for the base config (e.g. `train.epochs=4`, `data.data_dir=...`).
    progress: show tqdm bars.
    tensorboard: write TensorBoard event files in the run folders.
    compiler_options: XLA options for the steps (e.g. `{'xla_backend_optimization_level': 0}` for very
      short runs).
    log: called with a one-line message at each stage (the CLI prints them).

  Returns:
    A `QuickstartResult` (with `stopped` set when SIGTERM/SIGINT stopped a run: the runs after it are not
    started).

  Raises:
    WorkdirError: `out_dir` is not empty and not an earlier quickstart's, or another process is running a
      quickstart into it; and the `Trainer`'s errors.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from repopt_jax.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None  # shared cores make images/s noisy
  base = config if isinstance(config, Config) and not overrides else load_config(config, overrides)
  out = RunDir(out_dir)
  _check_out(out)
  out.create()
  mesh_lib.maybe_initialize_distributed()  # process 0 (of every process of the run) locks the output folder
  with out.lock() if jax.process_index() == 0 else contextlib.nullcontext():
    _prepare_out(out)
    return _run_all(out, base, dict(progress=progress, tensorboard=tensorboard, compiler_options=compiler_options),
                    log or (lambda msg: None), start, load)


def _run_all(out: RunDir, base: Config, kw: dict, say: Callable[[str], None], start: float,
             load: Optional[float]) -> QuickstartResult:
  """The four runs, then the table, the curves and the result files."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from repopt_jax.models import RepOptVGG, count_params  # pylint: disable=g-import-not-at-top
  from repopt_jax import search as search_lib  # pylint: disable=g-import-not-at-top
  from repopt_jax.train import Trainer, read_jsonl  # pylint: disable=g-import-not-at-top

  rows, curves = [], []

  def stopped(stage: str, metrics: dict) -> QuickstartResult:
    signal_name = metrics.get("signal") or "SIGTERM"
    say(f"stopped by {signal_name} during {stage}; the runs after it were not started")
    return QuickstartResult(rows=rows, table="", files={}, seconds=time.perf_counter() - start,
                            stopped={"signal": signal_name, "exit_status": int(metrics.get("exit_status", 143)),
                                     "stage": stage})

  def row(run: _Run, trainer: Trainer, metrics: dict, seconds: float) -> dict:
    records = read_jsonl(trainer.run_dir.metrics_file)
    # Every model deploys as the plain target network: RepVGG after `reparam.fuse_repvgg`, Hyper-Search's
    # CSLA model after `reparam.target_from_csla` (both exact). Its size needs only the abstract model.
    c = trainer.config
    plain = nnx.eval_shape(lambda: RepOptVGG(c.model.arch, "target", num_classes=trainer.run.num_classes,
                                             in_channels=trainer.run.in_channels, rngs=nnx.Rngs(0)))
    return {"key": run.key, "name": run.name, "mode": c.model.mode, "optimizer": c.optim.name,
            "eval_top1": float(metrics["eval_top1"]), "images_per_sec": steady_images_per_sec(records),
            "params_train": int(trainer.summary["params"]), "params_inference": int(count_params(plain)),
            "train_seconds": float(seconds), "steps": int(metrics["step"]), "workdir": trainer.workdir}

  stage = "[1/4] Hyper-Search"
  say(f"{stage}: {base.model.arch} in mode 'hs' on {base.data.dataset} -> {out.join(_HS.key)}")
  t0 = time.perf_counter()
  found = search_lib.search(base.replace(*HS_OVERRIDES), out.join(_HS.key), plots=False, **kw)
  if found.metrics.get("preempted"):
    return stopped(stage, found.metrics)
  hs_seconds = time.perf_counter() - t0
  rows.append(row(_HS, found.trainer, found.metrics, hs_seconds))
  curves.append(("Hyper-Search (hs)", out.join(_HS.key), ":"))
  main_process = jax.process_index() == 0  # every process trains; one writes the reports
  if main_process:
    search_lib.plot_scales(found.scales, out.path, title=f"Hyper-Search scales, {base.model.arch} on {base.data.dataset}")

  for i, run in enumerate(RUNS, start=2):
    cfg = base.replace(*(o.format(scales=found.scales_path) for o in run.overrides))
    workdir, stage = out.join(run.key), f"[{i}/4] {run.name}"
    say(f"{stage}: mode {cfg.model.mode!r}, optimizer {cfg.optim.name!r} -> {workdir}")
    t0 = time.perf_counter()
    # config.json: `repopt-jax eval/fuse --workdir` work on the run folders.
    trainer = Trainer(cfg, workdir, write_config=True, **kw)
    metrics = trainer.fit()
    if metrics.get("preempted"):
      return stopped(stage, metrics)
    seconds = time.perf_counter() - t0
    rows.append(row(run, trainer, metrics, seconds))
    curves.append((run.name, workdir, "-"))

  title = (f"RepOpt-VGG-{base.model.arch} on {base.data.dataset}: {rows[-1]['steps']} steps, batch "
           f"{base.train.batch_size}, seed {base.train.seed}")
  curves_path = out.join("curves.png")
  if main_process:
    plot_curves(curves, curves_path, title=title)
  table = format_table(rows)
  seconds = time.perf_counter() - start
  devices = jax.devices()
  env = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
         "devices": f"{len(devices)} x {devices[0].platform}:{devices[0].device_kind}",
         "cpu_count": os.cpu_count(), "load_average_at_start": load, "python": platform.python_version(),
         "jax": jax.__version__}
  files = {"markdown": out.join("results.md"), "json": out.join("results.json"),
           "curves": curves_path, "scales": found.scales_path,
           "scales_distribution": out.join(search_lib.DISTRIBUTION_PNG),
           "identity_variance_ratio": out.join(search_lib.IDENTITY_PNG)}
  if main_process:
    with open(files["json"], "w", encoding="utf-8") as f:
      json.dump({"rows": rows, "config": base.to_dict(), "scales_metadata": found.metadata, "environment": env,
                 "seconds": seconds}, f, indent=2)
    with open(files["markdown"], "w", encoding="utf-8") as f:
      f.write(_markdown(base, table, env, seconds, files, out.path))
  say(f"done in {seconds:.0f} s; results in {out}")
  return QuickstartResult(rows=rows, table=table, files=files, seconds=seconds)


def _markdown(base: Config, table: str, env: dict, seconds: float, files: dict, out: str) -> str:
  t = base.train
  length = f"{t.steps} steps" if t.steps is not None else f"{t.epochs} epochs"
  rel = {k: os.path.relpath(v, out) for k, v in files.items()}
  return "\n".join([
      "# Quickstart results (generated by `repopt_jax.quickstart`)",
      "",
      f"RepOpt-VGG-{base.model.arch} on `{base.data.dataset}`: {length}, batch {t.batch_size}, lr "
      f"{base.optim.lr} ({base.optim.schedule}, {base.optim.warmup_epochs} warm-up epochs), weight decay "
      f"{base.optim.weight_decay}, seed {t.seed}; the same for every run.",
      f"Generated {env['date']} on {env['devices']} ({env['cpu_count']} CPU cores, load average "
      f"{env['load_average_at_start']} at the start), python {env['python']}, jax {env['jax']}; whole quickstart "
      f"{seconds:.0f} s.",
      "",
      table,
      "",
      "- *test top-1*: accuracy on the test split after the last step.",
      "- *train images/s*: median over the logged windows, without the first (compilation).",
      "- *params inference*: RepVGG after fusing its branches into one 3x3 conv per block "
      "(`reparam.fuse_repvgg`); Hyper-Search's equivalent plain model.",
      "- *train wall*: building the run, compiling and training (with its periodic evaluations).",
      "",
      f"Training curves: `{rel['curves']}`. Searched scales: `{rel['scales']}` (plots "
      f"`{rel['scales_distribution']}`, `{rel['identity_variance_ratio']}`).",
      "",
  ])
