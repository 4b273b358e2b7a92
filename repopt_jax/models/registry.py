"""Every architecture a config can name (`model.arch`), VGG or not, and how to build it in each mode.

RepOpt-VGG sizes (`vgg.ARCHS`) are built by `RepOptVGG` in its four modes. Every other architecture is a
plain NNX model (`GENERIC_ARCHS`), re-parameterized by the generic `repopt_jax.csla` machinery: mode
'target' is the plain model (Rule of Initialization from the scales by `csla.reinit`), 'hs' its
`csla.hyper_search_model`, 'csla' its `csla.csla_model`.

Which of the two families an architecture is (`family`) is decided here and nowhere else. It fixes how its
scales are keyed: RepOpt-VGG by the official block names (`'stage1.0'`, the official files), every other
model by kernel paths (`'layer1/0/conv1/kernel'`). `kernel_scales` maps either to kernel paths, and
`check_scales` checks them against a model's shapes, so that the rest of a run works on kernel paths alone.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, Optional

import jax.numpy as jnp
from flax import nnx

from repopt_jax import csla
from repopt_jax.models import blocks as blocks_lib
from repopt_jax.models import ghostnet
from repopt_jax.models.reparam import kernel_path, scales_from_hs
from repopt_jax.models.resnet import resnet18_cifar
from repopt_jax.models.vgg import ARCHS, ModelError, RepOptVGG, VGGConfig, check_scales_for, get_arch
from repopt_jax.scales import CSLAScales, ScalesError

# name -> builder(num_classes=, in_channels=, dtype=, param_dtype=, rngs=[, conv_impl=]) of the plain model.
GENERIC_ARCHS: Dict[str, Callable[..., nnx.Module]] = {
    "resnet18_cifar": resnet18_cifar,
    "resnet18_cifar_tiny": lambda **kw: resnet18_cifar(width=8, **kw),
    **{f"repopt_ghostnet_{w}": (lambda w: lambda **kw: ghostnet.RepOptGhostNet(w, **kw))(w) for w in ghostnet.WIDTHS},
}
# Architectures whose Hyper-Search model is not the default surgery (RepOpt-GhostNet: depthwise cheap convs
# only, no 1x1 branch, the official init): name -> hs(model, rngs=) .
GENERIC_HS: Dict[str, Callable[..., nnx.Module]] = {
    f"repopt_ghostnet_{w}": ghostnet.hyper_search for w in ghostnet.WIDTHS}
GENERIC_MODES = ("target", "csla", "hs")
FAMILIES = ("vgg", "generic")


def register_arch(name: str, builder: Callable[..., nnx.Module]) -> None:
  """Makes `builder(num_classes=, in_channels=, dtype=, param_dtype=, rngs=)` a `model.arch` name (a builder
  that also takes `conv_impl=` gets the run's choice; one that does not is built only with 'auto')."""
  if name in ARCHS:
    raise ModelError(f"register_arch: {name!r} is a RepOpt-VGG size")
  GENERIC_ARCHS[name] = builder


def available_archs() -> List[str]:
  """Every name `model.arch` accepts: the RepOpt-VGG sizes, then the other architectures."""
  return list(ARCHS) + list(GENERIC_ARCHS)


def family(arch) -> str:
  """'vgg' for a RepOpt-VGG size (a name in `ARCHS` or a `VGGConfig`), 'generic' for any other registered
  architecture; `ModelError` listing the names otherwise.

  Example:
    >>> family('B1'), family('resnet18_cifar')
    ('vgg', 'generic')
  """
  if isinstance(arch, VGGConfig) or (isinstance(arch, str) and arch in ARCHS):
    return "vgg"
  if isinstance(arch, str) and arch in GENERIC_ARCHS:
    return "generic"
  raise ModelError(f"unknown architecture {arch!r}; known: {', '.join(available_archs())}")


def kernel_scales(arch, scales: Mapping[str, CSLAScales], in_channels: int = 3) -> Dict[str, CSLAScales]:
  """`scales` keyed by kernel paths: RepOpt-VGG's block names mapped (`reparam.kernel_path`, in the model's
  block order, whatever the order of the file), any other model's keys as they are.

  Raises:
    ScalesError: scales that do not fit a RepOpt-VGG architecture (naming the block), or not a dict.
  """
  if not isinstance(scales, Mapping):
    raise ScalesError(f"scales: expected a dict {{name: CSLAScales}}, got {type(scales).__name__}")
  if family(arch) == "generic":
    return dict(scales)
  config = get_arch(arch)
  check_scales_for(config, scales, in_channels)  # every block, by name: "scales['stage0']: 16 channels, ..."
  return {kernel_path(sp.name): scales[sp.name] for sp in config.block_specs(in_channels)}


def check_scales(arch, scales: Mapping[str, CSLAScales], plain_model: nnx.Module):
  """The optimizer's scales tree of `plain_model` (an `nnx.eval_shape` one is fine), checking `scales` once.

  RepOpt-VGG scales are checked block by block against the architecture (`vgg.check_scales_for`), every
  model's against the shapes of its kernels (`csla.scales_tree`).

  Args:
    arch: the model's `model.arch` (a name or `VGGConfig`).
    scales: `{block name: CSLAScales}` (RepOpt-VGG) or `{kernel path: CSLAScales}` (any other model).
    plain_model: the model in mode 'target'.

  Returns:
    `csla.scales_tree(plain_model, kernel_scales(arch, scales))`.

  Raises:
    ScalesError: naming the block or kernel path that does not fit.
  """
  return csla.scales_tree(plain_model, kernel_scales(arch, scales, _in_channels(plain_model)))


def _in_channels(model) -> int:
  return int(getattr(model, "in_channels", 3))


def file_scales(arch, model: nnx.Module) -> Dict[str, CSLAScales]:
  """The scales of a Hyper-Search (or csla) `model` of `arch`, keyed as its scales files key them: the
  official block names for RepOpt-VGG (`reparam.scales_from_hs`), kernel paths for any other model
  (`csla.scales_of`). The inverse of `kernel_scales`."""
  if family(arch) == "vgg":
    return scales_from_hs(model)
  return csla.scales_of(model)


def hs_init_rule(name: str):
  """The `csla.hyper_search_model` init of a config's `model.hs_init` ('official' or 'paper')."""
  if name == "official":
    return "depth"
  if name == "paper":  # sqrt(2/l), l = 1 for a run's first conv
    return lambda path, conv, index: math.sqrt(2.0 / (index + 1))
  raise ModelError(f"unknown hs_init {name!r}; valid: official, paper")


def build(arch, mode: str = "target", *, num_classes: int, in_channels: int = 3,
          scales: Optional[Mapping] = None, hs_init: str = "official", dtype=None, param_dtype=jnp.float32,
          conv_impl: str = "auto", seed: int = 0) -> nnx.Module:
  """Any architecture in `mode`, freshly initialised (no Rule of Initialization: see `csla.reinit`).

  Args:
    arch: a name in `available_archs()` or a `VGGConfig`.
    mode: 'target', 'csla', 'hs' (every architecture) or 'repvgg' (RepOpt-VGG only).
    num_classes, in_channels: head outputs and image channels.
    scales: mode 'csla' only, keyed as `family(arch)` keys them (block names or kernel paths).
    hs_init: 'official' or 'paper', the initial scales of mode 'hs'.
    dtype, param_dtype: activation and parameter dtypes.
    conv_impl: the convolution formulation ('auto', 'lax', 'im2col'; `repopt_jax.ops`).
    seed: initialisation seed.

  Example:
    >>> m = nnx.eval_shape(lambda: build('tiny', 'target', num_classes=10, conv_impl='lax'))
    >>> type(m).__name__, m.stage0.conv.kernel.shape
    ('RepOptVGG', (3, 3, 3, 8))
  """
  if family(arch) == "vgg":
    return RepOptVGG(arch, mode, num_classes=int(num_classes), in_channels=int(in_channels),
                     scales=scales if mode == "csla" else None, hs_init=hs_init,
                     dtype=jnp.float32 if dtype is None else dtype, param_dtype=param_dtype, conv_impl=conv_impl,
                     rngs=nnx.Rngs(seed))
  return build_generic(arch, mode, num_classes=num_classes, in_channels=in_channels,
                       scales=scales if mode == "csla" else None, hs_init=hs_init, dtype=dtype,
                       param_dtype=param_dtype, conv_impl=conv_impl, seed=seed)


def build_generic(arch: str, mode: str = "target", *, num_classes: int, in_channels: int = 3,
                  scales: Optional[Mapping] = None, hs_init: str = "official", dtype=None,
                  param_dtype=jnp.float32, conv_impl: str = "auto", seed: int = 0):
  """A non-VGG architecture in `mode`, initialised as `build` does for RepOpt-VGG.

  The 1x1 branch kernels are drawn with PyTorch's default conv init (`blocks.conv_kernel_init`), like the
  models' own kernels. `scales` (`{kernel path: CSLAScales}`) are for mode 'csla'.
  """
  if arch not in GENERIC_ARCHS:
    raise ModelError(f"unknown architecture {arch!r}; known: {', '.join(available_archs())}")
  if mode not in GENERIC_MODES:
    raise ModelError(f"mode {mode!r} is for RepOpt-VGG only; {arch} takes modes {', '.join(GENERIC_MODES)}")
  kw = dict(num_classes=int(num_classes), in_channels=int(in_channels), dtype=dtype, param_dtype=param_dtype,
            rngs=nnx.Rngs(seed))
  if conv_impl != "auto":  # builders registered by users may not take it; the built-in ones do
    kw["conv_impl"] = conv_impl
  try:
    plain = GENERIC_ARCHS[arch](**kw)
  except TypeError as e:
    if "conv_impl" not in str(e):
      raise
    raise ModelError(f"architecture {arch!r}: its builder takes no conv_impl (asked for {conv_impl!r})") from None
  init = blocks_lib.conv_kernel_init
  if mode == "hs" and arch in GENERIC_HS:
    return GENERIC_HS[arch](plain, rngs=nnx.Rngs(seed + 1))
  if mode == "hs":
    return csla.hyper_search_model(plain, rngs=nnx.Rngs(seed + 1), init=hs_init_rule(hs_init), kernel_init=init)
  if mode == "csla":
    if scales is None:
      raise ModelError("mode 'csla' needs scales={kernel_path: CSLAScales}")
    return csla.csla_model(plain, scales, rngs=nnx.Rngs(seed + 1), kernel_init=init)
  return plain
