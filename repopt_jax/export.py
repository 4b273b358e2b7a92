"""Deployment: a trained network as an ONNX file (fp32 or INT8) or a serialized StableHLO module.

What is exported is the *deployed* network: a stack of `conv + bias + ReLU` layers (BatchNorm folded into
the convs, RepVGG branches fused first), global average pooling and a dense head, the same function as the
JAX model in eval mode. It is found by a graph walk (`deployed_network`) that works on any Flax NNX model
whose `nnx.Conv` / `nnx.BatchNorm` / `nnx.Linear` calls (recorded in call order by running the model
abstractly) form the chain `(Conv [BatchNorm] ReLU)* -> global average pool -> Linear`: a RepOpt-VGG or plain
VGG in target mode, the README's custom `Net`. A RepOpt-VGG in `repvgg` mode is fused and one in `csla` mode
converted to its target model first (a model of the generic `repopt_jax.csla` surgery is merged); Hyper-Search
models are refused. The walk's result is checked numerically against the model itself, so a model that does
something else (another activation, max pooling, a residual connection) is refused instead of exported wrong.

* ONNX (`to_onnx`): built with the `onnx` package's own helpers, opset 17 (IR version 8). Input `images`,
  the normalised images as the project's data pipeline produces them, NHWC by default (one `Transpose` to
  NCHW at the input; `layout='nchw'` takes NCHW and has none), batch dynamic by default; output `logits`.
  Nodes: `Conv` (with bias) + `Relu` per layer, `GlobalAveragePool`, `Flatten`, `Gemm`.
* INT8 (`quantize_onnx`): onnxruntime's static quantization, QDQ format, int8 weights symmetric per tensor
  (per output channel with `per_channel=True`), uint8 activations with MinMax calibration on training images
  read through the project's data pipeline.
* StableHLO (`to_stablehlo`): `jax.export` of the deployed network (float32, HIGHEST precision, symbolic
  batch by default); `Exported.serialize()` bytes on disk, `load_stablehlo(path).call(x)` runs them.

A run directory (see `repopt_jax.runs`) is only read: `export_run` and `evaluate_onnx` write nothing there.

Example:
  >>> from flax import nnx
  >>> from repopt_jax.models import RepOptVGG
  >>> model = RepOptVGG('tiny', 'target', num_classes=10, in_channels=1, rngs=nnx.Rngs(0))
  >>> net = deployed_network(model, image_size=32)        # doctest: +SKIP
  >>> proto = to_onnx(net)                                 # doctest: +SKIP
  >>> [n.op_type for n in proto.graph.node][:3]            # doctest: +SKIP
  ['Transpose', 'Conv', 'Relu']
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["ExportError", "ConvLayer", "DeployedNetwork", "deployed_network", "apply_deployed", "to_onnx",
           "save_onnx", "float32_compute", "onnx_session", "run_onnx", "quantize_onnx", "to_stablehlo", "save_stablehlo",
           "load_stablehlo", "calibration_images", "export_run", "evaluate_onnx", "OPSET", "FORMATS", "LAYOUTS"]

OPSET = 17
IR_VERSION = 8
FORMATS = ("onnx", "stablehlo")
LAYOUTS = ("nhwc", "nchw")
# The graph walk is checked against the model on a random batch: max|delta| / max|logit| must be below this.
WALK_TOLERANCE = 1e-4


class ExportError(ValueError):
  """An export or ONNX-evaluation request that cannot be carried out; the message names the culprit."""


@dataclasses.dataclass
class ConvLayer:
  """One deployed conv layer: `relu(conv(x, kernel) + bias)` (ReLU when `relu`).

  Attributes:
    kernel: float32 `(kh, kw, C_in / groups, C_out)` (Flax's HWIO), BatchNorm folded in.
    bias: float32 `(C_out,)`.
    strides, dilations: `(sh, sw)`.
    pads: `((top, bottom), (left, right))`, explicit.
    groups: feature groups.
    relu: whether a ReLU follows.
    name: where the conv lives in the model (e.g. `stage2.1.conv`).
  """
  kernel: np.ndarray
  bias: np.ndarray
  strides: Tuple[int, int]
  pads: Tuple[Tuple[int, int], Tuple[int, int]]
  dilations: Tuple[int, int] = (1, 1)
  groups: int = 1
  relu: bool = True
  name: str = ""


@dataclasses.dataclass
class DeployedNetwork:
  """The deployed form of a network: conv layers, global average pooling, a dense head (float32 numpy).

  Attributes:
    convs: the conv layers in order.
    head_kernel: `(features, num_classes)`; head_bias: `(num_classes,)`.
    image_size: `(H, W)` the network is exported for; in_channels: `C`.
    name: a label (architecture and mode) written into the files' metadata.
  """
  convs: List[ConvLayer]
  head_kernel: np.ndarray
  head_bias: np.ndarray
  image_size: Tuple[int, int]
  in_channels: int
  name: str = "network"

  @property
  def num_classes(self) -> int:
    return int(self.head_kernel.shape[1])

  @property
  def num_params(self) -> int:
    return int(sum(c.kernel.size + c.bias.size for c in self.convs) + self.head_kernel.size + self.head_bias.size)


# ------------------------------------------------------------------------------------------------ graph walk
def _host64(x) -> np.ndarray:
  import jax  # pylint: disable=g-import-not-at-top
  return np.asarray(jax.device_get(x[...] if hasattr(x, "value") else x), np.float64)


def _pair(v, what: str, name: str) -> Tuple[int, int]:
  if isinstance(v, (int, np.integer)):
    return int(v), int(v)
  v = tuple(int(a) for a in v)
  if len(v) != 2:
    raise ExportError(f"{name}: {what} {v!r} is not 2-D (only 2-D convs are exported)")
  return v


def _explicit_pads(conv, size: Tuple[int, int], strides, dilations, name: str):
  """`((top, bottom), (left, right))` of an nnx.Conv's padding for an input of `size`."""
  k = conv.kernel_size
  pad = conv.padding
  if isinstance(pad, str):
    p = pad.upper()
    if p == "VALID":
      return ((0, 0), (0, 0))
    if p == "SAME":  # XLA's SAME: the output is ceil(in / stride); the odd pixel goes to the end
      out = []
      for n, kk, s, d in zip(size, k, strides, dilations):
        eff = (kk - 1) * d + 1
        total = max((-(-n // s) - 1) * s + eff - n, 0)
        out.append((total // 2, total - total // 2))
      return tuple(out)
    raise ExportError(f"{name}: padding {pad!r} has no ONNX Conv equivalent (use explicit, SAME or VALID)")
  if isinstance(pad, (int, np.integer)):
    return ((int(pad), int(pad)), (int(pad), int(pad)))
  pad = list(pad)
  if len(pad) != 2:
    raise ExportError(f"{name}: padding {pad!r} is not 2-D")
  out = []
  for p in pad:
    if isinstance(p, (int, np.integer)):
      out.append((int(p), int(p)))
    else:
      lo, hi = p
      out.append((int(lo), int(hi)))
  return tuple(out)


def _call_order(model, shape):
  """`(path, module, input shape)` of every nnx.Conv / BatchNorm / Linear call of `model(x)`, in call order.

  Found by running the model abstractly (`jax.eval_shape`) with those classes' `__call__` wrapped to record
  the calls: the order attributes are stored in says nothing (NNX sorts them when it rebuilds a model).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  paths = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, (nnx.Conv, nnx.BatchNorm, nnx.Linear)) and id(node) not in paths:
      paths[id(node)] = ".".join(str(p) for p in path)
  records = []
  classes = (nnx.Conv, nnx.BatchNorm, nnx.Linear)
  originals = {cls: cls.__dict__["__call__"] for cls in classes}

  def wrapped(orig):
    def call(self, x, *args, **kwargs):
      records.append((paths.get(id(self), type(self).__name__), self, tuple(x.shape)))
      return orig(self, x, *args, **kwargs)
    return call

  try:
    for cls, orig in originals.items():
      cls.__call__ = wrapped(orig)
    jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct(shape, jax.numpy.float32))
  except ExportError:
    raise
  except Exception as e:  # the model's own error for an input it cannot take
    raise ExportError(f"{type(model).__name__} does not run on a {shape} input: {' '.join(str(e).split())[:300]}"
                      ) from None
  finally:
    for cls, orig in originals.items():
      cls.__call__ = orig
  return records


def _plain_model(model, what: str):
  """A RepOpt-VGG in a deployable mode (`repvgg` fused, `csla` converted); others as they are."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from repopt_jax.models import RepOptVGG, reparam  # pylint: disable=g-import-not-at-top
  if not isinstance(model, RepOptVGG):
    # A model of the generic CSLA surgery (`repopt_jax.csla`): constant scales merge into plain convs.
    try:
      from repopt_jax import csla  # pylint: disable=g-import-not-at-top
    except ImportError:
      return model
    blocks = [m for _, m in nnx.iter_graph(model) if isinstance(m, getattr(csla, "CSLAConv", ()))]
    if not blocks:
      return model
    if any(getattr(b, "trainable", False) for b in blocks):
      raise ExportError(f"{what} is a Hyper-Search model (trainable CSLA scales): a search model, not a "
                        "deployable network; export the model trained with its scales (train --scales)")
    return csla.merge(model)
  if model.mode == "hs":
    raise ExportError(f"{what} is a Hyper-Search model (mode 'hs'): its branch scales are trainable, so it is a "
                      "search model, not a deployable network; export the RepOpt-VGG trained with its scales "
                      "(python -m repopt_jax train CONFIG --scales SCALES.npz) or a RepVGG run fused by "
                      "`python -m repopt_jax fuse`")
  if model.mode == "repvgg":
    return reparam.fuse_repvgg(model)
  if model.mode == "csla":
    return reparam.target_from_csla(model)
  return model


def float32_compute(model):
  """A copy of `model` computing in float32 (a `train.compute_dtype=bfloat16` run's model computes in bfloat16;
  its params are float32, and the deployed network is float32)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  low = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module) and getattr(m, "dtype", None) not in
         (None, jnp.float32)]
  if not low:
    return model
  model = nnx.clone(model)
  model.set_attributes(dtype=jnp.float32, raise_if_not_found=False)
  return model


def _logits_jit(model, x):
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(model)
  return np.asarray(jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))(state, x))


def deployed_network(model, image_size: Union[int, Tuple[int, int]], *, in_channels: Optional[int] = None,
                     name: Optional[str] = None, check: bool = True) -> DeployedNetwork:
  """The deployed form of an NNX model in eval mode: conv + bias + ReLU layers, average pool, dense head.

  Args:
    model: an NNX model (it is put in eval mode: BatchNorm uses its running statistics; a model computing in
      bfloat16 is compared in float32, `float32_compute`). A `RepOptVGG` in mode
      'repvgg' is fused and one in 'csla' converted to its target model first; 'hs' is refused (so is a
      Hyper-Search model of `repopt_jax.csla`; a CSLA one is merged). Any model's `nnx.Conv` / `nnx.BatchNorm`
      / `nnx.Linear` calls must form the chain `(Conv [BatchNorm] ReLU)* -> global average pool -> Linear`.
    image_size: the input side (or `(H, W)`) the network is exported for.
    in_channels: input channels (default: the first conv's).
    name: a label for the metadata.
    check: run the model and the walk's result on a random batch and raise when they differ (the walk
      assumes the ReLUs and the pooling; this is what makes that safe).

  Returns:
    A `DeployedNetwork` (float32 numpy weights; folding is done in float64).

  Raises:
    ExportError: an hs model, a module the walk does not know, or a model that is not such a stack.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  what = name or type(model).__name__
  plain = float32_compute(_plain_model(model, what))
  plain.eval()
  size = (int(image_size), int(image_size)) if np.isscalar(image_size) else tuple(int(s) for s in image_size)
  cin = int(in_channels or getattr(plain, "in_channels", 0) or 0)
  if not cin:
    first = next((m for _, m in nnx.iter_graph(plain) if isinstance(m, nnx.Conv)), None)
    if first is None:
      raise ExportError(f"{what}: no nnx.Conv in the model; nothing to export as a conv network")
    cin = int(first.in_features)
  calls = _call_order(plain, (1, *size, cin))
  if len({id(m) for _, m, _ in calls}) != len(calls):
    raise ExportError(f"{what}: a module is called more than once (shared weights); not exported")
  mods = [(p, m) for p, m, _ in calls]
  shapes = [s for _, _, s in calls]
  if not mods or not isinstance(mods[-1][1], nnx.Linear):
    raise ExportError(f"{what}: the deployed network must end in one nnx.Linear head after global average "
                      "pooling; this model has none last")
  convs: List[ConvLayer] = []
  i = 0
  while i < len(mods) - 1:
    path, m = mods[i]
    if not isinstance(m, nnx.Conv):
      kind = "an nnx.Linear" if isinstance(m, nnx.Linear) else "a BatchNorm without a conv before it"
      hint = (" (a multi-branch block? fuse it first, e.g. reparam.fuse_repvgg)"
              if isinstance(m, nnx.BatchNorm) else "")
      raise ExportError(f"{what}: {path} is {kind}; only (Conv [BatchNorm] ReLU)* -> pool -> Linear is "
                        f"exported{hint}")
    if len(m.kernel_size) != 2:
      raise ExportError(f"{what}: {path} is not a 2-D conv (kernel {m.kernel_size})")
    if _pair(m.input_dilation, "input_dilation", path) != (1, 1):
      raise ExportError(f"{path}: input dilation (transposed conv) is not exported")
    prev = convs[-1].kernel.shape[-1] if convs else cin
    if m.in_features != prev or shapes[i][-1] != prev:
      raise ExportError(f"{what}: {path} takes {m.in_features} channels where the conv stack so far gives {prev}; "
                        "the model is not a plain (Conv [BatchNorm] ReLU)* -> pool -> Linear chain (a residual or "
                        "branching network?) and cannot be exported by this walk")
    strides = _pair(m.strides, "strides", path)
    dil = _pair(m.kernel_dilation, "kernel_dilation", path)
    pads = _explicit_pads(m, shapes[i][1:3], strides, dil, path)
    kernel = _host64(m.kernel)
    bias = _host64(m.bias) if m.use_bias and m.bias is not None else np.zeros(kernel.shape[-1])
    if i + 1 < len(mods) and isinstance(mods[i + 1][1], nnx.BatchNorm):
      bn = mods[i + 1][1]
      c = kernel.shape[-1]
      if bn.num_features != c or bn.axis not in (-1, 3):
        raise ExportError(f"{what}: {mods[i + 1][0]} does not normalise the {c} channels of {path}")
      scale = _host64(bn.scale) if bn.use_scale else np.ones(c)
      shift = _host64(bn.bias) if bn.use_bias else np.zeros(c)
      a = scale / np.sqrt(_host64(bn.var) + float(bn.epsilon))
      kernel, bias = kernel * a, (bias - _host64(bn.mean)) * a + shift
      i += 1
    i += 1
    convs.append(ConvLayer(kernel=kernel.astype(np.float32), bias=bias.astype(np.float32), strides=strides,
                           pads=pads, dilations=dil, groups=int(m.feature_group_count), name=path))
  if not convs:
    raise ExportError(f"{what}: no nnx.Conv before the head; nothing to export as a conv network")
  head = mods[-1][1]
  head_k = _host64(head.kernel)
  head_b = _host64(head.bias) if head.use_bias and head.bias is not None else np.zeros(head_k.shape[1])
  if head_k.shape[0] != convs[-1].kernel.shape[-1]:
    raise ExportError(f"{what}: the head {mods[-1][0]} takes {head_k.shape[0]} features, the last conv gives "
                      f"{convs[-1].kernel.shape[-1]}")
  net = DeployedNetwork(convs=convs, head_kernel=head_k.astype(np.float32), head_bias=head_b.astype(np.float32),
                        image_size=size, in_channels=cin, name=what)
  if check:
    x = np.random.default_rng(0).standard_normal((2, *size, cin)).astype(np.float32)
    want = _logits_jit(plain, x)
    try:
      got = np.asarray(apply_deployed(net, x))
    except (TypeError, ValueError) as e:
      raise ExportError(f"{what}: the conv stack found does not run as a chain ({' '.join(str(e).split())[:200]}); "
                        "not a plain (Conv [BatchNorm] ReLU)* -> pool -> Linear network") from None
    rel = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
    if not rel <= WALK_TOLERANCE:
      raise ExportError(f"{what}: the model is not a plain (Conv [BatchNorm] ReLU)* -> global average pool -> "
                        f"Linear network (its logits differ from that graph's by {rel:.1e} of their size); "
                        "it cannot be exported by this walk")
  return net


def apply_deployed(net: DeployedNetwork, x, layout: str = "nhwc"):
  """The deployed network in JAX (float32, HIGHEST precision): logits of images `x`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  x = jnp.asarray(x, jnp.float32)
  if layout == "nchw":
    x = jnp.transpose(x, (0, 2, 3, 1))
  for c in net.convs:
    x = jax.lax.conv_general_dilated(x, jnp.asarray(c.kernel), c.strides, c.pads, rhs_dilation=c.dilations,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c.groups,
                                     precision=jax.lax.Precision.HIGHEST) + jnp.asarray(c.bias)
    if c.relu:
      x = jax.nn.relu(x)
  x = jnp.mean(x, axis=(1, 2))
  return jnp.dot(x, jnp.asarray(net.head_kernel), precision=jax.lax.Precision.HIGHEST) + jnp.asarray(net.head_bias)


def _check_layout(layout: str) -> str:
  if layout not in LAYOUTS:
    raise ExportError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
  return layout


def _check_batch(batch_size) -> Optional[int]:
  if batch_size is None or batch_size == "dynamic":
    return None
  try:
    b = int(batch_size)
  except (TypeError, ValueError):
    b = 0
  if b < 1:
    raise ExportError(f"batch size {batch_size!r}: expected a positive integer or 'dynamic'")
  return b


# ------------------------------------------------------------------------------------------------ ONNX
def to_onnx(net: DeployedNetwork, *, layout: str = "nhwc", batch_size=None, metadata: Optional[dict] = None):
  """The deployed network as an `onnx.ModelProto` (opset 17), checked by `onnx.checker`.

  Args:
    net: from `deployed_network`.
    layout: 'nhwc' (default; one Transpose at the input) or 'nchw'.
    batch_size: None / 'dynamic' (default: a symbolic `batch` dimension) or a fixed positive integer.
    metadata: extra `metadata_props` (string values).
  """
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import TensorProto, helper, numpy_helper  # pylint: disable=g-import-not-at-top

  layout = _check_layout(layout)
  b = _check_batch(batch_size)
  bdim = "batch" if b is None else b
  h, w = net.image_size
  shape = [bdim, h, w, net.in_channels] if layout == "nhwc" else [bdim, net.in_channels, h, w]
  inputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)]
  outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [bdim, net.num_classes])]
  nodes, inits = [], []
  x = "images"
  if layout == "nhwc":
    nodes.append(helper.make_node("Transpose", [x], ["images_nchw"], perm=[0, 3, 1, 2], name="to_nchw"))
    x = "images_nchw"
  for i, c in enumerate(net.convs):
    wname, bname, y = f"conv{i}.weight", f"conv{i}.bias", f"conv{i}"
    inits.append(numpy_helper.from_array(np.ascontiguousarray(c.kernel.transpose(3, 2, 0, 1)), wname))  # OIHW
    inits.append(numpy_helper.from_array(c.bias, bname))
    (pt, pb), (pl, pr) = c.pads
    nodes.append(helper.make_node("Conv", [x, wname, bname], [y], name=f"conv{i}",
                                  kernel_shape=list(c.kernel.shape[:2]), strides=list(c.strides),
                                  pads=[pt, pl, pb, pr], dilations=list(c.dilations), group=c.groups))
    x = y
    if c.relu:
      nodes.append(helper.make_node("Relu", [x], [f"relu{i}"], name=f"relu{i}"))
      x = f"relu{i}"
  nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"))
  nodes.append(helper.make_node("Flatten", ["pooled"], ["features"], axis=1, name="flatten"))
  inits.append(numpy_helper.from_array(net.head_kernel, "head.weight"))
  inits.append(numpy_helper.from_array(net.head_bias, "head.bias"))
  nodes.append(helper.make_node("Gemm", ["features", "head.weight", "head.bias"], ["logits"], name="head"))
  graph = helper.make_graph(nodes, "repopt_jax_deployed", inputs, outputs, initializer=inits)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="repopt_jax",
                            ir_version=IR_VERSION)
  meta = {"layout": layout.upper(), "network": net.name, "image_size": f"{h}x{w}",
          "in_channels": str(net.in_channels), "num_classes": str(net.num_classes)}
  meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
  helper.set_model_props(model, meta)
  onnx.checker.check_model(model)
  return model


def _prepare_out(out: str, what: str = "--out") -> str:
  """The absolute output path, its parent folder created; ExportError when it cannot be written."""
  path = os.path.abspath(os.path.expanduser(str(out)))
  parent = os.path.dirname(path)
  if os.path.isdir(path):
    raise ExportError(f"{what} {out}: is a directory; give a file name")
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise ExportError(f"{what} {out}: cannot create its folder {parent}: {e.strerror or e}") from None
  if not os.access(parent, os.W_OK):
    raise ExportError(f"{what} {out}: folder {parent} is not writable")
  return path


def _write_bytes(path: str, data: bytes, what: str = "--out") -> None:
  try:
    with open(path + ".tmp", "wb") as f:
      f.write(data)
    os.replace(path + ".tmp", path)
  except OSError as e:
    raise ExportError(f"{what} {path}: cannot be written: {e.strerror or e}") from None


def save_onnx(model_proto, out: str) -> str:
  """Writes an ONNX model (parent folders created); returns the absolute path."""
  path = _prepare_out(out)
  _write_bytes(path, model_proto.SerializeToString())
  return path


def onnx_session(path_or_bytes, threads: Optional[int] = None):
  """An onnxruntime CPU `InferenceSession` (ExportError for a file that is missing or not ONNX)."""
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  if isinstance(path_or_bytes, str) and not os.path.isfile(os.path.expanduser(path_or_bytes)):
    raise ExportError(f"{path_or_bytes}: no such ONNX file")
  opts = ort.SessionOptions()
  opts.log_severity_level = 3
  if threads:
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
  src = os.path.expanduser(path_or_bytes) if isinstance(path_or_bytes, str) else path_or_bytes
  try:
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
  except Exception as e:  # onnxruntime raises its own exception types for unreadable files
    raise ExportError(f"{path_or_bytes if isinstance(path_or_bytes, str) else 'model'}: onnxruntime cannot load "
                      f"it: {' '.join(str(e).split())[:300]}") from None


def run_onnx(session, images: np.ndarray) -> np.ndarray:
  """Logits of `images` (in the file's layout) from an onnxruntime session."""
  name = session.get_inputs()[0].name
  return session.run(None, {name: np.ascontiguousarray(images, np.float32)})[0]


class _Calibration:
  """onnxruntime's CalibrationDataReader protocol over an array of images, in batches."""

  def __init__(self, images: np.ndarray, input_name: str, batch: int = 32):
    self.images, self.name, self.batch, self.pos = images, input_name, batch, 0

  def get_next(self):
    if self.pos >= len(self.images):
      return None
    out = {self.name: np.ascontiguousarray(self.images[self.pos:self.pos + self.batch], np.float32)}
    self.pos += self.batch
    return out

  def rewind(self):
    self.pos = 0


def quantize_onnx(fp32_path: str, out: str, images: np.ndarray, *, per_channel: bool = False) -> str:
  """INT8 by onnxruntime's static quantization (QDQ, int8 symmetric weights, uint8 MinMax activations).

  Args:
    fp32_path: the float32 ONNX file (from `to_onnx` / `save_onnx`).
    out: the INT8 file to write (parent folders created).
    images: calibration images in the file's input layout, float32, normalised as the pipeline does.
    per_channel: one weight scale per output channel instead of per tensor.

  Returns:
    The absolute path of the INT8 file.
  """
  import tempfile  # pylint: disable=g-import-not-at-top

  from onnxruntime import quantization as q  # pylint: disable=g-import-not-at-top

  path = _prepare_out(out)
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or not len(images):
    raise ExportError(f"calibration images: expected a non-empty 4-D batch, got shape {images.shape}")
  input_name = onnx_session(fp32_path).get_inputs()[0].name
  # quantize_static writes temporary files (augmented model, calibration cache) next to its working dir; a
  # private temporary folder keeps them out of the run and output folders.
  with tempfile.TemporaryDirectory(prefix="repopt_quant_") as tmp:
    cwd = os.getcwd()
    tmp_out = os.path.join(tmp, "int8.onnx")
    root = logging.getLogger()
    level = root.level
    try:
      os.chdir(tmp)
      # onnxruntime logs a generic "consider pre-processing" warning on the root logger; this graph is already
      # in the form that pre-processing (shape inference, fusions) would give.
      root.setLevel(logging.ERROR)
      q.quantize_static(os.path.abspath(fp32_path) if not os.path.isabs(fp32_path) else fp32_path, tmp_out,
                        _Calibration(images, input_name), quant_format=q.QuantFormat.QDQ,
                        per_channel=bool(per_channel), activation_type=q.QuantType.QUInt8,
                        weight_type=q.QuantType.QInt8, calibrate_method=q.CalibrationMethod.MinMax,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    finally:
      root.setLevel(level)
      os.chdir(cwd)
    with open(tmp_out, "rb") as f:
      _write_bytes(path, f.read())
  return path


# ------------------------------------------------------------------------------------------------ StableHLO
def to_stablehlo(net: DeployedNetwork, *, layout: str = "nhwc", batch_size=None,
                 platforms: Optional[Sequence[str]] = None):
  """The deployed network as a `jax.export.Exported` (weights embedded; symbolic batch by default)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax import export as jexport  # pylint: disable=g-import-not-at-top

  layout = _check_layout(layout)
  b = _check_batch(batch_size)
  h, w = net.image_size
  bdim = jexport.symbolic_shape("batch")[0] if b is None else b
  shape = (bdim, h, w, net.in_channels) if layout == "nhwc" else (bdim, net.in_channels, h, w)
  fn = jax.jit(lambda x: apply_deployed(net, x, layout))
  kw = {"platforms": tuple(platforms)} if platforms else {}
  return jexport.export(fn, **kw)(jax.ShapeDtypeStruct(shape, jax.numpy.float32))


def save_stablehlo(exported, out: str) -> str:
  """Writes `exported.serialize()` (parent folders created); returns the absolute path."""
  path = _prepare_out(out)
  _write_bytes(path, bytes(exported.serialize()))
  return path


def load_stablehlo(path: str):
  """The `jax.export.Exported` of a file written by `save_stablehlo`; `.call(x)` runs it."""
  from jax import export as jexport  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(os.path.expanduser(path)):
    raise ExportError(f"{path}: no such StableHLO file")
  with open(os.path.expanduser(path), "rb") as f:
    return jexport.deserialize(bytearray(f.read()))


# ------------------------------------------------------------------------------------------------ runs
def _run_config(workdir: str):
  from repopt_jax.rundir import RunDir  # pylint: disable=g-import-not-at-top
  return RunDir(workdir).check_exists().read_config()


def _image_size(config) -> int:
  from repopt_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  d = config.data
  return int(d.image_size or data_lib.dataset_info(d.dataset, d.data_dir).image_size)


def _hs_error(workdir: str) -> ExportError:
  return ExportError(f"{workdir} is a Hyper-Search run (model.mode 'hs'): its branch scales are trainable, so "
                     "it is a search model, not a deployable network; export the RepOpt-VGG trained with its "
                     f"scales (python -m repopt_jax train CONFIG --scales {os.path.join(str(workdir), 'scales.npz')}"
                     " --workdir RUN) or a RepVGG run fused by `python -m repopt_jax fuse`")


def calibration_images(config, n: int, *, layout: str = "nhwc", split: Optional[str] = None) -> np.ndarray:
  """`n` training images of a run's dataset through the project's pipeline (no augmentation, shuffled by seed)."""
  from repopt_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  n = int(n)
  if n < 1:
    raise ExportError(f"--calibration-images {n}: expected a positive number of images")
  d = config.data
  batch = min(n, 64)
  it = data_lib.make_iterator(d.dataset, split or d.train_split, global_batch_size=batch, train=False,
                              seed=int(config.train.seed), image_size=_image_size(config), data_dir=d.data_dir,
                              num_epochs=1, shuffle=True, augment=False, process_index=0, process_count=1)
  out, have = [], 0
  for b in it:
    imgs = np.asarray(b["image"], np.float32)[np.asarray(b["mask"], bool)]
    out.append(imgs)
    have += len(imgs)
    if have >= n:
      break
  images = np.concatenate(out)[:n]
  return images.transpose(0, 3, 1, 2) if layout == "nchw" else images


def _load_run_model(workdir: str):
  from repopt_jax import runs  # pylint: disable=g-import-not-at-top
  if not hasattr(runs, "load_model"):
    raise ExportError("repopt_jax.runs.load_model is not available in this version")
  model, config = runs.load_model(workdir)
  model.eval()
  return model, config


def export_run(workdir: str, out: str, *, format: str = "onnx", int8: bool = False,  # pylint: disable=redefined-builtin
               calibration_images_count: int = 256, batch_size=None, layout: str = "nhwc",
               per_channel: bool = False, platforms: Optional[Sequence[str]] = None) -> dict:
  """Exports the eval-mode network of a trained run (opened read-only) to ONNX (fp32 or INT8) or StableHLO.

  Args:
    workdir: the run directory (`config.json` and checkpoints; nothing is written there).
    out: the file to write (parent folders created).
    format: 'onnx' or 'stablehlo'.
    int8: ONNX only: quantize statically (`quantize_onnx`) on `calibration_images_count` training images.
    batch_size: None / 'dynamic' or a fixed batch size.
    layout: input layout, 'nhwc' or 'nchw'.
    per_channel: INT8 weights per output channel instead of per tensor.
    platforms: StableHLO only: the `jax.export` platforms, e.g. `('cpu', 'cuda')` (default: this machine's);
      the module is called on this machine to report the difference, so include its platform.

  Returns:
    `{'out', 'format', 'int8', 'bytes', 'mode', 'arch', 'image_size', 'params', 'step', 'max_abs_logit_diff',
    'max_abs_logit', 'fp32_bytes'?}`: the difference is that of the exported file against the JAX model on
    one batch of test images (for INT8 the quantized file's).

  Raises:
    ExportError, WorkdirError, ConfigError, DatasetError: bad request, missing run, hs run, unwritable out.
  """
  if format not in FORMATS:
    raise ExportError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
  if int8 and format != "onnx":
    raise ExportError("--int8 quantizes with onnxruntime and needs --format onnx (a StableHLO module is exported "
                      "in float32)")
  if platforms and format != "stablehlo":
    raise ExportError("--platforms chooses the platforms of a StableHLO module; it needs --format stablehlo")
  _check_layout(layout)
  _check_batch(batch_size)
  config = _run_config(workdir)
  if config.model.mode == "hs":
    raise _hs_error(workdir)
  path = _prepare_out(out)
  from repopt_jax.rundir import resolve  # pylint: disable=g-import-not-at-top
  run_path = resolve(workdir)
  if os.path.commonpath([path, run_path]) == run_path:
    raise ExportError(f"--out {out}: inside the run directory {workdir}, which export opens read-only; write "
                      "the file elsewhere")
  model, config = _load_run_model(workdir)
  size = _image_size(config)
  arch = config.model.arch if isinstance(config.model.arch, str) else "custom"
  net = deployed_network(model, size, name=f"{arch} ({config.model.mode})")
  meta = {"source_run": run_path, "mode": config.model.mode, "arch": arch,
          "dataset": config.data.dataset}
  from repopt_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  spec = data_lib.dataset_info(config.data.dataset, config.data.data_dir)
  meta["normalisation"] = json.dumps({"mean": list(spec.mean), "std": list(spec.std), "pixel_range": [0, 1]})

  # One batch of test images (through the pipeline) for the reported difference against the JAX model.
  test = calibration_images(config, 64, layout="nhwc", split=config.data.eval_split)
  want = _logits_jit(float32_compute(model), test)
  fp32_bytes = None
  if format == "onnx":
    proto = to_onnx(net, layout=layout, batch_size=batch_size, metadata=meta)
    if int8:
      import tempfile  # pylint: disable=g-import-not-at-top
      with tempfile.TemporaryDirectory(prefix="repopt_export_") as tmp:
        fp32 = save_onnx(proto, os.path.join(tmp, "fp32.onnx"))
        fp32_bytes = os.path.getsize(fp32)
        calib = calibration_images(config, calibration_images_count, layout=layout)
        quantize_onnx(fp32, path, calib, per_channel=per_channel)
    else:
      save_onnx(proto, path)
    sess = onnx_session(path)
    call = lambda x: run_onnx(sess, x)
  else:
    exp = to_stablehlo(net, layout=layout, batch_size=batch_size, platforms=platforms)
    save_stablehlo(exp, path)
    loaded = load_stablehlo(path)
    call = lambda x: np.asarray(loaded.call(x))
  got = _run_batched(call, test if layout == "nhwc" else test.transpose(0, 3, 1, 2), _check_batch(batch_size))
  out_d = {"out": path, "format": format, "int8": bool(int8), "per_channel": bool(per_channel) if int8 else None,
           "bytes": os.path.getsize(path), "fp32_bytes": fp32_bytes, "mode": config.model.mode, "arch": arch,
           "image_size": size, "layout": layout, "batch_size": _check_batch(batch_size) or "dynamic",
           "params": net.num_params, "convs": len(net.convs), "opset": OPSET if format == "onnx" else None,
           "max_abs_logit_diff": float(np.max(np.abs(got - want))), "max_abs_logit": float(np.max(np.abs(want))),
           "compared_images": int(len(got))}
  return out_d


def _run_batched(call, images: np.ndarray, fixed: Optional[int]) -> np.ndarray:
  """`call` (images -> logits) on all images; with a fixed batch, the last partial batch is padded and cut."""
  if not fixed:
    return call(images)
  outs = []
  for i in range(0, len(images), fixed):
    chunk = images[i:i + fixed]
    n = len(chunk)
    if n < fixed:
      chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), chunk.dtype)])
    outs.append(call(chunk)[:n])
  return np.concatenate(outs)


def _onnx_layout(session) -> str:
  meta = session.get_modelmeta().custom_metadata_map or {}
  if meta.get("layout", "").lower() in LAYOUTS:
    return meta["layout"].lower()
  shape = session.get_inputs()[0].shape
  return "nchw" if len(shape) == 4 and isinstance(shape[1], int) and shape[1] in (1, 3) and \
      not (isinstance(shape[3], int) and shape[3] in (1, 3)) else "nhwc"


def evaluate_onnx(path: str, workdir: str, *, split: Optional[str] = None, batch_size: Optional[int] = None,
                  threads: Optional[int] = None) -> dict:
  """Top-1/top-5 accuracy and loss of an ONNX file (onnxruntime, CPU) on a run's test split.

  The images come from the project's data pipeline with the run's config (dataset, image size,
  normalisation); the run directory is only read.

  Returns:
    `{'eval_top1', 'eval_top5', 'eval_loss', 'eval_examples', 'onnx', 'bytes', 'seconds', 'images_per_sec'}`.
  """
  from repopt_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  config = _run_config(workdir)
  sess = onnx_session(str(path), threads)
  layout = _onnx_layout(sess)
  shape = sess.get_inputs()[0].shape
  fixed = shape[0] if isinstance(shape[0], int) else None
  size = _image_size(config)
  want_hw = (shape[1], shape[2]) if layout == "nhwc" else (shape[2], shape[3])
  if all(isinstance(v, int) for v in want_hw) and tuple(want_hw) != (size, size):
    raise ExportError(f"{path}: takes {want_hw[0]}x{want_hw[1]} images, but run {workdir} evaluates at "
                      f"{size}x{size}")
  d = config.data
  bs = int(fixed or batch_size or config.train.eval_batch_size or config.train.batch_size)
  it = data_lib.make_iterator(d.dataset, split or d.eval_split, global_batch_size=bs, train=False,
                              seed=int(config.train.seed), image_size=size, data_dir=d.data_dir, num_epochs=1,
                              process_index=0, process_count=1)
  top1 = top5 = loss = 0.0
  n = 0
  seconds = 0.0
  for batch in it:
    mask = np.asarray(batch["mask"], bool)
    x = np.asarray(batch["image"], np.float32)
    if layout == "nchw":
      x = x.transpose(0, 3, 1, 2)
    t0 = time.perf_counter()
    logits = _run_batched(lambda v: run_onnx(sess, v), x, fixed).astype(np.float64)
    seconds += time.perf_counter() - t0
    y = np.asarray(batch["label"])
    logits, y = logits[mask], y[mask]
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss += float(-logp[np.arange(len(y)), y].sum())
    order = np.argsort(-logits, axis=1)
    top1 += float((order[:, 0] == y).sum())
    top5 += float((order[:, :5] == y[:, None]).any(axis=1).sum())
    n += len(y)
  if not n:
    raise ExportError(f"split {split or d.eval_split!r} of {d.dataset} gave no images")
  return {"eval_top1": top1 / n, "eval_top5": top5 / n, "eval_loss": loss / n, "eval_examples": n,
          "onnx": os.path.abspath(str(path)), "bytes": os.path.getsize(str(path)), "seconds": seconds,
          "images_per_sec": n / seconds if seconds else None}
