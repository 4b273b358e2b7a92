"""A CIFAR ResNet-18 in Flax NNX (NHWC): the first model that is not VGG, for RepOpt on any model.

The usual CIFAR variant (He et al. 2016, as in the popular `kuangliu/pytorch-cifar`): a 3x3 stride-1 stem
conv-BN-ReLU (no max-pool), four stages of two `BasicBlock`s (widths `w, 2w, 4w, 8w`, the last three
opening with a stride-2 block whose shortcut is a 1x1 conv + BN), global average pooling and a linear head.
With `width=64` and 10 classes it has 11,173,962 parameters.

RepOpt sees it through `repopt_jax.csla`: every 3x3 conv is a CSLA block (the stem and the stride-2 convs
without identity, the others with), the 1x1 projection shortcuts are not selected (kernel size 1), and
the residual adds and BatchNorms stay as they are. Parameter paths: `conv1/kernel`, `layer1/0/conv1/kernel`,
`layer2/0/shortcut_conv/kernel`, `linear/kernel`.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from repopt_jax.models import blocks as blocks_lib


class BasicBlock(nnx.Module):
  """`relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`; shortcut = 1x1 conv + BN when the shape changes."""

  def __init__(self, cin: int, cout: int, stride: int, *, dtype=None, param_dtype=jnp.float32,
               conv_impl: str = "auto", rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    conv = lambda i, o, k, s: blocks_lib._conv(i, o, k, s, dtype, param_dtype, rngs, conv_impl=conv_impl)  # pylint: disable=protected-access
    self.conv1 = conv(cin, cout, 3, stride)
    self.bn1 = blocks_lib._bn(cout, **kw)  # pylint: disable=protected-access
    self.conv2 = conv(cout, cout, 3, 1)
    self.bn2 = blocks_lib._bn(cout, **kw)  # pylint: disable=protected-access
    self.has_shortcut = stride != 1 or cin != cout
    if self.has_shortcut:
      self.shortcut_conv = conv(cin, cout, 1, stride)
      self.shortcut_bn = blocks_lib._bn(cout, **kw)  # pylint: disable=protected-access

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    short = self.shortcut_bn(self.shortcut_conv(x)) if self.has_shortcut else x
    return nnx.relu(y + short)


class ResNetCifar(nnx.Module):
  """A CIFAR ResNet: stem, four stages of `BasicBlock`s, average pool, linear head.

  Args:
    num_blocks: blocks per stage (ResNet-18: `(2, 2, 2, 2)`).
    num_classes: head outputs.
    in_channels: image channels.
    width: the first stage's width (64 for the standard network; stages `w, 2w, 4w, 8w`).
    dtype, param_dtype: computation and parameter dtypes.
    conv_impl: the convolution formulation ('auto', 'lax' or 'im2col'; see `repopt_jax.ops`).
    rngs: `nnx.Rngs`.

  Example:
    >>> model = ResNetCifar((2, 2, 2, 2), num_classes=10, width=8, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 32, 32, 3))).shape
    (2, 10)
  """

  def __init__(self, num_blocks=(2, 2, 2, 2), *, num_classes: int = 10, in_channels: int = 3, width: int = 64,
               dtype=None, param_dtype=jnp.float32, conv_impl: str = "auto", rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_classes, self.in_channels, self.width = int(num_classes), int(in_channels), int(width)
    self.conv1 = blocks_lib._conv(in_channels, width, 3, 1, dtype, param_dtype, rngs, conv_impl=conv_impl)  # pylint: disable=protected-access
    self.bn1 = blocks_lib._bn(width, **kw)  # pylint: disable=protected-access
    cin = width
    for s, n in enumerate(num_blocks):
      cout = width * 2 ** s
      layer = []
      for i in range(n):
        layer.append(BasicBlock(cin, cout, 2 if (s > 0 and i == 0) else 1, conv_impl=conv_impl, **kw))
        cin = cout
      setattr(self, f"layer{s + 1}", nnx.List(layer))
    self.num_stages = len(num_blocks)
    self.linear = nnx.Linear(cin, num_classes, kernel_init=blocks_lib.conv_kernel_init,
                             bias_init=blocks_lib.torch_linear_bias_init(cin), **kw)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    for s in range(self.num_stages):
      for blk in getattr(self, f"layer{s + 1}"):
        x = blk(x)
    return self.linear(jnp.mean(x, axis=(1, 2)))


def resnet18_cifar(*, num_classes: int = 10, in_channels: int = 3, width: int = 64, dtype=None,
                   param_dtype=jnp.float32, conv_impl: str = "auto", rngs: nnx.Rngs) -> ResNetCifar:
  """The CIFAR ResNet-18 (`(2, 2, 2, 2)` blocks)."""
  return ResNetCifar((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, width=width, dtype=dtype,
                     param_dtype=param_dtype, conv_impl=conv_impl, rngs=rngs)
