"""Equivalence in practice: how far a RepOptimizer-trained plain model drifts from its multi-branch twin.

Side by side, on the same batches, in float32:

* SGD: the `csla` model (the imaginary multi-branch blocks, constant scales) trained by plain SGD (Nesterov,
  coupled L2 decay), and the `target` model started from it by the Rule of Initialization
  (`reparam.target_from_csla`) trained by `repopt_sgd`. In exact arithmetic they are the same network at
  every step; the relative drift of their eval-mode outputs on a fixed probe batch should stay at float32
  rounding.
* AdamW: the `csla` model trained by `optax.adamw`, against the target model trained by `repopt_adamw` in
  our exact form (`exact=True`) and in the paper's code's approximation (`exact=False`, the power-1 mult
  applied before and after Adam).

Two sets of random per-channel constants: 'signed' (`t` of both signs, as Hyper-Search can produce) and
'positive' (where the paper's AdamW differs from the exact form only through where `eps` enters).

The float32 pairs are a check of rounding, not of equivalence: training amplifies any float32 rounding
difference (the control pair, the *same* model started one ulp apart, shows how far rounding alone gets),
so after some steps their numbers say how chaotic training is. The evidence of equivalence is the float64
pairs, whose drift stays orders of magnitude below the float32 drifts.

Reproducible numbers: float32 (and float64) sums are split differently by XLA's CPU thread count and by the
convolution formulation (`repopt_jax.ops`: XLA's convolution or im2col + dot), and with training amplifying
rounding, either changes every float32 number after a few dozen steps. Both are pinned and recorded in the
report: `--cpu_threads 1` (the process is pinned to one core before JAX starts; 0 leaves it as is) and
`--conv lax` (XLA's own convolution: `model.conv_impl` of every model built here). The same command on the same machine
type and software then gives the same numbers, digit for digit (tests/test_experiments_gpu_bench.py runs
`--tiny` twice in fresh processes and compares every number).

Writes experiments/results/equivalence_drift.{md,png,json}.

Usage: python experiments/equivalence_drift.py [--steps 300] [--tiny] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments import common  # noqa: E402

PAIRS = (  # (key, label, reference run, compared run)
    ("sgd", "repopt_sgd (target) vs SGD (csla)", "csla_sgd", "target_repopt_sgd"),
    ("sgd_control", "control: SGD (csla, kernels +1 ulp) vs SGD (csla)", "csla_sgd", "csla_sgd_ulp"),
    ("adamw_exact", "repopt_adamw exact (target) vs AdamW (csla)", "csla_adamw", "target_adamw_exact"),
    ("adamw_paper", "repopt_adamw paper approx. (target) vs AdamW (csla)", "csla_adamw", "target_adamw_paper"),
)
F64_PAIRS = ("sgd", "adamw_exact")  # run again in float64 (--float64)
SCALE_SETS = ("signed", "positive")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--probe_size", type=int, default=64, help="test images whose outputs are compared")
  p.add_argument("--arch", default="tiny")
  p.add_argument("--dataset", default="digits")
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--sgd_lr", type=float, default=0.02)
  p.add_argument("--adamw_lr", type=float, default=1e-3)
  p.add_argument("--sgd_weight_decay", type=float, default=1e-4)
  p.add_argument("--adamw_weight_decay", type=float, default=1e-2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--data_dir", default=None)
  p.add_argument("--out", default=common.RESULTS, help="directory of the report")
  p.add_argument("--tag", default="", help="suffix of the report's file names")
  p.add_argument("--scale_sets", nargs="+", choices=SCALE_SETS, default=list(SCALE_SETS))
  p.add_argument("--float64", choices=("none", "sgd", "all"), default="all",
                 help="also run the SGD (and exact AdamW) pairs in float64, where rounding is 1e-16")
  p.add_argument("--pairs", nargs="+", choices=[k for k, *_ in PAIRS], default=[k for k, *_ in PAIRS],
                 help="the pairs to train (default: all; float64 runs those of them in %s)" % ", ".join(F64_PAIRS))
  p.add_argument("--conv", choices=("lax", "auto", "im2col"), default="lax",
                 help="convolution formulation of every model (model.conv_impl, repopt_jax.ops), pinned for "
                      "reproducible rounding (default: lax, XLA's own convolution)")
  p.add_argument("--cpu_threads", type=int, default=1,
                 help="pin the process to this many CPU cores before JAX starts, which fixes XLA's CPU thread "
                      "count and so how its sums are split (default 1; 0: leave the process as it is)")
  p.add_argument("--tiny", action="store_true",
                 help="smoke-test size: 4 steps, batch 8, probe 8, signed only, no float64, fast compile")
  args = p.parse_args(argv)
  if args.tiny:
    args.steps, args.batch_size, args.probe_size, args.scale_sets, args.float64 = 4, 8, 8, ["signed"], "none"
  return args


def pin_cpu_threads(n: int) -> dict:
  """Pins this process to its first `n` allowed CPU cores before JAX's CPU backend starts.

  XLA sizes its CPU thread pool from the cores the process may run on, and splits reductions (BatchNorm
  statistics, weight gradients) by it: the same program gives other float32 roundings with another count.

  Returns:
    `{'cpu_threads': n or None, 'cores_allowed': cores this process may run on now}`.

  Raises:
    SystemExit: `n > 0` but JAX's backends already started with another core count (a call from a process
      that already used JAX): run the script in a fresh process, or pass `--cpu_threads 0`.
  """
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

  allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  if n <= 0 or allowed is None:
    return {"cpu_threads": None, "cores_allowed": len(allowed) if allowed else os.cpu_count()}
  if len(allowed) != n:
    if xla_bridge.backends_are_initialized():
      raise SystemExit(f"--cpu_threads {n}: JAX already started in this process with {len(allowed)} cores; "
                       "run the script in a fresh process, or pass --cpu_threads 0")
    if len(allowed) < n:
      raise SystemExit(f"--cpu_threads {n}: only {len(allowed)} cores are available to this process")
    os.sched_setaffinity(0, allowed[:n])
  return {"cpu_threads": n, "cores_allowed": n}


def random_scales(arch, in_channels: int, kind: str, seed: int) -> dict:
  """Per-channel constants for every block: s in [0.5, 1.5], t signed in [-1, 1] or positive in [0.2, 1.2],
  identity weights gamma(0) in [0.5, 1.5]."""
  from repopt_jax import CSLAScales  # pylint: disable=g-import-not-at-top
  from repopt_jax.models import get_arch  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  out = {}
  for spec in get_arch(arch).block_specs(in_channels):
    c = spec.out_channels
    t = rng.uniform(-1.0, 1.0, c) if kind == "signed" else rng.uniform(0.2, 1.2, c)
    out[spec.name] = CSLAScales(conv=rng.uniform(0.5, 1.5, c), pointwise=t, identity=spec.has_identity,
                                identity_init=rng.uniform(0.5, 1.5, c) if spec.has_identity else None)
  return out


def config_for(args, mode: str, optim: str, exact: bool = True):
  from repopt_jax.config import load_config  # pylint: disable=g-import-not-at-top

  sgd = optim in ("sgd", "repopt_sgd")
  return load_config({
      "model": {"arch": args.arch, "mode": mode, "conv_impl": args.conv},
      "data": {"dataset": args.dataset, "image_size": args.image_size},
      "optim": {"name": optim, "lr": args.sgd_lr if sgd else args.adamw_lr, "schedule": "constant",
                "weight_decay": args.sgd_weight_decay if sgd else args.adamw_weight_decay, "exact": exact},
      "train": {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed},
      # The constants are built in memory (random_scales); the key only has to be set for a RepOptimizer.
      "scales": "in-memory" if optim.startswith("repopt") else None,
  })


def _ulp_up(model):
  """A copy of `model` with every parameter moved up by one ulp: a perturbation at float rounding level."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  out = nnx.clone(model)
  params = nnx.state(out, nnx.Param)
  nnx.update(out, jax.tree.map(lambda x: jnp.nextafter(x, jnp.asarray(jnp.inf, x.dtype)), params))
  return out


def _models(args, scales, spec, dtype: str):
  """`(csla, target)`: the csla model and the target model equal to it (Rule of Initialization)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from repopt_jax import train  # pylint: disable=g-import-not-at-top
  from repopt_jax.models import RepOptVGG, reparam  # pylint: disable=g-import-not-at-top

  kw = dict(num_classes=spec.num_classes, in_channels=spec.channels)
  if dtype == "float32":
    csla = train.build_model(config_for(args, "csla", "sgd"), scales, **kw)
  else:  # the trainer builds float32 params only; float64 is for this check
    make = lambda: RepOptVGG(args.arch, "csla", scales=scales, dtype=jnp.float64, param_dtype=jnp.float64,
                             conv_impl=args.conv, rngs=nnx.Rngs(args.seed), **kw)
    values = jax.jit(lambda: nnx.as_pure(nnx.state(make())), compiler_options=common.FAST_COMPILE)()
    csla = nnx.merge(nnx.graphdef(nnx.eval_shape(make)), values)
    csla.train()
  target = reparam.target_from_csla(csla)
  target.train()
  return csla, target


def run_lockstep(args, scales, spec, mesh, dtype: str, pair_keys) -> dict:
  """Trains the runs of `pair_keys` in lockstep on the same batches; returns per-step drifts and losses."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from repopt_jax import data  # pylint: disable=g-import-not-at-top

  csla, target = _models(args, scales, spec, dtype)
  makers = {
      "csla_sgd": lambda: (config_for(args, "csla", "sgd"), csla),
      "target_repopt_sgd": lambda: (config_for(args, "target", "repopt_sgd"), target),
      "csla_sgd_ulp": lambda: (config_for(args, "csla", "sgd"), _ulp_up(csla)),
      "csla_adamw": lambda: (config_for(args, "csla", "adamw"), csla),
      "target_adamw_exact": lambda: (config_for(args, "target", "repopt_adamw", exact=True), target),
      "target_adamw_paper": lambda: (config_for(args, "target", "repopt_adamw", exact=False), target),
  }
  pairs = [p for p in PAIRS if p[0] in pair_keys]
  names = list(dict.fromkeys(n for _, _, ref, cmp in pairs for n in (ref, cmp)))
  steppers = {}
  options = common.FAST_COMPILE if args.tiny else None
  for n in names:
    cfg, m = makers[n]()
    like = steppers.get("csla_sgd") if n == "csla_sgd_ulp" else None  # same program, other start
    steppers[n] = common.Stepper(cfg, m, scales, mesh=mesh, num_classes=spec.num_classes, like=like,
                                 compiler_options=options)
  np_dtype = np.float64 if dtype == "float64" else np.float32
  it = data.make_iterator(args.dataset, "train", global_batch_size=args.batch_size, train=True, seed=args.seed,
                          image_size=args.image_size, data_dir=args.data_dir, process_index=0, process_count=1)
  probe_batch = next(data.make_iterator(args.dataset, spec.eval_split, global_batch_size=args.probe_size,
                                        train=False, seed=0, image_size=args.image_size, data_dir=args.data_dir,
                                        process_index=0, process_count=1))
  probe = jnp.asarray(probe_batch["image"].astype(np_dtype))
  probe_labels = np.asarray(probe_batch["label"])

  def drifts():
    out = {k: s.logits(probe) for k, s in steppers.items()}
    return {key: float(jnp.linalg.norm(out[cmp] - out[ref]) / jnp.linalg.norm(out[ref]))
            for key, _, ref, cmp in pairs}

  hist = {key: [v] for key, v in drifts().items()}  # step 0: the Rule of Initialization alone
  losses = {k: [] for k in steppers}
  t0 = time.perf_counter()
  for _ in range(args.steps):
    host = next(it)
    host["image"] = host["image"].astype(np_dtype)
    batch = data.global_batch(host, mesh)
    for k, s in steppers.items():
      losses[k].append(s.step(batch)["loss"])
    for key, v in drifts().items():
      hist[key].append(v)
  jax.block_until_ready([s.state for s in steppers.values()])
  losses = {k: [float(x) for x in jax.device_get(v)] for k, v in losses.items()}
  accs = {k: float(np.mean(np.argmax(np.asarray(s.logits(probe)), -1) == probe_labels))
          for k, s in steppers.items()}
  return {"drift": hist, "loss": losses, "probe_accuracy": accs, "seconds": time.perf_counter() - t0}


def run_scale_set(args, kind: str, spec, mesh) -> dict:
  """The float32 pairs, and the float64 ones when asked, for one set of constants."""
  import jax  # pylint: disable=g-import-not-at-top

  scales = random_scales(args.arch, spec.channels, kind, args.seed + 1)
  res = run_lockstep(args, scales, spec, mesh, "float32", args.pairs)
  keys = [k for k in (F64_PAIRS if args.float64 == "all" else ("sgd",)) if k in args.pairs]
  if args.float64 != "none" and keys:
    old = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
      res64 = run_lockstep(args, scales, spec, mesh, "float64", keys)
    finally:
      jax.config.update("jax_enable_x64", old)
    res["drift"].update({f"{k}_f64": v for k, v in res64["drift"].items()})
    res["seconds"] += res64["seconds"]
  return res


def pair_labels():
  """`(key, label)` of every curve: the float32 pairs, then the float64 ones."""
  out = [(k, label) for k, label, *_ in PAIRS]
  out += [(f"{k}_f64", label.replace("(csla)", "(csla), float64")) for k, label, *_ in PAIRS if k in F64_PAIRS]
  return out


def plot(path: str, results: dict, steps: int) -> None:
  plt = common.setup_matplotlib()
  fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.2), sharey=True, squeeze=False)
  styles = {"sgd": ("tab:blue", "-"), "sgd_control": ("grey", "-"), "adamw_exact": ("tab:green", "-"),
            "adamw_paper": ("tab:red", "--"), "sgd_f64": ("tab:blue", ":"), "adamw_exact_f64": ("tab:green", ":")}
  for ax, (kind, res) in zip(axes[0], results.items()):
    x = np.arange(len(next(iter(res["drift"].values()))))
    for key, label in pair_labels():
      if key not in res["drift"]:
        continue
      color, ls = styles[key]
      y = np.maximum(np.asarray(res["drift"][key]), 1e-17)
      ax.semilogy(x, y, color=color, ls=ls, label=label, lw=1.2 if key != "sgd_control" else 2.5,
                  alpha=1.0 if key != "sgd_control" else 0.5)
    ax.axhline(np.finfo(np.float32).eps, color="black", lw=0.8, ls=":", label="float32 eps")
    ax.set_title(f"{kind} constants")
    ax.set_xlabel("optimizer step")
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].set_ylabel("relative output drift  ||f_target - f_csla|| / ||f_csla||")
  axes[0][0].legend(fontsize=8, loc="lower right")
  fig.suptitle(f"Equivalence over {steps} steps (eval-mode logits on a fixed probe batch)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> dict:
  args = parse_args(argv)
  pinned = pin_cpu_threads(args.cpu_threads)  # before anything starts JAX's backends
  import jax  # pylint: disable=g-import-not-at-top
  from repopt_jax import data, train  # pylint: disable=g-import-not-at-top

  info = common.RunInfo.collect(["python", "experiments/equivalence_drift.py"] + list(
      sys.argv[1:] if argv is None else argv))
  spec = data.dataset_info(args.dataset, args.data_dir)
  mesh = train.make_mesh(jax.devices()[:1])
  results = {kind: run_scale_set(args, kind, spec, mesh) for kind in args.scale_sets}
  threads = (f"pinned to {pinned['cpu_threads']} core(s) before JAX started (`--cpu_threads "
             f"{pinned['cpu_threads']}`), so XLA's CPU thread pool has that size" if pinned["cpu_threads"]
             else f"not pinned (`--cpu_threads 0`): {pinned['cores_allowed']} cores allowed")
  conditions = (f"Pinned for reproducibility: the process {threads}; the convolution formulation is "
                f"`{args.conv}` (`--conv`: `model.conv_impl` of every model, `repopt_jax.ops`); the batches, "
                f"probe images, constants and initial parameters come from seed {args.seed}. Both change how "
                "sums are rounded, and training amplifies any rounding difference, so another thread count or "
                "formulation gives other numbers (in float32 entirely other ones after a few dozen steps). "
                "With these fixed, the same command on the same CPU type and "
                "software versions reproduces every number (tests/test_experiments_gpu_bench.py runs `--tiny` "
                "twice and compares them).")

  marks = sorted({0, 1, min(10, args.steps), min(50, args.steps), min(100, args.steps), args.steps // 2,
                  args.steps})
  body = [
      "Relative drift `||f_target(x) - f_csla(x)|| / ||f_csla(x)||` of the eval-mode logits on a fixed batch of "
      f"{args.probe_size} {args.dataset} test images, after the given number of optimizer steps (step 0: the "
      "Rule of Initialization alone). Both runs of a pair see the same batches. float32 unless marked "
      f"float64, on {info.devices}. The control pair is two plain-SGD runs of the *same* csla model, one started "
      "with every parameter moved by one ulp: how much float32 rounding alone is amplified by training, the "
      "noise floor the RepOptimizer pair should be compared with.",
      "In float32, training amplifies rounding: a pair's drift can grow from about 1e-7 to the size of the "
      "difference between two separately trained networks, after a number of steps that depends on the "
      "rounding details themselves; the control pair shows how far rounding alone gets. So the float32 rows "
      "cannot tell rounding from a wrong rule. **float64 is the evidence of equivalence**: every pair starts "
      "about 1e9 times closer, a pair that is equal in exact arithmetic stays far below the float32 drifts, "
      "and a wrong Rule of Iteration or Initialization would give an error that does not shrink with the "
      "precision.",
      conditions,
  ]
  for kind, res in results.items():
    rows = []
    for key, label in pair_labels():
      if key in res["drift"]:
        d = res["drift"][key]
        rows.append([label] + [d[m] for m in marks] + [max(d)])
    body.append(f"## {kind} constants\n\n" + common.md_table(
        ["pair"] + [f"step {m}" for m in marks] + ["max"], rows))
    acc_rows = [[k, res["loss"][k][0] if res["loss"][k] else None, res["loss"][k][-1] if res["loss"][k] else None,
                 res["probe_accuracy"][k]] for k in res["loss"]]
    body.append(common.md_table(["run", "first loss", "last loss", "probe accuracy"], acc_rows))
    d = res["drift"]
    top = lambda k: common.fmt(max(d[k])) if k in d else "-"
    body.append(f"Training took {res['seconds']:.1f} s. Largest drift over the run: RepOpt-SGD pair "
                f"{top('sgd')} vs float32 control {top('sgd_control')}"
                + (f"; in float64 {top('sgd_f64')}" if "sgd_f64" in d else "")
                + f". Exact AdamW {top('adamw_exact')}"
                + (f" (float64 {top('adamw_exact_f64')})" if "adamw_exact_f64" in d else "")
                + f" vs the paper's approximation {top('adamw_paper')}.")
  stem = os.path.join(args.out, f"equivalence_drift{args.tag}")
  body.append(f"![drift](equivalence_drift{args.tag}.png)")
  os.makedirs(args.out, exist_ok=True)
  plot(stem + ".png", results, args.steps)
  config = {k: v for k, v in vars(args).items() if k != "out"}
  config["cores_allowed"] = pinned["cores_allowed"]
  common.write_markdown(stem + ".md", "Equivalence drift: RepOptimizer vs the multi-branch model", info, config,
                        "\n\n".join(body))
  summary = {kind: {key: {"final": d[-1], "max": max(d)} for key, d in res["drift"].items()}
             for kind, res in results.items()}
  common.write_json(stem + ".json",
                    {"info": vars(info), "config": config, "summary": summary,
                     "drift": {k: r["drift"] for k, r in results.items()}})
  for kind in summary:
    print(kind, {k: f"final {v['final']:.2e} max {v['max']:.2e}" for k, v in summary[kind].items()})
  return summary


if __name__ == "__main__":
  main()
