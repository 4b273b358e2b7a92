"""Ablation of RepOptimizer's constants (the paper's Fig. 7) at a scale where the differences can show.

The study's network and data (`experiments/study.py`: `B1_eighth`, 28 conv layers and 23 identity blocks,
on Fashion-MNIST), Hyper-Searched once on the same data, then trained with the same recipe, one row per
variant and seeds paired across rows:

==============  ==================================================================================
row             what differs
==============  ==================================================================================
full            HS constants, Rule of Initialization + Grad Mult (RepOpt-SGD): the method
mask_only       HS constants, Grad Mult only (the target model keeps its default initialisation)
reinit_only     HS constants, Rule of Initialization only, then plain SGD
none            no constants: the plain VGG with plain SGD
ones            all constants 1 (s = t = 1, gamma(0) = 1), re-init + Grad Mult
hs_init         the HS model's initial constants (`hs_scale_init`, gamma(0) = 1), re-init + Grad Mult
channel_avg     HS constants averaged over the channels of each block, re-init + Grad Mult
official_b1     the official B1 file's per-block channel means (searched on CIFAR-100 for the full-width
                B1) mapped onto the same blocks, re-init + Grad Mult (not in the paper)
==============  ==================================================================================

"full" and "none" are the main comparison's RepOpt-VGG and plain-VGG runs (same configs, reused). A pilot
comes first: seed 0 of full, none and RepVGG, to check that the method's effect is resolvable here before
the rows are run over every seed. Reported: top-1 per row and seed, full minus each row paired by seed with
95% t-intervals, and whether the paper's ordering reproduces. Writes experiments/results/ablation.{md,json,png}.

Usage: python experiments/ablation.py [--seeds 0 1 2] [--rows ...] [--root experiments/runs] [--quick]
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

ROWS = (  # key, label, optimizer, constants, re-init, paper's RepOpt-VGG-B1 ImageNet top-1 (None: not in it)
    ("full", "HS constants, re-init + masks (full method)", "repopt_sgd", "hs", True, 78.48),
    ("mask_only", "HS constants, masks only", "repopt_sgd", "hs", False, 77.42),
    ("reinit_only", "HS constants, re-init only", "sgd", "hs", True, 77.07),
    ("none", "no constants (plain VGG, SGD)", "sgd", None, False, 76.91),
    ("ones", "all-ones constants", "repopt_sgd", "ones", True, 77.59),
    ("hs_init", "constants = HS initialisation", "repopt_sgd", "hs_init", True, 77.71),
    ("channel_avg", "channel-averaged HS constants", "repopt_sgd", "channel_avg", True, 77.40),
    ("official_b1", "official B1 file's block means", "repopt_sgd", "official_b1", True, None),
)
REUSED = {"full": "repopt", "none": "vgg"}  # rows that are main-comparison runs
PILOT_GAP = 1.0  # points: the pilot's full - none gap must exceed this for the rows to be worth running


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--rows", nargs="+", default=[r[0] for r in ROWS], choices=[r[0] for r in ROWS])
  p.add_argument("--root", default=None, help="runs root (default experiments/runs; --quick: a temporary one)")
  p.add_argument("--official", default=study.OFFICIAL_B1, help="official B1 scales file (row skipped if absent)")
  p.add_argument("--out", default=common.RESULTS)
  p.add_argument("--quick", "--tiny", action="store_true", help="test-suite size: tiny net on digits, one seed")
  args = p.parse_args(argv)
  if args.quick and "--seeds" not in (sys.argv[1:] if argv is None else argv):
    args.seeds = [0]
  return args


def variant_scales(kind: str, searched: dict, arch, in_channels: int) -> dict:
  """The constants of a row: searched ('hs'), all ones, the HS initialisation, or channel-averaged HS."""
  from repopt_jax import CSLAScales  # pylint: disable=g-import-not-at-top
  from repopt_jax.models import get_arch  # pylint: disable=g-import-not-at-top

  if kind == "hs":
    return searched
  if kind == "hs_init":
    return study.hs_init_scales(arch, in_channels)
  out = {}
  for spec in get_arch(arch).block_specs(in_channels):
    c, ident = spec.out_channels, spec.has_identity
    if kind == "ones":
      out[spec.name] = CSLAScales(conv=np.ones(c), pointwise=np.ones(c), identity=ident,
                                  identity_init=np.ones(c) if ident else None)
    elif kind == "channel_avg":
      s = searched[spec.name]
      avg = lambda x: np.full(c, float(np.mean(x)))
      out[spec.name] = CSLAScales(conv=avg(s.conv), pointwise=avg(s.pointwise), identity=ident,
                                  identity_init=avg(s.identity_init) if ident and s.identity_init is not None
                                  else (np.ones(c) if ident else None))
    else:
      raise ValueError(f"unknown constants {kind!r}")
  return out



def row_config(r, row: tuple, seed: int, scales_path):
  """The run config of a row (the same as the main comparison's run for 'full' and 'none')."""
  key, _, optim, kind, reinit, _ = row
  return study.run_config(r, mode="target", optim=optim, seed=seed, scales=scales_path if kind else None,
                          reinit=reinit)


def verdict(mean: float, lo: float, hi: float) -> str:
  """What a 95% interval of `full - row` says about the paper's 'full is better'."""
  if lo != lo:
    return "one seed: no interval"
  if lo > 0:
    return "yes: full is better"
  if hi < 0:
    return "no: the row is better"
  return "not resolved (interval spans 0)"


def plot(path: str, gaps: list) -> None:
  plt = common.setup_matplotlib()
  fig, ax = plt.subplots(figsize=(10, 4.2))
  for i, g in enumerate(gaps):
    v = 100 * np.asarray(g["diffs"])
    ax.scatter(np.full(len(v), i), v, color="black", s=14, zorder=3, label="one seed" if i == 0 else None)
    if g["low"] == g["low"]:
      ax.errorbar(i + 0.12, 100 * g["mean"], yerr=[[100 * (g["mean"] - g["low"])], [100 * (g["high"] - g["mean"])]],
                  fmt="o", color="tab:blue", capsize=4, label="mean, 95% t-interval" if i == 0 else None)
    if g["paper"] is not None:
      ax.scatter([i - 0.12], [g["paper"]], marker="x", color="tab:red", s=40, zorder=4,
                 label="paper (ImageNet B1)" if i == 0 else None)
  ax.axhline(0, color="k", lw=0.8)
  ax.set_xticks(range(len(gaps)), [g["row"] for g in gaps], rotation=15)
  ax.set_ylabel("full − row, points (paired by seed)")
  ax.set_title("Ablation of the constants (Fig. 7): how much the full method beats each row")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> dict:
  args = parse_args(argv)
  from repopt_jax import data, load_scales, save_scales  # pylint: disable=g-import-not-at-top

  r, info, root, temporary = study.begin("ablation.py", args, argv)
  log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
  channels = data.dataset_info(r.dataset).channels
  rows = [row for row in ROWS if row[0] in args.rows]
  official = study.official_block_means(r.arch, channels, args.official) if r.arch == "B1_eighth" else None
  if official is None and any(row[3] == "official_b1" for row in rows):
    log(f"no official B1 constants for {r.arch} ({args.official}): the official_b1 row is skipped")
    rows = [row for row in rows if row[3] != "official_b1"]
  try:
    searched_path = study.search_scales(root, r, log=log)
    searched, _ = load_scales(searched_path)
    paths = {"hs": searched_path}
    os.makedirs(os.path.join(root, "ablation"), exist_ok=True)
    for kind in sorted({row[3] for row in rows if row[3] and row[3] != "hs"}):
      paths[kind] = os.path.join(root, "ablation", f"scales_{kind}.npz")
      scales = official if kind == "official_b1" else variant_scales(kind, searched, r.arch, channels)
      # Written aside and renamed: another experiment may be reading the same file right now.
      save_scales(paths[kind] + f".{os.getpid()}.npz", scales, {"arch": r.arch, "variant": kind})
      os.replace(paths[kind] + f".{os.getpid()}.npz", paths[kind])

    def run(row, seed):
      name = study.main_run_name(REUSED[row[0]], seed) if row[0] in REUSED else f"ablation/{row[0]}_s{seed}"
      return study.train(root, name, row_config(r, row, seed, paths.get(row[3])), r, log=log)

    # The pilot: is the method's effect resolvable at this scale at all?
    s0 = args.seeds[0]
    pilot = {"full": run(ROWS[0], s0)["top1"], "none": run(ROWS[3], s0)["top1"],
             "repvgg": study.train(root, study.main_run_name("repvgg", s0),
                                   study.model_config(r, "repvgg", s0, searched_path), r, log=log)["top1"]}
    pilot_gap = 100 * (pilot["full"] - pilot["none"])
    log(f"pilot (seed {s0}): full {100 * pilot['full']:.2f}%, none {100 * pilot['none']:.2f}%, RepVGG "
        f"{100 * pilot['repvgg']:.2f}%: full - none = {pilot_gap:+.2f} points")
    table = {row[0]: [] for row in rows}
    results = {row[0]: [] for row in rows}
    hs = study.search_info(root)
    done = []
    for seed in args.seeds:  # seeds outermost: an interrupted run still has whole seeds for every row
      for row in rows:
        res = run(row, seed)
        table[row[0]].append(res["top1"])
        results[row[0]].append(res)
      done.append(seed)
      out = write_report(args, r, info, rows, done, table, results, pilot, hs, official is not None)
  finally:
    if temporary:
      shutil.rmtree(root, ignore_errors=True)
  print("\n\n".join(out["body"][1:4]))
  return out


def write_report(args, r, info, rows, seeds, table, results, pilot, hs, has_official) -> dict:
  """Writes ablation.{md,json,png} for the whole seeds finished so far; returns the JSON payload."""
  full = np.asarray(table["full"]) if "full" in table else None
  gaps = []
  for key, label, _, _, _, paper in rows:
    if key == "full" or full is None:
      continue
    d = full - np.asarray(table[key])
    mean, lo, hi = study.t_interval(d)
    gaps.append({"row": key, "label": label, "diffs": d.tolist(), "mean": mean, "low": lo, "high": hi,
                 "wins": int(np.sum(d > 0)), "n": len(d), "verdict": verdict(mean, lo, hi),
                 "paper": None if paper is None else round(ROWS[0][5] - paper, 2)})
  out_rows = []
  for key, label, *_rest, paper in rows:
    v = 100 * np.asarray(table[key])
    out_rows.append([label] + list(v) + [v.mean(), v.std(ddof=1) if len(v) > 1 else None, paper])
  body = [
      f"Every row: {r.describe()}; seeds {seeds} (of {args.seeds} asked), paired across rows (same init draw, data order and "
      f"augmentation). HS constants: Hyper-Search of the same network on the same data ({hs['step']} steps; "
      "hyper_search.md).",
      f"## Pilot (seed {seeds[0]}): is the effect resolvable here?\n\n"
      + common.md_table(["run", "top-1 %"], [["full method (RepOpt-VGG)", 100 * pilot["full"]],
                                             ["none (plain VGG)", 100 * pilot["none"]],
                                             ["RepVGG", 100 * pilot["repvgg"]]])
      + f"\n\nfull − none = {100 * (pilot['full'] - pilot['none']):+.2f} points (the paper: +1.57). "
      + (f"That is more than the {PILOT_GAP:g} points asked of the pilot, so the rows were run over every seed."
         if 100 * (pilot["full"] - pilot["none"]) > PILOT_GAP else f"That is not more than {PILOT_GAP:g} points: at this scale the rows "
         "cannot be expected to separate; they were run anyway and are reported as measured."),
      "## Top-1 per row\n\n" + common.md_table(
          ["row"] + [f"seed {s} %" for s in seeds] + ["mean %", "std %", "paper % (ImageNet B1)"], out_rows),
      "## Full method minus each row, paired by seed\n\n" + common.md_table(
          ["row", "full − row, points [95% t-interval]", "seeds where full is better", "paper full − row",
           "does 'full is better' reproduce?"],
          [[g["label"], study.fmt_interval(g["mean"], g["low"], g["high"]), f"{g['wins']}/{g['n']}",
            "-" if g["paper"] is None else f"{g['paper']:+.2f}", g["verdict"]] for g in gaps]),
      "Run time per row (s, wall / CPU, mean over seeds): " + ", ".join(
          f"{k} {np.mean([x['wall_s'] for x in v]):.0f}/{np.mean([x['cpu_s'] for x in v]):.0f}"
          for k, v in results.items()) + " (reused runs report the time they took when first trained).",
      "![ablation](ablation.png)",
  ]
  os.makedirs(args.out, exist_ok=True)
  plot(os.path.join(args.out, "ablation.png"), gaps)
  config = {"recipe": dataclasses.asdict(r), "seeds": seeds, "seeds_asked": args.seeds, "rows": [row[0] for row in rows],
            "official": args.official if has_official else None}
  common.write_markdown(os.path.join(args.out, "ablation.md"), "Ablation of the constants (paper Fig. 7)", info,
                        config, "\n\n".join(body))
  out = {"info": vars(info), "config": config, "top1": table, "results": results, "gaps": gaps,
         "pilot": pilot, "search": hs}
  common.write_json(os.path.join(args.out, "ablation.json"), out)
  out["body"] = body
  return out


if __name__ == "__main__":
  main()
