"""notebooks/repopt_on_your_model.ipynb runs top to bottom on CPU (nbclient, a python3 kernel), and is kept in
git without outputs."""

import json
import os

import pytest

from test_train_common import REPO, python_env

NOTEBOOK = os.path.join(REPO, "notebooks", "repopt_on_your_model.ipynb")


def test_notebook_is_stored_without_outputs():
  with open(NOTEBOOK, encoding="utf-8") as f:
    nb = json.load(f)
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert code and all(not c.get("outputs") and c.get("execution_count") is None for c in code)
  assert "find_spec(\"repopt_jax\") is None" in "".join(code[0]["source"])  # the guarded install cell


def test_notebook_executes():
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  env = python_env(1)
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel inherits this process's environment: one CPU device, quiet XLA
  try:
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "test accuracy: RepOpt" in text and "Hyper-Search test accuracy" in text
