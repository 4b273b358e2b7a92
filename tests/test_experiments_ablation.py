"""experiments/ablation.py: the constants of each row, and a tiny-size run of every row."""

import os
import sys

import numpy as np
import pytest

from repopt_jax import CSLAScales

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: experiments/
from experiments import ablation  # noqa: E402


def _searched(in_channels=1):
  from repopt_jax.models import get_arch
  rng = np.random.default_rng(0)
  out = {}
  for sp in get_arch("tiny").block_specs(in_channels):
    c = sp.out_channels
    out[sp.name] = CSLAScales(conv=rng.uniform(0.5, 2, c), pointwise=rng.uniform(-1, 1, c), identity=sp.has_identity,
                              identity_init=rng.uniform(0.5, 1.5, c) if sp.has_identity else None)
  return out


def test_variant_scales():
  hs = _searched()
  assert ablation.variant_scales("hs", hs, "tiny", 1) is hs
  ones = ablation.variant_scales("ones", hs, "tiny", 1)
  avg = ablation.variant_scales("channel_avg", hs, "tiny", 1)
  init = ablation.variant_scales("hs_init", hs, "tiny", 1)
  assert list(ones) == list(avg) == list(init) == list(hs)
  for name, s in hs.items():
    np.testing.assert_array_equal(ones[name].conv, 1.0)
    np.testing.assert_allclose(avg[name].conv, np.mean(s.conv))
    np.testing.assert_allclose(avg[name].pointwise, np.mean(s.pointwise))
    assert avg[name].identity == s.identity
    if s.identity:
      np.testing.assert_allclose(avg[name].identity_init, np.mean(s.identity_init))
      np.testing.assert_array_equal(init[name].identity_init, 1.0)
  # The official HS initialisation: 1 for a stage's first block, sqrt(2/i) for the i-th following one.
  np.testing.assert_allclose(init["stage2.1"].conv, np.sqrt(2.0))
  np.testing.assert_allclose(init["stage2.0"].pointwise, 1.0)


def test_reinit_switch_of_the_rows():
  """`model.reinit=false` (the masks-only row) keeps the target's default kernels; true applies eq. 14."""
  from repopt_jax.train import build_model
  from experiments import study
  scales = _searched()
  r = study.recipe(True)
  rows = {row[0]: row for row in ablation.ROWS}
  kernel = lambda m: np.asarray(m.stage2[1].conv.kernel[...])
  plain = build_model(ablation.row_config(r, rows["none"], 0, None), None, num_classes=10, in_channels=1)
  masks_only = build_model(ablation.row_config(r, rows["mask_only"], 0, "x.npz"), scales, num_classes=10,
                           in_channels=1)
  full = build_model(ablation.row_config(r, rows["full"], 0, "x.npz"), scales, num_classes=10, in_channels=1)
  np.testing.assert_array_equal(kernel(masks_only), kernel(plain))
  # Re-initialised: the identity gamma(0) sits on the centre tap's diagonal, the 3x3 part is s-scaled.
  k = kernel(full)
  gamma = scales["stage2.1"].identity_init
  centre_diag = k[1, 1][np.arange(k.shape[2]), np.arange(k.shape[3])]
  assert np.corrcoef(centre_diag, gamma)[0, 1] > 0.9
  assert not np.allclose(k, kernel(plain))
  # 'full' and 'none' are exactly the main comparison's RepOpt-VGG and plain-VGG runs (reused, not retrained).
  assert ablation.row_config(r, rows["full"], 3, "hs.npz") == study.model_config(r, "repopt", 3, "hs.npz")
  assert ablation.row_config(r, rows["none"], 3, "hs.npz") == study.model_config(r, "vgg", 3, "hs.npz")


def test_verdicts():
  assert ablation.verdict(0.01, 0.002, 0.02).startswith("yes")
  assert ablation.verdict(-0.01, -0.02, -0.002).startswith("no")
  assert ablation.verdict(0.01, -0.002, 0.02).startswith("not resolved")


@pytest.mark.slow
def test_ablation_quick(tmp_path):
  # Hyper-Search, the pilot (full, none, RepVGG), then the rows full, none and all-ones on one seed.
  out = ablation.main(["--quick", "--root", str(tmp_path / "runs"), "--out", str(tmp_path), "--rows", "full",
                       "none", "ones"])
  for name in ("ablation.md", "ablation.png", "ablation.json"):
    assert os.path.getsize(tmp_path / name) > 0, name
  md = (tmp_path / "ablation.md").read_text()
  assert "git commit" in md and "| HS constants, re-init + masks (full method) |" in md and "Pilot" in md
  assert set(out["top1"]) == {"full", "none", "ones"}
  # Chance is 10% on digits; every quick row reaches ~90%.
  assert all(len(v) == 1 and v[0] > 0.6 for v in out["top1"].values()), out["top1"]
  assert out["pilot"]["full"] == out["top1"]["full"][0] and out["pilot"]["none"] == out["top1"]["none"][0]
  gaps = {g["row"]: g for g in out["gaps"]}
  assert gaps["ones"]["diffs"][0] == pytest.approx(out["top1"]["full"][0] - out["top1"]["ones"][0])
  assert gaps["ones"]["paper"] == pytest.approx(78.48 - 77.59)
  assert out["search"]["step"] == 40
