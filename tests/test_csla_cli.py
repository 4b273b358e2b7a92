"""`search` then `train --scales` through the command line for a model that is not VGG (the CIFAR ResNet-18,
narrow): the scales file is keyed by the ResNet's kernel paths, and the RepOptimizer trains the plain ResNet
with them (Rule of Initialization + Grad Mult through the generic `repopt_jax.csla` machinery)."""

import json
import os

import numpy as np
import pytest

from repopt_jax import load_scales
from repopt_jax.models import available_archs, flops
from test_cli import QUIET, _ok, _run
from test_train_common import digits_dir

SHORT = ["train.epochs=null", "train.steps=12", "optim.warmup_epochs=0", "train.log_every=4",
         "model.arch=resnet18_cifar_tiny"]


@pytest.fixture(scope="module")
def ddir(tmp_path_factory):
  return digits_dir(tmp_path_factory)


def test_search_then_train_scales_for_resnet18(ddir, tmp_path, capsys):
  assert "resnet18_cifar" in available_archs()
  assert round(flops("resnet18_cifar", 32, 10) / 1e6) == 555  # the usual 0.56 GMACs of the CIFAR ResNet-18
  d = f"data.data_dir={ddir}"
  hs, repopt = str(tmp_path / "hs"), str(tmp_path / "repopt")
  out = _ok(capsys, ["search", "digits_tiny_hs", d, *SHORT, "--workdir", hs, "--no-plots", *QUIET])
  scales_path = os.path.join(hs, "scales.npz")
  scales, meta = load_scales(scales_path)
  assert meta["arch"] == "resnet18_cifar_tiny" and meta["step"] == 12
  assert len(scales) == 17 and list(scales)[:2] == ["conv1/kernel", "layer1/0/conv1/kernel"]
  s = scales["layer1/0/conv1/kernel"]
  assert s.identity and 0 < np.max(np.abs(np.asarray(s.conv) - np.sqrt(2))) < 0.5  # trained from sqrt(2)
  assert not scales["layer2/0/conv1/kernel"].identity

  code, out, err = _run(capsys, ["train", "digits_tiny", d, "--scales", scales_path, *SHORT, "--workdir", repopt,
                                 *QUIET])
  assert code == 0, err[-3000:]
  assert "optimizer sgd -> repopt_sgd" in err and "resnet18_cifar_tiny (target, repopt_sgd): step 12" in out
  with open(os.path.join(repopt, "metrics.jsonl")) as f:
    train = [r for r in map(json.loads, f) if r["kind"] == "train"]
  assert train[-1]["loss"] < train[0]["loss"]
