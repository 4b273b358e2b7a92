"""`pip install repopt_jax` (no extras) is the library: a fresh virtual env gets jax, flax, optax, chex and
numpy (and what they bring), none of the training or deployment packages, and in it the README's library
examples run and the command line says in one line which extra a command needs.

One test, because building the env is most of its cost (tens of seconds, from pip's cache or the package
index the machine is configured with; nothing else is downloaded). The package is installed from a copy
of the source, so the build leaves nothing in the working tree.
"""

import os
import re
import shutil
import subprocess
import sys
import time

from test_train_common import REPO

# Distributions of the [train] and [deploy] extras, as `pip list` names them.
EXTRA_DISTRIBUTIONS = ("tensorflow-datasets", "grain", "scikit-learn", "tqdm", "tensorboardX", "matplotlib",
                       "onnx", "onnxruntime")
# Their import names: none may be importable.
EXTRA_MODULES = ("tensorflow_datasets", "grain", "sklearn", "tqdm", "tensorboardX", "matplotlib", "onnx",
                 "onnxruntime")
# The README sections whose examples use the library alone (not the Deploy section: ONNX is an extra).
LIBRARY_SECTIONS = ("## RepOptimizers in your own Flax code",)


def _library_snippets() -> list:
  """The python blocks of the README's library sections (up to the next '## ' heading), in order."""
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    text = f.read()
  blocks = []
  for heading in LIBRARY_SECTIONS:
    start = text.index("\n" + heading + "\n")
    end = text.find("\n## ", start + 1)
    section = text[start: end if end >= 0 else len(text)]
    blocks += re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
  return blocks


def _run(cmd, env, cwd, timeout=600):
  return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_core_install_is_the_library(tmp_path):
  snippets = _library_snippets()
  joined = "\n".join(snippets)
  for name in ("from flax import nnx", "flax.linen", "csla.hyper_search_model", "save_scales", "load_scales",
               "csla.scales_tree(params"):  # NNX, Linen, csla on a custom model, scales files, Linen dicts
    assert name in joined, f"the README's library examples no longer show {name}"

  # The source as an sdist would carry it (pyproject, README, the package), without build outputs.
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(REPO, name), src / name)
  shutil.copytree(os.path.join(REPO, "repopt_jax"), src / "repopt_jax",
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))

  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
  env.update(JAX_PLATFORMS="cpu", PIP_DISABLE_PIP_VERSION_CHECK="1", TF_CPP_MIN_LOG_LEVEL="3")
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # the snippets' many small programs compile faster
  venv = tmp_path / "venv"
  t0 = time.perf_counter()
  proc = _run([sys.executable, "-m", "venv", str(venv)], env, tmp_path)
  assert proc.returncode == 0, proc.stderr
  python = str(venv / "bin" / "python")
  baseline = set(_run([python, "-m", "pip", "list", "--format=freeze"], env, tmp_path).stdout.split())
  # Built in pip's isolated build env (the venv's own setuptools may be older than pyproject's build-system).
  # --no-compile: no .pyc for the thousands of modules of jax & co. (half the install's CPU time); it changes
  # nothing about what is installed.
  proc = _run([python, "-m", "pip", "install", "-q", "--no-compile", str(src)], env, tmp_path, timeout=900)
  assert proc.returncode == 0, "pip install of the package (no extras) failed:\n" + (proc.stdout + proc.stderr)[-3000:]
  install_s = time.perf_counter() - t0

  installed = set(_run([python, "-m", "pip", "list", "--format=freeze"], env, tmp_path).stdout.split()) - baseline
  names = {line.split("==")[0].lower() for line in installed}
  pulled = sorted(n for n in EXTRA_DISTRIBUTIONS if n.lower() in names)
  assert not pulled, f"the core install pulled packages of the extras: {pulled}"
  for want in ("jax", "flax", "optax", "chex", "numpy", "repopt-jax"):
    assert want in {n.replace("_", "-") for n in names}, f"{want} not installed: {sorted(names)}"
  proc = _run([python, "-c", "import importlib.util, sys; print([m for m in sys.argv[1:] if importlib.util.find_spec(m)])",
               *EXTRA_MODULES], env, tmp_path)
  assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr

  # The README's library examples, each in a fresh namespace, against the installed package (cwd is not the
  # repo, so the source tree is not on the path).
  runner = (
      "import sys, repopt_jax\n"
      f"assert repopt_jax.__file__.startswith({str(venv)!r}), repopt_jax.__file__\n"
      "for i, code in enumerate(sys.argv[1:]):\n"
      "  exec(compile(code, f'README library block {i}', 'exec'), {'__name__': f'readme_block_{i}'})\n"
      "  print(f'README library block {i} ok', flush=True)\n")
  t1 = time.perf_counter()
  proc = _run([python, "-c", runner, *snippets], env, tmp_path)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-4000:]
  assert all(f"README library block {i} ok" in out for i in range(len(snippets))), out[-4000:]
  snippets_s = time.perf_counter() - t1

  # The command line: help works; a command that needs an extra says which, in one line, exit status 2.
  cli = [str(venv / "bin" / "repopt-jax")]
  proc = _run(cli + ["--help"], env, tmp_path)
  assert proc.returncode == 0 and "quickstart" in proc.stdout, proc.stdout + proc.stderr
  cases = {
      ("train",): "error: 'train' needs the training extra: pip install \"repopt_jax[train]\"",
      ("quickstart",): "error: 'quickstart' needs the training extra: pip install \"repopt_jax[train]\"",
      ("search", "digits_tiny_hs"): "error: 'search' needs the training extra",
      ("eval", "--workdir", "runs/x"): "error: 'eval' needs the training extra",
      ("fuse", "--workdir", "runs/x"): "error: 'fuse' needs the training extra",
      ("export", "--workdir", "runs/x", "--out", "x.onnx"):
          "error: 'export' needs the training and deployment extras: pip install \"repopt_jax[train,deploy]\"",
      ("eval", "--onnx", "x.onnx", "--workdir", "runs/x"):
          "error: 'eval --onnx' needs the training and deployment extras",
      ("export", "--workdir", "runs/x", "--out", "x.hlo", "--format", "stablehlo"):
          "error: 'export' needs the training extra: pip install \"repopt_jax[train]\"",
  }
  for args, want in cases.items():
    proc = _run([python, "-m", "repopt_jax", *args], env, tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(want), (args, proc.returncode,
                                                                                    proc.stdout, proc.stderr)
  assert not os.path.exists(tmp_path / "runs"), "a refused command wrote a run directory"
  print(f"core install: {len(installed)} packages in {install_s:.1f} s; README library examples "
        f"{snippets_s:.1f} s")
