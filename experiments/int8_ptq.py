"""Post-training INT8 quantization of RepOpt-VGG vs RepVGG (the paper's Fig. 9/10, Table 6).

1. Hyper-Search (`repopt_jax.search`): the `hs` model on the search dataset gives the constant scales.
2. The same architecture trained twice on the training dataset with the same recipe and seed, by the
   `Trainer`: a RepOpt-VGG (target model + RepOpt-SGD with the searched constants, Rule of Initialization) and
   a RepVGG (multi-branch model + SGD), then fused (`reparam.fuse_repvgg`).
3. Both deployed networks get BatchNorm folded into their kernels (`reparam.fold_batchnorm`) and the same
   simple symmetric INT8 PTQ (`repopt_jax.quant`): weights per tensor or per output channel, and every
   conv/linear input with one per-tensor scale calibrated on a few training batches.
4. Reported: float and INT8 top-1 on the test split (and the drop), per-layer kernel standard deviations and
   max|w|/std (what per-tensor INT8 has to cover), and the kernel histograms (PNG).

CPU default: the `cifar_tiny` size, search on digits, train on Fashion-MNIST when it is installed (else
digits). Writes experiments/results/int8_ptq.{md,json,png}.

Usage: python experiments/int8_ptq.py [--arch cifar_tiny] [--epochs 2] [--dataset fashion_mnist] [--tiny]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments import common  # noqa: E402

MODELS = ("repopt", "repvgg")
SCHEMES = (  # name, per_channel weights, quantized activations
    ("W8 per-tensor", False, False),
    ("W8 per-channel", True, False),
    ("W8A8 per-tensor", False, True),
    ("W8A8 per-channel", True, True),
)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--arch", default="cifar_tiny")
  p.add_argument("--dataset", default=None, help="training dataset (default fashion_mnist if installed, else digits)")
  p.add_argument("--search_dataset", default="digits")
  p.add_argument("--search_epochs", type=float, default=30.0)
  p.add_argument("--epochs", type=float, default=2.0, help="training epochs of each model")
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--lr", type=float, default=0.1)
  p.add_argument("--weight_decay", type=float, default=4e-5)
  p.add_argument("--calib_batches", type=int, default=4)
  p.add_argument("--scales", default=None, help="use this scales file instead of running Hyper-Search")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--data_dir", default=None)
  p.add_argument("--workdir", default=None, help="run directories (default: a temporary one, removed)")
  p.add_argument("--out", default=common.RESULTS)
  p.add_argument("--tiny", action="store_true", help="smoke-test size: tiny arch on digits, a few steps")
  args = p.parse_args(argv)
  args.steps = args.search_steps = None
  if args.tiny:
    args.arch, args.dataset, args.batch_size, args.calib_batches = "tiny", "digits", 32, 1
    args.steps, args.search_steps = 6, 4
  if args.dataset is None:
    args.dataset = default_dataset(args.data_dir)
  return args


def default_dataset(data_dir=None) -> str:
  """fashion_mnist when its files are available here, else the embedded digits."""
  from repopt_jax import data  # pylint: disable=g-import-not-at-top
  try:
    data.make_iterator("fashion_mnist", "test", global_batch_size=8, train=False, data_dir=data_dir,
                       process_index=0, process_count=1)
    return "fashion_mnist"
  except data.DatasetError:
    return "digits"


def train_config(args, mode: str, optim: str, dataset: str, scales_path=None, epochs=None, steps=None):
  from repopt_jax.config import load_config  # pylint: disable=g-import-not-at-top
  length = {"steps": steps} if steps else {"epochs": epochs}
  return load_config({
      "model": {"arch": args.arch, "mode": mode},
      "data": {"dataset": dataset, "data_dir": args.data_dir},
      "optim": {"name": optim, "lr": args.lr, "weight_decay": args.weight_decay, "warmup_epochs": 0.1,
                "grad_clip": 5.0 if mode == "hs" else None},
      "train": dict(length, batch_size=args.batch_size, seed=args.seed, eval_batch_size=500 if not args.tiny else 120,
                    log_every=50, checkpoint_every=0, keep_checkpoints=1),
      "scales": scales_path,
  })


def hyper_search(args, workdir: str, options) -> str:
  """Runs Hyper-Search on the search dataset; returns the scales file."""
  from repopt_jax.search import search  # pylint: disable=g-import-not-at-top
  cfg = train_config(args, "hs", "sgd", args.search_dataset, epochs=args.search_epochs, steps=args.search_steps)
  return search(cfg, os.path.join(workdir, "hs"), plots=False, progress=False, tensorboard=False,
                compiler_options=options).scales_path


def train_models(args, workdir: str, scales_path: str, options) -> dict:
  """Trains the RepOpt-VGG and the RepVGG; returns `{name: (eval-mode model, trainer metrics)}`."""
  from repopt_jax.train import Trainer  # pylint: disable=g-import-not-at-top
  out = {}
  for name, mode, optim, scales in (("repopt", "target", "repopt_sgd", scales_path), ("repvgg", "repvgg", "sgd", None)):
    cfg = train_config(args, mode, optim, args.dataset, scales, epochs=args.epochs, steps=args.steps)
    trainer = Trainer(cfg, os.path.join(workdir, name), progress=False, tensorboard=False, compiler_options=options)
    metrics = trainer.fit()
    out[name] = (trainer.model(), metrics)
  return out


def forward_order(names) -> list:
  """RepOpt-VGG layer names in forward order: stages and blocks numerically, the head last."""
  natural = lambda n: [int(p) if p.isdigit() else p for p in n.split("/")]
  return sorted(names, key=lambda n: (n == "linear", natural(n)))


def kernel_stats(model) -> list:
  """Per conv/linear layer of a deployed model: `(name, std, max|w| / std)` of its kernel."""
  from repopt_jax import quant  # pylint: disable=g-import-not-at-top
  rows = []
  layers = quant.quantizable_layers(model)
  for name in forward_order(layers):
    layer = layers[name]
    w = np.asarray(layer.kernel[...], np.float64)
    rows.append((name, float(w.std()), float(np.abs(w).max() / w.std())))
  return rows


def plot_histograms(path: str, deployed: dict) -> None:
  plt = common.setup_matplotlib()
  from repopt_jax import quant  # pylint: disable=g-import-not-at-top
  layers = {k: quant.quantizable_layers(m) for k, m in deployed.items()}
  names = [n for n in forward_order(layers["repopt"]) if n != "linear"]
  pick = [names[0], names[len(names) // 2], names[-2] if len(names) > 2 else names[-1]]
  fig, axes = plt.subplots(1, 1 + len(pick), figsize=(4.2 * (1 + len(pick)), 3.6))
  colors = {"repopt": "tab:green", "repvgg": "tab:red"}
  labels = {"repopt": "RepOpt-VGG (BN folded)", "repvgg": "RepVGG fused (BN folded)"}
  for ax, sel in zip(axes, [None] + pick):
    for k in ("repvgg", "repopt"):
      ws = [np.asarray(layers[k][n].kernel[...]).ravel() for n in (names if sel is None else [sel])]
      w = np.concatenate(ws)
      # One step artist per histogram (ax.hist draws a patch per bin: slow to lay out).
      counts, edges = np.histogram(w, bins=120)
      ax.stairs(counts, edges, fill=True, color=colors[k], alpha=0.45, label=f"{labels[k]}, std {w.std():.4f}")
    ax.set_yscale("log")
    ax.set_title("all conv kernels" if sel is None else sel)
    ax.set_xlabel("weight")
    ax.legend(fontsize=7)
  fig.suptitle("Kernel weight distributions of the deployed networks (log counts)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> dict:
  args = parse_args(argv)
  from repopt_jax import data, quant  # pylint: disable=g-import-not-at-top
  from repopt_jax.models import count_params, reparam  # pylint: disable=g-import-not-at-top

  info = common.RunInfo.collect(["python", "experiments/int8_ptq.py"] + list(sys.argv[1:] if argv is None else argv))
  options = common.FAST_COMPILE if args.tiny else None
  workdir = args.workdir or tempfile.mkdtemp(prefix="repopt_int8_")
  try:
    scales_path = args.scales or hyper_search(args, workdir, options)
    trained = train_models(args, workdir, scales_path, options)
  finally:
    if args.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)
  raw = {"repopt": trained["repopt"][0], "repvgg": reparam.fuse_repvgg(trained["repvgg"][0])}
  deployed = {k: reparam.fold_batchnorm(m) for k, m in raw.items()}
  spec = data.dataset_info(args.dataset, args.data_dir)
  size = 120 if args.tiny else 500

  def test_batches():
    return data.make_iterator(args.dataset, spec.eval_split, global_batch_size=size, train=False,
                              data_dir=args.data_dir, process_index=0, process_count=1)

  calib = data.make_iterator(args.dataset, spec.train_split, global_batch_size=args.batch_size, train=False,
                             data_dir=args.data_dir, process_index=0, process_count=1)
  calib = [next(calib) for _ in range(args.calib_batches)]
  results = {}
  for k, m in deployed.items():
    ranges = quant.calibrate(m, calib)
    r = {"trainer_eval_top1": trained[k][1].get("eval_top1"), "float": common.accuracy(m, test_batches(), options)}
    for scheme, per_channel, acts in SCHEMES:
      q = quant.quantize_model(m, ranges if acts else None, per_channel=per_channel)
      r[scheme] = common.accuracy(q, test_batches(), options)
    r["kernels"] = kernel_stats(m)
    r["params"] = count_params(m)
    results[k] = r

  rows = []
  for k in MODELS:
    r = results[k]
    f = r["float"]["top1"]
    rows.append([{"repopt": "RepOpt-VGG", "repvgg": "RepVGG (fused)"}[k], 100 * f]
                + [x for s, *_ in SCHEMES for x in (100 * r[s]["top1"], 100 * (f - r[s]["top1"]))])
  main_table = common.md_table(["model", "float top-1 %"] + [h for s, *_ in SCHEMES for h in (f"{s} %", "drop")], rows)
  std_rows = []
  for (name, s1, d1), (_, s2, d2) in zip(results["repopt"]["kernels"], results["repvgg"]["kernels"]):
    std_rows.append([name, s1, s2, s2 / s1, d1, d2])
  mean_std = {k: float(np.mean([s for n, s, _ in results[k]["kernels"] if n != "linear"])) for k in MODELS}
  raw_std = float(np.mean([np.asarray(b.conv.kernel[...]).std() for _, b in raw["repopt"].named_blocks()]))
  body = [
      f"Architecture `{args.arch}` ({results['repopt']['params']} deployed params), "
      + (f"constants from `{args.scales}`" if args.scales else f"Hyper-Search on `{args.search_dataset}`")
      + f", both models trained on `{args.dataset}` with the same recipe and seed, evaluated "
      f"on its `{spec.eval_split}` split ({results['repopt']['float']['count']} images). INT8: symmetric, "
      f"round-to-nearest, [-127, 127]; activations: one per-tensor scale per conv/linear input, the max over "
      f"{args.calib_batches} training batches of {args.batch_size}; BatchNorm folded into the kernels first; "
      "fake-quantized evaluation (`repopt_jax.quant`).",
      "## Accuracy\n\n" + main_table,
      "## Kernel statistics of the deployed networks\n\n"
      f"Mean over conv layers of the kernel std: RepOpt-VGG {common.fmt(mean_std['repopt'])}, fused RepVGG "
      f"{common.fmt(mean_std['repvgg'])} (ratio {common.fmt(mean_std['repvgg'] / mean_std['repopt'])}); "
      f"RepOpt-VGG's kernels before folding BatchNorm: {common.fmt(raw_std)}. "
      "max|w|/std is the range per-tensor INT8 must cover, in standard deviations.\n\n"
      + common.md_table(["layer", "RepOpt-VGG std", "RepVGG std", "std ratio", "RepOpt-VGG max/std",
                         "RepVGG max/std"], std_rows),
      "![kernel histograms](int8_ptq.png)",
  ]
  os.makedirs(args.out, exist_ok=True)
  plot_histograms(os.path.join(args.out, "int8_ptq.png"), deployed)
  config = {k: v for k, v in vars(args).items() if k not in ("out",)}
  common.write_markdown(os.path.join(args.out, "int8_ptq.md"), "INT8 post-training quantization: RepOpt-VGG vs "
                        "RepVGG", info, config, "\n\n".join(body))
  common.write_json(os.path.join(args.out, "int8_ptq.json"), {"info": vars(info), "config": config,
                                                              "results": results, "mean_kernel_std": mean_std})
  print("\n\n".join(body[1:3]))
  return results


if __name__ == "__main__":
  main()
