"""Where a train step's time goes on CPU: a `jax.profiler` trace of the trainer's `TrainStep`, per XLA op.

For each conv formulation (`model.conv_impl`, `repopt_jax.ops`: 'lax' = XLA's own convolution everywhere, 'auto' =
im2col + dot for small outputs), builds the target model with RepOpt-SGD (as experiments/bench_train_step.py),
traces a few steps with `jax.profiler.trace(create_perfetto_trace=True)`, and sums the time of each XLA
operation (fusion, convolution, dot, copy) over the traced steps. Each op is matched to its instruction in the
compiled HLO and classified:

* `conv fwd` / `conv dx` (input gradient) / `conv dW` (weight gradient), by shapes (the kernel-shaped output
  is the weight gradient; an output with the kernel's input channels the input gradient), with the spatial
  size and channels, for XLA convolutions and for the im2col dot products alike;
* `im2col` (patch extraction and its transpose), `transpose/copy` (layout changes), `BN/elementwise`
  (loop fusions of the BatchNorm, ReLU and residual arithmetic), `reduce` (BatchNorm statistics, the loss,
  the global grad norm and finite checks), `optimizer` (the parameter-sized update fusions).

Also reports XLA's static cost analysis (flops, bytes) and the step's median wall and CPU time per mode
(interleaved). Writes experiments/results/profile_step.{md,json}.

Usage: python experiments/profile_step.py [--arch B1] [--image_size 64] [--batch 8] [--steps 4]
       [--modes lax auto]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import speed_memory  # noqa: E402
from experiments.bench_vs_torch import JaxRun, time_interleaved  # noqa: E402  (the benchmark's own runner and timer)
from experiments.common import RESULTS, RunInfo, md_table, write_json, write_markdown  # noqa: E402
from repopt_jax import ops  # noqa: E402
from repopt_jax.models import reparam  # noqa: E402
from repopt_jax.train import build_model, make_mesh  # noqa: E402

# Host-side events of the runtime, not XLA operations.
_RUNTIME = re.compile(r"^\$|ThunkExecutor|PjitFunction|PjRt|ParseArguments|Handle inputs|Allocate|CreateOutputs|"
                      r"ThreadPool|PythonRefManager|ExecutePrepare|ExecuteHelper|block_until_ready|^end_|"
                      r"TransferTo|BufferFromPyval")


def _hlo_index(hlo_text: str) -> dict:
  """instruction name -> (its line in the entry/fused computations, the fused computation's body or '')."""
  bodies, current, lines = {}, None, {}
  for line in hlo_text.splitlines():
    m = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if m and "=" not in line.split("{")[0]:
      current = m.group(1)
      bodies[current] = []
      continue
    if current is not None:
      bodies[current].append(line)
    m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", line)
    if m:
      lines.setdefault(m.group(1), m.group(2))
  out = {}
  for name, rhs in lines.items():
    m = re.search(r"calls=%?([\w.\-]+)", rhs)
    out[name] = (rhs, "\n".join(bodies.get(m.group(1), [])) if m else "")
  return out


def _shape(text: str):
  m = re.match(r"\s*\(?(\w+)\[([\d,]*)\]", text)
  if not m:
    return None
  return tuple(int(d) for d in m.group(2).split(",") if d)


def _classify(name: str, index: dict, kernels: set, param_count: int, batch: int = 0) -> str:
  rhs, body = index.get(name, ("", ""))
  kernels = {k for k in kernels if len(k) == 4}
  text = rhs + "\n" + body
  out = _shape(rhs) or ()
  size = int(np.prod(out)) if out else 0
  conv = "convolution(" in text
  dot = "dot(" in text
  if conv or dot:
    kind = "conv" if conv else "dot"
    patch_cols = {k[0] * k[1] * k[2] for k in kernels if k[0] * k[1] > 1}
    if sorted(out) in [sorted(k) for k in kernels] or (
        len(out) == 2 and any(sorted(out) == sorted((k[0] * k[1] * k[2], k[3])) for k in kernels)):
      role = "dW"  # the kernel's shape (in any dimension order): a weight gradient
    elif dot and out and out[-1] in patch_cols:
      role = "dx"  # g @ W^T: one column per patch element, then col2im
    elif conv and re.search(r"rhs_reversal|window=\{[^}]*lhs_dilate", text):
      role = "dx"
    elif len(out) == 2 and out[0] == batch:
      role = "head"
    else:
      role = "fwd"
    return f"{kind} {role} -> {'x'.join(str(d) for d in out)}"
  if "is-finite" in text:
    return "finite checks"
  if re.search(r"\bconcatenate\(|\bslice\(|\bpad\(", text) and "reduce" not in text:
    return "im2col/col2im (slice, pad, concat)"
  if "transpose" in text and "reduce" not in text:
    return "transpose/copy"
  if "reduce(" in text or "reduce-window" in text:
    return "reduce (BN stats, loss, norms)"
  if size in kernels_sizes(kernels) and size >= param_count // 64:
    return "optimizer/param-sized elementwise"
  if re.match(r"\s*\S+\s+(copy|bitcast|tuple)\(", rhs):
    return "transpose/copy"
  return "BN/ReLU/elementwise"


def kernels_sizes(kernels):
  return {int(np.prod(k)) for k in kernels}


def trace_ops(runner: JaxRun, steps: int, kernels: set, batch: int) -> dict:
  hlo = runner.stepper.compiled(runner.batch).as_text()
  index = _hlo_index(hlo)
  param_count = max(kernels_sizes(kernels))
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(steps):
        runner.step()
    path = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
      data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  per_op = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not _RUNTIME.search(e.get("name", "")):
      per_op[e["name"]] += e.get("dur", 0.0) / 1e3 / steps  # ms per step
  by_class = collections.Counter()
  rows = []
  for name, ms in per_op.items():
    cls = _classify(name, index, kernels, param_count, batch)
    by_class[re.sub(r" -> .*", "", cls)] += ms
    rows.append((name, cls, ms))
  rows.sort(key=lambda r: -r[2])
  by_shape = collections.Counter()
  for _, cls, ms in rows:
    if cls.startswith(("conv ", "dot ")):
      by_shape[cls] += ms
  return {"ops": rows, "by_class": dict(by_class), "by_shape": dict(by_shape), "total_ms": sum(per_op.values())}


def finite_check_cost(params, repeats: int = 15) -> dict:
  """CPU ms of the step's per-step metrics on a parameter-sized tree: the global grad norm plus the finite checks
  of the gradients and the new params, as before issue 13 (`jnp.all(jnp.isfinite(x))` per leaf) and now
  (`isfinite` of the grad norm, and of the params' norm: `repopt_jax.train.step._all_finite`)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from repopt_jax.train.step import _all_finite  # pylint: disable=g-import-not-at-top

  def old_all_finite(tree):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))

  def old(g, p):
    return optax.global_norm(g), old_all_finite(g) & old_all_finite(p)

  def new(g, p):
    n = optax.global_norm(g)
    return n, jnp.isfinite(n) & _all_finite(p)

  def norm_only(g, p):
    return optax.global_norm(g)

  fns = {k: jax.jit(f) for k, f in (("before", old), ("after", new), ("grad norm alone", norm_only))}
  grads = jax.tree.map(lambda x: x * 1.0, params)
  out = {k: [] for k in fns}
  for f in fns.values():
    jax.block_until_ready(f(grads, params))
  for _ in range(repeats):
    for k, f in fns.items():
      c0 = time.process_time()
      jax.block_until_ready(f(grads, params))
      out[k].append(time.process_time() - c0)
  return {k: statistics.median(v) * 1e3 for k, v in out.items()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--arch", default="B1")
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--num_classes", type=int, default=1000)
  p.add_argument("--steps", type=int, default=3, help="traced steps per mode")
  p.add_argument("--timed_steps", type=int, default=10, help="interleaved timed steps per mode")
  p.add_argument("--modes", nargs="+", default=["lax", "auto"], choices=ops.CONV_IMPLS)
  p.add_argument("--model", default="repopt", choices=("repopt", "repvgg"),
                 help="repopt: target model + RepOpt-SGD; repvgg: RepVGG training-time model + SGD")
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--out", default=None, help="default: experiments/results/profile_step_{model}")
  args = p.parse_args(argv)
  args.out = args.out or os.path.join(RESULTS, f"profile_step_{args.model}")
  info = RunInfo.collect(["python", os.path.relpath(__file__, os.path.dirname(HERE))] + list(
      sys.argv[1:] if argv is None else argv))
  mesh = make_mesh(jax.devices()[:1])
  model_mode, optim = ("target", "repopt_sgd") if args.model == "repopt" else ("repvgg", "sgd")
  scales = None
  if optim.startswith("repopt"):  # the Hyper-Search model's initial scales, as bench_vs_torch uses
    scales = reparam.scales_from_hs(build_model(speed_memory.config_for(
        args.arch, "hs", "sgd", args.batch, args.image_size, args.num_classes, "float32", 0)))
  runners = {m: JaxRun(args.arch, model_mode, optim, args.batch, args.image_size, args.num_classes, m, mesh, scales)
             for m in args.modes}
  kernels = {tuple(x.shape) for x in jax.tree.leaves(next(iter(runners.values())).stepper.state.params) if x.ndim == 4}
  kernels |= {tuple(x.shape) for x in jax.tree.leaves(next(iter(runners.values())).stepper.state.params) if x.ndim == 2}
  for r in runners.values():
    r.step()
    r.step()
  timing = time_interleaved(runners, rounds=args.timed_steps, steps=1)
  profiles, costs = {}, {}
  for m, r in runners.items():
    profiles[m] = trace_ops(r, args.steps, kernels, args.batch)
    cost = r.stepper.compiled(r.batch).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    costs[m] = {"flops": float(cost.get("flops", float("nan"))),
                "bytes_accessed": float(cost.get("bytes accessed", float("nan")))}
    print(f"{m}: step {timing[m]['wall_ms']:.1f} ms wall, {timing[m]['cpu_ms']:.1f} ms CPU; traced ops "
          f"{profiles[m]['total_ms']:.1f} ms/step", flush=True)
    for cls, ms in sorted(profiles[m]["by_class"].items(), key=lambda kv: -kv[1]):
      print(f"   {ms:8.2f} ms  {cls}")

  finite = finite_check_cost(next(iter(runners.values())).stepper.state.params)
  print("per-step metrics (CPU ms): " + ", ".join(f"{k} {v:.1f}" for k, v in finite.items()), flush=True)
  load_end = ", ".join(f"{x:.2f}" for x in os.getloadavg())
  title = f"{args.arch} @{args.image_size}px, batch {args.batch}, " + (
      "target model + RepOpt-SGD" if args.model == "repopt" else "RepVGG model + SGD") + ", float32"
  body = [f"{title}; one CPU device; load average at the end {load_end} (shared machine: other jobs ran on the "
          "same 2 cores, so wall times are noisy; op times in the trace are wall time of each op).", "",
          "## Step time per conv formulation", "",
          md_table(["conv mode", "median wall ms", "median CPU ms", "traced op ms/step", "XLA flops",
                    "XLA bytes accessed"],
                   [[m, timing[m]["wall_ms"], timing[m]["cpu_ms"], profiles[m]["total_ms"], costs[m]["flops"],
                     costs[m]["bytes_accessed"]] for m in args.modes]), ""]
  body += ["## Per-step metrics: global grad norm + finite checks of gradients and new params", "",
           "Measured alone on the model's parameter tree (CPU ms, median): before issue 13 each finite check was "
           "`jnp.all(jnp.isfinite(x))` per leaf, a boolean reduction XLA's CPU backend runs several times slower "
           "than a sum of squares; now the gradients' check is `isfinite(grad_norm)` (no extra pass) and the "
           "params' check `isfinite(global_norm(params))`. The step above already uses the new checks.", "",
           md_table(["metrics", "CPU ms"], [[k, v] for k, v in finite.items()]), ""]
  classes = sorted({c for m in args.modes for c in profiles[m]["by_class"]},
                   key=lambda c: -profiles[args.modes[0]]["by_class"].get(c, 0))
  body += ["## Time by kind of operation (ms per step, from the trace)", "",
           md_table(["kind"] + list(args.modes), [[c] + [profiles[m]["by_class"].get(c, 0.0) for m in args.modes]
                                                 for c in classes]), ""]
  shapes = sorted({s for m in args.modes for s in profiles[m]["by_shape"]},
                  key=lambda s: -max(profiles[m]["by_shape"].get(s, 0) for m in args.modes))
  body += ["## Convolutions and matrix products by role and output shape (ms per step, all layers of the shape)",
           "", "`fwd` forward, `dx` input gradient, `dW` weight gradient; `conv` = XLA convolution, `dot` = the "
           "im2col matrix product. Labels come from shapes: where a weight gradient's shape equals an input "
           "gradient's (e.g. 512x2304 at batch 8: the 8x8x256 layers' dx and the 256->512 kernel's dW), the label "
           "can be wrong.", "",
           md_table(["op"] + list(args.modes), [[s] + [profiles[m]["by_shape"].get(s, 0.0) for m in args.modes]
                                               for s in shapes]), ""]
  for m in args.modes:
    body += [f"## Top {args.top} ops, conv mode `{m}`", "",
             md_table(["XLA op", "kind", "ms/step"], [[n, c, ms] for n, c, ms in profiles[m]["ops"][:args.top]]),
             ""]
  config = {k: v for k, v in vars(args).items() if k != "out"}
  write_markdown(args.out + ".md", "Train-step profile on CPU", info, config, "\n".join(body))
  write_json(args.out + ".json", {"info": vars(info), "config": config, "timing": timing, "cost": costs,
                                  "metrics_cost_cpu_ms": finite,
                                  "profiles": {m: {**p_, "ops": p_["ops"][:200]} for m, p_ in profiles.items()}})
  print(f"wrote {args.out}.md and {args.out}.json")


if __name__ == "__main__":
  main()
