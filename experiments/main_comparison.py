"""The paper's headline: RepOpt-VGG vs RepVGG vs plain VGG, same layout and recipe, over seeds.

Three models of the study's network (`experiments/study.py`: `B1_eighth` on Fashion-MNIST), trained with the
same schedule, data order and seed per row:

* **RepOpt-VGG**: the plain target model, Rule of Initialization + RepOpt-SGD with the Hyper-Searched constants;
* **RepVGG**: the multi-branch training-time model (3x3 + 1x1 + identity, each with BatchNorm) + SGD, fused
  for deployment;
* **plain VGG**: the same target model + SGD, no constants (the paper's "none" row).

Reported: test top-1 per seed, seed-paired differences with 95% t-intervals, and training time per epoch
(the trainer's images/s, compilation and evaluation excluded; wall and CPU time of each run as well).
Writes experiments/results/main_comparison.{md,json,png}.

Usage: python experiments/main_comparison.py [--seeds 0 1 2] [--root experiments/runs] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments import common, study  # noqa: E402

PAPER = {"repopt": 78.48, "repvgg": 78.42, "vgg": 76.91}  # ImageNet top-1, B1 (REPOPT.md; "none" of Fig. 7)
PAIRS = (("repopt", "repvgg"), ("repopt", "vgg"), ("repvgg", "vgg"))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--root", default=None, help="runs root (default experiments/runs; --quick: a temporary one)")
  p.add_argument("--out", default=common.RESULTS)
  p.add_argument("--quick", "--tiny", action="store_true", help="test-suite size: tiny net on digits, one seed")
  args = p.parse_args(argv)
  if args.quick and "--seeds" not in (sys.argv[1:] if argv is None else argv):
    args.seeds = [0]
  return args


def paired(results: dict, a: str, b: str) -> dict:
  d = np.asarray([x["top1"] for x in results[a]]) - np.asarray([x["top1"] for x in results[b]])
  mean, lo, hi = study.t_interval(d)
  return {"pair": f"{a}-{b}", "diffs": d.tolist(), "mean": mean, "low": lo, "high": hi,
          "wins": int(np.sum(d > 0)), "n": len(d)}


def plot(path: str, results: dict, diffs: list) -> None:
  plt = common.setup_matplotlib()
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4))
  models = list(results)
  for i, m in enumerate(models):
    v = 100 * np.asarray([x["top1"] for x in results[m]])
    ax.scatter(np.full(len(v), i), v, color="black", s=14, zorder=3, label="one seed" if i == 0 else None)
    mean, lo, hi = study.t_interval(v)
    if lo == lo:
      ax.errorbar(i + 0.15, mean, yerr=[[mean - lo], [hi - mean]], fmt="o", color="tab:blue", capsize=4,
                  label="mean, 95% t-interval" if i == 0 else None)
  ax.set_xticks(range(len(models)), [study.LABELS[m] for m in models])
  ax.set_ylabel("test top-1 % (points, not bars: no truncated axis)")
  ax.set_title("Test top-1 per seed")
  ax.legend(fontsize=8)
  for i, d in enumerate(diffs):
    v = 100 * np.asarray(d["diffs"])
    bx.scatter(np.full(len(v), i), v, color="black", s=14, zorder=3)
    if d["low"] == d["low"]:
      bx.errorbar(i + 0.15, 100 * d["mean"], yerr=[[100 * (d["mean"] - d["low"])], [100 * (d["high"] - d["mean"])]],
                  fmt="o", color="tab:blue", capsize=4)
  bx.axhline(0, color="k", lw=0.8)
  bx.set_xticks(range(len(diffs)), [" − ".join(study.LABELS[k] for k in d["pair"].split("-")) for d in diffs])
  bx.set_ylabel("seed-paired difference, points")
  bx.set_title("Paired differences (mean, 95% t-interval)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> dict:
  args = parse_args(argv)
  r, info, root, temporary = study.begin("main_comparison.py", args, argv)
  log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
  try:
    results, _ = study.main_runs(root, r, args.seeds, log=log)
    hs = study.search_info(root)
  finally:
    if temporary:
      shutil.rmtree(root, ignore_errors=True)
  diffs = [paired(results, a, b) for a, b in PAIRS]
  rows = []
  for m, res in results.items():
    v = 100 * np.asarray([x["top1"] for x in res])
    rows.append([study.LABELS[m]] + list(v) + [v.mean(), v.std(ddof=1) if len(v) > 1 else None,
                                               float(np.mean([x["train_s_per_epoch"] for x in res])),
                                               float(np.mean([x["cpu_s"] for x in res])), PAPER[m]])
  epoch = {m: float(np.mean([x["train_s_per_epoch"] for x in res])) for m, res in results.items()}
  body = [
      f"Every run: {r.describe()}; seeds {args.seeds} (the seed sets the init, the data order and the "
      f"augmentation, and is shared by the three models). RepOpt-VGG's constants: Hyper-Search of the same "
      f"network on the same data ({r.describe(search=True).split(', ')[2]}, "
      f"{hs['step']} steps; see hyper_search.md).",
      "## Test top-1\n\n" + common.md_table(
          ["model"] + [f"seed {s} %" for s in args.seeds]
          + ["mean %", "std %", "train s/epoch", "CPU s/run", "paper % (ImageNet B1)"], rows),
      "## Seed-paired differences (points, 95% t-interval)\n\n" + common.md_table(
          ["difference", "mean [95% interval]", "seeds where the first is better", "paper (ImageNet B1)"],
          [[" − ".join(study.LABELS[k] for k in d["pair"].split("-")),
            study.fmt_interval(d["mean"], d["low"], d["high"]), f"{d['wins']}/{d['n']}",
            f"{PAPER[d['pair'].split('-')[0]] - PAPER[d['pair'].split('-')[1]]:+.2f}"] for d in diffs]),
      f"Training time per epoch (trainer's own images/s): RepVGG / RepOpt-VGG = "
      f"{epoch['repvgg'] / epoch['repopt']:.2f}, plain VGG / RepOpt-VGG = {epoch['vgg'] / epoch['repopt']:.2f} "
      "(the cores are shared with other jobs; `speed_memory.md` measures speed properly).",
      "![top-1 and paired differences](main_comparison.png)",
  ]
  os.makedirs(args.out, exist_ok=True)
  plot(os.path.join(args.out, "main_comparison.png"), results, diffs)
  config = {"recipe": dataclasses.asdict(r), "seeds": args.seeds}
  common.write_markdown(os.path.join(args.out, "main_comparison.md"), "RepOpt-VGG vs RepVGG vs plain VGG", info,
                        config, "\n\n".join(body))
  out = {"info": vars(info), "config": config, "results": results, "diffs": diffs, "train_s_per_epoch": epoch,
         "search": hs}
  common.write_json(os.path.join(args.out, "main_comparison.json"), out)
  print("\n\n".join(body[1:4]))
  return out


if __name__ == "__main__":
  main()
