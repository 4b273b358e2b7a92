"""Shared helpers of the tests/test_models_*.py files (no tests here).

XLA's CPU backend spends seconds optimising a conv net's train step, and eager model construction compiles
every initialiser separately. The model tests run tiny networks for a few dozen steps, so they build and step
under `jit`, compiled with cheap options (every network compared gets the same options, so comparisons are
unaffected), and reuse compiled programs where the structure repeats.
"""

import functools

import jax
import numpy as np
from flax import nnx

from repopt_jax.models import RepOptVGG

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit(f, **kw):
  return jax.jit(f, compiler_options=FAST_COMPILE, **kw)


@functools.lru_cache(maxsize=None)
def _init_fn(args, kw):
  make = lambda seed: RepOptVGG(*args, rngs=nnx.Rngs(jax.random.key(seed)), **dict(kw))
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(0)))
  return graphdef, jit(lambda seed: nnx.as_pure(nnx.split(make(seed))[1]))


def build(*args, seed=0, **kw):
  """`RepOptVGG(*args, rngs=nnx.Rngs(seed), **kw)`, initialised by one compiled program (cached per size
  and mode when the arguments are hashable, i.e. without `scales`)."""
  try:
    graphdef, init = _init_fn(args, tuple(sorted(kw.items())))
  except TypeError:  # unhashable (scales): compile for this call only
    graphdef, init = _init_fn.__wrapped__(args, tuple(sorted(kw.items())))
  return nnx.merge(graphdef, init(np.int32(seed)))


@functools.lru_cache(maxsize=None)
def abstract(arch, mode="target", num_classes=1000):
  """An `nnx.eval_shape` model: shapes only, nothing allocated."""
  return nnx.eval_shape(lambda: RepOptVGG(arch, mode, num_classes=num_classes, rngs=nnx.Rngs(0)))


@functools.partial(jit, static_argnums=0)
def _forward(graphdef, state, x):
  return nnx.merge(graphdef, state)(x)


def forward(model, x):
  """`model(x)`, jitted; in train mode the model's running statistics are left as they are."""
  graphdef, state = nnx.split(model)
  return _forward(graphdef, nnx.as_pure(state), x)


def copy(model):
  """An independent model with the same state (arrays are immutable, so sharing them is safe)."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, nnx.as_pure(state))


def rel_err(a, b):
  """`max|a - b| / max|b|`, in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def paths(tree):
  """`{'stage1/0/conv/kernel': leaf, ...}` for a state tree (NNX Variables unwrapped)."""
  flat = jax.tree_util.tree_flatten_with_path(nnx.as_pure(tree))[0]
  return {"/".join(str(getattr(k, "key", k)) for k in p): v for p, v in flat}
