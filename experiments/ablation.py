"""Ablation of RepOptimizer's constants (the paper's Fig. 7), on one dataset, over a set of seeds.

Hyper-Search once on the search dataset (the paper: CIFAR-100), then train the same target (plain VGG)
architecture on the training dataset (the paper: ImageNet) with the same recipe, one row per variant:

========================  ==================================================================================
row                       what differs
========================  ==================================================================================
full                      HS constants, Rule of Initialization + Grad Mult (RepOpt-SGD): the method
mask_only                 HS constants, Grad Mult only (the target model keeps its default initialisation)
reinit_only               HS constants, Rule of Initialization only, then plain SGD
none                      no constants: the plain VGG with plain SGD
ones                      all constants 1 (s = t = 1, gamma(0) = 1), re-init + Grad Mult
hs_init                   the HS model's initial constants (`hs_scale_init`, gamma(0) = 1), re-init + mask
channel_avg               HS constants averaged over the channels of each block, re-init + Grad Mult
========================  ==================================================================================

Everything else (data order, augmentation, schedule, weight decay, BatchNorm and head initialisation) is
the same across rows for a given seed. Writes experiments/results/ablation.{md,json,png}; the paper's
ImageNet numbers for RepOpt-VGG-B1 are listed alongside for the ordering.

Usage: python experiments/ablation.py [--seeds 0 1 2] [--epochs 3] [--arch tiny] [--tiny]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments import common  # noqa: E402

ROWS = (  # key, label, optimizer, constants, re-init, paper's RepOpt-VGG-B1 ImageNet top-1
    ("full", "HS constants, re-init + masks (full method)", "repopt_sgd", "hs", True, 78.48),
    ("mask_only", "HS constants, masks only", "repopt_sgd", "hs", False, 77.42),
    ("reinit_only", "HS constants, re-init only", "sgd", "hs", True, 77.07),
    ("none", "no constants (plain VGG, SGD)", "sgd", None, False, 76.91),
    ("ones", "all-ones constants", "repopt_sgd", "ones", True, 77.59),
    ("hs_init", "constants = HS initialisation", "repopt_sgd", "hs_init", True, 77.71),
    ("channel_avg", "channel-averaged HS constants", "repopt_sgd", "channel_avg", True, 77.40),
)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--arch", default="tiny")
  p.add_argument("--search_dataset", default="digits")
  p.add_argument("--dataset", default=None, help="training dataset (default fashion_mnist if installed, else digits)")
  p.add_argument("--search_epochs", type=float, default=40.0)
  p.add_argument("--epochs", type=float, default=3.0)
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--lr", type=float, default=0.1)
  p.add_argument("--weight_decay", type=float, default=4e-5)
  p.add_argument("--warmup_epochs", type=float, default=0.2)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--search_seed", type=int, default=0)
  p.add_argument("--rows", nargs="+", default=[r[0] for r in ROWS], choices=[r[0] for r in ROWS])
  p.add_argument("--scales", default=None, help="use this scales file instead of running Hyper-Search")
  p.add_argument("--data_dir", default=None)
  p.add_argument("--workdir", default=None, help="run directories (default: a temporary one, removed)")
  p.add_argument("--out", default=common.RESULTS)
  p.add_argument("--tiny", action="store_true", help="smoke-test size: digits, a few steps, one seed")
  args = p.parse_args(argv)
  args.steps = args.search_steps = None
  if args.tiny:
    args.dataset, args.batch_size, args.seeds, args.steps, args.search_steps = "digits", 32, [0], 3, 3
  if args.dataset is None:
    from experiments.int8_ptq import default_dataset  # pylint: disable=g-import-not-at-top
    args.dataset = default_dataset(args.data_dir)
  return args


def variant_scales(kind: str, searched: dict, arch, in_channels: int) -> dict:
  """The constants of a row: searched ('hs'), all ones, the HS initialisation, or channel-averaged HS."""
  from repopt_jax import CSLAScales  # pylint: disable=g-import-not-at-top
  from repopt_jax.models import get_arch, hs_scale_init  # pylint: disable=g-import-not-at-top

  if kind == "hs":
    return searched
  out = {}
  for spec in get_arch(arch).block_specs(in_channels):
    c, ident = spec.out_channels, spec.has_identity
    if kind == "ones":
      out[spec.name] = CSLAScales(conv=np.ones(c), pointwise=np.ones(c), identity=ident,
                                  identity_init=np.ones(c) if ident else None)
    elif kind == "hs_init":
      v = np.full(c, hs_scale_init(spec.index))
      out[spec.name] = CSLAScales(conv=v, pointwise=v, identity=ident, identity_init=np.ones(c) if ident else None)
    elif kind == "channel_avg":
      s = searched[spec.name]
      avg = lambda x: np.full(c, float(np.mean(x)))
      out[spec.name] = CSLAScales(conv=avg(s.conv), pointwise=avg(s.pointwise), identity=ident,
                                  identity_init=avg(s.identity_init) if ident and s.identity_init is not None
                                  else (np.ones(c) if ident else None))
    else:
      raise ValueError(f"unknown constants {kind!r}")
  return out


def run_config(args, optim: str, scales_path, reinit: bool, seed: int, dataset: str, mode: str = "target",
               epochs=None, steps=None):
  from repopt_jax.config import load_config  # pylint: disable=g-import-not-at-top
  length = {"steps": steps} if steps else {"epochs": epochs}
  return load_config({
      "model": {"arch": args.arch, "mode": mode, "reinit": reinit},
      "data": {"dataset": dataset, "data_dir": args.data_dir},
      "optim": {"name": optim, "lr": args.lr, "weight_decay": args.weight_decay,
                "warmup_epochs": args.warmup_epochs, "grad_clip": 5.0 if mode == "hs" else None},
      "train": dict(length, batch_size=args.batch_size, seed=seed, eval_batch_size=500 if not args.tiny else 120,
                    log_every=50, checkpoint_every=0, keep_checkpoints=1),
      "scales": scales_path,
  })


def plot(path: str, table: dict, rows) -> None:
  plt = common.setup_matplotlib()
  fig, ax = plt.subplots(figsize=(10, 4.2))
  x = np.arange(len(rows))
  means = [np.mean(table[k]) * 100 for k, *_ in rows]
  stds = [np.std(table[k], ddof=1) * 100 if len(table[k]) > 1 else 0.0 for k, *_ in rows]
  ax.bar(x, means, yerr=stds, color="tab:green", alpha=0.7, capsize=4, label="this run (mean ± std over seeds)")
  for i, (k, *_rest) in enumerate(rows):
    ax.scatter(np.full(len(table[k]), i), np.asarray(table[k]) * 100, color="black", s=10, zorder=3)
  lo = min(min(np.asarray(v) * 100) for v in table.values())
  hi = max(max(np.asarray(v) * 100) for v in table.values())
  ax.set_ylim(lo - 1.0, hi + 0.8)
  ax2 = ax.twinx()
  ax2.plot(x, [r[5] for r in rows], "o--", color="tab:red", label="paper (ImageNet, RepOpt-VGG-B1)")
  ax2.set_ylabel("paper top-1 %", color="tab:red")
  ax.set_xticks(x, [r[0] for r in rows], rotation=20)
  ax.set_ylabel("test top-1 %")
  ax.legend(loc="upper right", fontsize=8)
  ax2.legend(loc="upper center", fontsize=8)
  ax.set_title("Ablation of the constants (Fig. 7)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(args, info, rows, table: dict, seconds: dict, search_info: dict, spec) -> dict:
  """Writes ablation.{md,json,png} for the seeds finished so far; returns the row order (best first)."""
  seeds = args.seeds[:min(len(v) for v in table.values())]
  if not seeds:
    raise RuntimeError("ablation: no seed finished every row; nothing to report")
  table = {k: v[:len(seeds)] for k, v in table.items()}
  means = {k: float(np.mean(v)) for k, v in table.items()}
  order = sorted(means, key=means.get, reverse=True)
  paper_order = [r[0] for r in sorted(rows, key=lambda r: -r[5])]
  out_rows = []
  for key, label, optim, kind, reinit, paper in rows:
    v = np.asarray(table[key]) * 100
    out_rows.append([label] + [x for x in v] + [v.mean(), v.std(ddof=1) if len(v) > 1 else None,
                                                order.index(key) + 1, paper, paper_order.index(key) + 1])
  headers = (["row"] + [f"seed {s} %" for s in seeds]
             + ["mean %", "std %", "rank", "paper % (ImageNet B1)", "paper rank"])
  full = np.asarray(table.get("full", [np.nan]))
  gaps = []
  if "full" in table:
    for key, label, *_ in rows:
      if key != "full":
        d = (full - np.asarray(table[key])) * 100
        gaps.append([label, d.mean(), d.std(ddof=1) if len(d) > 1 else None, int(np.sum(d > 0)), len(d)])
  spreads = [np.std(v, ddof=1) * 100 for v in table.values() if len(v) > 1]
  body = [
      f"Hyper-Search of `{args.arch}` on `{args.search_dataset}` ({search_info}); every row trains `{args.arch}` "
      f"on `{args.dataset}` for {args.steps or args.epochs} {'steps' if args.steps else 'epochs'}, batch "
      f"{args.batch_size}, lr {args.lr} (warm-up {args.warmup_epochs} epochs, cosine), weight decay "
      f"{args.weight_decay}, Nesterov 0.9, seeds {seeds} (of {args.seeds} asked); top-1 on the "
      f"`{spec.eval_split}` split.",
      "## Top-1 per row\n\n" + common.md_table(headers, out_rows),
      f"Ordering here (best first): {', '.join(order)}. The paper's: {', '.join(paper_order)}. "
      + (f"Seed-to-seed standard deviation of a row: {common.fmt(min(spreads))} to {common.fmt(max(spreads))} "
         f"points (median {common.fmt(float(np.median(spreads)))})." if spreads else "One seed: no spread."),
  ]
  if gaps:
    body.append("## Full method minus each row, paired by seed (points)\n\n" + common.md_table(
        ["row", "mean gap", "std of gap", "seeds where full is better", "seeds"], gaps))
  body.append("Wall time per run (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + ".")
  body.append("![ablation](ablation.png)")
  os.makedirs(args.out, exist_ok=True)
  plot(os.path.join(args.out, "ablation.png"), table, rows)
  config = {k: v for k, v in vars(args).items() if k != "out"}
  common.write_markdown(os.path.join(args.out, "ablation.md"), "Ablation of the constants (paper Fig. 7)", info,
                        config, "\n\n".join(body))
  common.write_json(os.path.join(args.out, "ablation.json"), {"info": vars(info), "config": config,
                                                              "top1": table, "search": search_info,
                                                              "seconds": seconds, "order": order})
  return {"order": order, "body": body}


def main(argv=None) -> dict:
  args = parse_args(argv)
  from repopt_jax import data, load_scales, save_scales  # pylint: disable=g-import-not-at-top
  from repopt_jax.search import search  # pylint: disable=g-import-not-at-top
  from repopt_jax.train import Trainer  # pylint: disable=g-import-not-at-top

  info = common.RunInfo.collect(["python", "experiments/ablation.py"] + list(sys.argv[1:] if argv is None else argv))
  options = common.FAST_COMPILE if args.tiny else None
  rows = [r for r in ROWS if r[0] in args.rows]
  workdir = args.workdir or tempfile.mkdtemp(prefix="repopt_ablation_")
  spec = data.dataset_info(args.dataset, args.data_dir)
  log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
  table = {k: [] for k, *_ in rows}
  seconds = {}
  try:
    t0 = time.perf_counter()
    if args.scales:
      searched, _ = load_scales(args.scales)
      search_info = {"scales_file": args.scales}
    else:
      cfg = run_config(args, "sgd", None, True, args.search_seed, args.search_dataset, mode="hs",
                       epochs=args.search_epochs, steps=args.search_steps)
      res = search(cfg, os.path.join(workdir, "hs"), plots=False, progress=False, tensorboard=False,
                   compiler_options=options)
      searched = res.scales
      search_info = {"dataset": args.search_dataset, "eval_top1": res.metrics.get("eval_top1"),
                     "steps": res.metrics.get("step")}
    seconds["search"] = time.perf_counter() - t0
    log(f"Hyper-Search done: {search_info}")
    paths = {}
    for kind in sorted({r[3] for r in rows if r[3]}):
      paths[kind] = os.path.join(workdir, f"scales_{kind}.npz")
      save_scales(paths[kind], variant_scales(kind, searched, args.arch, spec.channels),
                  {"arch": args.arch, "variant": kind})
    for seed in args.seeds:  # seeds outermost: an interrupted run still has whole seeds for every row
      for key, _, optim, kind, reinit, _paper in rows:
        t0 = time.perf_counter()
        cfg = run_config(args, optim, paths.get(kind), reinit, seed, args.dataset, epochs=args.epochs,
                         steps=args.steps)
        trainer = Trainer(cfg, os.path.join(workdir, f"{key}_seed{seed}"), progress=False, tensorboard=False,
                          compiler_options=options)
        metrics = trainer.fit()
        table[key].append(float(metrics["eval_top1"]))
        seconds[f"{key}/{seed}"] = time.perf_counter() - t0
        log(f"seed {seed} {key}: top-1 {100 * metrics['eval_top1']:.2f}% ({seconds[f'{key}/{seed}']:.0f} s)")
      write_report(args, info, rows, table, seconds, search_info, spec)  # whole seeds so far
  finally:
    if args.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)

  report = write_report(args, info, rows, table, seconds, search_info, spec)
  print("\n\n".join(report["body"][:4]))
  return {"top1": table, "order": report["order"], "search": search_info}


if __name__ == "__main__":
  main()
