"""repopt_jax.csla on any NNX model: the surgery's contract (copies, paths, branches, inits), scales trees,
the weight-decay mask, the Rule of Initialization, conv biases in the rules and the transform, and errors
that name the offending path. The training equivalence is in test_csla_equivalence.py."""

import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import x64
from repopt_jax import CSLAScales, ScalesError, csla, load_scales, repopt_masks, rules, save_scales
from repopt_jax.models.resnet import resnet18_cifar
from test_csla_equivalence import Custom, random_scales


def test_hyper_search_model_copies_and_names_by_original_paths():
  model = Custom(rngs=nnx.Rngs(0))
  before = jax.tree.map(np.asarray, nnx.as_pure(nnx.state(model)))
  hs = csla.hyper_search_model(model, rngs=nnx.Rngs(1))
  # The argument is untouched and shares no Variable with the result.
  assert type(model.stem) is nnx.Conv and type(hs.stem) is csla.CSLAConv
  hs.stem.conv.kernel[...] = hs.stem.conv.kernel[...] + 1.0
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, nnx.as_pure(nnx.state(model))), before)
  scales = csla.scales_of(hs)
  assert list(scales) == ["mixer/layers/0/kernel", "mixer/layers/4/kernel", "stem/kernel",
                          "trunk/0/kernel/kernel", "trunk/1/0/kernel"]
  # Identity exactly where C_in == C_out, stride 1 and the size is kept; depthwise and grouped included.
  assert {k: s.identity for k, s in scales.items()} == {
      "mixer/layers/0/kernel": True, "mixer/layers/4/kernel": False, "stem/kernel": False,
      "trunk/0/kernel/kernel": True, "trunk/1/0/kernel": True}
  # s, t trainable (nnx.Param), the KxK kernel copied, the 1x1 kernel has the conv's groups and stride.
  blk = hs.mixer.layers[0]
  assert isinstance(blk.scale_conv, nnx.Param) and isinstance(blk.scale_1x1, nnx.Param)
  np.testing.assert_array_equal(blk.conv.kernel[...], model.mixer.layers[0].kernel[...])
  assert blk.conv_1x1.kernel.shape == (1, 1, 1, 8) and hs.mixer.layers[4].conv_1x1.strides == 2


def test_depth_init_on_resnet():
  """The official rule per run: 1.0 for a run's first conv, sqrt(2/i) for the i-th following one."""
  hs = csla.hyper_search_model(resnet18_cifar(width=4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
  got = {k: float(s.conv[0]) for k, s in csla.scales_of(hs).items()}
  assert got["conv1/kernel"] == 1.0
  assert math.isclose(got["layer1/0/conv1/kernel"], math.sqrt(2.0), rel_tol=1e-6)
  assert math.isclose(got["layer1/0/conv2/kernel"], 1.0, rel_tol=1e-6)
  assert got["layer2/0/conv1/kernel"] == 1.0  # stride 2: a new run
  assert math.isclose(got["layer2/1/conv2/kernel"], math.sqrt(2.0 / 3.0), rel_tol=1e-6)
  assert "layer2/0/shortcut_conv/kernel" not in got  # 1x1 projections are not selected
  ones = csla.scales_of(csla.hyper_search_model(resnet18_cifar(width=4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1),
                                                init="ones"))
  assert all(np.all(s.conv == 1.0) and np.all(s.pointwise == 1.0) for s in ones.values())
  custom = csla.scales_of(csla.hyper_search_model(
      resnet18_cifar(width=4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1), init=lambda path, conv, i: 0.5 + i))
  assert float(custom["layer1/0/conv2/kernel"].conv[0]) == 2.5


@pytest.mark.parametrize("size", [8, 9])
def test_merge_equals_hs_model_f64(size):
  """One merged conv equals the branches, 'SAME' stride 2 on even and odd inputs included."""
  with x64():
    model = Custom(dtype=jnp.float64, rngs=nnx.Rngs(0))
    hs = csla.hyper_search_model(model, rngs=nnx.Rngs(1), init=lambda p, c, i: np.linspace(-1, 2, c.out_features))
    for _, _, blk in csla._csla_blocks(hs):  # pylint: disable=protected-access
      if blk.conv.use_bias:  # every branch bias non-zero
        blk.conv.bias[...] = jnp.linspace(-1, 1, blk.out_features)
        blk.conv_1x1.bias[...] = jnp.linspace(2, 3, blk.out_features)
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3), jnp.float64)
    merged = csla.merge(hs)
    assert type(merged.trunk[0]["kernel"]) is nnx.Conv
    hs.eval(), merged.eval()
    np.testing.assert_allclose(merged(x), hs(x), rtol=1e-12, atol=1e-12)
    assert jax.tree.structure(nnx.state(merged)) == jax.tree.structure(nnx.state(model))


def test_1x1_branch_reads_the_centre_pixel():
  """'SAME' at stride 2 pads (0, 1): a naive 'SAME' 1x1 conv would read another pixel than the centre tap."""
  conv = nnx.Conv(1, 1, (3, 3), strides=2, padding="SAME", use_bias=False, rngs=nnx.Rngs(0))
  conv.kernel[...] = jnp.zeros((3, 3, 1, 1)).at[1, 1].set(1.0)  # the centre tap alone
  blk = csla.CSLAConv.wrap(conv, rngs=nnx.Rngs(1), scale_conv=0.0, scale_1x1=1.0)
  blk.conv_1x1.kernel[...] = jnp.ones((1, 1, 1, 1))
  x = jnp.arange(64.0).reshape(1, 8, 8, 1)
  np.testing.assert_array_equal(blk(x), conv(x))


def test_csla_model_constants_and_save_load(tmp_path):
  model = resnet18_cifar(width=4, rngs=nnx.Rngs(0))
  scales = random_scales(model)
  cs = csla.csla_model(model, scales, rngs=nnx.Rngs(1))
  blk = cs.layer1[0].conv2
  assert isinstance(blk.scale_conv, csla.BranchScale) and isinstance(blk.scale_identity, nnx.Param)
  np.testing.assert_allclose(blk.scale_identity[...], scales["layer1/0/conv2/kernel"].identity_init, rtol=1e-6)
  got = csla.scales_of(cs)
  assert list(got) == list(scales)
  path = os.path.join(tmp_path, "s.npz")
  save_scales(path, got, {"arch": "resnet18_cifar"})
  loaded, meta = load_scales(path)
  assert meta["arch"] == "resnet18_cifar" and list(loaded) == list(scales)
  for k in scales:
    np.testing.assert_allclose(loaded[k].pointwise, scales[k].pointwise, rtol=1e-6)
    assert loaded[k].identity == scales[k].identity


def test_scales_tree_and_decay_mask():
  model = Custom(rngs=nnx.Rngs(0))
  scales = random_scales(model)
  tree = csla.scales_tree(model, scales)
  flat = {csla.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: x is None or isinstance(x, CSLAScales))[0]}
  assert flat["trunk/0/kernel/kernel"] is scales["trunk/0/kernel/kernel"]
  assert flat["stem/bias"] is scales["stem/kernel"]  # the block's scales on its conv bias too
  assert flat["trunk/1/1/bias"] is None and flat["head/kernel"] is None and flat["mixer/layers/2/kernel"] is None
  # The same tree from the params state and from a pure dict.
  assert csla.scales_tree(nnx.state(model, nnx.Param), scales)["stem"]["bias"] is scales["stem/kernel"]
  pure = nnx.as_pure(nnx.state(model, nnx.Param)).to_pure_dict()
  assert csla.scales_tree(pure, scales)["trunk"][0]["kernel"]["kernel"] is scales["trunk/0/kernel/kernel"]
  mask = csla.weight_decay_mask(csla.hyper_search_model(model, rngs=nnx.Rngs(1)))
  assert mask["trunk"][1][0]["conv"]["kernel"] and mask["trunk"][1][0]["scale_identity"]
  assert not mask["trunk"][1][0]["scale_conv"] and not mask["trunk"][1][1]["scale"] and not mask["stem"]["conv"]["bias"]


@pytest.mark.parametrize("mutate, message", [
    (lambda s: {**s, "trunk/9/kernel": s["stem/kernel"]}, "scales['trunk/9/kernel'] names no conv kernel"),
    (lambda s: {**s, "stem/kernel": CSLAScales(conv=np.ones(4), pointwise=np.ones(4))}, "stem/kernel"),
    (lambda s: {**s, "mixer/layers/4/kernel": s["mixer/layers/4/kernel"].replace(identity=True)},
     "mixer/layers/4/kernel: the scales have an identity branch"),
    (lambda s: {**s, "stem/kernel": "x"}, "scales['stem/kernel'] is a str"),
    (lambda s: {**s, "trunk/1/1/scale": s["stem/kernel"]}, "trunk/1/1/scale"),
])
def test_scales_tree_errors_name_the_path(mutate, message):
  model = Custom(rngs=nnx.Rngs(0))
  with pytest.raises(ScalesError, match=message.replace("[", r"\[").replace("]", r"\]")):
    csla.scales_tree(model, mutate(random_scales(model)))


def test_reinit_rule_of_initialization():
  model = Custom(rngs=nnx.Rngs(0))
  scales = random_scales(model)
  before = jax.tree.map(np.asarray, nnx.as_pure(nnx.state(model, nnx.Param)).to_pure_dict())
  csla.reinit(model, scales, rngs=nnx.Rngs(1), kernel_init=nnx.initializers.zeros_init())
  s = scales["trunk/0/kernel/kernel"]
  conv = model.trunk[0]["kernel"]
  expect = np.zeros((3, 3, 8, 8))
  expect[1, 1, np.arange(8), np.arange(8)] = s.identity_init  # zero branches: only diag(gamma) is left
  np.testing.assert_allclose(conv.kernel[...], expect, rtol=1e-6)
  np.testing.assert_array_equal(conv.bias[...], np.zeros(8))  # fresh branch biases are zero
  np.testing.assert_array_equal(model.head.kernel[...], before["head"]["kernel"])  # nothing else moves
  csla.reinit(model, scales, rngs=nnx.Rngs(1))  # default (lecun normal) draws: a non-trivial kernel
  assert float(jnp.std(model.stem.kernel[...])) > 0.05


def test_bias_grad_mult_in_the_transform():
  """A conv bias with CSLAScales gets `s^2 + t^2` (no identity term) through repopt_masks."""
  s = CSLAScales(conv=np.array([2.0, 1.0]), pointwise=np.array([3.0, -1.0]), identity=True)
  np.testing.assert_allclose(rules.grad_mult(s, (2,)), [13.0, 2.0])
  tx = repopt_masks({"conv": {"kernel": s, "bias": s}})
  params = {"conv": {"kernel": jnp.zeros((3, 3, 2, 2)), "bias": jnp.zeros(2)}}
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates["conv"]["bias"], [13.0, 2.0])
  assert float(updates["conv"]["kernel"][1, 1, 0, 0]) == 14.0
  with pytest.raises(ScalesError, match="^bn/scale: .*4-D"):  # a 1-D leaf takes scales only as a conv bias
    repopt_masks({"bn": {"scale": s}}).init({"bn": {"scale": jnp.zeros(2)}})
  d = rules.exact_adam_direction(s, jnp.ones(2), jnp.ones(2), eps=0.0)
  np.testing.assert_allclose(d, [5.0, 2.0])  # sum_k |s_k|
  np.testing.assert_allclose(rules.csla_bias(s, np.ones(2), np.ones(2)), [5.0, 0.0])
  with pytest.raises(ScalesError, match="bias"):
    rules.check_kernel(s, (3,), "bias")


def test_errors():
  model = Custom(rngs=nnx.Rngs(0))
  with pytest.raises(ScalesError, match="no conv selected"):
    csla.hyper_search_model(model, rngs=nnx.Rngs(0), select=lambda p, c: False)
  with pytest.raises(ScalesError, match="no CSLAConv"):
    csla.merge(model)
  with pytest.raises(ScalesError, match="unknown init"):
    csla.hyper_search_model(model, rngs=nnx.Rngs(0), init="paper?")
  with pytest.raises(ScalesError, match="ending in '/kernel'"):
    csla.csla_model(model, {"stem": random_scales(model)["stem/kernel"]}, rngs=nnx.Rngs(0))


def test_generic_surgery_on_repopt_vgg_matches_its_own_modes():
  """RepOpt-VGG through the generic machinery: the 'depth' init is the official one, the block names map to
  kernel paths, and the generic CSLA model merges to the kernels `reparam.target_from_csla` gives."""
  from repopt_jax.models import RepOptVGG, reparam  # pylint: disable=g-import-not-at-top
  target = RepOptVGG("tiny", "target", num_classes=10, rngs=nnx.Rngs(0))
  generic = csla.scales_of(csla.hyper_search_model(target, rngs=nnx.Rngs(1)))
  official = reparam.scales_from_hs(RepOptVGG("tiny", "hs", num_classes=10, rngs=nnx.Rngs(0)))
  assert list(generic) == [reparam.kernel_path(n) for n in official]
  for name, s in official.items():
    g = generic[reparam.kernel_path(name)]
    np.testing.assert_allclose(g.conv, s.conv, rtol=1e-6)
    assert g.identity == s.identity and reparam.block_name(reparam.kernel_path(name)) == name
  vgg_csla = RepOptVGG("tiny", "csla", num_classes=10, scales=official, rngs=nnx.Rngs(0))
  ref = reparam.target_from_csla(vgg_csla)
  tree = reparam.scales_tree(ref, official)
  assert tree["stage2"][1]["conv"]["kernel"] is official["stage2.1"]
