"""experiments/bench_vs_torch.py: skips without PyTorch; its PyTorch networks are the JAX models' networks; the
step it calls "documented" is the README's (`repopt_jax.nnx_train_step` with the README's loss)."""

import inspect
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: experiments/
from experiments import bench_vs_torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_skips_cleanly_without_torch(monkeypatch, capsys, tmp_path):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  assert bench_vs_torch.main(["--quick", "--out", str(tmp_path / "r")]) is None
  assert "skipped" in capsys.readouterr().out
  assert not list(tmp_path.iterdir())


def test_bad_case_is_refused_in_one_line():
  with pytest.raises(SystemExit, match="--cases entry 'B1:64' is not ARCH:IMAGE_SIZE:BATCH"):
    bench_vs_torch.main(["--cases", "B1:64"])


def test_the_readme_trains_with_the_benchmarked_step_and_loss():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  body = inspect.getsource(bench_vs_torch.readme_loss).split("return ", 1)[1].strip()
  assert body == "optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()"
  assert f"loss_fn = lambda model, x, y: {body}\ntrain_step, state = nnx_train_step(model, tx, loss_fn)" in readme


def test_documented_run_calls_the_library_step(monkeypatch):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import repopt_jax  # pylint: disable=g-import-not-at-top
  from repopt_jax.models import reparam  # pylint: disable=g-import-not-at-top
  from repopt_jax.train import build_model  # pylint: disable=g-import-not-at-top
  from experiments import speed_memory  # pylint: disable=g-import-not-at-top

  calls = []

  def spy(model, tx, loss_fn, **kwargs):  # records what the bench passes; steps without compiling anything
    calls.append((model, tx, loss_fn, kwargs))
    return (lambda state, x, y: (state, jnp.float32(1.0))), repopt_jax.NNXTrainState(jnp.zeros(1), None, None)

  monkeypatch.setattr(repopt_jax, "nnx_train_step", spy)
  scales = reparam.scales_from_hs(build_model(speed_memory.config_for("tiny", "hs", "sgd", 2, 32, 10, "float32", 0)))
  run = bench_vs_torch.DocumentedRun("tiny", "target", "repopt_sgd", 2, 32, 10, scales)
  (model, tx, loss_fn, kwargs), = calls
  assert loss_fn is bench_vs_torch.readme_loss and kwargs == {}  # the README's call, defaults included
  assert type(model).__name__ == "RepOptVGG" and model.mode == "target"
  assert run.x.shape == (2, 32, 32, 3) and run.check()


def test_official_width_multipliers():
  from repopt_jax.models.vgg import VGGConfig, get_arch  # pylint: disable=g-import-not-at-top
  assert bench_vs_torch.official_width_multiplier(get_arch("B1")) == [2, 2, 2, 4]
  assert bench_vs_torch.official_width_multiplier(get_arch("cifar_tiny")) == [0.25] * 4
  with pytest.raises(SystemExit, match="official RepOptVGG cannot build 'odd'"):
    bench_vs_torch.official_width_multiplier(VGGConfig("odd", (1, 1, 1, 1), (16, 32, 64, 128), 8))


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
  if os.path.isdir(os.path.join(bench_vs_torch.DEFAULT_OFFICIAL_CODE, "repoptimizer")):
    import numpy as np  # pylint: disable=g-import-not-at-top
    from repopt_jax import rules  # pylint: disable=g-import-not-at-top
    from repopt_jax.models import reparam  # pylint: disable=g-import-not-at-top
    scales = reparam.scales_from_hs(build_model(speed_memory.config_for("tiny", "hs", "sgd", 4, 32, 10, "float32",
                                                                        0)))
    masks = [np.transpose(np.asarray(rules.grad_mult(scales[s.name], (3, 3, s.in_channels, s.out_channels))),
                          (3, 2, 0, 1)) for s in specs] if mode == "target" else None
    official = bench_vs_torch.OfficialRun(torch, bench_vs_torch.DEFAULT_OFFICIAL_CODE, get_arch("tiny"), scales, 10,
                                          mode, 2, 32, masks)  # its Grad Mults checked against ours
    assert sum(p.numel() for p in official.model.parameters()) == n_torch
    official.step()
    assert official.check()
