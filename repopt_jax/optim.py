"""RepOptimizers as Optax gradient transformations.

`repopt_masks` is the Rule of Iteration as a composable transform: chain it in front of any Optax optimizer.
`repopt_sgd` is the paper's RepOptimizer-SGD; `repopt_adamw` is GR for AdamW, exact by default.

A scales tree has the structure of the params (a Linen dict, an `nnx.State`, any pytree) with a
`CSLAScales` on every re-parameterized kernel and `None` on every other parameter. Only the small scale
vectors are kept; each update rebuilds the Grad Mult from them inside the computation, where XLA fuses the
broadcast into the multiply, so the optimizer state is exactly that of the optimizer it wraps.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from repopt_jax import rules
from repopt_jax.paths import path_str  # noqa: F401  (re-exported: the one path naming of the package)
from repopt_jax.scales import CSLAScales, ScalesError

ScalesTree = Any
MaskOrFn = Optional[Union[Any, Callable[[optax.Params], Any]]]


def _is_scales_leaf(x) -> bool:
  return x is None or isinstance(x, CSLAScales)


def flatten_scales(scales_tree: ScalesTree) -> dict:
  """`{param_path: CSLAScales or None}` for a scales tree (a flat dict keyed by paths is accepted as is)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(scales_tree, is_leaf=_is_scales_leaf)
  out = {}
  for path, leaf in flat:
    name = path_str(path)
    if not _is_scales_leaf(leaf):
      raise ScalesError(f"scales tree: leaf {name!r} is a {type(leaf).__name__}; "
                        "expected CSLAScales or None")
    out[name] = leaf
  return out


def match_scales(by_path: Mapping[str, Optional[CSLAScales]], tree) -> dict:
  """Checks a params/grads tree against flattened scales; returns `{path: CSLAScales}` of its kernels.

  Raises `ScalesError` naming the first parameter path that is missing, extra, or of the wrong shape.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  seen = set()
  out = {}
  for path, leaf in flat:
    name = path_str(path)
    seen.add(name)
    if name not in by_path:
      raise ScalesError(f"scales tree does not match the params: parameter {name!r} has no entry "
                        "(use None for parameters without a Grad Mult)")
    s = by_path[name]
    if s is not None:
      # A 1-D leaf takes scales only as a conv's bias (named so): a BatchNorm scale is a mistake.
      rules.check_kernel(s, jnp.shape(leaf), name, allow_bias=name.split("/")[-1] == "bias")
      out[name] = s
  extra = [k for k in by_path if k not in seen]
  if extra:
    raise ScalesError(f"scales tree does not match the params: {extra[0]!r} is not a parameter "
                      f"({len(extra)} such entries)")
  return out


def _map_kernels(fn, by_path, tree, *rest):
  """Applies `fn(scales, leaf, *rest_leaves)` to the re-parameterized kernels; other leaves pass through."""
  kernels = match_scales(by_path, tree)

  def leaf_fn(path, x, *ys):
    s = kernels.get(path_str(path))
    return x if s is None else fn(s, x, *ys)

  return jax.tree_util.tree_map_with_path(leaf_fn, tree, *rest)


def repopt_masks(scales_tree: ScalesTree, power: int = 2) -> optax.GradientTransformation:
  """Multiplies each re-parameterized kernel's gradient by its Grad Mult (Rule of Iteration, eq. 13).

  .. math::
    g'_{p,q,i,c} = g_{p,q,i,c}\\,\\big(s_c^2 + [p,q = \\text{centre}](t_c^2 + [i = c])\\big)

  for every kernel whose entry in `scales_tree` is a `CSLAScales`; gradients of other parameters are left
  as they are. A 1-D leaf with a `CSLAScales` is the bias of a CSLA conv whose branches have their own
  biases: its multiplier is `s_c^2 + t_c^2` (no identity term; see `rules.grad_mult`). Chained before weight decay and momentum, it turns plain SGD on the single kernels into SGD
  on the imaginary multi-branch (CSLA) blocks.

  Args:
    scales_tree: the params' structure with `CSLAScales` or None leaves.
    power: 2 for SGD (the paper's rule); 1 for the mult of the paper's AdamW code.

  Returns:
    An `optax.GradientTransformation` with an empty state: the multiplier is rebuilt from the scale vectors
    inside `update`, never stored.

  Example:
    >>> import jax.numpy as jnp, numpy as np, optax
    >>> params = {'conv': jnp.ones((3, 3, 2, 2)), 'bias': jnp.zeros(2)}
    >>> scales = {'conv': CSLAScales(conv=np.ones(2), pointwise=np.ones(2), identity=True), 'bias': None}
    >>> tx = optax.chain(repopt_masks(scales), optax.sgd(0.1, momentum=0.9, nesterov=True))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> round(float(updates['conv'][1, 1, 0, 0]), 6), round(float(updates['conv'][0, 0, 0, 0]), 6)
    (-0.57, -0.19)
  """
  by_path = flatten_scales(scales_tree)

  def init_fn(params):
    match_scales(by_path, params)
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    return _map_kernels(lambda s, g: rules.apply_grad_mult(s, g, power), by_path, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def repopt_sgd(learning_rate: optax.ScalarOrSchedule, scales_tree: ScalesTree, momentum: float = 0.9,
               nesterov: bool = True, weight_decay: float = 0.0,
               weight_decay_mask: MaskOrFn = None) -> optax.GradientTransformation:
  """RepOptimizer-SGD, the paper's optimizer: Grad Mult, coupled L2 decay, momentum, Nesterov.

  Per kernel, as in the official code: `d = M * g + wd * p`; `buf = momentum * buf + d` (the first step
  sets `buf = d`); `d = d + momentum * buf` with Nesterov; `p -= lr * d`.

  Args:
    learning_rate: a float or an Optax schedule.
    scales_tree: the params' structure with `CSLAScales` or None leaves (see `repopt_masks`).
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
      optax.add_decayed_weights(weight_decay, weight_decay_mask) if weight_decay else optax.identity(),
      optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov),
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
    scales_tree: the params' structure with `CSLAScales` or None leaves.
    b1, b2, eps, eps_root: as in `optax.scale_by_adam`.

  Returns:
    An `optax.GradientTransformation` whose state is Adam's (count, mu, nu).
  """
  by_path = flatten_scales(scales_tree)

  def init_fn(params):
    match_scales(by_path, params)
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
    kernels = match_scales(by_path, updates)

    def leaf_fn(path, d, m, v):
      s = kernels.get(path_str(path))
      return d if s is None else rules.exact_adam_direction(s, m, v, eps, eps_root)

    out = jax.tree_util.tree_map_with_path(leaf_fn, plain, mu_hat, nu_hat)
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
    scales_tree: the params' structure with `CSLAScales` or None leaves.
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
  decay = optax.add_decayed_weights(weight_decay, weight_decay_mask) if weight_decay else optax.identity()
  if exact:
    direction = scale_by_repopt_adam(scales_tree, b1=b1, b2=b2, eps=eps)
  else:
    direction = optax.chain(repopt_masks(scales_tree, power=1), optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                            repopt_masks(scales_tree, power=1))
  return optax.chain(direction, decay, optax.scale_by_learning_rate(learning_rate))
