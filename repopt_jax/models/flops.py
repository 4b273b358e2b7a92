"""Model size: parameter counts and multiply-add counts.

What counts as a parameter (`count_params`): every `nnx.Param` - conv kernels, BatchNorm scales and biases,
the head's kernel and bias, the trainable identity `gamma` (csla, hs) and the trainable `s`, `t` (hs). Not
counted: BatchNorm running statistics and csla's constant `s`, `t` (buffers, not trained). This is what
PyTorch's `sum(p.numel() for p in model.parameters())` counts for the official models, i.e. the numbers in
the paper's tables (target: 51.8M for B1; RepVGG training-time: 57.4M).

`flops` counts multiply-adds (MACs) of the convolutions and the head, which is what the paper (like RepVGG)
calls "GFLOPs": 11.8-11.9 G for B1 at 224x224. BatchNorm, ReLU, pooling and biases are not counted.
"""

from __future__ import annotations

from typing import Union

import jax
import numpy as np
from flax import nnx

from repopt_jax.models import registry
from repopt_jax.models.vgg import MODES, ModelError, VGGConfig, get_arch


def count_params(model: nnx.Module) -> int:
  """Number of scalars in the model's `nnx.Param`s (works on `nnx.eval_shape` models too).

  Example:
    >>> from repopt_jax.models import RepOptVGG
    >>> model = nnx.eval_shape(lambda: RepOptVGG('B1', 'target', rngs=nnx.Rngs(0)))
    >>> round(count_params(model) / 1e6, 1)
    51.8
  """
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  return int(sum(int(np.prod(np.shape(v))) for v in leaves))


def _conv_out(size: int, kernel: int, stride: int) -> int:
  pad = kernel // 2
  return (size + 2 * pad - kernel) // stride + 1


def flops(arch: Union[str, VGGConfig], image_size: int = 224, num_classes: int = 1000, *, mode: str = "target",
          in_channels: int = 3) -> int:
  """Multiply-adds of one forward pass of one image (the paper's "FLOPs").

  .. math::
    \\text{MACs} = \\sum_{\\text{convs}} H_{out} W_{out} k_h k_w C_{in} C_{out} + C_{feat}\\,\\text{num\\_classes}

  Args:
    arch: a name in `ARCHS` or a `VGGConfig`.
    image_size: input side (an int) or `(H, W)`.
    num_classes: outputs of the head.
    mode: 'target' (the deployed/RepOptimizer-trained network) or 'repvgg'/'csla'/'hs' (adds the 1x1
      branches; BatchNorm and scaling are not counted).
    in_channels: input channels.

  Returns:
    The count as an int (divide by 1e9 for the paper's "GFLOPs").

  Example:
    >>> round(flops('B1', 224) / 1e9, 1)
    11.8
  """
  if registry.family(arch) == "generic":
    return _generic_flops(arch, image_size, num_classes, mode, in_channels)
  config = get_arch(arch)
  if mode not in MODES:
    raise ModelError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
  h, w = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
  if min(h, w) < config.min_input_size:
    raise ModelError(f"flops: image {h}x{w} is too small for strides {config.strides}; "
                     f"needs at least {config.min_input_size}")
  total = 0
  for spec in config.block_specs(in_channels):
    h3, w3 = _conv_out(h, 3, spec.stride), _conv_out(w, 3, spec.stride)
    total += h3 * w3 * 9 * spec.in_channels * spec.out_channels
    if mode != "target":
      total += h3 * w3 * spec.in_channels * spec.out_channels
    h, w = h3, w3
  return int(total + config.out_features * num_classes)


def traced_macs(model: nnx.Module, x_shape) -> int:
  """Multiply-adds of the convs and dense layers of `model(x)`, read off its jaxpr (any NNX model).

  Each `conv_general_dilated` counts `prod(out) * kh * kw * C_in / groups`, each `dot_general`
  `prod(out) * prod(contracted dims)`; nothing is computed (abstract evaluation only).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(model)
  fn = lambda st, x: nnx.merge(graphdef, st)(x)
  jaxpr = jax.make_jaxpr(fn)(state, jax.ShapeDtypeStruct(tuple(x_shape), jnp.float32))
  total = 0

  def walk(jp):
    nonlocal total
    for eqn in jp.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        out, rhs = eqn.outvars[0].aval.shape, eqn.invars[1].aval.shape
        spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
        total += int(np.prod(out)) * int(np.prod([rhs[d] for d in spec[1:]]))
      elif eqn.primitive.name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        total += int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[d] for d in lc]))
      for p in eqn.params.values():
        if hasattr(p, "jaxpr"):
          walk(p.jaxpr if hasattr(p.jaxpr, "eqns") else p.jaxpr.jaxpr)
  walk(jaxpr.jaxpr)
  return total


def _generic_flops(arch: str, image_size, num_classes: int, mode: str, in_channels: int) -> int:
  h, w = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
  model = nnx.eval_shape(lambda: registry.build_generic(arch, mode, num_classes=num_classes, in_channels=in_channels))
  return traced_macs(model, (1, h, w, in_channels))
