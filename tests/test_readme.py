"""The README's Python snippets run as written (each in a fresh namespace), and its commands are the ones CI runs."""

import os
import re
import subprocess
import sys

from test_train_common import REPO, python_env

README = os.path.join(REPO, "README.md")


def _blocks(lang: str) -> list:
  with open(README, encoding="utf-8") as f:
    text = f.read()
  return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


# Runs every block in its own namespace; a failing block is named with its traceback.
_RUNNER = """
import re, sys, traceback
text = open(sys.argv[1], encoding='utf-8').read()
blocks = re.findall(r"^```python\\n(.*?)^```", text, flags=re.S | re.M)
for i, code in enumerate(blocks):
  try:
    exec(compile(code, f'README.md python block {i}', 'exec'), {'__name__': f'readme_block_{i}'})
  except BaseException:
    traceback.print_exc()
    print(f'README python block {i} FAILED', flush=True)
    sys.exit(1)
  print(f'README python block {i} ok', flush=True)
"""


def test_readme_python_snippets_run():
  blocks = _blocks("python")
  assert len(blocks) >= 3
  joined = "\n".join(blocks)
  for name in ("nnx_train_step(model, tx, loss_fn)", "repopt_masks(", "repopt_sgd(", "flax.linen",
               "reparam.scales_tree(", "reparam.reinit_target(", "csla_init("):
    assert name in joined, name
  # A child python with one CPU device whose programs compile without LLVM optimisation: the snippets run
  # dozens of small eager ops, each compiled once (the same computations, only faster to compile).
  env = python_env(1)
  env["XLA_FLAGS"] = (env["XLA_FLAGS"] + " --xla_backend_optimization_level=0").strip()
  proc = subprocess.run([sys.executable, "-c", _RUNNER, README], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-4000:]
  assert all(f"README python block {i} ok" in out for i in range(len(blocks))), out[-4000:]


def test_readme_commands_match_ci_and_parse():
  """The fresh-machine commands are those .ci/run executes; every `python -m repopt_jax` line parses."""
  bash = "\n".join(_blocks("bash"))
  install = "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt"
  test_cmd = "python -m pytest -n 2 -q"
  assert install in bash and test_cmd in bash and "python -m repopt_jax quickstart" in bash
  with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
    ci = f.read()
  assert "pip install -r requirements.txt" in ci and test_cmd in ci

  from repopt_jax.cli import build_parser, parse_args  # pylint: disable=g-import-not-at-top
  parser = build_parser()
  commands = [line.split("python -m repopt_jax ", 1)[1] for line in bash.splitlines()
              if line.startswith("python -m repopt_jax ")]
  assert len(commands) >= 8
  for command in commands:
    args = parse_args(command.split(), parser)
    assert args.command in ("quickstart", "search", "train", "eval", "fuse", "export"), command
    assert all("=" in item for item in getattr(args, "items", [])[1:]), command  # export has none
