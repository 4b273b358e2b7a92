"""End to end: train then evaluate on the digits and on mocked CIFAR-100; a RepOptimizer run from a scales file;
the train step compiles once; a NaN stops the run; bad input fails in one line before anything is written."""

import dataclasses
import glob
import math
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from conftest import official_scales_file
from repopt_jax import ScalesError, data, load_scales, save_scales
from repopt_jax.config import ConfigError
from repopt_jax.models import RepOptVGG, count_params, flops, reparam
from repopt_jax.train import NonFiniteLossError, Trainer, WorkdirError, build_model, load_config, read_jsonl
from test_train_common import FAST, digits_dir


@pytest.fixture(scope="module")
def ddir(tmp_path_factory):
  return digits_dir(tmp_path_factory)


def test_digits_train_then_eval(ddir, tmp_path):
  work = str(tmp_path / "run")
  trainer = Trainer("digits_tiny", work, overrides=[f"data.data_dir={ddir}", "train.epochs=3",
                                                    "train.log_every=11", "train.checkpoint_every=0"],
                    progress=False)
  assert trainer.total_steps == 3 * (1437 // 64) == 66
  metrics = trainer.fit()
  assert metrics["step"] == 66 and not metrics["preempted"]
  assert metrics["eval_examples"] == 360  # every test image exactly once (last batch padded and masked)
  # Chance is 0.1 (top-1) and 0.5 (top-5). Measured with train.seed 0, 1, 2: top-1 0.975, 0.972, 0.944 and
  # top-5 1.0 each time.
  assert metrics["eval_top1"] > 0.85, metrics
  assert metrics["eval_top5"] > 0.98 and metrics["eval_top1"] <= metrics["eval_top5"], metrics
  # Compiled once for 66 steps (and once for the 6 eval batches): no retracing on the hot path.
  assert trainer.run.train_step.traces == 1 and trainer.run.eval_step.traces == 1

  records = read_jsonl(os.path.join(work, "metrics.jsonl"))
  summary = [r for r in records if r["kind"] == "summary"][0]
  assert summary["params"] == count_params(trainer.model()) == 37362
  # The banner names the family: a plain-SGD target model is the VGG baseline (it said "RepOpt-VGG" for any run).
  assert summary["family"] == "VGG" and summary["text"].startswith("VGG tiny (target), 0.037M params")
  assert summary["macs_per_image"] == flops("tiny", 32, 10, in_channels=1)
  train = [r for r in records if r["kind"] == "train"]
  assert [r["step"] for r in train] == [11, 22, 33, 44, 55, 66]
  assert train[-1]["loss"] < 0.5 * train[0]["loss"] and all(r["images_per_sec"] > 0 for r in train)
  assert train[0]["lr"] < train[1]["lr"] and train[-1]["lr"] < 0.01  # warm-up, then cosine towards 0
  evals = [r for r in records if r["kind"] == "eval"]
  assert len(evals) == 1 and evals[0]["eval_top1"] == pytest.approx(metrics["eval_top1"])
  assert glob.glob(os.path.join(work, "tensorboard", "events.out.tfevents.*"))

  # The final checkpoint is there; a finished run resumes to the same evaluation without training.
  assert os.path.isdir(os.path.join(work, "checkpoints", "66"))
  again = trainer.fit()
  assert again["step"] == 66 and again["eval_top1"] == pytest.approx(metrics["eval_top1"])
  assert trainer.run.train_step.traces == 1
  # The same workdir with an incompatible config is refused, and its checkpoint left alone.
  other = Trainer("digits_tiny", work, overrides=[f"data.data_dir={ddir}", "train.batch_size=32"], progress=False)
  with pytest.raises(ConfigError, match="holds checkpoints of another run: 'train.batch_size' is 64 there"):
    other.fit()
  assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["66"]


def test_mock_cifar100_hyper_search_bf16_runs_with_finite_metrics(tmp_path):
  """The Hyper-Search model (trainable scales, clipping) in bf16 compute on mocked CIFAR-100."""
  with tfds.testing.mock_data(num_examples=40):
    trainer = Trainer("mock_cifar100_tiny", str(tmp_path / "run"),
                      overrides=[f"data.data_dir={tmp_path / 'data'}", "train.compute_dtype=bfloat16",
                                 "model.mode=hs", "optim.grad_clip=1.0"],
                      progress=False, compiler_options=FAST)
    before = reparam.scales_from_hs(trainer.model())
    metrics = trainer.fit()
    # The mock labels are random, so accuracy cannot beat chance here: instead the trainer's evaluation (bf16
    # logits, a padded last batch, top-5 of 100 classes) must agree with one computed by hand from the model.
    reference = _evaluate_by_hand(trainer)
  assert metrics["step"] == 6 and math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])
  assert metrics["eval_examples"] == reference["count"] == 40
  hits1, hits5 = metrics["eval_top1"] * 40, metrics["eval_top5"] * 40
  assert hits1 == pytest.approx(round(hits1), abs=1e-6) and hits5 == pytest.approx(round(hits5), abs=1e-6)
  # One example may flip on a bf16 near-tie between the two compilations of the forward pass.
  assert abs(round(hits1) - reference["top1"]) <= 1 and abs(round(hits5) - reference["top5"]) <= 1, (
      metrics, reference)
  assert metrics["eval_loss"] == pytest.approx(reference["loss"], rel=1e-2)
  assert metrics["eval_top1"] <= metrics["eval_top5"]
  # bf16 compute keeps float32 params (and statistics).
  assert {leaf.dtype for leaf in jax.tree.leaves(trainer.state.params)} == {np.dtype("float32")}
  assert {leaf.dtype for leaf in jax.tree.leaves(trainer.state.batch_stats)} == {np.dtype("float32")}
  assert trainer.summary["num_classes"] == 100
  after = reparam.scales_from_hs(trainer.model())
  assert any(not np.allclose(before[b].conv, after[b].conv) for b in before)  # the scales are trained


def _evaluate_by_hand(trainer) -> dict:
  """Top-1 / top-5 hits, mean cross-entropy and example count of `trainer.model()` on its eval split, computed
  from the logits with NumPy (ties broken towards the lower class index, like `argmax` and `lax.top_k`)."""
  c = trainer.config
  graphdef, state = nnx.split(trainer.model())
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  out = {"top1": 0, "top5": 0, "loss": 0.0, "count": 0}
  for batch in data.make_iterator(c.data.dataset, c.data.eval_split, global_batch_size=trainer.run.eval_batch_size,
                                  train=False, seed=int(c.train.seed), image_size=trainer.run.image_size,
                                  data_dir=c.data.data_dir, num_epochs=1, process_index=0, process_count=1,
                                  dtype=c.train.compute_dtype):
    logits = np.asarray(forward(state, batch["image"]), np.float64)
    labels, mask = np.asarray(batch["label"]), np.asarray(batch["mask"], bool)
    top5 = np.argsort(-logits, axis=-1, kind="stable")[:, :5]
    shifted = logits - logits.max(-1, keepdims=True)
    nll = np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(len(labels)), labels]
    out["top1"] += int(np.sum((top5[:, 0] == labels) & mask))
    out["top5"] += int(np.sum(np.any(top5 == labels[:, None], -1) & mask))
    out["loss"] += float(np.sum(nll * mask))
    out["count"] += int(mask.sum())
  out["loss"] /= out["count"]
  return out


def test_repopt_run_from_a_scales_file_and_nan_stops_keeping_the_last_good_checkpoint(ddir, tmp_path):
  """RepOpt-SGD on the target model, scales from an .npz; a NaN injected mid-run stops it in one line."""
  hs = build_model(load_config("digits_tiny_hs"), num_classes=10, in_channels=1, seed=3)
  # As if Hyper-Search had moved the scales: other conv scales, trained gamma != 1.
  scales = {k: dataclasses.replace(s, conv=s.conv * 1.3,
                                   identity_init=None if s.identity_init is None else s.identity_init * 0.7)
            for k, s in reparam.scales_from_hs(hs).items()}
  path = str(tmp_path / "scales.npz")
  save_scales(path, scales, {"arch": "tiny"})
  config = load_config("digits_tiny_repopt", [f"data.data_dir={ddir}", f"scales={path}", "train.epochs=null",
                                              "train.steps=8", "train.checkpoint_every=2", "train.log_every=1"])

  # The model: target mode, kernels from the Rule of Initialization with the trained identity.
  loaded, _ = load_scales(path)
  work = str(tmp_path / "run")
  trainer = Trainer(config, work, progress=False, compiler_options=FAST)

  def reference():  # built directly (jitted only to compile the initialisers once)
    ref = RepOptVGG("tiny", "target", num_classes=10, in_channels=1, rngs=nnx.Rngs(0))
    reparam.reinit_target(ref, loaded, nnx.Rngs(1), identity="trained")
    return nnx.as_pure(nnx.state(ref, nnx.Param))

  ref = jax.jit(reference, compiler_options={"xla_backend_optimization_level": 0})()
  assert trainer.model().mode == "target"
  for a, b in zip(jax.tree.leaves(trainer.state.params), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a.addressable_data(0)), b, rtol=1e-6, atol=1e-7)

  def poison(step):
    if step == 5:  # corrupt the params after step 5: step 6 sees a NaN loss
      poisoned = jax.tree.map(lambda p: np.asarray(p.addressable_data(0)) * np.float32("nan"),
                              trainer.state.params)
      trainer.state = trainer.state._replace(params=poisoned)

  with pytest.raises(NonFiniteLossError) as e:
    trainer.fit(on_step=poison)
  msg = str(e.value)
  assert "step 6" in msg and "last good checkpoint (step 4)" in msg and "\n" not in msg
  steps = sorted(int(d) for d in os.listdir(os.path.join(work, "checkpoints")) if d.isdigit())
  assert steps == [2, 4]  # nothing saved from the NaN on
  records = [r for r in read_jsonl(os.path.join(work, "metrics.jsonl")) if r["kind"] == "train"]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and all(math.isfinite(r["loss"]) for r in records)
  # The last good checkpoint restores to finite params.
  assert trainer.restore() == 4
  assert all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(trainer.state.params))


def _one_line_error(exc_type, match, config, work, overrides=()):
  with pytest.raises(exc_type) as e:
    Trainer(config, work, overrides=list(overrides), progress=False)
  assert match in str(e.value) and "\n" not in str(e.value), str(e.value)
  return str(e.value)


def test_bad_input_fails_in_one_line_before_training(ddir, tmp_path):
  work = str(tmp_path / "run")
  dd = f"data.data_dir={ddir}"
  msg = _one_line_error(ConfigError, "'train.batch_size' = 60 is not divisible by the 8 devices", "digits_tiny",
                        work, [dd, "train.batch_size=60"])
  assert "multiple of 8" in msg
  msg = _one_line_error(data.DatasetError, "unknown dataset 'cifar1000'", "digits_tiny", work,
                        [dd, "data.dataset=cifar1000"])
  assert "digits" in msg and "cifar100" in msg
  empty = tmp_path / "empty_data"
  msg = _one_line_error(data.DatasetError, "'cifar100' is not prepared", "mock_cifar100_tiny", work,
                        [f"data.data_dir={empty}"])
  assert "download_and_prepare" in msg
  _one_line_error(ConfigError, "optim.grad_clip", "digits_tiny_repopt", work,
                  [dd, "optim.grad_clip=5.0", f"scales={tmp_path / 'any.npz'}"])
  assert not os.path.exists(os.path.join(work, "checkpoints"))  # nothing was started
  # Scales of another architecture (the official B1 file for the tiny model): the block is named.
  b1 = official_scales_file("RepOpt-VGG-B1-scales.pth")
  _one_line_error(ScalesError, "scales['stage0']", "digits_tiny_repopt", work, [dd, f"scales={b1}"])


def test_unwritable_workdir_is_one_clear_error(ddir, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  msg = _one_line_error(WorkdirError, "cannot be written", "digits_tiny", str(blocker / "run"),
                        [f"data.data_dir={ddir}"])
  assert str(blocker / "run") in msg
  if os.geteuid() != 0:  # root ignores permission bits
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    _one_line_error(WorkdirError, "cannot be written", "digits_tiny", str(ro), [f"data.data_dir={ddir}"])
