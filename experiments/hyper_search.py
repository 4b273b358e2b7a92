"""Hyper-Search on Fashion-MNIST: how far the searched constants move, and their pattern along depth.

Runs (or reuses) the study's Hyper-Search (`experiments/study.py`: the `hs` model of `B1_eighth`, the
constants trainable, on Fashion-MNIST) and compares three sets of constants block by block:

* **init**: the `hs` model's starting values (`s = t = hs_scale_init(i)`, `gamma = 1`);
* **searched**: what Hyper-Search ended with;
* **official B1**: the released `RepOpt-VGG-B1-scales.pth` (ImageNet-sized model searched on CIFAR-100), whose
  per-block channel means map onto the same layout by block name (the study's second source of constants).

Reported: per block, the mean relative change of `s`, `t`, `gamma` from their init; the identity branch's
variance share `r = mean_c gamma^2 / (s^2 + t^2 + gamma^2)` (`repopt_jax.search.identity_variance_ratio`)
against depth for all three; and, per stage, the share of its first and last identity block and the rank
correlation of the share with the position in the stage. Writes experiments/results/hyper_search.{md,json,png}.

Usage: python experiments/hyper_search.py [--root experiments/runs] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments import common, study  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--root", default=None, help="runs root (default experiments/runs; --quick: a temporary one)")
  p.add_argument("--official", default=study.OFFICIAL_B1, help="the official B1 scales file (skipped if absent)")
  p.add_argument("--out", default=common.RESULTS)
  p.add_argument("--quick", "--tiny", action="store_true", help="test-suite size: tiny net on digits, 40 steps")
  return p.parse_args(argv)


def relative_change(new, old) -> float:
  """Mean over channels of |new - old| / |old|."""
  new, old = np.asarray(new, np.float64), np.asarray(old, np.float64)
  return float(np.mean(np.abs(new - old) / np.abs(old)))


def block_table(arch: str, in_channels: int, searched: dict, init: dict, official: dict = None) -> list:
  from repopt_jax.models import get_arch  # pylint: disable=g-import-not-at-top
  from repopt_jax.search import identity_variance_ratio  # pylint: disable=g-import-not-at-top
  rows = []
  for depth, spec in enumerate(get_arch(arch).block_specs(in_channels), start=1):
    s, i0 = searched[spec.name], init[spec.name]
    row = {"block": spec.name, "depth": depth, "stage": spec.stage, "index": spec.index,
           "identity": spec.has_identity, "s_init": float(np.mean(i0.conv)), "s": float(np.mean(s.conv)),
           "t": float(np.mean(s.pointwise)), "s_change": relative_change(s.conv, i0.conv),
           "t_change": relative_change(s.pointwise, i0.pointwise),
           "gamma": float(np.mean(s.identity_init)) if spec.has_identity else None,
           "gamma_change": relative_change(s.identity_init, i0.identity_init) if spec.has_identity else None,
           "share_init": identity_variance_ratio(i0), "share": identity_variance_ratio(s),
           "share_official": identity_variance_ratio(official[spec.name]) if official else None}
    rows.append(row)
  return rows


def stage_pattern(rows: list, key: str) -> list:
  """Per stage with identity blocks: (stage, share of its first identity block, of its last, Spearman rho)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  out = []
  for stage in sorted({r["stage"] for r in rows}):
    v = [r[key] for r in rows if r["stage"] == stage and r["identity"] and r[key] is not None]
    if len(v) >= 1:
      rho = float(stats.spearmanr(np.arange(len(v)), v).statistic) if len(v) >= 3 else None
      out.append((stage, len(v), v[0], v[-1], rho))
  return out


def plot(path: str, rows: list, has_official: bool) -> None:
  plt = common.setup_matplotlib()
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.2))
  series = [("share_init", "s:", "gray", "Hyper-Search init (ours)"),
            ("share", "o-", "tab:green", "searched on Fashion-MNIST (ours)")]
  if has_official:
    series.append(("share_official", "^--", "tab:red", "official B1 file (CIFAR-100)"))
  for n, stage in enumerate(sorted({r["stage"] for r in rows if r["identity"]})):
    ident = [r for r in rows if r["identity"] and r["stage"] == stage]  # one line per stage: no cross-stage links
    for key, style, color, label in series:
      ax.plot([r["depth"] for r in ident], [r[key] for r in ident], style, color=color, label=label if n == 0 else None)
  for stage in sorted({r["stage"] for r in rows})[1:]:
    first = min(r["depth"] for r in rows if r["stage"] == stage)
    ax.axvline(first - 0.5, color="k", lw=0.5, alpha=0.3)
  ax.set_ylim(0, 1)
  ax.set_xlabel("block depth (vertical lines: stage starts)")
  ax.set_ylabel("identity share: mean_c γ²/(s²+t²+γ²)")
  ax.set_title("Identity branch's variance share along depth")
  ax.legend(fontsize=8)
  dd = [r["depth"] for r in rows]
  for key, label, style in (("s_change", "s", "o-"), ("t_change", "t", "x-"), ("gamma_change", "gamma", "^-")):
    pts = [(r["depth"], r[key]) for r in rows if r[key] is not None and r[key] > 0]
    if pts:
      bx.plot(*zip(*pts), style, label=label)
  bx.set_yscale("log")
  bx.set_xlim(min(dd) - 0.5, max(dd) + 0.5)
  bx.set_xlabel("block depth")
  bx.set_ylabel("mean_c |searched - init| / init  (log)")
  bx.set_title("How far Hyper-Search moved each constant")
  bx.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def summarize(rows: list) -> dict:
  out = {}
  for key in ("s_change", "t_change", "gamma_change"):
    v = np.asarray([r[key] for r in rows if r[key] is not None])
    out[key] = {"median": float(np.median(v)), "max": float(v.max()), "min": float(v.min())}
  return out


def main(argv=None) -> dict:
  args = parse_args(argv)
  from repopt_jax import data, load_scales  # pylint: disable=g-import-not-at-top
  r, info, root, temporary = study.begin("hyper_search.py", args, argv)
  try:
    path = study.search_scales(root, r)
    run = study.search_info(root)
    searched, _ = load_scales(path)
  finally:
    if temporary:
      shutil.rmtree(root, ignore_errors=True)
  channels = data.dataset_info(r.dataset).channels
  official = None
  if r.arch == "B1_eighth" and os.path.exists(args.official):
    official = study.official_block_means(r.arch, channels, args.official)
  rows = block_table(r.arch, channels, searched, study.hs_init_scales(r.arch, channels), official)
  moved = summarize(rows)
  patterns = {k: stage_pattern(rows, k) for k in ("share_init", "share") + (("share_official",) if official else ())}
  table = common.md_table(
      ["block", "s init", "s", "t", "gamma", "|Δs|/s0", "|Δt|/t0", "|Δgamma|", "share init", "share",
       "share official B1"],
      [[x["block"], x["s_init"], x["s"], x["t"], x["gamma"], x["s_change"], x["t_change"], x["gamma_change"],
        x["share_init"], x["share"], x["share_official"]] for x in rows])
  names = {"share_init": "init", "share": "searched", "share_official": "official B1"}
  pattern_rows = [[names[k], st, n, first, last, rho] for k, v in patterns.items() for st, n, first, last, rho in v]
  body = [
      f"Hyper-Search: the `hs` model of {r.describe(search=True)}"
      f" (gradient clipping {r.search_grad_clip:g}); {run['step']} steps, its own test top-1 "
      f"{100 * run['top1']:.2f}%, {run['wall_s']:.0f} s wall / {run['cpu_s']:.0f} s CPU.",
      "## How far the constants moved from their init\n\n"
      + common.md_table(["constant", "median over blocks", "min", "max"],
                        [[k.split("_")[0], v["median"], v["min"], v["max"]] for k, v in moved.items()])
      + "\n\nEach entry is a block's mean over channels of |searched − init| / |init| (gamma's init is 1).",
      "## Identity share along each stage\n\n"
      + common.md_table(["constants", "stage", "identity blocks", "first", "last", "Spearman rho (position)"],
                        pattern_rows)
      + "\n\nThe official B1 file's pattern (small share in a stage's first identity block, rising along the "
        "stage) is partly built into the init: `s0^2 = 2/i` gives the i-th block a share of i/(i+4) before "
        "any search. What the search adds is the difference between the 'init' and 'searched' rows.",
      "## Per block\n\n" + table,
      "![identity share and distance from init](hyper_search.png)",
  ]
  if official is None:
    body.insert(1, f"The official B1 file ({args.official}) is not here (or the arch is not B1's layout): no "
                   "official column.")
  os.makedirs(args.out, exist_ok=True)
  plot(os.path.join(args.out, "hyper_search.png"), rows, official is not None)
  config = {"recipe": dataclasses.asdict(r), "official": args.official}
  common.write_markdown(os.path.join(args.out, "hyper_search.md"), "Hyper-Search: distance from init and the "
                        "identity pattern", info, config, "\n\n".join(body))
  result = {"info": vars(info), "config": config, "search": run, "moved": moved, "blocks": rows,
            "patterns": {k: [list(p) for p in v] for k, v in patterns.items()}}
  common.write_json(os.path.join(args.out, "hyper_search.json"), result)
  print("\n\n".join(body[:3]))
  return result


if __name__ == "__main__":
  main()
