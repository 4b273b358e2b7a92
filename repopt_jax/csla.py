"""RepOptimizer for any Flax NNX model: CSLA surgery, Hyper-Search, scales and the Rule of Initialization.

Each *selected* convolution of a model stands for an imaginary CSLA block (Constant-Scale Linear Addition):

.. math::
  y = s \\odot \\mathrm{conv}_{K\\times K}(x; W_k) + t \\odot \\mathrm{conv}_{1\\times1}(x; W_1)
      \\;[+\\, \\gamma \\odot x]

with `s`, `t`, `gamma` per output channel. The 1x1 branch has the conv's stride and groups and reads exactly
the pixel under the KxK kernel's centre tap, whatever the padding (Flax's 'SAME' at stride 2 on an even
input pads (0, 1): a plain 'SAME' 1x1 conv would read the pixel one to the left and above). The identity
branch exists when `in_features == out_features`, every stride is 1 and the padding keeps the size ('SAME'
or a symmetric `d(K-1)/2`). Because the block is linear in its weights it equals one conv with kernel
`s W_k + t pad(W_1) + diag(gamma)` (`merge`), which a RepOptimizer trains in its place.

The functions (none of them modifies its argument or shares a Variable with it, except `reinit`, which
works in place):

* `hyper_search_model(model, rngs=...)`: the Hyper-Search model, every selected conv a `CSLAConv` with
  trainable `s`, `t`, `gamma`.
* `csla_model(model, scales, rngs=...)`: the imaginary CSLA model with constant `s`, `t`.
* `merge(model)`: the plain model (original structure) equal to a Hyper-Search / CSLA model.
* `scales_of(model)`: `{kernel path: CSLAScales}` of a Hyper-Search / CSLA model, keyed by the ORIGINAL
  model's kernel paths (`'layer1/0/conv1/kernel'`); `save_scales` / `load_scales` store them.
* `scales_tree(model_or_params, scales)`: the tree `repopt_masks` / `repopt_sgd` / `repopt_adamw` take.
* `reinit(model, scales, rngs=...)`: the Rule of Initialization, in place, on a plain model.
* `weight_decay_mask(model_or_params)`: kernels (and identity weights) decay; BN, biases, 1-D scales don't.

A model path is named by `repopt_jax.paths.path_str`: attribute names, dict keys and list indices joined
by '/', e.g. `'trunk/0/kernel/kernel'` for a conv named `kernel` in a list, `'mixer/layers/3/kernel'` in an
`nnx.Sequential`.

Example:
  >>> import optax, jax.numpy as jnp
  >>> from repopt_jax import nnx_train_step, repopt_masks
  >>> from flax import nnx
  >>> class Net(nnx.Module):
  ...   def __init__(self, rngs):
  ...     self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
  ...     self.conv2 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
  ...     self.head = nnx.Linear(8, 10, rngs=rngs)
  ...   def __call__(self, x):
  ...     return self.head(nnx.relu(self.conv2(nnx.relu(self.conv1(x)))).mean((1, 2)))
  >>> hs = hyper_search_model(Net(nnx.Rngs(0)), rngs=nnx.Rngs(1))   # ... train it, then:
  >>> scales = scales_of(hs)
  >>> sorted(scales), scales['conv2/kernel']
  (['conv1/kernel', 'conv2/kernel'], CSLAScales(conv[8], pointwise, identity(trained)))
  >>> model = Net(nnx.Rngs(2))
  >>> reinit(model, scales, rngs=nnx.Rngs(3))                      # Rule of Initialization
  >>> tx = optax.chain(repopt_masks(scales_tree(model, scales)), optax.sgd(0.1, momentum=0.9))
  >>> loss_fn = lambda m, x, y: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
  >>> train_step, state = nnx_train_step(model, tx, loss_fn)     # one jax.jit over the split state
  >>> state, loss = train_step(state, jnp.ones((2, 8, 8, 3)), jnp.arange(2))
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from repopt_jax import block, rules
from repopt_jax.block import IDENTITY_PARAM, depth_init  # noqa: F401  (public here too)
from repopt_jax.paths import path_str
from repopt_jax.scales import CSLAScales, ScalesError

__all__ = ["BranchScale", "CSLAConv", "HS_INITS", "default_select", "depth_init", "hyper_search_model",
           "csla_model", "merge", "scales_of", "scales_tree", "reinit", "weight_decay_mask", "find_convs",
           "identity_allowed", "IDENTITY_PARAM"]

HS_INITS = ("depth", "ones")
Init = Union[str, Callable[[str, nnx.Conv, int], Any]]


class BranchScale(nnx.Variable):
  """A constant per-channel branch scale of a CSLA block (`s` or `t` of a CSLA model).

  Not an `nnx.Param`, so `nnx.state(model, nnx.Param)`, `nnx.grad` and `nnx.Optimizer(..., wrt=nnx.Param)`
  leave it alone, while `nnx.state(model)` (checkpoints) still carries it.
  """


def _default_kernel_init():
  # nnx.Conv's default initializer (it does not keep the one it was built with).
  return nnx.initializers.lecun_normal()


def _explicit_padding(conv: nnx.Conv):
  """The conv's padding as `[(lo, hi), ...]` per spatial dim, or the string when it depends on the input."""
  from flax.nnx.nn.linear import canonicalize_padding  # pylint: disable=g-import-not-at-top
  return canonicalize_padding(conv.padding, len(conv.kernel_size))


def _where(path) -> str:
  return path if isinstance(path, str) else path_str(path)


def identity_allowed(conv: nnx.Conv) -> bool:
  """Whether an `nnx.Conv`'s CSLA block can have an identity branch: `C_in == C_out`, stride 1, size kept
  ('SAME' padding or explicit symmetric `d(K-1)/2` padding in every spatial dim); `block.identity_allowed`.
  """
  return block.identity_allowed(conv.in_features, conv.out_features, conv.kernel_size, conv.strides,
                                _explicit_padding(conv), conv.kernel_dilation, conv.input_dilation)


def default_select(path: str, conv) -> bool:
  """The default selection: every 2-D `nnx.Conv` with an odd square kernel larger than 1.

  Any stride and `feature_group_count` (grouped, depthwise) qualify; input-dilated convs and circular,
  reflect or causal padding do not (their centre tap has no plain 1x1 counterpart).
  """
  del path
  if not isinstance(conv, nnx.Conv) or len(conv.kernel_size) != 2:
    return False
  kh, kw = conv.kernel_size
  if kh != kw or kh % 2 == 0 or kh <= 1:
    return False
  if any(d != 1 for d in block.ntuple(conv.input_dilation, 2)) or getattr(conv, "mask", None) is not None:
    return False
  pad = _explicit_padding(conv)
  return not isinstance(pad, str) or pad in ("SAME", "VALID")


def _check_supported(path: str, conv: nnx.Conv) -> None:
  if not isinstance(conv, nnx.Conv):
    raise ScalesError(f"{path}: a CSLA block needs an nnx.Conv there, found {type(conv).__name__}")
  block.check_centre_tap(conv.kernel_size, _explicit_padding(conv), conv.input_dilation, path)


class CSLAConv(nnx.Module):
  """A conv standing for a CSLA block: `s * conv(x) + t * conv_1x1(x) [+ gamma * x]` (no BN inside).

  Built by `hyper_search_model` / `csla_model` in place of a selected `nnx.Conv`; NNX users may also build
  it directly with `CSLAConv.wrap(conv, ...)`. Attributes (their names are the official code's):
  `conv` (the KxK conv, as given), `scale_conv` (`s`), `conv_1x1` (a 1x1 conv with the same stride,
  groups, bias setting and dtypes, applied to the input cropped/padded so it reads the KxK centre tap's
  pixel; None without a 1x1 branch), `scale_1x1` (`t`), `scale_identity` (`gamma`, an `nnx.Param`; only
  with an identity branch). `s`, `t` are `nnx.Param` in Hyper-Search mode (`trainable=True`), `BranchScale`
  constants otherwise.
  """

  def __init__(self, conv: nnx.Conv, conv_1x1: Optional[nnx.Conv], scale_conv, scale_1x1=None,
               scale_identity=None, *, trainable: bool = False):
    self.conv = conv
    self.conv_1x1 = conv_1x1
    self.trainable = bool(trainable)
    var = nnx.Param if trainable else BranchScale
    cout, dtype = conv.out_features, conv.param_dtype
    vec = lambda v: jnp.broadcast_to(jnp.asarray(v, dtype), (cout,))
    self.scale_conv = var(vec(scale_conv))
    self.scale_1x1 = None if conv_1x1 is None else var(vec(1.0 if scale_1x1 is None else scale_1x1))
    self.has_identity = scale_identity is not None
    if self.has_identity:
      self.scale_identity = nnx.Param(vec(scale_identity))

  @classmethod
  def wrap(cls, conv: nnx.Conv, *, rngs: nnx.Rngs, scale_conv=1.0, scale_1x1=1.0, identity=None,
           trainable: bool = False, kernel_init=None, where: str = "conv") -> "CSLAConv":
    """A `CSLAConv` around `conv` (used as is) with a fresh 1x1 branch (kernel from `kernel_init`, zero bias).

    Args:
      conv: the KxK `nnx.Conv`.
      rngs: draws the 1x1 kernel.
      scale_conv, scale_1x1: `s`, `t` (scalars or `(C_out,)`); `scale_1x1=None` for no 1x1 branch.
      identity: `gamma(0)` (scalar or `(C_out,)`), or None for no identity branch; refused where the conv
        cannot have one (`identity_allowed`).
      trainable: `s`, `t` as `nnx.Param` (Hyper-Search) or constants.
      kernel_init: the 1x1 kernel's initializer (default: Flax's conv default, lecun normal).
      where: the conv's path, for error messages.
    """
    _check_supported(where, conv)
    if identity is not None and not identity_allowed(conv):
      raise ScalesError(f"{where}: an identity branch needs C_in == C_out, stride 1 and size-keeping padding; "
                        f"this conv is {conv.in_features}->{conv.out_features}, strides {conv.strides}, "
                        f"padding {conv.padding!r}")
    pw = None
    if scale_1x1 is not None:
      pw = nnx.Conv(conv.in_features, conv.out_features, (1, 1), strides=conv.strides, padding="VALID",
                    feature_group_count=conv.feature_group_count, use_bias=conv.use_bias,
                    kernel_init=kernel_init or _default_kernel_init(), bias_init=nnx.initializers.zeros_init(),
                    dtype=conv.dtype, param_dtype=conv.param_dtype, precision=conv.precision,
                    conv_general_dilated=conv.conv_general_dilated, rngs=rngs)
    return cls(conv, pw, scale_conv, scale_1x1, identity, trainable=trainable)

  @property
  def in_features(self) -> int:
    return self.conv.in_features

  @property
  def out_features(self) -> int:
    return self.conv.out_features

  def scales(self) -> CSLAScales:
    """This block's current `CSLAScales` (host arrays; `identity_init` = the current `gamma`)."""
    host = lambda v: np.asarray(jax.device_get(v[...]))
    return CSLAScales(conv=host(self.scale_conv),
                      pointwise=None if self.scale_1x1 is None else host(self.scale_1x1),
                      identity=self.has_identity,
                      identity_init=host(self.scale_identity) if self.has_identity else None)

  def _centre_input(self, x):
    """`x` cropped/padded so that a VALID 1x1 conv with the stride reads the KxK centre tap's pixels."""
    conv = self.conv
    return block.centre_input(x, conv.kernel_size, conv.strides, _explicit_padding(conv), conv.kernel_dilation)

  def __call__(self, x):
    y = self.conv(x)
    dtype = y.dtype
    y = y * self.scale_conv[...].astype(dtype)
    if self.conv_1x1 is not None:
      y = y + self.conv_1x1(self._centre_input(x)) * self.scale_1x1[...].astype(dtype)
    if self.has_identity:
      y = y + x.astype(dtype) * self.scale_identity[...].astype(dtype)
    return y


# ---------------------------------------------------------------------------------------------- traversal
def _find(model, select=None) -> List[Tuple[str, tuple, nnx.Conv]]:
  """`[(name, graph path, conv)]` of the selected convs, in traversal order (see `find_convs`)."""
  select = select or default_select
  found, inside = [], []
  for path, node in nnx.iter_graph(model):  # post-order: a CSLAConv comes after its branch convs
    if isinstance(node, CSLAConv):
      inside.append(tuple(path))
    elif isinstance(node, nnx.Conv):
      found.append((tuple(path), node))
  out = []
  for path, node in found:
    if any(path[:len(p)] == p for p in inside):
      continue
    name = path_str(path)
    if select(name, node):
      out.append((name, path, node))
  return out


def find_convs(model: nnx.Module, select: Optional[Callable[[str, Any], bool]] = None) -> List[Tuple[str, Any]]:
  """`[(path, conv)]` of the selected convs of a model, in graph traversal order.

  Traversal order is `nnx.iter_graph`'s: depth first, a module's attributes (and dict keys) in sorted
  order, list items by index. Convs inside a `CSLAConv` are skipped (they are its branches).

  Args:
    model: an NNX module.
    select: `select(path, node) -> bool` (default `default_select`).
  """
  return [(name, node) for name, _, node in _find(model, select)]


def _csla_blocks(model) -> List[Tuple[str, tuple, CSLAConv]]:
  """`[(original kernel path, graph path, block)]` of the `CSLAConv`s of a model."""
  out = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, CSLAConv):
      out.append((path_str(tuple(path) + ("kernel",)), tuple(path), node))
  return out


def _get(node, key):
  if isinstance(node, (nnx.List, list, tuple, Mapping, nnx.Dict)) or hasattr(node, "__getitem__") and not isinstance(
      node, nnx.Module):
    return node[key]
  return getattr(node, key)


def _replace(root, path: tuple, new) -> None:
  """Puts `new` at graph path `path` of `root` (attribute, list item or dict entry)."""
  if not path:
    raise ScalesError("the model itself is a conv: wrap it in a module to re-parameterize it")
  parent = root
  for k in path[:-1]:
    parent = _get(parent, k)
  key = path[-1]
  if isinstance(parent, tuple):
    raise ScalesError(f"{path_str(path)}: the conv sits in a tuple, which cannot be modified; use nnx.List")
  if isinstance(parent, (nnx.List, list, nnx.Dict, dict)) or (
      not isinstance(parent, nnx.Module) and hasattr(parent, "__setitem__")):
    parent[key] = new
  else:
    setattr(parent, key, new)


# ---------------------------------------------------------------------------------------------- inits
def run_indices(convs: Sequence[nnx.Conv]) -> List[int]:
  """Each conv's position in its *run*, the unit of the `'depth'` init.

  A run is a maximal sequence of consecutive selected convs (in traversal order) in which every conv after
  the first can have an identity branch (`identity_allowed`: `C_in == C_out`, stride 1, size kept) and
  reads the previous conv's width (`in_features` equal to the previous `out_features`). A conv without an
  identity branch (a stem, a stride-2 or width-changing conv) starts a run. In RepOpt-VGG this is exactly a
  stage (the official `1.0, sqrt(2), 1, sqrt(2/3), ...`); in a ResNet, the convs of a stage.
  """
  out, prev = [], None
  for conv in convs:
    cont = prev is not None and identity_allowed(conv) and conv.in_features == prev.out_features
    out.append(out[-1] + 1 if cont else 0)
    prev = conv
  return out


def _init_values(init: Init, found) -> List[Any]:
  if callable(init):
    idx = run_indices([c for _, _, c in found])
    return [init(name, conv, i) for (name, _, conv), i in zip(found, idx)]
  if init == "depth":
    return [depth_init(i) for i in run_indices([c for _, _, c in found])]
  if init == "ones":
    return [1.0] * len(found)
  raise ScalesError(f"hyper_search_model: unknown init {init!r}; valid: {', '.join(HS_INITS)} or a callable")


# ---------------------------------------------------------------------------------------------- surgery
def hyper_search_model(model: nnx.Module, *, rngs: nnx.Rngs, select=None, init: Init = "depth",
                       identity: bool = True, pointwise: bool = True, kernel_init=None) -> nnx.Module:
  """The Hyper-Search model of `model`: every selected conv a `CSLAConv` with trainable `s`, `t`, `gamma`.

  The KxK kernels (and biases) are copies of the original convs'; the 1x1 kernels are freshly drawn, their
  biases zero. Everything else (BatchNorm, activations, residual adds, heads, attention) is untouched: the
  result is a deep copy of `model` with the selected convs replaced (the argument is left as it was).

  Args:
    model: any NNX module; convs may live in attributes, `nnx.List`, `nnx.Dict`, `nnx.Sequential` or nested
      modules.
    rngs: `nnx.Rngs` for the 1x1 kernels.
    select: `select(path, conv) -> bool` (default `default_select`: odd square kernels larger than 1).
    init: initial `s` = `t`: `'depth'` (the official rule, see `run_indices`), `'ones'`, or a callable
      `init(path, conv, run_index) -> scalar or (C_out,)`. `gamma` starts at 1.
    identity: give the blocks that can have one (`identity_allowed`) an identity branch.
    pointwise: give every block a 1x1 branch (False: KxK and identity only, as RepOpt-GhostNet's blocks).
    kernel_init: initializer of the 1x1 kernels (default Flax's conv default).

  Returns:
    A new `nnx.Module`; `scales_of(result)` reads the scales it learns.
  """
  new = nnx.clone(model)
  found = _find(new, select)
  if not found:
    raise ScalesError("hyper_search_model: no conv selected (default: 2-D nnx.Conv with an odd square kernel > 1)")
  for (name, path, conv), v in zip(found, _init_values(init, found)):
    gamma = 1.0 if identity and identity_allowed(conv) else None
    _replace(new, path, CSLAConv.wrap(conv, rngs=rngs, scale_conv=v, scale_1x1=v if pointwise else None,
                                      identity=gamma,
                                      trainable=True, kernel_init=kernel_init, where=name))
  return new


def _split_key(name: str) -> str:
  if not name.endswith("/kernel") and name != "kernel":
    raise ScalesError(f"scales[{name!r}]: keys are kernel paths ending in '/kernel' (e.g. 'layer1/0/conv1/kernel')")
  return name[: -len("/kernel")] if name != "kernel" else ""


def _convs_for(model, scales: Mapping[str, CSLAScales], fn: str) -> List[Tuple[str, tuple, nnx.Conv]]:
  """`[(kernel path, graph path, conv)]` for every entry of `scales`, checked against the convs."""
  if not isinstance(scales, Mapping):
    raise ScalesError(f"{fn}: scales must be a dict {{kernel_path: CSLAScales}}, got {type(scales).__name__}")
  by_name = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Conv):
      by_name[path_str(tuple(path) + ("kernel",))] = (tuple(path), node)
  out = []
  for name, s in scales.items():
    _split_key(name)
    if name not in by_name:
      near = [k for k in by_name if k.split("/")[-2:] == name.split("/")[-2:]][:3]
      raise ScalesError(f"{fn}: scales[{name!r}] names no conv kernel of the model"
                        + (f" (similar: {', '.join(near)})" if near else f" ({len(by_name)} convs)"))
    path, conv = by_name[name]
    if not isinstance(s, CSLAScales):
      raise ScalesError(f"{fn}: scales[{name!r}] is a {type(s).__name__}, not CSLAScales")
    rules.check_kernel(s, conv.kernel.shape, name)
    if s.extra:
      raise ScalesError(f"{name}: extra branches {[k for k, _ in s.extra]} are not built by {fn} "
                        "(the optimizer handles them; the CSLA surgery builds KxK, 1x1 and identity)")
    _check_supported(name, conv)
    if s.identity and not identity_allowed(conv):
      raise ScalesError(f"{name}: the scales have an identity branch but this conv cannot "
                        f"({conv.in_features}->{conv.out_features}, strides {conv.strides}, padding {conv.padding!r})")
    out.append((name, path, conv))
  return out


def csla_model(model: nnx.Module, scales: Mapping[str, CSLAScales], *, rngs: nnx.Rngs,
               kernel_init=None) -> nnx.Module:
  """The imaginary CSLA model a RepOptimizer with `scales` stands for.

  A deep copy of `model` in which the conv of every kernel named in `scales` becomes a `CSLAConv` with the
  constant `s`, `t` (`BranchScale`, not `nnx.Param`), the identity weights `gamma` (an `nnx.Param`)
  starting at `identity_init` (ones when absent), the KxK kernel copied, the 1x1 kernel freshly drawn with
  `kernel_init` and every branch bias zero.

  Args:
    model: a plain NNX model.
    scales: `{kernel path: CSLAScales}` (from `scales_of`, `load_scales`, ...).
    rngs: `nnx.Rngs` for the 1x1 kernels.
    kernel_init: the 1x1 kernels' initializer (default Flax's conv default).

  Returns:
    A new `nnx.Module`. Train it with plain SGD and `merge` of its start with `repopt_sgd`: the two follow
    the same trajectory.
  """
  new = nnx.clone(model)
  for name, path, conv in _convs_for(new, scales, "csla_model"):
    s = scales[name]
    gamma = None
    if s.identity:
      gamma = 1.0 if s.identity_init is None else np.asarray(s.identity_init)
    if conv.use_bias:  # branch biases start at zero (the KxK one too: a fresh branch, like the 1x1)
      conv.bias[...] = jnp.zeros_like(conv.bias[...])
    _replace(new, path, CSLAConv.wrap(conv, rngs=rngs, scale_conv=np.asarray(s.conv),
                                      scale_1x1=None if s.pointwise is None else np.asarray(s.pointwise),
                                      identity=gamma, trainable=False, kernel_init=kernel_init, where=name))
  return new


def merge(model: nnx.Module) -> nnx.Module:
  """The plain model equal to a Hyper-Search or CSLA model: each `CSLAConv` back to its KxK `nnx.Conv`.

  .. math::
    W = s \\odot W_k + t \\odot \\mathrm{pad}(W_1) + \\mathrm{diag}(\\gamma), \\qquad b = s \\odot b_k + t \\odot b_1

  (`block.merge_arrays`), in the parameters' dtype. Everything else is copied. Applied to a
  freshly built `csla_model` this is the Rule of Initialization with its own branch kernels; applied to a
  trained one, the deployed network.

  Returns:
    A new `nnx.Module` with the structure of the model the surgery started from.
  """
  new = nnx.clone(model)
  blocks = _csla_blocks(new)
  if not blocks:
    raise ScalesError("merge: the model has no CSLAConv (build it with hyper_search_model or csla_model)")
  for name, path, blk in blocks:
    conv = blk.conv
    pw = blk.conv_1x1
    v = lambda x: None if x is None else x[...]
    kernel, bias = block.merge_arrays(
        conv.kernel[...], None if pw is None else pw.kernel[...], blk.scale_conv[...],
        v(blk.scale_1x1), blk.scale_identity[...] if blk.has_identity else None,
        v(conv.bias) if conv.use_bias else None,
        v(pw.bias) if pw is not None and pw.use_bias else None)
    conv.kernel[...] = kernel
    if bias is not None:
      conv.bias[...] = bias
    _replace(new, path, conv)
  return new


def scales_of(model) -> Dict[str, CSLAScales]:
  """The scales of a Hyper-Search or CSLA model: `{original kernel path: CSLAScales}`, traversal order.

  Each block gives `CSLAScales(conv=s, pointwise=t, identity=..., identity_init=gamma)` with the current
  values. Keys are the kernel paths of the model the surgery started from (`'layer1/0/conv1/kernel'`),
  so the dict goes straight to `scales_tree`, `reinit`, `csla_model` and `save_scales`. A Linen params dict
  of `repopt_jax.linen.CSLAConv` layers (Hyper-Search mode) is read too.
  """
  if not isinstance(model, nnx.Module):
    return block.scales_of_params(model)
  return {name: blk.scales() for name, _, blk in _csla_blocks(model)}


# ---------------------------------------------------------------------------------------------- optimizer
def _params_of(model_or_params):
  if isinstance(model_or_params, nnx.Module):
    return nnx.as_pure(nnx.state(model_or_params, nnx.Param))
  if isinstance(model_or_params, nnx.State):
    return nnx.as_pure(model_or_params)
  return model_or_params


def scales_tree(model_or_params, scales: Mapping[str, CSLAScales]):
  """The scales tree for `repopt_masks` / `repopt_sgd` / `repopt_adamw`: `CSLAScales` on each kernel named
  in `scales` (and on its conv's bias), None on every other parameter (`block.scales_tree` on the params).

  Args:
    model_or_params: a plain NNX model (its `nnx.Param`s; the convs are checked too: identity branches only
      where `identity_allowed`), an `nnx.State` of params, or a Linen params dict (`variables['params']`).
    scales: `{kernel path: CSLAScales}`.

  Returns:
    A tree shaped like the params (an `nnx.State` for a model or state, a dict for a dict).

  Raises:
    ScalesError: naming the path of a scales entry that names no kernel, a kernel of another shape (channel
      count), an identity branch on a conv that cannot have one, or a leaf that is not `CSLAScales`.
  """
  if not isinstance(scales, Mapping):
    raise ScalesError(f"scales_tree: scales must be a dict {{kernel_path: CSLAScales}}, got {type(scales).__name__}")
  if isinstance(model_or_params, nnx.Module):
    _convs_for(model_or_params, scales, "scales_tree")
  return block.scales_tree(_params_of(model_or_params), scales)


def weight_decay_mask(model_or_params):
  """Which parameters decay, by the official rule (`block.weight_decay_mask`): kernels and the identity
  weights `gamma` do; BatchNorm, biases and Hyper-Search's trainable `s`, `t` (1-D) do not. Exact for
  RepOptimizer: decaying every branch of a CSLA block decays their sum, the merged kernel.

  Args:
    model_or_params: an NNX model (its `nnx.Param`s), an `nnx.State` or a Linen params dict.

  Returns:
    A tree of bools shaped like the params, for `optax.add_decayed_weights(wd, mask)` or
    `repopt_sgd(..., weight_decay_mask=mask)`.
  """
  return block.weight_decay_mask(_params_of(model_or_params))


# ---------------------------------------------------------------------------------------------- init
def reinit(model: nnx.Module, scales: Mapping[str, CSLAScales], *, rngs: nnx.Rngs, kernel_init=None,
           identity: str = "trained") -> None:
  """The Rule of Initialization (eq. 14), in place, on the convs of a plain model named in `scales`.

  .. math::
    W'(0) = s \\odot W_k(0) + t \\odot \\mathrm{pad}(W_1(0)) + \\mathrm{diag}(\\gamma(0))

  with both branch kernels freshly drawn with `kernel_init` (default Flax's conv default, lecun normal:
  `nnx.Conv` does not keep the initializer it was built with) and `gamma(0)` from `identity_init` (ones
  when absent, or with `identity='ones'`). A conv bias becomes zero (fresh branch biases start at zero, as
  in `csla_model`, so `s * b_k + t * b_1 = 0`). Nothing else changes.

  Args:
    model: a plain NNX model (modified in place).
    scales: `{kernel path: CSLAScales}`.
    rngs: `nnx.Rngs` for the fresh kernels.
    kernel_init: `init(key, shape, dtype)` of both branch kernels.
    identity: 'trained' or 'ones'.
  """
  if identity not in ("trained", "ones"):
    raise ScalesError(f"reinit: unknown identity={identity!r}; valid: trained, ones")
  kernel_init = kernel_init or _default_kernel_init()
  for name, _, conv in _convs_for(model, scales, "reinit"):
    s = scales[name]
    shape, dtype = conv.kernel.shape, conv.kernel.dtype
    wk = kernel_init(rngs.params(), shape, dtype)
    w1 = None if s.pointwise is None else kernel_init(rngs.params(), (1, 1) + tuple(shape[2:]), dtype)
    gamma = None
    if s.identity:
      gamma = jnp.ones(shape[-1], dtype) if identity == "ones" or s.identity_init is None else jnp.asarray(
          s.identity_init, dtype)
    kernel, bias = block.merge_arrays(wk, w1, jnp.asarray(s.conv, dtype),
                                      None if s.pointwise is None else jnp.asarray(s.pointwise, dtype), gamma,
                                      jnp.zeros_like(conv.bias[...]) if conv.use_bias else None,
                                      jnp.zeros_like(conv.bias[...]) if conv.use_bias and w1 is not None else None)
    conv.kernel[...] = kernel
    if bias is not None:
      conv.bias[...] = bias
