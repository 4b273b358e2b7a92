"""RepOpt-VGG between models, scales and optimizers: a thin layer over the generic `repopt_jax.csla`.

The official block names (`'stage1.0'`, used by the official scale files and the `.npz` files of VGG runs)
map to kernel paths (`kernel_path('stage1.0') == 'stage1/0/conv/kernel'`); scales trees, the weight-decay
mask and the Rule of Initialization's merge are `repopt_jax.csla`'s, the same for every model.

* `scales_from_hs`: the constants `{block: CSLAScales}` of a trained Hyper-Search (or csla) model.
* `check_scales`: does a scales dict belong to this architecture? (`ScalesError` naming the block.)
* `scales_tree`: the tree `repopt_sgd` / `repopt_adamw` take for a target model.
* `reinit_target` / `target_from_csla`: the Rule of Initialization on a target model.
* `weight_decay_mask`: which parameters decay, as in the official code.
* `fuse_repvgg`: structural re-parameterization of a trained RepVGG model into a target-mode model.

The trees returned for a model (`scales_tree`, `weight_decay_mask`) are `nnx.State`s with the structure of
`nnx.state(model, nnx.Param)`: they can be handed to Optax transforms used through
`nnx.Optimizer(model, tx, wrt=nnx.Param)` or on `nnx.state(model, nnx.Param)` directly (`.to_pure_dict()`
gives the plain nested dict for code that works on dicts).
"""

from __future__ import annotations

from typing import Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from repopt_jax.models import blocks as blocks_lib
from repopt_jax.models.vgg import ARCHS, ModelError, RepOptVGG, VGGConfig, check_scales_for, get_arch
from repopt_jax import block, csla
from repopt_jax.rules import check_kernel
from repopt_jax.scales import CSLAScales, ScalesError

IDENTITY_INITS = ("trained", "ones")


def _require(model, modes, fn: str) -> None:
  if not isinstance(model, RepOptVGG):
    raise ModelError(f"{fn}: expected a RepOptVGG model, got {type(model).__name__}")
  if model.mode not in modes:
    raise ModelError(f"{fn}: needs a model in mode {' or '.join(map(repr, modes))}, got mode {model.mode!r}")


def _host(x) -> np.ndarray:
  return np.asarray(jax.device_get(x[...] if isinstance(x, nnx.Variable) else x))


def scales_from_hs(hs_model: RepOptVGG) -> dict:
  """The constant scales found by Hyper-Search: `{block_name: CSLAScales}` with the trained `gamma`.

  Each block gives `CSLAScales(conv=s, pointwise=t, identity=has_identity, identity_init=gamma)` with the
  model's current values (the trained `gamma` is what the Rule of Initialization uses by default). A 'csla'
  model is accepted too (its constant `s`, `t` and current `gamma`).

  Args:
    hs_model: a `RepOptVGG` in mode 'hs' (or 'csla').

  Returns:
    A dict in block order, ready for `save_scales`, `scales_tree`, `reinit_target` or a 'csla' model.

  Example:
    >>> hs = RepOptVGG('tiny', 'hs', num_classes=10, rngs=nnx.Rngs(0))
    >>> scales = scales_from_hs(hs)
    >>> scales['stage2.1'], round(float(scales['stage2.1'].conv[0]) ** 2, 4)  # sqrt(2): 2nd block of a stage
    (CSLAScales(conv[16], pointwise, identity(trained)), 2.0)
  """
  _require(hs_model, ("hs", "csla"), "scales_from_hs")
  out = {}
  for spec, blk in hs_model.named_blocks():
    out[spec.name] = CSLAScales(
        conv=_host(blk.scale_conv), pointwise=_host(blk.scale_1x1), identity=spec.has_identity,
        identity_init=_host(blk.scale_identity) if spec.has_identity else None)
  return out


def check_scales(arch_or_model: Union[str, VGGConfig, RepOptVGG], scales: Mapping[str, CSLAScales]) -> None:
  """Raises `ScalesError` naming the block when `scales` does not fit the RepOpt-VGG architecture.

  Every block must be present with the right width, a 1x1 scale, no other branches, and an identity
  branch exactly where the architecture has one; no entry may name a block the architecture lacks. (Any
  architecture, VGG or not: `registry.check_scales`.)

  Args:
    arch_or_model: a name in `ARCHS`, a `VGGConfig`, or a `RepOptVGG` model (any mode).
    scales: `{block_name: CSLAScales}`.

  Example:
    >>> check_scales('B2', load_torch_scales('RepOpt-VGG-B1-scales.pth'))  # doctest: +SKIP
    ScalesError: scales['stage1.0']: 128 channels, but block stage1.0 of B2 has 160 (...)
  """
  if isinstance(arch_or_model, RepOptVGG):
    check_scales_for(arch_or_model.config, scales, arch_or_model.in_channels)
  else:
    check_scales_for(get_arch(arch_or_model), scales)  # ModelError listing the sizes for another name


def kernel_path(block_name: str) -> str:
  """The kernel path (`repopt_jax.paths`) of an official block name: `'stage1.0'` -> `'stage1/0/conv/kernel'`.

  RepOpt-VGG's official block names are a thin mapping over the generic `repopt_jax.csla` machinery, which
  keys scales by kernel paths; the official scale files and `.npz` files of VGG runs keep the block names.
  """
  return "/".join(block_name.split(".")) + "/conv/kernel"


def block_name(kernel_path_: str) -> str:
  """The inverse of `kernel_path`: `'stage1/0/conv/kernel'` -> `'stage1.0'`."""
  head = kernel_path_[: -len("/conv/kernel")] if kernel_path_.endswith("/conv/kernel") else kernel_path_
  return head.replace("/", ".")


def to_kernel_paths(scales: Mapping[str, CSLAScales]) -> dict:
  """`{block_name: CSLAScales}` -> `{kernel path: CSLAScales}` for the `repopt_jax.csla` functions."""
  return {kernel_path(k): v for k, v in scales.items()}


def scales_tree(target_model: RepOptVGG, scales: Mapping[str, CSLAScales]):
  """The scales tree of a target model for `repopt_sgd` / `repopt_adamw` / `repopt_masks`.

  `repopt_jax.csla.scales_tree` with the official block names mapped to kernel paths (`kernel_path`).

  Args:
    target_model: a `RepOptVGG` in mode 'target' (an `nnx.eval_shape` one is fine).
    scales: `{block_name: CSLAScales}` for its architecture (checked with `check_scales`).

  Returns:
    An `nnx.State` shaped like `nnx.state(target_model, nnx.Param)` with `scales[block]` on each block's
    `conv/kernel` and None on every other parameter (BatchNorm, head).

  Example:
    >>> target = RepOptVGG('tiny', 'target', num_classes=10, rngs=nnx.Rngs(0))
    >>> tree = scales_tree(target, scales_from_hs(RepOptVGG('tiny', 'hs', num_classes=10)))
    >>> tree['stage1'][0]['conv']['kernel'], tree['stage1'][0]['bn']['scale']
    (CSLAScales(conv[8], pointwise), None)
  """
  _require(target_model, ("target",), "scales_tree")
  check_scales(target_model, scales)
  return csla.scales_tree(target_model, to_kernel_paths(scales))


def weight_decay_mask(model: RepOptVGG):
  """Which parameters get weight decay, as in the official code: `True` on every parameter with more than
  one dimension (conv kernels, 1x1 kernels, the head's kernel) and on the identity weights `gamma`
  (`scale_identity`, csla and hs modes); `False` on BatchNorm scales and biases, the head's bias, and hs's
  trainable `s`, `t` (1-D).

  This is exact for RepOptimizer: decaying every branch of a CSLA block decays their sum, the target's
  kernel. (The official `set_weight_decay` matches names on the substring 'identity.weight', so in its
  RepVGG baseline it also decays `bn_identity`'s scale; here BatchNorm parameters never decay.)

  Args:
    model: a `RepOptVGG` in any mode.

  Returns:
    An `nnx.State` of bools shaped like `nnx.state(model, nnx.Param)`, for
    `optax.add_decayed_weights(wd, mask)` or `repopt_sgd(..., weight_decay_mask=mask)`.
  """
  if not isinstance(model, nnx.Module):
    raise ModelError(f"weight_decay_mask: expected an NNX model, got {type(model).__name__}")
  return csla.weight_decay_mask(model)  # the same rule for every model


def _merged_kernels(model: RepOptVGG, scales, branches, gammas, fn: str) -> list:
  """The Rule of Initialization for every block: `[csla_init(scales[b], k3_b, k1_b, gamma_b) for b in blocks]`,
  through the one merge of every model (`repopt_jax.block.merge_arrays`). `branches[b] = (k3, k1)`; `gammas[b]` is gamma(0) (ignored
  without identity; None means ones)."""
  out = []
  for spec in model.block_specs:
    s, (k3, k1) = scales[spec.name], branches[spec.name]
    want3, want1 = (3, 3, spec.in_channels, spec.out_channels), (1, 1, spec.in_channels, spec.out_channels)
    if np.shape(k3) != want3 or np.shape(k1) != want1:
      raise ScalesError(f"{fn}: block {spec.name!r}: branch kernels of shapes {np.shape(k3)}, {np.shape(k1)}; "
                        f"expected {want3}, {want1}")
    check_kernel(s, want3, f"{fn}: block {spec.name!r}")
    dtype = jnp.asarray(k3).dtype
    gamma = gammas.get(spec.name)
    gamma = jnp.asarray(np.ones(spec.out_channels) if gamma is None else gamma, dtype) if s.identity else None
    out.append(block.merge_arrays(jnp.asarray(k3), jnp.asarray(k1, dtype), jnp.asarray(s.conv, dtype),
                                  jnp.asarray(s.pointwise, dtype), gamma)[0])
  return out


def _as_rngs(rngs) -> Optional[nnx.Rngs]:
  if rngs is None or isinstance(rngs, nnx.Rngs):
    return rngs
  return nnx.Rngs(rngs)


def reinit_target(target_model: RepOptVGG, scales: Mapping[str, CSLAScales], rngs=None,
                  identity: str = "trained",
                  branch_kernels: Optional[Mapping[str, Tuple[jax.Array, jax.Array]]] = None) -> None:
  """The Rule of Initialization (eq. 14) on every block of a target model, in place.

  .. math::
    W'(0) = s \\odot W_{3\\times3}(0) + t \\odot \\mathrm{pad}(W_{1\\times1}(0)) + \\mathrm{diag}(\\gamma(0))

  with fresh branch kernels drawn with the initialiser the csla model uses (`blocks.conv_kernel_init`), or
  the given `branch_kernels`. Only the blocks' conv kernels change; BatchNorm and the head keep their
  (initial) values, as in the official code.

  Args:
    target_model: a `RepOptVGG` in mode 'target', freshly built.
    scales: `{block_name: CSLAScales}` for its architecture.
    rngs: `nnx.Rngs` (or an int seed) for the fresh kernels; needed unless `branch_kernels` covers every
      block.
    identity: 'trained' (gamma(0) = `scales[b].identity_init`, the HS-trained values; ones where the scales
      carry none) or 'ones'.
    branch_kernels: optional `{block_name: (conv3x3_kernel, conv1x1_kernel)}` (HWIO) to use instead of
      fresh ones, e.g. a csla model's, so both start from the same branches.

  Example:
    >>> target = RepOptVGG('tiny', 'target', num_classes=10)
    >>> scales = scales_from_hs(RepOptVGG('tiny', 'hs', num_classes=10))
    >>> reinit_target(target, scales, nnx.Rngs(1))
  """
  _require(target_model, ("target",), "reinit_target")
  check_scales(target_model, scales)
  if identity not in IDENTITY_INITS:
    raise ModelError(f"reinit_target: unknown identity={identity!r}; valid: {', '.join(IDENTITY_INITS)}")
  rngs = _as_rngs(rngs)
  branch_kernels = dict(branch_kernels or {})
  unknown = [k for k in branch_kernels if k not in scales]
  if unknown:
    raise ModelError(f"reinit_target: branch_kernels has entry {unknown[0]!r}, not a block of "
                     f"{target_model.config.name}")
  branches, fresh = {}, []
  for spec in target_model.block_specs:
    if spec.name in branch_kernels:
      branches[spec.name] = tuple(branch_kernels[spec.name])
    elif rngs is None:
      raise ModelError(f"reinit_target: no rngs to draw fresh branch kernels for block {spec.name!r} "
                       "(pass rngs, or branch_kernels for every block)")
    else:
      fresh.append(spec)
  dtype = target_model.stage0.conv.kernel[...].dtype
  for sp in fresh:  # drawn as the csla model draws its branches (PyTorch's default conv init)
    branches[sp.name] = (blocks_lib.conv_kernel_init(rngs.params(), (3, 3, sp.in_channels, sp.out_channels), dtype),
                         blocks_lib.conv_kernel_init(rngs.params(), (1, 1, sp.in_channels, sp.out_channels), dtype))
  gammas = {name: s.identity_init for name, s in scales.items()} if identity == "trained" else {}
  kernels = _merged_kernels(target_model, scales, branches, gammas, "reinit_target")
  for (_, blk), kernel in zip(target_model.named_blocks(), kernels):
    blk.conv.kernel[...] = kernel


def _empty_like(model: RepOptVGG, mode: str) -> RepOptVGG:
  """An abstract (`nnx.eval_shape`) model of the same size in `mode`, to be filled in completely."""
  return nnx.eval_shape(lambda: RepOptVGG(model.config, mode, num_classes=model.num_classes,
                                          in_channels=model.in_channels, dtype=model.dtype,
                                          param_dtype=model.param_dtype, conv_impl=model.conv_impl,
                                          rngs=nnx.Rngs(0)))


def _finish(target: RepOptVGG, source: RepOptVGG, fn: str) -> RepOptVGG:
  nnx.update(target.linear, nnx.state(source.linear))
  missing = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_flatten_with_path(
      nnx.as_pure(nnx.state(target)))[0] if isinstance(v, jax.ShapeDtypeStruct)]
  if missing:  # a bug here, never a user error: every variable must have been written
    raise RuntimeError(f"{fn}: variables left unset: {missing[:3]}")
  target.set_attributes(use_running_average=source.stage0.bn.use_running_average, raise_if_not_found=False)
  return target


def target_from_csla(model: RepOptVGG) -> RepOptVGG:
  """The target-mode model computing the same function as a csla (or hs) model, now and when trained.

  Every block's kernel is `csla_init` of the model's current branches (`s`, `t`, `gamma`, 3x3 and 1x1
  kernels); BatchNorm (parameters and running statistics) and the head are copied. Applied to a freshly
  built csla model this is the Rule of Initialization with the csla model's own branch kernels: train the
  csla model with SGD and the result with `repopt_sgd`, and the two stay equal.

  Args:
    model: a `RepOptVGG` in mode 'csla' or 'hs'.

  Returns:
    A new `RepOptVGG` in mode 'target' (same size, classes, dtypes, and train/eval setting).
  """
  _require(model, ("csla", "hs"), "target_from_csla")
  scales = scales_from_hs(model)
  target = _empty_like(model, "target")
  branches = {spec.name: (blk.conv.kernel[...], blk.conv_1x1.kernel[...]) for spec, blk in model.named_blocks()}
  gammas = {name: s.identity_init for name, s in scales.items()}
  kernels = _merged_kernels(model, scales, branches, gammas, "target_from_csla")
  for (_, src), (_, dst), kernel in zip(model.named_blocks(), target.named_blocks(), kernels):
    dst.conv.kernel.set_value(kernel)
    nnx.update(dst.bn, nnx.state(src.bn))
  return _finish(target, model, "target_from_csla")


def _bn_affine(bn: nnx.BatchNorm) -> Tuple[np.ndarray, np.ndarray]:
  """`(a, c)` with `bn(z) = a * z + c` in eval mode, in float64."""
  inv = _host(bn.scale).astype(np.float64) / np.sqrt(_host(bn.var).astype(np.float64) + bn.epsilon)
  return inv, _host(bn.bias).astype(np.float64) - _host(bn.mean).astype(np.float64) * inv


def _unit_variance(dtype, eps: float):
  """A variance `v` of `dtype` with `v + eps == 1` exactly in `dtype`, so `rsqrt(v + eps) == 1`."""
  one, e = np.asarray(1, dtype), np.asarray(eps, dtype)
  v = np.asarray(1 - eps, dtype)
  try:
    for _ in range(16):
      t = v + e
      if t == one:
        return v
      v = np.nextafter(v, np.asarray(-np.inf if t > one else np.inf, dtype)).astype(dtype)
  except TypeError:  # dtypes numpy cannot step through (bfloat16): 1 - eps is the best there is
    pass
  return np.asarray(1 - eps, dtype)


def fuse_repvgg(repvgg_model: RepOptVGG) -> RepOptVGG:
  """Structural re-parameterization: a trained RepVGG model as a target-mode model, equal in eval mode.

  Each branch `BN_k(conv_k(x))` is, with BatchNorm's running statistics, `a_k * conv_k(x) + c_k` with
  `a_k = scale_k / sqrt(var_k + eps)` and `c_k = bias_k - mean_k a_k`. The 1x1 kernel is zero-padded to
  3x3 and the identity is the 3x3 kernel with `1` on the centre tap where input == output channel, so

  .. math::
    W = \\sum_k a_k W_k, \\qquad b = \\sum_k c_k

  (summed in float64, then cast to the parameter dtype). The target block is `BN(conv(x))` with no conv
  bias, so `b` goes into its BatchNorm, set to be exactly `z + b` in eval mode: `scale = 1`, `bias = b`,
  `mean = 0` and `var = v` with `v + eps == 1` exactly in the parameter dtype (`v` is `1 - eps` rounded,
  nudged by an ulp if needed), so `rsqrt(var + eps) == 1` and no rounding is added. In train mode the
  result normalises by batch statistics like any target model (a fine-tuning start, not the same function).

  Args:
    repvgg_model: a `RepOptVGG` in mode 'repvgg'.

  Returns:
    A new `RepOptVGG` in mode 'target' (same size, classes, dtypes, and train/eval setting).

  Example:
    >>> rep = RepOptVGG('tiny', 'repvgg', num_classes=10)  # ... trained ...
    >>> deployed = fuse_repvgg(rep)
    >>> bn = deployed.stage2[1].bn
    >>> deployed.mode, sorted(vars(rep.stage2[1]).keys() & {'conv_1x1', 'bn_identity'}), float(bn.var[0] + bn.epsilon)
    ('target', ['bn_identity', 'conv_1x1'], 1.0)
  """
  _require(repvgg_model, ("repvgg",), "fuse_repvgg")
  target = _empty_like(repvgg_model, "target")
  for (spec, src), (_, dst) in zip(repvgg_model.named_blocks(), target.named_blocks()):
    dtype = dst.conv.kernel.dtype
    a3, c3 = _bn_affine(src.bn)
    a1, c1 = _bn_affine(src.bn_1x1)
    kernel = _host(src.conv.kernel).astype(np.float64) * a3
    kernel[1:2, 1:2] += _host(src.conv_1x1.kernel).astype(np.float64) * a1
    bias = c3 + c1
    if spec.has_identity:
      ai, ci = _bn_affine(src.bn_identity)
      idx = np.arange(spec.out_channels)
      kernel[1, 1, idx, idx] += ai
      bias = bias + ci
    eps = dst.bn.epsilon
    dst.conv.kernel.set_value(jnp.asarray(kernel.astype(dtype)))
    dst.bn.scale.set_value(jnp.ones(spec.out_channels, dst.bn.scale.dtype))
    dst.bn.bias.set_value(jnp.asarray(bias.astype(dst.bn.bias.dtype)))
    dst.bn.mean.set_value(jnp.zeros(spec.out_channels, dst.bn.mean.dtype))
    dst.bn.var.set_value(jnp.full(spec.out_channels, _unit_variance(np.dtype(dst.bn.var.dtype), eps)))
  return _finish(target, repvgg_model, "fuse_repvgg")


def fold_batchnorm(target_model: RepOptVGG) -> RepOptVGG:
  """A target model with every BatchNorm folded into its conv kernel: the deployed form, equal in eval mode.

  Each block's eval-mode `BN(conv(x)) = a * conv(x) + c` becomes the kernel `a * W` (per output channel)
  and a BatchNorm that is exactly `z + c` (scale 1, mean 0, unit variance as in `fuse_repvgg`). What a
  quantizer sees then is the kernel an inference engine runs. (Added by the experiments engineer for INT8
  post-training quantization, `repopt_jax.quant`.)

  Args:
    target_model: a `RepOptVGG` in mode 'target' (e.g. trained by a RepOptimizer, or `fuse_repvgg`'s output,
      for which folding changes nothing).

  Returns:
    A new `RepOptVGG` in mode 'target' (same size, classes, dtypes, and train/eval setting).
  """
  _require(target_model, ("target",), "fold_batchnorm")
  target = _empty_like(target_model, "target")
  for (spec, src), (_, dst) in zip(target_model.named_blocks(), target.named_blocks()):
    dtype = dst.conv.kernel.dtype
    a, c = _bn_affine(src.bn)
    dst.conv.kernel.set_value(jnp.asarray((_host(src.conv.kernel).astype(np.float64) * a).astype(dtype)))
    dst.bn.scale.set_value(jnp.ones(spec.out_channels, dst.bn.scale.dtype))
    dst.bn.bias.set_value(jnp.asarray(c.astype(dst.bn.bias.dtype)))
    dst.bn.mean.set_value(jnp.zeros(spec.out_channels, dst.bn.mean.dtype))
    dst.bn.var.set_value(jnp.full(spec.out_channels, _unit_variance(np.dtype(dst.bn.var.dtype), dst.bn.epsilon)))
  return _finish(target, target_model, "fold_batchnorm")
