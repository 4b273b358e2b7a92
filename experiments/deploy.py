"""Deployment benchmark: onnxruntime (fp32 and INT8) vs JAX eval of the same network, on the CPU.

For each network (random weights, target mode: the deployed form of a RepOpt-VGG) the eval-mode JAX model is
exported with `repopt_jax.export` (BatchNorm folded, ONNX opset 17, INT8 by onnxruntime's static QDQ
quantization calibrated on random images: only the speed matters here), and the images/s of JAX (the jitted
eval-mode model), onnxruntime fp32 and onnxruntime INT8 are measured side by side, at batch 1 and 32, in one
process. Wall-clock and per-CPU-second throughput are both reported: the machine's cores may be shared.
The ONNX/JAX logit difference and the INT8/fp32 relative error are reported on the same random inputs.

With `--runs DIR ...` (trained runs, e.g. the experiments' Fashion-MNIST models) the fp32 and INT8 ONNX
files of each run are also evaluated on its test split (`repopt_jax.export.evaluate_onnx`).

    python experiments/deploy.py                       # cifar_tiny @32 and B1 @224 (a few minutes on 2 cores)
    python experiments/deploy.py --runs runs/fmnist_repopt runs/fmnist_repvgg
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import common  # noqa: E402  pylint: disable=g-import-not-at-top

# (label, arch, image size, input channels, classes)
NETWORKS = {"cifar_tiny": ("cifar_tiny @32", "cifar_tiny", 32, 3, 10), "B1": ("B1 @224", "B1", 224, 3, 1000)}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--networks", nargs="+", default=["cifar_tiny", "B1"], choices=sorted(NETWORKS))
  p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
  p.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per measurement")
  p.add_argument("--min_iters", type=int, default=2, help="minimum timed iterations per measurement")
  p.add_argument("--calibration_images", type=int, default=32)
  p.add_argument("--runs", nargs="*", default=[], help="trained run directories: fp32/INT8 ONNX test accuracy")
  p.add_argument("--out", default=common.RESULTS)
  p.add_argument("--name", default="deploy", help="report file stem")
  p.add_argument("--tiny", action="store_true", help="smoke-test size: cifar_tiny, batches 1 and 4, 1 iteration")
  args = p.parse_args(argv)
  if args.tiny:
    args.networks, args.batches, args.seconds, args.min_iters, args.calibration_images = (
        ["cifar_tiny"], [1, 4], 0.0, 1, 8)
  return args


def _time(fn, x, seconds: float, min_iters: int) -> dict:
  """Images/s of `fn(x)` (wall and per CPU-second of this process), after one warm-up call."""
  fn(x)
  n, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
  while n < min_iters or time.perf_counter() - wall0 < seconds:
    fn(x)
    n += 1
  wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
  images = n * len(x)
  return {"iters": n, "images_per_sec": images / wall, "images_per_cpu_sec": images / max(cpu, 1e-9),
          "seconds_per_batch": wall / n}


def randomize(model, rng) -> None:
  """Random weights that keep the signal alive through depth: He-normal kernels, BatchNorm statistics and
  affine near identity (PyTorch's default init with identity BatchNorm shrinks the activations ~1.7x per
  block, so B1's logits would be its head bias and the INT8/fp32 comparison meaningless)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  for _, m in nnx.iter_graph(model):
    if isinstance(m, nnx.Conv):
      shape = m.kernel.shape
      m.kernel[...] = jnp.asarray(rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1])), jnp.float32)
    elif isinstance(m, nnx.BatchNorm):
      c = m.num_features
      for name, values in (("mean", rng.normal(0, 0.1, c)), ("var", rng.uniform(0.8, 1.2, c)),
                           ("scale", rng.uniform(0.8, 1.2, c)), ("bias", rng.normal(0, 0.1, c))):
        getattr(m, name)[...] = jnp.asarray(values, jnp.float32)


def bench_network(key: str, args, tmp: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from repopt_jax import export as E  # pylint: disable=g-import-not-at-top
  from repopt_jax.models import RepOptVGG  # pylint: disable=g-import-not-at-top

  label, arch, size, cin, classes = NETWORKS[key]
  model = RepOptVGG(arch, "target", num_classes=classes, in_channels=cin, rngs=nnx.Rngs(0))
  randomize(model, np.random.default_rng(1))
  model.eval()
  t0 = time.perf_counter()
  net = E.deployed_network(model, size, check=False)
  fp32 = E.save_onnx(E.to_onnx(net), os.path.join(tmp, f"{key}.onnx"))
  rng = np.random.default_rng(0)
  calib = rng.standard_normal((args.calibration_images, size, size, cin)).astype(np.float32)
  int8 = E.quantize_onnx(fp32, os.path.join(tmp, f"{key}.int8.onnx"), calib)
  export_seconds = time.perf_counter() - t0
  sessions = {"onnxruntime fp32": E.onnx_session(fp32), "onnxruntime INT8": E.onnx_session(int8)}
  graphdef, state = nnx.split(model)
  jax_fwd = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))

  engines = {"JAX (jit, eval mode)": lambda x: jax.block_until_ready(jax_fwd(state, x))}
  engines.update({k: (lambda s: lambda x: E.run_onnx(s, x))(s) for k, s in sessions.items()})
  out = {"label": label, "arch": arch, "image_size": size, "params": net.num_params,
         "fp32_bytes": os.path.getsize(fp32), "int8_bytes": os.path.getsize(int8), "export_seconds": export_seconds,
         "batches": {}}
  for b in args.batches:
    x = rng.standard_normal((b, size, size, cin)).astype(np.float32)
    ref = np.asarray(jax_fwd(state, x), np.float64)
    o32 = E.run_onnx(sessions["onnxruntime fp32"], x)
    o8 = E.run_onnx(sessions["onnxruntime INT8"], x)
    scale = float(np.max(np.abs(ref)))
    row = {"onnx_fp32_rel_diff": float(np.max(np.abs(o32 - ref)) / scale),
           "int8_rel_err": float(np.max(np.abs(o8 - o32)) / max(float(np.max(np.abs(o32))), 1e-30)),
           "int8_top1_agreement": float(np.mean(o8.argmax(1) == o32.argmax(1)))}
    for name, fn in engines.items():
      row[name] = _time(fn, x, args.seconds, args.min_iters)
      print(f"{label} batch {b} {name}: {row[name]['images_per_sec']:.1f} images/s", flush=True)
    out["batches"][b] = row
  return out


def eval_runs(run_dirs, tmp: str, calibration_images: int) -> list:
  from repopt_jax import export as E  # pylint: disable=g-import-not-at-top
  rows = []
  for i, run in enumerate(run_dirs):
    fp32, int8 = os.path.join(tmp, f"run{i}.onnx"), os.path.join(tmp, f"run{i}.int8.onnx")
    r32 = E.export_run(run, fp32)
    r8 = E.export_run(run, int8, int8=True, calibration_images_count=calibration_images)
    e32, e8 = E.evaluate_onnx(fp32, run), E.evaluate_onnx(int8, run)
    rows.append({"run": run, "mode": r32["mode"], "arch": r32["arch"], "fp32_top1": e32["eval_top1"],
                 "int8_top1": e8["eval_top1"], "fp32_bytes": r32["bytes"], "int8_bytes": r8["bytes"],
                 "onnx_max_abs_logit_diff": r32["max_abs_logit_diff"], "examples": e32["eval_examples"]})
  return rows


def main(argv=None) -> dict:
  args = parse_args(argv)
  import onnxruntime  # pylint: disable=g-import-not-at-top

  info = common.RunInfo.collect(["python", "experiments/deploy.py"] + list(sys.argv[1:] if argv is None else argv))
  with tempfile.TemporaryDirectory(prefix="repopt_deploy_") as tmp:
    results = {k: bench_network(k, args, tmp) for k in args.networks}
    runs = eval_runs(args.runs, tmp, 256) if args.runs else []

  engines = ["JAX (jit, eval mode)", "onnxruntime fp32", "onnxruntime INT8"]
  rows = []
  for r in results.values():
    for b, row in r["batches"].items():
      j = row[engines[0]]
      rows.append([r["label"], b] + [row[e]["images_per_sec"] for e in engines]
                  + [row[e]["images_per_sec"] / j["images_per_sec"] for e in engines[1:]]
                  + [row[e]["images_per_cpu_sec"] / j["images_per_cpu_sec"] for e in engines[1:]])
  speed = common.md_table(["network", "batch", "JAX images/s", "ORT fp32 images/s", "ORT INT8 images/s",
                           "fp32/JAX", "INT8/JAX", "fp32/JAX per CPU-s", "INT8/JAX per CPU-s"], rows)
  size_rows = [[r["label"], r["params"], r["fp32_bytes"] / 1e6, r["int8_bytes"] / 1e6,
                r["int8_bytes"] / r["fp32_bytes"], max(b["onnx_fp32_rel_diff"] for b in r["batches"].values()),
                max(b["int8_rel_err"] for b in r["batches"].values()),
                min(b["int8_top1_agreement"] for b in r["batches"].values())] for r in results.values()]
  sizes = common.md_table(["network", "params", "fp32 MB", "INT8 MB", "INT8/fp32", "ONNX fp32 vs JAX: max abs Δ / max abs logit",
                           "INT8 vs fp32: max abs Δ / max abs logit", "INT8 argmax = fp32 argmax"], size_rows)
  body = [
      f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider, default threads) against the jitted JAX "
      "eval-mode model, random weights (target mode: the deployed RepOpt-VGG form; He-normal kernels, "
      "BatchNorm statistics near identity, see `randomize`), random N(0, 1) inputs. "
      f"INT8: QDQ, int8 symmetric per-tensor weights, uint8 MinMax activations calibrated on "
      f"{args.calibration_images} random images. Each figure: one warm-up call, then at least "
      f"{args.min_iters} calls and {args.seconds} s. Ratios > 1: onnxruntime is faster. The cores were shared "
      "with other jobs while this ran, so wall-clock numbers are noisy; the per-CPU-second ratios count only "
      "this process's CPU time.",
      "## Throughput\n\n" + speed,
      "## Files and numerics\n\n" + sizes,
  ]
  if runs:
    body.append("## Trained runs: ONNX test accuracy\n\n" + common.md_table(
        ["run", "mode", "fp32 top-1 %", "INT8 top-1 %", "fp32 MB", "INT8 MB", "ONNX vs JAX max abs Δ", "images"],
        [[r["run"], r["mode"], 100 * r["fp32_top1"], 100 * r["int8_top1"], r["fp32_bytes"] / 1e6,
          r["int8_bytes"] / 1e6, r["onnx_max_abs_logit_diff"], r["examples"]] for r in runs]))
  else:
    body.append("## Trained runs\n\nNo trained runs were given (`--runs`): no Fashion-MNIST accuracy rows. "
                "Accuracy of exported files on the digits is covered by tests/test_export.py.")
  config = {k: v for k, v in vars(args).items() if k != "out"}
  os.makedirs(args.out, exist_ok=True)
  common.write_markdown(os.path.join(args.out, f"{args.name}.md"), "Deployment: onnxruntime fp32 / INT8 vs JAX "
                        "on the CPU", info, config, "\n\n".join(body))
  common.write_json(os.path.join(args.out, f"{args.name}.json"), {"info": vars(info), "config": config,
                                                                  "results": results, "runs": runs})
  print("\n\n".join(body[1:]))
  return {"results": results, "runs": runs}


if __name__ == "__main__":
  main()
