"""The package's layers, read from its source with `ast`: no import cycle, and a library that never reaches
into the application.

Every `import` and `from ... import` of every module of `repopt_jax` counts, function-level ones included
(moving an import into a function hides a cycle from Python, not from this test). An edge goes to the
module named: `from repopt_jax.models import blocks` is an edge to `repopt_jax.models.blocks` (a submodule),
`from repopt_jax.scales import CSLAScales` one to `repopt_jax.scales`. The implicit import of a parent
package (`repopt_jax/models/__init__.py` runs before `repopt_jax.models.blocks`) is not an edge: a
package's `__init__` re-exports its children, so counting it would make every package a cycle.

Run as a script (`python tests/test_layering.py [package_dir]`) it prints the graph's cycles, the library's
forbidden imports and the largest modules.
"""

from __future__ import annotations

import ast
import os
import sys
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE = "repopt_jax"
PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)

# The library: what `pip install repopt_jax` (no extras) is for. It imports only jax, flax, optax, chex, numpy,
# the standard library and other library modules.
LIBRARY = ("repopt_jax", "repopt_jax.rules", "repopt_jax.optim", "repopt_jax.scales", "repopt_jax.csla",
           "repopt_jax.linen", "repopt_jax.models", "repopt_jax.paths", "repopt_jax.ops", "repopt_jax.block",
           "repopt_jax.nnx_step")
# Third-party packages the library may import (flax brings orbax, but only the trainer's checkpoints use it).
LIBRARY_PACKAGES = {"jax", "jaxlib", "flax", "optax", "chex", "numpy"}
# Packages only the application (the `[train]` and `[deploy]` extras) installs.
APPLICATION_PACKAGES = {"tensorflow_datasets", "grain", "sklearn", "tqdm", "tensorboardX", "matplotlib", "onnx",
                        "onnxruntime", "orbax", "etils", "PIL", "tensorflow", "torch"}


def is_library(module: str) -> bool:
  return any(module == m or (m != PACKAGE and module.startswith(m + ".")) for m in LIBRARY)


def module_files(package_dir: str = PACKAGE_DIR) -> Dict[str, str]:
  """`{dotted module name: file}` of every module of the package."""
  root = os.path.dirname(package_dir)
  out = {}
  for dirpath, dirnames, filenames in os.walk(package_dir):
    dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
    for f in sorted(filenames):
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, f), root)[: -len(".py")].split(os.sep)
        if rel[-1] == "__init__":
          rel = rel[:-1]
        out[".".join(rel)] = os.path.join(dirpath, f)
  return out


def _imports(tree: ast.AST, module: str, is_package: bool) -> List[Tuple[str, List[str], int]]:
  """`[(imported module, names imported from it, line)]` of every import statement in the tree."""
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.extend((a.name, [], node.lineno) for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: resolve against the importing module's package
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
      out.append((base, [a.name for a in node.names], node.lineno))
  return out


def import_graph(package_dir: str = PACKAGE_DIR):
  """`(edges, external)`: `edges[m]` = `{internal module: first line importing it}`, `external[m]` = `{top-level
  third-party or stdlib package: line}`."""
  files = module_files(package_dir)
  edges: Dict[str, Dict[str, int]] = {m: {} for m in files}
  external: Dict[str, Dict[str, int]] = {m: {} for m in files}
  for m, path in files.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    for base, names, line in _imports(tree, m, path.endswith("__init__.py")):
      if base.split(".")[0] != PACKAGE:
        external[m].setdefault(base.split(".")[0], line)
        continue
      targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in files] or [base]
      if len(targets) < len(names):  # `from pkg import sub, name`: both the submodule and pkg itself
        targets.append(base)
      for t in targets:
        while t not in files:  # `import repopt_jax.models.vgg.x`-style names end at the module
          t = t.rsplit(".", 1)[0]
        if t != m:
          edges[m].setdefault(t, line)
  return edges, external


def cycles(edges: Dict[str, Dict[str, int]]) -> List[List[str]]:
  """The import cycles: one cycle through each strongly connected component of more than one module (Tarjan)."""
  index: Dict[str, int] = {}
  low: Dict[str, int] = {}
  stack: List[str] = []
  on: Set[str] = set()
  comps: List[List[str]] = []

  def strong(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(edges[v]):
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        comps.append(sorted(comp))

  for v in sorted(edges):
    if v not in index:
      strong(v)
  out = []
  for comp in comps:  # a shortest cycle through the component's first module (breadth-first)
    start, members = comp[0], set(comp)
    prev = {start: None}
    queue = [start]
    found = None
    while queue and found is None:
      v = queue.pop(0)
      for w in sorted(edges[v]):
        if w == start:
          found = v
          break
        if w in members and w not in prev:
          prev[w] = v
          queue.append(w)
    path = []
    while found is not None:
      path.append(found)
      found = prev[found]
    out.append(path[::-1] + [start])
  return out


def library_violations(edges, external) -> List[str]:
  """One line per import of an application module or an application-only package by a library module."""
  out = []
  for m in sorted(edges):
    if not is_library(m):
      continue
    for t, line in sorted(edges[m].items()):
      if not is_library(t):
        out.append(f"{m} (line {line}) imports the application module {t}")
    for p, line in sorted(external[m].items()):
      if p in APPLICATION_PACKAGES:
        out.append(f"{m} (line {line}) imports the application-only package {p}")
      elif p not in LIBRARY_PACKAGES and p not in sys.stdlib_module_names and p != "__future__":
        out.append(f"{m} (line {line}) imports {p}, which the core install does not provide")
  return out


def _describe(cycle: List[str]) -> str:
  return " -> ".join(cycle)


def test_no_import_cycle():
  edges, _ = import_graph()
  found = cycles(edges)
  assert not found, "import cycles:\n" + "\n".join(
      _describe(c) + "  (" + ", ".join(f"{a} line {edges[a][b]}" for a, b in zip(c, c[1:])) + ")" for c in found)


def test_library_imports_only_the_library():
  edges, external = import_graph()
  bad = library_violations(edges, external)
  assert not bad, "\n".join(bad)


def test_every_library_module_exists():
  # A renamed module must not silently drop out of the checks above.
  files = module_files()
  missing = [m for m in LIBRARY if m not in files]
  assert not missing, f"library modules named in this test but absent: {missing}"


def test_public_names_come_from_the_library():
  # `repopt_jax.__init__` imports its public names lazily (by name, invisible to `ast`): all of the library.
  import repopt_jax  # pylint: disable=g-import-not-at-top
  outside = sorted({m for m in repopt_jax._LAZY.values() if not is_library(m)})  # pylint: disable=protected-access
  assert not outside, f"repopt_jax exports names of application modules: {outside}"


def test_the_checks_can_fail():
  # The cycle finder and the layer rule on a hand-made graph.
  edges = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
  assert cycles(edges) == [["a", "b", "c", "a"]]
  assert cycles({"a": {"b": 1}, "b": {}}) == []
  edges = {"repopt_jax.csla": {"repopt_jax.train": 5, "repopt_jax.rules": 6}, "repopt_jax.rules": {},
           "repopt_jax.train": {}}
  external = {"repopt_jax.csla": {"tqdm": 7, "jax": 8, "math": 9}, "repopt_jax.rules": {"yaml": 3},
              "repopt_jax.train": {"tqdm": 1}}
  assert library_violations(edges, external) == [
      "repopt_jax.csla (line 5) imports the application module repopt_jax.train",
      "repopt_jax.csla (line 7) imports the application-only package tqdm",
      "repopt_jax.rules (line 3) imports yaml, which the core install does not provide",
  ]


def test_function_level_and_relative_imports_are_read(tmp_path):
  pkg = tmp_path / PACKAGE
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("def f():\n  from repopt_jax.sub import b\n")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "sub" / "b.py").write_text("from .. import a\nimport numpy\n")
  edges, external = import_graph(str(pkg))
  assert edges["repopt_jax.a"] == {"repopt_jax.sub.b": 2}
  assert edges["repopt_jax.sub.b"] == {"repopt_jax.a": 1}
  assert external["repopt_jax.sub.b"] == {"numpy": 2}
  assert cycles(edges) == [["repopt_jax.a", "repopt_jax.sub.b", "repopt_jax.a"]]


if __name__ == "__main__":
  package_dir = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else PACKAGE_DIR
  edges, external = import_graph(package_dir)
  print("cycles:")
  for c in cycles(edges):
    print("  " + _describe(c))
  print("library imports outside the library:")
  for line in library_violations(edges, external):
    print("  " + line)
  sizes = sorted(((sum(1 for _ in open(p, encoding="utf-8")), m) for m, p in module_files(package_dir).items()),
                 reverse=True)
  print(f"modules: {len(sizes)}, lines: {sum(n for n, _ in sizes)}; largest:")
  for n, m in sizes[:8]:
    print(f"  {n:5d}  {m}")
