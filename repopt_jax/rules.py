"""The two rules of RepOptimizer (Ding et al., ICLR 2023), for Flax HWIO kernels `(kh, kw, I, O)`.

* Rule of Iteration (eq. 13), `grad_mult`: the constant Grad Mult `M` such that SGD on one kernel `W'` with
  gradient `M * dL/dW'` follows the trajectory of SGD on the branches of a CSLA block.
* Rule of Initialization (eq. 14), `csla_init`: the kernel `W'(0)` equal to the block's initial branches.

Both are written once here; the optimizers in `repopt_jax.optim` and the models call them.

Why the Grad Mult is what it is: a branch k with weights `w_k` and constant scale `s_k` reaches the output
only through `W' = sum_k s_k pad(w_k)`, so `dL/dw_k = s_k dL/dW'` (on its taps) and one SGD step moves `W'`
by `sum_k s_k dw_k = -lr (sum_k s_k^2) dL/dW'`. The sum runs over the branches present at each tap: the
full-size branch everywhere, the 1x1 (and other centred branches) on their taps, and the identity
(multiplier 1, its weight being trained directly) on the centre tap where input channel == output channel.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

from repopt_jax.scales import CSLAScales, ScalesError

Array = jnp.ndarray


def check_kernel(scales: CSLAScales, shape: Sequence[int], where: str = "kernel", allow_bias: bool = True) -> None:
  """Raises `ScalesError` (naming `where`) when `scales` cannot describe a kernel of this shape (or, with
  `allow_bias`, the 1-D bias of such a conv)."""
  if not isinstance(scales, CSLAScales):
    raise ScalesError(f"{where}: expected CSLAScales or None, got {type(scales).__name__}")
  shape = tuple(shape)
  if len(shape) == 1 and allow_bias:  # the bias of a CSLA conv: one value per output channel, every branch's bias summed
    for (bh, bw), s in scales.branches((1, 1)):
      if np.shape(s) != shape:
        raise ScalesError(f"{where}: scale of a branch has shape {np.shape(s)}, expected {shape} for a bias "
                          f"of {shape[0]} output channels")
    return
  if len(shape) != 4:
    raise ScalesError(f"{where}: CSLAScales given for a parameter of shape {shape}; "
                      "it must be a 4-D HWIO conv kernel or its 1-D bias")
  kh, kw, cin, cout = shape
  if kh % 2 == 0 or kw % 2 == 0:
    raise ScalesError(f"{where}: kernel {kh}x{kw} has no centre tap (sizes must be odd)")
  for (bh, bw), s in scales.branches((kh, kw)):
    if np.shape(s) != (cout,):
      raise ScalesError(f"{where}: scale of the {bh}x{bw} branch has shape {np.shape(s)}, "
                        f"expected ({cout},) for a kernel with {cout} output channels")
    if bh > kh or bw > kw:
      raise ScalesError(f"{where}: a {bh}x{bw} branch does not fit a {kh}x{kw} kernel")
  if scales.identity:
    if cout % cin != 0:
      raise ScalesError(f"{where}: identity branch on a kernel {shape} that is not square "
                        f"(C_in == C_out needed; {cin} input channels per group, {cout} outputs)")


def _tap_masks(kernel_hw: Tuple[int, int], branch_hw: Tuple[int, int], dtype) -> Array:
  """`(kh, kw, 1, 1)` 0/1 mask of the taps a centred `branch_hw` branch covers."""
  kh, kw = kernel_hw
  bh, bw = branch_hw
  rows = np.abs(np.arange(kh) - kh // 2) <= bh // 2
  cols = np.abs(np.arange(kw) - kw // 2) <= bw // 2
  return jnp.asarray((rows[:, None] & cols[None, :])[:, :, None, None], dtype)


def _identity_mask(shape: Sequence[int], dtype) -> Array:
  """`(kh, kw, I, O)` 0/1 mask of the identity's taps: the centre, input channel == output channel.

  For a grouped kernel (I = C / groups inputs per group, C_in == C_out) output channel c reads input
  c % I of its own group, which covers groups == 1 (c == i) and depthwise (I == 1) alike.
  """
  kh, kw, cin, cout = shape
  centre = _tap_masks((kh, kw), (1, 1), bool)
  diag = (jnp.arange(cin)[:, None] == (jnp.arange(cout) % cin)[None, :])[None, None]
  return (centre & diag).astype(dtype)


def _per_tap_sum(scales: CSLAScales, shape, dtype, term: Callable[[Array], Array], identity_term) -> Array:
  """`sum_k term(s_k) * taps_k (+ identity_term * identity taps)`, broadcast to `shape` lazily.

  Built from the small scale vectors only; under `jit` XLA fuses the broadcasts into the consumer, so no
  full-size array is ever stored.
  """
  if len(shape) == 1:  # a bias: every branch has one (scaled by its s_k), the identity has none
    total = None
    for _, s in scales.branches((1, 1)):
      part = term(jnp.asarray(s, dtype))
      total = part if total is None else total + part
    return total
  kh, kw = shape[:2]
  total = None
  for bhw, s in scales.branches((kh, kw)):
    part = term(jnp.asarray(s, dtype))[None, None, None, :]
    if tuple(bhw) != (kh, kw):
      part = part * _tap_masks((kh, kw), bhw, dtype)
    total = part if total is None else total + part
  total = jnp.broadcast_to(total, shape)
  if scales.identity:
    total = total + identity_term * _identity_mask(shape, dtype)
  return total


def grad_mult(scales: CSLAScales, kernel_shape: Sequence[int], power: int = 2, dtype=jnp.float32) -> Array:
  """The Grad Mult of the Rule of Iteration (eq. 13) for an HWIO kernel.

  .. math::
    M_{p,q,i,c} = s_c^{\\,power} + [p,q = \\text{centre}]\\,(t_c^{\\,power} + [i = c])
    \\;(+ \\sum_k [p,q \\in \\text{taps}_k]\\, s_{k,c}^{\\,power} \\text{ for extra branches}).

  `power=2` is the SGD rule; `power=1` the mult the paper's code applies to gradients and updates of AdamW.

  Conv biases: when the convs of a block have biases, each branch has its own (`b_k`, `b_1`; the identity
  has none) and the block's output carries `s * b_k + t * b_1`: one bias `b'` of the merged conv. Its
  gradient reaches `b_k` as `s dL/db'` and `b_1` as `t dL/db'`, so SGD on the branches moves `b'` by
  `-lr (s_c^2 + t_c^2) dL/db'`: `kernel_shape = (C_out,)` gives that multiplier (`s^power + t^power`).

  Args:
    scales: the block's `CSLAScales`.
    kernel_shape: `(kh, kw, C_in / groups, C_out)`.
    power: exponent applied to every branch scale (the identity contributes 1 either way).
    dtype: dtype of the result.

  Returns:
    The multiplier, an array of shape `kernel_shape`.

  Example:
    >>> import numpy as np
    >>> s = CSLAScales(conv=np.array([2., 3.]), pointwise=np.array([1., 1.]), identity=True)
    >>> m = grad_mult(s, (3, 3, 2, 2))
    >>> m[0, 0].tolist(), m[1, 1].tolist()
    ([[4.0, 9.0], [4.0, 9.0]], [[6.0, 10.0], [5.0, 11.0]])
  """
  check_kernel(scales, kernel_shape, "grad_mult")
  return _per_tap_sum(scales, tuple(kernel_shape), dtype, lambda s: s ** power, 1.0)


def apply_grad_mult(scales: CSLAScales, grad: Array, power: int = 2) -> Array:
  """`grad * grad_mult(scales, grad.shape, power)`, computed in the gradient's dtype (fused under jit)."""
  return grad * _per_tap_sum(scales, grad.shape, grad.dtype, lambda s: s ** power, 1.0)


def exact_adam_direction(scales: CSLAScales, mu_hat: Array, nu_hat: Array, eps: float,
                         eps_root: float = 0.0) -> Array:
  """The exact AdamW direction for a kernel standing in for a CSLA block.

  Adam on a branch k with weights `w_k` and scale `s_k` sees gradient `s_k g` (g = dL/dW' at the
  tap), so its moments are `s_k m` and `s_k^2 v` exactly, and it moves `w_k` by
  `-lr (s_k m_hat / (|s_k| sqrt(v_hat) + eps) + wd w_k)`. Summed through `W' = sum_k s_k w_k`:

  .. math::
    \\Delta W' = -lr\\Big(\\sum_k \\frac{s_k^2\\, \\hat m}{|s_k|\\sqrt{\\hat v} + \\epsilon} + wd\\, W'\\Big)

  over the branches present at each tap, the identity counting with `s = 1`. So one set of Adam moments
  of `dL/dW'` (the same state as plain Adam) reproduces the multi-branch AdamW to float rounding.

  Args:
    scales: the block's `CSLAScales`.
    mu_hat, nu_hat: bias-corrected first and second moments of the kernel's gradient.
    eps, eps_root: as in `optax.scale_by_adam`.

  Returns:
    The direction (before `-lr` and weight decay), shaped like `mu_hat`.
  """
  root = jnp.sqrt(nu_hat + eps_root)
  if mu_hat.ndim == 1:  # a bias: one term per branch, no identity
    return _per_tap_sum(scales, mu_hat.shape, mu_hat.dtype,
                        lambda s: s * s * mu_hat / (jnp.abs(s) * root + eps), None)
  kh, kw = mu_hat.shape[:2]
  total = None
  for bhw, s in scales.branches((kh, kw)):
    s = jnp.asarray(s, mu_hat.dtype)[None, None, None, :]
    part = s * s * mu_hat / (jnp.abs(s) * root + eps)
    if tuple(bhw) != (kh, kw):
      part = part * _tap_masks((kh, kw), bhw, mu_hat.dtype)
    total = part if total is None else total + part
  if scales.identity:
    total = total + _identity_mask(mu_hat.shape, mu_hat.dtype) * (mu_hat / (root + eps))
  return total


def csla_init(scales: CSLAScales, conv_kernel: Array, pointwise_kernel: Optional[Array] = None,
              identity_scale: Optional[Array] = None, extra_kernels: Sequence[Array] = ()) -> Array:
  """The Rule of Initialization (eq. 14): the one kernel equal to a CSLA block's branches.

  .. math::
    W'(0) = s \\odot W_{full}(0) + \\mathrm{pad}(t \\odot W_{1\\times1}(0)) + \\mathrm{diag}(\\gamma(0))

  with the scales broadcast on the output-channel (last) axis, smaller kernels zero-padded to the centre,
  and `diag(gamma)` on the centre tap where input channel == output channel.

  Args:
    scales: the block's `CSLAScales`.
    conv_kernel: a freshly initialised full-size branch kernel `(kh, kw, I, O)`.
    pointwise_kernel: a freshly initialised 1x1 kernel `(1, 1, I, O)`; required iff `scales.pointwise`.
    identity_scale: the identity weights `gamma(0)`, shape `(O,)`; ones when None (pass
      `scales.identity_init` to use the weights trained by Hyper-Search).
    extra_kernels: kernels of the `scales.extra` branches, in order.

  Returns:
    The equivalent kernel, shaped and typed like `conv_kernel`.

  Example:
    >>> import numpy as np
    >>> s = CSLAScales(conv=np.full(2, 2.), pointwise=np.full(2, 3.), identity=True)
    >>> w = csla_init(s, np.zeros((3, 3, 2, 2)), np.ones((1, 1, 2, 2)))
    >>> w[1, 1].tolist(), float(w[0, 0].sum())
    ([[4.0, 3.0], [3.0, 4.0]], 0.0)
  """
  conv_kernel = jnp.asarray(conv_kernel)
  shape = conv_kernel.shape
  check_kernel(scales, shape, "csla_init")
  dtype = conv_kernel.dtype
  kh, kw = shape[:2]
  branch_kernels = [(scales.pointwise, pointwise_kernel, (1, 1), "pointwise_kernel")]
  if len(extra_kernels) != len(scales.extra):
    raise ScalesError(f"csla_init: {len(scales.extra)} extra branches but {len(extra_kernels)} extra kernels")
  branch_kernels += [(s, k, hw, f"extra_kernels[{j}]")
                     for j, ((hw, s), k) in enumerate(zip(scales.extra, extra_kernels))]
  out = conv_kernel * jnp.asarray(scales.conv, dtype)
  for s, k, (bh, bw), name in branch_kernels:
    if (s is None) != (k is None):
      raise ScalesError(f"csla_init: {name} {'missing' if k is None else 'given'} "
                        f"but the scales {'have' if s is not None else 'have no'} such branch")
    if s is None:
      continue
    k = jnp.asarray(k, dtype)
    if k.shape != (bh, bw) + shape[2:]:
      raise ScalesError(f"csla_init: {name} has shape {k.shape}, expected {(bh, bw) + tuple(shape[2:])}")
    top, left = (kh - bh) // 2, (kw - bw) // 2
    out = out.at[top:top + bh, left:left + bw].add(k * jnp.asarray(s, dtype))
  if scales.identity:
    gamma = jnp.ones(shape[-1], dtype) if identity_scale is None else jnp.asarray(identity_scale, dtype)
    if gamma.shape != (shape[-1],):
      raise ScalesError(f"csla_init: identity_scale has shape {gamma.shape}, expected ({shape[-1]},)")
    out = out + _identity_mask(shape, dtype) * gamma
  elif identity_scale is not None:
    raise ScalesError("csla_init: identity_scale given but the scales have no identity branch")
  return out


def csla_bias(scales: CSLAScales, conv_bias: Array, pointwise_bias: Optional[Array] = None,
              extra_biases: Sequence[Array] = ()) -> Array:
  """The Rule of Initialization for the bias of a CSLA conv: `b' = s * b_full + t * b_1x1 (+ sum_k s_k b_k)`.

  Each branch conv has its own bias, scaled by its branch scale like its output; the identity has none.
  A missing branch bias counts as zero.

  Example:
    >>> import numpy as np
    >>> s = CSLAScales(conv=np.array([2.]), pointwise=np.array([3.]))
    >>> csla_bias(s, np.array([1.]), np.array([1.])).tolist()
    [5.0]
  """
  conv_bias = jnp.asarray(conv_bias)
  dtype = conv_bias.dtype
  check_kernel(scales, conv_bias.shape, "csla_bias")
  out = conv_bias * jnp.asarray(scales.conv, dtype)
  if pointwise_bias is not None and scales.pointwise is not None:
    out = out + jnp.asarray(pointwise_bias, dtype) * jnp.asarray(scales.pointwise, dtype)
  for ((_, s), b) in zip(scales.extra, extra_biases):
    out = out + jnp.asarray(b, dtype) * jnp.asarray(s, dtype)
  return out
