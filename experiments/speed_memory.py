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
nothing is run), and inference images/s of the deployed model (`reparam.fuse_repvgg` of the RepVGG, the
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
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=common.RESULTS)
  p.add_argument("--tag", default=None, help="report name suffix (default: '_gpu' on GPU, '' on CPU)")
  p.add_argument("--tiny", action="store_true",
                 help="smoke-test size: the tiny arch, batch 4, 2 steps, 1 round, 1 probe, fast compile")
  args = p.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  args.on_gpu = jax.default_backend() == "gpu"
  gpu = args.gpu or args.on_gpu
  if args.tiny:
    args.archs, args.rounds, args.max_probes = list(TINY_ARCHS), 1, 1
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


def config_for(arch, mode, optim, batch, image_size, num_classes, compute_dtype, seed):
  from repopt_jax.config import load_config  # pylint: disable=g-import-not-at-top
  return load_config({
      "model": {"arch": arch, "mode": mode, "num_classes": num_classes},
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
    'probes': compilations used, 'bytes_per_example': slope of the last fit (None without two points)}`.

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
  return {"batch": lo, "exact": hi is not None and hi == lo + 1, "probes": probes, "bytes_per_example": slope}


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
                                               args.seed)
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

  # Largest batch within the budget, for the two models the paper compares.
  budget = (args.memory_budget_gib * GIB if args.memory_budget_gib
            else 2 * res["runs"]["repvgg"]["memory"]["total"])
  res["memory_budget_bytes"] = int(budget)
  if not args.no_max_batch and max_batch:
    probe_options = json.loads(args.probe_options) if args.probe_options else None
    for name in ("repopt", "repvgg"):
      st = steppers[name]

      def memory_of(b, st=st):
        abstract = {"image": jax.ShapeDtypeStruct((b, image_size, image_size, 3), np.float32),
                    "label": jax.ShapeDtypeStruct((b,), np.int32)}
        if probe_options is None:
          return compiled_memory(st.compiled(abstract))["total"]
        return compiled_memory(st.step_fn.lower(st.state, abstract).compile(probe_options))["total"]

      known = {**(known_memory or {}).get(name, {}), batch: res["runs"][name]["memory"]["total"]}
      found = largest_batch(memory_of, budget, known, args.max_probes)
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
  """Table rows; on CPU the speed ratios use CPU seconds (robust to other jobs), on GPU the wall clock."""
  r = lambda a, b: a / b if a and b else None
  speed, memory, infer = [], [], []
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
    mb = {k: runs[k].get("max_batch", {}).get("batch") for k in ("repopt", "repvgg")}
    memory.append([tag, mem["repopt"], mem["repvgg"], mem["plain"], r(mem["repopt"], mem["repvgg"]),
                   res["memory_budget_bytes"] / GIB, mb["repopt"], mb["repvgg"], r(mb["repopt"], mb["repvgg"])])
    if "inference_images_per_s" not in res:  # --no_inference
      continue
    inf = res["inference_images_per_cpu_s" if cpu else "inference_images_per_s"]
    infer.append([tag, res["inference_images_per_s"]["deployed"], res["inference_images_per_s"]["repvgg_unfused"],
                  r(inf["deployed"], inf["repvgg_unfused"]), res["deployed_params"], runs["repvgg"]["train_params"],
                  res["fusion_max_rel_diff"]])
  return speed, memory, infer


def plot(path, results):
  plt = common.setup_matplotlib()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  labels = [f"{r['arch']}@{r['image_size']}" for r in results]
  x = np.arange(len(results))
  w = 0.27
  for i, (name, color) in enumerate((("repopt", "tab:green"), ("repvgg", "tab:red"), ("plain", "tab:blue"))):
    axes[0].bar(x + (i - 1) * w, [r["runs"][name]["train_images_per_s"] for r in results], w, label=name,
                color=color)
    axes[1].bar(x + (i - 1) * w, [r["runs"][name]["memory"]["total"] / 2 ** 20 for r in results], w, label=name,
                color=color)
  for ax, title in zip(axes, ("train images/s (higher is better)", "compiled train-step memory, MiB")):
    ax.set_xticks(x, labels)
    ax.set_title(title)
    ax.legend(fontsize=8)
  fig.tight_layout()
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
  speed, memory, infer = report_rows(results, cpu)
  per = "img/CPU-s" if cpu else "img/s"
  speed_headers = ["config", "repopt img/s", "repvgg img/s", "plain img/s"]
  if cpu:
    speed_headers += ["repopt img/CPU-s", "repvgg img/CPU-s", "plain img/CPU-s"]
  speed_headers += [f"repopt / repvgg ({per})", f"repopt step / plain step ({per})"]
  body = [
      f"One device ({info.devices}), compute dtype {args.compute_dtype}, params float32, random inputs. "
      "`repopt` = target model + RepOpt-SGD, `repvgg` = RepVGG training-time model + SGD, `plain` = target "
      "model + plain SGD; all with Nesterov momentum 0.9 and weight decay 4e-5, the trainer's `TrainStep`. "
      f"Images/s: best of {args.rounds} interleaved rounds by the wall clock"
      + (", and images per CPU-second of this process (all threads), best of the same rounds: on a CPU "
         "shared with other jobs the wall clock mostly measures them, so the ratios use CPU seconds."
         if cpu else "; the ratios use the wall clock."),
      "## Training speed\n\n" + common.md_table(speed_headers, speed),
      "## Training memory (XLA memory analysis of the compiled step)\n\n"
      "Memory = arguments + outputs + temporaries - aliased (the donated train state counts once), in MiB. "
      "Largest batch: the largest batch whose compiled step fits the budget "
      "(default: 11 GiB on GPU, the paper's 2080 Ti; on CPU twice the RepVGG step's memory at the benchmark "
      "batch).\n\n" + common.md_table(
          ["config", "repopt MiB", "repvgg MiB", "plain MiB", "repopt / repvgg memory", "budget GiB",
           "repopt max batch", "repvgg max batch", "max batch ratio"], memory),
      "## Inference (eval mode)\n\n`deployed` = `fuse_repvgg` of the RepVGG (the same network as a trained "
      "RepOpt-VGG), `repvgg_unfused` = the multi-branch model; max relative difference of their logits shows "
      "the fusion is exact.\n\n" + common.md_table(
          ["config", "deployed img/s", "unfused img/s", f"speed-up ({per})", "deployed params",
           "repvgg params", "max rel. logit diff"], infer),
      "![speed and memory](speed_memory{}.png)".format(args.tag),
  ]
  os.makedirs(args.out, exist_ok=True)
  plot(os.path.join(args.out, f"speed_memory{args.tag}.png"), results)
  config = {k: v for k, v in vars(args).items() if k not in ("out", "entries")}
  common.write_markdown(os.path.join(args.out, f"speed_memory{args.tag}.md"),
                        "Training speed and memory: RepOpt-VGG vs RepVGG", info, config, "\n\n".join(body))
  common.write_json(os.path.join(args.out, f"speed_memory{args.tag}.json"),
                    {"info": vars(info), "config": config, "results": results})
  print("\n\n".join(body[1:4]))
  return results


if __name__ == "__main__":
  main()
