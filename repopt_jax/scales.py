"""The constant scales of CSLA blocks, and their files.

A CSLA block (Constant-Scale Linear Addition) is a sum of linear branches, each followed by a constant
per-output-channel scale. `CSLAScales` holds those constants for one block; it is all the optimizer needs to
stand one plain kernel in for the whole block (see `repopt_jax.rules`).

Files:

* `load_torch_scales` reads the official RepOptimizer releases (`RepOpt-VGG-B1-scales.pth`, ...), a torch
  zip/pickle state dict, without importing torch.
* `save_scales` / `load_scales` write and read our own portable format: a `.npz` holding one array per
  branch scale plus a JSON metadata record (architecture, source, ...).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import zipfile
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np

Array = Any


class ScalesError(ValueError):
  """Raised for a scales object or file that cannot be used; the message names the culprit."""


def _is_concrete(x) -> bool:
  try:
    np.asarray(x)
    return True
  except Exception:  # a tracer: values are checked when concrete
    return False


def _check_vector(name: str, v, length: Optional[int] = None):
  if v is None:
    return
  if not _is_concrete(v):
    return
  a = np.asarray(v)
  if a.ndim != 1:
    raise ScalesError(f"{name}: a scale must be a vector of per-output-channel values, got shape {a.shape}")
  if length is not None and a.shape[0] != length:
    raise ScalesError(f"{name}: length {a.shape[0]} != {length} output channels")
  if not np.all(np.isfinite(a)):
    raise ScalesError(f"{name}: contains NaN or Inf values")


@dataclasses.dataclass(frozen=True, eq=False)
class CSLAScales:
  """Constant scales of one CSLA block, stood in for by a single kernel of shape `(kh, kw, I, O)` (HWIO).

  The block computes `y = conv(x; W_full) * conv + conv(x; W_1x1) * pointwise + sum_k conv(x; W_k) * s_k
  + gamma * x`, every branch centred on the same output position, which is linear in its weights and
  therefore equal to one conv with kernel `W' = conv*W_full + pad(pointwise*W_1x1) + sum_k pad(s_k*W_k)
  + diag(gamma)`.

  Attributes:
    conv: `(O,)` scale of the full-size branch (the 3x3 of RepOpt-VGG).
    pointwise: `(O,)` scale of the 1x1 branch centred in the kernel, or None when the block has none.
    identity: whether the block has the identity branch (needs `C_in == C_out` and stride 1). Its
      per-channel weight `gamma` is trained with constant multiplier 1, as in the paper's code.
    extra: further centred branches as `((kh_k, kw_k), scale_k)` pairs with odd sizes no larger than the
      kernel, e.g. `((1, 3), s13), ((3, 1), s31)` for an ACNet-like block or `((3, 3), s)` inside a 5x5.
      Grouped and depthwise kernels need nothing extra: the group count is read off the kernel shape.
    identity_init: the trained identity weights `gamma` from Hyper-Search (`(O,)`), or None. Only the Rule
      of Initialization reads it (`csla_init(..., identity_scale=s.identity_init)`); the Grad Mult never does.
  """

  conv: Array
  pointwise: Optional[Array] = None
  identity: bool = False
  extra: Tuple[Tuple[Tuple[int, int], Array], ...] = ()
  identity_init: Optional[Array] = None

  def __post_init__(self):
    if self.conv is None:
      raise ScalesError("CSLAScales.conv: the full-size branch scale is required")
    _check_vector("CSLAScales.conv", self.conv)
    n = np.shape(self.conv)[0] if _is_concrete(self.conv) else None
    _check_vector("CSLAScales.pointwise", self.pointwise, n)
    _check_vector("CSLAScales.identity_init", self.identity_init, n)
    if self.identity_init is not None and not self.identity:
      raise ScalesError("CSLAScales.identity_init given for a block without identity branch")
    extra = tuple(self.extra)
    for j, item in enumerate(extra):
      try:
        (kh, kw), s = item
      except (TypeError, ValueError):
        raise ScalesError(f"CSLAScales.extra[{j}]: expected ((kh, kw), scale), got {item!r}") from None
      if kh % 2 == 0 or kw % 2 == 0 or kh < 1 or kw < 1:
        raise ScalesError(f"CSLAScales.extra[{j}]: branch size {(kh, kw)} must be odd to be centred")
      _check_vector(f"CSLAScales.extra[{j}]", s, n)
    object.__setattr__(self, "extra", tuple(((int(kh), int(kw)), s) for (kh, kw), s in extra))
    object.__setattr__(self, "identity", bool(self.identity))

  @property
  def num_channels(self) -> int:
    return int(np.shape(self.conv)[0])

  def branches(self, kernel_hw: Tuple[int, int]) -> Sequence[Tuple[Tuple[int, int], Array]]:
    """All scaled branches as `((kh, kw), scale)`, the full-size one first."""
    out = [(tuple(kernel_hw), self.conv)]
    if self.pointwise is not None:
      out.append(((1, 1), self.pointwise))
    out.extend(self.extra)
    return out

  def replace(self, **kw) -> "CSLAScales":
    return dataclasses.replace(self, **kw)

  def __repr__(self):
    parts = [f"conv[{self.num_channels}]"]
    if self.pointwise is not None:
      parts.append("pointwise")
    parts += [f"{k[0]}x{k[1]}" for k, _ in self.extra]
    if self.identity:
      parts.append("identity" + ("(trained)" if self.identity_init is not None else ""))
    return f"CSLAScales({', '.join(parts)})"


# ----------------------------------------------------------------------------------------------------------
# The official release: torch zip/pickle state dicts, read without torch.

_OFFICIAL_SUFFIX = {"scale_conv": "conv", "scale_1x1": "pointwise", "scale_identity": "identity"}
_TORCH_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": None, "LongStorage": np.int64, "IntStorage": np.int32,
}


class _TorchUnpickler(pickle.Unpickler):
  """Rebuilds the tensors of a torch state dict as numpy arrays; refuses anything else."""

  def __init__(self, data: bytes, storages):
    super().__init__(io.BytesIO(data))
    self._storages = storages

  def find_class(self, module, name):
    if module == "collections" and name == "OrderedDict":
      import collections
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch" and name.endswith("Storage"):
      return name
    if module == "torch._utils" and name == "_rebuild_parameter":
      return lambda data, requires_grad, hooks: data
    raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a scales file")

  def persistent_load(self, pid):
    # ('storage', storage_type, key, location, numel)
    _, storage_type, key, _, _ = pid
    dtype = _TORCH_DTYPES.get(storage_type if isinstance(storage_type, str) else str(storage_type))
    if dtype is None:
      raise pickle.UnpicklingError(f"unsupported storage type {storage_type}")
    return np.frombuffer(self._storages(key), dtype=dtype)


def _rebuild_tensor(storage, offset, size, stride, *unused):
  size, stride = tuple(size), tuple(stride)
  itemsize = storage.itemsize
  # as_strided does not check bounds: a corrupt file must not make it read past the storage.
  if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0 or (
      all(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.size):
    raise pickle.UnpicklingError(f"tensor of size {size}, stride {stride}, offset {offset} does not fit "
                                 f"its storage of {storage.size} elements")
  if not size:
    return np.array(storage[offset])
  return np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=[s * itemsize for s in stride]).copy()


# What a file that cannot be decoded is called, whichever reader gave up on it.
_NOT_A_SCALES_FILE = "neither a repopt_jax .npz scales file nor an official PyTorch .pth checkpoint"


def read_torch_state_dict(path: str) -> dict:
  """Reads a torch zip-format `state_dict` of tensors into `{name: np.ndarray}` without torch."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ScalesError(f"{path}: no such scales file")
  try:
    with zipfile.ZipFile(path) as z:
      names = z.namelist()
      pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
      if not pkl:
        raise ScalesError(f"{path}: not a torch zip checkpoint (no data.pkl inside), so {_NOT_A_SCALES_FILE}")
      prefix = pkl[0][: -len("data.pkl")]
      state = _TorchUnpickler(z.read(pkl[0]), lambda key: z.read(f"{prefix}data/{key}")).load()
  except ScalesError:
    raise
  except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, KeyError, ValueError, OSError) as e:
    raise ScalesError(f"{path}: corrupt or unreadable, {_NOT_A_SCALES_FILE} ({type(e).__name__}: {e})") from None
  if not isinstance(state, Mapping):
    raise ScalesError(f"{path}: expected a state dict, found {type(state).__name__}")
  return {str(k): np.asarray(v) for k, v in state.items()}


def load_torch_scales(path: str) -> dict:
  """Reads an official RepOptimizer scale file into `{block_name: CSLAScales}`, without torch.

  The official files hold, per block, `<block>.scale_conv.weight` (s), `<block>.scale_1x1.weight` (t) and,
  for blocks with identity, `<block>.scale_identity.weight`: the identity weights trained by Hyper-Search.
  Those are the Rule of Initialization's `gamma(0)`; they are returned as `CSLAScales.identity_init` (the
  Grad Mult of the identity is 1 regardless).

  Args:
    path: a `.pth` file of the official release, e.g. `RepOpt-VGG-B1-scales.pth`.

  Returns:
    A dict from the official block names (`'stage0'`, `'stage1.0'`, ...) to `CSLAScales`, in file order.

  Example:
    >>> scales = load_torch_scales('RepOpt-VGG-B1-scales.pth')  # doctest: +SKIP
    >>> scales['stage1.1']  # doctest: +SKIP
    CSLAScales(conv[128], pointwise, identity(trained))
  """
  state = read_torch_state_dict(path)
  blocks: dict = {}
  for key, value in state.items():
    parts = key.rsplit(".", 2)
    if len(parts) != 3 or parts[1] not in _OFFICIAL_SUFFIX or parts[2] != "weight":
      raise ScalesError(f"{path}: entry {key!r} is not a RepOpt-VGG scale "
                        "(expected <block>.scale_{conv,1x1,identity}.weight)")
    blocks.setdefault(parts[0], {})[_OFFICIAL_SUFFIX[parts[1]]] = np.asarray(value, np.float32).reshape(-1)
  out = {}
  for name, b in blocks.items():
    if "conv" not in b:
      raise ScalesError(f"{path}: block {name!r} has no scale_conv.weight")
    try:
      out[name] = CSLAScales(conv=b["conv"], pointwise=b.get("pointwise"), identity="identity" in b,
                             identity_init=b.get("identity"))
    except ScalesError as e:
      raise ScalesError(f"{path}: block {name!r}: {e}") from None
  return out


# ----------------------------------------------------------------------------------------------------------
# Our portable format.

_FORMAT = "repopt_jax.scales/1"


def save_scales(path: str, scales: Mapping[str, CSLAScales], metadata: Optional[Mapping[str, Any]] = None):
  """Writes `{block_name: CSLAScales}` to a portable `.npz` file, with JSON `metadata` (e.g. the architecture).

  The write goes to a temporary file first, so an existing file is never left half-written.

  Example:
    >>> import numpy as np, tempfile, os
    >>> s = {'stage0': CSLAScales(conv=np.ones(4), pointwise=np.ones(4))}
    >>> p = os.path.join(tempfile.mkdtemp(), 's.npz')
    >>> save_scales(p, s, {'arch': 'tiny'})
    >>> loaded, meta = load_scales(p)
    >>> loaded['stage0'], meta['arch']
    (CSLAScales(conv[4], pointwise), 'tiny')
  """
  path = os.fspath(path)
  arrays, index = {}, []
  for j, (name, s) in enumerate(scales.items()):
    if not isinstance(s, CSLAScales):
      raise ScalesError(f"save_scales: entry {name!r} is a {type(s).__name__}, not CSLAScales")
    entry = {"name": name, "identity": s.identity, "extra": []}
    arrays[f"b{j}.conv"] = np.asarray(s.conv, np.float32)
    if s.pointwise is not None:
      arrays[f"b{j}.pointwise"] = np.asarray(s.pointwise, np.float32)
    if s.identity_init is not None:
      arrays[f"b{j}.identity_init"] = np.asarray(s.identity_init, np.float32)
    for k, ((kh, kw), v) in enumerate(s.extra):
      arrays[f"b{j}.extra{k}"] = np.asarray(v, np.float32)
      entry["extra"].append([kh, kw])
    index.append(entry)
  header = {"format": _FORMAT, "blocks": index, "metadata": dict(metadata or {})}
  arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def load_scales(path: str):
  """Reads scales from our `.npz` format or an official `.pth` file.

  Returns:
    `(scales, metadata)`: `{block_name: CSLAScales}` and the metadata dict (`{'source': 'official'}` plus
    the file name for `.pth` files).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ScalesError(f"{path}: no such scales file")
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as z:
      is_npz = "__header__.npy" in z.namelist()
    if not is_npz:
      return load_torch_scales(path), {"source": "official", "file": os.path.basename(path)}
  try:
    with np.load(path, allow_pickle=False) as z:
      header = json.loads(bytes(z["__header__"]).decode())
      if header.get("format") != _FORMAT:
        raise ScalesError(f"{path}: unknown scales format {header.get('format')!r}")
      out = {}
      for j, e in enumerate(header["blocks"]):
        get = lambda k: np.asarray(z[f"b{j}.{k}"]) if f"b{j}.{k}" in z.files else None
        extra = tuple(((kh, kw), z[f"b{j}.extra{k}"]) for k, (kh, kw) in enumerate(e["extra"]))
        try:
          out[e["name"]] = CSLAScales(conv=get("conv"), pointwise=get("pointwise"), identity=e["identity"],
                                      extra=extra, identity_init=get("identity_init"))
        except ScalesError as err:  # name the file and block, as load_torch_scales does
          raise ScalesError(f"{path}: block {e['name']!r}: {err}") from None
      return out, header.get("metadata", {})
  except ScalesError:
    raise
  except Exception as e:  # noqa: BLE001 - any decoding failure is a bad file
    raise ScalesError(f"{path}: corrupt or unreadable, {_NOT_A_SCALES_FILE} ({type(e).__name__}: {e})") from None
