"""Smoke test of experiments/int8_ptq.py at its tiny size: HS, two trainings, PTQ, report files."""

import json
import os
import sys

import numpy as np
import pytest

from repopt_jax import CSLAScales, save_scales
from repopt_jax.models import get_arch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: experiments/
from experiments import int8_ptq  # noqa: E402


@pytest.mark.slow
def test_int8_ptq_tiny(tmp_path):
  # Constants from a file (Hyper-Search itself runs in the ablation's smoke test).
  rng = np.random.default_rng(0)
  scales = {sp.name: CSLAScales(conv=rng.uniform(0.5, 1.5, sp.out_channels),
                                pointwise=rng.uniform(0.2, 1, sp.out_channels), identity=sp.has_identity)
            for sp in get_arch("tiny").block_specs(1)}
  save_scales(str(tmp_path / "scales.npz"), scales, {"arch": "tiny"})
  results = int8_ptq.main(["--tiny", "--out", str(tmp_path), "--scales", str(tmp_path / "scales.npz")])
  for name in ("int8_ptq.md", "int8_ptq.png", "int8_ptq.json"):
    assert os.path.getsize(tmp_path / name) > 0, name
  md = (tmp_path / "int8_ptq.md").read_text()
  assert "git commit" in md and "| RepOpt-VGG |" in md and "| RepVGG (fused) |" in md
  for k in ("repopt", "repvgg"):
    r = results[k]
    assert r["float"]["count"] == 360  # the digits test split, padding rows masked out
    # Our own evaluation of the deployed float model reproduces the trainer's evaluation of the trained one.
    assert abs(r["float"]["top1"] - r["trainer_eval_top1"]) < 1.5 / 360
    for scheme, *_ in int8_ptq.SCHEMES:
      assert 0.0 <= r[scheme]["top1"] <= 1.0
    names = [n for n, *_ in r["kernels"]]
    assert names[0] == "stage0/conv" and names[-1] == "linear" and len(names) == 8
    assert all(std > 0 and ratio >= 1 for _, std, ratio in r["kernels"])
  stored = json.loads((tmp_path / "int8_ptq.json").read_text())
  assert set(stored["mean_kernel_std"]) == {"repopt", "repvgg"}
