"""Hyper-Search: train the `hs` model, keep its scales as the RepOptimizer's constants, and picture them.

The paper's recipe (`configs/cifar100_hs.json`): the CSLA model with trainable branch scales `s`, `t` and
identity weights `gamma`, trained on CIFAR-100; the trained `s`, `t` become the constants of the Rule of
Iteration, and the trained `gamma` the identity part of the Rule of Initialization. `search` runs it with
the `Trainer`, writes the scales to a portable `.npz` (with the architecture it belongs to in the metadata),
and plots them.

    from repopt_jax.search import search
    result = search('digits_tiny_hs', '/tmp/hs')        # result.scales_path: /tmp/hs/scales.npz

The plots work on any scales dict, e.g. the official files: `plot_scales(load_scales('RepOpt-VGG-B1-scales.pth')[0],
'/tmp/b1')`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from repopt_jax.config import Config, ConfigError, load_config
from repopt_jax.scales import CSLAScales, save_scales

__all__ = ["SearchResult", "search", "scales_metadata", "scale_stats", "identity_variance_ratio",
           "plot_scales", "SCALES_FILE", "DISTRIBUTION_PNG", "IDENTITY_PNG"]

SCALES_FILE = "scales.npz"
DISTRIBUTION_PNG = "scales_distribution.png"
IDENTITY_PNG = "identity_variance_ratio.png"


@dataclasses.dataclass
class SearchResult:
  """What `search` produced.

  Attributes:
    scales_path: the written `.npz` file (`load_scales` / `train --scales` read it).
    scales: `{block_name: CSLAScales}` with the trained `s`, `t` and `gamma` (`identity_init`).
    metadata: the file's metadata (architecture, dataset, config, ...).
    metrics: the `Trainer.fit` metrics of the Hyper-Search run (`eval_top1`, ...).
    plots: paths of the PNGs written (empty when plotting was off).
    trainer: the `Trainer` that ran the search (`trainer.model()` is the trained hs model).
  """
  scales_path: str
  scales: dict
  metadata: dict
  metrics: dict
  plots: list
  trainer: Any = None


def scales_metadata(config: Config, *, in_channels: int, num_classes: int,
                    metrics: Optional[Mapping[str, Any]] = None) -> dict:
  """The metadata stored with searched scales: the architecture they belong to and how they were found.

  Args:
    config: the Hyper-Search run's config.
    in_channels: image channels of the dataset (the first block's input).
    num_classes: classes of the head.
    metrics: the run's final metrics (step and accuracies are kept).

  Returns:
    A JSON-serialisable dict: `source`, `arch` (name), `arch_config` (`num_blocks`, `widths`, `stem_width`,
    `strides`), `in_channels`, `num_classes`, `dataset`, `image_size`, `hs_init`, `config` (the whole
    config), `step`, `eval_top1`.

  Example:
    >>> meta = scales_metadata(load_config('digits_tiny_hs'), in_channels=1, num_classes=10)
    >>> meta['arch'], meta['arch_config']['widths'], meta['dataset'], meta['hs_init']
    ('tiny', [8, 16, 32, 64], 'digits', 'official')
  """
  from repopt_jax.models import family, get_arch  # pylint: disable=g-import-not-at-top

  metrics = dict(metrics or {})
  if family(config.model.arch) == "vgg":
    arch = get_arch(config.model.arch)
    name, arch_config = arch.name, {"num_blocks": list(arch.num_blocks), "widths": list(arch.widths),
                                    "stem_width": arch.stem_width, "strides": list(arch.strides)}
  else:  # any other architecture: its registered name says it all; scales are keyed by kernel paths
    name, arch_config = config.model.arch, None
  return {
      "source": "hyper-search",
      "arch": name,
      "arch_config": arch_config,
      "in_channels": int(in_channels),
      "num_classes": int(num_classes),
      "dataset": config.data.dataset,
      "image_size": config.data.image_size,
      "hs_init": config.model.hs_init,
      "config": config.to_dict(),
      "step": metrics.get("step"),
      "eval_top1": metrics.get("eval_top1"),
  }


def search(config: Config | str, workdir: str, *, overrides: Sequence[str] = (),
           scales_path: Optional[str] = None, plot_dir: Optional[str] = None, plots: bool = True,
           progress: bool = True, tensorboard: bool = True, compiler_options: Optional[dict] = None,
           on_step=None) -> SearchResult:
  """Hyper-Search: trains the `hs` model a config describes, then writes and plots its scales.

  Resumes from `workdir` like any `Trainer` run (a finished run only re-evaluates and rewrites the file).
  Everything is validated before anything is written: a refused search creates no directory and no
  `config.json`; the run's `config.json`, checkpoints, scales file and plots are written under its lock.

  Args:
    config: a `Config`, a shipped config name (`'cifar100_hs'`, `'digits_tiny_hs'`) or a JSON path; its
      `model.mode` must be 'hs'.
    workdir: the run's directory (checkpoints, metrics.jsonl).
    overrides: `section.key=value` strings.
    scales_path: where to write the scales (default `<workdir>/scales.npz`).
    plot_dir: where to write the PNGs (default `workdir`).
    plots: write `scales_distribution.png` and `identity_variance_ratio.png`.
    progress, tensorboard, compiler_options: passed to the `Trainer`.
    on_step: passed to `Trainer.fit`.

  Returns:
    A `SearchResult`.

  Raises:
    ConfigError: the config is not a Hyper-Search config (or is invalid); before any training. And every
      error the `Trainer` raises (dataset, work directory, non-finite loss).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from repopt_jax.models import registry  # pylint: disable=g-import-not-at-top
  from repopt_jax.train import Trainer  # pylint: disable=g-import-not-at-top

  if not isinstance(config, Config) or overrides:
    config = load_config(config, overrides)
  if config.model.mode != "hs":
    raise ConfigError(f"Hyper-Search trains the 'hs' model (trainable scales), but 'model.mode' = "
                      f"{config.model.mode!r}; use a Hyper-Search config (cifar100_hs, digits_tiny_hs) or set "
                      "model.mode=hs")
  # The config is written by the trainer once the run is validated, built and locked: a refused search leaves
  # no directory behind.
  trainer = Trainer(config, workdir, progress=progress, tensorboard=tensorboard, compiler_options=compiler_options,
                    write_config=True)
  with trainer.locked():  # the scales and plots go into the run directory too
    metrics = trainer.fit(on_step=on_step)
    model = trainer.model()
    # Official block names for RepOpt-VGG; the kernel paths of the original model for any other one.
    scales = registry.file_scales(config.model.arch, model)
    metadata = scales_metadata(config, in_channels=trainer.run.in_channels, num_classes=trainer.run.num_classes,
                               metrics=metrics)
    path = os.path.abspath(scales_path or trainer.run_dir.join(SCALES_FILE))
    written = []
    if jax.process_index() == 0:  # every process holds the same (replicated) scales; one writes them
      save_scales(path, scales, metadata)
      if plots:
        written = plot_scales(scales, plot_dir or trainer.workdir,
                              title=f"Hyper-Search scales of RepOpt-VGG-{metadata['arch']} on {metadata['dataset']}")
  return SearchResult(scales_path=path, scales=scales, metadata=metadata, metrics=metrics, plots=written,
                      trainer=trainer)


# ------------------------------------------------------------------------------------------------ statistics
def identity_variance_ratio(s: CSLAScales) -> Optional[float]:
  """The share of a CSLA block's output variance carried by its identity branch (None without one).

  With branch outputs of equal variance before scaling (as at initialisation), the variance of
  `s*conv3x3(x) + t*conv1x1(x) + gamma*x` splits per channel as `s^2 : t^2 : gamma^2`, so

  .. math::
    r = \\operatorname{mean}_c \\frac{\\gamma_c^2}{s_c^2 + t_c^2 + \\gamma_c^2}

  with `gamma` the trained identity weights (`identity_init`; 1 where the scales carry none). A ratio
  growing with depth means deeper blocks lean more on their shortcut (the paper's Fig. 4 reads the searched
  scales the same way).

  Example:
    >>> round(identity_variance_ratio(CSLAScales(conv=np.ones(2), pointwise=np.ones(2), identity=True)), 4)
    0.3333
  """
  if not s.identity:
    return None
  conv = np.asarray(s.conv, np.float64)
  point = np.zeros_like(conv) if s.pointwise is None else np.asarray(s.pointwise, np.float64)
  gamma = np.ones_like(conv) if s.identity_init is None else np.asarray(s.identity_init, np.float64)
  extra = sum((np.asarray(v, np.float64) ** 2 for _, v in s.extra), np.zeros_like(conv))
  return float(np.mean(gamma ** 2 / (conv ** 2 + point ** 2 + gamma ** 2 + extra)))


def scale_stats(scales: Mapping[str, CSLAScales]) -> list:
  """Per block, in order: `{'block', 'depth', 's', 't', 'gamma', 'identity_variance_ratio'}`.

  `s`, `t`, `gamma` are `{'mean', 'std', 'min', 'max'}` over the block's channels (`gamma` None without an
  identity branch; `gamma` = 1 for an identity branch without trained values); depth counts from 1.

  Example:
    >>> st = scale_stats({'stage0': CSLAScales(conv=np.array([1., 3.]), pointwise=np.array([2., 2.]))})
    >>> st[0]['block'], st[0]['s']['mean'], st[0]['t']['std'], st[0]['gamma']
    ('stage0', 2.0, 0.0, None)
  """
  def summary(v):
    v = np.asarray(v, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}

  out = []
  for depth, (name, s) in enumerate(scales.items(), start=1):
    gamma = None
    if s.identity:
      gamma = s.identity_init if s.identity_init is not None else np.ones(s.num_channels)
    out.append({"block": name, "depth": depth, "s": summary(s.conv),
                "t": None if s.pointwise is None else summary(s.pointwise),
                "gamma": None if gamma is None else summary(gamma),
                "identity_variance_ratio": identity_variance_ratio(s)})
  return out


# ------------------------------------------------------------------------------------------------ plots
def _figure(width: float, height: float):
  """A matplotlib figure drawn by the Agg canvas, without touching pyplot's global backend."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def plot_scales(scales: Mapping[str, CSLAScales], out_dir: str, title: Optional[str] = None) -> list:
  """Writes two PNGs into `out_dir`: the per-block distributions of `s`, `t`, `gamma`, and the identity
  variance ratio per depth.

  * `scales_distribution.png`: three rows of box plots (one box per block, in depth order) of the
    channel values of `s` (3x3 branch), `t` (1x1 branch) and `gamma` (identity weights, blocks with an
    identity branch only).
  * `identity_variance_ratio.png`: `identity_variance_ratio` against depth (blocks with an identity branch).

  Args:
    scales: `{block_name: CSLAScales}` in forward order (from `search`, `load_scales`, `scales_from_hs`).
    out_dir: the folder (created).
    title: a title for both figures.

  Returns:
    The two paths.
  """
  os.makedirs(out_dir, exist_ok=True)
  names = list(scales)
  depth = np.arange(1, len(names) + 1)
  rows = [("s (3x3 branch)", [np.asarray(scales[n].conv) for n in names]),
          ("t (1x1 branch)", [None if scales[n].pointwise is None else np.asarray(scales[n].pointwise)
                              for n in names]),
          ("gamma (identity)", [None if not scales[n].identity else np.asarray(
              scales[n].identity_init if scales[n].identity_init is not None else np.ones(scales[n].num_channels))
                                for n in names])]
  width = max(8.0, 0.38 * len(names) + 2.0)
  fig = _figure(width, 9.0)
  axes = fig.subplots(3, 1, sharex=True)
  for ax, (label, values) in zip(axes, rows):
    present = [(d, v) for d, v in zip(depth, values) if v is not None]
    if present:
      ax.boxplot([v for _, v in present], positions=[d for d, _ in present], widths=0.6, showfliers=True,
                 flierprops={"markersize": 2})
    ax.axhline(0.0, color="0.8", linewidth=0.8, zorder=0)
    ax.set_ylabel(label)
    ax.grid(axis="y", alpha=0.3)
  axes[-1].set_xticks(depth)
  axes[-1].set_xticklabels(names, rotation=90, fontsize=7)
  axes[-1].set_xlim(0.3, len(names) + 0.7)
  axes[-1].set_xlabel("block (depth order)")
  fig.suptitle(title or "CSLA scales per block")
  fig.tight_layout()
  dist_path = os.path.join(out_dir, DISTRIBUTION_PNG)
  fig.savefig(dist_path)

  ratios = [(d, identity_variance_ratio(scales[n])) for d, n in zip(depth, names)]
  ratios = [(d, r) for d, r in ratios if r is not None]
  fig = _figure(max(6.0, 0.25 * len(names) + 2.0), 3.8)
  ax = fig.subplots()
  if ratios:
    ax.plot([d for d, _ in ratios], [r for _, r in ratios], "o-", markersize=4)
    ax.set_xticks([d for d, _ in ratios])
    ax.set_xticklabels([names[d - 1] for d, _ in ratios], rotation=90, fontsize=7)
  ax.set_xlabel("depth (block with an identity branch)")
  ax.set_ylabel("identity variance ratio")
  ax.set_ylim(0.0, max([0.5] + [r * 1.1 for _, r in ratios]))
  ax.grid(alpha=0.3)
  ax.set_title((title + "\n" if title else "") + "identity variance ratio mean_c gamma^2 / (s^2 + t^2 + gamma^2)",
               fontsize=10)
  fig.tight_layout()
  ratio_path = os.path.join(out_dir, IDENTITY_PNG)
  fig.savefig(ratio_path)
  return [dist_path, ratio_path]
