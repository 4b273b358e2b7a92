"""RepOptimizers under `jax.jit` on an 8-device CPU mesh (conftest forces 8 fake devices).

Sharded params and grads must give the single-device result, and every output (params, updates, state)
must keep the sharding of the parameter it belongs to: the Grad Mult is built inside the computation from
small vectors, so GSPMD shards it with the kernel.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from repopt_jax import CSLAScales, grad_mult, repopt_adamw, repopt_sgd

STEPS = 3
# Small programs compiled once each: skip LLVM's expensive passes (numerics are XLA's either way).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def setup():
  rng = np.random.default_rng(0)
  params = {
      # Output channels sharded 8 ways; identity + 1x1.
      "a": {"kernel": rng.normal(0, 0.3, (3, 3, 16, 16)), "bias": rng.normal(0, 0.1, 16)},
      # Input channels sharded: the identity's diagonal crosses shard boundaries.
      "b": {"kernel": rng.normal(0, 0.3, (3, 3, 16, 16))},
      # Replicated kernel (no identity: 8 -> 16 channels) and a replicated dense head without scales.
      "c": {"kernel": rng.normal(0, 0.3, (3, 3, 8, 16))},
      "head": rng.normal(0, 0.3, (16, 8)),
  }
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
  specs = {"a": {"kernel": P(None, None, None, "x"), "bias": P("x")}, "b": {"kernel": P(None, None, "x", None)},
           "c": {"kernel": P()}, "head": P()}
  vec = lambda n, lo, hi: np.asarray(rng.uniform(lo, hi, n), np.float32)
  scales = {
      "a": {"kernel": CSLAScales(conv=vec(16, -1.5, 1.5), pointwise=vec(16, 0.2, 1.0), identity=True),
            "bias": None},
      "b": {"kernel": CSLAScales(conv=vec(16, 0.5, 1.5), pointwise=vec(16, -1.0, 1.0), identity=True)},
      "c": {"kernel": CSLAScales(conv=vec(16, 0.5, 1.5), pointwise=vec(16, 0.2, 1.0))},
      "head": None,
  }
  grads = [jax.tree.map(lambda a: np.asarray(rng.normal(0, 1, a.shape), np.float32), params)
           for _ in range(STEPS)]
  return params, specs, scales, grads


OPTIMIZERS = {
    "repopt_sgd": lambda scales: repopt_sgd(0.1, scales, weight_decay=1e-3),
    "repopt_adamw": lambda scales: repopt_adamw(0.01, scales, eps=1e-6, weight_decay=1e-2),
}


def run(tx, params, grads):
  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def step(p, state, g):
    u, state = tx.update(g, state, p)
    return optax.apply_updates(p, u), state, u

  state = jax.jit(tx.init, compiler_options=FAST_COMPILE)(params)
  for g in grads:
    params, state, updates = step(params, state, g)
  return params, state, updates


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_sharded_step_matches_single_device(name):
  params, specs, scales, grads = setup()
  tx = OPTIMIZERS[name](scales)
  mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
  assert mesh.devices.size == 8, "conftest must provide 8 CPU devices"
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))

  dev0 = jax.devices()[0]
  ref_p, _, ref_u = run(tx, jax.device_put(params, dev0), [jax.device_put(g, dev0) for g in grads])
  sh_p, sh_state, sh_u = run(tx, jax.device_put(params, shardings), [jax.device_put(g, shardings) for g in grads])

  def check(path, out, ref, sharding):
    name_ = jax.tree_util.keystr(path)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6, err_msg=name_)
    assert out.sharding.is_equivalent_to(sharding, out.ndim), (name_, out.sharding, sharding)

  jax.tree_util.tree_map_with_path(check, sh_p, ref_p, shardings)
  jax.tree_util.tree_map_with_path(check, sh_u, ref_u, shardings)
  # The moment buffers are sharded like their params (one per param, no mask among them).
  by_path = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  matched = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(sh_state)[0]:
    key = jax.tree_util.keystr(path)
    owner = [k for k in by_path if key.endswith(k)]
    if leaf.ndim:
      assert len(owner) == 1, key
      assert leaf.sharding.is_equivalent_to(by_path[owner[0]], leaf.ndim), (key, leaf.sharding)
      matched += 1
  assert matched == len(by_path) * (1 if name == "repopt_sgd" else 2)
  # Guard against a vacuous comparison: the kernels moved.
  assert float(jnp.max(jnp.abs(sh_p["a"]["kernel"] - params["a"]["kernel"]))) > 1e-3


def test_grad_mult_sharded_like_kernel():
  """The full mask built under jit for a sharded kernel is itself sharded, and correct on every shard."""
  mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
  s = CSLAScales(conv=np.arange(1, 17, dtype=np.float32) / 8, pointwise=np.full(16, 0.5, np.float32), identity=True)
  sharding = NamedSharding(mesh, P(None, None, "x", None))
  g = jax.device_put(jnp.ones((3, 3, 16, 16)), sharding)
  m = jax.jit(lambda g: g * grad_mult(s, g.shape))(g)
  assert m.sharding.is_equivalent_to(sharding, 4)
  conv2 = (np.arange(1, 17) / 8) ** 2
  expect = np.broadcast_to(conv2, (3, 3, 16, 16)).copy()
  expect[1, 1] += 0.25 + np.eye(16)
  np.testing.assert_allclose(np.asarray(m), expect, rtol=1e-6)
