"""A run's constant scales: read once from the file its config names, checked once against its model.

`read_run_scales(config)` is the one place a run reads its scales file; `RunScales.checked(model)` the one
place they are checked against the model (block by block for RepOpt-VGG, kernel by kernel for any other
architecture, `ScalesError` naming the block or kernel path). What comes out carries everything the rest of
the run needs, so nothing downstream reads the file again or decides again which family the model is:

* `scales`: as the file keys them (RepOpt-VGG's official block names, or kernel paths);
* `family`: `models.family(arch)`, 'vgg' or 'generic';
* `by_kernel`: the same scales keyed by kernel paths, in the model's order (the Rule of Initialization,
  `csla.reinit`, works on these for every model);
* `tree`: the optimizer's scales tree (`repopt_sgd` / `repopt_adamw`);
* `fingerprint`: what a resumed run must share with the checkpoints it resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
from flax import nnx

from repopt_jax import csla
from repopt_jax import scales as scales_lib
from repopt_jax.models import registry
from repopt_jax.paths import path_str
from repopt_jax.scales import CSLAScales, ScalesError

__all__ = ["RunScales", "read_run_scales", "fingerprint"]


def fingerprint(scales: Mapping[str, CSLAScales]) -> str:
  """A SHA-256 of the scales' values (names and arrays, in name order): what a resumed run must share.

  Example:
    >>> s = {'stage0': CSLAScales(conv=np.ones(2), pointwise=np.ones(2))}
    >>> fingerprint(s) == fingerprint(dict(s)), len(fingerprint(s))
    (True, 64)
  """
  h = hashlib.sha256()
  for name in sorted(scales):
    s = scales[name]
    h.update(name.encode())
    for part in (s.conv, s.pointwise, s.identity_init, *(w for _, w in (s.extra or ()))):
      h.update(b"-" if part is None else np.ascontiguousarray(np.asarray(part, np.float64)).tobytes())
    h.update(b"I" if s.identity else b"i")
  return h.hexdigest()


def _param_shapes(model) -> dict:
  params = nnx.state(model, nnx.Param)
  return {path_str(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


@dataclasses.dataclass(frozen=True, eq=False)
class RunScales:
  """A run's scales, decoded once, with what the run derives from them (see the module docstring).

  Build one with `RunScales.of(scales, arch)` (or `read_run_scales(config)`), then `for_dims(num_classes,
  in_channels)` (or `checked(plain_model)`) once the model's shapes are known; `by_kernel` and `tree` are
  set by the check.

  Example:
    >>> from repopt_jax.models import RepOptVGG, reparam
    >>> hs = RepOptVGG('tiny', 'hs', num_classes=10, rngs=nnx.Rngs(0))
    >>> rs = RunScales.of(reparam.scales_from_hs(hs), 'tiny').for_dims(10, in_channels=3)
    >>> rs.family, list(rs.by_kernel)[:2], rs.tree['stage1'][0]['conv']['kernel']
    ('vgg', ['stage0/conv/kernel', 'stage1/0/conv/kernel'], CSLAScales(conv[8], pointwise))
  """

  scales: Mapping[str, CSLAScales]
  arch: Any
  family: str
  fingerprint: str
  path: Optional[str] = None
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  by_kernel: Optional[Mapping[str, CSLAScales]] = None
  tree: Any = None
  shapes: Optional[Mapping[str, tuple]] = None   # the param shapes `by_kernel` and `tree` were checked against
  dims: Optional[tuple] = None                    # `(num_classes, in_channels)` of that model, via `for_dims`

  @classmethod
  def of(cls, scales, arch, *, path: Optional[str] = None,
         metadata: Optional[Mapping[str, Any]] = None) -> "RunScales":
    """`scales` (`{name: CSLAScales}` as a file keys them) for a model of `arch`; a `RunScales` is returned
    as it is (it must be for `arch`)."""
    if isinstance(scales, RunScales):
      if scales.arch != arch:
        raise ScalesError(f"scales for architecture {scales.arch!r} given for {arch!r}")
      return scales
    if not isinstance(scales, Mapping):
      raise ScalesError(f"scales: expected a dict {{name: CSLAScales}}, got {type(scales).__name__}")
    for name, s in scales.items():
      if not isinstance(s, CSLAScales):
        raise ScalesError(f"scales[{name!r}]: expected CSLAScales, got {type(s).__name__}")
    return cls(scales=dict(scales), arch=arch, family=registry.family(arch), fingerprint=fingerprint(scales),
               path=path, metadata=dict(metadata or {}))

  def is_checked_for(self, model) -> bool:
    """Whether `checked` ran for a model with these parameter shapes."""
    return self.shapes is not None and self.shapes == _param_shapes(model)

  def checked(self, plain_model) -> "RunScales":
    """These scales checked against the run's plain (mode 'target') model, an `nnx.eval_shape` one is fine:
    a copy with `by_kernel`, `tree` and `shapes` set (itself when already checked for such a model).

    RepOpt-VGG scales must name every block with its width, a 1x1 scale and an identity branch exactly
    where the block has one (`vgg.check_scales_for`); every model's scales must fit the shapes of the
    kernels they name (`csla.scales_tree`).

    Raises:
      ScalesError: naming the block or kernel path that does not fit (and the file, when read from one).
    """
    if self.is_checked_for(plain_model):
      return self
    try:
      by_kernel = registry.kernel_scales(self.arch, self.scales, int(getattr(plain_model, "in_channels", 3)))
      tree = csla.scales_tree(plain_model, by_kernel)
    except ScalesError as e:
      if self.path is None:
        raise
      raise ScalesError(f"{e} (scales file {self.path})") from None
    return dataclasses.replace(self, by_kernel=by_kernel, tree=tree, shapes=_param_shapes(plain_model))

  def for_dims(self, num_classes: int, in_channels: int = 3) -> "RunScales":
    """`checked` against the plain model of `arch` with these dimensions, built abstractly (nothing is
    computed); itself when it already was."""
    dims = (int(num_classes), int(in_channels))
    if self.dims == dims:
      return self
    plain = nnx.eval_shape(lambda: registry.build(self.arch, "target", num_classes=dims[0], in_channels=dims[1]))
    return dataclasses.replace(self.checked(plain), dims=dims)

  def __repr__(self):
    where = f", {self.path}" if self.path else ""
    return f"RunScales({len(self.scales)} {self.family} entries for {self.arch!r}{where})"


def read_run_scales(config) -> Optional[RunScales]:
  """The scales file a config names (`scales`), read once: a `RunScales`, or None without one.

  The file must be a repopt_jax `.npz` or an official `.pth`, and no block may have all its branch scales
  zero (its kernel could never move, or only its identity diagonal could). Checking them against the
  model is `RunScales.checked`, once the model's shapes are known.

  Raises:
    ScalesError: no such file, a file of neither format, or a block whose scales are all zero (named).
    ModelError: `model.arch` is no known architecture.
  """
  if not config.scales:
    return None
  path = os.path.abspath(os.path.expanduser(config.scales))
  if not os.path.isfile(path):
    raise ScalesError(f"scales file {config.scales} does not exist (config key 'scales')")
  scales, metadata = scales_lib.load_scales(path)  # a file it cannot decode: "neither a repopt_jax .npz ..."
  for name, s in scales.items():
    parts = [s.conv, s.pointwise] + [w for _, w in (s.extra or ())]
    if all(p is None or not np.any(np.asarray(p)) for p in parts):
      what = "only its identity diagonal can move" if s.identity else "its kernel can never move"
      raise ScalesError(f"{path}: block {name!r} has every branch scale zero (s and t are 0 for every "
                        f"channel): {what} under the Grad Mult; use scales from Hyper-Search")
  return RunScales.of(scales, config.model.arch, path=path, metadata=metadata)
