"""experiments/gpu_bench.sh, and through its CPU path the smoke tests of speed_memory.py and equivalence_drift.py.

`gpu_bench.sh --tiny` runs both scripts' `main()` at their tiny size (one process each, as on a GPU machine);
the reports they write are checked here, so each script's tiny run happens once in the suite.
"""

import json
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo root: experiments/
from experiments import equivalence_drift, speed_memory  # noqa: E402

SCRIPT = os.path.join(ROOT, "experiments", "gpu_bench.sh")
TAG = "_gpu_bench_tiny"


def _run(*args, env=None, timeout=900):
  return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})})


def test_gpu_commands_are_b1_at_224():
  out = _run("--dry-run")
  assert out.returncode == 0, out.stderr
  speed_cmd, equiv_cmd = out.stdout.strip().splitlines()
  speed = speed_memory.parse_args(shlex.split(speed_cmd)[2:])
  assert speed.entries == [("B1", 224, 32, 10)] and speed.compute_dtype == "bfloat16"
  assert speed.memory_budget_gib == 11 and speed.tag == "_gpu_b1"
  assert equiv_cmd.startswith("JAX_DEFAULT_MATMUL_PRECISION=highest ")
  equiv = equivalence_drift.parse_args(shlex.split(equiv_cmd)[3:])
  assert (equiv.arch, equiv.image_size, equiv.tag, equiv.float64) == ("B1", 224, "_gpu_b1", "none")
  assert _run("--bogus").returncode == 2


def _check_speed(out_dir, stdout):
  md = (out_dir / f"speed_memory{TAG}.md").read_text()
  assert "git commit" in md and "--tiny" in md and "| tiny @32px, batch 4 |" in md
  assert "## Training speed" in stdout and "| tiny @32px, batch 4 |" in stdout  # printed by gpu_bench.sh
  (res,) = json.loads((out_dir / f"speed_memory{TAG}.json").read_text())["results"]
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
  assert res["fusion_max_rel_diff"] < 1e-5  # the deployed model is the fused RepVGG: same outputs
  for name in ("repopt", "repvgg"):  # the budget is twice RepVGG's memory at batch 4
    assert runs[name]["max_batch"]["batch"] >= res["batch"]


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


def test_cpu_path_tiny_runs_speed_memory_and_equivalence(tmp_path):
  out = _run("--tiny", env={"PYTHON": sys.executable, "OUT": str(tmp_path), "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  for stem in (f"speed_memory{TAG}", f"equivalence_drift{TAG}"):
    for ext in (".md", ".png", ".json"):
      assert os.path.getsize(tmp_path / (stem + ext)) > 0, stem + ext
  _check_speed(tmp_path, out.stdout)
  _check_equivalence(tmp_path, out.stdout)
