"""INT8 post-training quantization (repopt_jax.quant) against hand-computed values, and on a RepOpt-VGG."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from repopt_jax import quant
from repopt_jax.models import RepOptVGG, reparam

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# A 2x2 kernel (in=2, out=2) with its INT8 values worked out by hand:
#   per tensor: scale = 1.0/127; 0.5*127 = 63.5 -> 64 (half to even), 0.25*127 = 31.75 -> 32, 0.1*127 = 12.7 -> 13
#   per channel (last axis): column 0 max 0.5 -> scale 0.5/127: 0.5 -> 127, 0.25 -> 63.5 -> 64;
#                            column 1 max 1.0 -> scale 1/127:   -1.0 -> -127, 0.1 -> 13
W = np.array([[0.5, -1.0], [0.25, 0.1]], np.float32)
Q_TENSOR = [[64, -127], [32, 13]]
Q_CHANNEL = [[127, -127], [64, 13]]


def test_hand_computed_per_tensor():
  s = quant.absmax_scale(W)
  np.testing.assert_allclose(float(s), 1.0 / 127, rtol=1e-7)
  q = quant.quantize(W, s)
  assert q.dtype == jnp.int8 and q.tolist() == Q_TENSOR
  np.testing.assert_allclose(quant.dequantize(q, s), np.array(Q_TENSOR) / 127.0, rtol=1e-6)
  np.testing.assert_allclose(quant.fake_quant(W, s), [[64 / 127, -1.0], [32 / 127, 13 / 127]], rtol=1e-6)


def test_hand_computed_per_channel():
  s = quant.absmax_scale(W, per_channel=True)
  np.testing.assert_allclose(s, [0.5 / 127, 1.0 / 127], rtol=1e-7)
  q = quant.quantize(W, s)
  assert q.tolist() == Q_CHANNEL
  np.testing.assert_allclose(quant.fake_quant(W, s), [[0.5, -1.0], [64 * 0.5 / 127, 13 / 127]], rtol=1e-6)


def test_clip_zero_channel_and_error_bound():
  # Values beyond the range clip to +-127; an all-zero channel quantizes to zeros (scale 1, no 0/0).
  assert quant.quantize(jnp.array([3.0, -3.0, 0.2]), jnp.float32(0.01)).tolist() == [127, -127, 20]
  k = jnp.array([[0.0, 2.0], [0.0, -1.0]])
  s = quant.absmax_scale(k, per_channel=True)
  np.testing.assert_allclose(s, [1.0, 2.0 / 127])
  np.testing.assert_array_equal(quant.fake_quant(k, s)[:, 0], [0.0, 0.0])
  # Round to nearest: the error is at most half a step, per channel.
  x = jax.random.normal(jax.random.key(0), (3, 3, 4, 5))
  s = quant.absmax_scale(x, per_channel=True)
  assert s.shape == (5,)
  err = jnp.abs(quant.fake_quant(x, s) - x)
  assert bool(jnp.all(err <= s / 2 + 1e-7))
  assert float(jnp.max(jnp.abs(quant.fake_quant(x, s)))) == pytest.approx(float(jnp.max(jnp.abs(x))), rel=1e-6)


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.fc1 = nnx.Linear(2, 2, rngs=rngs)
    self.fc2 = nnx.Linear(2, 1, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


def test_calibrate_and_quantize_small_mlp_by_hand():
  m = MLP(nnx.Rngs(0))
  m.fc1.kernel[...] = jnp.asarray(W)
  m.fc1.bias[...] = jnp.array([0.1, -0.2])
  m.fc2.kernel[...] = jnp.array([[0.3], [-0.7]])
  batches = [jnp.array([[1.0, -2.0], [0.5, 0.5]]), {"image": jnp.array([[-3.0, 1.0]])}]
  ranges = quant.calibrate(m, batches)
  h = [np.maximum(np.asarray(b if not isinstance(b, dict) else b["image"]) @ W + [0.1, -0.2], 0) for b in batches]
  assert set(ranges) == {"fc1", "fc2"}
  assert ranges["fc1"] == pytest.approx(3.0)
  assert ranges["fc2"] == pytest.approx(max(float(np.max(np.abs(v))) for v in h), rel=1e-6)
  assert isinstance(m.fc1, nnx.Linear)  # the float model is left as it was

  q = quant.quantize_model(m, ranges, per_channel=False)
  x = jnp.array([[0.7, -1.3], [2.2, 0.4]])
  fq = lambda v, amax: np.asarray(quant.fake_quant(jnp.asarray(v, jnp.float32), jnp.float32(amax / 127)))
  w1 = np.array(Q_TENSOR) / 127.0
  w2 = np.array([[0.3], [-0.7]]) / 0.7 * 127
  w2 = np.round(w2) * (0.7 / 127)
  hidden = np.maximum(fq(x, ranges["fc1"]) @ w1 + [0.1, -0.2], 0)
  expected = fq(hidden, ranges["fc2"]) @ w2 + np.asarray(m.fc2.bias[...])
  np.testing.assert_allclose(q(x), expected, rtol=1e-5, atol=1e-6)
  # Weights only: the input passes unquantized.
  w_only = quant.quantize_model(m, None)
  np.testing.assert_allclose(w_only.fc1.kernel[...], w1, rtol=1e-6)
  assert isinstance(w_only.fc1, nnx.Linear)


def _tiny_trained_stats_model():
  """A tiny RepOpt-VGG target model with non-trivial BatchNorm statistics, built under a fast jit."""
  make = lambda: RepOptVGG("tiny", "target", num_classes=10, in_channels=1, rngs=nnx.Rngs(0))
  graphdef = nnx.graphdef(nnx.eval_shape(make))
  model = nnx.merge(graphdef, jax.jit(lambda: nnx.as_pure(nnx.state(make())), compiler_options=FAST)())
  x = jax.random.normal(jax.random.key(1), (16, 32, 32, 1))
  g, st = nnx.split(model)

  @jax.jit
  def bn_update(st, x):
    m = nnx.merge(g, st)
    m.train()
    m(x)
    return nnx.state(m)

  nnx.update(model, bn_update(st, x * 2.0 + 0.5))
  model.eval()
  return model, x


def _wrapped_kernel(q, name):
  """The (fake-quantized) kernel of layer `name` of a model returned by `quantize_model` with act_ranges."""
  node = q
  for p in name.split("/"):
    node = node[int(p)] if p.isdigit() else getattr(node, p)
  return node.layer.kernel[...]


def test_fold_batchnorm_then_ptq_on_repopt_vgg():
  model, x = _tiny_trained_stats_model()
  folded = reparam.fold_batchnorm(model)
  ref = model(x)
  np.testing.assert_allclose(folded(x), ref, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
  # The folded kernel carries BatchNorm's per-channel factor; its BN is a pure bias now.
  bn = model.stage1[0].bn
  a = bn.scale[...] / jnp.sqrt(bn.var[...] + bn.epsilon)
  np.testing.assert_allclose(folded.stage1[0].conv.kernel[...], model.stage1[0].conv.kernel[...] * a, rtol=1e-5)
  assert float(jnp.max(jnp.abs(folded.stage1[0].bn.scale[...] - 1))) == 0.0

  ranges = quant.calibrate(folded, [x[:8], x[8:]])
  layers = quant.quantizable_layers(folded)
  assert set(ranges) == set(layers) and len(layers) == 8  # 7 blocks + head
  assert ranges["stage0/conv"] == pytest.approx(float(jnp.max(jnp.abs(x))), rel=1e-6)
  for pc in (False, True):
    q = quant.quantize_model(folded, ranges, per_channel=pc)
    assert float(jnp.max(jnp.abs(q(x) - ref))) > 0  # it does quantize
    # Every weight is within half a step of its float value: the round-to-nearest bound, layer by layer.
    for name, layer in quant.quantizable_layers(folded).items():
      w = np.asarray(layer.kernel[...], np.float64)
      amax = np.abs(w).max(axis=tuple(range(w.ndim - 1))) if pc else np.abs(w).max()
      got = np.asarray(_wrapped_kernel(q, name), np.float64)
      assert np.all(np.abs(got - w) <= amax / 127 / 2 * (1 + 1e-4)), (pc, name)
    # Every kernel holds at most 255 distinct values per channel and its extreme is kept exactly.
    k = q.stage2[1].conv.layer.kernel[...]
    kf = folded.stage2[1].conv.kernel[...]
    assert len(np.unique(np.asarray(k[..., 0]))) <= 255
    np.testing.assert_allclose(jnp.max(jnp.abs(k)), jnp.max(jnp.abs(kf)), rtol=1e-6)
  # Batches beyond calibration range clip rather than overflow.
  q = quant.quantize_model(folded, ranges, per_channel=True)
  assert bool(jnp.all(jnp.isfinite(q(x * 10))))


def test_bad_inputs_name_the_culprit():
  m = MLP(nnx.Rngs(0))
  with pytest.raises(quant.QuantError, match="'fc2'"):
    quant.quantize_model(m, {"fc1": 1.0})
  with pytest.raises(quant.QuantError, match="'conv9'"):
    quant.quantize_model(m, {"fc1": 1.0, "fc2": 1.0, "conv9": 1.0})
  with pytest.raises(quant.QuantError, match=r"act_ranges\['fc1'\]"):
    quant.quantize_model(m, {"fc1": float("nan"), "fc2": 1.0})
  with pytest.raises(quant.QuantError, match="num_bits"):
    quant.absmax_scale(W, num_bits=1)
  with pytest.raises(quant.QuantError, match="no calibration batch"):
    quant.calibrate(m, [])
  with pytest.raises(quant.QuantError, match="no nnx.Conv or nnx.Linear"):
    quant.quantizable_layers(nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
  with pytest.raises(quant.QuantError, match="already wrapped"):
    quant.calibrate(quant.quantize_model(m, {"fc1": 1.0, "fc2": 1.0}), [jnp.ones((1, 2))])


def test_error_shrinks_with_bits_on_repopt_vgg():
  """Weights + activations at b bits: the logit error falls strictly with every bit, about 2x per bit."""
  model, x = _tiny_trained_stats_model()
  folded = reparam.fold_batchnorm(model)
  ref = np.asarray(folded(x), np.float64)
  ranges = quant.calibrate(folded, [x], num_bits=4)
  rel = {}
  for b in (3, 4, 5, 6, 8, 10, 12):
    out = np.asarray(quant.quantize_model(folded, ranges, per_channel=False, num_bits=b)(x), np.float64)
    rel[b] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    # Weights only, per tensor: every kernel within half a step, the step being max|w| / (2^(b-1) - 1).
    w_only = quant.quantize_model(folded, None, num_bits=b)
    for name, layer in quant.quantizable_layers(folded).items():
      w = np.asarray(layer.kernel[...], np.float64)
      step = np.abs(w).max() / (2 ** (b - 1) - 1)
      wq = np.asarray(quant.quantizable_layers(w_only)[name].kernel[...], np.float64)
      assert np.max(np.abs(wq - w)) <= step / 2 * (1 + 1e-5), (b, name)
      assert len(np.unique(wq)) <= 2 ** b - 1, (b, name)
  bits = sorted(rel)
  assert all(rel[lo] > rel[hi] for lo, hi in zip(bits, bits[1:])), rel
  # Uniform rounding noise: the error scales like 2^-b; over 4 bits (16x) allow a factor 2 either way.
  assert 8 < rel[4] / rel[8] < 32 and 8 < rel[8] / rel[12] < 32, rel
  assert rel[8] < 0.05, rel


def test_linear_layer_error_within_the_rounding_bound():
  """One dense layer, y = x W: |y~ - y| <= s_x/2 sum_i |W~_ij| + s_w/2 sum_i |x_i| for every output j."""
  rng = np.random.default_rng(0)
  m = MLP(nnx.Rngs(0))
  m.fc1 = nnx.Linear(64, 16, rngs=nnx.Rngs(1))
  m.fc2 = nnx.Linear(16, 1, rngs=nnx.Rngs(2))
  x = jnp.asarray(rng.standard_normal((32, 64)), jnp.float32)
  ranges = quant.calibrate(m, [x])
  for b in (4, 6, 8):
    for acts in (False, True):
      q = quant.quantize_model(m, ranges if acts else None, num_bits=b)
      layer = q.fc1.layer if acts else q.fc1
      w, wq = np.asarray(m.fc1.kernel[...], np.float64), np.asarray(layer.kernel[...], np.float64)
      s_w = np.abs(w).max() / (2 ** (b - 1) - 1)
      s_x = ranges["fc1"] / (2 ** (b - 1) - 1) if acts else 0.0
      xa = np.asarray(x, np.float64)
      delta = np.abs(np.asarray(q.fc1(x), np.float64) - np.asarray(m.fc1(x), np.float64))
      bound = s_x / 2 * np.abs(wq).sum(0)[None, :] + s_w / 2 * np.abs(xa).sum(1, keepdims=True)
      assert np.all(delta <= bound * (1 + 1e-4) + 1e-6), (b, acts, float(np.max(delta / bound)))
      # The bound is not vacuous: the error is a sizeable fraction of it (rounding errors add up partly).
      assert np.max(delta / bound) > 0.05, (b, acts)
