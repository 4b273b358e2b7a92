"""repopt_jax.ops: the im2col convolution equals lax.conv_general_dilated to rounding, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from repopt_jax import ops

DN = ("NHWC", "HWIO", "NHWC")
TOL = {"float32": 1e-5, "float64": 1e-12}

CASES = [  # (N, H, W, C_in, C_out, k, stride, padding, groups)
    (2, 4, 4, 8, 16, 3, 1, ((1, 1), (1, 1)), 1),      # the 4x4 stage of B1 at 64 px, small
    (2, 8, 8, 6, 5, 3, 2, ((1, 1), (1, 1)), 1),       # stride 2, explicit PyTorch padding
    (2, 7, 5, 4, 6, 3, 2, ((1, 1), (1, 1)), 1),       # odd, non-square input, stride 2
    (1, 6, 6, 4, 4, 3, 1, "SAME", 1),                 # SAME, even size
    (1, 7, 7, 4, 4, 3, 2, "SAME", 1),                 # SAME, odd size, stride 2
    (1, 6, 6, 4, 8, 3, 2, "SAME", 1),                 # SAME, even size, stride 2 (pads (0, 1))
    (2, 5, 5, 4, 6, 1, 2, ((0, 0), (0, 0)), 1),       # 1x1, stride 2 (RepVGG's conv_1x1)
    (1, 6, 6, 3, 5, 1, 1, "VALID", 1),                # 1x1, stride 1
    (2, 6, 6, 8, 12, 3, 1, "SAME", 4),                # grouped
    (2, 6, 5, 8, 8, 3, 2, ((1, 1), (1, 1)), 8),       # depthwise, stride 2
    (1, 5, 5, 4, 8, 3, 1, "VALID", 4),                # depthwise with multiplier 2, VALID
]


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.mark.parametrize("case", CASES, ids=[f"{c[1]}x{c[2]}-k{c[5]}-s{c[6]}-{c[7]}-g{c[8]}".replace(" ", "")
                                             for c in CASES])
def test_forward_and_gradients_match_lax(case, dtype):
  n, h, w, cin, cout, k, s, padding, groups = case
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((n, h, w, cin)), dtype)
  kern = jnp.asarray(rng.standard_normal((k, k, cin // groups, cout)), dtype)
  prec = lax.Precision.HIGHEST

  def ref(x, kern):
    return lax.conv_general_dilated(x, kern, (s, s), padding, dimension_numbers=DN, feature_group_count=groups,
                                    precision=prec)

  def mine(x, kern):
    return ops.conv_im2col(x, kern, (s, s), padding, feature_group_count=groups, precision=prec)

  y_ref, y = ref(x, kern), mine(x, kern)
  assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
  assert _rel(y, y_ref) <= TOL[dtype]
  # Gradients against a non-trivial cotangent: input gradient and weight gradient separately.
  ct = jnp.asarray(rng.standard_normal(y_ref.shape), dtype)
  g_ref = jax.vjp(ref, x, kern)[1](ct)
  g = jax.vjp(mine, x, kern)[1](ct)
  for a, b in zip(g, g_ref):
    assert a.shape == b.shape
    assert _rel(a, b) <= TOL[dtype]


def test_dispatch_uses_im2col_only_for_small_nhwc_outputs():
  """The drop-in takes the same arguments as lax and routes small NHWC outputs to im2col."""
  x_small = jnp.ones((1, 8, 8, 4))
  x_big = jnp.ones((1, 32, 32, 4))
  kern = jnp.ones((3, 3, 4, 4))
  pad = ((1, 1), (1, 1))
  hlo = lambda x: jax.jit(lambda x, k: ops.conv_general_dilated(x, k, (1, 1), pad, dimension_numbers=DN)
                          ).lower(x, kern).as_text()
  assert "convolution" not in hlo(x_small) and "dot_general" in hlo(x_small)  # 64 output pixels
  assert "convolution" in hlo(x_big)  # 1024 output pixels: XLA's own convolution
  # Grouped convolutions and other layouts always go to lax.
  nchw = jax.jit(lambda x, k: ops.conv_general_dilated(x, k, (1, 1), pad, dimension_numbers=("NCHW", "HWIO", "NCHW"))
                 ).lower(jnp.ones((1, 4, 4, 4)), kern).as_text()
  assert "convolution" in nchw


def test_nnx_conv_with_the_drop_in_is_the_same_layer():
  """nnx.Conv(conv_general_dilated=ops.conv_general_dilated): same params (HWIO), same outputs and gradients."""
  kw = dict(in_features=16, out_features=32, kernel_size=(3, 3), strides=2, padding=((1, 1), (1, 1)),
            use_bias=False)
  ref = nnx.Conv(**kw, rngs=nnx.Rngs(0))
  mine = nnx.Conv(**kw, conv_general_dilated=ops.conv_general_dilated, rngs=nnx.Rngs(0))
  assert mine.kernel.shape == (3, 3, 16, 32)
  np.testing.assert_array_equal(ref.kernel[...], mine.kernel[...])
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 16)), jnp.float32)
  assert _rel(mine(x), ref(x)) <= 1e-5
  loss = lambda m: jnp.sum(jnp.sin(m(x)))
  g_ref, g = nnx.grad(loss)(ref), nnx.grad(loss)(mine)
  assert _rel(g["kernel"][...], g_ref["kernel"][...]) <= 1e-5
