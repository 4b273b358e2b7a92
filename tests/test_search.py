"""Hyper-Search's pieces that need no training: the statistics and plots of scales (on the official B1 file and
hand-built scales), the metadata written with searched scales, and refusing a config that is not a search."""

import os

import numpy as np
import pytest

from conftest import official_scales_file
from repopt_jax import CSLAScales, load_scales, read_torch_state_dict
from repopt_jax.config import ConfigError, load_config
from repopt_jax.search import identity_variance_ratio, plot_scales, scale_stats, scales_metadata, search


def test_identity_variance_ratio_by_hand():
  s = CSLAScales(conv=np.array([1.0, 2.0]), pointwise=np.array([1.0, 0.0]), identity=True,
                 identity_init=np.array([1.0, 2.0]))
  # Channel 0: 1 / (1 + 1 + 1); channel 1: 4 / (4 + 0 + 4).
  assert identity_variance_ratio(s) == pytest.approx((1 / 3 + 1 / 2) / 2, rel=1e-12)
  # Without trained gamma the identity weight is 1: 1/3 and 1/5.
  assert identity_variance_ratio(s.replace(identity_init=None)) == pytest.approx((1 / 3 + 1 / 5) / 2, rel=1e-12)
  assert identity_variance_ratio(s.replace(identity=False, identity_init=None)) is None
  # Negative scales count by their square.
  assert identity_variance_ratio(s.replace(conv=np.array([-1.0, -2.0]))) == identity_variance_ratio(s)


def test_scale_stats_of_the_official_b1_file_match_its_raw_tensors():
  path = official_scales_file("RepOpt-VGG-B1-scales.pth")
  scales, _ = load_scales(path)
  stats = scale_stats(scales)
  assert [r["block"] for r in stats] == list(scales) and len(stats) == 1 + 4 + 6 + 16 + 1
  assert [r["depth"] for r in stats] == list(range(1, 29))
  with_identity = [r for r in stats if r["gamma"] is not None]
  assert len(with_identity) == 3 + 5 + 15  # every block of a stage but its first (and stage0, stage4.0)
  assert all(r["identity_variance_ratio"] is None for r in stats if r["gamma"] is None)

  # Every row against the raw tensors of its block.
  raw = read_torch_state_dict(path)
  for row in stats:
    name = row["block"]
    s = np.asarray(raw[f"{name}.scale_conv.weight"], np.float64)
    t = np.asarray(raw[f"{name}.scale_1x1.weight"], np.float64)
    assert row["s"]["mean"] == pytest.approx(s.mean(), rel=1e-6) and row["s"]["max"] == pytest.approx(s.max())
    assert row["t"]["std"] == pytest.approx(t.std(), rel=1e-5) and row["t"]["min"] == pytest.approx(t.min())
    if row["gamma"] is not None:
      g = np.asarray(raw[f"{name}.scale_identity.weight"], np.float64)
      assert row["gamma"]["min"] == pytest.approx(g.min())
      assert row["identity_variance_ratio"] == pytest.approx(np.mean(g**2 / (s**2 + t**2 + g**2)), rel=1e-6)


def test_the_official_b1_scales_moved_away_from_the_hyper_search_init():
  """The official file is a Hyper-Search result: every block's s and t (and gamma) left the official init
  (s = t = 1 for a stage's first block, sqrt(2/i) for its i-th following one; gamma = 1), and so did the
  identity variance ratios (1 / (2 s0^2 + 1) at the init). Measured on the file: the smallest per-block
  largest relative change is 0.058 (s) and 0.060 (t), at stage4.0; the median 0.88 and 0.87; every gamma
  moved by at least 0.54; the identity ratios differ from their init values by 0.11 on average, 0.27 at most."""
  from repopt_jax.models import get_arch  # pylint: disable=g-import-not-at-top
  from repopt_jax.models.vgg import hs_scale_init  # pylint: disable=g-import-not-at-top

  scales, _ = load_scales(official_scales_file("RepOpt-VGG-B1-scales.pth"))
  specs = {sp.name: sp for sp in get_arch("B1").block_specs(3)}
  assert list(scales) == list(specs)
  moved_s, moved_t, moved_g, ratio_change = [], [], [], []
  for name, sc in scales.items():
    init = hs_scale_init(specs[name].index)
    moved_s.append(np.max(np.abs(np.asarray(sc.conv, np.float64) / init - 1)))
    moved_t.append(np.max(np.abs(np.asarray(sc.pointwise, np.float64) / init - 1)))
    if sc.identity:
      moved_g.append(np.max(np.abs(np.asarray(sc.identity_init, np.float64) - 1)))
      ratio_change.append(abs(identity_variance_ratio(sc) - 1 / (2 * init**2 + 1)))
  assert min(moved_s) > 0.04 and min(moved_t) > 0.04, (min(moved_s), min(moved_t))
  assert np.median(moved_s) > 0.5 and np.median(moved_t) > 0.5, (np.median(moved_s), np.median(moved_t))
  assert len(moved_g) == 23 and min(moved_g) > 0.4, moved_g
  assert np.mean(ratio_change) > 0.05 and max(ratio_change) > 0.2, ratio_change


def test_plot_scales_writes_two_pngs(tmp_path):
  from matplotlib import image  # pylint: disable=g-import-not-at-top

  scales, _ = load_scales(official_scales_file("RepOpt-VGG-B1-scales.pth"))
  paths = plot_scales(scales, str(tmp_path / "plots"), title="official B1")
  assert [os.path.basename(p) for p in paths] == ["scales_distribution.png", "identity_variance_ratio.png"]
  dist, ratio = (image.imread(p) for p in paths)
  # One box per block: the figure widens with the 28 blocks of B1 (0.38 in each + margins, at 100 dpi).
  assert dist.shape[1] == int(100 * (0.38 * 28 + 2.0)) and dist.shape[0] == 900
  assert ratio.shape[0] == 380 and ratio.shape[1] > 600
  assert float(np.std(dist[..., :3])) > 0.05  # something was drawn


def test_plot_scales_of_a_model_without_identity_branches(tmp_path):
  scales = {f"stage{i}": CSLAScales(conv=np.linspace(0.5, 1.5, 4), pointwise=np.ones(4)) for i in range(3)}
  paths = plot_scales(scales, str(tmp_path))
  assert all(os.path.getsize(p) > 1000 for p in paths)


def test_scales_metadata_records_the_architecture():
  config = load_config("cifar100_hs")
  meta = scales_metadata(config, in_channels=3, num_classes=100, metrics={"step": 5, "eval_top1": 0.25})
  assert meta["arch"] == "B1" and meta["source"] == "hyper-search" and meta["dataset"] == "cifar100"
  assert meta["arch_config"] == {"num_blocks": [4, 6, 16, 1], "widths": [128, 256, 512, 2048], "stem_width": 64,
                                 "strides": [2, 2, 2, 2, 2]}
  assert meta["in_channels"] == 3 and meta["num_classes"] == 100 and meta["hs_init"] == "official"
  assert meta["step"] == 5 and meta["eval_top1"] == 0.25
  assert load_config(meta["config"]) == config  # the whole config, loadable again


def test_search_refuses_a_config_that_is_not_hyper_search(tmp_path):
  with pytest.raises(ConfigError, match=r"'model.mode' = 'target'.*model.mode=hs"):
    search("digits_tiny", str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")  # nothing was created


def test_the_search_command_validates_before_it_writes_anything(tmp_path, tmp_path_factory, capsys):
  """Before: `search` wrote WORKDIR/config.json first, so a refused search left a run directory behind."""
  from repopt_jax.cli import main  # pylint: disable=g-import-not-at-top
  from test_train_common import digits_dir  # pylint: disable=g-import-not-at-top

  ddir = digits_dir(tmp_path_factory)
  cases = [
      (["digits_tiny"], "'model.mode' = 'target'"),                       # not a Hyper-Search config
      (["digits_tiny_hs", "train.batch_size=2000", "train.eval_batch_size=8"], "larger than the 1437 examples"),
      (["digits_tiny_hs", "data.train_split=validation"], "has no split 'validation'"),
      (["digits_tiny_hs", "optim.lr=NaN"], "'optim.lr' = nan is not a finite number"),
  ]
  for i, (items, message) in enumerate(cases):
    work = tmp_path / f"w{i}" / "hs"
    code = main(["search", *items, f"data.data_dir={ddir}", "--workdir", str(work), "--no-progress"])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:") and message in err, (items, err)
    assert not os.path.exists(tmp_path / f"w{i}"), items  # no directory, no config.json
