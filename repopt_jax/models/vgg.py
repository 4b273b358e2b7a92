"""RepOpt-VGG (and the RepVGG sizes) in Flax NNX, NHWC, in four modes sharing one layout.

The network is the official code's: `stage0` (one block of `min(64, 64a)` channels), then four stages of
`num_blocks` blocks, each stage starting with a stride-2 block (five stride-2 stages in all), global
average pooling and a linear head `linear`. Blocks are named as in the official code and its scale files:
`'stage0'`, `'stage1.0'`, ..., `'stage4.0'`; the parameter of block `'stage1.0'` lives at
`stage1/0/...` in `nnx.state(model)`.

Sizes are data (`VGGConfig`); `ARCHS` holds the named ones.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import jax.numpy as jnp
import numpy as np
from flax import nnx

from repopt_jax import ops
from repopt_jax.models import blocks as blocks_lib
from repopt_jax.scales import CSLAScales, ScalesError

MODES = ("target", "csla", "hs", "repvgg")
HS_INITS = ("official", "paper")


class ModelError(ValueError):
  """Raised for a model that cannot be built or an input it cannot take; the message names the culprit."""


class BlockSpec(NamedTuple):
  """One block of the network: official name, channels, stride, and whether it has an identity branch."""
  name: str
  in_channels: int
  out_channels: int
  stride: int
  stage: int
  index: int  # position inside its stage (0 for the stride-2 block that opens it)

  @property
  def has_identity(self) -> bool:
    return self.in_channels == self.out_channels and self.stride == 1


@dataclasses.dataclass(frozen=True)
class VGGConfig:
  """A RepOpt-VGG size.

  Attributes:
    name: a label (shows in errors and scale-file metadata).
    num_blocks: blocks in stages 1-4.
    widths: output channels of stages 1-4.
    stem_width: output channels of `stage0`.
    strides: strides of the first block of stages 0-4 (the paper: all 2).
  """

  name: str
  num_blocks: Tuple[int, int, int, int]
  widths: Tuple[int, int, int, int]
  stem_width: int
  strides: Tuple[int, int, int, int, int] = (2, 2, 2, 2, 2)

  def __post_init__(self):
    for field, n in (("num_blocks", 4), ("widths", 4), ("strides", 5)):
      v = tuple(getattr(self, field))
      if len(v) != n or not all(isinstance(x, (int, np.integer)) and x >= 1 for x in v):
        raise ModelError(f"VGGConfig {self.name!r}: {field} must be {n} positive integers, got {v!r}")
      object.__setattr__(self, field, tuple(int(x) for x in v))
    if not isinstance(self.stem_width, (int, np.integer)) or self.stem_width < 1:
      raise ModelError(f"VGGConfig {self.name!r}: stem_width must be a positive integer, got {self.stem_width!r}")

  @classmethod
  def from_multipliers(cls, name: str, num_blocks: Sequence[int], a: float, b: float) -> "VGGConfig":
    """The RepVGG parameterisation: widths `64a, 128a, 256a, 512b`, stem `min(64, 64a)`."""
    return cls(name=name, num_blocks=tuple(num_blocks),
               widths=(int(64 * a), int(128 * a), int(256 * a), int(512 * b)), stem_width=min(64, int(64 * a)))

  @property
  def min_input_size(self) -> int:
    """The smallest image side the stride-2 stages take (32 for five of them)."""
    return int(np.prod(self.strides))

  @property
  def out_features(self) -> int:
    return self.widths[-1]

  def block_specs(self, in_channels: int = 3) -> List[BlockSpec]:
    """All blocks in forward order, with their official names."""
    out = [BlockSpec("stage0", in_channels, self.stem_width, self.strides[0], 0, 0)]
    cin = self.stem_width
    for s, (n, width) in enumerate(zip(self.num_blocks, self.widths), start=1):
      for i in range(n):
        out.append(BlockSpec(f"stage{s}.{i}", cin, width, self.strides[s] if i == 0 else 1, s, i))
        cin = width
    return out


_B_BLOCKS = (4, 6, 16, 1)
_L_BLOCKS = (8, 14, 24, 1)
_A_BLOCKS = (2, 4, 14, 1)

ARCHS: Dict[str, VGGConfig] = {
    # RepOpt-VGG (paper, Table 1); B1/B2 are also RepVGG-B1/B2.
    "B1": VGGConfig.from_multipliers("B1", _B_BLOCKS, 2, 4),
    "B2": VGGConfig.from_multipliers("B2", _B_BLOCKS, 2.5, 5),
    "L1": VGGConfig.from_multipliers("L1", _L_BLOCKS, 2, 4),
    "L2": VGGConfig.from_multipliers("L2", _L_BLOCKS, 2.5, 5),
    # RepVGG sizes.
    "A0": VGGConfig.from_multipliers("A0", _A_BLOCKS, 0.75, 2.5),
    "A1": VGGConfig.from_multipliers("A1", _A_BLOCKS, 1, 2.5),
    "A2": VGGConfig.from_multipliers("A2", _A_BLOCKS, 1.5, 2.75),
    "B0": VGGConfig.from_multipliers("B0", _B_BLOCKS, 1, 2.5),
    "B3": VGGConfig.from_multipliers("B3", _B_BLOCKS, 3, 5),
    # Small sizes for tests and CPU demos (same topology: five stride-2 stages).
    "tiny": VGGConfig("tiny", (1, 2, 2, 1), (8, 16, 32, 64), 8),
    "cifar_tiny": VGGConfig("cifar_tiny", (2, 2, 2, 1), (16, 32, 64, 128), 16),
    # B1's layout (28 conv layers, 23 identity blocks) at 1/8 of its widths: the experiments' CPU size, deep
    # enough for the Hyper-Search pattern along a stage and for plain VGG to train visibly worse.
    "B1_eighth": VGGConfig("B1_eighth", _B_BLOCKS, (16, 32, 64, 256), 8),
}


def get_arch(arch: Union[str, VGGConfig]) -> VGGConfig:
  """The `VGGConfig` of a name in `ARCHS` (or the config itself); `ModelError` listing the names otherwise."""
  if isinstance(arch, VGGConfig):
    return arch
  if isinstance(arch, str) and arch in ARCHS:
    return ARCHS[arch]
  raise ModelError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)} (or pass a VGGConfig)")


def hs_scale_init(index: int, rule: str = "official") -> float:
  """Initial `s` and `t` of the `index`-th block of a stage (0-based) in the Hyper-Search model.

  * `'official'` (default; it produced the released scale files): 1.0 for the first block of a stage and
    `sqrt(2/i)` for the i-th following one, so the second block gets `sqrt(2)`, the third 1.
  * `'paper'` (the text of Sec. 4): `sqrt(2/l)` with `l = 1` for the stage's first layer, i.e. the official
    values shifted by one block: `sqrt(2)`, 1, `sqrt(2/3)`, ...

  Both apply to `stage0` as a one-block stage. Identity scales start at 1.0 either way.

  Example:
    >>> [round(hs_scale_init(i), 3) for i in range(3)], round(hs_scale_init(0, 'paper'), 3)
    ([1.0, 1.414, 1.0], 1.414)
  """
  if rule == "official":
    return 1.0 if index == 0 else math.sqrt(2.0 / index)
  if rule == "paper":
    return math.sqrt(2.0 / (index + 1))
  raise ModelError(f"unknown hs_init {rule!r}; valid: {', '.join(HS_INITS)}")


def check_block_scales(spec: BlockSpec, s, arch_name: str) -> None:
  """`ScalesError` naming the block when `s` is not a usable `CSLAScales` for this RepOpt-VGG block."""
  where = f"scales[{spec.name!r}]"
  if not isinstance(s, CSLAScales):
    raise ScalesError(f"{where}: expected CSLAScales, got {type(s).__name__}")
  if s.num_channels != spec.out_channels:
    raise ScalesError(f"{where}: {s.num_channels} channels, but block {spec.name} of {arch_name} has "
                      f"{spec.out_channels} (scales of another architecture?)")
  if s.pointwise is None:
    raise ScalesError(f"{where}: no 1x1 (pointwise) scale; every RepOpt-VGG block has a 1x1 branch")
  if s.extra:
    raise ScalesError(f"{where}: extra branches {[k for k, _ in s.extra]} do not exist in RepOpt-VGG")
  if s.identity != spec.has_identity:
    raise ScalesError(f"{where}: identity={s.identity}, but block {spec.name} of {arch_name} "
                      f"{'has' if spec.has_identity else 'has no'} identity branch "
                      f"({spec.in_channels}->{spec.out_channels} channels, stride {spec.stride})")


def check_scales_for(config: VGGConfig, scales: Mapping[str, CSLAScales], in_channels: int = 3) -> None:
  """`ScalesError` naming the first block that is missing, extra or mismatched in `scales`."""
  if not isinstance(scales, Mapping):
    raise ScalesError(f"scales: expected a dict {{block_name: CSLAScales}}, got {type(scales).__name__}")
  specs = config.block_specs(in_channels)
  names = {sp.name for sp in specs}
  for sp in specs:
    if sp.name not in scales:
      raise ScalesError(f"scales: block {sp.name!r} of {config.name} is missing "
                        f"({len(scales)} blocks given, {len(specs)} expected)")
    check_block_scales(sp, scales[sp.name], config.name)
  extra = [k for k in scales if k not in names]
  if extra:
    raise ScalesError(f"scales: block {extra[0]!r} is not a block of {config.name} "
                      f"({len(extra)} such entries; scales of another architecture?)")


class RepOptVGG(nnx.Module):
  """RepOpt-VGG in one of four modes (see `repopt_jax.models.blocks`).

  Args:
    arch: a name in `ARCHS` or a `VGGConfig`.
    mode: 'target' (conv-BN-ReLU, trained by RepOptimizer), 'csla' (the imaginary multi-branch block with
      constant scales), 'hs' (Hyper-Search: trainable scales) or 'repvgg' (the RepVGG baseline).
    num_classes: outputs of the linear head.
    in_channels: input channels (NHWC's last axis).
    scales: `{block_name: CSLAScales}`, required for 'csla' (its `s`, `t`; `gamma` starts at
      `identity_init` when given, else 1). Ignored in the other modes.
    hs_init: 'official' or 'paper', the initial `s`, `t` of the 'hs' mode (see `hs_scale_init`).
    dtype: computation dtype; param_dtype: parameter dtype.
    conv_impl: the convolution formulation ('auto', 'lax' or 'im2col'; see `repopt_jax.ops`): the same
      function to rounding, fixed when the model is built.
    rngs: `nnx.Rngs` for the initialisers.

  Example:
    >>> model = RepOptVGG('tiny', 'target', num_classes=10, rngs=nnx.Rngs(0))
    >>> model.block_names[:3], model.stage2[1].conv.kernel.shape
    (['stage0', 'stage1.0', 'stage2.0'], (3, 3, 16, 16))
    >>> logits = model(jnp.zeros((2, 32, 32, 3)))  # doctest: +SKIP
  """

  def __init__(self, arch: Union[str, VGGConfig], mode: str, *, num_classes: int = 1000, in_channels: int = 3,
               scales: Optional[Mapping[str, CSLAScales]] = None, hs_init: str = "official",
               dtype=jnp.float32, param_dtype=jnp.float32, conv_impl: str = "auto", rngs: nnx.Rngs = None):
    config = get_arch(arch)
    if mode not in MODES:
      raise ModelError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    if conv_impl not in ops.CONV_IMPLS:
      raise ModelError(f"unknown conv_impl {conv_impl!r}; valid: {', '.join(ops.CONV_IMPLS)}")
    if hs_init not in HS_INITS:
      raise ModelError(f"unknown hs_init {hs_init!r}; valid: {', '.join(HS_INITS)}")
    if int(num_classes) < 1 or int(in_channels) < 1:
      raise ModelError(f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}")
    if mode == "csla":
      if scales is None:
        raise ModelError("mode 'csla' needs scales={block_name: CSLAScales} (e.g. from load_scales or "
                         "reparam.scales_from_hs); its branch scales are constants")
      check_scales_for(config, scales, in_channels)
    rngs = nnx.Rngs(0) if rngs is None else rngs
    self.config = config
    self.mode = mode
    self.num_classes = int(num_classes)
    self.in_channels = int(in_channels)
    self.hs_init = hs_init
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.conv_impl = conv_impl

    def build(spec: BlockSpec):
      kw = {}
      if mode == "csla":
        s = scales[spec.name]
        kw = dict(conv_scale=np.asarray(s.conv), pointwise_scale=np.asarray(s.pointwise),
                  identity_scale=None if s.identity_init is None else np.asarray(s.identity_init))
      elif mode == "hs":
        v = hs_scale_init(spec.index, hs_init)
        kw = dict(conv_scale=v, pointwise_scale=v, identity_scale=1.0)
      return blocks_lib.make_block(mode, spec.in_channels, spec.out_channels, spec.stride, dtype=dtype,
                                   param_dtype=param_dtype, conv_impl=conv_impl, rngs=rngs, **kw)

    specs = config.block_specs(self.in_channels)
    self.stage0 = build(specs[0])
    for s in range(1, 5):
      setattr(self, f"stage{s}", nnx.List([build(sp) for sp in specs if sp.stage == s]))
    width = config.out_features
    self.linear = nnx.Linear(width, self.num_classes, kernel_init=blocks_lib.conv_kernel_init,
                             bias_init=blocks_lib.torch_linear_bias_init(width), dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)

  @property
  def block_names(self) -> List[str]:
    """Official block names in forward order: `['stage0', 'stage1.0', ..., 'stage4.0']`."""
    return [sp.name for sp in self.block_specs]

  @property
  def block_specs(self) -> List[BlockSpec]:
    return self.config.block_specs(self.in_channels)

  def named_blocks(self) -> Iterator[Tuple[BlockSpec, nnx.Module]]:
    """`(BlockSpec, block)` pairs in forward order."""
    mods = [self.stage0] + [b for s in range(1, 5) for b in getattr(self, f"stage{s}")]
    return iter(zip(self.block_specs, mods))

  def block(self, name: str) -> nnx.Module:
    """The block with official name `name` (e.g. 'stage2.3')."""
    if name == "stage0":
      return self.stage0
    try:
      stage, idx = name.split(".")
      return getattr(self, stage)[int(idx)]
    except (ValueError, AttributeError, IndexError, TypeError):
      raise ModelError(f"{name!r} is not a block of {self.config.name}; blocks: "
                       f"{', '.join(self.block_names[:3])}, ..., {self.block_names[-1]}") from None

  def _check_input(self, x):
    if x.ndim != 4:
      raise ModelError(f"RepOptVGG: input must be NHWC (4-D), got shape {tuple(x.shape)}")
    if x.shape[-1] != self.in_channels:
      raise ModelError(f"RepOptVGG: input has {x.shape[-1]} channels (last axis of shape {tuple(x.shape)}), "
                       f"the model expects in_channels={self.in_channels} (NHWC layout)")
    side = self.config.min_input_size
    if x.shape[1] < side or x.shape[2] < side:
      raise ModelError(f"RepOptVGG: input {x.shape[1]}x{x.shape[2]} is too small for "
                       f"{len(self.config.strides)} stages with strides {self.config.strides}; "
                       f"needs at least {side}x{side}")

  def features(self, x):
    """The pooled features before the head, `(B, widths[-1])`."""
    self._check_input(x)
    for _, blk in self.named_blocks():
      x = blk(x)
    return jnp.mean(x, axis=(1, 2))

  def __call__(self, x):
    """Logits `(B, num_classes)` for NHWC images `x`; BatchNorm follows `model.train()` / `model.eval()`."""
    return self.linear(self.features(x))
