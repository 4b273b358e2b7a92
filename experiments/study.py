"""The study the issue-11 experiments share: one network, one dataset, one recipe, runs kept on disk.

The paper's questions are asked of `B1_eighth` (RepOpt-VGG-B1's layout, 4/6/16/1 blocks, 28 conv layers and
23 identity blocks, at 1/8 of its widths) on Fashion-MNIST (60k/10k, 32x32 after padding, pad-crop + flip),
which a 2-core CPU trains at about 1,500 images/s. Every training run is a normal `Trainer` run directory
under a runs root (default `experiments/runs/`, not committed): a finished run is reused by every experiment
that needs it (the main comparison's RepOpt-VGG and plain VGG are the ablation's "full" and "none" rows, its
checkpoints are what the quantization study deploys), and an interrupted one resumes.

`--quick` (the test suite's size) swaps in the `tiny` network on the embedded digits for a few dozen steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import resource
import sys
import tempfile
import time
from typing import Dict, Optional, Sequence

import numpy as np

from experiments import common

DEFAULT_ROOT = os.path.join(common.HERE, "runs")
OFFICIAL_B1 = os.path.join(os.path.dirname(common.ROOT), "shared", "official_scales", "RepOpt-VGG-B1-scales.pth")


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What every run of the study shares (one optimizer recipe for all models, as in the paper)."""
  arch: str = "B1_eighth"
  dataset: str = "fashion_mnist"
  epochs: float = 2.0
  batch_size: int = 128
  lr: float = 0.1
  weight_decay: float = 4e-5
  warmup_epochs: float = 0.1
  search_epochs: float = 4.0
  search_grad_clip: float = 5.0
  eval_batch_size: int = 500
  steps: Optional[int] = None  # quick runs: a fixed step count instead of epochs
  search_steps: Optional[int] = None
  quick: bool = False

  def describe(self, search: bool = False) -> str:
    steps, epochs = (self.search_steps, self.search_epochs) if search else (self.steps, self.epochs)
    length = f"{steps} steps" if steps else f"{epochs:g} epochs"
    return (f"`{self.arch}` on `{self.dataset}`, {length}, batch {self.batch_size}, SGD Nesterov 0.9, lr "
            f"{self.lr:g} (warm-up {self.warmup_epochs:g} epoch, cosine), weight decay {self.weight_decay:g}")


FULL = Recipe()
QUICK = Recipe(arch="tiny", dataset="digits", batch_size=32, eval_batch_size=120, steps=80, search_steps=40,
               quick=True)

# The main comparison's three models: (mode, optimizer, uses the searched constants + Rule of Initialization).
MODELS = {
    "repopt": ("target", "repopt_sgd", True),
    "repvgg": ("repvgg", "sgd", False),
    "vgg": ("target", "sgd", False),
}
LABELS = {"repopt": "RepOpt-VGG", "repvgg": "RepVGG", "vgg": "plain VGG"}


def recipe(quick: bool) -> Recipe:
  return QUICK if quick else FULL


def begin(script: str, args, argv):
  """A study script's recipe, run info and runs root: `(recipe, info, root, temporary)`.

  `--quick` without `--root` trains in a temporary root (`temporary` True: the caller removes it); otherwise the
  root given, or `DEFAULT_ROOT`, which is never removed.
  """
  r = recipe(args.quick)
  info = common.RunInfo.collect(["python", f"experiments/{script}"] + list(sys.argv[1:] if argv is None else argv))
  temporary = bool(args.quick and args.root is None)
  root = args.root or (tempfile.mkdtemp(prefix=f"repopt_{script.split('.')[0]}_") if temporary else DEFAULT_ROOT)
  return r, info, root, temporary


def compiler_options(r: Recipe):
  return common.FAST_COMPILE if r.quick else None


def run_config(r: Recipe, *, mode: str, optim: str, seed: int, scales: Optional[str] = None, reinit: bool = True,
               search: bool = False):
  """The `Config` of one run of the study."""
  from repopt_jax.config import load_config  # pylint: disable=g-import-not-at-top
  steps = r.search_steps if search else r.steps
  length = {"steps": steps} if steps else {"epochs": r.search_epochs if search else r.epochs}
  return load_config({
      "model": {"arch": r.arch, "mode": mode, "reinit": bool(reinit)},
      "data": {"dataset": r.dataset},
      "optim": {"name": optim, "lr": r.lr, "weight_decay": r.weight_decay, "warmup_epochs": r.warmup_epochs,
                "grad_clip": r.search_grad_clip if search else None},
      "train": dict(length, batch_size=r.batch_size, seed=int(seed), eval_batch_size=r.eval_batch_size,
                    log_every=100, checkpoint_every=0, keep_checkpoints=1),
      "scales": scales,
  })


def cpu_seconds() -> float:
  """User + system CPU seconds of this process so far (every thread)."""
  u = resource.getrusage(resource.RUSAGE_SELF)
  return u.ru_utime + u.ru_stime


@contextlib.contextmanager
def run_lock(workdir: str):
  """Holds `<workdir>.lock` exclusively: two experiments asking for the same run train it once.

  The second one waits here until the first has finished, then finds its result.
  """
  os.makedirs(os.path.dirname(os.path.abspath(workdir)), exist_ok=True)
  with open(os.path.abspath(workdir) + ".lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def train(root: str, name: str, config, r: Recipe, log=print) -> Dict[str, float]:
  """Trains (or resumes, or reuses) the run `root/name`; returns its test metrics and timings.

  The result is kept in `root/name/result.json` with the config it belongs to, so a finished run costs
  nothing the next time any experiment asks for it; a run with a different config under the same name is
  refused by the `Trainer` (it will not resume a different trajectory).
  """
  with run_lock(os.path.join(root, name)):
    return _train(root, name, config, r, log)


def _train(root: str, name: str, config, r: Recipe, log=print) -> Dict[str, float]:
  from repopt_jax.train import Trainer  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(root, name)
  result_path = os.path.join(workdir, "result.json")
  want = json.loads(json.dumps(config.to_dict(), default=str))
  if os.path.exists(result_path):
    with open(result_path) as f:
      saved = json.load(f)
    if saved.get("config") == want:
      return saved["result"]
  t0, c0 = time.perf_counter(), cpu_seconds()
  trainer = Trainer(config, workdir, progress=False, tensorboard=False, compiler_options=compiler_options(r))
  m = trainer.fit()
  if m.get("preempted"):  # stopped by a signal: its checkpoint is kept, and no result is recorded for it
    raise SystemExit(f"{name}: stopped at step {m.get('step')} before the end; run the experiment again to resume it")
  wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
  epochs = float(m.get("epoch") or 0.0)
  ips = float(m.get("images_per_sec") or float("nan"))
  result = {"top1": float(m["eval_top1"]), "loss": float(m["eval_loss"]), "step": int(m["step"]),
            "epochs": epochs, "wall_s": wall, "cpu_s": cpu, "images_per_sec": ips,
            # Training throughput as the trainer measured it (compilation and evaluation excluded).
            "train_s_per_epoch": (float(m["step"]) * config.train.batch_size / max(epochs, 1e-9)) / ips
            if epochs and ips == ips else None,
            "resumed": m.get("resumed_from") is not None}
  with open(result_path, "w") as f:
    json.dump({"config": want, "result": result}, f, indent=1)
  log(f"{name}: top-1 {100 * result['top1']:.2f}% ({wall:.0f} s wall, {cpu:.0f} s CPU)")
  return result


def search_scales(root: str, r: Recipe, seed: int = 0, log=print) -> str:
  """Hyper-Search of the study's network on its dataset (run once, then reused); returns the scales file."""
  with run_lock(os.path.join(root, "hs")):
    return _search_scales(root, r, seed, log)


def _search_scales(root: str, r: Recipe, seed: int = 0, log=print) -> str:
  from repopt_jax.search import search  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(root, "hs")
  path = os.path.join(workdir, "scales.npz")
  cfg = run_config(r, mode="hs", optim="sgd", seed=seed, search=True)
  marker = os.path.join(workdir, "search.json")
  want = json.loads(json.dumps(cfg.to_dict(), default=str))
  if os.path.exists(path) and os.path.exists(marker):
    with open(marker) as f:
      if json.load(f).get("config") == want:
        return path
  t0, c0 = time.perf_counter(), cpu_seconds()
  res = search(cfg, workdir, scales_path=path, plots=False, progress=False, tensorboard=False,
               compiler_options=compiler_options(r))
  info = {"top1": float(res.metrics.get("eval_top1", float("nan"))), "step": int(res.metrics.get("step", 0)),
          "wall_s": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0}
  with open(marker, "w") as f:
    json.dump({"config": want, "result": info}, f, indent=1)
  log(f"Hyper-Search: top-1 {100 * info['top1']:.2f}% after {info['step']} steps ({info['wall_s']:.0f} s)")
  return path


def search_info(root: str) -> dict:
  with open(os.path.join(root, "hs", "search.json")) as f:
    return json.load(f)["result"]


def hs_init_scales(arch: str, in_channels: int) -> dict:
  """The Hyper-Search model's starting constants as `CSLAScales` per block: `s = t = hs_scale_init(i)`, gamma 1."""
  from repopt_jax import CSLAScales  # pylint: disable=g-import-not-at-top
  from repopt_jax.models import get_arch, hs_scale_init  # pylint: disable=g-import-not-at-top
  out = {}
  for spec in get_arch(arch).block_specs(in_channels):
    v = np.full(spec.out_channels, hs_scale_init(spec.index))
    out[spec.name] = CSLAScales(conv=v, pointwise=v, identity=spec.has_identity,
                                identity_init=np.ones(spec.out_channels) if spec.has_identity else None)
  return out


def official_block_means(arch: str, in_channels: int, path: str = OFFICIAL_B1) -> Optional[dict]:
  """The official B1 file's per-block channel means of s, t and gamma(0), broadcast onto `arch`'s channels.

  Returns None when the file is not there. The block names are the same for every B-layout network, so the
  mapping is by name; `arch` must have B1's block counts.
  """
  from repopt_jax import CSLAScales, load_scales  # pylint: disable=g-import-not-at-top
  from repopt_jax.models import get_arch  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    return None
  official, _ = load_scales(path)
  out = {}
  for spec in get_arch(arch).block_specs(in_channels):
    if spec.name not in official:
      raise ValueError(f"{path}: no block {spec.name!r} for {arch}; it needs B1's layout (4, 6, 16, 1)")
    o, c = official[spec.name], spec.out_channels
    mean = lambda v: np.full(c, float(np.mean(np.asarray(v, np.float64))))
    out[spec.name] = CSLAScales(conv=mean(o.conv), pointwise=mean(o.pointwise), identity=spec.has_identity,
                                identity_init=mean(o.identity_init) if spec.has_identity and o.identity_init
                                is not None else (np.ones(c) if spec.has_identity else None))
  return out


def model_config(r: Recipe, model: str, seed: int, scales: Optional[str]):
  mode, optim, uses_scales = MODELS[model]
  return run_config(r, mode=mode, optim=optim, seed=seed, scales=scales if uses_scales else None,
                    reinit=uses_scales)


def main_run_name(model: str, seed: int) -> str:
  return f"main/{model}_s{seed}"


def main_runs(root: str, r: Recipe, seeds: Sequence[int], models: Sequence[str] = tuple(MODELS), log=print):
  """Trains (or reuses) the main comparison's runs; returns `{model: [result per seed]}` and the scales file."""
  scales = search_scales(root, r, log=log)
  out = {m: [] for m in models}
  for seed in seeds:  # seeds outermost: an interrupted study still has whole seeds
    for m in models:
      out[m].append(train(root, main_run_name(m, seed), model_config(r, m, seed, scales), r, log=log))
  return out, scales


def t_interval(diffs, level: float = 0.95):
  """Mean and two-sided Student-t interval of paired differences: `(mean, low, high)` (NaN bounds for n < 2)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  d = np.asarray(diffs, np.float64)
  m = float(d.mean())
  if len(d) < 2:
    return m, float("nan"), float("nan")
  half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
  return m, m - half, m + half


def fmt_interval(mean, lo, hi, scale: float = 100.0, digits: int = 2) -> str:
  if lo != lo:
    return f"{scale * mean:+.{digits}f} (one seed)"
  return f"{scale * mean:+.{digits}f} [{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]"
