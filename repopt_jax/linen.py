"""RepOpt for Flax Linen users: a drop-in `CSLAConv` for `nn.Conv`, and the Rule of Initialization and merge
on Linen params dicts.

There is no generic Linen surgery (a Linen module's structure lives in its code): to Hyper-Search, write the
model with `CSLAConv(mode='hs')` where it has `nn.Conv`; for the imaginary CSLA model, `mode='csla'` with the
constant scales. Parameter layout of a `CSLAConv` named `c`: `c/conv/{kernel,bias}`, `c/conv_1x1/{kernel,bias}`,
`c/scale_conv`, `c/scale_1x1` (hs mode only: constants in csla mode) and `c/scale_identity` (gamma). The
plain model (`nn.Conv` named `c`) has `c/kernel`: the key of the block in `scales_of`, `scales_tree`,
`csla_init_params`, as in `repopt_jax.csla`.

    hs = Net(conv=functools.partial(CSLAConv, mode='hs'))     # Hyper-Search, then:
    scales = scales_of(hs_params)                             # {'Conv_1/kernel': CSLAScales, ...}
    params = csla_init_params(plain_params, scales, key)      # Rule of Initialization
    tx = optax.chain(repopt_masks(scales_tree(params, scales)), optax.sgd(0.1, momentum=0.9))

`scales_of`, `scales_tree` and `weight_decay_mask` are `repopt_jax.block`'s (the params-dict side every front
end shares; `repopt_jax.csla`'s accept these dicts too). This module builds on `repopt_jax.block` alone and
does not need NNX.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from repopt_jax import block, rules
from repopt_jax.block import depth_init, scales_of_params, scales_tree, weight_decay_mask  # noqa: F401  (public)
from repopt_jax.paths import path_str
from repopt_jax.scales import CSLAScales, ScalesError

__all__ = ["CSLAConv", "scales_of", "scales_of_params", "scales_tree", "weight_decay_mask", "depth_init",
           "csla_init_params", "merge_params"]

scales_of = scales_of_params

PaddingLike = Union[str, int, Sequence[Union[int, Sequence[int]]]]


class CSLAConv(nn.Module):
  """A drop-in for `nn.Conv` standing for a CSLA block: `s * conv(x) + t * conv_1x1(x) [+ gamma * x]`.

  The 1x1 branch reads the pixel under the KxK centre tap whatever the padding (as `repopt_jax.csla`).

  Attributes:
    features, kernel_size, strides, padding, kernel_dilation, feature_group_count, use_bias, dtype,
      param_dtype, precision, kernel_init, bias_init: as `nn.Conv` (odd 2-D kernels). `kernel_init` also
      draws the 1x1 kernel; branch biases start at `bias_init`, the 1x1 branch's at zero.
    mode: 'hs' (`s`, `t`, `gamma` trainable params) or 'csla' (`s`, `t` the constants of `scales`).
    scales: the block's `CSLAScales` (mode 'csla'; its `identity_init` starts `gamma`).
    init_scale: initial `s` = `t` in mode 'hs' (e.g. `depth_init(i)`).
    identity: mode 'hs': give the block an identity branch when it can have one (C_in == C_out, stride 1,
      size-keeping padding).
  """
  features: int
  kernel_size: Sequence[int]
  strides: Union[int, Sequence[int]] = 1
  padding: PaddingLike = "SAME"
  kernel_dilation: Union[int, Sequence[int]] = 1
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable = nn.linear.default_kernel_init
  bias_init: Callable = nn.initializers.zeros_init()
  mode: str = "hs"
  scales: Optional[CSLAScales] = None
  init_scale: float = 1.0
  identity: bool = True

  @nn.compact
  def __call__(self, x):
    ks = tuple(self.kernel_size)
    pad = nn.linear.canonicalize_padding(self.padding, len(ks))
    block.check_centre_tap(ks, pad, where=self.name or "CSLAConv")
    if self.mode not in ("hs", "csla"):
      raise ScalesError(f"{self.name}: unknown mode {self.mode!r}; valid: hs, csla")
    if self.mode == "csla" and not isinstance(self.scales, CSLAScales):
      raise ScalesError(f"{self.name}: mode 'csla' needs scales=CSLAScales(...)")
    common = dict(strides=self.strides, feature_group_count=self.feature_group_count, use_bias=self.use_bias,
                  dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                  kernel_init=self.kernel_init)
    y = nn.Conv(self.features, ks, padding=self.padding, kernel_dilation=self.kernel_dilation,
                bias_init=self.bias_init, name=block.CONV, **common)(x)
    dtype = y.dtype
    f = self.features
    if self.mode == "hs":
      s = self.param(block.CONV_SCALE, nn.initializers.constant(self.init_scale), (f,), self.param_dtype)
      t = self.param(block.POINTWISE_SCALE, nn.initializers.constant(self.init_scale), (f,), self.param_dtype)
      has_id = self.identity and block.identity_allowed(x.shape[-1], f, ks, self.strides, pad, self.kernel_dilation)
      gamma0 = None
    else:
      sc = self.scales
      rules.check_kernel(sc, ks + (x.shape[-1] // self.feature_group_count, f), self.name or "CSLAConv")
      s, t = jnp.asarray(sc.conv), None if sc.pointwise is None else jnp.asarray(sc.pointwise)
      has_id = sc.identity
      if has_id and not block.identity_allowed(x.shape[-1], f, ks, self.strides, pad, self.kernel_dilation):
        raise ScalesError(f"{self.name}: the scales have an identity branch but this conv cannot")
      gamma0 = sc.identity_init
    y = y * s.astype(dtype)
    if t is not None:
      xc = block.centre_input(x, ks, self.strides, pad, self.kernel_dilation)
      y = y + nn.Conv(f, (1, 1), padding="VALID", bias_init=nn.initializers.zeros_init(), name=block.POINTWISE,
                      **common)(xc) * t.astype(dtype)
    if has_id:
      init = (nn.initializers.ones_init() if gamma0 is None
              else (lambda key, shape, dt: jnp.asarray(gamma0, dt)))
      gamma = self.param(block.IDENTITY_PARAM, init, (f,), self.param_dtype)
      y = y + x.astype(dtype) * gamma.astype(dtype)
    return y


def _get_path(tree, name: str):
  node = tree
  for k in name.split("/"):
    if not isinstance(node, Mapping) or k not in node:
      raise ScalesError(f"scales[{name!r}] names no parameter of the params dict")
    node = node[k]
  return node


def _set_path(tree, name: str, value):
  keys = name.split("/")
  node = tree
  for k in keys[:-1]:
    node = node[k]
  node[keys[-1]] = value


def _copy(tree):
  return {k: _copy(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def csla_init_params(params, scales: Mapping[str, CSLAScales], key: jax.Array, *, kernel_init=None,
                     identity: str = "trained"):
  """The Rule of Initialization on a Linen params dict (a new dict; the argument is not modified).

  Every kernel named in `scales` becomes `s W_k + t pad(W_1) + diag(gamma)` with fresh `W_k`, `W_1` from
  `kernel_init` (default Flax's conv default, lecun normal) and `gamma` from `identity_init` (ones when
  absent or with `identity='ones'`); its sibling bias, if any, becomes zero (fresh branch biases start at
  zero, as in `repopt_jax.csla.reinit`).
  """
  kernel_init = kernel_init or nn.linear.default_kernel_init
  scales_tree(params, scales)  # ScalesError naming the path of a mismatch
  out = _copy(params)
  for j, (name, s) in enumerate(scales.items()):
    w = jnp.asarray(_get_path(params, name))
    k1, k2 = jax.random.split(jax.random.fold_in(key, j))
    wk = kernel_init(k1, w.shape, w.dtype)
    w1 = None if s.pointwise is None else kernel_init(k2, (1, 1) + tuple(w.shape[2:]), w.dtype)
    gamma = None
    if s.identity:
      gamma = jnp.ones(w.shape[-1], w.dtype) if identity == "ones" or s.identity_init is None else jnp.asarray(
          s.identity_init, w.dtype)
    kernel, _ = block.merge_arrays(wk, w1, jnp.asarray(s.conv, w.dtype),
                                   None if s.pointwise is None else jnp.asarray(s.pointwise, w.dtype), gamma)
    _set_path(out, name, kernel)
    bias = block.bias_path(name)
    try:
      b = jnp.asarray(_get_path(params, bias)) if bias else None
    except ScalesError:  # no bias beside this kernel
      continue
    if b is not None:
      _set_path(out, bias, jnp.zeros_like(b))
  return out


def merge_params(params, scales: Optional[Mapping[str, CSLAScales]] = None):
  """The plain model's params equal to a Hyper-Search / CSLA model's: each `CSLAConv` block's dict becomes
  `{'kernel': s W_k + t pad(W_1) + diag(gamma), 'bias': s b_k + t b_1}`.

  Args:
    params: the Linen params dict of a model written with `CSLAConv`.
    scales: for mode 'csla' blocks (whose `s`, `t` are not params): `{kernel path: CSLAScales}`.
  """
  out = _copy(params)

  def visit(tree, prefix):
    for k, v in list(tree.items()):
      p = prefix + (k,)
      is_block = isinstance(v, Mapping) and block.CONV in v and block.POINTWISE in v and (
          block.CONV_SCALE in v or (scales and path_str(p + ("kernel",)) in scales))
      if is_block:
        name = path_str(p + ("kernel",))
        if block.CONV_SCALE in v:
          s, t = v[block.CONV_SCALE], v.get(block.POINTWISE_SCALE)
        else:
          s, t = jnp.asarray(scales[name].conv), jnp.asarray(scales[name].pointwise)
        gamma = v.get(block.IDENTITY_PARAM)
        kernel, bias = block.merge_arrays(v[block.CONV]["kernel"], v[block.POINTWISE]["kernel"], s, t, gamma,
                                          v[block.CONV].get("bias"), v[block.POINTWISE].get("bias"))
        tree[k] = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}
      elif isinstance(v, dict):
        visit(v, p)

  visit(out, ())
  return out
