"""The blocks of RepOpt-VGG in Flax NNX (NHWC), one per mode, sharing one parameter naming.

Every block maps `C_in -> C_out` channels with a given stride; the identity branch exists only when
`C_in == C_out` and the stride is 1 (`has_identity`). The attribute names are the official code's, so a
parameter path reads the same in every mode:

==========  ===========================================================================================
mode        attributes (all blocks end in ReLU)
==========  ===========================================================================================
target      `conv` (3x3, no bias) -> `bn`
csla        `scale_conv * conv(x) + scale_1x1 * conv_1x1(x) [+ scale_identity * x]` -> `bn`;
            `scale_conv`, `scale_1x1` constants (`BranchScale`), `scale_identity` a trainable `nnx.Param`
hs          as csla, every scale an `nnx.Param` (the Hyper-Search model)
repvgg      `bn(conv(x)) + bn_1x1(conv_1x1(x)) [+ bn_identity(x)]` (RepVGG's training-time block)
==========  ===========================================================================================

Initialisers are PyTorch's defaults, as in the official code (its kernels are `nn.Conv2d` defaults, and the
Rule of Initialization draws its fresh 1x1 kernels the same way): kernels `U(-1/sqrt(fan_in),
1/sqrt(fan_in))`. They matter beyond taste: the relative size of the branches at init decides how much the
identity dominates a CSLA block, hence what Hyper-Search finds. BatchNorm follows PyTorch too (momentum 0.1
in PyTorch's convention, i.e. 0.9 here, eps 1e-5; the running variance is the biased batch variance, where
PyTorch keeps the unbiased one) and computes the batch variance in two passes (`use_fast_variance=False`),
which keeps float32 statistics accurate when a block's mean is large. Running statistics are kept in
`promote_types(param_dtype, float32)`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from repopt_jax import ops
# One constant-scale Variable type for every model: RepOpt-VGG's csla blocks and `repopt_jax.csla`'s surgery.
from repopt_jax.csla import BranchScale


def conv_kernel_init(key, shape, dtype=jnp.float32):
  """PyTorch's default conv/linear weight init (`kaiming_uniform_(a=sqrt(5))`): `U(+-1/sqrt(fan_in))`.

  `fan_in` is the product of all but the last (output) axis, as for Flax HWIO kernels and `(in, out)`
  linear kernels. Drawn as a flat vector and reshaped: the same distribution as drawing the shape directly,
  but XLA compiles a 1-D draw in a fraction of the time of a 4-D one on CPU, which makes eager model
  construction seconds instead of tens of seconds.
  """
  fan_in = int(np.prod(shape[:-1]))
  bound = 1.0 / np.sqrt(fan_in)
  return jax.random.uniform(key, (int(np.prod(shape)),), dtype, -bound, bound).reshape(shape)


BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def torch_linear_bias_init(fan_in: int):
  """PyTorch's default `nn.Linear` bias init, `U(+-1/sqrt(fan_in))`, as an NNX initializer."""
  bound = 1.0 / float(fan_in) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _conv(cin, cout, k, stride, dtype, param_dtype, rngs, *, groups: int = 1, use_bias: bool = False,
          conv_impl: str = "auto"):
  """Every conv of the package's models is built here, computed by `ops.conv_function(conv_impl)`."""
  # Explicit PyTorch padding (1 for 3x3, 0 for 1x1), not 'SAME': with stride 2 and an even input, 'SAME'
  # pads (0, 1), which would move the 3x3's centre tap off the pixel the 1x1 branch reads.
  pad = k // 2
  return nnx.Conv(cin, cout, (k, k), strides=stride, padding=((pad, pad), (pad, pad)), use_bias=use_bias,
                  feature_group_count=groups, kernel_init=conv_kernel_init,
                  bias_init=torch_linear_bias_init(cin // groups * k * k), dtype=dtype, param_dtype=param_dtype,
                  conv_general_dilated=ops.conv_function(conv_impl), rngs=rngs)


def _bn(c, dtype, param_dtype, rngs):
  bn = nnx.BatchNorm(c, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, use_fast_variance=False, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)
  # Flax keeps running statistics in float32 whatever param_dtype is; a float64 model gets float64 ones
  # (else they are rounded to float32 every step), a bfloat16 one keeps float32.
  stats_dtype = jnp.promote_types(param_dtype, jnp.float32)
  bn.mean = nnx.BatchStat(jnp.zeros((c,), stats_dtype))
  bn.var = nnx.BatchStat(jnp.ones((c,), stats_dtype))
  return bn


class _Block(nnx.Module):
  """Shared bookkeeping: channel counts, stride, and whether the identity branch exists."""

  def _setup(self, in_channels: int, out_channels: int, stride: int):
    self.in_channels = in_channels
    self.out_channels = out_channels
    self.stride = stride
    self.has_identity = in_channels == out_channels and stride == 1


class TargetBlock(_Block):
  """conv3x3 (no bias) -> BatchNorm -> ReLU: the block RepOptimizer trains and deploys."""

  def __init__(self, in_channels: int, out_channels: int, stride: int = 1, *, dtype=None,
               param_dtype=jnp.float32, conv_impl: str = "auto", rngs: nnx.Rngs):
    self._setup(in_channels, out_channels, stride)
    self.conv = _conv(in_channels, out_channels, 3, stride, dtype, param_dtype, rngs, conv_impl=conv_impl)
    self.bn = _bn(out_channels, dtype, param_dtype, rngs)

  def __call__(self, x):
    return nnx.relu(self.bn(self.conv(x)))


class CSLABlock(_Block):
  """`s * conv3x3(x) + t * conv1x1(x) [+ gamma * x]` -> BatchNorm -> ReLU (csla and hs modes).

  Args:
    in_channels, out_channels, stride: the block's shape; identity iff `C_in == C_out` and stride 1.
    conv_scale, pointwise_scale: initial `s` and `t`, `(C_out,)` arrays or scalars (broadcast).
    identity_scale: initial `gamma` (`(C_out,)` or scalar; 1.0 when None); ignored without identity.
    trainable_scales: False for csla (`s`, `t` are `BranchScale` constants), True for hs (`nnx.Param`).
      `gamma` is an `nnx.Param` in both, as in the official code.
    conv_impl: the convolution formulation of its convs ('auto', 'lax', 'im2col'; `repopt_jax.ops`).
  """

  def __init__(self, in_channels: int, out_channels: int, stride: int = 1, *, conv_scale=1.0,
               pointwise_scale=1.0, identity_scale=None, trainable_scales: bool = False, dtype=None,
               param_dtype=jnp.float32, conv_impl: str = "auto", rngs: nnx.Rngs):
    self._setup(in_channels, out_channels, stride)
    self.dtype = dtype
    var = nnx.Param if trainable_scales else BranchScale
    vec = lambda v: jnp.broadcast_to(jnp.asarray(v, param_dtype), (out_channels,))
    self.conv = _conv(in_channels, out_channels, 3, stride, dtype, param_dtype, rngs, conv_impl=conv_impl)
    self.scale_conv = var(vec(conv_scale))
    self.conv_1x1 = _conv(in_channels, out_channels, 1, stride, dtype, param_dtype, rngs, conv_impl=conv_impl)
    self.scale_1x1 = var(vec(pointwise_scale))
    if self.has_identity:
      self.scale_identity = nnx.Param(vec(1.0 if identity_scale is None else identity_scale))
    self.bn = _bn(out_channels, dtype, param_dtype, rngs)

  def __call__(self, x):
    dtype = self.dtype or x.dtype
    y = self.conv(x) * self.scale_conv[...].astype(dtype) + self.conv_1x1(x) * self.scale_1x1[...].astype(dtype)
    if self.has_identity:
      y = y + x.astype(dtype) * self.scale_identity[...].astype(dtype)
    return nnx.relu(self.bn(y))


class RepVGGBlock(_Block):
  """`BN(conv3x3(x)) + BN(conv1x1(x)) [+ BN(x)]` -> ReLU: RepVGG's training-time block."""

  def __init__(self, in_channels: int, out_channels: int, stride: int = 1, *, dtype=None,
               param_dtype=jnp.float32, conv_impl: str = "auto", rngs: nnx.Rngs):
    self._setup(in_channels, out_channels, stride)
    self.conv = _conv(in_channels, out_channels, 3, stride, dtype, param_dtype, rngs, conv_impl=conv_impl)
    self.bn = _bn(out_channels, dtype, param_dtype, rngs)
    self.conv_1x1 = _conv(in_channels, out_channels, 1, stride, dtype, param_dtype, rngs, conv_impl=conv_impl)
    self.bn_1x1 = _bn(out_channels, dtype, param_dtype, rngs)
    if self.has_identity:
      self.bn_identity = _bn(out_channels, dtype, param_dtype, rngs)

  def __call__(self, x):
    y = self.bn(self.conv(x)) + self.bn_1x1(self.conv_1x1(x))
    if self.has_identity:
      y = y + self.bn_identity(x)
    return nnx.relu(y)


def make_block(mode: str, in_channels: int, out_channels: int, stride: int, *, conv_scale=1.0,
               pointwise_scale=1.0, identity_scale: Optional[object] = None, dtype=None,
               param_dtype=jnp.float32, conv_impl: str = "auto", rngs: nnx.Rngs) -> _Block:
  """The block of `mode` ('target', 'csla', 'hs' or 'repvgg'); scales are used by csla/hs only."""
  kw = dict(dtype=dtype, param_dtype=param_dtype, conv_impl=conv_impl, rngs=rngs)
  if mode == "target":
    return TargetBlock(in_channels, out_channels, stride, **kw)
  if mode == "repvgg":
    return RepVGGBlock(in_channels, out_channels, stride, **kw)
  if mode in ("csla", "hs"):
    return CSLABlock(in_channels, out_channels, stride, conv_scale=conv_scale, pointwise_scale=pointwise_scale,
                     identity_scale=identity_scale, trainable_scales=mode == "hs", **kw)
  raise ValueError(f"make_block: unknown mode {mode!r}")
