"""Deployment (`repopt_jax.export`, `repopt-jax export`, `eval --onnx`): ONNX and StableHLO files equal the JAX
eval logits of the quickstart's RepOpt-VGG, RepVGG (fused) and VGG runs; INT8 by onnxruntime; bad input in one
line; the run directories are only read."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from repopt_jax import export as E  # noqa: E402
from repopt_jax import runs  # noqa: E402
from repopt_jax.models import RepOptVGG  # noqa: E402
from repopt_jax.quickstart import quickstart  # noqa: E402
from test_train_common import FAST, digits_dir, tree_snapshot  # noqa: E402

TOL = 1e-5  # max|delta| / max|logit|, float32
KINDS = ("repopt_vgg", "repvgg", "vgg")


@pytest.fixture(scope="module")
def qs(tmp_path_factory):
  """The quickstart's four runs (hs, repopt_vgg, repvgg, vgg) on the digits, 8 steps each."""
  ddir = digits_dir(tmp_path_factory)
  out = tmp_path_factory.mktemp("export_qs") / "qs"
  result = quickstart(str(out), overrides=[f"data.data_dir={ddir}", "train.epochs=null", "train.steps=8",
                                           "train.eval_every=8", "train.log_every=4"],
                      compiler_options=FAST, log=lambda _: None)
  rows = {r["key"]: r for r in result.rows}
  return {k: rows[k]["workdir"] for k in rows} | {"eval_top1": {k: rows[k]["eval_top1"] for k in rows}}


def _rel(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("kind", KINDS)
def test_onnx_and_stablehlo_equal_the_jax_eval_logits(qs, kind, tmp_path):
  before = tree_snapshot(qs[kind])
  model, config = runs.load_model(qs[kind])
  assert model.stage0.bn.use_running_average  # eval mode
  assert model.mode == ("repvgg" if kind == "repvgg" else "target")
  net = E.deployed_network(model, 32)
  proto = E.to_onnx(net)
  ops = [n.op_type for n in proto.graph.node]
  # One conv + bias + ReLU per block (BatchNorm folded, RepVGG branches fused), one layout transpose.
  assert ops == ["Transpose"] + ["Conv", "Relu"] * 7 + ["GlobalAveragePool", "Flatten", "Gemm"]
  assert proto.opset_import[0].version == E.OPSET and all(len(n.input) == 3 for n in proto.graph.node
                                                            if n.op_type == "Conv")
  onnx_path = E.save_onnx(proto, tmp_path / "new" / "folder" / "model.onnx")  # parent folders created
  hlo_path = E.save_stablehlo(E.to_stablehlo(net), tmp_path / "hlo" / "model.stablehlo")
  sess, hlo = E.onnx_session(onnx_path), E.load_stablehlo(hlo_path)
  assert sess.get_inputs()[0].shape[0] == "batch"  # dynamic batch

  test = E.calibration_images(config, 7, split="test")
  rng = np.random.default_rng(0)
  for x in (test[:1], test, rng.standard_normal((1, 32, 32, 1)).astype(np.float32),
            rng.standard_normal((7, 32, 32, 1)).astype(np.float32)):
    want = np.asarray(model(jnp.asarray(x)), np.float64)
    assert _rel(E.run_onnx(sess, x), want) <= TOL, kind
    assert _rel(hlo.call(x), want) <= TOL, kind
  # NCHW input: no transpose at all.
  nchw = E.to_onnx(net, layout="nchw", batch_size=7)
  assert "Transpose" not in [n.op_type for n in nchw.graph.node]
  sess = E.onnx_session(nchw.SerializeToString())
  assert _rel(E.run_onnx(sess, test.transpose(0, 3, 1, 2)), np.asarray(model(jnp.asarray(test)))) <= TOL
  assert tree_snapshot(qs[kind]) == before


def test_cli_export_int8_and_eval_onnx_of_the_quickstart_runs(qs, tmp_path, capsys):
  from repopt_jax.cli import main
  snaps = {k: tree_snapshot(qs[k]) for k in KINDS}
  for kind in ("repopt_vgg", "repvgg"):
    fp32, int8 = tmp_path / kind / "fp32.onnx", tmp_path / kind / "int8" / "model.onnx"
    assert main(["export", "--workdir", qs[kind], "--out", str(fp32)]) == 0
    out = capsys.readouterr().out
    assert "max |logit difference|" in out and str(fp32) in out
    assert main(["export", "--workdir", qs[kind], "--out", str(int8), "--int8", "--calibration-images",
                 "128"]) == 0
    out = capsys.readouterr().out
    assert "int8" in out.lower()
    ratio = os.path.getsize(int8) / os.path.getsize(fp32)
    assert ratio < 0.5, ratio
    ops = {n.op_type for n in __import__("onnx").load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops

    results = {}
    for name, path in (("fp32", fp32), ("int8", int8)):
      assert main(["eval", "--onnx", str(path), "--workdir", qs[kind], "--json"]) == 0
      results[name] = __import__("json").loads(capsys.readouterr().out.strip())
      assert results[name]["eval_examples"] == 360
    # fp32 ONNX gives the run's own accuracy (one image may flip on a tie); INT8 stays close.
    assert results["fp32"]["eval_top1"] == pytest.approx(qs["eval_top1"][kind], abs=1.5 / 360)
    assert abs(results["int8"]["eval_top1"] - results["fp32"]["eval_top1"]) < 0.1, results

  # Library: per-channel INT8 and StableHLO with a fixed batch; the reported differences are small.
  r = E.export_run(qs["vgg"], tmp_path / "vgg.int8.onnx", int8=True, per_channel=True,
                   calibration_images_count=64)
  assert r["int8"] and r["per_channel"] and r["bytes"] < r["fp32_bytes"]
  assert r["max_abs_logit_diff"] / r["max_abs_logit"] < 0.2
  r = E.export_run(qs["vgg"], tmp_path / "vgg.stablehlo", format="stablehlo", batch_size=8,
                   platforms=("cpu", "cuda"))  # a module for GPUs too, written on a CPU-only machine
  assert r["max_abs_logit_diff"] <= TOL * r["max_abs_logit"] and r["batch_size"] == 8
  assert E.load_stablehlo(r["out"]).platforms == ("cpu", "cuda")
  for k in KINDS:
    assert tree_snapshot(qs[k]) == snaps[k], k


def _one_line_error(capsys, argv, *needles):
  from repopt_jax.cli import main
  code = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  assert code == 2, (code, out, err)
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])


def test_export_bad_input_is_one_clear_line(qs, tmp_path, capsys):
  hs_before = tree_snapshot(qs["hs"])
  _one_line_error(capsys, ["export", "--workdir", qs["hs"], "--out", tmp_path / "hs.onnx"], "Hyper-Search",
                  "not a deployable network", "fuse", "--scales")
  assert tree_snapshot(qs["hs"]) == hs_before and not os.path.exists(tmp_path / "hs.onnx")
  _one_line_error(capsys, ["export", "--workdir", tmp_path / "missing", "--out", tmp_path / "m.onnx"],
                  "missing", "does not exist")
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  _one_line_error(capsys, ["export", "--workdir", qs["vgg"], "--out", blocker / "model.onnx"], "--out",
                  "cannot create its folder")
  _one_line_error(capsys, ["export", "--workdir", qs["vgg"], "--out", tmp_path / "m.hlo", "--format",
                           "stablehlo", "--int8"], "--int8", "--format onnx")
  _one_line_error(capsys, ["export", "--workdir", qs["vgg"], "--out", tmp_path / "m.onnx", "--batch-size", "0"],
                  "batch size")
  _one_line_error(capsys, ["export", "--workdir", qs["vgg"], "--out", tmp_path / "m.onnx", "--platforms", "cuda"],
                  "--platforms", "--format stablehlo")
  _one_line_error(capsys, ["export", "--workdir", qs["vgg"], "--out", os.path.join(qs["vgg"], "m.onnx")],
                  "read-only")
  _one_line_error(capsys, ["eval", "--onnx", tmp_path / "nope.onnx", "--workdir", qs["vgg"]], "nope.onnx",
                  "no such ONNX file")


class _Net(nnx.Module):
  """The README's custom model: conv -> BN -> ReLU -> mean -> head (attributes in any order)."""

  def __init__(self, rngs, pool="mean"):
    self.head = nnx.Linear(16, 10, rngs=rngs)
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.conv = nnx.Conv(3, 16, (3, 3), strides=2, padding="SAME", rngs=rngs)
    self.pool = pool

  def __call__(self, x):
    y = nnx.relu(self.bn(self.conv(x)))
    y = y.mean(axis=(1, 2)) if self.pool == "mean" else y.max(axis=(1, 2))
    return self.head(y)


def test_graph_walk_on_a_custom_nnx_model_and_refusals():
  model = _Net(nnx.Rngs(0))
  model.bn.mean[...] = jnp.linspace(-0.5, 0.5, 16)
  model.bn.var[...] = jnp.linspace(0.5, 2.0, 16)
  model.eval()
  net = E.deployed_network(model, 9)  # odd size: SAME padding resolved per input size
  x = np.random.default_rng(1).standard_normal((7, 9, 9, 3)).astype(np.float32)
  sess = E.onnx_session(E.to_onnx(net).SerializeToString())
  assert _rel(E.run_onnx(sess, x), np.asarray(model(x))) <= TOL
  # A bfloat16-compute model (train.compute_dtype=bfloat16) deploys in float32, equal to its float32 compute.
  bf16 = RepOptVGG("tiny", "target", num_classes=10, in_channels=1, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  bf16.eval()
  x = np.random.default_rng(2).standard_normal((2, 32, 32, 1)).astype(np.float32)
  sess = E.onnx_session(E.to_onnx(E.deployed_network(bf16, 32)).SerializeToString())
  assert _rel(E.run_onnx(sess, x), np.asarray(E.float32_compute(bf16)(x))) <= TOL
  assert bf16.stage0.conv.dtype == jnp.bfloat16  # the model itself is left as it was
  # Max pooling is not what the walk assumes: refused, not exported wrong.
  with pytest.raises(E.ExportError, match="not a plain"):
    E.deployed_network(_Net(nnx.Rngs(0), pool="max"), 9)
  with pytest.raises(E.ExportError, match="Hyper-Search"):
    E.deployed_network(RepOptVGG("tiny", "hs", num_classes=10, in_channels=1, rngs=nnx.Rngs(0)), 32)


def test_generic_csla_models_merge_before_export_and_hyper_search_is_refused():
  csla = pytest.importorskip("repopt_jax.csla")
  if not all(hasattr(csla, f) for f in ("hyper_search_model", "csla_model", "scales_of")):
    pytest.skip("repopt_jax.csla has no hyper_search_model / csla_model / scales_of")
  hs = csla.hyper_search_model(_Net(nnx.Rngs(0)), rngs=nnx.Rngs(1))
  with pytest.raises(E.ExportError, match="Hyper-Search"):
    E.deployed_network(hs, 9)
  model = csla.csla_model(_Net(nnx.Rngs(0)), csla.scales_of(hs), rngs=nnx.Rngs(2))
  model.eval()
  net = E.deployed_network(model, 9)
  x = np.random.default_rng(2).standard_normal((7, 9, 9, 3)).astype(np.float32)
  assert _rel(E.run_onnx(E.onnx_session(E.to_onnx(net).SerializeToString()), x), np.asarray(model(x))) <= TOL


def test_a_residual_network_is_refused_in_one_line():
  resnet = pytest.importorskip("repopt_jax.models.resnet")
  model = resnet.ResNetCifar((1, 1), num_classes=10, width=4, in_channels=1, rngs=nnx.Rngs(0))
  model.eval()
  with pytest.raises(E.ExportError, match="not a plain .* chain"):
    E.deployed_network(model, 8)
