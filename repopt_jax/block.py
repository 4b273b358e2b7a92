"""One CSLA block as arrays, free of any module framework: what `repopt_jax.csla` (NNX) and `repopt_jax.linen`
(Linen) both build on.

A CSLA block (Constant-Scale Linear Addition) stands for one KxK conv:

.. math::
  y = s \\odot \\mathrm{conv}_{K\\times K}(x; W_k) + t \\odot \\mathrm{conv}_{1\\times1}(x; W_1)
      \\;[+\\, \\gamma \\odot x]
  \\quad\\Longleftrightarrow\\quad
  W = s \\odot W_k + t \\odot \\mathrm{pad}(W_1) + \\mathrm{diag}(\\gamma)

This module holds the parts that do not depend on how a conv is represented:

* the geometry: where the centre tap is (`check_centre_tap`, `centre_input`) and when the identity branch
  exists (`identity_allowed`);
* the algebra: the merged kernel and bias of a block's arrays (`merge_arrays`), and the official
  Hyper-Search initial scales (`depth_init`);
* the parameter naming of a block (`CONV`, `POINTWISE`, `CONV_SCALE`, `POINTWISE_SCALE`, `IDENTITY_PARAM`:
  the official code's attribute names, shared by RepOpt-VGG, `csla.CSLAConv` and `linen.CSLAConv`);
* the params-tree side, for any pytree of arrays keyed by `repopt_jax.paths.path_str`: `scales_tree` (the
  tree the optimizers take), `weight_decay_mask` and `scales_of_params` (the scales of Hyper-Search blocks in
  a params dict). `csla` applies them to NNX models, Linen users to their params dicts.

Padding is given canonicalized, as the frameworks do it: a string ('SAME', 'VALID') or one `(lo, hi)` pair
per spatial dimension.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from repopt_jax import rules
from repopt_jax.paths import path_str
from repopt_jax.scales import CSLAScales, ScalesError

__all__ = ["CONV", "POINTWISE", "CONV_SCALE", "POINTWISE_SCALE", "IDENTITY_PARAM", "ntuple", "check_centre_tap",
           "identity_allowed", "centre_input", "merge_arrays", "depth_init", "bias_path", "scales_of_params",
           "scales_tree", "weight_decay_mask"]

# The parameter names of a block `b` (the official code's): `b/conv/kernel` (KxK), `b/conv_1x1/kernel`,
# `b/scale_conv` (s), `b/scale_1x1` (t), `b/scale_identity` (gamma). The plain model has `b/kernel`.
CONV = "conv"
POINTWISE = "conv_1x1"
CONV_SCALE = "scale_conv"
POINTWISE_SCALE = "scale_1x1"
IDENTITY_PARAM = "scale_identity"  # gamma; `weight_decay_mask` decays it (the official rule)

Padding = Union[str, Sequence[Tuple[int, int]]]


def ntuple(x, n: int) -> Tuple[int, ...]:
  """`x` (None, an int or a sequence) as an `n`-tuple of ints, as conv strides and dilations are given.

  Example:
    >>> ntuple(2, 2), ntuple(None, 2), ntuple([1, 3], 2)
    ((2, 2), (1, 1), (1, 3))
  """
  if x is None:
    return (1,) * n
  if isinstance(x, (int, np.integer)):
    return (int(x),) * n
  return tuple(int(v) for v in x)


def check_centre_tap(kernel_size: Sequence[int], padding: Padding, input_dilation=1, where: str = "conv") -> None:
  """Raises `ScalesError` (naming `where`) unless a conv has a centre tap a 1x1 branch can read.

  That is a 2-D kernel with odd sizes, 'SAME', 'VALID' or explicit padding (circular, reflect or causal
  padding moves the pixel under the centre tap) and no input dilation. Any stride, kernel dilation and
  group count qualify.

  Example:
    >>> check_centre_tap((3, 3), 'SAME')
    >>> check_centre_tap((2, 2), 'SAME', where='stem')
    Traceback (most recent call last):
    ...
    repopt_jax.scales.ScalesError: stem: kernel (2, 2) has no centre tap (2-D kernels with odd sizes only)
  """
  ks = tuple(kernel_size)
  if len(ks) != 2 or any(k % 2 == 0 for k in ks):
    raise ScalesError(f"{where}: kernel {ks} has no centre tap (2-D kernels with odd sizes only)")
  if isinstance(padding, str) and padding not in ("SAME", "VALID"):
    raise ScalesError(f"{where}: padding {padding!r} is not supported by a CSLA block (SAME, VALID or explicit)")
  if any(d != 1 for d in ntuple(input_dilation, 2)):
    raise ScalesError(f"{where}: input dilation is not supported by a CSLA block")


def identity_allowed(in_features: int, out_features: int, kernel_size: Sequence[int], strides=1,
                     padding: Padding = "SAME", kernel_dilation=1, input_dilation=1) -> bool:
  """Whether a conv's CSLA block can have an identity branch `gamma * x`.

  The identity adds the input to the output pixel by pixel, channel by channel, so the output must have the
  input's channels (`C_in == C_out`) and size: every stride (and input dilation) 1, and padding that keeps
  the size ('SAME', or explicit symmetric `d(K-1)/2` in every spatial dimension). Any group count works:
  with `C_in == C_out`, output channel `c` of a grouped conv reads its own input channel (at `c % (C/groups)`
  of its group's kernel slice), where `rules.csla_init` puts `gamma`.

  Example:
    >>> identity_allowed(8, 8, (3, 3), padding=((1, 1), (1, 1))), identity_allowed(8, 8, (3, 3), strides=2)
    (True, False)
    >>> identity_allowed(8, 16, (3, 3)), identity_allowed(8, 8, (3, 3), padding='VALID')
    (False, False)
  """
  n = len(kernel_size)
  if in_features != out_features or any(s != 1 for s in ntuple(strides, n)):
    return False
  if any(d != 1 for d in ntuple(input_dilation, n)):
    return False
  if isinstance(padding, str):
    return padding == "SAME"
  dil = ntuple(kernel_dilation, n)
  return all(tuple(p) == (d * (k - 1) // 2,) * 2 for p, k, d in zip(padding, kernel_size, dil))


def centre_input(x, kernel_size: Sequence[int], strides, padding: Padding, kernel_dilation=1):
  """`x` (`(..., H, W, C)`) cropped or padded so that a VALID 1x1 conv with `strides` reads, at every output
  position, the pixel under the centre tap of the KxK conv (`kernel_size`, `padding`, `kernel_dilation`).

  A plain 1x1 conv with the KxK conv's padding reads another pixel whenever the padding is not symmetric:
  Flax's 'SAME' at stride 2 on an even input pads (0, 1), and its centre tap sits one pixel down and right
  of where a 'SAME' 1x1 conv would look.

  Example:
    >>> x = jnp.arange(16.).reshape(1, 4, 4, 1)
    >>> xc = centre_input(x, (3, 3), 2, 'SAME')   # 'SAME' pads (0, 1): the 3x3 centres on rows/cols 1, 3
    >>> xc[0, ::2, ::2, 0].tolist()                # what a stride-2 VALID 1x1 conv reads
    [[5.0, 7.0], [13.0, 15.0]]
  """
  n = len(kernel_size)
  spatial = x.shape[x.ndim - 1 - n: x.ndim - 1]
  dil = ntuple(kernel_dilation, n)
  pad = padding
  if isinstance(pad, str):
    window = [d * (k - 1) + 1 for k, d in zip(kernel_size, dil)]
    pad = jax.lax.padtype_to_pads(spatial, window, ntuple(strides, n), pad)
  # Output o of the KxK conv centres on input pixel o*stride - lo + d(K-1)/2: pad by lo - d(K-1)/2
  # (negative: crop) so that o*stride is that pixel; the high side likewise keeps the output size.
  cfg = [(0, 0, 0)] * (x.ndim - 1 - n)
  cfg += [(int(lo) - d * (k - 1) // 2, int(hi) - d * (k - 1) // 2, 0)
          for (lo, hi), k, d in zip(pad, kernel_size, dil)]
  cfg += [(0, 0, 0)]
  if all(c == (0, 0, 0) for c in cfg):
    return x
  return jax.lax.pad(x, jnp.zeros((), x.dtype), cfg)


@jax.jit
def _merge(kernel, pointwise_kernel, conv_scale, pointwise_scale, identity_scale, bias, pointwise_bias):
  sc = CSLAScales(conv=conv_scale, pointwise=pointwise_scale, identity=identity_scale is not None)
  merged = rules.csla_init(sc, kernel, pointwise_kernel, identity_scale=identity_scale).astype(kernel.dtype)
  merged_bias = None if bias is None else rules.csla_bias(sc, bias, pointwise_bias).astype(bias.dtype)
  return merged, merged_bias


def merge_arrays(kernel, pointwise_kernel, conv_scale, pointwise_scale=None, identity_scale=None, bias=None,
                 pointwise_bias=None):
  """The one kernel and bias equal to a CSLA block's branches (the Rule of Initialization on its arrays).

  .. math::
    W = s \\odot W_k + t \\odot \\mathrm{pad}(W_1) + \\mathrm{diag}(\\gamma), \\qquad b = s \\odot b_k + t \\odot b_1

  (`rules.csla_init`, `rules.csla_bias`), in the kernel's (and bias's) dtype. Every model merges through
  this function; it is compiled once per shape.

  Args:
    kernel: the KxK kernel `W_k`, HWIO.
    pointwise_kernel: the 1x1 kernel `W_1`, or None without a 1x1 branch.
    conv_scale, pointwise_scale: `s` and `t` (`(C_out,)`; `t` None without a 1x1 branch).
    identity_scale: `gamma` (`(C_out,)`), or None without an identity branch.
    bias, pointwise_bias: the branch biases `b_k`, `b_1` (None: no bias; a missing `b_1` counts as zero).

  Returns:
    `(W, b)`, with `b` None when `bias` is None.

  Example:
    >>> w, b = merge_arrays(jnp.zeros((3, 3, 2, 2)), jnp.ones((1, 1, 2, 2)), jnp.full(2, 2.), jnp.full(2, 3.),
    ...                     jnp.ones(2), bias=jnp.ones(2), pointwise_bias=jnp.ones(2))
    >>> w[1, 1].tolist(), float(w[0, 0].sum()), b.tolist()
    ([[4.0, 3.0], [3.0, 4.0]], 0.0, [5.0, 5.0])
  """
  return _merge(kernel, pointwise_kernel, conv_scale, pointwise_scale, identity_scale, bias, pointwise_bias)


def depth_init(index: int) -> float:
  """The official Hyper-Search initial `s` = `t` of the `index`-th conv of a run of identity blocks: 1.0 for
  the first (index 0), `sqrt(2/i)` for the i-th following one.

  Example:
    >>> [round(depth_init(i), 4) for i in range(4)]
    [1.0, 1.4142, 1.0, 0.8165]
  """
  return 1.0 if index == 0 else math.sqrt(2.0 / index)


def bias_path(kernel_path: str) -> Optional[str]:
  """The path of the bias beside a kernel (`'conv/kernel'` -> `'conv/bias'`), None for a non-kernel path.

  A conv's bias takes its kernel's scales: every branch has its own bias, scaled like its output.

  Example:
    >>> bias_path('layer1/0/conv1/kernel'), bias_path('kernel'), bias_path('bn/scale')
    ('layer1/0/conv1/bias', 'bias', None)
  """
  if kernel_path == "kernel":
    return "bias"
  if kernel_path.endswith("/kernel"):
    return kernel_path[: -len("kernel")] + "bias"
  return None


def _is_block(d) -> bool:
  return isinstance(d, Mapping) and CONV in d and CONV_SCALE in d


def _blocks(tree, prefix=()):
  if _is_block(tree):
    yield prefix, tree
    return
  if isinstance(tree, Mapping):
    for k in tree:
      yield from _blocks(tree[k], prefix + (k,))


def scales_of_params(params: Mapping[str, Any]) -> Dict[str, CSLAScales]:
  """`{kernel path: CSLAScales}` of the Hyper-Search blocks of a params dict, in the dict's order.

  A block is a sub-dict with `conv` and `scale_conv` (the naming above, as Linen's `CSLAConv(mode='hs')`
  lays it out); its key is the plain model's kernel path `'<block path>/kernel'`. A `{'params': ...}`
  variables dict is read too.

  Args:
    params: a nested dict of arrays (`variables['params']` of a Linen model).

  Returns:
    The current `s`, `t`, gamma of every block, as host arrays (`identity_init` = gamma).

  Raises:
    ScalesError: when the dict holds no block.

  Example:
    >>> params = {'body': {'conv': {'kernel': np.zeros((3, 3, 4, 4))}, 'conv_1x1': {'kernel': np.zeros((1, 1, 4, 4))},
    ...                    'scale_conv': np.ones(4), 'scale_1x1': np.ones(4), 'scale_identity': np.ones(4)}}
    >>> scales_of_params(params)
    {'body/kernel': CSLAScales(conv[4], pointwise, identity(trained))}
  """
  if isinstance(params, Mapping) and set(params) == {"params"}:
    params = params["params"]
  host = lambda v: np.asarray(jax.device_get(v))
  out = {}
  for prefix, d in _blocks(params):
    out[path_str(prefix + ("kernel",))] = CSLAScales(
        conv=host(d[CONV_SCALE]), pointwise=host(d[POINTWISE_SCALE]) if POINTWISE_SCALE in d else None,
        identity=IDENTITY_PARAM in d, identity_init=host(d[IDENTITY_PARAM]) if IDENTITY_PARAM in d else None)
  if not out:
    raise ScalesError("scales_of: no Hyper-Search CSLAConv in these params (blocks with conv and scale_conv)")
  return out


def scales_tree(params, scales: Mapping[str, CSLAScales]):
  """The scales tree for `repopt_masks` / `repopt_sgd` / `repopt_adamw`: `CSLAScales` on each kernel named
  in `scales` and on its bias (`bias_path`), None on every other leaf.

  Args:
    params: any pytree of arrays (a Linen params dict, a pure `nnx.State`); leaves are named by `path_str`.
    scales: `{kernel path: CSLAScales}`.

  Returns:
    A tree shaped like `params`.

  Raises:
    ScalesError: naming the entry that names no parameter, is not `CSLAScales`, or does not fit its
      kernel's (or bias's) shape.

  Example:
    >>> s = CSLAScales(conv=np.ones(4), pointwise=np.ones(4), identity=True)
    >>> params = {'conv': {'kernel': np.zeros((3, 3, 4, 4)), 'bias': np.zeros(4)}, 'head': {'kernel': np.zeros((4, 2))}}
    >>> scales_tree(params, {'conv/kernel': s})
    {'conv': {'bias': CSLAScales(conv[4], pointwise, identity), 'kernel': CSLAScales(conv[4], pointwise, identity)}, 'head': {'kernel': None}}
    >>> scales_tree(params, {'body/kernel': s})
    Traceback (most recent call last):
    ...
    repopt_jax.scales.ScalesError: scales_tree: scales['body/kernel'] names no parameter of the model
  """
  if not isinstance(scales, Mapping):
    raise ScalesError(f"scales_tree: scales must be a dict {{kernel_path: CSLAScales}}, got {type(scales).__name__}")
  shapes = {path_str(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  for name, s in scales.items():
    if name not in shapes:
      raise ScalesError(f"scales_tree: scales[{name!r}] names no parameter of the model")
    if not isinstance(s, CSLAScales):
      raise ScalesError(f"scales_tree: scales[{name!r}] is a {type(s).__name__}, not CSLAScales")
    rules.check_kernel(s, shapes[name], name)
  biases = {}
  for name, s in scales.items():
    bias = bias_path(name)
    if bias in shapes:
      rules.check_kernel(s, shapes[bias], bias)
      biases[bias] = s

  def leaf(path, _):
    name = path_str(path)
    return scales.get(name, biases.get(name))

  return jax.tree_util.tree_map_with_path(leaf, params)


def weight_decay_mask(params):
  """Which parameters decay (the official code's rule): `True` for every parameter with more than one
  dimension (conv and dense kernels, 1x1 branch kernels) and for the identity weights gamma
  (`IDENTITY_PARAM`); `False` for 1-D parameters: BatchNorm scales and biases, conv and dense biases,
  Hyper-Search's trainable `s`, `t`.

  This is exact for RepOptimizer: decaying every branch of a CSLA block (the identity weights included)
  decays their sum, the merged kernel.

  Args:
    params: any pytree of arrays; leaves are named by `path_str`.

  Returns:
    A tree of bools shaped like `params`, for `optax.add_decayed_weights(wd, mask)` or
    `repopt_sgd(..., weight_decay_mask=mask)`.

  Example:
    >>> weight_decay_mask({'conv': {'kernel': np.zeros((3, 3, 4, 4)), 'bias': np.zeros(4)}, 'scale_identity': np.ones(4)})
    {'conv': {'bias': False, 'kernel': True}, 'scale_identity': True}
  """

  def leaf(path, x):
    return bool(len(np.shape(x)) > 1 or path_str(path).split("/")[-1] == IDENTITY_PARAM)

  return jax.tree_util.tree_map_with_path(leaf, params)
