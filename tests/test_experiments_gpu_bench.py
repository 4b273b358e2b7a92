"""experiments/gpu_bench.sh, and through its CPU path the smoke tests of speed_memory.py and equivalence_drift.py.

`gpu_bench.sh --tiny` runs both scripts' `main()` at their tiny size (one process each, as on a GPU machine);
the reports they write are checked here, so each script's tiny run happens once in the suite.
"""

import json
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo root: experiments/
from experiments import equivalence_drift, gpu_report, speed_memory  # noqa: E402
from experiments.common import fmt as common_fmt  # noqa: E402

SCRIPT = os.path.join(ROOT, "experiments", "gpu_bench.sh")
TAG = "_gpu_bench_tiny"


def _run(*args, env=None, timeout=900):
  return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})})


def test_gpu_commands_are_b1_at_224():
  out = _run("--dry-run")
  assert out.returncode == 0, out.stderr
  bf16_cmd, f32_cmd, report_cmd, equiv_cmd = out.stdout.strip().splitlines()
  for cmd, dtype, tag in ((bf16_cmd, "bfloat16", "_gpu_b1_bf16"), (f32_cmd, "float32", "_gpu_b1_f32")):
    speed = speed_memory.parse_args(shlex.split(cmd)[2:])
    # B1 at 224 px, batch 32/64/128, 80 GiB budget, the probes without autotuning, no inference part.
    assert speed.entries == [("B1", 224, 32, 10), ("B1", 224, 64, 10), ("B1", 224, 128, 10)]
    assert speed.compute_dtype == dtype and speed.tag == tag and speed.memory_budget_gib == 80
    assert json.loads(speed.probe_options) == {"xla_gpu_autotune_level": 0} and speed.no_inference
  report = shlex.split(report_cmd)
  assert report[1] == "experiments/gpu_report.py" and report[-2:] == ["--out", "experiments/results/gpu_bench_b1"]
  assert equiv_cmd.startswith("JAX_DEFAULT_MATMUL_PRECISION=highest ")
  equiv = equivalence_drift.parse_args(shlex.split(equiv_cmd)[3:])
  assert (equiv.arch, equiv.image_size, equiv.tag, equiv.float64) == ("B1", 224, "_gpu_b1", "none")
  # On the GPU the host is not pinned to one core (XLA compiles with many threads); the formulation is pinned.
  assert equiv.cpu_threads == 0 and equiv.conv == "lax"
  assert _run("--bogus").returncode == 2


def test_mfu_peaks_come_from_the_datasheet_table_only():
  assert gpu_report.peak_flops("1 x gpu:NVIDIA H200 (cuda:0)", "bfloat16") == 989.4e12
  assert gpu_report.peak_flops("1 x gpu:NVIDIA H100 80GB HBM3 (cuda:0)", "float32") == 494.7e12  # TF32
  assert gpu_report.peak_flops("1 x gpu:NVIDIA H100 PCIe (cuda:0)", "bfloat16") == 756.5e12
  assert gpu_report.peak_flops("1 x cpu:cpu (TFRT_CPU_0)", "bfloat16") is None
  assert gpu_report.peak_flops("1 x cpu:cpu (TFRT_CPU_0)", "bfloat16", 2.0) == 2e12


def test_largest_batch_is_searched_once_per_arch_from_all_batches(monkeypatch):
  """speed_memory: with several batches of one arch/size, the search runs at the last one, seeded by all."""
  calls = []

  def fake_bench(args, arch, size, batch, steps, mesh, log, known_memory=None, max_batch=True):
    calls.append((batch, max_batch, {k: dict(v) for k, v in (known_memory or {}).items()}))
    return {"runs": {"repopt": {"memory": {"total": 100 * batch}}}}

  class Done(Exception):
    pass

  def stop(*unused):
    raise Done

  monkeypatch.setattr(speed_memory, "bench_arch", fake_bench)
  monkeypatch.setattr(speed_memory, "report_rows", stop)  # stop before any report is written
  with pytest.raises(Done):
    speed_memory.main(["--archs", "tiny:32:4:1", "tiny:32:8:1", "tiny:64:4:1", "--out", "/nonexistent"])
  assert calls == [(4, False, {}), (8, True, {"repopt": {4: 400}}), (4, True, {})]


def _check_speed(out_dir, stdout):
  for dtype, suffix in (("bfloat16", "_bf16"), ("float32", "_f32")):
    md = (out_dir / f"speed_memory{TAG}{suffix}.md").read_text()
    assert "git commit" in md and "--tiny" in md and "| tiny @32px, batch 4 |" in md and dtype in md
    (res,) = json.loads((out_dir / f"speed_memory{TAG}{suffix}.json").read_text())["results"]
    runs = res["runs"]
    for name in ("repopt", "repvgg", "plain"):
      assert runs[name]["train_images_per_s"] > 0 and runs[name]["train_images_per_cpu_s"] > 0
      assert runs[name]["memory"]["total"] > 0
    # RepVGG keeps three branches' activations and parameters: more memory and MACs than the plain conv net.
    assert runs["repvgg"]["memory"]["total"] > 1.1 * runs["repopt"]["memory"]["total"]
    assert runs["repvgg"]["train_params"] > runs["repopt"]["train_params"] == res["deployed_params"]
    assert runs["repvgg"]["macs_per_image"] > runs["repopt"]["macs_per_image"]
    # The Grad Mult adds no state: the RepOpt-SGD step's arguments are exactly the plain SGD step's.
    assert runs["repopt"]["memory"]["argument"] == runs["plain"]["memory"]["argument"]
    assert res["fusion_max_rel_diff"] < (1e-5 if dtype == "float32" else 2e-2)  # deployed = fused RepVGG
    # Memory per example: the slope between batch 4 and 8 (both compiled). RepVGG keeps three branches'
    # activations per example (measured on the tiny model: 1.41 in float32, 1.29 in bfloat16); the Grad
    # Mult adds nothing per example.
    per = {name: runs[name]["memory_per_example"] for name in runs}
    for name, p in per.items():
      assert p["batches"] == [4, 8] and p["bytes"][0] == runs[name]["memory"]["total"], (name, p)
      assert p["bytes_per_example"] == (p["bytes"][1] - p["bytes"][0]) / 4 > 0
    ratio = per["repvgg"]["bytes_per_example"] / per["repopt"]["bytes_per_example"]
    assert res["per_example_ratio"] == pytest.approx(ratio) and ratio > 1.15, (dtype, ratio)
    assert per["plain"]["bytes_per_example"] == pytest.approx(per["repopt"]["bytes_per_example"], rel=0.02)
    assert f"| {common_fmt(ratio)} |" in md
    # The largest batch within the budget (twice RepVGG's memory at batch 4): its compiled memory fits, the
    # next batch's (compiled too) does not, and the linear prediction from the per-example slope lands near it.
    budget = res["memory_budget_bytes"]
    for name in ("repopt", "repvgg"):
      mb = runs[name]["max_batch"]
      assert mb["exact"] and mb["next_batch"] == mb["batch"] + 1, (dtype, name, mb)
      assert mb["batch_bytes"] <= budget < mb["next_bytes"], (dtype, name, mb, budget)
      linear = 4 + (budget - per[name]["bytes"][0]) / per[name]["bytes_per_example"]
      assert abs(mb["batch"] - linear) <= 0.25 * linear, (dtype, name, mb["batch"], linear)
  # The summary (printed by gpu_bench.sh and written): both dtypes, three runs each, MFU from the given peak.
  assert "## Per run" in stdout and "| bfloat16 | tiny@32 | 4 | repopt |" in stdout
  rows = json.loads((out_dir / "gpu_bench_tiny.json").read_text())["rows"]
  assert sorted((r["dtype"], r["run"]) for r in rows) == sorted(
      (d, n) for d in ("bfloat16", "float32") for n in ("repopt", "repvgg", "plain"))
  for r in rows:  # --peak_tflops 1 in tiny mode: MFU = images/s x 6 x MACs per image / 1e12
    suffix = "_bf16" if r["dtype"] == "bfloat16" else "_f32"
    (res,) = json.loads((out_dir / f"speed_memory{TAG}{suffix}.json").read_text())["results"]
    run = res["runs"][r["run"]]
    assert r["mfu"] == pytest.approx(run["train_images_per_s"] * 6 * run["macs_per_image"] / 1e12) and r["mfu"] > 0


def _check_equivalence(out_dir, stdout):
  md = (out_dir / f"equivalence_drift{TAG}.md").read_text()
  assert "git commit" in md and "| repopt_sgd (target) vs SGD (csla) |" in md
  assert "repopt_sgd (target) vs SGD (csla)" in stdout
  stored = json.loads((out_dir / f"equivalence_drift{TAG}.json").read_text())
  s = stored["summary"]["signed"]
  assert len(stored["drift"]["signed"]["sgd"]) == 4 + 1  # step 0 and one value per step
  # The re-parameterized runs track the multi-branch ones to float32 rounding (amplified a little by training)
  # and stay within a small factor of the noise floor (the same model, parameters moved by one ulp).
  assert 0 < s["sgd"]["max"] < 1e-3, s
  assert 0 < s["adamw_exact"]["max"] < 1e-4, s
  assert s["sgd"]["max"] < 100 * max(s["sgd_control"]["max"], 1e-7), s
  # With t of both signs the paper's power-1 AdamW is a different optimizer: far larger drift than the exact one.
  assert s["adamw_paper"]["final"] > 100 * s["adamw_exact"]["final"], s


@pytest.mark.slow
def test_cpu_path_tiny_runs_speed_memory_and_equivalence(tmp_path):
  out = _run("--tiny", env={"PYTHON": sys.executable, "OUT": str(tmp_path), "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  for stem in (f"speed_memory{TAG}_bf16", f"speed_memory{TAG}_f32", f"equivalence_drift{TAG}"):
    for ext in (".md", ".png", ".json"):
      assert os.path.getsize(tmp_path / (stem + ext)) > 0, stem + ext
  assert os.path.getsize(tmp_path / "gpu_bench_tiny.md") > 0
  _check_speed(tmp_path, out.stdout)
  _check_equivalence(tmp_path, out.stdout)


@pytest.mark.slow
def test_equivalence_drift_tiny_gives_the_same_numbers_twice(tmp_path):
  """Two fresh processes of `equivalence_drift.py --tiny` give every drift value bit for bit, also when the
  second starts, with more than one core, on a single allowed core (another XLA thread count, which the
  script pins). The convolution formulation is pinned too (`--conv lax`, the models' `model.conv_impl`; no
  environment variable can change it). Either changes the float32 rounding when it is not pinned (measured
  at the default size on 2 cores: the SGD pair's step-0 drift is 5.155e-8 with XLA's convolutions, 4.549e-8
  with 'auto', 4.404e-8 with 'im2col'; 1 instead of 2 threads changes every value from step 1 on, e.g.
  9.550e-8 instead of 9.327e-8)."""
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  single = (lambda: os.sched_setaffinity(0, cores[:1])) if len(cores) > 1 else None
  cmd = [sys.executable, "experiments/equivalence_drift.py", "--tiny", "--pairs", "sgd", "sgd_control"]
  runs = []
  for i, pre in enumerate((None, single)):
    out = subprocess.run(cmd + ["--out", str(tmp_path / str(i))], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"}, preexec_fn=pre)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    runs.append(json.loads((tmp_path / str(i) / "equivalence_drift.json").read_text()))
  first, second = runs
  assert first["config"]["cpu_threads"] == 1 and first["config"]["conv"] == "lax"
  assert list(first["drift"]["signed"]) == ["sgd", "sgd_control"] and len(first["drift"]["signed"]["sgd"]) == 5
  assert first["drift"] == second["drift"]  # every value, exactly
  assert all(v > 0 for v in first["drift"]["signed"]["sgd"])  # a real drift (float32 rounding), not zeros
  md = (tmp_path / "0" / "equivalence_drift.md").read_text()
  assert "pinned to 1 core(s) before JAX started" in md and "formulation is `lax`" in md
