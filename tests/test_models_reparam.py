"""repopt_jax.models.reparam: RepVGG fusion, scales plumbing (HS model, official files, scales trees), the Rule
of Initialization on target models, and their errors."""

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import official_scales_file
from flax import nnx

from repopt_jax import (CSLAScales, ScalesError, flatten_scales, grad_mult, load_scales, load_torch_scales,
                        repopt_sgd, save_scales)
from repopt_jax.models import ModelError, RepOptVGG, get_arch, reparam
from test_models_helpers import abstract, build, copy, forward, jit, rel_err


def ones_scales(arch, identity_init=False):
  out = {}
  for sp in get_arch(arch).block_specs():
    c = sp.out_channels
    out[sp.name] = CSLAScales(conv=np.full(c, 0.5), pointwise=np.full(c, 2.0), identity=sp.has_identity,
                              identity_init=np.linspace(0.5, 1.5, c) if identity_init and sp.has_identity else None)
  return out


def test_fuse_repvgg_equals_repvgg_in_eval_mode():
  rep = build("tiny", "repvgg", num_classes=10, seed=1)
  rng = np.random.default_rng(0)
  # Non-trivial BN affine parameters, then a few SGD steps in train mode move the running statistics.
  for _, blk in rep.named_blocks():
    for bn in [blk.bn, blk.bn_1x1] + ([blk.bn_identity] if blk.has_identity else []):
      bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, bn.scale.shape), jnp.float32)
      bn.bias[...] = jnp.asarray(rng.normal(0, 0.2, bn.bias.shape), jnp.float32)
  graphdef, params, rest = nnx.split(rep, nnx.Param, ...)
  tx = optax.sgd(0.05, momentum=0.9)

  @jit
  def step(params, rest, opt_state, x, y):
    def loss_fn(params):
      m = nnx.merge(graphdef, params, rest)
      loss = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
      return loss, nnx.as_pure(nnx.split(m, nnx.Param, ...)[2])
    (_, rest), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state

  params, rest = nnx.as_pure(params), nnx.as_pure(rest)
  opt_state = tx.init(params)
  for _ in range(3):
    x = jnp.asarray(rng.normal(1.0, 2.0, (8, 32, 32, 3)), jnp.float32)
    params, rest, opt_state = step(params, rest, opt_state, x, jnp.asarray(rng.integers(0, 10, 8)))
  nnx.update(rep, params, rest)
  assert np.abs(np.asarray(rep.stage2[1].bn_identity.mean[...])).max() > 0.1  # the statistics moved
  rep.eval()
  fused = reparam.fuse_repvgg(rep)
  assert fused.mode == "target" and fused.stage0.bn.use_running_average
  x = jnp.asarray(rng.normal(size=(6, 40, 36, 3)), jnp.float32)
  err = rel_err(forward(fused, x), forward(rep, x))
  print(f"\n[fuse_repvgg] eval logits rel err {err:.2e}")
  assert err <= 1e-5
  # The fused BatchNorm is exactly z + b: rsqrt(var + eps) == 1 in float32.
  for _, blk in fused.named_blocks():
    assert np.all(np.asarray(blk.bn.var[...]) + np.float32(blk.bn.epsilon) == np.float32(1))
    np.testing.assert_array_equal(blk.bn.scale[...], 1.0)
  with pytest.raises(ModelError, match="mode 'repvgg'"):
    reparam.fuse_repvgg(abstract("tiny", "hs", 10))


@pytest.mark.parametrize("arch", ["B1", "B2", "L1", "L2"])
def test_official_scales_fill_the_scales_tree(arch):
  scales = load_torch_scales(official_scales_file(f"RepOpt-VGG-{arch}-scales.pth"))
  target = abstract(arch)
  assert list(scales) == target.block_names  # same blocks, same order
  reparam.check_scales(target, scales)
  tree = reparam.scales_tree(target, scales)
  flat = flatten_scales(tree)
  params = jax.tree_util.tree_flatten_with_path(nnx.as_pure(nnx.state(target, nnx.Param)))[0]
  assert set(flat) == {"/".join(str(k.key) for k in p) for p, _ in params}
  covered = {k: v for k, v in flat.items() if v is not None}
  assert len(covered) == len(scales)
  for name, s in scales.items():
    assert covered[name.replace(".", "/") + "/conv/kernel"] is s
  # The optimizer accepts it for these params (shapes, identity branches): checked at init.
  jax.eval_shape(repopt_sgd(0.1, tree).init, nnx.as_pure(nnx.state(target, nnx.Param)))
  if arch == "B1":  # and a csla model takes the file's scales as its constants
    csla = nnx.eval_shape(lambda: RepOptVGG(arch, "csla", scales=scales, rngs=nnx.Rngs(0)))
    assert csla.stage3[15].scale_conv.shape == (512,)


def test_check_scales_refuses_another_architecture():
  b1 = load_torch_scales(official_scales_file("RepOpt-VGG-B1-scales.pth"))
  with pytest.raises(ScalesError, match=r"scales\['stage1.0'\]: 128 channels, but block stage1.0 of B2 has 160"):
    reparam.check_scales("B2", b1)
  with pytest.raises(ScalesError, match="block 'stage1.4' of L1 is missing"):
    reparam.check_scales(abstract("L1"), b1)
  l1 = load_torch_scales(official_scales_file("RepOpt-VGG-L1-scales.pth"))
  with pytest.raises(ScalesError, match="block 'stage1.4' is not a block of B1"):
    reparam.check_scales("B1", l1)
  with pytest.raises(ScalesError, match="128 channels"):
    reparam.scales_tree(abstract("B2"), b1)


def test_check_scales_errors_name_the_block():
  good = ones_scales("tiny")
  reparam.check_scales("tiny", good)
  cases = {
      "missing": ({k: v for k, v in good.items() if k != "stage3.1"}, "block 'stage3.1' of tiny is missing"),
      "extra": ({**good, "stage3.2": good["stage3.1"]}, "block 'stage3.2' is not a block of tiny"),
      "identity": ({**good, "stage2.0": good["stage2.0"].replace(identity=True)},
                   r"scales\['stage2.0'\]: identity=True, but block stage2.0 of tiny has no identity"),
      "no_identity": ({**good, "stage2.1": good["stage2.1"].replace(identity=False)},
                      r"scales\['stage2.1'\]: identity=False.*has identity"),
      "no_1x1": ({**good, "stage0": good["stage0"].replace(pointwise=None)}, r"scales\['stage0'\]: no 1x1"),
      "type": ({**good, "stage0": np.ones(8)}, r"scales\['stage0'\]: expected CSLAScales"),
  }
  for name, (bad, msg) in cases.items():
    with pytest.raises(ScalesError, match=msg):
      reparam.check_scales("tiny", bad)
  with pytest.raises(ScalesError, match="expected a dict"):
    reparam.check_scales("tiny", [good["stage0"]])


def test_scales_from_hs_round_trip():
  hs = build("tiny", "hs", num_classes=10, seed=2)
  rng = np.random.default_rng(1)
  for _, blk in hs.named_blocks():  # as if trained
    blk.scale_conv[...] = jnp.asarray(rng.uniform(0.5, 2, blk.out_channels), jnp.float32)
    if blk.has_identity:
      blk.scale_identity[...] = jnp.asarray(rng.uniform(0.2, 1, blk.out_channels), jnp.float32)
  scales = reparam.scales_from_hs(hs)
  assert list(scales) == hs.block_names
  for spec, blk in hs.named_blocks():
    s = scales[spec.name]
    np.testing.assert_array_equal(s.conv, blk.scale_conv[...])
    np.testing.assert_array_equal(s.pointwise, blk.scale_1x1[...])
    assert s.identity == spec.has_identity
    if spec.has_identity:
      np.testing.assert_array_equal(s.identity_init, blk.scale_identity[...])
  path = os.path.join(tempfile.mkdtemp(), "hs.npz")
  save_scales(path, scales, {"arch": "tiny"})
  loaded, meta = load_scales(path)
  csla = nnx.eval_shape(lambda: RepOptVGG(meta["arch"], "csla", num_classes=10, scales=loaded, rngs=nnx.Rngs(0)))
  assert isinstance(csla.stage2[1].scale_conv, nnx.Variable) and not isinstance(csla.stage2[1].scale_conv, nnx.Param)
  # The hs model as a target model: same eval outputs (and target_from_csla accepts hs).
  hs.eval()
  target = reparam.target_from_csla(hs)
  x = jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)
  assert rel_err(forward(target, x), forward(hs, x)) < 1e-5
  with pytest.raises(ModelError, match="'hs' or 'csla'"):
    reparam.scales_from_hs(abstract("tiny", "repvgg", 10))


def test_reinit_target_rule_of_initialization():
  scales = ones_scales("tiny", identity_init=True)
  csla = build("tiny", "csla", num_classes=10, scales=scales, seed=4)
  # (a) From the csla model's own branch kernels: the same kernels as target_from_csla.
  target = build("tiny", "target", num_classes=10, seed=5)
  kernels = {sp.name: (b.conv.kernel[...], b.conv_1x1.kernel[...]) for sp, b in csla.named_blocks()}
  reparam.reinit_target(target, scales, branch_kernels=kernels)
  ref = reparam.target_from_csla(csla)
  for (_, a), (_, b) in zip(target.named_blocks(), ref.named_blocks()):
    np.testing.assert_array_equal(a.conv.kernel[...], b.conv.kernel[...])
  # (b) Fresh kernels: s * W3 + t * pad(W1) + diag(gamma), W ~ U(+-1/sqrt(fan_in)) like the csla model's.
  t_trained, t_ones = copy(target), copy(target)
  reparam.reinit_target(t_trained, scales, nnx.Rngs(7))
  reparam.reinit_target(t_ones, scales, nnx.Rngs(7), identity="ones")
  for (spec, a), (_, b) in zip(t_trained.named_blocks(), t_ones.named_blocks()):
    ka, kb = np.asarray(a.conv.kernel[...]), np.asarray(b.conv.kernel[...])
    bound3, bound1 = 1 / np.sqrt(9 * spec.in_channels), 1 / np.sqrt(spec.in_channels)
    off = np.delete(ka.reshape(9, *ka.shape[2:]), 4, axis=0)
    assert np.abs(off).max() <= 0.5 * bound3 and np.abs(off).max() > 0.4 * bound3
    diff = ka - kb
    expect = np.zeros_like(ka)
    if spec.has_identity:
      idx = np.arange(spec.out_channels)
      expect[1, 1, idx, idx] = scales[spec.name].identity_init - 1
      assert np.abs(ka[1, 1, idx, idx] - scales[spec.name].identity_init).max() <= 0.5 * bound3 + 2 * bound1
    np.testing.assert_allclose(diff, expect, atol=1e-6)
  with pytest.raises(ModelError, match="no rngs.*'stage0'"):
    reparam.reinit_target(copy(target), scales)
  with pytest.raises(ModelError, match="identity='one'"):
    reparam.reinit_target(t_ones, scales, nnx.Rngs(0), identity="one")
  with pytest.raises(ModelError, match="mode 'target'"):
    reparam.reinit_target(csla, scales, nnx.Rngs(0))
  with pytest.raises(ScalesError, match="'stage3.1' of tiny is missing"):
    reparam.reinit_target(t_ones, {k: v for k, v in scales.items() if k != "stage3.1"}, nnx.Rngs(0))


def test_scales_tree_drives_repopt_sgd_on_nnx_state():
  scales = ones_scales("tiny")
  target = build("tiny", "target", num_classes=10)
  tree = reparam.scales_tree(target, scales)
  assert tree["stage2"][1]["conv"]["kernel"] is scales["stage2.1"] and tree["stage2"][1]["bn"]["scale"] is None
  lr, m = 0.1, 0.9
  tx = repopt_sgd(lr, tree, momentum=m, nesterov=True)
  params = nnx.state(target, nnx.Param)
  grads = jax.tree.map(lambda p: jnp.ones_like(p), nnx.as_pure(params))
  # Works on the nnx.State of Variables, its pure form, and the plain nested dict alike.
  for p, g in [(params, jax.tree.map(lambda p: jnp.ones_like(p), params)), (nnx.as_pure(params), grads),
               (params.to_pure_dict(), grads.to_pure_dict())]:
    updates, _ = tx.update(g, tx.init(p), p)
    updates = nnx.as_pure(updates) if not isinstance(updates, dict) else updates
    k = updates["stage2"][1]["conv"]["kernel"]
    expect = -lr * (1 + m) * grad_mult(scales["stage2.1"], k.shape)  # first Nesterov step: (1 + m) d
    np.testing.assert_allclose(k, expect, rtol=1e-6)
    np.testing.assert_allclose(updates["stage2"][1]["bn"]["scale"], -lr * (1 + m), rtol=1e-6)
  with pytest.raises(ModelError, match="mode 'target'"):
    reparam.scales_tree(abstract("tiny", "repvgg", 10), scales)
