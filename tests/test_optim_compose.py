"""RepOptimizers inside Optax's combinators, every case against a hand computation.

In the spirit of optax's alias tests: a small params tree (two backbone 3x3 convs, BatchNorm-like 1-D params,
a head with a 3x3 conv and a Dense) and fixed gradients; each combinator's output is compared, number by
number, with a NumPy re-computation of the same steps. The Grad Mults there are written from REPOPT.md's
formula (`s_c^2` everywhere, `+ t_c^2` at the centre tap, `+ 1` at the centre where `i == c`; a conv bias
`s_c^2 + t_c^2`), not from `repopt_jax.rules`, so the two are independent transcriptions.

The scales come in the three forms the optimizers take (see `repopt_jax.optim`): the flat
`{path: CSLAScales}` dict `csla.scales_of` returns, the full scales tree `csla.scales_tree` builds from it,
and a subtree (the backbone's entries only).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conftest import x64
from repopt_jax import CSLAScales, ScalesError, csla, path_str, repopt_adamw, repopt_masks, repopt_sgd

# Tiny programs compiled once each: skip LLVM's expensive passes (the numerics are XLA's either way).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

LR_SGD, MOMENTUM, WD_SGD = 0.1, 0.9, 1e-3
LR_ADAM, B1, B2, EPS, WD_ADAM = 0.01, 0.9, 0.999, 1e-6, 1e-2

SHAPES = {
    "backbone/conv1/kernel": (3, 3, 2, 4), "backbone/conv1/bias": (4,),
    "backbone/bn1/scale": (4,), "backbone/bn1/bias": (4,),
    "backbone/conv2/kernel": (3, 3, 4, 4),
    "head/conv/kernel": (3, 3, 4, 4),
    "head/dense/kernel": (4, 2), "head/dense/bias": (2,),
}
# The blocks' constants: 2 -> 4 channels cannot have an identity branch; conv2 and the head's conv have one.
SPECS = {
    "backbone/conv1/kernel": dict(conv=[0.5, -1.0, 2.0, 0.75], pointwise=[1.5, 0.25, -0.5, 1.0], identity=False),
    "backbone/conv2/kernel": dict(conv=[1.2, 0.8, -0.6, 1.1], pointwise=[0.3, -1.1, 0.9, 0.4], identity=True),
    "head/conv/kernel": dict(conv=[0.7, 1.3, -0.4, 0.9], pointwise=None, identity=True),
}
BACKBONE = [k for k in SHAPES if k.startswith("backbone/")]


def nest(flat):
  """`{'a/b': x}` -> `{'a': {'b': x}}`."""
  out = {}
  for path, value in flat.items():
    *head, last = path.split("/")
    node = out
    for k in head:
      node = node.setdefault(k, {})
    node[last] = value
  return out


def flatten(tree):
  return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def flat_scales():
  """What `csla.scales_of` gives: kernel paths only."""
  out = {}
  for path, spec in SPECS.items():
    pw = spec["pointwise"]
    out[path] = CSLAScales(conv=np.array(spec["conv"]), pointwise=None if pw is None else np.array(pw),
                           identity=spec["identity"])
  return out


def scales_in(form):
  flat = flat_scales()
  if form == "flat":
    return flat
  if form == "full":
    return csla.scales_tree(nest({k: np.zeros(s) for k, s in SHAPES.items()}), flat)
  if form == "subtree":  # the backbone's part of the tree, as nested dicts
    return {"backbone": nest({k[len("backbone/"):]: v for k, v in flat.items() if k.startswith("backbone/")})}
  raise ValueError(form)


def data(dtype, steps=2, seed=0):
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(0, 0.5, s).astype(dtype) for k, s in SHAPES.items()}
  grads = [{k: rng.normal(0, 1, s).astype(dtype) for k, s in SHAPES.items()} for _ in range(steps)]
  return params, grads


# ------------------------------------------------------------------------------- the hand computation
def branches(path, shape, specs=SPECS):
  """`[(scale broadcast to shape, 0/1 taps)]` of the branches at each element, from REPOPT.md.

  Kernel `(kh, kw, I, O)`: the full-size branch everywhere with `s_c`; the 1x1 at the centre tap with `t_c`;
  the identity at the centre tap where `i == c`, with scale 1. A conv's bias `(O,)`: each branch's bias with
  its scale, no identity.
  """
  kernel = path if path.endswith("kernel") else path[: -len("bias")] + "kernel"
  spec = specs.get(kernel)
  if spec is None:
    return None
  if len(shape) == 1:
    out = [(np.array(spec["conv"]), np.ones(shape))]
    if spec["pointwise"] is not None:
      out.append((np.array(spec["pointwise"]), np.ones(shape)))
    return out
  kh, kw, cin, cout = shape
  centre = np.zeros(shape)
  centre[kh // 2, kw // 2] = 1.0
  out = [(np.broadcast_to(np.array(spec["conv"]), shape), np.ones(shape))]
  if spec["pointwise"] is not None:
    out.append((np.broadcast_to(np.array(spec["pointwise"]), shape), centre))
  if spec["identity"]:
    diag = np.zeros(shape)
    for c in range(cout):
      diag[kh // 2, kw // 2, c, c] = 1.0
    out.append((np.ones(shape), diag))
  return out


def hand_mult(path, shape, power=2, specs=SPECS):
  """The Grad Mult of one leaf (1 where it has none)."""
  br = branches(path, shape, specs)
  if br is None:
    return np.ones(shape)
  return sum(taps * s ** power for s, taps in br)


def hand_leaf(kind, p, grads, lrs, path, scaled=True):
  """One leaf through `kind` (`sgd`, `adamw`, `adamw_paper`, `plain_adamw`) for the given steps.

  Returns the final value and the last update. `scaled=False`: the leaf gets no Grad Mult (masked out).
  """
  p = np.array(p, np.float64)
  shape = p.shape
  br = branches(path, shape) if scaled else None
  m = v = buf = np.zeros(shape)
  update = None
  for t, (g, lr) in enumerate(zip(grads, lrs), 1):
    g = np.asarray(g, np.float64)
    if kind == "sgd":
      d = g * (hand_mult(path, shape) if br else 1.0) + WD_SGD * p
      buf = MOMENTUM * buf + d
      update = -lr * (d + MOMENTUM * buf)
    else:
      m1 = hand_mult(path, shape, power=1) if (br and kind == "adamw_paper") else 1.0
      g = g * m1
      m = B1 * m + (1 - B1) * g
      v = B2 * v + (1 - B2) * g * g
      mh, vh = m / (1 - B1 ** t), v / (1 - B2 ** t)
      if br and kind == "adamw":
        d = sum(taps * s * s * mh / (np.abs(s) * np.sqrt(vh) + EPS) for s, taps in br)
      else:
        d = mh / (np.sqrt(vh) + EPS) * m1
      update = -lr * (d + WD_ADAM * p)
    p = p + update
  return p, update


def check(got, want, dtype, what=""):
  rtol, atol = (1e-10, 1e-12) if dtype == "float64" else (2e-5, 2e-6)
  assert set(got) == set(want), (sorted(got), sorted(want))
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=f"{what} {k}")


OPTIMIZERS = {
    "sgd": lambda scales: repopt_sgd(LR_SGD, scales, momentum=MOMENTUM, weight_decay=WD_SGD),
    "adamw": lambda scales: repopt_adamw(LR_ADAM, scales, b1=B1, b2=B2, eps=EPS, weight_decay=WD_ADAM),
    "adamw_paper": lambda scales: repopt_adamw(LR_ADAM, scales, b1=B1, b2=B2, eps=EPS, weight_decay=WD_ADAM,
                                               exact=False),
}
LR = {"sgd": LR_SGD, "adamw": LR_ADAM, "adamw_paper": LR_ADAM}


def jit_step(tx):
  """One jitted step (a single small program: faster than the dozens of eager ops it replaces)."""
  def step(p, state, g):
    u, state = tx.update(g, state, p)
    return optax.apply_updates(p, u), state, u

  return jax.jit(step, compiler_options=FAST_COMPILE)


def run(tx, params, grads):
  """Steps `tx` through `grads` under jit; returns the final params, the last updates (flat) and the state."""
  step = jit_step(tx)
  p, state = params, tx.init(params)
  for g in grads:
    p, state, u = step(p, state, g)
  return flatten(p), flatten(u), state


def as_tree(flat):
  return nest({k: jnp.asarray(v) for k, v in flat.items()})


@pytest.fixture
def f64():
  """float64 only: cases whose numbers do not depend on the dtype (the float32 ones are elsewhere)."""
  with x64():
    yield "float64"


# ------------------------------------------------------------------------------------------------ masked
@pytest.mark.parametrize("form", ["flat", "full"])
@pytest.mark.parametrize("mask_kind", ["prefix", "per_leaf", "callable"])
def test_masked_out_kernels_get_no_grad_mult(form, mask_kind, f64):
  """`optax.masked(repopt_masks(scales), backbone)`: the head's conv has scales but is masked out."""
  dtype = f64
  params, grads = data(dtype, steps=1)
  mask = {"prefix": {"backbone": True, "head": False},
          "per_leaf": nest({k: k in BACKBONE for k in SHAPES}),
          "callable": lambda p: jax.tree_util.tree_map_with_path(lambda q, _: path_str(q) in BACKBONE, p)}[mask_kind]
  tx = optax.chain(optax.masked(repopt_masks(scales_in(form)), mask), optax.sgd(LR_SGD))
  _, got, _ = run(tx, as_tree(params), [as_tree(grads[0])])
  want = {k: -LR_SGD * grads[0][k] * (hand_mult(k, s) if k in BACKBONE else 1.0) for k, s in SHAPES.items()}
  check(got, want, dtype)
  # Not vacuous: the head's conv would have had a Grad Mult, the masked-in conv1 bias has one.
  assert np.abs(hand_mult("head/conv/kernel", SHAPES["head/conv/kernel"]) - 1).max() > 0.5
  assert np.abs(hand_mult("backbone/conv1/bias", (4,)) - 1).max() > 0.5


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_masked_optimizer(name, dtype):
  """A whole RepOptimizer under `optax.masked`: masked-out leaves pass through untouched (their grads)."""
  params, grads = data(dtype)
  tx = optax.masked(OPTIMIZERS[name](scales_in("full")), {"backbone": True, "head": False})
  _, got_u, _ = run(tx, as_tree(params), [as_tree(g) for g in grads])
  want_u = {}
  for k in SHAPES:
    if k in BACKBONE:
      want_u[k] = hand_leaf(name, params[k], [g[k] for g in grads], [LR[name]] * 2, k)[1]
    else:
      want_u[k] = grads[-1][k]  # optax.masked passes masked-out updates through as they came
  check(got_u, want_u, dtype, name)


# --------------------------------------------------------------------------------------- multi_transform
@pytest.mark.parametrize("form", ["flat", "full", "subtree"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_multi_transform(form, name, f64):
  """RepOpt for the backbone, optax.adamw for the head; the scales of the whole model or of the backbone."""
  dtype = f64
  params, grads = data(dtype)
  labels = {"backbone": "rep", "head": "adam"}
  tx = optax.multi_transform(
      {"rep": OPTIMIZERS[name](scales_in(form)),
       "adam": optax.adamw(LR_ADAM, b1=B1, b2=B2, eps=EPS, weight_decay=WD_ADAM)}, labels)
  got_p, _, _ = run(tx, as_tree(params), [as_tree(g) for g in grads])
  want_p = {}
  for k in SHAPES:
    kind, lr = (name, LR[name]) if k in BACKBONE else ("plain_adamw", LR_ADAM)
    want_p[k] = hand_leaf(kind, params[k], [g[k] for g in grads], [lr] * 2, k)[0]
  check(got_p, want_p, dtype, f"{name}/{form}")


def test_multi_transform_chain_of_masks_and_sgd(dtype):
  """The issue's form: `{'rep': chain(repopt_masks(full scales), sgd), 'adam': adamw}` with per-leaf labels."""
  params, grads = data(dtype, steps=1)
  labels = nest({k: "rep" if k in BACKBONE else "adam" for k in SHAPES})
  tx = optax.multi_transform({"rep": optax.chain(repopt_masks(scales_in("full")), optax.sgd(LR_SGD)),
                              "adam": optax.adamw(LR_ADAM, eps=EPS, weight_decay=WD_ADAM)}, labels)
  _, got, _ = run(tx, as_tree(params), [as_tree(grads[0])])
  want = {k: (-LR_SGD * grads[0][k] * hand_mult(k, SHAPES[k]) if k in BACKBONE
              else hand_leaf("plain_adamw", params[k], [grads[0][k]], [LR_ADAM], k)[1]) for k in SHAPES}
  check(got, want, dtype)


# -------------------------------------------------------------------------------------------- MultiSteps
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_multisteps_equals_one_step_on_the_mean_gradient(name, dtype):
  """k = 3 micro-batches per step, two steps: the same as two steps on the mean gradients."""
  k = 3
  params, micro = data(dtype, steps=2 * k, seed=1)
  # optax accumulates in float32 unless told otherwise; float64 asks for a float64 accumulator (exact).
  tx = optax.MultiSteps(OPTIMIZERS[name](scales_in("flat")), every_k_schedule=k, accumulator_dtype=dtype)
  step = jit_step(tx)
  p = as_tree(params)
  state = tx.init(p)
  for i, g in enumerate(micro):
    p, state, u = step(p, state, as_tree(g))
    if (i + 1) % k:
      assert all(not np.any(x) for x in flatten(u).values()), f"micro-step {i} moved the params"
  means = [{key: np.mean([np.asarray(g[key], np.float64) for g in micro[j * k:(j + 1) * k]], 0) for key in SHAPES}
           for j in range(2)]
  want = {key: hand_leaf(name, params[key], [m[key] for m in means], [LR[name]] * 2, key)[0] for key in SHAPES}
  check(flatten(p), want, dtype, name)


# ----------------------------------------------------------------------------------- inject_hyperparams
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_inject_hyperparams_learning_rate_takes_effect(name):
  """Under jit: the learning rate set in the state between steps is the one the next step uses."""
  params, grads = data("float32")
  lr = LR[name]
  if name == "sgd":
    tx = optax.inject_hyperparams(repopt_sgd)(lr, scales_in("flat"), momentum=MOMENTUM, weight_decay=WD_SGD)
  else:
    tx = optax.inject_hyperparams(repopt_adamw)(lr, scales_in("flat"), b1=B1, b2=B2, eps=EPS,
                                                weight_decay=WD_ADAM, exact=name == "adamw")
  step = jax.jit(lambda p, s, g: tx.update(g, s, p), compiler_options=FAST_COMPILE)
  p, state = as_tree(params), tx.init(as_tree(params))
  u, state = step(p, state, as_tree(grads[0]))
  p = optax.apply_updates(p, u)
  state.hyperparams["learning_rate"] = jnp.asarray(lr / 4)
  u, state = step(p, state, as_tree(grads[1]))
  p = optax.apply_updates(p, u)
  want = {k: hand_leaf(name, params[k], [g[k] for g in grads], [lr, lr / 4], k)[0] for k in SHAPES}
  check(flatten(p), want, "float32", name)
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(lr / 4)


# ------------------------------------------------------------------------------------- apply_if_finite
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_apply_if_finite_skips_a_nan_step(name, dtype):
  params, grads = data(dtype, steps=3)
  bad = dict(grads[1])
  bad["backbone/conv2/kernel"] = bad["backbone/conv2/kernel"].copy()
  bad["backbone/conv2/kernel"][1, 1, 0, 0] = np.nan
  tx = optax.apply_if_finite(OPTIMIZERS[name](scales_in("full")), max_consecutive_errors=3)
  step = jit_step(tx)
  p0 = as_tree(params)
  state = tx.init(p0)
  p1, state, _ = step(p0, state, as_tree(grads[0]))
  p2, state, _ = step(p1, state, as_tree(bad))
  assert int(state.notfinite_count) == 1 and int(state.total_notfinite) == 1 and not bool(state.last_finite)
  for key, x in flatten(p2).items():  # the NaN step changed nothing
    np.testing.assert_array_equal(x, flatten(p1)[key], err_msg=key)
  p3, state, _ = step(p2, state, as_tree(grads[2]))
  assert int(state.notfinite_count) == 0 and int(state.total_notfinite) == 1
  # The skipped step left the momentum / moments alone: two steps on the finite gradients.
  want = {k: hand_leaf(name, params[k], [grads[0][k], grads[2][k]], [LR[name]] * 2, k)[0] for k in SHAPES}
  check(flatten(p3), want, dtype, name)


# ----------------------------------------------------------------------------------- clip_by_global_norm
def test_clip_by_global_norm_before_the_mask(dtype):
  """The clip sees the raw gradients' norm; the Grad Mult then scales the clipped ones (and the order counts)."""
  params, grads = data(dtype, steps=1)
  g = grads[0]
  norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in g.values()))
  c = 0.5 * norm
  tx = optax.chain(optax.clip_by_global_norm(c), repopt_masks(scales_in("flat")), optax.sgd(LR_SGD))
  _, got, _ = run(tx, as_tree(params), [as_tree(g)])
  want = {k: -LR_SGD * (c / norm) * g[k] * hand_mult(k, s) for k, s in SHAPES.items()}
  check(got, want, dtype)
  # After the mask instead: clipped to the norm of the multiplied gradients, a different step.
  tx = optax.chain(repopt_masks(scales_in("flat")), optax.clip_by_global_norm(c), optax.sgd(LR_SGD))
  _, after, _ = run(tx, as_tree(params), [as_tree(g)])
  mg = {k: g[k] * hand_mult(k, s) for k, s in SHAPES.items()}
  mnorm = np.sqrt(sum(np.sum(x ** 2) for x in mg.values()))
  check(after, {k: -LR_SGD * (c / mnorm) * x for k, x in mg.items()}, dtype)
  assert abs(mnorm / norm - 1) > 0.1


# ------------------------------------------------------------------------------------------ sharding
SPECS_2 = {"backbone/conv1/kernel": P(None, None, None, "x"), "backbone/conv1/bias": P("x"),
           "backbone/bn1/scale": P("x"), "backbone/bn1/bias": P(),
           "backbone/conv2/kernel": P(None, None, "x", None),  # the identity's diagonal crosses the shards
           "head/conv/kernel": P(None, None, None, "x"), "head/dense/kernel": P("x", None), "head/dense/bias": P()}


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_jit_on_a_2_device_mesh_keeps_the_params_sharding(name):
  mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
  assert mesh.devices.size == 2, "conftest provides several CPU devices"
  shardings = {k: NamedSharding(mesh, s) for k, s in SPECS_2.items()}
  params, grads = data("float32")
  put = lambda flat: nest({k: jax.device_put(jnp.asarray(v), shardings[k]) for k, v in flat.items()})
  tx = optax.multi_transform({"rep": OPTIMIZERS[name](scales_in("flat")), "adam": optax.adamw(LR_ADAM, eps=EPS)},
                             {"backbone": "rep", "head": "adam"})

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def step(p, state, g):
    u, state = tx.update(g, state, p)
    return optax.apply_updates(p, u), state, u

  p = put(params)
  state = jax.jit(tx.init, compiler_options=FAST_COMPILE)(p)
  for g in grads:
    p, state, u = step(p, state, put(g))
  for tree in (p, u):
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
      key = path_str(path)
      assert x.sharding.is_equivalent_to(shardings[key], x.ndim), (key, x.sharding)
  want = {k: hand_leaf(name, params[k], [g[k] for g in grads], [LR[name]] * 2, k)[0] for k in BACKBONE}
  check({k: v for k, v in flatten(p).items() if k in BACKBONE}, want, "float32", name)


# ---------------------------------------------------------------------------------------------- NNX
class Tiny(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Conv(4, 4, (3, 3), strides=2, rngs=rngs)  # stride 2: no identity branch
    self.body = nnx.Conv(4, 4, (3, 3), use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.body(nnx.relu(self.stem(x)))))
    return self.head(x.mean((1, 2)))


def test_scales_of_dict_with_nnx_optimizer():
  """`scales_of`'s flat dict straight into `nnx.Optimizer`, alone and in a multi_transform by path."""
  hs = csla.hyper_search_model(Tiny(nnx.Rngs(0)), rngs=nnx.Rngs(1))
  scales = csla.scales_of(hs)
  assert sorted(scales) == ["body/kernel", "stem/kernel"]
  x = jax.random.normal(jax.random.key(2), (2, 6, 6, 4))
  loss = lambda m: jnp.mean(m(x) ** 2)

  def one_step(tx):
    model = Tiny(nnx.Rngs(3))
    before = flatten(nnx.as_pure(nnx.state(model, nnx.Param)))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = nnx.grad(loss)(model)
    opt.update(model, grads)
    after = flatten(nnx.as_pure(nnx.state(model, nnx.Param)))
    return before, flatten(nnx.as_pure(nnx.state(grads, nnx.Param))), after

  def spec(s):
    return dict(conv=np.asarray(s.conv, np.float64), pointwise=np.asarray(s.pointwise, np.float64),
                identity=s.identity)

  specs = {k: spec(s) for k, s in scales.items()}
  assert not specs["stem/kernel"]["identity"] and specs["body/kernel"]["identity"]
  before, g, after = one_step(optax.chain(repopt_masks(scales), optax.sgd(LR_SGD)))
  assert set(after) == {"stem/kernel", "stem/bias", "body/kernel", "bn/scale", "bn/bias", "head/kernel", "head/bias"}
  want = {k: before[k] - LR_SGD * g[k] * hand_mult(k, before[k].shape, specs=specs) for k in before}
  check(after, want, "float32", "nnx")
  # The stem's bias took its kernel's scales (s^2 + t^2), as `csla.scales_tree` gives it.
  s = scales["stem/kernel"]
  np.testing.assert_allclose((after["stem/bias"] - before["stem/bias"]) / (-LR_SGD * g["stem/bias"]),
                             np.asarray(s.conv) ** 2 + np.asarray(s.pointwise) ** 2, rtol=1e-4)
  # The same optimizer from the full scales tree; and RepOpt for the convs, Adam for the rest, by path.
  _, _, via_tree = one_step(optax.chain(repopt_masks(csla.scales_tree(Tiny(nnx.Rngs(3)), scales)),
                                        optax.sgd(LR_SGD)))
  check(via_tree, after, "float64", "scales_tree")
  labels = lambda p: jax.tree_util.tree_map_with_path(
      lambda q, _: "rep" if path_str(q).split("/")[0] in ("stem", "body") else "adam", p)
  _, _, mixed = one_step(optax.multi_transform({"rep": optax.chain(repopt_masks(scales), optax.sgd(LR_SGD)),
                                                "adam": optax.adam(LR_ADAM)}, labels))
  for k in ("stem/kernel", "stem/bias", "body/kernel"):
    np.testing.assert_array_equal(mixed[k], after[k], err_msg=k)
  np.testing.assert_allclose(mixed["head/kernel"] - before["head/kernel"], -LR_ADAM * np.sign(g["head/kernel"]),
                             rtol=1e-3)


# ------------------------------------------------------------------------------------------ bad inputs
def test_tree_map_params_sees_through_the_transforms():
  """`optax.tree_map_params` (sharding specs for the state) calls init with a placeholder: accepted."""
  params, _ = data("float32")
  for name, make in OPTIMIZERS.items():
    tx = make(scales_in("flat"))
    state = tx.init(as_tree(params))
    specs = optax.tree_map_params(tx, lambda _, spec: spec, state, nest(SPECS_2),
                                  transform_non_params=lambda _: None, is_leaf=lambda x: isinstance(x, P))
    got = [x for x in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)) if x is not None]
    assert len(got) == len(SHAPES) * (1 if name == "sgd" else 2), name


@pytest.mark.parametrize("wrap", ["plain", "masked", "multi_transform"])
def test_a_scales_path_naming_no_parameter_is_refused(wrap):
  params, _ = data("float32")
  flat = flat_scales()

  def init(scales):
    rep = repopt_masks(scales)
    if wrap == "masked":
      rep = optax.masked(rep, nest({k: k in BACKBONE for k in SHAPES}))
    elif wrap == "multi_transform":
      rep = optax.multi_transform({"rep": rep, "sgd": optax.sgd(0.1)}, {"backbone": "rep", "head": "sgd"})
    rep.init(as_tree(params))

  init(flat)  # the good scales are accepted
  typo = {**flat, "backbone/conv3/kernel": flat["backbone/conv2/kernel"]}
  with pytest.raises(ScalesError, match=re.escape("'backbone/conv3/kernel' is not a parameter (nearest: "
                                                  "'backbone/conv2/kernel')")):
    init(typo)
  rerooted = {"conv1": {"kernel": flat["backbone/conv1/kernel"]}}  # scales relative to the backbone
  with pytest.raises(ScalesError, match=re.escape("'conv1/kernel' is not a parameter (did you mean "
                                                  "'backbone/conv1/kernel'?")):
    init(rerooted)
  another = {"stage9/0/kernel": flat["head/conv/kernel"], "stage9/1/kernel": flat["head/conv/kernel"]}
  with pytest.raises(ScalesError, match=r"'stage9/0/kernel' is not a parameter; 2 such entries"):
    init(another)
  wrong = {**flat, "backbone/conv2/kernel": CSLAScales(conv=np.ones(3), identity=True)}
  with pytest.raises(ScalesError, match=r"^backbone/conv2/kernel: scale of the 3x3 branch has shape \(3,\)"):
    init(wrong)
  with pytest.raises(ScalesError, match=r"^backbone/bn1/scale: .*4-D"):  # scales on a BatchNorm scale
    init({**flat, "backbone/bn1/scale": flat["backbone/conv2/kernel"]})


def test_masked_out_subtree_takes_scales_inside_it():
  """Under a prefix mask the head is one `MaskedNode`: its scales paths name parameters that exist there."""
  params, _ = data("float32")
  tx = optax.masked(repopt_masks(flat_scales()), {"backbone": True, "head": False})
  tx.init(as_tree(params))
  nowhere = {**flat_scales(), "neck/conv/kernel": flat_scales()["head/conv/kernel"]}
  with pytest.raises(ScalesError, match="'neck/conv/kernel' is not a parameter"):
    optax.masked(repopt_masks(nowhere), {"backbone": True, "head": False}).init(as_tree(params))


def test_matching_runs_once_per_tree_structure(monkeypatch):
  """Scales are matched to a tree structure once (at init), not at every update; a new structure is matched."""
  from repopt_jax import optim  # pylint: disable=g-import-not-at-top
  calls = []
  match = optim._match_leaves  # pylint: disable=protected-access
  monkeypatch.setattr(optim, "_match_leaves", lambda by_path, tree: calls.append(1) or match(by_path, tree))
  params, grads = data("float32", steps=3)
  tx = repopt_sgd(LR_SGD, scales_in("flat"))
  p = as_tree(params)
  state = tx.init(p)
  for g in grads:
    _, state = tx.update(as_tree(g), state, p)
  assert len(calls) == 1
  masked = optax.masked(tx, {"backbone": True, "head": False})  # MaskedNodes: another structure
  masked.update(as_tree(grads[0]), masked.init(p), p)
  assert len(calls) == 2
