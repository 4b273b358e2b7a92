"""Training speed and memory (the paper's Fig. 5), and inference speed of the deployed model.

For each architecture, at one image size and batch, three runs of the trainer's own compiled `TrainStep`:

* `repopt`: the plain `target` model (conv-BN-ReLU) trained by `repopt_sgd` (the Grad Mult inside the update);
* `repvgg`: the multi-branch `repvgg` model (3x3-BN + 1x1-BN + identity-BN) trained by SGD;
* `plain`: the same `target` model trained by plain SGD (the Grad Mult's cost: ratio repopt/plain ~ 1).

Measured: train images/s (best of several timed rounds, runs interleaved so that load on shared machines
hits all of them alike; on CPU also images per CPU-second of this process, which other jobs barely
disturb, and the CPU ratios use those), the compiled memory of the train step from XLA's memory analysis of the jitted
step (arguments + outputs + temporaries - aliased; the state is donated so it counts once), the largest batch
whose compiled step fits a memory budget (a search on the compiled memory analysis, seeded by a linear fit,
nothing is run), the memory per example (the slope of the compiled step's memory between the benchmark batch
and twice it: activations and other per-example buffers, independent of any budget; the RepVGG / RepOpt-VGG
ratio of these slopes is what decides how much larger a batch RepOpt-VGG trains on a large memory), and
inference images/s of the deployed model (`reparam.fuse_repvgg` of the RepVGG, the
same network as a trained RepOpt-VGG) against the un-fused RepVGG in eval mode. Inputs are random images.

CPU default: cifar_tiny at 32 px (batch 32) and B1 at 64 px (batch 8). GPU (`--gpu`, or automatically when a
GPU is present): B1, B2, L1, L2 at 224 px, bfloat16 compute, batch 32, with an 11 GiB budget (the paper's
2080 Ti) for the largest batch.

Writes experiments/results/speed_memory[_gpu].{md,json,png}.

Usage: python experiments/speed_memory.py [--gpu] [--archs B1:224:32:20 ...] [--tiny] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments import common  # noqa: E402

RUNS = (  # name, model mode, optimizer
    ("repopt", "target", "repopt_sgd"),
    ("repvgg", "repvgg", "sgd"),
    ("plain", "target", "sgd"),
)
CPU_ARCHS = ("cifar_tiny:32:32:10", "B1:64:8:1")
GPU_ARCHS = ("B1:224:32:20", "B2:224:32:20", "L1:224:32:20", "L2:224:32:20")
TINY_ARCHS = ("tiny:32:4:2",)
GIB = 1024 ** 3


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--archs", nargs="+", default=None,
                 help="ARCH:IMAGE_SIZE:BATCH:TIMED_STEPS entries (default: CPU or GPU set)")
  p.add_argument("--gpu", action="store_true", help="the GPU set (B1/B2/L1/L2 at 224, bfloat16)")
  p.add_argument("--compute_dtype", choices=("float32", "bfloat16"), default=None,
                 help="default: bfloat16 on GPU, float32 on CPU")
  p.add_argument("--rounds", type=int, default=None,
                 help="timed rounds per run, the best counts (default: 10 on CPU, where other processes "
                      "interrupt, 3 on GPU)")
  p.add_argument("--memory_budget_gib", type=float, default=None,
                 help="budget for the largest batch; default 11 on GPU, else twice the RepVGG step's memory")
  p.add_argument("--max_probes", type=int, default=8, help="compilations allowed per largest-batch search")
  p.add_argument("--no_max_batch", action="store_true", help="skip the largest-batch search")
  p.add_argument("--probe_options", default=None,
                 help="JSON dict of XLA options for the largest-batch probes only (e.g. "
                      "'{\"xla_gpu_autotune_level\": 0}': memory needs no conv autotuning)")
  p.add_argument("--no_inference", action="store_true", help="skip the inference comparison")
  p.add_argument("--infer_steps", type=int, default=None, help="timed inference batches (default: timed steps)")
  p.add_argument("--conv", choices=("auto", "lax", "im2col"), default="auto",
                 help="convolution formulation of the models (model.conv_impl, repopt_jax.ops; default 'auto', "
                      "the trainer's default): 'auto' computes convolutions with small outputs as im2col + dot on "
                      "CPU, which changes their speed and memory")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=common.RESULTS)
  p.add_argument("--tag", default=None, help="report name suffix (default: '_gpu' on GPU, '' on CPU)")
  p.add_argument("--tiny", action="store_true",
                 help="smoke-test size: the tiny arch, batch 4, 2 steps, 1 round, 6 probes, fast compile")
  args = p.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  args.on_gpu = jax.default_backend() == "gpu"
  gpu = args.gpu or args.on_gpu
  if args.tiny:
    args.archs, args.rounds, args.max_probes = list(TINY_ARCHS), 1, 6
  elif args.archs is None:
    args.archs = list(GPU_ARCHS if gpu else CPU_ARCHS)
  args.compute_dtype = args.compute_dtype or ("bfloat16" if gpu else "float32")
  args.rounds = args.rounds or (3 if gpu else 10)
  if args.memory_budget_gib is None and gpu:
    args.memory_budget_gib = 11.0
  if args.tag is None:
    args.tag = "_gpu" if gpu else ""
  args.entries = [parse_entry(e) for e in args.archs]
  return args


def parse_entry(text: str):
  try:
    arch, size, batch, steps = text.split(":")
    return arch, int(size), int(batch), int(steps)
  except ValueError:
    raise SystemExit(f"--archs entry {text!r} is not ARCH:IMAGE_SIZE:BATCH:TIMED_STEPS") from None


def config_for(arch, mode, optim, batch, image_size, num_classes, compute_dtype, seed, conv_impl="auto"):
  from repopt_jax.config import load_config  # pylint: disable=g-import-not-at-top
  return load_config({
      "model": {"arch": arch, "mode": mode, "num_classes": num_classes, "conv_impl": conv_impl},
      # The benchmark feeds random images; the dataset names what they stand in for.
      "data": {"dataset": "imagenet2012" if num_classes == 1000 else "cifar10", "image_size": image_size},
      "optim": {"name": optim, "lr": 0.1, "weight_decay": 4e-5, "schedule": "constant"},
      "train": {"steps": 1, "batch_size": batch, "seed": seed, "compute_dtype": compute_dtype},
      "scales": "hs-init" if optim.startswith("repopt") else None,
  })


def compiled_memory(compiled) -> dict:
  """Bytes from XLA's memory analysis of a compiled step; `total` counts donated (aliased) buffers once."""
  m = compiled.memory_analysis()
  arg, out, tmp, alias = (int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.temp_size_in_bytes),
                          int(m.alias_size_in_bytes))
  return {"argument": arg, "output": out, "temp": tmp, "alias": alias, "total": arg + out + tmp - alias,
          "peak": int(getattr(m, "peak_memory_in_bytes", 0) or 0)}


def largest_batch(memory_of, budget: int, known: dict, max_probes: int) -> dict:
  """The largest batch `b` with `memory_of(b) <= budget`: a search over compiled steps.

  Memory grows about linearly with the batch, so each probe is the linear prediction from the two measured
  batches nearest the budget, kept strictly inside the current bracket; doubling or bisection while there is
  only one point. With exactly linear memory it ends after the predicted batch and its successor.

  Args:
    memory_of: batch -> compiled bytes.
    budget: bytes.
    known: `{batch: bytes}` already measured (at least one entry).
    max_probes: compilations allowed.

  Returns:
    `{'batch': largest fitting batch found (0 if none), 'exact': whether batch + 1 is known not to fit,
    'probes': compilations used, 'bytes_per_example': slope of the last fit (None without two points),
    'batch_bytes': memory of 'batch' (None for 0), 'next_batch': smallest batch known not to fit (None if
    none), 'next_bytes': its memory}`.

  Example:
    >>> largest_batch(lambda b: 1000 + 37 * b, 5000, {8: 1296}, 8)['batch']  # (5000 - 1000) // 37
    108
  """
  known = dict(known)
  probes = 0
  slope = None

  def bracket():
    fits = [b for b, m in known.items() if m <= budget]
    over = [b for b, m in known.items() if m > budget]
    return max(fits, default=0), min(over, default=None)

  while probes < max_probes:
    lo, hi = bracket()
    if hi is not None and hi - lo <= 1:
      break
    if len(known) >= 2:
      (b0, m0), (b1, m1) = sorted(sorted(known.items(), key=lambda p: abs(p[1] - budget))[:2])
      slope = (m1 - m0) / (b1 - b0)
    if slope is not None and slope > 0:
      b0, m0 = min(known.items(), key=lambda p: abs(p[1] - budget))
      guess = int(math.floor(b0 + (budget - m0) / slope))
    else:
      guess = 2 * lo if hi is None else (lo + hi) // 2
    guess = max(guess, lo + 1)
    if hi is not None:
      guess = min(guess, hi - 1)
    if guess in known:
      guess = 2 * lo if hi is None else (lo + hi) // 2
    if guess < 1 or guess in known:
      break
    known[guess] = memory_of(guess)
    probes += 1
  lo, hi = bracket()
  return {"batch": lo, "exact": hi is not None and hi == lo + 1, "probes": probes, "bytes_per_example": slope,
          "batch_bytes": known.get(lo), "next_batch": hi, "next_bytes": None if hi is None else known[hi]}


def per_example_memory(memory_of, batches) -> dict:
  """Compiled memory per example: the slope of `memory_of` between two batch sizes.

  The train step's memory is a fixed part (parameters, optimizer state, their gradients) plus a part that
  grows with the batch (activations kept for the backward pass, their gradients, the input). The slope
  between two batches measures the second part alone, with no memory budget involved.

  Args:
    memory_of: batch -> compiled bytes.
    batches: two different batch sizes.

  Returns:
    `{'batches': [b0, b1], 'bytes': [m0, m1], 'bytes_per_example': (m1 - m0) / (b1 - b0)}`.

  Example:
    >>> per_example_memory(lambda b: 1000 + 37 * b, (8, 16))['bytes_per_example']
    37.0
  """
  b0, b1 = sorted(int(b) for b in batches)
  if b0 == b1 or b0 < 1:
    raise ValueError(f"per_example_memory: needs two different positive batch sizes, got {batches}")
  m0, m1 = memory_of(b0), memory_of(b1)
  return {"batches": [b0, b1], "bytes": [int(m0), int(m1)], "bytes_per_example": (m1 - m0) / (b1 - b0)}


def random_batch(batch, image_size, channels, num_classes, seed):
  rng = np.random.default_rng(seed)
  return {"image": rng.standard_normal((batch, image_size, image_size, channels), dtype=np.float32),
          "label": rng.integers(0, num_classes, batch).astype(np.int32)}


def time_rounds(fns: dict, steps: int, rounds: int) -> dict:
  """Interleaved timing: each round runs every fn `steps` times.

  Returns, per fn, the best seconds per call over the rounds by the wall clock (`'wall'`) and by this
  process's CPU time (`'cpu'`, all threads). On a CPU shared with other jobs the wall clock mostly measures
  the other jobs; CPU seconds per call barely depend on them.
  """
  import jax  # pylint: disable=g-import-not-at-top
  best = {k: {"wall": float("inf"), "cpu": float("inf")} for k in fns}
  for _ in range(rounds):
    for k, fn in fns.items():
      w0, c0 = time.perf_counter(), time.process_time()
      out = None
      for _ in range(steps):
        out = fn()
      jax.block_until_ready(out)
      w, c = (time.perf_counter() - w0) / steps, (time.process_time() - c0) / steps
      best[k] = {"wall": min(best[k]["wall"], w), "cpu": min(best[k]["cpu"], c)}
  return best


def bench_arch(args, arch: str, image_size: int, batch: int, steps: int, mesh, log, known_memory=None,
               max_batch: bool = True) -> dict:
  """One ARCH:IMAGE_SIZE:BATCH entry. `known_memory`: `{run: {batch: bytes}}` of earlier entries of the same
  arch and size, which seed the largest-batch search (run only when `max_batch`)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from repopt_jax import data, train  # pylint: disable=g-import-not-at-top
  from repopt_jax.models import count_params, flops, reparam  # pylint: disable=g-import-not-at-top

  num_classes = 10 if arch in ("tiny", "cifar_tiny") else 1000
  cfg = lambda mode, optim, b=batch: config_for(arch, mode, optim, b, image_size, num_classes, args.compute_dtype,
                                               args.seed, conv_impl=args.conv)
  # The HS initialisation as constants: speed and memory do not depend on their values.
  scales = reparam.scales_from_hs(train.build_model(cfg("hs", "sgd")))
  host_batch = random_batch(batch, image_size, 3, num_classes, args.seed)
  gbatch = data.global_batch(host_batch, mesh)
  res = {"arch": arch, "image_size": image_size, "batch": batch, "runs": {}}
  steppers = {}
  options = common.FAST_COMPILE if args.tiny else None
  for name, mode, optim in RUNS:
    t0 = time.perf_counter()
    model = train.build_model(cfg(mode, optim), scales if optim.startswith("repopt") else None)
    st = common.Stepper(cfg(mode, optim), model, scales, mesh=mesh, num_classes=num_classes,
                        compiler_options=options)
    mem = compiled_memory(st.compiled(gbatch))
    for _ in range(2):  # warm-up
      st.step(gbatch)
    jax.block_until_ready(st.state)
    steppers[name] = st
    res["runs"][name] = {"memory": mem, "train_params": count_params(model),
                         "macs_per_image": flops(arch, image_size, num_classes, mode=mode),
                         "setup_s": time.perf_counter() - t0}
    log(f"{arch}@{image_size} b{batch} {name}: compiled, {mem['total'] / 2**20:.1f} MiB")
  best = time_rounds({k: (lambda s=s: s.step(gbatch)) for k, s in steppers.items()}, steps, args.rounds)
  for k, sec in best.items():
    res["runs"][k]["step_s"] = sec["wall"]
    res["runs"][k]["step_cpu_s"] = sec["cpu"]
    res["runs"][k]["train_images_per_s"] = batch / sec["wall"]
    res["runs"][k]["train_images_per_cpu_s"] = batch / sec["cpu"]

  # Compiled memory at other batches (nothing is run): per example for every run, and the largest batch within
  # the budget for the two models the paper compares. With --probe_options every point, the benchmark batch
  # included, is compiled with those options, so that a slope never mixes two compilations' choices.
  probe_options = json.loads(args.probe_options) if args.probe_options else None
  measured = {name: {} for name in steppers}

  def memory_fn(name):
    st = steppers[name]

    def memory_of(b):
      if b not in measured[name]:
        if b == batch and probe_options is None:
          measured[name][b] = res["runs"][name]["memory"]["total"]
        else:
          abstract = {"image": jax.ShapeDtypeStruct((b, image_size, image_size, 3), np.float32),
                      "label": jax.ShapeDtypeStruct((b,), np.int32)}
          compiled = (st.compiled(abstract) if probe_options is None
                      else st.step_fn.lower(st.state, abstract).compile(probe_options))
          measured[name][b] = compiled_memory(compiled)["total"]
      return measured[name][b]
    return memory_of

  for name in steppers:
    per = per_example_memory(memory_fn(name), (batch, 2 * batch))
    res["runs"][name]["memory_per_example"] = per
    log(f"{arch}@{image_size} {name}: {per['bytes_per_example'] / 2**20:.3f} MiB per example "
        f"(batches {per['batches']})")
  res["per_example_ratio"] = (res["runs"]["repvgg"]["memory_per_example"]["bytes_per_example"]
                              / res["runs"]["repopt"]["memory_per_example"]["bytes_per_example"])

  budget = (args.memory_budget_gib * GIB if args.memory_budget_gib
            else 2 * res["runs"]["repvgg"]["memory"]["total"])
  res["memory_budget_bytes"] = int(budget)
  if not args.no_max_batch and max_batch:
    for name in ("repopt", "repvgg"):
      known = {**(known_memory or {}).get(name, {}), **measured[name]}
      found = largest_batch(memory_fn(name), budget, known, args.max_probes)
      found["seed_batches"] = sorted(known)
      res["runs"][name]["max_batch"] = found
      log(f"{arch} {name}: largest batch within {budget / GIB:.2f} GiB: {found}")

  if args.no_inference:
    res["deployed_params"] = count_params(reparam.fuse_repvgg(steppers["repvgg"].model()))
    return res
  # Inference: the deployed (fused) network against the un-fused RepVGG, eval mode, same batch.
  repvgg = steppers["repvgg"].model()
  fused = reparam.fuse_repvgg(repvgg)
  x = gbatch["image"]
  fwd = {}
  for name, m in (("deployed", fused), ("repvgg_unfused", repvgg)):
    g, s = nnx.split(m)
    f = jax.jit(lambda s, x, g=g: nnx.merge(g, s)(x), compiler_options=options)
    jax.block_until_ready(f(s, x))
    fwd[name] = lambda f=f, s=s: f(s, x)
  out_fused, out_ref = fwd["deployed"](), fwd["repvgg_unfused"]()
  res["fusion_max_rel_diff"] = float(np.max(np.abs(np.asarray(out_fused, np.float32) - np.asarray(out_ref, np.float32)))
                                     / max(float(np.max(np.abs(np.asarray(out_ref, np.float32)))), 1e-30))
  ibest = time_rounds(fwd, args.infer_steps or steps, args.rounds)
  res["inference_images_per_s"] = {k: batch / v["wall"] for k, v in ibest.items()}
  res["inference_images_per_cpu_s"] = {k: batch / v["cpu"] for k, v in ibest.items()}
  res["deployed_params"] = count_params(fused)
  return res


def report_rows(results, cpu: bool):
  """Table rows; on CPU the speed ratios use CPU seconds (robust to other jobs), on GPU the wall clock.

  Returns `(speed, memory, max_batch, inference)` row lists."""
  r = lambda a, b: a / b if a and b else None
  speed, memory, maxb, infer = [], [], [], []
  key = "train_images_per_cpu_s" if cpu else "train_images_per_s"
  for res in results:
    runs = res["runs"]
    tag = f"{res['arch']} @{res['image_size']}px, batch {res['batch']}"
    ips = {k: v["train_images_per_s"] for k, v in runs.items()}
    rate = {k: v[key] for k, v in runs.items()}
    row = [tag, ips["repopt"], ips["repvgg"], ips["plain"]]
    if cpu:
      row += [rate["repopt"], rate["repvgg"], rate["plain"]]
    speed.append(row + [r(rate["repopt"], rate["repvgg"]), r(rate["plain"], rate["repopt"])])
    mem = {k: v["memory"]["total"] / 2 ** 20 for k, v in runs.items()}
    per = {k: v["memory_per_example"]["bytes_per_example"] / 2 ** 20 if "memory_per_example" in v else None
           for k, v in runs.items()}
    memory.append([tag, mem["repopt"], mem["repvgg"], mem["plain"], r(mem["repopt"], mem["repvgg"]),
                   per["repopt"], per["repvgg"], per["plain"], r(per["repvgg"], per["repopt"])])
    mb = {k: runs[k].get("max_batch", {}).get("batch") for k in ("repopt", "repvgg")}
    if any(mb.values()):
      maxb.append([tag, res["memory_budget_bytes"] / GIB, mb["repopt"], mb["repvgg"], r(mb["repopt"], mb["repvgg"]),
                   r(per["repvgg"], per["repopt"])])
    if "inference_images_per_s" not in res:  # --no_inference
      continue
    inf = res["inference_images_per_cpu_s" if cpu else "inference_images_per_s"]
    infer.append([tag, res["inference_images_per_s"]["deployed"], res["inference_images_per_s"]["repvgg_unfused"],
                  r(inf["deployed"], inf["repvgg_unfused"]), res["deployed_params"], runs["repvgg"]["train_params"],
                  res["fusion_max_rel_diff"]])
  return speed, memory, maxb, infer


# The runs as the tables define them (legends say the same).
LEGEND = {"repopt": "repopt: target model + RepOpt-SGD", "repvgg": "repvgg: RepVGG training-time model + SGD",
          "plain": "plain: target model + plain SGD"}
COLORS = {"repopt": "tab:green", "repvgg": "tab:red", "plain": "tab:blue"}


def _num(v) -> str:
  return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _bars(ax, labels, series: dict, title: str, fmt=_num):
  """Grouped bars with their values written on them; a log axis when the values span more than a decade
  (its lower limit a power of ten below the smallest bar), else a linear axis from 0."""
  x = np.arange(len(labels))
  values = [v for vs in series.values() for v in vs if v]
  log = bool(values) and max(values) / min(values) > 10
  w = 0.8 / max(len(series), 1)
  for i, (name, vs) in enumerate(series.items()):
    pos = x + (i - (len(series) - 1) / 2) * w
    heights = [v if v else 0 for v in vs]
    ax.bar(pos, heights, w, label=LEGEND[name], color=COLORS[name])
    for p_, v in zip(pos, vs):
      if v:
        ax.text(p_, v, fmt(v), ha="center", va="bottom", fontsize=7, rotation=90 if len(labels) > 2 else 0)
  if log:
    ax.set_yscale("log")
    lo, hi = min(values), max(values)
    ax.set_ylim(10 ** math.floor(math.log10(lo)), 10 ** (math.log10(hi) + 0.35 * max(math.log10(hi / lo), 1)))
    title += " (log scale)"
  else:
    ax.set_ylim(0, 1.25 * max(values) if values else 1)
  ax.set_xticks(x, labels)
  ax.set_title(title, fontsize=10)


def plot(path, results, cpu: bool = False):
  """Four panels: train speed, compiled step memory, memory per example, largest batch within the budget
  (annotated with the max-batch ratio and the per-example memory ratio)."""
  plt = common.setup_matplotlib()
  fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
  labels = [f"{r['arch']}@{r['image_size']}\nbatch {r['batch']}" for r in results]
  names = ("repopt", "repvgg", "plain")
  key = "train_images_per_cpu_s" if cpu else "train_images_per_s"
  _bars(axes[0, 0], labels, {n: [r["runs"][n][key] for r in results] for n in names},
        "train images per CPU-second (higher is better)" if cpu else "train images/s (higher is better)")
  _bars(axes[0, 1], labels, {n: [r["runs"][n]["memory"]["total"] / 2 ** 20 for r in results] for n in names},
        "compiled train-step memory at the batch, MiB")
  per = lambda r, n: (r["runs"][n]["memory_per_example"]["bytes_per_example"] / 2 ** 20
                      if "memory_per_example" in r["runs"][n] else None)
  _bars(axes[1, 0], labels, {n: [per(r, n) for r in results] for n in names},
        "memory per example (slope between batch and 2x batch), MiB")
  ax = axes[1, 1]
  mb = {n: [r["runs"][n].get("max_batch", {}).get("batch") for r in results] for n in ("repopt", "repvgg")}
  _bars(ax, labels, mb, "largest batch within the memory budget", fmt=lambda v: str(int(v)))
  for i, r in enumerate(results):
    a, b = mb["repopt"][i], mb["repvgg"][i]
    notes = []
    if a and b:
      notes.append(f"max batch repopt/repvgg {a / b:.2f}")
    if r.get("per_example_ratio"):
      notes.append(f"memory/example repvgg/repopt {r['per_example_ratio']:.2f}")
    if r.get("memory_budget_bytes"):
      notes.append(f"budget {r['memory_budget_bytes'] / GIB:.3g} GiB")
    ax.text(i, ax.get_ylim()[1] * (0.97 if ax.get_yscale() == "linear" else 0.8), "\n".join(notes),
            ha="center", va="top", fontsize=7)
  handles, texts = axes[0, 0].get_legend_handles_labels()
  fig.legend(handles, texts, loc="lower center", ncol=3, fontsize=9, frameon=False)
  fig.tight_layout(rect=(0, 0.04, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> list:
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from repopt_jax import train  # pylint: disable=g-import-not-at-top

  info = common.RunInfo.collect(["python", "experiments/speed_memory.py"] + list(
      sys.argv[1:] if argv is None else argv))
  mesh = train.make_mesh(jax.devices()[:1])
  log = lambda msg: print(msg, flush=True)
  # The largest-batch search of an arch/size runs once, at its last entry, seeded with the compiled memory of
  # all its entries (e.g. batches 32, 64, 128: the linear fit then needs one or two probes).
  last = {(a, s): i for i, (a, s, _, _) in enumerate(args.entries)}
  known, results = {}, []
  for i, entry in enumerate(args.entries):
    key = entry[:2]
    res = bench_arch(args, *entry, mesh, log, known_memory=known.get(key), max_batch=last[key] == i)
    for name, run in res["runs"].items():
      known.setdefault(key, {}).setdefault(name, {})[entry[2]] = run["memory"]["total"]
    results.append(res)
  cpu = jax.default_backend() == "cpu"
  speed, memory, maxb, infer = report_rows(results, cpu)
  per = "img/CPU-s" if cpu else "img/s"
  speed_headers = ["config", "repopt img/s", "repvgg img/s", "plain img/s"]
  if cpu:
    speed_headers += ["repopt img/CPU-s", "repvgg img/CPU-s", "plain img/CPU-s"]
  speed_headers += [f"repopt / repvgg ({per})", f"repopt step / plain step ({per})"]
  body = [
      f"One device ({info.devices}), compute dtype {args.compute_dtype}, params float32, random inputs. "
      "`repopt` = target model + RepOpt-SGD, `repvgg` = RepVGG training-time model + SGD, `plain` = target "
      "model + plain SGD; all with Nesterov momentum 0.9 and weight decay 4e-5, the trainer's `TrainStep`. "
      f"Convolution formulation `{args.conv}` (`--conv`, `repopt_jax.ops`"
      + ("; on CPU, convolutions with at most 64 output pixels per image run as im2col + one matrix product, "
         "the others as XLA's convolution" if args.conv == "auto" else "") + "). "
      f"Images/s: best of {args.rounds} interleaved rounds by the wall clock"
      + (", and images per CPU-second of this process (all threads), best of the same rounds: on a CPU "
         "shared with other jobs the wall clock mostly measures them, so the ratios use CPU seconds."
         if cpu else "; the ratios use the wall clock."),
      "## Training speed\n\n" + common.md_table(speed_headers, speed),
      "## Training memory (XLA memory analysis of the compiled step)\n\n"
      "Memory = arguments + outputs + temporaries - aliased (the donated train state counts once), in MiB, at "
      "the benchmark batch. Per example: the slope of that memory between the benchmark batch and twice it "
      "(both compiled, nothing run; the batches and bytes are in the JSON), i.e. the activations and other "
      "buffers that grow with the batch, whatever the memory budget. The last column is RepVGG's per-example "
      "memory over RepOpt-VGG's (above 1: RepVGG needs more per example).\n\n" + common.md_table(
          ["config", "repopt MiB", "repvgg MiB", "plain MiB", "repopt / repvgg memory", "repopt MiB/example",
           "repvgg MiB/example", "plain MiB/example", "repvgg / repopt per-example memory"], memory),
      "## Largest batch within a memory budget\n\n"
      "The largest batch whose compiled step fits the budget (default: 11 GiB on GPU, the paper's 2080 Ti; on "
      "CPU twice the RepVGG step's memory at the benchmark batch), found by compiling (the search is exact when "
      "the next batch was compiled and does not fit). The max batch ratio depends on the budget (the fixed "
      "part, parameters and optimizer state, weighs more in a small budget); the per-example memory ratio, "
      "from the table above, does not: with memory linear in the batch it is the limit the max batch ratio tends "
      "to as the budget grows."
      "\n\n" + (common.md_table(["config", "budget GiB", "repopt max batch", "repvgg max batch", "max batch ratio",
                                 "repvgg / repopt per-example memory"], maxb) if maxb
                 else "(not searched: `--no_max_batch`)"),
      "## Inference (eval mode)\n\n`deployed` = `fuse_repvgg` of the RepVGG (the same network as a trained "
      "RepOpt-VGG), `repvgg_unfused` = the multi-branch model; max relative difference of their logits shows "
      "the fusion is exact.\n\n" + common.md_table(
          ["config", "deployed img/s", "unfused img/s", f"speed-up ({per})", "deployed params",
           "repvgg params", "max rel. logit diff"], infer),
      "![speed and memory](speed_memory{}.png)".format(args.tag),
  ]
  os.makedirs(args.out, exist_ok=True)
  plot(os.path.join(args.out, f"speed_memory{args.tag}.png"), results, cpu)
  config = {k: v for k, v in vars(args).items() if k not in ("out", "entries")}
  common.write_markdown(os.path.join(args.out, f"speed_memory{args.tag}.md"),
                        "Training speed and memory: RepOpt-VGG vs RepVGG", info, config, "\n\n".join(body))
  common.write_json(os.path.join(args.out, f"speed_memory{args.tag}.json"),
                    {"info": vars(info), "config": config, "results": results})
  print("\n\n".join(body[1:5]))
  return results


if __name__ == "__main__":
  main()
