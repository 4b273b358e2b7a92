"""experiments/study.py and the experiments built on it: main_comparison.py and hyper_search.py."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: experiments/
from experiments import hyper_search, main_comparison, study  # noqa: E402


def test_t_interval_matches_scipy_and_widens_with_noise():
  from scipy import stats
  d = np.array([0.010, 0.014, 0.007, 0.012])
  m, lo, hi = study.t_interval(d)
  want = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
  np.testing.assert_allclose([lo, hi], want, rtol=1e-12)
  assert m == pytest.approx(d.mean()) and lo > 0
  _, lo2, hi2 = study.t_interval(d * [1, -1, 1, -1])
  assert lo2 < 0 < hi2
  m1, lo1, hi1 = study.t_interval([0.02])
  assert m1 == 0.02 and lo1 != lo1 and hi1 != hi1
  assert study.fmt_interval(0.0123, 0.001, 0.02) == "+1.23 [+0.10, +2.00]"
  assert study.fmt_interval(0.0123, float("nan"), float("nan")) == "+1.23 (one seed)"


def test_b1_eighth_is_b1s_layout():
  from repopt_jax.models import get_arch
  b1, small = get_arch("B1"), get_arch("B1_eighth")
  assert small.num_blocks == b1.num_blocks and small.strides == b1.strides
  assert [w * 8 for w in small.widths] == list(b1.widths) and small.stem_width * 8 == b1.stem_width
  specs = small.block_specs(1)
  assert len(specs) == 28 and sum(s.has_identity for s in specs) == 23
  assert [s.name for s in specs] == [s.name for s in b1.block_specs(3)]


def test_official_block_means_map_by_name():
  if not os.path.exists(study.OFFICIAL_B1):
    pytest.skip("the official B1 scales file is not here")
  from repopt_jax import load_scales
  official, _ = load_scales(study.OFFICIAL_B1)
  mapped = study.official_block_means("B1_eighth", 1)
  assert list(mapped) == list(official)
  for name, s in mapped.items():
    o = official[name]
    assert s.conv.shape == (study_width(name),)
    np.testing.assert_allclose(s.conv, np.mean(o.conv), rtol=1e-6)
    np.testing.assert_allclose(s.pointwise, np.mean(o.pointwise), rtol=1e-6)
    assert s.identity == o.identity
    if s.identity:
      np.testing.assert_allclose(s.identity_init, np.mean(o.identity_init), rtol=1e-6)
  # A layout without B1's blocks is refused, naming the block.
  with pytest.raises(ValueError, match="stage1.4"):
    study.official_block_means("L1", 3)


def study_width(name):
  from repopt_jax.models import get_arch
  return {s.name: s.out_channels for s in get_arch("B1_eighth").block_specs(1)}[name]


@pytest.fixture(scope="module")
def quick_root(tmp_path_factory):
  """Hyper-Search and the three models at the quick size, trained once for the tests below."""
  root = tmp_path_factory.mktemp("study")
  out = tmp_path_factory.mktemp("results")
  result = main_comparison.main(["--quick", "--root", str(root), "--out", str(out)])
  return root, out, result


@pytest.mark.slow
def test_main_comparison_quick(quick_root):
  root, out, result = quick_root
  for name in ("main_comparison.md", "main_comparison.png", "main_comparison.json"):
    assert os.path.getsize(out / name) > 0, name
  # Every model learns: 10 classes, chance is 10%; the quick runs reach ~89-96% (seeds 0-2).
  for model, res in result["results"].items():
    assert len(res) == 1 and res[0]["top1"] > 0.6, (model, res)
    assert res[0]["train_s_per_epoch"] > 0
  d = {x["pair"]: x for x in result["diffs"]}
  assert d["repopt-repvgg"]["diffs"][0] == pytest.approx(
      result["results"]["repopt"][0]["top1"] - result["results"]["repvgg"][0]["top1"])
  md = (out / "main_comparison.md").read_text()
  assert "RepOpt-VGG − RepVGG" in md and "git commit" in md and "+0.06" in md  # the paper's column


@pytest.mark.slow
def test_finished_runs_are_reused_and_a_changed_config_is_refused(quick_root):
  root, _, result = quick_root
  r = study.recipe(True)
  scales = os.path.join(root, "hs", "scales.npz")
  name = study.main_run_name("vgg", 0)
  before = {f: os.path.getmtime(os.path.join(dp, f)) for dp, _, fs in os.walk(root / name) for f in fs}
  again = study.train(str(root), name, study.model_config(r, "vgg", 0, scales), r)
  assert again == result["results"]["vgg"][0]
  after = {f: os.path.getmtime(os.path.join(dp, f)) for dp, _, fs in os.walk(root / name) for f in fs}
  assert after == before  # nothing retrained, nothing rewritten
  other = study.run_config(r, mode="target", optim="sgd", seed=0, reinit=False).to_dict()
  other["optim"]["lr"] = 0.05
  from repopt_jax.config import load_config
  with pytest.raises(Exception, match="(?i)lr|differ|config"):
    study.train(str(root), name, load_config(other), r)


@pytest.mark.slow
def test_hyper_search_quick_moves_the_constants(quick_root, tmp_path):
  root, _, _ = quick_root
  res = hyper_search.main(["--quick", "--root", str(root), "--out", str(tmp_path)])
  # 40 steps already move s and t by ~1-10% of their init (median ~2%); a search that did not train the
  # constants would leave them exactly at their init.
  assert res["moved"]["s_change"]["median"] > 0.005 and res["moved"]["t_change"]["median"] > 0.005
  blocks = {b["block"]: b for b in res["blocks"]}
  assert blocks["stage2.1"]["s_init"] == pytest.approx(np.sqrt(2.0))
  assert blocks["stage2.1"]["share_init"] == pytest.approx(1 / 5)  # gamma^2 / (2 s0^2 + gamma^2) = 1/(4+1)
  assert os.path.getsize(tmp_path / "hyper_search.png") > 0
  assert json.loads((tmp_path / "hyper_search.json").read_text())["search"]["step"] == 40


def test_hyper_search_init_and_relative_change():
  init = study.hs_init_scales("B1_eighth", 1)
  assert init["stage3.2"].conv[0] == pytest.approx(1.0) and init["stage3.4"].pointwise[0] == pytest.approx(np.sqrt(0.5))
  assert init["stage0"].identity is False and init["stage3.4"].identity_init is not None
  assert hyper_search.relative_change([1.1, 0.9], [1.0, 1.0]) == pytest.approx(0.1)


def test_a_stopped_run_records_no_result(tmp_path, monkeypatch):
  """A run stopped by a signal keeps its checkpoint for the resume but must not pass for a finished one."""
  import repopt_jax.train as train_mod

  class Stopped:
    def __init__(self, config, workdir, **kwargs):
      os.makedirs(workdir, exist_ok=True)

    def fit(self):
      return {"preempted": True, "step": 7}

  monkeypatch.setattr(train_mod, "Trainer", Stopped)
  r = study.recipe(True)
  cfg = study.run_config(r, mode="target", optim="sgd", seed=0, reinit=False)
  with pytest.raises(SystemExit, match="main/vgg_s0: stopped at step 7"):
    study.train(str(tmp_path), "main/vgg_s0", cfg, r)
  assert not os.path.exists(tmp_path / "main" / "vgg_s0" / "result.json")
