"""experiments/speed_memory.py: the largest-batch search against known memory curves.

The script's tiny-size run is in test_experiments_gpu_bench.py (gpu_bench.sh --tiny runs it).
"""

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
