"""experiments/gpu_bench.sh: its GPU command lines parse with the scripts' own parsers, and its CPU path runs."""

import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo root: experiments/
from experiments import equivalence_drift, speed_memory  # noqa: E402

SCRIPT = os.path.join(ROOT, "experiments", "gpu_bench.sh")


def _run(*args, env=None, timeout=600):
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
  assert (equiv.arch, equiv.image_size, equiv.tag) == ("B1", 224, "_gpu_b1")
  assert _run("--bogus").returncode == 2


def test_cpu_path_tiny(tmp_path):
  out = _run("--tiny", env={"PYTHON": sys.executable, "OUT": str(tmp_path), "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  for stem in ("speed_memory_gpu_bench_tiny", "equivalence_drift_gpu_bench_tiny"):
    for ext in (".md", ".png", ".json"):
      assert os.path.getsize(tmp_path / (stem + ext)) > 0, stem + ext
  # The tables are printed at the end.
  assert "## Training speed" in out.stdout and "| tiny @32px, batch 4 |" in out.stdout
  assert "repopt_sgd (target) vs SGD (csla)" in out.stdout
