"""experiments/speed_memory.py: the largest-batch search against known memory curves, and a tiny-size run."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: experiments/
from experiments import speed_memory  # noqa: E402


class Curve:
  """A memory curve that records the batches it was asked about."""

  def __init__(self, fn):
    self.fn, self.calls = fn, []

  def __call__(self, b):
    self.calls.append(b)
    return self.fn(b)


@pytest.mark.parametrize("start", [8, 200])
def test_largest_batch_linear_memory_takes_few_probes(start):
  mem = Curve(lambda b: 1000 + 37 * b)
  out = speed_memory.largest_batch(mem, 5000, {start: 1000 + 37 * start}, max_probes=8)
  assert out["batch"] == (5000 - 1000) // 37 == 108 and out["exact"]
  assert out["bytes_per_example"] == pytest.approx(37.0)
  assert out["probes"] == len(mem.calls) <= 3 and 109 in mem.calls


def test_largest_batch_irregular_memory_and_nothing_fits():
  fn = lambda b: 1000 + 37 * b + (500 if b > 60 else 0) + (b % 7) * 3
  truth = max(b for b in range(1, 400) if fn(b) <= 5000)
  out = speed_memory.largest_batch(Curve(fn), 5000, {8: fn(8)}, max_probes=12)
  assert out["batch"] == truth and out["exact"]
  out = speed_memory.largest_batch(Curve(lambda b: 1000 + b), 500, {8: 1008}, max_probes=8)
  assert out["batch"] == 0 and out["exact"]
  # Out of probes: the best batch known to fit, flagged as not exact.
  out = speed_memory.largest_batch(Curve(lambda b: 10 * b), 10 ** 6, {1: 10}, max_probes=1)
  assert out == {"batch": 2, "exact": False, "probes": 1, "bytes_per_example": None}


def test_speed_memory_tiny(tmp_path):
  results = speed_memory.main(["--tiny", "--out", str(tmp_path)])
  for name in ("speed_memory.md", "speed_memory.png", "speed_memory.json"):
    assert os.path.getsize(tmp_path / name) > 0, name
  md = (tmp_path / "speed_memory.md").read_text()
  assert "git commit" in md and "| tiny @32px, batch 4 |" in md
  (res,) = results
  runs = res["runs"]
  for name in ("repopt", "repvgg", "plain"):
    assert runs[name]["train_images_per_s"] > 0 and runs[name]["memory"]["total"] > 0
  # RepVGG keeps three branches' activations and parameters: more memory and MACs than the plain conv net.
  assert runs["repvgg"]["memory"]["total"] > runs["repopt"]["memory"]["total"]
  assert runs["repvgg"]["train_params"] > runs["repopt"]["train_params"] == res["deployed_params"]
  assert runs["repvgg"]["macs_per_image"] > runs["repopt"]["macs_per_image"]
  # The deployed model is the fused RepVGG: same outputs.
  assert res["fusion_max_rel_diff"] < 1e-5
  for name in ("repopt", "repvgg"):
    assert runs[name]["max_batch"]["batch"] >= res["batch"]  # the budget is twice RepVGG's memory at batch 4
  assert json.loads((tmp_path / "speed_memory.json").read_text())["results"][0]["arch"] == "tiny"
