"""Shared helpers of the tests/test_train_*.py files (no tests here)."""

import os
import subprocess
import sys

import jax
import numpy as np

from repopt_jax import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
# Short CPU runs: compile the steps without LLVM optimisation (several times faster to compile, slower to run;
# the same computation, so every comparison below uses it on both sides).
FAST = {"xla_backend_optimization_level": 0}


def digits_dir(tmp_path_factory) -> str:
  """A data dir holding the prepared digits, shared by the xdist workers of one test session."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  path = str(base / "repopt_train_digits")
  data.prepare_local("digits", data_dir=path)  # file-locked: safe when several workers race
  return path


def host_params(state) -> dict:
  """`{path: np.ndarray}` of a TrainState's params and BatchNorm statistics."""
  out = {}
  for part in ("params", "batch_stats"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(getattr(state, part))[0]:
      out[f"{part}{jax.tree_util.keystr(path)}"] = np.asarray(leaf.addressable_data(0))  # replicated
  return out


def python_env(device_count: int) -> dict:
  """Environment for a child python: `device_count` fake CPU devices, the repo importable."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={device_count}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([REPO, TESTS, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  return env


def spawn(script: str, args, device_count: int, log_path: str) -> subprocess.Popen:
  """Starts `python -c script *args` with its own device count, stdout+stderr to `log_path`."""
  log = open(log_path, "w")  # pylint: disable=consider-using-with
  return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=python_env(device_count),
                          stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def tail(path: str, n: int = 3000) -> str:
  with open(path, errors="replace") as f:
    return f.read()[-n:]


def tree_snapshot(path) -> dict:
  """Every file and folder under `path` with its size and modification time (and the folders' own)."""
  out = {}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      p = os.path.join(root, name)
      st = os.stat(p)
      out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
  out["."] = os.stat(path).st_mtime_ns
  return out
