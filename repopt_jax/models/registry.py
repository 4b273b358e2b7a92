"""Every architecture a config can name (`model.arch`), VGG or not, and how to build it in each mode.

RepOpt-VGG sizes (`vgg.ARCHS`) are built by `RepOptVGG` in its four modes. Every other architecture is a
plain NNX model (`GENERIC_ARCHS`), re-parameterized by the generic `repopt_jax.csla` machinery: mode
'target' is the plain model (Rule of Initialization from the scales by `csla.reinit`), 'hs' its
`csla.hyper_search_model`, 'csla' its `csla.csla_model`. Their scales are keyed by kernel paths.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, Optional

import jax.numpy as jnp
from flax import nnx

from repopt_jax.models import blocks as blocks_lib
from repopt_jax.models import ghostnet
from repopt_jax.models.resnet import resnet18_cifar
from repopt_jax.models.vgg import ARCHS, ModelError

# name -> builder(num_classes=, in_channels=, dtype=, param_dtype=, rngs=) of the plain model.
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


def register_arch(name: str, builder: Callable[..., nnx.Module]) -> None:
  """Makes `builder(num_classes=, in_channels=, dtype=, param_dtype=, rngs=)` a `model.arch` name."""
  if name in ARCHS:
    raise ModelError(f"register_arch: {name!r} is a RepOpt-VGG size")
  GENERIC_ARCHS[name] = builder


def available_archs() -> List[str]:
  """Every name `model.arch` accepts: the RepOpt-VGG sizes, then the other architectures."""
  return list(ARCHS) + list(GENERIC_ARCHS)


def is_vgg(arch) -> bool:
  return not isinstance(arch, str) or arch in ARCHS


def hs_init_rule(name: str):
  """The `csla.hyper_search_model` init of a config's `model.hs_init` ('official' or 'paper')."""
  if name == "official":
    return "depth"
  if name == "paper":  # sqrt(2/l), l = 1 for a run's first conv
    return lambda path, conv, index: math.sqrt(2.0 / (index + 1))
  raise ModelError(f"unknown hs_init {name!r}; valid: official, paper")


def build_generic(arch: str, mode: str = "target", *, num_classes: int, in_channels: int = 3,
                  scales: Optional[Mapping] = None, hs_init: str = "official", reinit: bool = False,
                  reinit_identity: str = "trained", dtype=None, param_dtype=jnp.float32, seed: int = 0):
  """A non-VGG architecture in `mode`, initialised as `build_model` does for RepOpt-VGG.

  The 1x1 branch kernels and the Rule of Initialization's fresh kernels are drawn with PyTorch's default
  conv init (`blocks.conv_kernel_init`), like the models' own kernels.
  """
  from repopt_jax import csla  # pylint: disable=g-import-not-at-top
  if arch not in GENERIC_ARCHS:
    raise ModelError(f"unknown architecture {arch!r}; known: {', '.join(available_archs())}")
  if mode not in GENERIC_MODES:
    raise ModelError(f"mode {mode!r} is for RepOpt-VGG only; {arch} takes modes {', '.join(GENERIC_MODES)}")
  plain = GENERIC_ARCHS[arch](num_classes=int(num_classes), in_channels=int(in_channels), dtype=dtype,
                              param_dtype=param_dtype, rngs=nnx.Rngs(seed))
  init = blocks_lib.conv_kernel_init
  if mode == "hs" and arch in GENERIC_HS:
    return GENERIC_HS[arch](plain, rngs=nnx.Rngs(seed + 1))
  if mode == "hs":
    return csla.hyper_search_model(plain, rngs=nnx.Rngs(seed + 1), init=hs_init_rule(hs_init), kernel_init=init)
  if mode == "csla":
    if scales is None:
      raise ModelError("mode 'csla' needs scales={kernel_path: CSLAScales}")
    return csla.csla_model(plain, scales, rngs=nnx.Rngs(seed + 1), kernel_init=init)
  if scales is not None:
    csla.scales_tree(plain, scales)  # ScalesError naming the path, reinit or not
    if reinit:
      csla.reinit(plain, scales, rngs=nnx.Rngs(seed + 1), kernel_init=init, identity=reinit_identity)
  return plain
