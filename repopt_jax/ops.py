"""Convolution formulations that XLA's CPU backend runs faster than its own convolution, exact to rounding.

`conv_general_dilated` is a drop-in for `jax.lax.conv_general_dilated` (the `conv_general_dilated=` argument
of `nnx.Conv`): for NHWC/HWIO convolutions with a small output (at most `SMALL_SPATIAL` pixels per image,
e.g. the 8x8x256 and 4x4x512 stages of RepOpt-VGG-B1 at 64 px, or a 224 px model's last stages) on CPU it
computes the convolution as im2col + one matrix product (`conv_im2col`); everything else goes to
`lax.conv_general_dilated` unchanged (GPU/TPU always do). Its `conv_impl` argument ('auto', 'lax',
'im2col') pins the formulation; `conv_function(conv_impl)` is the function a model's convs hold, chosen when
the model is built (the models' `conv_impl` argument, the config key `model.conv_impl`, `--conv` on the
command line).

Why: XLA's CPU convolutions are tuned for large images; at a few pixels per image they are far from the
machine's matrix-product speed, and in the RepOpt-VGG-B1 train step at 64 px the input gradient of the
4x4x512 convolutions alone took more time than everything else (experiments/profile_step.py), while a matrix
product of the same size runs at the machine's peak. Measured thresholds (forward + both gradients, batch 8):
4x4 and 8x8 outputs are faster as im2col + dot, 16x16 and larger are faster as XLA's convolution. The
gradients are JAX's autodiff of the formulation: the weight gradient is `patches^T @ g` (one matrix product),
the input gradient `g @ W^T` followed by the transpose of the patch extraction (pads and adds).

Exactness: the same products summed in a different order, so results agree with `lax.conv_general_dilated`
to the rounding of the dtype (tests/test_conv_impl.py: float32 and float64, forward and gradients). The
kernel keeps its HWIO shape: parameters, Grad Mult masks and re-parameterization are unaffected.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["conv_im2col", "conv_general_dilated", "conv_function", "check_conv_impl", "SMALL_SPATIAL",
           "CONV_IMPLS"]

# Largest output height x width (per image) that `conv_general_dilated` computes as im2col + dot on CPU.
SMALL_SPATIAL = 64
# 'auto': im2col where it is faster (see above); 'lax': always XLA's convolution; 'im2col': im2col for every
# eligible convolution whatever its size and backend. A model's choice is fixed when it is built (the
# `conv_impl` argument of the models, the config key `model.conv_impl`); nothing here is process-wide.
CONV_IMPLS = ("auto", "lax", "im2col")


def check_conv_impl(conv_impl: str, where: str = "conv_impl") -> str:
  """`conv_impl` itself when it is one of `CONV_IMPLS`; `ValueError` naming `where` otherwise."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"{where}={conv_impl!r} is not a convolution implementation; valid: {', '.join(CONV_IMPLS)}")
  return conv_impl


_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # lhs, rhs, out specs of NHWC / HWIO / NHWC


def _resolve_padding(padding, in_hw: Sequence[int], k_hw: Sequence[int], strides: Sequence[int]):
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(tuple(in_hw), tuple(k_hw), tuple(strides), padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv_im2col(x: jax.Array, w: jax.Array, strides: Sequence[int] = (1, 1),
                padding: Union[str, Sequence[Tuple[int, int]]] = "SAME", feature_group_count: int = 1,
                precision=None, preferred_element_type=None) -> jax.Array:
  """A 2-D NHWC x HWIO convolution as patch extraction + a matrix product (no dilation).

  Args:
    x: `(N, H, W, C_in)` input.
    w: `(kh, kw, C_in / groups, C_out)` kernel.
    strides: `(sh, sw)`.
    padding: 'SAME', 'VALID' or `((top, bottom), (left, right))` (negative values crop).
    feature_group_count: groups (C_in for a depthwise convolution).
    precision, preferred_element_type: as for `lax.dot_general`.

  Returns:
    `(N, H_out, W_out, C_out)`, equal to `lax.conv_general_dilated(x, w, strides, padding,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=...)` up to rounding.
  """
  n, h, wd, c = x.shape
  kh, kw, cig, co = w.shape
  g = int(feature_group_count)
  if c != cig * g or co % g:
    raise ValueError(f"conv_im2col: input channels {c} / kernel {w.shape} do not match {g} groups")
  sh, sw = (int(s) for s in strides)
  (pt, pb), (pl, pr) = _resolve_padding(padding, (h, wd), (kh, kw), (sh, sw))
  xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
  hp, wp = h + pt + pb, wd + pl + pr
  ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
  if ho <= 0 or wo <= 0:
    raise ValueError(f"conv_im2col: empty output for input {x.shape}, kernel {w.shape}, padding {padding}")
  taps = [lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]
  k = kh * kw
  kwargs = dict(precision=precision, preferred_element_type=preferred_element_type)
  if g == 1:
    patches = taps[0] if k == 1 else jnp.concatenate(taps, axis=-1)  # (N, Ho, Wo, k * C_in), tap-major
    return lax.dot_general(patches, w.reshape(k * cig, co), (((3,), (0,)), ((), ())), **kwargs)
  cog = co // g
  patches = jnp.stack(taps, axis=3).reshape(n, ho, wo, k, g, cig)
  wg = w.reshape(k, cig, g, cog)
  # Batch over groups: (g, N, Ho, Wo, cog) -> (N, Ho, Wo, g * cog), output channel o in group o // cog.
  y = lax.dot_general(patches, wg, (((3, 5), (0, 1)), ((4,), (2,))), **kwargs)
  return jnp.moveaxis(y, 0, 3).reshape(n, ho, wo, co)


def _is_nhwc(lhs_shape, rhs_shape, dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  try:
    dn = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
  except (TypeError, ValueError):
    return False
  return (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == _NHWC


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None, conv_impl: str = "auto", **kwargs):
  """`lax.conv_general_dilated`, computed by `conv_im2col` where that is faster (see the module docstring).

  With `conv_impl='auto'`, im2col is used only for 2-D NHWC/HWIO convolutions without dilation, one feature
  group, on the CPU backend, with an output of at most `SMALL_SPATIAL` pixels per image; `'im2col'` drops
  the backend and size conditions, `'lax'` never uses it. Otherwise (and for any extra keyword, e.g.
  `out_sharding`, that is not None) this is `lax.conv_general_dilated` itself.

  Example:
    >>> x, k = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 3))
    >>> dn = ('NHWC', 'HWIO', 'NHWC')
    >>> y = conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn, conv_impl='im2col')
    >>> ref = lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
    >>> y.shape, bool(jnp.allclose(y, ref))
    ((1, 4, 4, 3), True)
  """
  mode = check_conv_impl(conv_impl)
  extra = {k: v for k, v in kwargs.items() if v is not None}
  use = (mode != "lax" and not extra and lhs.ndim == 4 and batch_group_count == 1 and feature_group_count == 1
         and all(int(d) == 1 for d in (lhs_dilation or (1, 1)))
         and all(int(d) == 1 for d in (rhs_dilation or (1, 1)))
         and _is_nhwc(lhs.shape, rhs.shape, dimension_numbers)
         and (mode == "im2col" or jax.default_backend() == "cpu"))
  if use:
    kh, kw = rhs.shape[:2]
    pads = _resolve_padding(padding, lhs.shape[1:3], (kh, kw), window_strides)
    ho = (lhs.shape[1] + sum(pads[0]) - kh) // int(window_strides[0]) + 1
    wo = (lhs.shape[2] + sum(pads[1]) - kw) // int(window_strides[1]) + 1
    use = 0 < ho * wo and (mode == "im2col" or ho * wo <= SMALL_SPATIAL)
  if use:
    return conv_im2col(lhs, rhs, window_strides, pads, precision=precision,
                       preferred_element_type=preferred_element_type)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                  rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                  feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                                  precision=precision, preferred_element_type=preferred_element_type, **kwargs)


# One function object per implementation: `nnx.Conv` keeps its `conv_general_dilated` in the graph definition,
# so models built with the same choice keep equal (and hashable) graph definitions. 'auto' is the plain
# function, as models have always held.
_CONV_FUNCTIONS = {"auto": conv_general_dilated,
                   **{m: functools.partial(conv_general_dilated, conv_impl=m) for m in CONV_IMPLS if m != "auto"}}


def conv_function(conv_impl: str = "auto") -> Callable:
  """The `conv_general_dilated=` argument of `nnx.Conv` for an implementation ('auto', 'lax' or 'im2col').

  Example:
    >>> from flax import nnx
    >>> conv = nnx.Conv(2, 3, (3, 3), conv_general_dilated=conv_function('lax'), rngs=nnx.Rngs(0))
    >>> conv(jnp.ones((1, 4, 4, 2))).shape
    (1, 4, 4, 3)
  """
  return _CONV_FUNCTIONS[check_conv_impl(conv_impl)]
