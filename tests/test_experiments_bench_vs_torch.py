"""experiments/bench_vs_torch.py: skips without PyTorch; its PyTorch networks are the JAX models' networks."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: experiments/
from experiments import bench_vs_torch  # noqa: E402


def test_skips_cleanly_without_torch(monkeypatch, capsys, tmp_path):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  assert bench_vs_torch.main(["--quick", "--out", str(tmp_path / "r")]) is None
  assert "skipped" in capsys.readouterr().out
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("mode", ["target", "repvgg"])
def test_torch_networks_match_the_jax_models(mode):
  torch = pytest.importorskip("torch")
  from repopt_jax.models import count_params  # pylint: disable=g-import-not-at-top
  from repopt_jax.models.vgg import get_arch  # pylint: disable=g-import-not-at-top
  from repopt_jax.train import build_model  # pylint: disable=g-import-not-at-top
  from experiments import speed_memory  # pylint: disable=g-import-not-at-top

  specs = get_arch("tiny").block_specs(3)
  net = bench_vs_torch.torch_model(torch, specs, 10, mode)
  n_torch = sum(p.numel() for p in net.parameters())
  jax_model = build_model(speed_memory.config_for("tiny", mode, "sgd", 4, 32, 10, "float32", 0))
  assert n_torch == count_params(jax_model)
  assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
