"""JAX vs PyTorch on the same CPU: the same networks, batch, resolution and optimizer, timed side by side.

Per case (architecture, image size, batch) two models, each trained by several steps:

* `repopt`: the plain conv3x3-BN-ReLU network (RepOpt-VGG's `target` model) trained by RepOpt-SGD (Grad Mult,
  SGD with Nesterov momentum 0.9 and coupled weight decay 4e-5 on the kernels).
* `repvgg`: RepVGG's training-time blocks (3x3-BN + 1x1-BN + identity-BN) trained by the same SGD, no Grad Mult.

The steps (`--jax_steps`, `--torch`):

* `documented`: the README's step, `repopt_jax.nnx_train_step` (one `jax.jit` over the model's split state,
  donated) with the README's loss, on the model and optimizer the trainer builds; the default conv
  formulation. This is literally the function the README and the notebook call.
* `trainstep`: the trainer's own compiled `TrainStep` (which also computes accuracy, grad norm and finite
  checks), under each of `--conv_modes` (the config key `model.conv_impl`: `lax` is XLA's own convolution
  everywhere, the code before issue 13; `auto` the default, im2col + dot for small outputs on CPU).
* `nnx_jit`: the step the README showed before issue 18 (`@nnx.jit`, `nnx.Optimizer`, `nnx.value_and_grad`).
* `official`: the official PyTorch code (github.com/DingXiaoH/RepOptimizers), imported from `--official_code`
  (never copied into this project): `RepOptVGG` in mode 'target' with `RepOptVGGHandler`'s Rule of
  Initialization and Grad Mults and `RepOptimizerSGD` for `repopt`; mode 'repvgg' with `torch.optim.SGD` over
  the official `set_weight_decay` groups for `repvgg`. Its Grad Mults are checked against `rules.grad_mult`.
  Skipped (with a note) when the folder is absent.
* `torch`: the same networks written here, `torch.optim.SGD` (two parameter groups) with the Grad Mult as an
  in-place multiply of the kernel gradients before `optimizer.step()` (the bench of issue 13). At B1 its
  optimizer step is slower than the official `RepOptimizerSGD` loop (about 330 against 130 ms on 2 cores).

All runs of a case are built first, then timed in interleaved rounds (the order reversed every other round)
in one process; per run the median wall time and the median CPU time (this process, all threads) of one
step, where a step ends when its new parameters are ready. PyTorch runs with `torch.set_num_threads` equal
to the number of CPU cores XLA's pool uses (`os.cpu_count()`, reported), float32, NCHW (PyTorch's default).
Inputs are random images on the device (no input pipeline).

Reports, per case, each step's time, documented/TrainStep (the goal: at most 1.05) and PyTorch/documented
(> 1: JAX is faster), in wall and CPU time. Skips (exit 0) without PyTorch (`pip install -e .[bench]`, CPU
build). Writes experiments/results/bench_vs_torch.{md,json}.

Usage: python experiments/bench_vs_torch.py [--cases cifar_tiny:32:32 cifar_tiny:32:128 B1:64:8 B1:64:32]
       [--models repopt repvgg] [--jax_steps documented trainstep nnx_jit] [--torch official torch]
       [--conv_modes auto lax] [--official_code DIR] [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

DEFAULT_CASES = ("cifar_tiny:32:32", "cifar_tiny:32:128", "B1:64:8", "B1:64:32")
# Where the official code lies beside this checkout (the project's shared folder); --official_code overrides.
DEFAULT_OFFICIAL_CODE = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "official_code")
# Steps per timed round: enough that one round of a small case is not all timer noise, few for B1.
STEPS_PER_ROUND = {"cifar_tiny": 10, "tiny": 5}
JAX_STEPS = ("documented", "trainstep", "nnx_jit")
TORCH_STEPS = ("official", "torch")
NOISY_SPREAD = 1.5  # slowest / fastest round of a run above which the report names the run as disturbed


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


def official_width_multiplier(arch) -> list:
  """The official `RepOptVGG(width_multiplier=...)` that builds `arch` (a `VGGConfig`); SystemExit if none does."""
  mult = [w / base for w, base in zip(arch.widths, (64, 128, 256, 512))]
  widths = [int(base * m) for base, m in zip((64, 128, 256, 512), mult)]
  if widths != list(arch.widths) or min(64, int(64 * mult[0])) != arch.stem_width:
    raise SystemExit(f"--cases: the official RepOptVGG cannot build {arch.name!r} (widths {arch.widths}, stem "
                     f"{arch.stem_width}: its stem is min(64, stage-1 width)); use --torch torch")
  return mult


@contextlib.contextmanager
def _official_imports(code_dir):
  """The official code's modules importable as it expects (`repoptimizer.*`, `se_block`, `optimizer`, ...)."""
  if not os.path.isdir(os.path.join(code_dir, "repoptimizer")):
    raise FileNotFoundError(f"--official_code {code_dir}: no repoptimizer/ folder there")
  sys.path.insert(0, code_dir)
  try:
    yield
  finally:
    sys.path.remove(code_dir)


class OfficialRun:
  """The official PyTorch RepOptVGG and its optimizer (RepOptimizerSGD with the Grad Mults, or SGD) on a batch.

  The Grad Mults the official handler generates are checked against `masks` (ours, OIHW) when given.
  """

  def __init__(self, torch, code_dir, arch, scales, num_classes, mode, batch, image_size, masks=None, seed=0):
    with _official_imports(code_dir), contextlib.redirect_stdout(io.StringIO()):  # it prints as it builds
      from optimizer import set_weight_decay  # pylint: disable=g-import-not-at-top,import-error
      from repoptimizer import repoptvgg_impl, repoptvgg_model  # pylint: disable=g-import-not-at-top,import-error
      from repoptimizer.repoptimizer_sgd import RepOptimizerSGD  # pylint: disable=g-import-not-at-top,import-error

      torch.manual_seed(seed)
      self.torch = torch
      self.model = repoptvgg_model.RepOptVGG(list(arch.num_blocks), num_classes, official_width_multiplier(arch),
                                             strides=arch.strides, mode=mode).train()
      groups = set_weight_decay(self.model)
      if mode == "target":
        official_scales = []
        for spec in arch.block_specs(3):
          sc = scales[spec.name]
          vec = lambda v: torch.from_numpy(np.array(v, np.float32))
          pair = (vec(sc.pointwise), vec(sc.conv))
          gamma = sc.identity_init if sc.identity_init is not None else np.ones(spec.out_channels)
          official_scales.append((vec(gamma),) + pair if spec.has_identity else pair)
        handler = repoptvgg_impl.RepOptVGGHandler(self.model, official_scales, reinit=True, update_rule="sgd",
                                                  cpu_mode=True)
        handler.reinitialize()
        grad_mults = handler.generate_grad_mults()
        if masks is not None:
          for (w, m), ours in zip(grad_mults.items(), masks):
            np.testing.assert_allclose(m.numpy(), ours, rtol=1e-6, err_msg="official Grad Mult != rules.grad_mult")
        self.opt = RepOptimizerSGD(grad_mults, groups, lr=0.1, momentum=0.9, weight_decay=4e-5, nesterov=True)
      else:
        self.opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True, weight_decay=4e-5)
    g = torch.Generator().manual_seed(seed)
    self.x = torch.randn(batch, 3, image_size, image_size, generator=g)
    self.y = torch.randint(0, num_classes, (batch,), generator=g)
    self.loss_fn = torch.nn.CrossEntropyLoss()

  def step(self):  # the official training loop's step
    self.opt.zero_grad()
    loss = self.loss_fn(self.model(self.x), self.y)
    loss.backward()
    self.opt.step()
    self.last_loss = loss.detach()

  def check(self):
    return bool(self.torch.isfinite(self.last_loss))


# --------------------------------------------------------------------------------------------------- JAX side


class JaxRun:
  """The trainer's `TrainStep` for one model mode/optimizer, its convs in one formulation (`model.conv_impl`)."""

  def __init__(self, arch, mode, optim, batch, image_size, num_classes, conv_mode, mesh, scales):
    import jax  # pylint: disable=g-import-not-at-top
    from experiments import common, speed_memory  # pylint: disable=g-import-not-at-top
    from repopt_jax import data, train  # pylint: disable=g-import-not-at-top

    cfg = speed_memory.config_for(arch, mode, optim, batch, image_size, num_classes, "float32", 0)
    if conv_mode != "auto":  # the models' default formulation
      cfg = cfg.replace(f"model.conv_impl={conv_mode}")
    model = train.build_model(cfg, scales if optim.startswith("repopt") else None)
    self.stepper = common.Stepper(cfg, model, scales, mesh=mesh, num_classes=num_classes)
    self.batch = data.global_batch(speed_memory.random_batch(batch, image_size, 3, num_classes, 0), mesh)
    self.stepper.compiled(self.batch)
    self.metrics = None
    self._jax = jax

  def step(self):
    self.metrics = self.stepper.step(self.batch)
    self._jax.block_until_ready(self.stepper.state.params)

  def check(self):
    return bool(self.metrics["finite"])


def readme_loss(model, x, y):
  """The README's loss: mean softmax cross-entropy of the model's logits."""
  import optax  # pylint: disable=g-import-not-at-top
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _model_and_tx(arch, mode, optim, batch, image_size, num_classes, scales):
  """The model and optimizer the trainer builds for this case (what `JaxRun`'s `TrainStep` trains)."""
  from experiments import speed_memory  # pylint: disable=g-import-not-at-top
  from repopt_jax import train  # pylint: disable=g-import-not-at-top

  cfg = speed_memory.config_for(arch, mode, optim, batch, image_size, num_classes, "float32", 0)
  scales = scales if optim.startswith("repopt") else None
  model = train.build_model(cfg, scales)
  return model, train.build_optimizer(cfg, model, scales)


def _device_batch(batch, image_size, num_classes):
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import speed_memory  # pylint: disable=g-import-not-at-top
  b = speed_memory.random_batch(batch, image_size, 3, num_classes, 0)
  return jax.device_put(b["image"]), jax.device_put(b["label"])


class DocumentedRun:
  """The README's train step: `repopt_jax.nnx_train_step(model, tx, loss)`, the default conv formulation."""

  def __init__(self, arch, mode, optim, batch, image_size, num_classes, scales):
    import jax  # pylint: disable=g-import-not-at-top
    import repopt_jax  # pylint: disable=g-import-not-at-top

    model, tx = _model_and_tx(arch, mode, optim, batch, image_size, num_classes, scales)
    self.train_step, self.state = repopt_jax.nnx_train_step(model, tx, readme_loss)
    self.x, self.y = _device_batch(batch, image_size, num_classes)
    self._jax = jax
    self.step()  # traced and compiled here

  def step(self):
    self.state, self.loss = self.train_step(self.state, self.x, self.y)
    self._jax.block_until_ready(self.state.params)

  def check(self):
    return bool(np.isfinite(float(self.loss)))


class NNXJitRun:
  """The step the README showed before issue 18: `@nnx.jit` over the model and an `nnx.Optimizer`."""

  def __init__(self, arch, mode, optim, batch, image_size, num_classes, scales):
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top

    self.model, tx = _model_and_tx(arch, mode, optim, batch, image_size, num_classes, scales)
    self.optimizer = nnx.Optimizer(self.model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
      loss, grads = nnx.value_and_grad(readme_loss)(model, x, y)
      optimizer.update(model, grads)
      return loss

    self.train_step = train_step
    self.x, self.y = _device_batch(batch, image_size, num_classes)
    self._jax = jax
    self.step()

  def step(self):
    self.loss = self.train_step(self.model, self.optimizer, self.x, self.y)
    self._jax.block_until_ready(self.loss)

  def check(self):
    return bool(np.isfinite(float(self.loss)))


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


STEP_LABELS = {"documented": "JAX `nnx_train_step` (README)", "nnx_jit": "JAX `@nnx.jit` + `nnx.Optimizer`",
               "official": "PyTorch, official code", "torch": "PyTorch, this script's network"}


def step_label(kind: str) -> str:
  if kind.startswith("trainstep-"):
    return f"JAX `TrainStep` ({kind.split('-', 1)[1]})"
  return STEP_LABELS[kind]


def bench_case(torch, case, args, mesh, log) -> dict:
  from experiments import speed_memory  # pylint: disable=g-import-not-at-top
  from repopt_jax import rules, train  # pylint: disable=g-import-not-at-top
  from repopt_jax.models import reparam  # pylint: disable=g-import-not-at-top
  from repopt_jax.models.vgg import get_arch  # pylint: disable=g-import-not-at-top

  arch, image_size, batch = case
  num_classes = 10 if arch in ("tiny", "cifar_tiny") else 1000
  vgg = get_arch(arch)
  specs = vgg.block_specs(3)
  hs_cfg = speed_memory.config_for(arch, "hs", "sgd", batch, image_size, num_classes, "float32", 0)
  scales = reparam.scales_from_hs(train.build_model(hs_cfg))
  runs = {}

  def add(name, build):
    t0 = time.perf_counter()
    runs[name] = build()
    log(f"  {arch}@{image_size} b{batch} {name}: built (and compiled) in {time.perf_counter() - t0:.1f} s")

  for model in args.models:
    mode, optim = ("target", "repopt_sgd") if model == "repopt" else ("repvgg", "sgd")
    common = (arch, mode, optim, batch, image_size, num_classes)
    for kind in args.jax_steps:
      if kind == "documented":
        add(f"{model}/documented", lambda: DocumentedRun(*common, scales))
      elif kind == "nnx_jit":
        add(f"{model}/nnx_jit", lambda: NNXJitRun(*common, scales))
      else:
        for conv_mode in args.conv_modes:
          add(f"{model}/trainstep-{conv_mode}",
              lambda: JaxRun(arch, mode, optim, batch, image_size, num_classes, conv_mode, mesh, scales))
    masks = None
    if model == "repopt":  # the Grad Mult of each 3x3 kernel, HWIO -> OIHW
      masks = [np.transpose(np.asarray(rules.grad_mult(scales[s.name], (3, 3, s.in_channels, s.out_channels))),
                            (3, 2, 0, 1)) for s in specs]
    if "official" in args.torch and args.official_code:
      add(f"{model}/official", lambda: OfficialRun(torch, args.official_code, vgg, scales, num_classes, mode, batch,
                                                   image_size, masks))
    if "torch" in args.torch:
      add(f"{model}/torch", lambda: TorchRun(torch, specs, num_classes, mode, batch, image_size, masks))
  for r in runs.values():  # warm-up (PyTorch's first steps allocate and pick kernels)
    for _ in range(args.warmup):
      r.step()
  steps = args.steps or STEPS_PER_ROUND.get(arch, 1)
  timing = time_interleaved(runs, args.rounds, steps)
  finite = {k: r.check() for k, r in runs.items()}
  del runs
  out = {"arch": arch, "image_size": image_size, "batch": batch, "steps_per_round": steps, "timing": timing,
         "finite": finite, "pytorch_over_jax": {}, "documented_over_trainstep": {}}
  for model in args.models:
    kinds = [k.split("/", 1)[1] for k in timing if k.startswith(model + "/")]
    jax_kinds = [k for k in kinds if k not in TORCH_STEPS]
    for t_kind in (k for k in kinds if k in TORCH_STEPS):
      t = timing[f"{model}/{t_kind}"]
      for j_kind in jax_kinds:
        j = timing[f"{model}/{j_kind}"]
        out["pytorch_over_jax"][f"{model}/{t_kind}/{j_kind}"] = {"wall": t["wall_ms"] / j["wall_ms"],
                                                                 "cpu": t["cpu_ms"] / j["cpu_ms"]}
    if "documented" in jax_kinds:
      d = timing[f"{model}/documented"]
      for j_kind in (k for k in jax_kinds if k.startswith("trainstep-")):
        j = timing[f"{model}/{j_kind}"]
        out["documented_over_trainstep"][f"{model}/{j_kind}"] = {"wall": d["wall_ms"] / j["wall_ms"],
                                                                 "cpu": d["cpu_ms"] / j["cpu_ms"]}
    log(f"  {arch}@{image_size} b{batch} {model}: " + "; ".join(
        f"{k} {timing[f'{model}/{k}']['wall_ms']:.2f} ms ({timing[f'{model}/{k}']['cpu_ms']:.2f} CPU-ms)"
        for k in kinds))
  for key, r in {**out["documented_over_trainstep"], **out["pytorch_over_jax"]}.items():
    if key.endswith("documented") or "/documented/" not in key:
      log(f"    {key}: {r['wall']:.3f} wall, {r['cpu']:.3f} CPU")
  return out


def _headline_trainstep(conv_modes) -> str:
  """The TrainStep the documented step is held against: the default conv formulation ('auto') when timed."""
  return f"trainstep-{'auto' if 'auto' in conv_modes else conv_modes[0]}"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="ARCH:IMAGE_SIZE:BATCH entries")
  p.add_argument("--models", nargs="+", default=["repopt", "repvgg"], choices=("repopt", "repvgg"))
  p.add_argument("--jax_steps", nargs="+", default=list(JAX_STEPS), choices=JAX_STEPS,
                 help="JAX steps to time: the README's nnx_train_step, the trainer's TrainStep (per --conv_modes), "
                      "the pre-issue-18 README step (@nnx.jit + nnx.Optimizer)")
  p.add_argument("--torch", nargs="+", default=list(TORCH_STEPS), choices=TORCH_STEPS,
                 help="PyTorch steps to time: the official code (--official_code), this script's networks")
  p.add_argument("--conv_modes", nargs="+", default=["auto"], choices=("lax", "auto", "im2col"),
                 help="JAX conv formulations of the TrainStep runs (model.conv_impl, repopt_jax.ops)")
  p.add_argument("--official_code", default=None,
                 help=f"folder of the official PyTorch code (default: {DEFAULT_OFFICIAL_CODE} when it exists)")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=None, help="steps per round (default: 10 for cifar_tiny, 1 for B1)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=None, help="torch threads (default: os.cpu_count(), as XLA)")
  p.add_argument("--omp_wait_policy", default="unset", choices=("unset", "PASSIVE", "ACTIVE"),
                 help="OpenMP wait policy of PyTorch's threads (set before importing torch; an existing "
                      "OMP_WAIT_POLICY wins). unset: the OpenMP runtime's default, what a PyTorch user gets "
                      "(threads spin a short while, then sleep): PyTorch near its best, XLA undisturbed between "
                      "PyTorch's rounds. PASSIVE: idle threads sleep at once (PyTorch's small steps get ~3x "
                      "slower); ACTIVE: they spin forever (and take the cores from XLA's rounds)")
  p.add_argument("--quick", action="store_true", help="smoke size: tiny@32 batch 4, 2 rounds")
  p.add_argument("--out", default=None, help="report path stem (default: experiments/results/bench_vs_torch)")
  args = p.parse_args(argv)
  for text in args.cases:
    parse_case(text)  # a bad entry fails here, before anything is built
  if args.omp_wait_policy != "unset":
    os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
  args.omp_wait_policy = os.environ.get("OMP_WAIT_POLICY", "unset")
  torch = _torch()
  if torch is None:
    print("bench_vs_torch: PyTorch is not installed (pip install -e '.[bench]', CPU build); skipped.")
    return None
  if args.official_code is not None and not os.path.isdir(os.path.join(args.official_code, "repoptimizer")):
    raise SystemExit(f"--official_code {args.official_code}: no repoptimizer/ folder there (the official code)")
  if args.official_code is None and "official" in args.torch:
    if os.path.isdir(os.path.join(DEFAULT_OFFICIAL_CODE, "repoptimizer")):
      args.official_code = DEFAULT_OFFICIAL_CODE
    else:
      print(f"bench_vs_torch: no official code at {DEFAULT_OFFICIAL_CODE} (--official_code DIR): its runs are "
            "left out")
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
  t_start = time.perf_counter()
  for text in args.cases:
    case = parse_case(text)
    log(f"case {text}")
    results.append(bench_case(torch, case, args, mesh, log))
  minutes = (time.perf_counter() - t_start) / 60

  load_end = ", ".join(f"{x:.2f}" for x in os.getloadavg())
  # Interference from other jobs shows as rounds far apart; a median over such rounds is not a measurement.
  noisy = [f"{r['arch']}@{r['image_size']} b{r['batch']} {key} ({min(t['rounds_wall_ms']):.1f} to "
           f"{max(t['rounds_wall_ms']):.1f} ms)" for r in results for key, t in r["timing"].items()
           if max(t["rounds_wall_ms"]) > NOISY_SPREAD * min(t["rounds_wall_ms"])]
  headline = _headline_trainstep(args.conv_modes)
  fmt = lambda r: (r["wall"], r["cpu"]) if r else ("-", "-")
  rows, head_rows = [], []
  for r in results:
    case_name = f"{r['arch']} @{r['image_size']}px, batch {r['batch']}"
    for model in args.models:
      for key, t in r["timing"].items():
        if not key.startswith(model + "/"):
          continue
        kind = key.split("/", 1)[1]
        vs = [] if kind in TORCH_STEPS else [r["pytorch_over_jax"].get(f"{model}/{tk}/{kind}") for tk in args.torch]
        rows.append([case_name, model, step_label(kind), t["wall_ms"], t["cpu_ms"]] +
                    [x for v in (vs or [None] * len(args.torch)) for x in fmt(v)])
      doc = r["documented_over_trainstep"].get(f"{model}/{headline}")
      head_rows.append([case_name, model, *fmt(doc)] +
                       [x for tk in args.torch for x in fmt(r["pytorch_over_jax"].get(f"{model}/{tk}/documented"))])
  torch_cols = [f"{STEP_LABELS[tk].split(', ')[1]} / this ({w})" for tk in args.torch for w in ("wall", "CPU")]
  headers = ["case", "model", "step", "ms", "CPU-ms"] + torch_cols
  head_headers = ["case", "model", f"documented / TrainStep ({headline.split('-', 1)[1]}) wall", "(CPU)"] + [
      f"{STEP_LABELS[tk]} / documented ({w})" for tk in args.torch for w in ("wall", "CPU")]
  body = [
      f"PyTorch {torch.__version__} with {threads} threads (`torch.set_num_threads`, OMP_WAIT_POLICY="
      f"{args.omp_wait_policy}), XLA's CPU client with its "
      f"default pool on the same {os.cpu_count()} cores; float32; random inputs already in memory. Median of "
      f"{args.rounds} interleaved rounds (order reversed every other round) after {args.warmup} warm-up steps; "
      "per step, wall time and CPU time of this process (all threads). The whole run took "
      f"{minutes:.0f} min. Load average at the end: {load_end}. The machine was shared with other jobs while "
      "this ran: wall times include their interference; CPU times are less sensitive to it (but not immune: "
      "cache and memory bandwidth are shared too). "
      + (f"Runs whose rounds spread by more than {NOISY_SPREAD}x (interference: re-run those cases on a quiet "
         f"machine): {'; '.join(noisy)}." if noisy else
         f"No run's rounds spread by more than {NOISY_SPREAD}x."), "",
      "`repopt`: conv3x3-BN-ReLU network + RepOpt-SGD (Grad Mult, Nesterov 0.9, coupled weight decay 4e-5). "
      "`repvgg`: RepVGG's training-time blocks + the same SGD without the Grad Mult. Steps: the README's "
      "`repopt_jax.nnx_train_step` (one `jax.jit` over the `nnx.split` state, donated; the default conv "
      "formulation); the trainer's `TrainStep` (also computes accuracy, grad norm and finite checks) per conv "
      "formulation (`lax` = XLA's convolution everywhere, `auto` = im2col + dot for small outputs on CPU, the "
      "default); the official PyTorch code (RepOptVGG + RepOptimizerSGD with its own Grad Mults, which match "
      "`rules.grad_mult`; SGD for RepVGG); the README's step before issue 18 (`@nnx.jit` + `nnx.Optimizer`); "
      "this script's PyTorch networks with `torch.optim.SGD` and the Grad Mult as an in-place multiply. "
      "OMP_WAIT_POLICY unset is the OpenMP runtime's default (idle threads spin briefly, then sleep): PyTorch "
      "near its best without its threads spinning through XLA's rounds (PASSIVE makes its small steps about 3x "
      "slower; ACTIVE slows XLA down).", "",
      "**The goals of issue 18**: the documented step within 5% of `TrainStep` (documented / TrainStep <= 1.05) "
      "and at least as fast as PyTorch (PyTorch / documented >= 1):", "",
      md_table(head_headers, head_rows), "",
      "Every step (PyTorch / this > 1: this JAX step is faster):", "",
      md_table(headers, rows), ""]
  config = {k: v for k, v in vars(args).items() if k != "out"}
  config["torch_threads"] = threads
  write_markdown(out_stem + ".md", "JAX vs PyTorch train step on the same CPU", info, config, "\n".join(body))
  write_json(out_stem + ".json", {"info": vars(info), "config": config, "torch": torch.__version__,
                                  "minutes": minutes, "noisy_runs": noisy, "results": results})
  print("\n".join(body[4:]))
  print(f"wrote {out_stem}.md and {out_stem}.json")
  return results


if __name__ == "__main__":
  main()
