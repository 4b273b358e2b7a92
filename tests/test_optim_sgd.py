"""RepOptimizer-SGD against the paper's proposition, computed independently.

The truth is a CSLA block whose branch weights (3x3 W3, 1x1 W1, identity gamma, and any extra branches) are
separate parameters trained by plain Optax SGD; the candidate is one kernel initialised by `csla_init` and
trained by `repopt_sgd`. After the same batches, the block's equivalent kernel
`s*W3 + t*pad(W1) + diag(gamma)` must equal the single kernel to float rounding.

Also here: the optimizer state of `repopt_sgd` on a RepOpt-VGG-B1-sized tree is exactly plain SGD's, and the
lowered update holds no kernel-sized constant (the Grad Mult is rebuilt from the scale vectors).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import x64
from repopt_jax import CSLAScales, csla_init, repopt_adamw, repopt_sgd

MOMENTUM = 0.9
# These programs are tiny and compiled once each: LLVM's optimisation passes would dominate the run time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def conv(x, w, stride=1, groups=1):
  """Centred conv, the official padding (k // 2 per side): a 1x1 reads the 3x3's centre tap at any stride."""
  kh, kw = w.shape[:2]
  return jax.lax.conv_general_dilated(
      x, w, (stride, stride), ((kh // 2, kh // 2), (kw // 2, kw // 2)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
      precision=jax.lax.Precision.HIGHEST)


def loss_of(y, target):
  return jnp.mean((jnp.tanh(y) - target) ** 2)


def block_loss(p, x, target, *, scales, stride, groups, identity):
  """The multi-branch CSLA block (the truth): every branch is its own trainable weight."""
  y = scales["conv"] * conv(x, p["w3"], stride, groups)
  if "w1" in p:
    y = y + scales["pointwise"] * conv(x, p["w1"], stride, groups)
  for j, s in enumerate(scales.get("extra", ())):
    y = y + s * conv(x, p[f"wx{j}"], stride, groups)
  if identity:
    y = y + p["gamma"] * x
  return loss_of(y + p["b"], target)


def single_loss(p, x, target, *, stride, groups):
  return loss_of(conv(x, p["w"], stride, groups) + p["b"], target)


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=FAST_COMPILE)
def train(loss_fn, tx, params, xs, ts):
  def step(carry, batch):
    p, state = carry
    g = jax.grad(loss_fn)(p, *batch)
    u, state = tx.update(g, state, p)
    return (optax.apply_updates(p, u), state), None

  (p, _), _ = jax.lax.scan(step, (params, tx.init(params)), (xs, ts))
  return p


def equivalent_kernel(p, scales, identity, groups):
  """`s*W3 + t*pad(W1) + sum_k s_k*pad(W_k) + diag(gamma)` written out with numpy, independently of the core."""
  w = np.asarray(p["w3"], np.float64) * np.asarray(scales["conv"], np.float64)
  kh, kw, cin, cout = w.shape
  branches = []
  if "w1" in p:
    branches.append((np.asarray(p["w1"], np.float64), scales["pointwise"]))
  branches += [(np.asarray(p[f"wx{j}"], np.float64), s) for j, s in enumerate(scales.get("extra", ()))]
  for k, s in branches:
    bh, bw = k.shape[:2]
    top, left = (kh - bh) // 2, (kw - bw) // 2
    w[top:top + bh, left:left + bw] += k * np.asarray(s, np.float64)
  if identity:
    per_group = cout // groups
    for c in range(cout):  # output c of group c // per_group reads global input c: local index c - g * cin
      w[kh // 2, kw // 2, c - (c // per_group) * cin, c] += float(p["gamma"][c])
  return w


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def random_scales(rng, c, n_negative=2):
  """Per-channel scales around 1 with a few negative channels (GR must not assume positive scales)."""
  s = rng.uniform(0.4, 1.6, c)
  s[rng.choice(c, n_negative, replace=False)] *= -1
  return s


def run_equivalence(dtype, *, cin, cout, stride, identity, lr, steps, groups=1, extra=(), kernel=3,
                    pointwise=True, seed=0, batch=4, hw=6, control=True):
  """Trains truth and candidate on the same batches; returns (truth kernel, candidate, W'(0), plain-SGD kernel)."""
  rng = np.random.default_rng(seed)
  f = lambda a: jnp.asarray(a, dtype)
  per_group_in = cin // groups
  s = random_scales(rng, cout)
  scales_np = {"conv": s}
  p = {"w3": f(rng.normal(0, 0.3, (kernel, kernel, per_group_in, cout))), "b": f(rng.normal(0, 0.1, cout))}
  if pointwise:
    scales_np["pointwise"] = random_scales(rng, cout)
    p["w1"] = f(rng.normal(0, 0.3, (1, 1, per_group_in, cout)))
  scales_np["extra"] = [random_scales(rng, cout, 1) for _ in extra]
  for j, (bh, bw) in enumerate(extra):
    p[f"wx{j}"] = f(rng.normal(0, 0.3, (bh, bw, per_group_in, cout)))
  if identity:
    p["gamma"] = f(rng.uniform(0.5, 1.5, cout))  # a "trained" gamma(0), as the Rule of Init. takes from HS
  out_hw = (hw + stride - 1) // stride
  xs = f(rng.normal(0, 1, (steps, batch, hw, hw, cin)))
  ts = f(rng.uniform(-0.8, 0.8, (steps, batch, out_hw, out_hw, cout)))
  wd = 1e-2
  scales_np = jax.tree.map(lambda a: np.asarray(a, dtype), scales_np)  # both sides use the same values
  scales_j = jax.tree.map(f, scales_np)

  # Truth: plain Optax on the branches, decay on every branch weight, not on the bias.
  decay_mask = {k: k != "b" for k in p}
  truth_tx = optax.chain(optax.add_decayed_weights(wd, decay_mask),
                         optax.sgd(lr, momentum=MOMENTUM, nesterov=True))
  truth_loss = functools.partial(block_loss, scales=scales_j, stride=stride, groups=groups, identity=identity)
  truth = train(truth_loss, truth_tx, p, xs, ts)

  # Candidate: one kernel, Rule of Initialization + repopt_sgd.
  cs = CSLAScales(conv=scales_np["conv"], pointwise=scales_np.get("pointwise"), identity=identity,
                  extra=tuple(zip(extra, scales_np["extra"])),
                  identity_init=np.asarray(p["gamma"]) if identity else None)
  w0 = csla_init(cs, p["w3"], p.get("w1"), cs.identity_init, [p[f"wx{j}"] for j in range(len(extra))])
  assert w0.dtype == jnp.dtype(dtype)
  q = {"w": w0, "b": p["b"]}
  tx = repopt_sgd(lr, {"w": cs, "b": None}, momentum=MOMENTUM, nesterov=True, weight_decay=wd,
                  weight_decay_mask={"w": True, "b": False})
  single = functools.partial(single_loss, stride=stride, groups=groups)
  cand = train(single, tx, q, xs, ts)
  assert cand["w"].dtype == jnp.dtype(dtype)

  # Control: the same single kernel under plain SGD (no Grad Mult) must NOT follow the block.
  plain = None
  if control:
    plain_tx = optax.chain(optax.add_decayed_weights(wd, {"w": True, "b": False}),
                           optax.sgd(lr, momentum=MOMENTUM, nesterov=True))
    plain = np.asarray(train(single, plain_tx, q, xs, ts)["w"], np.float64)

  w_truth = equivalent_kernel(truth, scales_np, identity, groups)
  w_init = equivalent_kernel(p, scales_np, identity, groups)
  np.testing.assert_allclose(np.asarray(w0, np.float64), w_init, rtol=0, atol=1e-6 * np.abs(w_init).max())
  # The bias has no scales: it must follow the truth's bias too.
  bias_err = rel_err(cand["b"], truth["b"])
  return w_truth, np.asarray(cand["w"], np.float64), w_init, plain, bias_err


TOL = {"float32": 1e-5, "float64": 1e-10}

CASES = {
    # name: kwargs. Random per-channel scales with negative entries in all of them.
    "identity_stride1_const_lr": dict(cin=6, cout=6, stride=1, identity=True, lr=0.05, steps=50),
    "strided_no_identity_cosine": dict(
        cin=4, cout=6, stride=2, identity=False, steps=60,
        lr=optax.warmup_cosine_decay_schedule(0.0, 0.1, warmup_steps=10, decay_steps=60, end_value=0.005)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sgd_equivalence(case, dtype):
  # The plain-SGD control is dtype-independent: run it once, in float64.
  w_truth, w_cand, w_init, w_plain, bias_err = run_equivalence(dtype, control=dtype == "float64", **CASES[case])
  err = rel_err(w_cand, w_truth)
  moved = rel_err(w_truth, w_init)
  print(f"\n[sgd {case} {dtype}] max rel err {err:.3e} (bias {bias_err:.3e}); kernel moved {moved:.3f}")
  assert moved > 0.05, "training must move the kernel for the comparison to mean anything"
  if w_plain is not None:
    plain_err = rel_err(w_plain, w_truth)
    print(f"[sgd {case}] plain SGD (no Grad Mult) off by {plain_err:.3f}")
    assert plain_err > 1e-2, "plain SGD must differ from the block: the Grad Mult is what makes it exact"
  assert err <= TOL[dtype], err
  assert bias_err <= TOL[dtype], bias_err


GENERAL = {
    # Grouped conv (2 groups) with 1x1, 1x3 and 3x1 branches and the identity (C_in == C_out).
    "grouped_acnet": ("float64", dict(cin=4, cout=4, groups=2, stride=1, identity=True, lr=0.05, steps=20,
                                      extra=((1, 3), (3, 1)))),
    # Depthwise (groups == channels): the identity is the centre tap of every channel's own filter.
    "depthwise": ("float64", dict(cin=5, cout=5, groups=5, stride=1, identity=True, lr=0.1, steps=20)),
    # A 3x3 (and a 1x1) inside a 5x5, strided, no identity.
    "3x3_in_5x5": ("float64", dict(cin=3, cout=4, stride=2, identity=False, lr=0.05, steps=20, kernel=5,
                                   extra=((3, 3),), hw=8)),
    # float32 spot check: depthwise with ACNet-like branches.
    "depthwise_acnet_f32": ("float32", dict(cin=4, cout=4, groups=4, stride=1, identity=True, lr=0.05, steps=20,
                                            extra=((1, 3), (3, 1)))),
}


@pytest.mark.parametrize("case", list(GENERAL))
def test_sgd_equivalence_generalised(case):
  dtype, kwargs = GENERAL[case]
  if dtype == "float64":
    with x64():
      w_truth, w_cand, w_init, _, bias_err = run_equivalence(dtype, control=False, **kwargs)
  else:
    w_truth, w_cand, w_init, _, bias_err = run_equivalence(dtype, control=False, **kwargs)
  err = rel_err(w_cand, w_truth)
  print(f"\n[sgd {case} {dtype}] max rel err {err:.3e}; moved {rel_err(w_truth, w_init):.3f}")
  assert rel_err(w_truth, w_init) > 0.02
  assert err <= TOL[dtype], err
  assert bias_err <= TOL[dtype]


# ---------------------------------------------------------------------------------------------------------
# State size and constants on a RepOpt-VGG-B1-sized tree.

B1_STAGES = ((1, 64), (4, 128), (6, 256), (16, 512), (1, 2048))


def b1_tree():
  """`(param shapes, scales tree)` of RepOpt-VGG-B1 (target mode): one 3x3 kernel + BN per block, a head."""
  params, scales = {}, {}
  rng = np.random.default_rng(0)
  vec = lambda n: rng.uniform(0.5, 1.5, n).astype(np.float32)  # not splat constants once lowered
  cin = 3
  for stage, (n, width) in enumerate(B1_STAGES):
    for j in range(n):
      name = "stage0" if stage == 0 else f"stage{stage}.{j}"
      identity = stage in (1, 2, 3) and j > 0
      params[name] = {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, cin, width), jnp.float32)},
                      "bn": {"scale": jax.ShapeDtypeStruct((width,), jnp.float32),
                             "bias": jax.ShapeDtypeStruct((width,), jnp.float32)}}
      scales[name] = {"conv": {"kernel": CSLAScales(conv=vec(width), pointwise=vec(width), identity=identity)},
                      "bn": {"scale": None, "bias": None}}
      cin = width
  params["head"] = {"kernel": jax.ShapeDtypeStruct((2048, 1000), jnp.float32),
                    "bias": jax.ShapeDtypeStruct((1000,), jnp.float32)}
  scales["head"] = {"kernel": None, "bias": None}
  return params, scales


def tree_bytes(tree):
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_b1_state_size_equals_plain_sgd():
  params, scales = b1_tree()
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert 50e6 < n_params < 53e6, n_params  # the paper's 51.8M inference params for B1
  rep = jax.eval_shape(repopt_sgd(0.1, scales, weight_decay=4e-5).init, params)
  ref = jax.eval_shape(optax.sgd(0.1, 0.9, nesterov=True).init, params)
  rep_bytes, ref_bytes = tree_bytes(rep), tree_bytes(ref)
  print(f"\n[B1 state] params {n_params} ({tree_bytes(params)} B); repopt_sgd state {rep_bytes} B; "
        f"optax.sgd state {ref_bytes} B")
  assert rep_bytes == ref_bytes == tree_bytes(params)  # one momentum buffer per param, no mask
  # Same for AdamW: Adam's (count, mu, nu), nothing more.
  rep_adam = tree_bytes(jax.eval_shape(repopt_adamw(1e-3, scales, weight_decay=0.05).init, params))
  ref_adam = tree_bytes(jax.eval_shape(optax.adamw(1e-3, weight_decay=0.05).init, params))
  print(f"[B1 state] repopt_adamw state {rep_adam} B; optax.adamw state {ref_adam} B")
  assert rep_adam == ref_adam == 2 * tree_bytes(params) + 4


_CONST = re.compile(r"stablehlo\.constant\s+dense<(.*?)>\s*:\s*tensor<([^>]*)>")


def constant_sizes(text):
  """Element counts of the non-splat constants in StableHLO text (a splat is one value, whatever its shape)."""
  sizes = []
  for value, ty in _CONST.findall(text):
    if not (value.startswith("[") or value.startswith('"')):
      continue
    dims = [int(d) for d in ty.split("x")[:-1]]
    sizes.append(int(np.prod(dims)) if dims else 1)
  return sizes


_HLO_CONST = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]\S*\s+constant\(")


def compiled_constant_sizes(text):
  """Element counts of all constants in optimised (compiled) HLO text."""
  return [int(np.prod([int(d) for d in dims.split(",") if d])) for dims in _HLO_CONST.findall(text)]


def test_b1_update_has_no_kernel_sized_constant():
  params, scales = b1_tree()
  tx = repopt_sgd(0.1, scales, weight_decay=4e-5)
  state = jax.eval_shape(tx.init, params)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p))
  sizes = constant_sizes(update.lower(params, state, params).as_text())
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(f"\n[B1 update] {len(sizes)} non-splat constants in the lowered update, largest {max(sizes)} elements, "
        f"{sum(sizes)} in all (smallest kernel 1728 elements, {n_params} params)")
  assert max(sizes) <= 2048  # per-output-channel scale vectors (widest layer 2048) and tap masks only
  assert sum(sizes) < 1e-3 * n_params

  # After XLA's optimisations (constant folding could materialise a mask): compile a slice of the tree.
  part = ["stage0", "stage1.0", "stage1.1", "head"]
  sub_p, sub_s = {k: params[k] for k in part}, {k: scales[k] for k in part}
  sub_tx = repopt_sgd(0.1, sub_s, weight_decay=4e-5)
  sub_state = jax.eval_shape(sub_tx.init, sub_p)
  compiled = jax.jit(lambda g, s, p: sub_tx.update(g, s, p)).lower(sub_p, sub_state, sub_p).compile()
  csizes = compiled_constant_sizes(compiled.as_text())
  print(f"[stage0-stage1.1 compiled update] {len(csizes)} constants, largest {max(csizes)} elements")
  assert max(csizes) <= 128  # widest layer in the slice

  # The parsers do see a kernel-sized constant when there is one.
  kernel = jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32)
  big = jax.jit(lambda p: p * np.arange(3 * 3 * 64 * 64, dtype=np.float32).reshape(3, 3, 64, 64)).lower(kernel)
  assert max(constant_sizes(big.as_text())) == 36864
  assert max(compiled_constant_sizes(big.compile().as_text())) == 36864
