"""RepOptimizers as Optax gradient transformations.

`repopt_masks` is the Rule of Iteration as a composable transform: chain it in front of any Optax optimizer.
`repopt_sgd` is the paper's RepOptimizer-SGD; `repopt_adamw` is GR for AdamW, exact by default.

How scales meet parameters (one rule, for every transform here). The scales may be

* a full scales tree: the params' structure (a Linen dict, an `nnx.State`, any pytree) with a `CSLAScales`
  on every re-parameterized kernel and `None` elsewhere, as `csla.scales_tree` builds it;
* a part of one (e.g. `{'backbone': {...}}`), or
* a flat `{param_path: CSLAScales}` dict, as `csla.scales_of` and `load_scales` return it.

Every entry is named by its path from the root of the scales (`repopt_jax.paths.path_str`; a flat dict's
keys are such paths already), and that path is matched to the path of a parameter from the root of the
tree the transform is given: scales paths are always full-tree paths, never relative to a subtree. A
parameter with no entry, or `None`, gets no Grad Mult, except that a conv's bias (`.../bias` beside a
`.../kernel` with scales) takes its kernel's scales unless the scales name the bias themselves, as in
`csla.scales_tree`. Matching is strict: an entry that names no parameter (a typo, another model's scales, a
re-rooted subtree) raises `ScalesError` naming it and the nearest real path, and a `CSLAScales` that does
not fit its parameter's shape raises naming the parameter. It is transparent to optax's masking: under
`optax.masked` / `optax.multi_transform` a masked-out leaf (or subtree) is an `optax.MaskedNode`, which
still counts as the parameter it stands for but gets no Grad Mult, in `init` and in `update` alike.

Only the small scale vectors are kept; each update rebuilds the Grad Mult from them inside the computation,
where XLA fuses the broadcast into the multiply, so the optimizer state is exactly that of the optimizer it
wraps. The matching runs once per tree structure (at `init`, and at the first trace of `update`), never
per step.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import optax

from repopt_jax import block, rules
from repopt_jax.paths import path_str  # noqa: F401  (re-exported: the one path naming of the package)
from repopt_jax.scales import CSLAScales, ScalesError

try:  # what `optax.tree_map_params` passes to `init` in place of the params (an empty pytree)
  from optax.tree_utils._state_utils import _ParamsPlaceholder  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover (another optax layout: nothing to recognise)
  _ParamsPlaceholder = ()

ScalesTree = Any
MaskOrFn = Optional[Union[Any, Callable[[optax.Params], Any]]]


def _is_scales_leaf(x) -> bool:
  return x is None or isinstance(x, CSLAScales)


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def flatten_scales(scales_tree: ScalesTree) -> Dict[str, Optional[CSLAScales]]:
  """`{param_path: CSLAScales or None}` for a scales tree, a part of one, or a flat dict keyed by paths.

  Example:
    >>> import numpy as np
    >>> s = CSLAScales(conv=np.ones(2))
    >>> flatten_scales({'stem': {'kernel': s, 'bias': None}, 'stage1/0/kernel': s})
    {'stage1/0/kernel': CSLAScales(conv[2]), 'stem/bias': None, 'stem/kernel': CSLAScales(conv[2])}
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(scales_tree, is_leaf=_is_scales_leaf)
  out = {}
  for path, leaf in flat:
    name = path_str(path)
    if not _is_scales_leaf(leaf):
      raise ScalesError(f"scales tree: leaf {name!r} is a {type(leaf).__name__}; "
                        "expected CSLAScales or None")
    if name in out:
      raise ScalesError(f"scales tree: {name!r} is named twice (as a nested key and as a path)")
    out[name] = leaf
  return out


def _prefixes(name: str):
  """'a/b/c' -> 'a', 'a/b' (the subtrees above a path; '' for the root)."""
  parts = name.split("/")
  yield ""
  for i in range(1, len(parts)):
    yield "/".join(parts[:i])


def _nearest(name: str, candidates: Sequence[str]) -> str:
  """A hint naming the real parameter path a wrong scales path most likely meant ('' when none is close)."""
  rooted = [c for c in candidates if c.endswith("/" + name)]
  if len(rooted) == 1:
    return f" (did you mean {rooted[0]!r}? scales paths start at the root of the params)"
  close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
  return f" (nearest: {close[0]!r})" if close else ""


def _match_leaves(by_path: Mapping[str, Optional[CSLAScales]], tree) -> List[Optional[CSLAScales]]:
  """The scales of every leaf of `tree` (flattened with `MaskedNode`s as leaves), in leaf order.

  Raises `ScalesError` naming the first scales entry that names no parameter, or a parameter whose shape
  its scales cannot describe.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked)
  names = [path_str(p) for p, _ in flat]
  shapes = {n: jnp.shape(x) for n, (_, x) in zip(names, flat) if not _is_masked(x)}
  masked = {n for n, (_, x) in zip(names, flat) if _is_masked(x)}
  subtrees = {q for n in names for q in _prefixes(n)}
  unmatched = []
  for name, s in by_path.items():
    if name in shapes or name in masked or any(q in masked for q in _prefixes(name)):
      continue  # a parameter, or one optax has masked out (alone or with its subtree)
    if s is None and name in subtrees:
      continue  # None for a whole subtree: no Grad Mult anywhere below it
    unmatched.append(name)
  if unmatched:
    name = unmatched[0]
    more = f"; {len(unmatched)} such entries" if len(unmatched) > 1 else ""
    raise ScalesError(f"scales do not match the params: {name!r} is not a parameter"
                      f"{_nearest(name, names)}{more}")
  # A conv's bias takes its kernel's scales unless the scales name it (block.bias_path: the one statement of it).
  bias_scales = {b: s for k, s in by_path.items() if (b := block.bias_path(k)) is not None}
  out = []
  for name in names:
    s = None
    if name in shapes:
      s = by_path[name] if name in by_path else bias_scales.get(name)
    if s is not None:
      # A 1-D leaf takes scales only as a conv's bias (named so): a BatchNorm scale is a mistake.
      rules.check_kernel(s, shapes[name], name, allow_bias=name.rpartition("/")[2] == "bias")
    out.append(s)
  return out


def match_scales(by_path: Mapping[str, Optional[CSLAScales]], tree) -> Dict[str, CSLAScales]:
  """`{path: CSLAScales}` of the kernels (and conv biases) of a params/grads tree that get a Grad Mult.

  `by_path` is `flatten_scales(scales)`; the matching rule is the module's (see `repopt_masks`). Raises
  `ScalesError` naming a scales path that names no parameter, or a parameter of the wrong shape.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> s = CSLAScales(conv=np.ones(2))
    >>> params = {'conv': {'kernel': jnp.zeros((3, 3, 2, 2)), 'bias': jnp.zeros(2)}, 'bn': jnp.ones(2)}
    >>> sorted(match_scales({'conv/kernel': s}, params))  # the conv's bias takes its kernel's scales
    ['conv/bias', 'conv/kernel']
    >>> match_scales({'conv/kernl': s}, params)
    Traceback (most recent call last):
    ...
    repopt_jax.scales.ScalesError: scales do not match the params: 'conv/kernl' is not a parameter (nearest: 'conv/kernel')
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked)
  return {path_str(p): s for (p, _), s in zip(flat, _match_leaves(by_path, tree)) if s is not None}


class _Kernels:
  """The scales of one transform, matched to the leaves of each tree structure it meets (cached)."""

  def __init__(self, scales_tree: ScalesTree):
    self.by_path = flatten_scales(scales_tree)
    self._cache: Dict[Any, List[Optional[CSLAScales]]] = {}

  def _leaf_scales(self, tree) -> Tuple[list, Any, List[Optional[CSLAScales]]]:
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_is_masked)
    # Shapes are static under jit, so a traced update finds the matching of its init (or of its first trace).
    key = (treedef, tuple(None if _is_masked(x) else tuple(jnp.shape(x)) for x in leaves))
    try:
      hit = self._cache.get(key)
    except TypeError:  # a pytree node with unhashable metadata: match without caching
      return leaves, treedef, _match_leaves(self.by_path, tree)
    if hit is None:
      hit = self._cache[key] = _match_leaves(self.by_path, tree)
    return leaves, treedef, hit

  def check(self, params) -> None:
    """Validates the scales against the tree given to `init` (nothing to check in a params placeholder)."""
    if not isinstance(params, _ParamsPlaceholder):
      self._leaf_scales(params)

  def map(self, fn: Callable[..., Any], tree, *rest):
    """`fn(scales, leaf, *rest_leaves)` on the leaves with scales; other leaves (and `MaskedNode`s) pass."""
    leaves, treedef, scales = self._leaf_scales(tree)
    rest_leaves = [treedef.flatten_up_to(r) for r in rest]
    out = [x if s is None else fn(s, x, *(r[i] for r in rest_leaves)) for i, (x, s) in enumerate(zip(leaves, scales))]
    return treedef.unflatten(out)



def _is_zero(x) -> bool:
  """A coefficient that is statically off (None or a Python 0). Under `optax.inject_hyperparams` it is an
  array, traced in `update`: it then keeps its transform (a zero array simply adds nothing)."""
  return x is None or (isinstance(x, (int, float)) and x == 0)


def _decay(weight_decay, mask) -> optax.GradientTransformation:
  return optax.identity() if _is_zero(weight_decay) else optax.add_decayed_weights(weight_decay, mask)


def repopt_masks(scales_tree: ScalesTree, power: int = 2) -> optax.GradientTransformation:
  """Multiplies each re-parameterized kernel's gradient by its Grad Mult (Rule of Iteration, eq. 13).

  .. math::
    g'_{p,q,i,c} = g_{p,q,i,c}\\,\\big(s_c^2 + [p,q = \\text{centre}](t_c^2 + [i = c])\\big)

  for every kernel whose scales entry is a `CSLAScales`; gradients of other parameters are left as they
  are. A 1-D leaf with a `CSLAScales` is the bias of a CSLA conv whose branches have their own biases: its
  multiplier is `s_c^2 + t_c^2` (no identity term; see `rules.grad_mult`). Chained before weight decay and
  momentum, it turns plain SGD on the single kernels into SGD on the imaginary multi-branch (CSLA) blocks.

  Matching (the module's rule): the scales are a full scales tree, a part of one, or a flat
  `{param_path: CSLAScales}` dict (`csla.scales_of`, `load_scales`), every entry named by its path from the
  root of the params (`paths.path_str`). A parameter with no entry or `None` gets no Grad Mult (a conv
  bias takes its kernel's scales unless named itself). An entry that names no parameter of the tree given
  to `init` raises `ScalesError` naming it, and so does a shape the scales cannot describe. A leaf that
  `optax.masked` / `optax.multi_transform` replaced by a `MaskedNode` is a parameter without Grad Mult.

  Args:
    scales_tree: the scales, as above.
    power: 2 for SGD (the paper's rule); 1 for the mult of the paper's AdamW code.

  Returns:
    An `optax.GradientTransformation` with an empty state: the multiplier is rebuilt from the scale vectors
    inside `update`, never stored.

  Example:
    >>> import jax.numpy as jnp, numpy as np, optax
    >>> params = {'conv': jnp.ones((3, 3, 2, 2)), 'bias': jnp.zeros(2)}
    >>> scales = {'conv': CSLAScales(conv=np.ones(2), pointwise=np.ones(2), identity=True)}
    >>> tx = optax.chain(repopt_masks(scales), optax.sgd(0.1, momentum=0.9, nesterov=True))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> round(float(updates['conv'][1, 1, 0, 0]), 6), round(float(updates['conv'][0, 0, 0, 0]), 6)
    (-0.57, -0.19)

    Inside `optax.multi_transform`, with the scales of the whole model: RepOpt for the backbone only.

    >>> params = {'backbone': params, 'head': {'w': jnp.ones((2, 3))}}
    >>> tx = optax.multi_transform({'rep': optax.chain(repopt_masks({'backbone': scales}), optax.sgd(0.1)),
    ...                             'adam': optax.adam(1e-3)}, {'backbone': 'rep', 'head': 'adam'})
    >>> updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    >>> round(float(updates['backbone']['conv'][1, 1, 0, 0]), 6), round(float(updates['head']['w'][0, 0]), 6)
    (-0.3, -0.001)
  """
  kernels = _Kernels(scales_tree)

  def init_fn(params):
    kernels.check(params)
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    return kernels.map(lambda s, g: rules.apply_grad_mult(s, g, power), updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def repopt_sgd(learning_rate: optax.ScalarOrSchedule, scales_tree: ScalesTree, momentum: float = 0.9,
               nesterov: bool = True, weight_decay: float = 0.0,
               weight_decay_mask: MaskOrFn = None) -> optax.GradientTransformation:
  """RepOptimizer-SGD, the paper's optimizer: Grad Mult, coupled L2 decay, momentum, Nesterov.

  Per kernel, as in the official code: `d = M * g + wd * p`; `buf = momentum * buf + d` (the first step
  sets `buf = d`); `d = d + momentum * buf` with Nesterov; `p -= lr * d`.

  Args:
    learning_rate: a float or an Optax schedule.
    scales_tree: a full scales tree, a part of one, or a flat `{param_path: CSLAScales}` dict, matched to
      the params by full-tree path (no entry or None: no Grad Mult; an entry naming no parameter, or a
      wrong shape, raises `ScalesError` naming it; `MaskedNode`s of `optax.masked` are parameters without
      Grad Mult). The rule is `repopt_masks`'s.
    momentum: momentum coefficient (0 for none).
    nesterov: Nesterov momentum.
    weight_decay: coupled L2 coefficient, added after the Grad Mult.
    weight_decay_mask: which params decay (pytree of bools or a callable of the params), as in
      `optax.add_decayed_weights`; None decays all. The paper decays conv kernels (and identity weights),
      not BatchNorm parameters or biases: `repopt_jax.models` builds that mask.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> params = {'conv': jnp.ones((3, 3, 2, 2))}
    >>> tx = repopt_sgd(0.1, {'conv': CSLAScales(conv=np.full(2, 2.))}, weight_decay=1e-4)
    >>> updates, _ = tx.update({'conv': jnp.ones((3, 3, 2, 2))}, tx.init(params), params)
    >>> round(float(updates['conv'][0, 0, 0, 0]), 6)  # -(0.1 * 1.9 * (4 + 1e-4))
    -0.760019
  """
  return optax.chain(
      repopt_masks(scales_tree, power=2),
      _decay(weight_decay, weight_decay_mask),
      optax.sgd(learning_rate, momentum=None if _is_zero(momentum) else momentum, nesterov=nesterov),
  )


class ScaleByRepOptAdamState(NamedTuple):
  """The state of plain Adam: step count and the moments of the kernel gradients."""
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_repopt_adam(scales_tree: ScalesTree, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                         eps_root: float = 0.0) -> optax.GradientTransformation:
  """Adam's direction for the imaginary CSLA blocks, computed on their single kernels (exact GR).

  With `g = dL/dW'` and Adam's bias-corrected moments `m_hat`, `v_hat` of it, each kernel element gets

  .. math::
    d = \\sum_k \\frac{s_k^2\\,\\hat m}{|s_k|\\sqrt{\\hat v + \\epsilon_{root}} + \\epsilon}

  summed over the branches present at that tap (identity: `s = 1`), which is exactly what Adam on the
  separate branch weights does to their sum (see `repopt_jax.rules.exact_adam_direction`). Parameters
  without scales get plain Adam's `m_hat / (sqrt(v_hat + eps_root) + eps)`.

  Args:
    scales_tree: a full scales tree, a part of one, or a flat `{param_path: CSLAScales}` dict, matched to
      the params by full-tree path as in `repopt_masks` (strict about entries naming no parameter; masked
      leaves are parameters without scales).
    b1, b2, eps, eps_root: as in `optax.scale_by_adam`.

  Returns:
    An `optax.GradientTransformation` whose state is Adam's (count, mu, nu).

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> params = {'conv': {'kernel': jnp.zeros((1, 1, 1, 1))}, 'bn': jnp.zeros(1)}
    >>> tx = scale_by_repopt_adam({'conv/kernel': CSLAScales(conv=np.array([-2.]))}, eps=0.)
    >>> d, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params))
    >>> round(float(d['conv']['kernel'][0, 0, 0, 0]), 4), round(float(d['bn'][0]), 4)  # |s| m_hat / sqrt(v_hat); Adam
    (2.0, 1.0)
  """
  kernels = _Kernels(scales_tree)

  def init_fn(params):
    kernels.check(params)
    zeros = lambda p: jnp.zeros_like(p)
    return ScaleByRepOptAdamState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params),
                                  jax.tree.map(zeros, params))

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    plain = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + eps_root) + eps), mu_hat, nu_hat)
    out = kernels.map(lambda s, d, m, v: rules.exact_adam_direction(s, m, v, eps, eps_root), plain, mu_hat, nu_hat)
    return out, ScaleByRepOptAdamState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def repopt_adamw(learning_rate: optax.ScalarOrSchedule, scales_tree: ScalesTree, b1: float = 0.9,
                 b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                 weight_decay_mask: MaskOrFn = None, exact: bool = True) -> optax.GradientTransformation:
  """Gradient re-parameterization for AdamW.

  `exact=True`: the update of every kernel equals, to float rounding, what AdamW does to the separate
  branch weights of its CSLA block (`scale_by_repopt_adam`), then decoupled weight decay (exact on the
  sum of the branches) and the learning rate:

  .. math::
    \\Delta W' = -lr\\Big(\\sum_k \\frac{s_k^2\\,\\hat m}{|s_k|\\sqrt{\\hat v} + \\epsilon} + wd\\,W'\\Big)

  `exact=False`: the paper's code, `M1 * Adam(M1 * g)` with the power-1 mult `M1`; it differs from the
  exact form by how `eps` enters (and where scales are negative).

  Args:
    learning_rate: a float or an Optax schedule.
    scales_tree: a full scales tree, a part of one, or a flat `{param_path: CSLAScales}` dict, matched to
      the params by full-tree path as in `repopt_masks` (strict about entries naming no parameter; masked
      leaves are parameters without scales).
    b1, b2, eps: Adam's coefficients.
    weight_decay: decoupled weight decay coefficient.
    weight_decay_mask: which params decay, as in `optax.adamw`; None decays all.
    exact: the exact form (default) or the paper's approximation.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> params = {'conv': jnp.zeros((3, 3, 1, 1))}
    >>> tx = repopt_adamw(1.0, {'conv': CSLAScales(conv=np.array([2.]), pointwise=np.array([3.]))}, eps=0.)
    >>> updates, _ = tx.update({'conv': jnp.ones((3, 3, 1, 1))}, tx.init(params), params)
    >>> round(float(updates['conv'][0, 0, 0, 0]), 3), round(float(updates['conv'][1, 1, 0, 0]), 3)  # -|s|, -(|s|+|t|)
    (-2.0, -5.0)
  """
  decay = _decay(weight_decay, weight_decay_mask)
  if exact:
    direction = scale_by_repopt_adam(scales_tree, b1=b1, b2=b2, eps=eps)
  else:
    direction = optax.chain(repopt_masks(scales_tree, power=1), optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                            repopt_masks(scales_tree, power=1))
  return optax.chain(direction, decay, optax.scale_by_learning_rate(learning_rate))
