"""The GPU benchmark's summary: one table from experiments/speed_memory.py's reports, with model FLOPs utilization.

Reads the JSON reports of `speed_memory.py` runs (one per compute dtype, written by experiments/gpu_bench.sh)
and writes one table: per dtype, batch and run (`repopt`, `repvgg`, `plain`), train images/s, the compiled
train-step memory, the largest batch within the memory budget (80 GiB in gpu_bench.sh), and the model FLOPs
utilization

    MFU = images/s x 6 x MACs per image / peak FLOP/s

(forward = 2 FLOPs per multiply-add, backward = twice the forward; MACs of the convolutions and the head from
`repopt_jax.models.flops` for the run's own model: RepVGG trains more MACs than RepOpt-VGG). The peak is the
dense tensor-core peak of the device's datasheet for the dtype: bfloat16, and for float32 TF32 (JAX's default
precision for float32 convolutions on NVIDIA GPUs). Devices not in `PEAK_TFLOPS` get no MFU unless
`--peak_tflops` gives one; no number is guessed.

Usage: python experiments/gpu_report.py --inputs A.json B.json [--peak_tflops X] --out experiments/results/gpu_bench_b1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from experiments import common  # noqa: E402

# Dense peak TFLOP/s by NVIDIA datasheet: (bfloat16, TF32). Matched against the device kind, first match wins.
PEAK_TFLOPS = (
    ("H200 NVL", 835.5, 417.5),
    ("H200", 989.4, 494.7),      # H200 SXM
    ("H100 NVL", 835.5, 417.5),
    ("H100 PCIe", 756.5, 378.0),
    ("H100", 989.4, 494.7),      # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0, 156.0),
)
GIB = 1024 ** 3


def peak_flops(device: str, dtype: str, override_tflops: Optional[float] = None) -> Optional[float]:
  """FLOP/s of `device` (a device-kind string) for `dtype`, or None when unknown.

  Example:
    >>> peak_flops("1 x gpu:NVIDIA H100 80GB HBM3 (cuda:0)", "bfloat16") / 1e12
    989.4
    >>> peak_flops("1 x cpu:cpu (TFRT_CPU_0)", "float32") is None
    True
  """
  if override_tflops:
    return override_tflops * 1e12
  for name, bf16, tf32 in PEAK_TFLOPS:
    if name in device:
      return (bf16 if dtype == "bfloat16" else tf32) * 1e12
  return None


def rows_of(report: dict, override_tflops=None) -> list:
  info, config = report["info"], report["config"]
  dtype = config["compute_dtype"]
  peak = peak_flops(info["devices"], dtype, override_tflops)
  rows = []
  for res in report["results"]:
    for name in ("repopt", "repvgg", "plain"):
      run = res["runs"][name]
      ips = run["train_images_per_s"]
      flops_per_s = ips * 6 * run["macs_per_image"]
      mb = run.get("max_batch")
      per = run.get("memory_per_example", {}).get("bytes_per_example")
      rows.append({
          "dtype": dtype, "arch": res["arch"], "image_size": res["image_size"], "batch": res["batch"], "run": name,
          "images_per_s": ips, "step_ms": run["step_s"] * 1e3, "memory_gib": run["memory"]["total"] / GIB,
          "budget_gib": res["memory_budget_bytes"] / GIB,
          "memory_per_example_mib": per / 2 ** 20 if per is not None else None,
          "max_batch": mb["batch"] if mb else None, "max_batch_exact": mb["exact"] if mb else None,
          "train_tflops": flops_per_s / 1e12, "peak_tflops": peak / 1e12 if peak else None,
          "mfu": flops_per_s / peak if peak else None})
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--inputs", nargs="+", required=True, help="speed_memory.py JSON reports")
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="peak TFLOP/s to use for every dtype (default: the datasheet table by device kind)")
  p.add_argument("--out", required=True, help="report path stem (.md and .json are written)")
  args = p.parse_args(argv)
  reports = []
  for path in args.inputs:
    with open(path) as f:
      reports.append(json.load(f))
  rows = [r for rep in reports for r in rows_of(rep, args.peak_tflops)]
  info = common.RunInfo.collect(["python", "experiments/gpu_report.py"] + list(sys.argv[1:] if argv is None else argv))
  devices = sorted({rep["info"]["devices"] for rep in reports})
  commands = [rep["info"]["command"] for rep in reports]
  ratios = []
  for rep in reports:
    for res in rep["results"]:
      ips = {k: v["train_images_per_s"] for k, v in res["runs"].items()}
      mem = {k: v["memory"]["total"] for k, v in res["runs"].items()}
      mb = {k: res["runs"][k].get("max_batch", {}).get("batch") for k in ("repopt", "repvgg")}
      ratios.append([rep["config"]["compute_dtype"], res["batch"], ips["repopt"] / ips["repvgg"],
                     ips["repopt"] / ips["plain"], mem["repopt"] / mem["repvgg"],
                     mb["repopt"] / mb["repvgg"] if mb["repopt"] and mb["repvgg"] else None,
                     res.get("per_example_ratio")])
  body = [
      f"Device: {', '.join(devices)}. Inputs: the reports of {len(reports)} runs of experiments/speed_memory.py:",
      "", *[f"- `{c}`" for c in commands], "",
      "Images/s: best of the interleaved timed rounds (wall clock). Memory: XLA's memory analysis of the "
      "compiled train step (arguments + outputs + temporaries - aliased); per example: its slope between the "
      "batch and twice the batch (both compiled), independent of the budget. Largest batch: the largest batch whose "
      "compiled step fits the budget, searched from the measured batches' memory (shown for the last batch "
      "of each dtype). MFU = images/s x 6 x MACs/image / peak; peak = the datasheet's dense bfloat16 or TF32 "
      "tensor-core peak of the device" + (f" (overridden: {args.peak_tflops} TFLOP/s)" if args.peak_tflops else "")
      + "; '-' where the device is not in the table.", "",
      "## Per run", "",
      common.md_table(["dtype", "model", "batch", "run", "img/s", "step ms", "memory GiB", "MiB/example",
                       "budget GiB", "max batch", "train TFLOP/s", "MFU"],
                      [[r["dtype"], f"{r['arch']}@{r['image_size']}", r["batch"], r["run"], r["images_per_s"],
                        r["step_ms"], r["memory_gib"], r["memory_per_example_mib"], r["budget_gib"],
                        r["max_batch"], r["train_tflops"], r["mfu"]] for r in rows], align="llllrrrrrrrr"), "",
      "## RepOpt vs RepVGG vs plain", "",
      common.md_table(["dtype", "batch", "repopt / repvgg img/s", "repopt / plain img/s",
                       "repopt / repvgg memory", "repopt / repvgg max batch",
                       "repvgg / repopt per-example memory"], ratios), ""]
  config = vars(args)
  common.write_markdown(args.out + ".md", "GPU benchmark: RepOpt-VGG vs RepVGG vs plain", info, config,
                        "\n".join(body))
  common.write_json(args.out + ".json", {"info": vars(info), "config": config, "rows": rows})
  print("\n".join(body[body.index("## Per run"):]))
  return rows


if __name__ == "__main__":
  main()
