"""Smoke test of experiments/deploy.py at its tiny size: export, INT8, the three engines, the report files."""

import json
import os
import sys

import pytest

pytest.importorskip("onnxruntime")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: experiments/
from experiments import deploy  # noqa: E402


def test_deploy_bench_tiny(tmp_path):
  out = deploy.main(["--tiny", "--out", str(tmp_path)])
  r = out["results"]["cifar_tiny"]
  assert r["int8_bytes"] < 0.5 * r["fp32_bytes"]
  for b in (1, 4):
    row = r["batches"][b]
    assert row["onnx_fp32_rel_diff"] <= 1e-5
    assert all(row[e]["images_per_sec"] > 0 for e in ("JAX (jit, eval mode)", "onnxruntime fp32",
                                                      "onnxruntime INT8"))
  md = (tmp_path / "deploy.md").read_text()
  assert "git commit" in md and "| cifar_tiny @32 | 4 |" in md
  assert set(json.loads((tmp_path / "deploy.json").read_text())["results"]) == {"cifar_tiny"}
