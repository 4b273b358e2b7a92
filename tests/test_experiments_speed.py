"""experiments/speed_memory.py: the largest-batch search and the per-example memory against known memory curves,
and the committed report's numbers against each other.

The script's tiny-size run is in test_experiments_gpu_bench.py (gpu_bench.sh --tiny runs it).
"""

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
  assert out == {"batch": 2, "exact": False, "probes": 1, "bytes_per_example": None, "batch_bytes": 20,
                 "next_batch": None, "next_bytes": None}
  # The bracket's memory: the batch found fits, the next one (compiled) does not.
  out = speed_memory.largest_batch(Curve(fn), 5000, {8: fn(8)}, max_probes=12)
  assert out["batch_bytes"] == fn(truth) <= 5000 < fn(truth + 1) == out["next_bytes"]
  assert out["next_batch"] == truth + 1


def test_per_example_memory_is_the_slope_between_two_batches():
  mem = Curve(lambda b: 1000 + 37 * b)
  out = speed_memory.per_example_memory(mem, (16, 8))
  assert out == {"batches": [8, 16], "bytes": [1296, 1592], "bytes_per_example": 37.0} and mem.calls == [8, 16]
  # A fixed part does not enter the slope: two models with other fixed parts and 2x the per-example bytes.
  a = speed_memory.per_example_memory(lambda b: 10 ** 6 + 100 * b, (4, 8))["bytes_per_example"]
  b = speed_memory.per_example_memory(lambda b: 3 * 10 ** 6 + 200 * b, (4, 8))["bytes_per_example"]
  assert b / a == 2.0
  with pytest.raises(ValueError, match="two different"):
    speed_memory.per_example_memory(mem, (8, 8))


def _fake_result(arch, per_example, fixed, budget, batch=8):
  runs = {}
  for name in ("repopt", "repvgg", "plain"):
    f, p = fixed[name], per_example[name]
    runs[name] = {"train_images_per_s": 100.0, "train_images_per_cpu_s": 50.0,
                  "memory": {"total": f + p * batch},
                  "memory_per_example": {"batches": [batch, 2 * batch], "bytes": [f + p * batch, f + 2 * p * batch],
                                         "bytes_per_example": float(p)}}
    if name != "plain":
      runs[name]["max_batch"] = {"batch": (budget - f) // p}
  return {"arch": arch, "image_size": 32, "batch": batch, "runs": runs, "memory_budget_bytes": budget,
          "per_example_ratio": per_example["repvgg"] / per_example["repopt"]}


def test_report_rows_and_plot_show_the_per_example_ratio(tmp_path):
  from matplotlib import image  # pylint: disable=g-import-not-at-top

  mib = 2 ** 20
  # Values spanning decades (a tiny model and a big one), as in the CPU report.
  small = _fake_result("cifar_tiny", {"repopt": mib // 10, "repvgg": mib // 5, "plain": mib // 10},
                       {"repopt": 2 * mib, "repvgg": 3 * mib, "plain": 2 * mib}, budget=40 * mib)
  big = _fake_result("B1", {"repopt": 5 * mib, "repvgg": 9 * mib, "plain": 5 * mib},
                     {"repopt": 400 * mib, "repvgg": 450 * mib, "plain": 400 * mib}, budget=1600 * mib)
  speed, memory, maxb, infer = speed_memory.report_rows([small, big], cpu=True)
  assert [row[-1] for row in memory] == pytest.approx([2.0, 1.8], rel=1e-4)  # repvgg / repopt bytes per example
  assert [row[5:8] for row in memory][1] == [5.0, 9.0, 5.0]  # MiB per example
  assert memory[0][5:8] == pytest.approx([0.1, 0.2, 0.1], rel=1e-4)
  assert [row[-1] for row in maxb] == pytest.approx([2.0, 1.8], rel=1e-4)
  assert [row[2:4] for row in maxb] == [[380, 185], [240, 127]]
  assert infer == [] and len(speed) == 2
  path = str(tmp_path / "plot.png")
  speed_memory.plot(path, [small, big], cpu=True)
  assert image.imread(path).shape[:2] == (935, 1320)


def test_the_committed_report_has_consistent_per_example_ratios():
  """experiments/results/speed_memory.json: every per-example number is the slope of its two compiled
  batches; RepVGG needs more memory per example than RepOpt-VGG (measured 1.40 for cifar_tiny and 1.53 for B1
  at 64 px) and the plain model the same as RepOpt-VGG (the Grad Mult is a constant); the largest batches
  are exact and consistent with the slopes."""
  path = os.path.join(os.path.dirname(speed_memory.__file__), "results", "speed_memory.json")
  with open(path) as f:
    report = json.load(f)
  assert [r["arch"] for r in report["results"]] == ["cifar_tiny", "B1"]
  for res in report["results"]:
    runs, budget = res["runs"], res["memory_budget_bytes"]
    per = {k: v["memory_per_example"] for k, v in runs.items()}
    for name, p in per.items():
      b0, b1 = p["batches"]
      assert (b0, b1) == (res["batch"], 2 * res["batch"]) and p["bytes"][0] == runs[name]["memory"]["total"]
      assert p["bytes_per_example"] == pytest.approx((p["bytes"][1] - p["bytes"][0]) / (b1 - b0))
    ratio = per["repvgg"]["bytes_per_example"] / per["repopt"]["bytes_per_example"]
    assert res["per_example_ratio"] == pytest.approx(ratio) and ratio > 1.3, (res["arch"], ratio)
    assert per["plain"]["bytes_per_example"] == pytest.approx(per["repopt"]["bytes_per_example"], rel=0.05)
    for name in ("repopt", "repvgg"):
      mb = runs[name]["max_batch"]
      assert mb["exact"] and mb["next_batch"] == mb["batch"] + 1
      assert mb["batch_bytes"] <= budget < mb["next_bytes"]
      linear = res["batch"] + (budget - runs[name]["memory"]["total"]) / per[name]["bytes_per_example"]
      assert abs(mb["batch"] - linear) <= 0.15 * linear, (res["arch"], name, mb["batch"], linear)
    # RepVGG's fixed part (its extra branch parameters) is larger too: its max batch falls behind by more.
    assert runs["repopt"]["max_batch"]["batch"] / runs["repvgg"]["max_batch"]["batch"] >= 0.95 * ratio
