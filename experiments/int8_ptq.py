"""Post-training quantization of RepOpt-VGG vs RepVGG vs plain VGG over seeds (the paper's Sec. 5.3, Fig. 9/10).

The networks are the main comparison's runs of the study (`experiments/study.py`): per seed, a RepOpt-VGG
(target model + RepOpt-SGD with the Hyper-Searched constants), a RepVGG (multi-branch + SGD, fused with
`reparam.fuse_repvgg`) and a plain VGG (target model + SGD), all with the same recipe. Each is loaded
read-only from its run directory, BatchNorm is folded into its kernels (`reparam.fold_batchnorm`), and then:

* Our PTQ (`repopt_jax.quant`, fake-quantized evaluation): symmetric, per tensor, round to nearest, range
  [-(2^(b-1)-1), 2^(b-1)-1], at b = 8, 6, 5, 4 bits. `Wb`: weights of every conv and the head only. `WbAb`:
  weights and the input of every conv/linear layer, each activation with one scale `max|x| / (2^(b-1)-1)`,
  the maximum over the calibration images.
* onnxruntime's own static INT8 (`repopt_jax.export.quantize_onnx`: QDQ, int8 symmetric per-tensor weights,
  uint8 MinMax activations) of the run exported to ONNX, calibrated on the same images and evaluated with
  onnxruntime: the real-tool row ("ORT INT8").

Per model and scheme, against the float model's logits F (N test images x classes) and the quantized Q:
top-1 drop (float top-1 minus quantized top-1, points), logit relative error ||Q - F||_F / ||F||_F over the
whole test set, and the flip rate (fraction of test images whose argmax changes). Kernel statistics of the
deployed (BN-folded) 3x3 conv kernels, the head excluded: pooled std = the std of all conv kernel weights
concatenated; per-layer std = the std of one layer's kernel; max|w|/std likewise, pooled or per layer.
Seeds are paired: the mean and 95% t-interval of RepVGG - RepOpt-VGG per scheme.

The script reads finished runs and does not train the study's full-size runs (the main comparison does:
`python experiments/main_comparison.py --seeds ...`); `--train` trains missing ones, `--quick` trains the
test-suite size in a temporary root. Writes experiments/results/int8_ptq.{md,json,png}.

Usage: python experiments/int8_ptq.py [--seeds 0 1 2] [--root experiments/runs] [--train] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments import common, study  # noqa: E402

MODELS = ("repopt", "repvgg", "vgg")
LABELS = {"repopt": "RepOpt-VGG", "repvgg": "RepVGG (fused)", "vgg": "plain VGG"}
COLORS = {"repopt": "tab:green", "repvgg": "tab:red", "vgg": "tab:blue"}
BITS = (8, 6, 5, 4)
ORT = "ORT INT8"
# The paper (ImageNet, RepOpt-VGG-B1 vs RepVGG-B1): float and INT8 top-1 (%), and the kernel std it reports.
PAPER = {"repopt": {"float": 78.48, "int8": 75.89, "kernel_std": 0.0066},
         "repvgg": {"float": 78.42, "int8": 54.55, "kernel_std": 0.0234}}


def schemes(bits=BITS):
  """`(name, num_bits, quantized activations)` of our PTQ schemes: weights only, then weights + activations."""
  return [(f"W{b}", b, False) for b in bits] + [(f"W{b}A{b}", b, True) for b in bits]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of the main runs (default 0 1 2; "
                 "--quick: 0)")
  p.add_argument("--root", default=None, help=f"runs root (default {study.DEFAULT_ROOT}; --quick: a temporary one)")
  p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
  p.add_argument("--bits", type=int, nargs="+", default=list(BITS))
  p.add_argument("--calib_images", type=int, default=512, help="training images for activation ranges (ours and "
                 "onnxruntime's)")
  p.add_argument("--no_onnx", action="store_true", help="skip onnxruntime's INT8 row")
  p.add_argument("--train", action="store_true", help="train missing runs (off: a missing run is an error)")
  p.add_argument("--out", default=common.RESULTS)
  p.add_argument("--quick", "--tiny", dest="quick", action="store_true",
                 help="test-suite size (study.QUICK: tiny arch on digits) in a temporary root, one seed")
  args = p.parse_args(argv)
  if args.seeds is None:
    args.seeds = [0] if args.quick else [0, 1, 2]
  if "repopt" not in args.models or "repvgg" not in args.models:
    p.error("--models must include repopt and repvgg (the paired comparison)")
  if any(not 2 <= b <= 16 for b in args.bits):
    p.error("--bits: each in [2, 16]")
  args.bits = sorted(set(args.bits), reverse=True)
  return args


# ------------------------------------------------------------------------------------------------ runs
def _normalised(cfg: dict) -> dict:
  cfg = json.loads(json.dumps(cfg, default=str))
  s = cfg.pop("scales", None)
  return cfg, (os.path.realpath(s) if s else None)


def check_runs(root: str, r: study.Recipe, seeds, models) -> dict:
  """`{(model, seed): (workdir, config, trainer's top-1)}` of the finished main runs.

  Raises SystemExit (one line) for a run that is missing, unfinished or trained with another config.
  A `Trainer` run directory keeps its config in `result.json` (study.train), not in `config.json`.
  """
  scales = os.path.join(root, "hs", "scales.npz")
  out = {}
  for seed in seeds:
    for m in models:
      workdir = os.path.join(root, study.main_run_name(m, seed))
      result = os.path.join(workdir, "result.json")
      if not os.path.exists(result):
        raise SystemExit(f"error: run {workdir} is not finished (no result.json); train it with `python "
                         f"experiments/main_comparison.py --seeds {' '.join(map(str, seeds))}` (or pass --train)")
      with open(result) as f:
        saved_all = json.load(f)
      saved = saved_all.get("config") or {}
      config = study.model_config(r, m, seed, scales)
      if _normalised(saved) != _normalised(config.to_dict()):
        raise SystemExit(f"error: run {workdir} was trained with another config than the study's "
                         f"{'QUICK' if r.quick else 'FULL'} recipe; retrain it with `python "
                         f"experiments/main_comparison.py --seeds {seed}`")
      out[(m, seed)] = (workdir, config, (saved_all.get("result") or {}).get("top1"))
  return out


# ------------------------------------------------------------------------------------------------ evaluation
_FORWARD = {}


def logits_of(model, batches, compiler_options=None) -> np.ndarray:
  """Logits `(N, classes)` of an NNX model over padded evaluation batches, padding rows dropped."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  key = tuple(sorted((compiler_options or {}).items()))
  if key not in _FORWARD:  # the graph is static: same-structure models share one compilation
    _FORWARD[key] = jax.jit(lambda g, st, x: nnx.merge(g, st)(x), static_argnums=0,
                            compiler_options=compiler_options)
  graphdef, state = nnx.split(model)
  return np.concatenate([np.asarray(_FORWARD[key](graphdef, state, jnp.asarray(x)), np.float64)[mask]
                         for x, mask in batches])


def compare(f: np.ndarray, q: np.ndarray, labels: np.ndarray) -> dict:
  """Quantized logits `q` against float logits `f`: top-1s, drop, logit relative error, flip rate."""
  n = len(labels)
  f_hits, q_hits = int(np.sum(f.argmax(1) == labels)), int(np.sum(q.argmax(1) == labels))
  return {"top1": q_hits / n, "float_top1": f_hits / n, "drop": (f_hits - q_hits) / n,
          "logit_err": float(np.linalg.norm(q - f) / np.linalg.norm(f)),
          "flip": float(np.mean(q.argmax(1) != f.argmax(1)))}


def forward_order(names) -> list:
  """Layer names in forward order: stages and blocks numerically, the head last."""
  natural = lambda n: [int(p) if p.isdigit() else p for p in n.split("/")]
  return sorted(names, key=lambda n: (n == "linear", natural(n)))


def conv_kernels(model) -> dict:
  """`{layer: kernel (float64)}` of the conv layers of a deployed model, in forward order (the head excluded)."""
  from repopt_jax import quant  # pylint: disable=g-import-not-at-top
  layers = quant.quantizable_layers(model)
  return {n: np.asarray(layers[n].kernel[...], np.float64) for n in forward_order(layers) if n != "linear"}


def kernel_stats(kernels: dict) -> dict:
  """The one definition of the report's kernel statistics (tables and plots alike).

  pooled_std: std of all conv kernel weights concatenated; pooled_max_over_std: max|w| over them / pooled_std;
  layers: `[name, std, max|w|/std]` of each conv layer's own kernel.
  """
  allw = np.concatenate([k.ravel() for k in kernels.values()])
  return {"pooled_std": float(allw.std()), "pooled_max_over_std": float(np.abs(allw).max() / allw.std()),
          "layers": [[n, float(k.std()), float(np.abs(k).max() / k.std())] for n, k in kernels.items()]}


def onnx_row(model, image_size, calib: np.ndarray, batches, f_jax: np.ndarray, labels: np.ndarray, tmp: str,
             name: str) -> dict:
  """onnxruntime's static INT8 of the exported float network, against the float ONNX file."""
  from repopt_jax import export  # pylint: disable=g-import-not-at-top
  net = export.deployed_network(model, image_size, name=name)
  fp32 = export.save_onnx(export.to_onnx(net), os.path.join(tmp, f"{name}_fp32.onnx"))
  int8 = export.quantize_onnx(fp32, os.path.join(tmp, f"{name}_int8.onnx"), calib, per_channel=False)
  run = lambda path: (lambda s: np.concatenate([np.asarray(export.run_onnx(s, x), np.float64)[mask]
                                                for x, mask in batches]))(export.onnx_session(path))
  f_onnx, q_onnx = run(fp32), run(int8)
  out = compare(f_onnx, q_onnx, labels)
  # The float ONNX file is the JAX float model: this is how far apart they are.
  out["fp32_vs_jax_logit_err"] = float(np.linalg.norm(f_onnx - f_jax) / np.linalg.norm(f_jax))
  out["fp32_vs_jax_flip"] = float(np.mean(f_onnx.argmax(1) != f_jax.argmax(1)))
  out["int8_bytes"], out["fp32_bytes"] = os.path.getsize(int8), os.path.getsize(fp32)
  return out


def evaluate_run(workdir: str, config, trainer_top1, model_key: str, calib: np.ndarray, batches, labels, bits, *,
                 onnx: bool, options=None, log=print):
  """Every scheme of one trained run: `({'float_top1', 'schemes': {name: compare()}, 'kernels', ...},
  {layer: deployed kernel})`."""
  from repopt_jax import quant, runs  # pylint: disable=g-import-not-at-top
  from repopt_jax.models import reparam  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  model, config = runs.load_model(workdir, config)
  plain = reparam.fuse_repvgg(model) if config.model.mode == "repvgg" else model
  deployed = reparam.fold_batchnorm(plain)
  f = logits_of(deployed, batches, options)
  kernels = conv_kernels(deployed)
  ranges = quant.calibrate(deployed, [calib[i:i + 128] for i in range(0, len(calib), 128)])
  out = {"float_top1": float(np.mean(f.argmax(1) == labels)), "trainer_top1": trainer_top1,
         "test_images": int(len(labels)), "schemes": {},
         "kernels": kernel_stats(kernels),
         # Before BatchNorm folding (a RepVGG's fused kernels already carry its branch BNs): for the paper.
         "unfolded_pooled_std": kernel_stats(conv_kernels(plain))["pooled_std"],
         "act_ranges": ranges}
  for name, b, acts in schemes(bits):
    q = quant.quantize_model(deployed, ranges if acts else None, per_channel=False, num_bits=b)
    out["schemes"][name] = compare(f, logits_of(q, batches, options), labels)
  if onnx:
    from repopt_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    size = int(config.data.image_size or data_lib.dataset_info(config.data.dataset, config.data.data_dir).image_size)
    with tempfile.TemporaryDirectory(prefix="repopt_int8_onnx_") as tmp:
      out["schemes"][ORT] = onnx_row(model, size, calib, batches, f, labels, tmp, model_key)
  out["seconds"] = time.perf_counter() - t0
  log(f"{workdir}: float {100 * out['float_top1']:.2f}%, "
      + ", ".join(f"{k} {0.0 - 100 * v['drop']:+.2f}" for k, v in out["schemes"].items()) + f" ({out['seconds']:.0f} s)")
  return out, kernels


def eval_batches(config, batch_size: int):
  """`[(images, mask)]` of the test split (padded batches, one shape) and the labels of the real rows."""
  from repopt_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  d = config.data
  size = int(d.image_size or data_lib.dataset_info(d.dataset, d.data_dir).image_size)
  it = data_lib.make_iterator(d.dataset, d.eval_split, global_batch_size=batch_size, train=False, image_size=size,
                              data_dir=d.data_dir, num_epochs=1, process_index=0, process_count=1)
  batches, labels = [], []
  for b in it:
    mask = np.asarray(b["mask"], bool)
    batches.append((np.asarray(b["image"], np.float32), mask))
    labels.append(np.asarray(b["label"])[mask])
  return batches, np.concatenate(labels)


# ------------------------------------------------------------------------------------------------ aggregation
def summarize(per_seed: dict, seeds, models, scheme_names) -> dict:
  """Mean and 95% t-interval over seeds (paired for the differences); see the module docstring for definitions."""
  iv = lambda v: list(study.t_interval(v))
  get = lambda m, s, key: [per_seed[m][i]["schemes"][s][key] for i in range(len(seeds))]
  out = {"seeds": list(seeds), "models": list(models), "n": len(seeds),
         "units": "drop, flip, top1: fractions of the test set (x100 for points); logit_err: ||Q-F||_F / ||F||_F "
                  "over the test set; std: weight units; [mean, lo, hi] = mean and 95% t-interval over seeds "
                  "(lo = hi = NaN for one seed); *_diff: RepVGG - RepOpt-VGG, seed-paired",
         "float_top1": {m: iv([r["float_top1"] for r in per_seed[m]]) for m in models},
         "schemes": {}}
  for s in scheme_names:
    row = {"n": len(seeds)}
    for key in ("drop", "logit_err", "flip", "top1"):
      row[key] = {m: iv(get(m, s, key)) for m in models}
    for key in ("drop", "logit_err", "flip"):
      row[f"{key}_diff"] = iv(np.subtract(get("repvgg", s, key), get("repopt", s, key)))
      if "vgg" in models:
        row[f"{key}_diff_vgg"] = iv(np.subtract(get("vgg", s, key), get("repopt", s, key)))
    out["schemes"][s] = row
  out["pooled_std"] = {m: iv([r["kernels"]["pooled_std"] for r in per_seed[m]]) for m in models}
  out["pooled_max_over_std"] = {m: iv([r["kernels"]["pooled_max_over_std"] for r in per_seed[m]]) for m in models}
  out["pooled_std_ratio"] = iv([a["kernels"]["pooled_std"] / b["kernels"]["pooled_std"]
                                for a, b in zip(per_seed["repvgg"], per_seed["repopt"])])
  out["unfolded_pooled_std"] = {m: iv([r["unfolded_pooled_std"] for r in per_seed[m]]) for m in models}
  out["paper"] = {"dataset": "ImageNet", "arch": "B1",
                  "repopt": {"float_top1": PAPER["repopt"]["float"] / 100, "int8_top1": PAPER["repopt"]["int8"] / 100,
                             "drop": (PAPER["repopt"]["float"] - PAPER["repopt"]["int8"]) / 100,
                             "kernel_std": PAPER["repopt"]["kernel_std"]},
                  "repvgg": {"float_top1": PAPER["repvgg"]["float"] / 100, "int8_top1": PAPER["repvgg"]["int8"] / 100,
                             "drop": (PAPER["repvgg"]["float"] - PAPER["repvgg"]["int8"]) / 100,
                             "kernel_std": PAPER["repvgg"]["kernel_std"]}}
  out["paper"]["drop_diff"] = out["paper"]["repvgg"]["drop"] - out["paper"]["repopt"]["drop"]
  out["paper"]["kernel_std_ratio"] = PAPER["repvgg"]["kernel_std"] / PAPER["repopt"]["kernel_std"]
  return out


# ------------------------------------------------------------------------------------------------ report
def _pts(v, digits=2) -> str:
  """A [mean, lo, hi] of fractions in points: 'mean' or 'mean [lo, hi]'."""
  m, lo, hi = v
  if lo != lo:
    return f"{100 * m:.{digits}f}"
  return f"{100 * m:.{digits}f} [{100 * lo:.{digits}f}, {100 * hi:.{digits}f}]"


def _num(v) -> str:
  m, lo, hi = v
  if lo != lo:
    return common.fmt(m)
  return f"{common.fmt(m)} [{common.fmt(lo)}, {common.fmt(hi)}]"


def _diff(v, scale=100.0, digits=2) -> str:
  """A signed [mean, lo, hi] (`study.fmt_interval`); one seed: the number alone."""
  m, lo, hi = v
  m = 0.0 if abs(m) < 1e-12 else m
  if lo != lo:
    return f"{scale * m:+.{digits}f}"
  return study.fmt_interval(m, lo, hi, scale, digits)


def _resolved(v) -> str:
  """'>' / '<' when the interval excludes 0, '?' when it does not (or one seed)."""
  m, lo, hi = v
  if lo != lo:
    return "?"
  return ">" if lo > 0 else "<" if hi < 0 else "0"


def verdicts(s: dict, bits) -> list:
  """Plain sentences: what reproduces and what does not."""
  out = []
  n = s["n"]
  paper_gap = 100 * s["paper"]["drop_diff"]
  sign = {">": "RepVGG worse, the interval excludes 0", "<": "RepOpt-VGG worse, the interval excludes 0",
          "0": "not resolved: the interval includes 0", "?": "one seed, no interval"}
  for name in [x for x in ("W8A8", ORT) if x in s["schemes"]]:
    row = s["schemes"][name]
    d = row["drop_diff"]
    r = _resolved(d)
    rep, opt = 100 * row["drop"]["repvgg"][0], 100 * row["drop"]["repopt"][0]
    if r == ">":
      what = "the paper's direction reproduces"
    elif r == "<":
      what = "the paper's direction does not reproduce (reversed)"
    else:
      what = "the paper's direction is not resolved"
    if abs(100 * d[0]) < paper_gap / 4:
      size = (f"the paper's collapse (a {paper_gap:.1f}-point gap: RepVGG-B1 loses 23.87 points, RepOpt-VGG-B1 "
              "2.59) does not reproduce here")
    else:
      size = f"a gap of the paper's order ({paper_gap:.1f} points)"
    out.append(f"**{name}** (INT8): drop RepOpt-VGG {opt:.2f}, RepVGG {rep:.2f} points; RepVGG - RepOpt-VGG "
               f"{_diff(d)} points over {n} seed(s) ({sign[r]}): {what}; {size}.")
  for name in [f"W{b}A{b}" for b in bits if b < 8 and f"W{b}A{b}" in s["schemes"]]:
    row = s["schemes"][name]
    d, e = row["drop_diff"], row["logit_err_diff"]
    out.append(f"**{name}**: drop RepOpt-VGG {100 * row['drop']['repopt'][0]:.2f}, RepVGG "
               f"{100 * row['drop']['repvgg'][0]:.2f} points; RepVGG - RepOpt-VGG {_diff(d)} points "
               f"({sign[_resolved(d)]}); logit error {_diff(e, 1, 3)} ({sign[_resolved(e)]}).")
  # Where the paper's qualitative effect (RepVGG collapses, RepOpt-VGG holds) shows here, if anywhere.
  hit = []
  for kind, label in (("W{b}A{b}", "weights + activations"), ("W{b}", "weights only")):
    for b in bits:  # from the widest down
      row = s["schemes"].get(kind.format(b=b))
      if row is None:
        continue
      rep, opt = row["drop"]["repvgg"][0], row["drop"]["repopt"][0]
      if rep > 0.10 and rep > 3 * max(opt, 0.0) and _resolved(row["drop_diff"]) in (">", "?"):
        hit.append(f"{label}: first at {b} bits ({kind.format(b=b)}: RepVGG -{100 * rep:.1f}, RepOpt-VGG "
                   f"-{100 * opt:.1f} points)")
        break
  out.append("**Where the paper's effect shows** (RepVGG loses > 10 points and > 3x RepOpt-VGG's drop"
             + (", interval excluding 0" if n > 1 else "") + "): "
             + ("; ".join(hit) + "." if hit else "at none of the bit widths measured."))
  ratio = s["pooled_std_ratio"]
  pr = s["paper"]["kernel_std_ratio"]
  std = s["pooled_std"]
  if ratio[1] == ratio[1] and ratio[1] <= 1 <= ratio[2]:
    direction = ("the interval includes 1: the two pooled stds cannot be told apart, so the paper's much wider "
                 "RepVGG kernels do not reproduce")
  elif ratio[0] > 1:
    direction = "RepVGG's deployed kernels are wider than RepOpt-VGG's, as in the paper"
  else:
    direction = "RepVGG's deployed kernels are *narrower* than RepOpt-VGG's: the paper's direction does not reproduce"
  far = "; the size of the paper's ratio does not reproduce" if 1 < ratio[0] < pr / 2 else ""
  out.append(f"**Kernel std** (pooled, deployed 3x3 kernels): RepOpt-VGG {common.fmt(std['repopt'][0])}, RepVGG "
             f"{common.fmt(std['repvgg'][0])}, ratio RepVGG/RepOpt-VGG {_num(ratio)} vs the paper's "
             f"{PAPER['repvgg']['kernel_std']}/{PAPER['repopt']['kernel_std']} = {pr:.2f}: {direction}{far}. "
             "Per-tensor quantization has to cover the range in stds (max\\|w\\|/std), not the std itself: pooled "
             f"max\\|w\\|/std RepOpt-VGG {_num(s['pooled_max_over_std']['repopt'])}, RepVGG "
             f"{_num(s['pooled_max_over_std']['repvgg'])}.")
  return out


def plot(path: str, s: dict, per_seed: dict, kernels0: dict, models, bits) -> None:
  plt = common.setup_matplotlib()
  fig, axes = plt.subplots(2, 4, figsize=(18, 8.2))
  b = list(bits)

  def series(ax, key, acts, per_points=True):
    for m in models:
      names = [f"W{x}A{x}" if acts else f"W{x}" for x in b]
      mean = [s["schemes"][n][key][m][0] for n in names]
      scale = 100 if key in ("drop", "flip") else 1
      ax.plot(b, [scale * v for v in mean], "-o" if not acts else "--s", color=COLORS[m],
              label=f"{LABELS[m]} {'WA' if acts else 'W'}")
      if per_points and len(per_seed[m]) > 1:
        for r in per_seed[m]:
          ax.plot(b, [scale * r["schemes"][n][key] for n in names], ".", color=COLORS[m], alpha=0.35, ms=4)

  def yscale(ax, values, linthresh):
    pos = [abs(v) for v in values if v]
    if pos and max(pos) / max(min(pos), linthresh) > 30:  # spans decades: symmetric log (drops can be <= 0)
      ax.set_yscale("symlog", linthresh=linthresh)
      ax.axhspan(-linthresh, linthresh, color="0.9", zorder=0, lw=0)

  all_vals = lambda key, acts: [100 * r["schemes"][f"W{x}A{x}" if acts else f"W{x}"][key]
                                for m in models for r in per_seed[m] for x in b]
  n_test = per_seed["repopt"][0]["test_images"]
  for ax, acts in ((axes[0, 0], False), (axes[0, 1], True)):
    series(ax, "drop", acts)
    yscale(ax, all_vals("drop", acts), 0.1)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_title(f"top-1 drop, {'weights + activations' if acts else 'weights only'} (per tensor)")
    ax.set_ylabel("float - quantized top-1 (points)")
  ax = axes[0, 2]
  series(ax, "logit_err", False)
  series(ax, "logit_err", True)
  ax.set_yscale("log")
  ax.set_title("logit relative error ||Q-F||/||F||")
  ax = axes[0, 3]
  series(ax, "flip", False)
  series(ax, "flip", True)
  ax.set_yscale("symlog", linthresh=100.0 / n_test)  # below one image of the test set: linear
  ax.set_title(f"prediction flip rate (%); linear below 1/{n_test}")
  ax.set_ylabel("% of test images")
  for ax in axes[0]:
    ax.set_xticks(b)
    ax.set_xlabel("bits")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  axes[0, 2].legend(fontsize=7)
  if ORT in s["schemes"]:
    for m in models:
      axes[0, 1].plot([8], [100 * s["schemes"][ORT]["drop"][m][0]], "*", ms=12, color=COLORS[m],
                      markeredgecolor="k", label=f"{LABELS[m]} ORT INT8")
    axes[0, 1].legend(fontsize=7)

  # Kernel histograms of seed 0, with the report's definitions (pooled / per-layer std of deployed kernels).
  names = list(kernels0["repopt"])
  worst = max(names, key=lambda n: np.abs(kernels0["repvgg"][n]).max() / kernels0["repvgg"][n].std())
  pick = list(dict.fromkeys([names[len(names) // 2], worst, names[-1]]))
  pick += [n for n in names if n not in pick][:3 - len(pick)]
  for ax, sel in zip(axes[1], [None] + pick):
    for m in models:
      ks = kernels0[m]
      w = np.concatenate([ks[n].ravel() for n in (names if sel is None else [sel])])
      counts, edges = np.histogram(w, bins=120)
      what = "pooled" if sel is None else "layer"
      ax.stairs(counts, edges, fill=True, color=COLORS[m], alpha=0.4,
                label=f"{LABELS[m]}: {what} std {w.std():.4g}, max/std {np.abs(w).max() / w.std():.3g}")
    ax.set_yscale("log")
    ax.set_title("all deployed 3x3 conv kernels (seed %d)" % s["seeds"][0] if sel is None else f"{sel} (seed "
                 f"{s['seeds'][0]})")
    ax.set_xlabel("weight (BatchNorm folded)")
    ax.legend(fontsize=6.5)
  axes[1, 0].set_ylabel("count (log)")
  fig.suptitle(f"Per-tensor PTQ over {s['n']} seed(s): mean line, seeds as dots; kernel histograms of the deployed "
               "networks")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def report(args, r, s: dict, per_seed: dict, models, bits, timing: dict, scales_info) -> str:
  names = [n for n, *_ in schemes(bits)] + ([ORT] if ORT in s["schemes"] else [])
  n = s["n"]
  head = ["scheme"] + [f"{LABELS[m]} drop" for m in models] + ["RepVGG - RepOpt-VGG drop (points)"]
  rows = [[nm] + [_pts(s["schemes"][nm]["drop"][m]) for m in models] + [_diff(s["schemes"][nm]["drop_diff"])]
          for nm in names]
  drop_table = common.md_table(head, rows)
  rows = [[nm] + [_num(s["schemes"][nm]["logit_err"][m]) for m in models]
          + [_diff(s["schemes"][nm]["logit_err_diff"], 1, 4)] for nm in names]
  err_table = common.md_table(["scheme"] + [f"{LABELS[m]}" for m in models] + ["RepVGG - RepOpt-VGG"], rows)
  rows = [[nm] + [_pts(s["schemes"][nm]["flip"][m]) for m in models] + [_diff(s["schemes"][nm]["flip_diff"])]
          for nm in names]
  flip_table = common.md_table(["scheme"] + [f"{LABELS[m]} %" for m in models] + ["RepVGG - RepOpt-VGG (points)"],
                               rows)
  float_table = common.md_table(
      ["model", "float top-1 %"] + [f"seed {x}" for x in s["seeds"]],
      [[LABELS[m], _pts(s["float_top1"][m])] + [f"{100 * q['float_top1']:.2f}" for q in per_seed[m]]
       for m in models])
  seed_cols = [x for x in ("W8A8", f"W{min(bits)}A{min(bits)}", ORT) if x in s["schemes"]]
  seed_table = common.md_table(
      ["model", "seed"] + [f"{c} drop" for c in seed_cols],
      [[LABELS[m], sd] + [f"{100 * per_seed[m][i]['schemes'][c]['drop']:.2f}" for c in seed_cols]
       for m in models for i, sd in enumerate(s["seeds"])])
  ort = ""
  if ORT in s["schemes"]:
    gap = max(q["schemes"][ORT]["fp32_vs_jax_logit_err"] for m in models for q in per_seed[m])
    flips = max(q["schemes"][ORT]["fp32_vs_jax_flip"] for m in models for q in per_seed[m])
    ort = (f" The ORT row is measured against the float ONNX file, which matches the JAX float model to a logit "
           f"relative error of at most {common.fmt(gap)} ({100 * flips:.2f}% flips).")
  # Kernel statistics: pooled over seeds, and per layer (mean over seeds).
  ktab = common.md_table(
      ["model", "pooled std", "pooled max\\|w\\|/std", "pooled std before BN folding"],
      [[LABELS[m], _num(s["pooled_std"][m]), _num(s["pooled_max_over_std"][m]), _num(s["unfolded_pooled_std"][m])]
       for m in models] + [[f"paper: {LABELS[k].split(' ')[0]}-B1", PAPER[k]["kernel_std"], "-", "-"]
                           for k in ("repopt", "repvgg")])
  layer_names = [l[0] for l in per_seed["repopt"][0]["kernels"]["layers"]]
  lmean = {m: np.mean([[l[1:] for l in q["kernels"]["layers"]] for q in per_seed[m]], axis=0) for m in models}
  ltab = common.md_table(["layer"] + [f"{LABELS[m]} std" for m in models] + [f"{LABELS[m]} max/std" for m in models],
                         [[nm] + [lmean[m][i, 0] for m in models] + [lmean[m][i, 1] for m in models]
                          for i, nm in enumerate(layer_names)])
  paper_rows = [
      ["paper, ImageNet B1: INT8 (their PTQ)", f"{PAPER['repopt']['float']} -> {PAPER['repopt']['int8']}",
       f"{PAPER['repvgg']['float']} -> {PAPER['repvgg']['int8']}",
       f"{PAPER['repopt']['float'] - PAPER['repopt']['int8']:.2f}",
       f"{PAPER['repvgg']['float'] - PAPER['repvgg']['int8']:.2f}", f"{100 * s['paper']['drop_diff']:+.2f}"]]
  for nm in [x for x in ("W8A8", ORT) if x in s["schemes"]]:
    row = s["schemes"][nm]
    paper_rows.append([f"ours, {r.arch} on {r.dataset}: {nm}",
                       f"{100 * s['float_top1']['repopt'][0]:.2f} -> {100 * row['top1']['repopt'][0]:.2f}",
                       f"{100 * s['float_top1']['repvgg'][0]:.2f} -> {100 * row['top1']['repvgg'][0]:.2f}",
                       f"{100 * row['drop']['repopt'][0]:.2f}", f"{100 * row['drop']['repvgg'][0]:.2f}",
                       _diff(row["drop_diff"])])
  paper_table = common.md_table(["", "RepOpt-VGG top-1 %", "RepVGG top-1 %", "RepOpt-VGG drop", "RepVGG drop",
                                 "RepVGG - RepOpt-VGG drop"], paper_rows)
  body = [
      f"Networks: the study's main runs ({r.describe()}), {n} seed(s) {s['seeds']}, one run per model and seed "
      f"({', '.join(LABELS[m] for m in models)}; RepOpt-VGG with the Hyper-Searched constants of {scales_info}). "
      "Each is deployed (RepVGG fused), BatchNorm folded into the kernels, then quantized; evaluated on the "
      f"{per_seed['repopt'][0]['test_images']} test images. Our PTQ (`repopt_jax.quant`, fake-quantized): "
      "symmetric, per tensor, round to nearest in [-(2^(b-1)-1), 2^(b-1)-1]; `Wb` quantizes the weights of every "
      "conv and the head, `WbAb` also every conv/linear input (one scale per tensor, `max|x|` over "
      f"{args.calib_images} training images through the data pipeline). `{ORT}`: onnxruntime's `quantize_static` "
      "(QDQ, int8 symmetric per-tensor weights, uint8 MinMax activations) of the exported float network, "
      "calibrated on the same images, run by onnxruntime." + ort,
      "Definitions, used in every table and plot: **drop** = float top-1 - quantized top-1 (points); **logit "
      "error** = ||Q - F||_F / ||F||_F with F, Q the float and quantized logits of the whole test set; **flip "
      "rate** = fraction of test images whose argmax changes; **pooled std** = std of all deployed (BN-folded) "
      "3x3 conv kernel weights concatenated (the head excluded), **per-layer std** = std of one layer's deployed "
      "kernel; max|w|/std likewise. Cells: mean over seeds and, with more than one seed, the 95% t-interval "
      "(`study.t_interval`); RepVGG - RepOpt-VGG is paired by seed.",
      "## What reproduces\n\n" + "\n".join(f"- {v}" for v in verdicts(s, bits)),
      "## Paper vs ours\n\n" + paper_table + "\n\nThe paper's INT8 numbers are ImageNet top-1 of the full-width "
      f"B1 networks with its own PTQ setup; ours are `{r.arch}` on `{r.dataset}`. Only the direction "
      "and the order of magnitude of the gap are comparable.",
      "## Top-1 drop (points)\n\n" + drop_table,
      "## Logit relative error\n\n" + err_table,
      "## Prediction flip rate (% of test images)\n\n" + flip_table,
      "## Float models\n\n" + float_table,
      "## Per seed\n\n" + seed_table,
      "## Kernel statistics of the deployed networks\n\n" + ktab + "\n\nPer layer (mean over seeds; stds of each "
      "layer's own deployed kernel):\n\n" + ltab,
      "![drop, logit error and flip rate vs bits; kernel histograms](int8_ptq.png)",
      f"Time: {timing['wall_s']:.0f} s wall, {timing['cpu_s']:.0f} s CPU for the evaluation "
      f"(training not included; {timing['trained']}).",
  ]
  return "\n\n".join(body)


def main(argv=None) -> dict:
  args = parse_args(argv)
  # Only a temporary root this script made itself is ever removed; a runs root given or the study's default is
  # only read (or, with --train, added to).
  r, info, root, temporary = study.begin("int8_ptq.py", args, argv)
  models = [m for m in MODELS if m in args.models]
  options = study.compiler_options(r)
  try:
    trained = "runs reused"
    if args.quick or args.train:
      t0 = time.perf_counter()
      study.main_runs(root, r, args.seeds, models)
      trained = f"training/reuse {time.perf_counter() - t0:.0f} s"
    workdirs = check_runs(root, r, args.seeds, models)
    t0, c0 = time.perf_counter(), study.cpu_seconds()
    from repopt_jax import export  # pylint: disable=g-import-not-at-top
    config0 = workdirs[("repopt", args.seeds[0])][1]
    batches, labels = eval_batches(config0, r.eval_batch_size)
    per_seed = {m: [] for m in models}
    kernels0 = {}
    for seed in args.seeds:
      cfg = workdirs[("repopt", seed)][1]
      calib = export.calibration_images(cfg, args.calib_images)
      for m in models:
        res, kernels = evaluate_run(*workdirs[(m, seed)], m, calib, batches, labels, args.bits,
                                    onnx=not args.no_onnx, options=options)
        per_seed[m].append(res)
        if seed == args.seeds[0]:
          kernels0[m] = kernels
    scales = os.path.abspath(os.path.join(root, "hs", "scales.npz"))
    scales_info = ("a quick Hyper-Search" if temporary else
                   f"`{os.path.relpath(scales, common.ROOT) if scales.startswith(common.ROOT + os.sep) else scales}`")
  finally:
    if temporary:
      shutil.rmtree(root, ignore_errors=True)
  names = [n for n, *_ in schemes(args.bits)] + ([] if args.no_onnx else [ORT])
  summary = summarize(per_seed, args.seeds, models, names)
  timing = {"wall_s": time.perf_counter() - t0, "cpu_s": study.cpu_seconds() - c0, "trained": trained}
  os.makedirs(args.out, exist_ok=True)
  plot(os.path.join(args.out, "int8_ptq.png"), summary, per_seed, kernels0, models, args.bits)
  body = report(args, r, summary, per_seed, models, args.bits, timing, scales_info)
  config = {k: v for k, v in vars(args).items() if k != "out"}
  config["recipe"] = dataclasses.asdict(r)
  common.write_markdown(os.path.join(args.out, "int8_ptq.md"), "Post-training quantization: RepOpt-VGG vs RepVGG "
                        "vs plain VGG", info, config, body)
  runs_out = {m: [dict(q, seed=sd) for q, sd in zip(per_seed[m], args.seeds)] for m in models}
  common.write_json(os.path.join(args.out, "int8_ptq.json"),
                    {"info": vars(info), "config": config, "summary": summary, "runs": runs_out, "timing": timing})
  print(body.split("## Top-1 drop")[0].split("## What reproduces")[1] if "## What reproduces" in body else body)
  return {"summary": summary, "runs": per_seed, "timing": timing}


if __name__ == "__main__":
  main()
