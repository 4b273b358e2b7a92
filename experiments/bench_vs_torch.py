"""JAX vs PyTorch on the same CPU: the same networks, batch, resolution and optimizer, timed side by side.

Per case (architecture, image size, batch) two models, each in both frameworks:

* `repopt`: the plain conv3x3-BN-ReLU network (RepOpt-VGG's `target` model) trained by RepOpt-SGD. JAX: the
  trainer's own compiled `TrainStep` with `repopt_sgd`. PyTorch: the same network written here, SGD with
  Nesterov momentum 0.9 and coupled weight decay 4e-5 on the kernels, the Grad Mult applied to the kernel
  gradients as an in-place multiply before `optimizer.step()` (the official code's way).
* `repvgg`: RepVGG's training-time blocks (3x3-BN + 1x1-BN + identity-BN) trained by plain SGD (same settings).

JAX's conv formulation can be chosen per run (`--conv_modes`, `repopt_jax.ops.conv_mode`): `lax` is XLA's own
convolution everywhere (the code before issue 13), `auto` the default (im2col + dot for small outputs on CPU).
All runs of a case are built first, then timed in interleaved rounds (the order reversed every other round)
in one process; per run the median wall time and the median CPU time (this process, all threads) of one
step, where a step ends when its new parameters are ready. PyTorch runs with `torch.set_num_threads` equal
to the number of CPU cores XLA's pool uses (`os.cpu_count()`, reported), float32, NCHW (PyTorch's default).
Inputs are random images on the device (no input pipeline).

Reports PyTorch/JAX per case (> 1: JAX is faster) in wall and CPU time. Skips (exit 0) without PyTorch
(`pip install -e .[bench]`, CPU build). Writes experiments/results/bench_vs_torch.{md,json}.

Usage: python experiments/bench_vs_torch.py [--cases cifar_tiny:32:32 cifar_tiny:32:128 B1:64:8 B1:64:32]
       [--models repopt repvgg] [--conv_modes lax auto] [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

DEFAULT_CASES = ("cifar_tiny:32:32", "cifar_tiny:32:128", "B1:64:8", "B1:64:32")
# Steps per timed round: enough that one round of a small case is not all timer noise, few for B1.
STEPS_PER_ROUND = {"cifar_tiny": 5, "tiny": 5}


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return torch


# ----------------------------------------------------------------------------------------------- PyTorch side


def torch_model(torch, specs, num_classes: int, mode: str):
  """The network of `specs` (repopt_jax BlockSpecs) in PyTorch: 'target' or 'repvgg' blocks, GAP, linear."""
  nn = torch.nn

  class Target(nn.Module):

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
      return torch.relu(self.bn(self.conv(x)))

  class RepVGG(nn.Module):

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn = nn.BatchNorm2d(cout)
      self.conv_1x1 = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
      self.bn_1x1 = nn.BatchNorm2d(cout)
      self.bn_identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None

    def forward(self, x):
      y = self.bn(self.conv(x)) + self.bn_1x1(self.conv_1x1(x))
      if self.bn_identity is not None:
        y = y + self.bn_identity(x)
      return torch.relu(y)

  block = Target if mode == "target" else RepVGG
  blocks = [block(s.in_channels, s.out_channels, s.stride) for s in specs]
  return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(specs[-1].out_channels,
                                                                                 num_classes))


class TorchRun:
  """A PyTorch model + SGD (Nesterov, coupled decay on conv/linear weights) [+ Grad Mult] on a fixed batch."""

  def __init__(self, torch, specs, num_classes, mode, batch, image_size, masks=None, seed=0):
    torch.manual_seed(seed)
    self.torch = torch
    self.model = torch_model(torch, specs, num_classes, mode).train()
    decay = [p for n, p in self.model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in self.model.named_parameters() if p.ndim <= 1]
    self.opt = torch.optim.SGD([{"params": decay, "weight_decay": 4e-5}, {"params": no_decay, "weight_decay": 0.0}],
                               lr=0.1, momentum=0.9, nesterov=True)
    # Grad Mult: (param, mask) for every 3x3 kernel of the target model (OIHW).
    self.masks = []
    if masks is not None:
      convs = [m.conv.weight for m in self.model if hasattr(m, "conv")]
      self.masks = [(w, torch.from_numpy(np.array(m)).to(w.dtype)) for w, m in zip(convs, masks)]
      assert all(w.shape == m.shape for w, m in self.masks)
    g = torch.Generator().manual_seed(seed)
    self.x = torch.randn(batch, 3, image_size, image_size, generator=g)
    self.y = torch.randint(0, num_classes, (batch,), generator=g)
    self.loss_fn = torch.nn.CrossEntropyLoss()
    self.finite = True

  def step(self):
    self.opt.zero_grad(set_to_none=True)
    loss = self.loss_fn(self.model(self.x), self.y)
    loss.backward()
    with self.torch.no_grad():
      for w, m in self.masks:
        w.grad.mul_(m)
    self.opt.step()
    self.last_loss = loss.detach()

  def check(self):
    return bool(self.torch.isfinite(self.last_loss))


# --------------------------------------------------------------------------------------------------- JAX side


class JaxRun:
  """The trainer's `TrainStep` for one model mode/optimizer, compiled under one conv formulation."""

  def __init__(self, arch, mode, optim, batch, image_size, num_classes, conv_mode, mesh, scales):
    import jax  # pylint: disable=g-import-not-at-top
    from experiments import common, speed_memory  # pylint: disable=g-import-not-at-top
    from repopt_jax import data, ops, train  # pylint: disable=g-import-not-at-top

    cfg = speed_memory.config_for(arch, mode, optim, batch, image_size, num_classes, "float32", 0)
    model = train.build_model(cfg, scales if optim.startswith("repopt") else None)
    self.stepper = common.Stepper(cfg, model, scales, mesh=mesh, num_classes=num_classes)
    self.batch = data.global_batch(speed_memory.random_batch(batch, image_size, 3, num_classes, 0), mesh)
    with ops.conv_mode(conv_mode):
      self.stepper.compiled(self.batch)  # traced and compiled under this formulation
    self.metrics = None
    self._jax = jax

  def step(self):
    self.metrics = self.stepper.step(self.batch)
    self._jax.block_until_ready(self.stepper.state.params)

  def check(self):
    return bool(self.metrics["finite"])


# ---------------------------------------------------------------------------------------------------- driver


def parse_case(text):
  try:
    arch, size, batch = text.split(":")
    return arch, int(size), int(batch)
  except ValueError:
    raise SystemExit(f"--cases entry {text!r} is not ARCH:IMAGE_SIZE:BATCH") from None


def time_interleaved(runs: dict, rounds: int, steps: int) -> dict:
  """Per run: per-step wall and CPU seconds of every timed round (each round: `steps` steps of each run)."""
  wall = {k: [] for k in runs}
  cpu = {k: [] for k in runs}
  keys = list(runs)
  for i in range(rounds):
    for k in (keys if i % 2 == 0 else keys[::-1]):
      c0, t0 = time.process_time(), time.perf_counter()
      for _ in range(steps):
        runs[k].step()
      wall[k].append((time.perf_counter() - t0) / steps)
      cpu[k].append((time.process_time() - c0) / steps)
  return {k: {"wall_ms": statistics.median(wall[k]) * 1e3, "cpu_ms": statistics.median(cpu[k]) * 1e3,
              "wall_min_ms": min(wall[k]) * 1e3, "rounds_wall_ms": [w * 1e3 for w in wall[k]],
              "rounds_cpu_ms": [c * 1e3 for c in cpu[k]]} for k in runs}


def bench_case(torch, case, args, mesh, log) -> dict:
  from experiments import speed_memory  # pylint: disable=g-import-not-at-top
  from repopt_jax import rules, train  # pylint: disable=g-import-not-at-top
  from repopt_jax.models import reparam  # pylint: disable=g-import-not-at-top
  from repopt_jax.models.vgg import get_arch  # pylint: disable=g-import-not-at-top

  arch, image_size, batch = case
  num_classes = 10 if arch in ("tiny", "cifar_tiny") else 1000
  specs = get_arch(arch).block_specs(3)
  hs_cfg = speed_memory.config_for(arch, "hs", "sgd", batch, image_size, num_classes, "float32", 0)
  scales = reparam.scales_from_hs(train.build_model(hs_cfg))
  runs = {}
  for model in args.models:
    mode, optim = ("target", "repopt_sgd") if model == "repopt" else ("repvgg", "sgd")
    for conv_mode in args.conv_modes:
      t0 = time.perf_counter()
      runs[f"{model}/jax-{conv_mode}"] = JaxRun(arch, mode, optim, batch, image_size, num_classes, conv_mode, mesh,
                                                scales)
      log(f"  {arch}@{image_size} b{batch} {model} jax-{conv_mode}: compiled in {time.perf_counter() - t0:.1f} s")
    masks = None
    if model == "repopt":  # the Grad Mult of each 3x3 kernel, HWIO -> OIHW
      masks = [np.transpose(np.asarray(rules.grad_mult(scales[s.name], (3, 3, s.in_channels, s.out_channels))),
                            (3, 2, 0, 1)) for s in specs]
    runs[f"{model}/torch"] = TorchRun(torch, specs, num_classes, mode, batch, image_size, masks)
  for r in runs.values():  # warm-up (PyTorch's first steps allocate and pick kernels)
    for _ in range(args.warmup):
      r.step()
  steps = args.steps or STEPS_PER_ROUND.get(arch, 1)
  timing = time_interleaved(runs, args.rounds, steps)
  finite = {k: r.check() for k, r in runs.items()}
  del runs
  out = {"arch": arch, "image_size": image_size, "batch": batch, "steps_per_round": steps, "timing": timing,
         "finite": finite, "ratios": {}}
  for model in args.models:
    t = timing[f"{model}/torch"]
    for conv_mode in args.conv_modes:
      j = timing[f"{model}/jax-{conv_mode}"]
      out["ratios"][f"{model}/{conv_mode}"] = {"wall": t["wall_ms"] / j["wall_ms"], "cpu": t["cpu_ms"] / j["cpu_ms"]}
    log(f"  {arch}@{image_size} b{batch} {model}: torch {t['wall_ms']:.1f} ms ({t['cpu_ms']:.1f} CPU-ms); " +
        "; ".join(f"jax-{c} {timing[f'{model}/jax-{c}']['wall_ms']:.1f} ms ({timing[f'{model}/jax-{c}']['cpu_ms']:.1f}"
                  f" CPU-ms), torch/jax {out['ratios'][f'{model}/{c}']['wall']:.2f} wall "
                  f"{out['ratios'][f'{model}/{c}']['cpu']:.2f} CPU" for c in args.conv_modes))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="ARCH:IMAGE_SIZE:BATCH entries")
  p.add_argument("--models", nargs="+", default=["repopt", "repvgg"], choices=("repopt", "repvgg"))
  p.add_argument("--conv_modes", nargs="+", default=["lax", "auto"], choices=("lax", "auto", "im2col"),
                 help="JAX conv formulations to time (repopt_jax.ops.conv_mode)")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=None, help="steps per round (default: 5 for small archs, 1 for B1)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=None, help="torch threads (default: os.cpu_count(), as XLA)")
  p.add_argument("--omp_wait_policy", default="PASSIVE", choices=("PASSIVE", "ACTIVE"),
                 help="OpenMP wait policy of PyTorch's threads (set before importing torch; an existing "
                      "OMP_WAIT_POLICY wins). PASSIVE: idle threads sleep instead of spinning, which on a "
                      "CPU shared with other jobs keeps PyTorch from losing most of its time in spin-waits")
  p.add_argument("--quick", action="store_true", help="smoke size: tiny@32 batch 4, 2 rounds")
  p.add_argument("--out", default=None, help="report path stem (default: experiments/results/bench_vs_torch)")
  args = p.parse_args(argv)
  os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
  args.omp_wait_policy = os.environ["OMP_WAIT_POLICY"]
  torch = _torch()
  if torch is None:
    print("bench_vs_torch: PyTorch is not installed (pip install -e '.[bench]', CPU build); skipped.")
    return None
  if args.quick:
    args.cases, args.rounds, args.warmup = ["tiny:32:4"], 2, 1
  threads = args.threads or os.cpu_count() or 1
  torch.set_num_threads(threads)

  import jax  # pylint: disable=g-import-not-at-top
  from experiments.common import (RESULTS, RunInfo, md_table, write_json,  # pylint: disable=g-import-not-at-top
                                  write_markdown)
  from repopt_jax.train import make_mesh  # pylint: disable=g-import-not-at-top

  out_stem = args.out or os.path.join(RESULTS, "bench_vs_torch" + ("_quick" if args.quick else ""))
  info = RunInfo.collect(["python", "experiments/bench_vs_torch.py"] + list(sys.argv[1:] if argv is None else argv))
  mesh = make_mesh(jax.devices()[:1])
  log = lambda m: print(m, flush=True)
  results = []
  for text in args.cases:
    case = parse_case(text)
    log(f"case {text}")
    results.append(bench_case(torch, case, args, mesh, log))

  load_end = ", ".join(f"{x:.2f}" for x in os.getloadavg())
  headers = ["case", "model", "PyTorch ms", "PyTorch CPU-ms"]
  for c in args.conv_modes:
    headers += [f"JAX ({c}) ms", f"JAX ({c}) CPU-ms", f"PyTorch/JAX ({c}) wall", f"PyTorch/JAX ({c}) CPU"]
  rows = []
  for r in results:
    for model in args.models:
      t = r["timing"][f"{model}/torch"]
      row = [f"{r['arch']} @{r['image_size']}px, batch {r['batch']}", model, t["wall_ms"], t["cpu_ms"]]
      for c in args.conv_modes:
        j = r["timing"][f"{model}/jax-{c}"]
        ratio = r["ratios"][f"{model}/{c}"]
        row += [j["wall_ms"], j["cpu_ms"], ratio["wall"], ratio["cpu"]]
      rows.append(row)
  body = [
      f"PyTorch {torch.__version__} with {threads} threads (`torch.set_num_threads`, OMP_WAIT_POLICY="
      f"{args.omp_wait_policy}), XLA's CPU client with its "
      f"default pool on the same {os.cpu_count()} cores; float32; random inputs already in memory. Median of "
      f"{args.rounds} interleaved rounds (order reversed every other round) after {args.warmup} warm-up steps; "
      "per step, wall time and CPU time of this process (all threads). **Ratios > 1: JAX is faster.** "
      f"Load average at the end: {load_end}. The machine was shared with other jobs while this ran: wall times "
      "include their interference; CPU times are less sensitive to it (but not immune: cache and memory "
      "bandwidth are shared too).", "",
      "`repopt`: conv3x3-BN-ReLU network + SGD (Nesterov 0.9, coupled weight decay 4e-5) with the Grad Mult "
      "(JAX: the trainer's `TrainStep` with `repopt_sgd`; PyTorch: an in-place multiply of the kernel gradients "
      "before `optimizer.step()`). `repvgg`: RepVGG's training-time blocks + the same SGD. JAX conv modes: "
      "`lax` = XLA's own convolution everywhere (before issue 13), `auto` = im2col + dot for outputs of at most "
      "64 pixels per image on CPU (`repopt_jax.ops`, the default).", "",
      md_table(headers, rows), ""]
  config = {k: v for k, v in vars(args).items() if k != "out"}
  config["torch_threads"] = threads
  write_markdown(out_stem + ".md", "JAX vs PyTorch train step on the same CPU", info, config, "\n".join(body))
  write_json(out_stem + ".json", {"info": vars(info), "config": config, "torch": torch.__version__,
                                  "results": results})
  print("\n".join(body[-2:]))
  print(f"wrote {out_stem}.md and {out_stem}.json")
  return results


if __name__ == "__main__":
  main()
