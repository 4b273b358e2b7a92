"""RepOpt-GhostNet in Flax NNX (NHWC): the official code's second model family (`repoptghostnet_model.py`,
built on RepGhostNet, Chen et al. 2022), widths 0.5x ... 2.0x, as the plain *target* network.

Structure (names follow the official code, so its scale file maps one to one): `conv_stem` (3x3, stride 2)
-> `bn1` -> ReLU -> `blocks`: nine stages of `GhostBottleneck`s (`ghost1` expansion, a depthwise `conv_dw`
when the stride is 2, optional squeeze-excite `se`, `ghost2` projection, plus a shortcut: identity, or
depthwise conv + BN + 1x1 conv + BN) and a last 1x1 `ConvBnAct` stage -> global average pool -> `conv_head`
(1x1 with bias, 1280 channels) -> ReLU -> `classifier`. (The official dropout 0.2 before the classifier has
no parameters and is left out.)

Each `GhostModule` is `primary_conv` (1x1) -> `primary_bn` -> ReLU giving `x1`, then `cheap_conv`: a depthwise
3x3 on `x1` -> `final_bn` [-> ReLU]. The CSLA block RepOpt stands it for is `s * dwconv3x3(x1) + gamma * x1`
before `final_bn`: the depthwise conv with its constant scale `s` (the official `cheap_operation.1`) and an
identity branch with trained weights `gamma` (the official `fusion_scale`), no 1x1 branch. So
`CSLAScales(conv=s, identity=True, identity_init=gamma)` on `.../cheap_conv/kernel`: the Grad Mult is `s_c^2`
on every tap plus 1 on the centre tap (each depthwise filter reads its own channel), the official
`generate_grad_mults`; the Rule of Initialization `s * W + diag(gamma)`. Only the `cheap_conv`s are
re-parameterized (`CHEAP_SELECT`); the stride-2 `conv_dw` and the shortcut convs are not.

Parameter counts (target mode, 1000 classes; `count_params`, equal to PyTorch's `sum(p.numel())` of the
official `repoptghostnet_<w>x(mode='target')` as transcribed layer by layer in tests/test_ghostnet.py; the
RepGhostNet paper gives 2.3M for 0.5x): 0.5x 2,309,008; 1.0x 4,063,716.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from repopt_jax.models import blocks as blocks_lib
from repopt_jax.scales import CSLAScales, ScalesError

WIDTHS = {"0_5x": 0.5, "0_58x": 0.58, "0_8x": 0.8, "1_0x": 1.0, "1_11x": 1.11, "1_3x": 1.3, "1_5x": 1.5, "2_0x": 2.0}

# The official configuration: per stage, bottlenecks (kernel, expansion, out channels, SE ratio, stride).
CFGS = [
    [[3, 8, 16, 0, 1]],
    [[3, 24, 24, 0, 2]],
    [[3, 36, 24, 0, 1]],
    [[5, 36, 40, 0.25, 2]],
    [[5, 60, 40, 0.25, 1]],
    [[3, 120, 80, 0, 2]],
    [[3, 100, 80, 0, 1], [3, 120, 80, 0, 1], [3, 120, 80, 0, 1], [3, 240, 112, 0.25, 1], [3, 336, 112, 0.25, 1]],
    [[5, 336, 160, 0.25, 2]],
    [[5, 480, 160, 0, 1], [5, 480, 160, 0.25, 1], [5, 480, 160, 0, 1], [5, 480, 160, 0.25, 1]],
]


def make_divisible(v: float, divisor: int, min_value: Optional[int] = None) -> int:
  """Rounds channels to a multiple of `divisor`, never more than 10% down (the TF MobileNet rule)."""
  min_value = min_value or divisor
  new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
  return new_v + divisor if new_v < 0.9 * v else new_v


def _conv(cin, cout, k, stride, kw, groups=1, use_bias=False):
  return blocks_lib._conv(cin, cout, k, stride, kw["dtype"], kw["param_dtype"], kw["rngs"], groups=groups,  # pylint: disable=protected-access
                          use_bias=use_bias, conv_impl=kw["conv_impl"])


def _bn(c, kw):
  return blocks_lib._bn(c, kw["dtype"], kw["param_dtype"], kw["rngs"])  # pylint: disable=protected-access


class GhostModule(nnx.Module):
  """`x1 = relu(bn(conv1x1(x)))`; `out = final_bn(dwconv3x3(x1))` [-> ReLU] (the target GhostModule)."""

  def __init__(self, cin: int, cout: int, relu: bool, hs_index: int, kw):
    self.primary_conv = _conv(cin, cout, 1, 1, kw)
    self.primary_bn = _bn(cout, kw)
    self.cheap_conv = _conv(cout, cout, 3, 1, kw, groups=cout)
    self.final_bn = _bn(cout, kw)
    self.relu = relu
    self.hs_index = hs_index  # the official `num_stage_modules`: Hyper-Search starts s at sqrt(2/(i+1))

  def __call__(self, x):
    x1 = nnx.relu(self.primary_bn(self.primary_conv(x)))
    y = self.final_bn(self.cheap_conv(x1))
    return nnx.relu(y) if self.relu else y


class SqueezeExcite(nnx.Module):
  """`x * hard_sigmoid(conv_expand(relu(conv_reduce(mean(x)))))`."""

  def __init__(self, c: int, ratio: float, kw):
    reduced = make_divisible(c * ratio, 4)
    self.conv_reduce = _conv(c, reduced, 1, 1, kw, use_bias=True)
    self.conv_expand = _conv(reduced, c, 1, 1, kw, use_bias=True)

  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = self.conv_expand(nnx.relu(self.conv_reduce(s)))
    return x * (nnx.relu6(s + 3.0) / 6.0)


class GhostBottleneck(nnx.Module):
  """ghost1 -> [depthwise stride-2 conv_dw + bn_dw] -> [se] -> ghost2, plus the shortcut."""

  def __init__(self, cin: int, mid: int, cout: int, k: int, stride: int, se_ratio: float, stage_block: int, kw):
    self.stride = stride
    self.ghost1 = GhostModule(cin, mid, True, stage_block * 2 - 1, kw)
    if stride > 1:
      self.conv_dw = _conv(mid, mid, k, stride, kw, groups=mid)
      self.bn_dw = _bn(mid, kw)
    self.se = SqueezeExcite(mid, se_ratio, kw) if se_ratio else None
    self.ghost2 = GhostModule(mid, cout, False, stage_block * 2, kw)
    self.has_shortcut = not (cin == cout and stride == 1)
    if self.has_shortcut:
      self.shortcut_dw = _conv(cin, cin, k, stride, kw, groups=cin)
      self.shortcut_dw_bn = _bn(cin, kw)
      self.shortcut_pw = _conv(cin, cout, 1, 1, kw)
      self.shortcut_pw_bn = _bn(cout, kw)

  def __call__(self, x):
    y = self.ghost1(x)
    if self.stride > 1:
      y = self.bn_dw(self.conv_dw(y))
    if self.se is not None:
      y = self.se(y)
    y = self.ghost2(y)
    short = self.shortcut_pw_bn(self.shortcut_pw(self.shortcut_dw_bn(self.shortcut_dw(x)))) if self.has_shortcut else x
    return y + short


class ConvBnAct(nnx.Module):
  def __init__(self, cin: int, cout: int, kw):
    self.conv = _conv(cin, cout, 1, 1, kw)
    self.bn1 = _bn(cout, kw)

  def __call__(self, x):
    return nnx.relu(self.bn1(self.conv(x)))


class RepOptGhostNet(nnx.Module):
  """RepOpt-GhostNet (target network) of a width multiplier (`WIDTHS`: 0.5 ... 2.0).

  Args:
    width: the multiplier (a float or a `WIDTHS` key such as '0_5x').
    num_classes, in_channels: head outputs and image channels.
    enable_se: squeeze-excite where the official configuration has it.
    dtype, param_dtype, conv_impl, rngs: as every model here (`conv_impl`: 'auto', 'lax' or 'im2col', see
      `repopt_jax.ops`).

  Example:
    >>> model = nnx.eval_shape(lambda: RepOptGhostNet(0.5, rngs=nnx.Rngs(0)))
    >>> from repopt_jax.models import count_params
    >>> count_params(model)
    2309008
  """

  def __init__(self, width=0.5, *, num_classes: int = 1000, in_channels: int = 3, enable_se: bool = True,
               dtype=None, param_dtype=jnp.float32, conv_impl: str = "auto", rngs: nnx.Rngs):
    width = WIDTHS[width] if isinstance(width, str) else float(width)
    kw = dict(dtype=dtype, param_dtype=param_dtype, conv_impl=conv_impl, rngs=rngs)
    c = make_divisible(16 * width, 4)
    self.conv_stem = _conv(in_channels, c, 3, 2, kw)
    self.bn1 = _bn(c, kw)
    stages, stage_block, exp = [], 0, 0
    for cfg in CFGS:
      layers = []
      for k, exp, out, se, s in cfg:
        cout, mid = make_divisible(out * width, 4), make_divisible(exp * width, 4)
        stage_block = stage_block + 1 if (s == 1 and c == cout) else 1
        layers.append(GhostBottleneck(c, mid, cout, k, s, se if enable_se else 0, stage_block, kw))
        c = cout
      stages.append(nnx.List(layers))
    last = make_divisible(exp * width * 2, 4)
    stages.append(nnx.List([ConvBnAct(c, last, kw)]))
    self.blocks = nnx.List(stages)
    self.conv_head = _conv(last, 1280, 1, 1, kw, use_bias=True)
    self.classifier = nnx.Linear(1280, num_classes, kernel_init=blocks_lib.conv_kernel_init,
                                 bias_init=blocks_lib.torch_linear_bias_init(1280), dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv_stem(x)))
    for stage in self.blocks:
      for blk in stage:
        x = blk(x)
    x = jnp.mean(x, axis=(1, 2), keepdims=True)
    x = nnx.relu(self.conv_head(x))
    return self.classifier(x.reshape(x.shape[0], -1))

  def ghost_modules(self) -> Dict[str, GhostModule]:
    """`{official name: GhostModule}` in order: `'blocks.0.0.ghost1'`, ..."""
    out = {}
    for s, stage in enumerate(self.blocks):
      for b, blk in enumerate(stage):
        for g in ("ghost1", "ghost2"):
          if hasattr(blk, g):
            out[f"blocks.{s}.{b}.{g}"] = getattr(blk, g)
    return out


def kernel_path(official_name: str) -> str:
  """`'blocks.6.2.ghost1'` -> `'blocks/6/2/ghost1/cheap_conv/kernel'` (the block's re-parameterized kernel)."""
  return official_name.replace(".", "/") + "/cheap_conv/kernel"


def CHEAP_SELECT(path: str, conv) -> bool:  # pylint: disable=invalid-name
  """`csla.hyper_search_model` selection for RepOpt-GhostNet: the GhostModules' depthwise cheap convs only."""
  del conv
  return path.endswith("/cheap_conv")


def hs_init(model: RepOptGhostNet):
  """The official Hyper-Search init as a `csla.hyper_search_model` init: `s = sqrt(2 / (i + 1))` with `i` the
  module's `num_stage_modules` (`2b - 1` for ghost1, `2b` for ghost2 of a stage's b-th block)."""
  values = {kernel_path(n)[: -len("/kernel")]: math.sqrt(2.0 / (m.hs_index + 1))
            for n, m in model.ghost_modules().items()}
  return lambda path, conv, index: values[path]


def hyper_search(model: RepOptGhostNet, *, rngs: nnx.Rngs):
  """The official Hyper-Search model: depthwise cheap conv and trainable identity (`fusion_scale`), no 1x1."""
  from repopt_jax import csla  # pylint: disable=g-import-not-at-top
  return csla.hyper_search_model(model, rngs=rngs, select=CHEAP_SELECT, init=hs_init(model), pointwise=False)


def scales_from_official(state: Dict[str, np.ndarray]) -> Dict[str, CSLAScales]:
  """The official `RepOptGhostNet_*_scales.pth` state dict (`read_torch_state_dict`) as `{kernel path:
  CSLAScales}`: `<module>.cheap_operation.1.weight` is `s`, `<module>.fusion_scale.weight` the trained
  identity weights `gamma`."""
  blocks: Dict[str, dict] = {}
  for key, value in state.items():
    for suffix, part in ((".cheap_operation.1.weight", "s"), (".fusion_scale.weight", "gamma")):
      if key.endswith(suffix):
        blocks.setdefault(key[: -len(suffix)], {})[part] = np.asarray(value, np.float32).reshape(-1)
        break
    else:
      raise ScalesError(f"entry {key!r} is not a RepOpt-GhostNet scale "
                        "(expected <module>.cheap_operation.1.weight or <module>.fusion_scale.weight)")
  out = {}
  for name, b in blocks.items():
    if "s" not in b or "gamma" not in b:
      raise ScalesError(f"module {name!r}: needs both cheap_operation.1.weight and fusion_scale.weight")
    out[kernel_path(name)] = CSLAScales(conv=b["s"], identity=True, identity_init=b["gamma"])
  return out


def load_official_scales(path: str) -> Dict[str, CSLAScales]:
  """`scales_from_official(read_torch_state_dict(path))` (no torch needed)."""
  from repopt_jax.scales import read_torch_state_dict  # pylint: disable=g-import-not-at-top
  return scales_from_official(read_torch_state_dict(path))
