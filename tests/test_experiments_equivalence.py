"""Smoke test of experiments/equivalence_drift.py at its tiny size: files written, drifts where the method puts them."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: experiments/
from experiments import equivalence_drift  # noqa: E402


def test_equivalence_drift_tiny(tmp_path):
  summary = equivalence_drift.main(["--tiny", "--out", str(tmp_path)])
  for name in ("equivalence_drift.md", "equivalence_drift.png", "equivalence_drift.json"):
    assert os.path.getsize(tmp_path / name) > 0, name
  md = (tmp_path / "equivalence_drift.md").read_text()
  assert "git commit" in md and "--tiny" in md and "| repopt_sgd (target) vs SGD (csla) |" in md
  s = summary["signed"]
  # The re-parameterized runs track the multi-branch ones to float32 rounding (amplified a little by training).
  assert 0 < s["sgd"]["max"] < 1e-3, s
  assert 0 < s["adamw_exact"]["max"] < 1e-4, s
  # ... and stay within a small factor of the float32 noise floor (same model, parameters moved by one ulp).
  assert s["sgd"]["max"] < 100 * max(s["sgd_control"]["max"], 1e-7), s
  # With t of both signs the paper's power-1 AdamW is a different optimizer: far larger drift than the exact one.
  assert s["adamw_paper"]["final"] > 100 * s["adamw_exact"]["final"], s
  stored = json.loads((tmp_path / "equivalence_drift.json").read_text())
  assert len(stored["drift"]["signed"]["sgd"]) == 4 + 1  # step 0 and one value per step
