"""The command line end to end on the digits (search -> scales -> train --scales -> eval; repvgg -> fuse -> eval),
`train --scales` with an official file, the quickstart's library entry, and bad input in one line each."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import official_scales_file
from repopt_jax import CSLAScales, load_scales, read_torch_state_dict, save_scales
from repopt_jax.cli import main, train_config
from repopt_jax.config import ConfigError
from repopt_jax.models import RepOptVGG, count_params, get_arch
from repopt_jax.quickstart import quickstart
from repopt_jax.train import WorkdirError, build_optimizer, read_jsonl
from test_train_common import digits_dir

# Short runs: 30 steps of batch 64 (1.4 epochs of the 1,437 training digits), no warm-up.
SHORT = ["train.epochs=null", "train.steps=30", "optim.warmup_epochs=0", "train.log_every=5"]
QUIET = ["--no-progress", "--fast-compile"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ddir(tmp_path_factory):
  return digits_dir(tmp_path_factory)


def _run(capsys, argv):
  """`main(argv)` -> (exit status, stdout, stderr)."""
  code = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def _ok(capsys, argv) -> str:
  code, out, err = _run(capsys, argv)
  assert code == 0, f"{argv}: exit {code}\n{out}\n{err[-3000:]}"
  return out


def _is_png(path) -> bool:
  with open(path, "rb") as f:
    return f.read(8) == PNG and os.path.getsize(path) > 5000


def _eval_json(capsys, workdir) -> dict:
  return json.loads(_ok(capsys, ["eval", "--workdir", workdir, "--json", "--fast-compile"]).strip())


def test_cli_search_then_train_with_the_scales_then_eval_on_digits(ddir, tmp_path, capsys):
  d = f"data.data_dir={ddir}"
  hs, repopt = str(tmp_path / "hs"), str(tmp_path / "repopt")

  # Hyper-Search: the scales file (with the architecture) and the plots.
  out = _ok(capsys, ["search", "digits_tiny_hs", d, *SHORT, "--workdir", hs, *QUIET])
  scales_path = os.path.join(hs, "scales.npz")
  assert f"scales: {scales_path} (7 blocks)" in out and "next: python -m repopt_jax train digits_tiny" in out
  scales, meta = load_scales(scales_path)
  assert meta["source"] == "hyper-search" and meta["arch"] == "tiny" and meta["dataset"] == "digits"
  assert meta["arch_config"] == {"num_blocks": [1, 2, 2, 1], "widths": [8, 16, 32, 64], "stem_width": 8,
                                 "strides": [2, 2, 2, 2, 2]}
  assert meta["in_channels"] == 1 and meta["num_classes"] == 10 and meta["hs_init"] == "official"
  assert meta["config"]["model"]["mode"] == "hs" and meta["step"] == 30
  assert list(scales) == ["stage0", "stage1.0", "stage2.0", "stage2.1", "stage3.0", "stage3.1", "stage4.0"]
  # The scales were trained: stage2.1 starts at sqrt(2) (official HS init); its trained gamma is kept. In these
  # 30 steps the largest change of its s is 0.021-0.027 and of its gamma 0.047-0.093 (train.seed 0, 1, 2).
  s21 = scales["stage2.1"]
  assert s21.identity and s21.identity_init is not None and s21.identity_init.shape == (16,)
  assert 0.01 < np.max(np.abs(np.asarray(s21.conv) - np.sqrt(2))) < 0.5
  assert 0.02 < np.max(np.abs(np.asarray(s21.identity_init) - 1.0)) < 0.5
  for name in ("scales_distribution.png", "identity_variance_ratio.png"):
    assert _is_png(os.path.join(hs, name)), name
  with open(os.path.join(hs, "config.json")) as f:
    assert json.load(f)["model"]["mode"] == "hs"

  # RepOpt-VGG from the file: `--scales` turns the plain-SGD config into RepOpt-SGD on the target model.
  code, out, err = _run(capsys, ["train", "digits_tiny", d, "--scales", scales_path, *SHORT, "--workdir", repopt,
                                 *QUIET])
  assert code == 0, err[-3000:]
  assert "optimizer sgd -> repopt_sgd" in err and "tiny (target, repopt_sgd): step 30" in out
  with open(os.path.join(repopt, "config.json")) as f:
    cfg = json.load(f)
  assert cfg["optim"]["name"] == "repopt_sgd" and cfg["scales"] == scales_path and cfg["model"]["mode"] == "target"
  records = read_jsonl(os.path.join(repopt, "metrics.jsonl"))
  train = [r for r in records if r["kind"] == "train"]
  assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30] and train[-1]["loss"] < 0.6 * train[0]["loss"]
  assert os.path.isdir(os.path.join(repopt, "checkpoints", "30"))

  # eval needs only the run directory: the newest checkpoint gives the accuracy the run ended with, far above
  # chance (0.1).
  m = _eval_json(capsys, repopt)
  final = [r for r in records if r["kind"] == "eval"][-1]
  assert m["step"] == 30 and m["mode"] == "target" and m["eval_examples"] == 360
  assert m["eval_top1"] == pytest.approx(final["eval_top1"]) and m["eval_top1"] > 0.5, m


def test_train_scales_with_the_official_b1_file_builds_its_masks(tmp_path):
  """`train imagenet_repopt_b1 --scales RepOpt-VGG-B1-scales.pth`: the B1 RepOptimizer's Grad Mult is the file's
  s^2 (+ t^2 at the centre, + 1 on the identity diagonal), read here from the raw tensors."""
  path = official_scales_file("RepOpt-VGG-B1-scales.pth")
  config, notes = train_config("imagenet_repopt_b1", ["scales=elsewhere.pth"], scales=path)
  assert config.scales == os.path.abspath(path) and config.optim.name == "repopt_sgd" and notes == []
  assert config.model.arch == "B1" and config.optim.grad_clip is None
  # A plain-SGD config becomes RepOpt-SGD (and says so).
  config_sgd, notes = train_config("digits_tiny", ["model.arch=B1"], scales=path)
  assert config_sgd.optim.name == "repopt_sgd" and "sgd -> repopt_sgd" in notes[0]

  scales, meta = load_scales(config.scales)
  assert meta["source"] == "official"
  model = nnx.eval_shape(lambda: RepOptVGG("B1", "target", num_classes=1000, rngs=nnx.Rngs(0)))
  tx = build_optimizer(config, model, scales)  # constant lr 0.1, momentum 0.9, Nesterov, wd 4e-5
  abstract = nnx.as_pure(nnx.state(model, nnx.Param))
  blocks = {"stage0": ("stage0",), "stage1.1": ("stage1", 1), "stage3.7": ("stage3", 7),
            "stage4.0": ("stage4", 0)}

  def first_updates():
    # Params 0, gradients 1: the first Nesterov step is -lr * (1 + momentum) * M (decay of 0 is 0). Only the
    # chosen kernels are returned, so XLA computes nothing else of the 51.8M-parameter model.
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    out = {}
    for name, keys in blocks.items():
      node = updates
      for k in keys:
        node = node[k]
      out[name] = node["conv"]["kernel"]
    return out

  got = jax.jit(first_updates)()
  raw = read_torch_state_dict(path)
  for name, update in got.items():
    s2 = np.asarray(raw[f"{name}.scale_conv.weight"], np.float64) ** 2
    t2 = np.asarray(raw[f"{name}.scale_1x1.weight"], np.float64) ** 2
    cin, cout = update.shape[2], update.shape[3]
    expected = np.broadcast_to(s2, (3, 3, cin, cout)).copy()
    expected[1, 1] += t2
    if f"{name}.scale_identity.weight" in raw:
      assert cin == cout
      expected[1, 1] += np.eye(cout)
    np.testing.assert_allclose(-np.asarray(update, np.float64) / (0.1 * 1.9), expected, rtol=2e-6, atol=1e-7)
  assert f"stage1.1.scale_identity.weight" in raw and "stage0.scale_identity.weight" not in raw


def _one_line_error(capsys, argv, *needles) -> str:
  code, out, err = _run(capsys, argv)
  assert code == 2, (code, out, err)
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert "Traceback" not in err
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


def test_bad_input_is_one_clear_line(ddir, tmp_path, capsys):
  d = f"data.data_dir={ddir}"
  work = tmp_path / "run"

  # Scales of another architecture: cifar_tiny's blocks (16 channels in stage0) for the tiny model (8).
  other = {sp.name: CSLAScales(conv=np.ones(sp.out_channels), pointwise=np.ones(sp.out_channels),
                               identity=sp.has_identity) for sp in get_arch("cifar_tiny").block_specs(1)}
  foreign = str(tmp_path / "cifar_tiny_scales.npz")
  save_scales(foreign, other, {"arch": "cifar_tiny"})
  _one_line_error(capsys, ["train", "digits_tiny", d, "--scales", foreign, "--workdir", work],
                  "scales['stage0']", "16 channels", "tiny has 8", "another architecture")
  assert not os.path.exists(work / "checkpoints")
  _one_line_error(capsys, ["train", "digits_tiny", "--scales", tmp_path / "nope.npz"], "nope.npz",
                  "no such scales file")

  # A config file without a required key, and an override naming an unknown key.
  broken = tmp_path / "broken.json"
  broken.write_text(json.dumps({"model": {"arch": "tiny", "mode": "target"}, "data": {"dataset": "digits"},
                                "optim": {"name": "sgd"}, "train": {"steps": 2, "batch_size": 8}}))
  _one_line_error(capsys, ["train", broken, "--workdir", work], "missing the required key 'optim.lr'")
  _one_line_error(capsys, ["search", "digits_tiny_hs", "optim.lrr=0.1"], "unknown config key 'optim.lrr'",
                  "known: ")
  _one_line_error(capsys, ["train", "digits_tiny", "optim.lr"], "'optim.lr'", "KEY=VALUE")
  _one_line_error(capsys, ["train", "no_such_config"], "'no_such_config'", "digits_tiny")
  # search refuses a config that is not Hyper-Search, before training.
  _one_line_error(capsys, ["search", "digits_tiny", d, "--workdir", work], "'model.mode' = 'target'",
                  "model.mode=hs")

  # A mistyped command suggests the closest one; an unknown option and a missing --workdir are one line too.
  _one_line_error(capsys, ["serach"], "unknown command 'serach'", "did you mean 'search'?")
  _one_line_error(capsys, ["quickstrat"], "did you mean 'quickstart'?")
  _one_line_error(capsys, ["train", "--bogus"], "unrecognized arguments: --bogus")
  _one_line_error(capsys, ["eval"], "--workdir")
  # eval / fuse on directories that are not runs.
  (tmp_path / "empty").mkdir()
  _one_line_error(capsys, ["eval", "--workdir", tmp_path / "empty"], "holds no config.json")
  _one_line_error(capsys, ["fuse", "--workdir", tmp_path / "missing"], "does not exist")

  # --help is for newcomers: every command, and examples.
  code, out, _ = _run(capsys, ["--help"])
  assert code == 0 and all(c in out for c in ("quickstart", "search", "train", "eval", "fuse", "examples"))
  code, out, _ = _run(capsys, ["train", "--help"])
  assert code == 0 and "--scales FILE" in out and "python -m repopt_jax train digits_tiny --scales" in out


def test_quickstart_library_entry_then_fuse_and_eval_its_repvgg_run(ddir, tmp_path, capsys, caplog):
  out = tmp_path / "qs"
  messages = []
  # 15 steps without warm-up: enough to beat chance (0.1) clearly. Measured test accuracy of the four runs (hs,
  # RepOpt-VGG, RepVGG, VGG) for train.seed 0 (this test): 0.59, 0.65, 0.59, 0.63; with seeds 1 and 2 every
  # run reached 0.36-0.70 (the lowest: hs 0.36, RepOpt-VGG 0.40). The bound is 3x chance, below all twelve.
  result = quickstart(str(out), overrides=[f"data.data_dir={ddir}", "train.epochs=null", "train.steps=15",
                                           "optim.warmup_epochs=0", "train.eval_every=5", "train.log_every=1"],
                      compiler_options={"xla_backend_optimization_level": 0}, log=messages.append)
  assert [r["name"] for r in result.rows] == ["Hyper-Search (CSLA, trainable scales)", "RepOpt-VGG", "RepVGG",
                                              "VGG"]
  assert len(messages) == 5 and messages[0].startswith("[1/4] Hyper-Search")
  rows = {r["key"]: r for r in result.rows}
  assert [rows[k]["mode"] for k in ("hs", "repopt_vgg", "repvgg", "vgg")] == ["hs", "target", "repvgg", "target"]
  assert [rows[k]["optimizer"] for k in ("hs", "repopt_vgg", "repvgg", "vgg")] == ["sgd", "repopt_sgd", "sgd",
                                                                                     "sgd"]
  plain = count_params(nnx.eval_shape(lambda: RepOptVGG("tiny", "target", num_classes=10, in_channels=1)))
  repvgg_params = count_params(nnx.eval_shape(lambda: RepOptVGG("tiny", "repvgg", num_classes=10, in_channels=1)))
  assert all(r["params_inference"] == plain and r["steps"] == 15 for r in result.rows)
  assert rows["repopt_vgg"]["params_train"] == rows["vgg"]["params_train"] == plain
  assert rows["repvgg"]["params_train"] == repvgg_params > plain and rows["hs"]["params_train"] > plain
  assert all(r["images_per_sec"] > 0 for r in result.rows)
  assert all(r["eval_top1"] > 0.3 for r in result.rows), [(r["key"], r["eval_top1"]) for r in result.rows]

  # The RepOpt run used the searched scales; the plots and the table files are there.
  with open(os.path.join(rows["repopt_vgg"]["workdir"], "config.json")) as f:
    assert json.load(f)["scales"] == result.files["scales"] == str(out / "hs" / "scales.npz")
  for key in ("curves", "scales_distribution", "identity_variance_ratio"):
    assert _is_png(result.files[key]), key
  with open(result.files["json"]) as f:
    saved = json.load(f)
  assert [r["eval_top1"] for r in saved["rows"]] == [r["eval_top1"] for r in result.rows]
  assert saved["scales_metadata"]["arch"] == "tiny" and saved["config"]["train"]["steps"] == 15
  with open(result.files["markdown"]) as f:
    assert result.table in f.read()
  assert "| RepOpt-VGG | target | repopt_sgd |" in result.table and len(result.table.splitlines()) == 6

  # fuse (CLI) on the RepVGG run: a plain model with fewer parameters and the same accuracy.
  repvgg, deploy = rows["repvgg"]["workdir"], str(tmp_path / "deploy")
  text = _ok(capsys, ["fuse", "--workdir", repvgg, "--out", deploy, "--fast-compile"])
  assert f"(RepVGG, {repvgg_params} params)" in text and f"(plain, {plain} params) at step 15" in text
  with open(os.path.join(deploy, "config.json")) as f:
    cfg = json.load(f)
  assert cfg["model"]["mode"] == "target" and cfg["optim"]["name"] == "sgd" and cfg["scales"] is None
  after = _eval_json(capsys, deploy)
  assert after["step"] == 15 and after["mode"] == "target" and after["params"] == plain
  assert after["eval_top1"] == pytest.approx(rows["repvgg"]["eval_top1"], abs=1.5 / 360)  # one image may flip
  # The fused run is a run like any other (written without a trainer): `train --workdir` resumes it from its
  # own config.json, deriving the data position from the step (a fused checkpoint holds none).
  caplog.clear()
  code, out, err = _run(capsys, ["train", "--workdir", deploy, "train.steps=17", *QUIET])
  assert code == 0 and "tiny (target, sgd): step 17" in out, err[-3000:]
  assert "resumed from step 15 of 17" in caplog.text + err and "holds no data position" in caplog.text + err

  # A folder the quickstart did not write is refused before anything runs.
  other = tmp_path / "other"
  other.mkdir()
  (other / "keep.txt").write_text("mine")
  with pytest.raises(WorkdirError, match="not written by the quickstart"):
    quickstart(str(other))
  assert sorted(os.listdir(other)) == ["keep.txt"]
