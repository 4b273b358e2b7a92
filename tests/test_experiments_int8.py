"""experiments/int8_ptq.py: its metrics and statistics by hand, the missing-run error, and the --quick study."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: experiments/
from experiments import int8_ptq, study  # noqa: E402


def test_compare_by_hand():
  f = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
  q = f.copy()
  q[1] = [0.0, 1.0, 1.5]   # image 1 flips from class 1 to 2
  q[3] = [1.0, 0.5, 0.0]   # same argmax, smaller change
  labels = np.array([0, 1, 2, 1])  # float: 3 of 4 right; quantized: 2 of 4
  r = int8_ptq.compare(f, q, labels)
  assert r["float_top1"] == 0.75 and r["top1"] == 0.5 and r["drop"] == 0.25
  assert r["flip"] == 0.25
  assert r["logit_err"] == pytest.approx(np.sqrt(1.5 ** 2 + 0.5 ** 2) / np.sqrt(4 + 1 + 9 + 1))
  assert int8_ptq.compare(f, f, labels) == {"top1": 0.75, "float_top1": 0.75, "drop": 0.0, "logit_err": 0.0,
                                            "flip": 0.0}


def test_kernel_stats_one_definition():
  # Two layers with different spreads: the pooled std is that of the concatenation, not a mean of the layers'.
  a = np.array([1.0, -1.0, 1.0, -1.0]).reshape(1, 1, 2, 2)
  b = np.array([3.0, -3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]).reshape(1, 1, 2, 4)
  st = int8_ptq.kernel_stats({"stage0/conv": a, "stage1/0/conv": b})
  allw = np.concatenate([a.ravel(), b.ravel()])
  assert st["pooled_std"] == pytest.approx(allw.std())
  assert st["pooled_std"] != pytest.approx(np.mean([a.std(), b.std()]))
  assert st["pooled_max_over_std"] == pytest.approx(3.0 / allw.std())
  assert st["layers"] == [["stage0/conv", 1.0, 1.0], ["stage1/0/conv", pytest.approx(b.std()),
                                                      pytest.approx(3.0 / b.std())]]
  assert int8_ptq.forward_order(["linear", "stage2/1/conv", "stage2/10/conv", "stage2/2/conv", "stage0/conv"]) == \
      ["stage0/conv", "stage2/1/conv", "stage2/2/conv", "stage2/10/conv", "linear"]


def _fake_run(drop, std):
  return {"float_top1": 0.9, "kernels": {"pooled_std": std, "pooled_max_over_std": 10.0}, "unfolded_pooled_std": std,
          "schemes": {"W8A8": {"drop": drop, "logit_err": drop, "flip": drop, "top1": 0.9 - drop}}}


def test_summary_pairs_seeds():
  per_seed = {"repopt": [_fake_run(0.01, 0.01), _fake_run(0.02, 0.01), _fake_run(0.00, 0.01)],
              "repvgg": [_fake_run(0.05, 0.1), _fake_run(0.07, 0.1), _fake_run(0.03, 0.1)]}
  s = int8_ptq.summarize(per_seed, [0, 1, 2], ["repopt", "repvgg"], ["W8A8"])
  m, lo, hi = s["schemes"]["W8A8"]["drop_diff"]
  # Paired differences 0.04, 0.05, 0.03: mean 0.04, sd 0.01, t(0.975, 2) = 4.303.
  assert m == pytest.approx(0.04)
  assert hi - m == pytest.approx(4.303 * 0.01 / np.sqrt(3), rel=1e-3) and m - lo == pytest.approx(hi - m)
  assert s["pooled_std_ratio"][0] == pytest.approx(10.0)
  assert s["paper"]["drop_diff"] == pytest.approx((78.42 - 54.55 - 78.48 + 75.89) / 100)
  assert s["schemes"]["W8A8"]["n"] == 3


def test_missing_full_run_is_one_line_error(tmp_path):
  with pytest.raises(SystemExit) as e:
    int8_ptq.check_runs(str(tmp_path), study.FULL, [0, 1], ["repopt", "repvgg"])
  msg = str(e.value)
  assert "\n" not in msg and os.path.join(str(tmp_path), "main", "repopt_s0") in msg
  assert "python experiments/main_comparison.py --seeds 0 1" in msg


def test_default_root_is_only_read(tmp_path, monkeypatch):
  """Without --quick the study's runs root is never removed or changed, also when the script stops early."""
  root = tmp_path / "runs"
  (root / "hs").mkdir(parents=True)
  (root / "hs" / "scales.npz").write_bytes(b"keep")
  monkeypatch.setattr(study, "DEFAULT_ROOT", str(root))
  with pytest.raises(SystemExit, match="main_comparison.py --seeds 0"):
    int8_ptq.main(["--seeds", "0", "--out", str(tmp_path / "out")])
  assert (root / "hs" / "scales.npz").read_bytes() == b"keep"
  assert sorted(p.name for p in root.rglob("*")) == ["hs", "scales.npz"]


@pytest.mark.slow
def test_int8_ptq_quick(tmp_path):
  out = tmp_path / "out"
  res = int8_ptq.main(["--quick", "--out", str(out), "--root", str(tmp_path / "runs")])
  for name in ("int8_ptq.md", "int8_ptq.png", "int8_ptq.json"):
    assert os.path.getsize(out / name) > 0, name
  md = (out / "int8_ptq.md").read_text()
  assert "git commit" in md and "| W4A4 |" in md and "| ORT INT8 |" in md and "## What reproduces" in md
  runs = res["runs"]
  for m in int8_ptq.MODELS:
    r = runs[m][0]
    assert r["test_images"] == 360  # the digits test split, padding rows dropped
    # The deployed (fused, BN-folded) float model is the trained one: our evaluation matches the trainer's.
    assert abs(r["float_top1"] - r["trainer_top1"]) <= 1.5 / 360, m
    assert r["float_top1"] > 0.5, m  # chance is 0.1
    sc = r["schemes"]
    for kind in ("W{b}", "W{b}A{b}"):
      errs = [sc[kind.format(b=b)]["logit_err"] for b in int8_ptq.BITS]  # 8, 6, 5, 4 bits
      assert all(e2 >= e1 for e1, e2 in zip(errs, errs[1:])), (m, kind, errs)
      assert errs[-1] > 3 * errs[0], (m, kind, errs)  # each bit roughly halves the step: 4 bits >> 8 bits
    assert sc["W8"]["logit_err"] < 0.1 and sc["W8A8"]["logit_err"] < 0.1, m
    assert sc["W8"]["flip"] <= 0.03 and abs(sc["W8"]["drop"]) <= 0.03, m
    # onnxruntime's INT8 against its own float file: close; that float file is the JAX model.
    ort = sc[int8_ptq.ORT]
    assert ort["fp32_vs_jax_logit_err"] < 1e-5 and ort["fp32_vs_jax_flip"] == 0.0, m
    assert ort["logit_err"] < 0.1 and ort["flip"] <= 0.05, m
    # The real tool and our fake-quantized W8A8 make errors of the same size.
    assert 1 / 3 < ort["logit_err"] / sc["W8A8"]["logit_err"] < 3, m
    k = r["kernels"]
    assert [l[0] for l in k["layers"]][0] == "stage0/conv" and len(k["layers"]) == 7
    assert min(l[1] for l in k["layers"]) <= k["pooled_std"] and k["pooled_max_over_std"] >= max(
        l[2] * l[1] for l in k["layers"]) / k["pooled_std"] - 1e-9
  stored = json.loads((out / "int8_ptq.json").read_text())
  s = stored["summary"]
  assert s["seeds"] == [0] and set(s["pooled_std"]) == set(int8_ptq.MODELS)
  assert set(s["schemes"]) == {n for n, *_ in int8_ptq.schemes()} | {int8_ptq.ORT}
  w4 = s["schemes"]["W4A4"]
  assert w4["drop_diff"][0] == pytest.approx(runs["repvgg"][0]["schemes"]["W4A4"]["drop"]
                                             - runs["repopt"][0]["schemes"]["W4A4"]["drop"])
  assert np.isnan(w4["drop_diff"][1]) and np.isnan(w4["drop_diff"][2])  # one seed: no interval
