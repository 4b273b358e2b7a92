"""The two rules (grad_mult: eq. 13, csla_init: eq. 14) against explicit numpy references and convolutions.

Property tests draw random kernel shapes (kh, kw in {1, 3, 5}, 1..6 channels, identity when square, optional
1x1 and extra centred branches) and random scales with both signs.
"""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import x64
from repopt_jax import CSLAScales, apply_grad_mult, csla_init, grad_mult

SETTINGS = hypothesis.settings(max_examples=25, deadline=None, derandomize=True,
                               suppress_health_check=[hypothesis.HealthCheck.too_slow])


def source_channel(i, c, cin, cout, groups):
  """Global input channel read by local input `i` of output channel `c` in a grouped conv."""
  return (c // (cout // groups)) * cin + i


def ref_grad_mult(shape, conv, pointwise=None, identity=False, extra=(), power=2, groups=1):
  """Eq. 13 as an explicit loop over taps and channels: the sum of `scale^power` of the branches present."""
  kh, kw, cin, cout = shape
  ch, cw = kh // 2, kw // 2
  m = np.zeros(shape)
  for p in range(kh):
    for q in range(kw):
      for i in range(cin):
        for c in range(cout):
          v = conv[c] ** power
          centre = p == ch and q == cw
          if pointwise is not None and centre:
            v += pointwise[c] ** power
          for (bh, bw), s in extra:
            if abs(p - ch) <= bh // 2 and abs(q - cw) <= bw // 2:
              v += s[c] ** power
          if identity and centre and source_channel(i, c, cin, cout, groups) == c:
            v += 1.0
          m[p, q, i, c] = v
  return m


def ref_csla_init(conv, w, pointwise=None, w1=None, gamma=None, extra=(), wx=(), groups=1):
  """Eq. 14 in numpy: scaled kernels padded to the centre, plus gamma on the identity taps."""
  out = np.asarray(w, np.float64) * conv
  kh, kw, cin, cout = out.shape
  for s, k in ([(pointwise, w1)] if pointwise is not None else []) + list(zip([s for _, s in extra], wx)):
    k = np.asarray(k, np.float64)
    bh, bw = k.shape[:2]
    out[(kh - bh) // 2:(kh + bh) // 2, (kw - bw) // 2:(kw + bw) // 2] += k * s
  if gamma is not None:
    for c in range(cout):
      for i in range(cin):
        if source_channel(i, c, cin, cout, groups) == c:
          out[kh // 2, kw // 2, i, c] += gamma[c]
  return out


def conv(x, w, groups=1):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=groups, precision=jax.lax.Precision.HIGHEST)


def np_conv(x, w, groups=1):
  """Stride-1 SAME conv in float64 numpy, tap by tap (an independent reference for the branch outputs)."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  kh, kw, cin, cout = w.shape
  n, h, wd, _ = x.shape
  xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  per_group = cout // groups
  y = np.zeros((n, h, wd, cout))
  for g in range(groups):
    xs = xp[..., g * cin:(g + 1) * cin]
    for p in range(kh):
      for q in range(kw):
        outs = slice(g * per_group, (g + 1) * per_group)
        y[..., outs] += xs[:, p:p + h, q:q + wd] @ w[p, q, :, outs]
  return y


@st.composite
def blocks(draw):
  """A random block: kernel shape, scales (both signs), branch kernels, and an input batch."""
  kh, kw = draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([1, 3, 5]))
  cin = draw(st.integers(1, 6))
  square = draw(st.booleans())
  cout = cin if square else draw(st.integers(1, 6))
  identity = cin == cout and draw(st.booleans())
  has_pw = draw(st.booleans())
  extra_hw = draw(st.lists(st.tuples(st.sampled_from([b for b in (1, 3, 5) if b <= kh]),
                                     st.sampled_from([b for b in (1, 3, 5) if b <= kw])), max_size=2))
  rng = np.random.default_rng(draw(st.integers(0, 2**31)))
  vec = lambda: rng.uniform(-2, 2, cout)
  d = dict(shape=(kh, kw, cin, cout), conv=vec(), pointwise=vec() if has_pw else None, identity=identity,
           extra=tuple((hw, vec()) for hw in extra_hw))
  d["w"] = rng.normal(0, 1, d["shape"])
  d["w1"] = rng.normal(0, 1, (1, 1, cin, cout)) if has_pw else None
  d["wx"] = [rng.normal(0, 1, hw + (cin, cout)) for hw in extra_hw]
  d["gamma"] = rng.uniform(-1.5, 1.5, cout) if identity else None
  d["x"] = rng.normal(0, 1, (2, 7, 6, cin))
  return d


def scales_of(d):
  return CSLAScales(conv=d["conv"], pointwise=d["pointwise"], identity=d["identity"], extra=d["extra"])


@SETTINGS
@hypothesis.given(blocks(), st.sampled_from([1, 2]))
def test_grad_mult_matches_eq13_loop(d, power):
  s = scales_of(d)
  g = np.asarray(d["w"], np.float32)  # any array of the kernel's shape will do as a gradient
  # One jit per example: compiling the ops one by one for every new shape would dominate the run time.
  m, mg = jax.jit(lambda g: (grad_mult(s, g.shape, power=power), apply_grad_mult(s, g, power)))(g)
  assert m.shape == d["shape"] and m.dtype == jnp.float32
  ref = ref_grad_mult(d["shape"], d["conv"], d["pointwise"], d["identity"], d["extra"], power)
  np.testing.assert_allclose(np.asarray(m), ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(mg), g * ref, rtol=1e-5, atol=1e-6)


@SETTINGS
@hypothesis.given(blocks())
def test_csla_init_matches_reference_and_convolution(d):
  s = scales_of(d)
  f = lambda a: None if a is None else jnp.asarray(a, jnp.float32)
  # One jit per example (compiling op by op for each new shape would dominate the run time).
  compute = jax.jit(lambda w, w1, gamma, wx, x: (lambda wp: (wp, conv(x, wp)))(csla_init(s, w, w1, gamma, wx)))
  w, single = compute(f(d["w"]), f(d["w1"]), f(d["gamma"]), [f(k) for k in d["wx"]], f(d["x"]))
  assert w.shape == d["shape"] and w.dtype == jnp.float32
  ref = ref_csla_init(d["conv"], d["w"], d["pointwise"], d["w1"], d["gamma"], d["extra"], d["wx"])
  np.testing.assert_allclose(np.asarray(w), ref, rtol=1e-5, atol=1e-5)

  # The convolution identity: one conv with W' equals the sum of the scaled branches.
  x = np.asarray(f(d["x"]), np.float64)
  y = d["conv"] * np_conv(x, d["w"])
  if d["w1"] is not None:
    y += d["pointwise"] * np_conv(x, d["w1"])
  for (_, s_k), k in zip(d["extra"], d["wx"]):
    y += s_k * np_conv(x, k)
  if d["identity"]:
    y += d["gamma"] * x
  np.testing.assert_allclose(np.asarray(single), y, rtol=1e-5, atol=1e-5 * np.abs(y).max())


def test_identity_defaults_to_ones_and_identity_init_is_only_for_init():
  """`identity_scale=None` means gamma(0) = 1; `identity_init` never changes the Grad Mult."""
  rng = np.random.default_rng(0)
  w = rng.normal(0, 1, (3, 3, 4, 4))
  s = CSLAScales(conv=np.full(4, 0.5), identity=True)
  np.testing.assert_allclose(np.asarray(csla_init(s, w)), ref_csla_init(0.5, w, gamma=np.ones(4)), rtol=1e-6)
  trained = s.replace(identity_init=np.array([2.0, -1.0, 0.5, 3.0]))
  np.testing.assert_array_equal(np.asarray(grad_mult(trained, (3, 3, 4, 4))), np.asarray(grad_mult(s, (3, 3, 4, 4))))
  np.testing.assert_allclose(np.asarray(csla_init(trained, w, identity_scale=trained.identity_init)),
                             ref_csla_init(0.5, w, gamma=trained.identity_init), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Grouped and depthwise kernels; extra branches (generalisations beyond RepOpt-VGG).

GROUPED = [
    # (channels, groups, kernel, extra branch sizes)
    (4, 2, 3, ()),
    (6, 3, 3, ((1, 3), (3, 1))),
    (5, 5, 3, ()),                  # depthwise
    (4, 4, 5, ((3, 3),)),           # depthwise 5x5 with a 3x3 inside
    (4, 1, 5, ((3, 3), (1, 5))),    # dense 5x5 with 3x3 and 1x5 inside
]


@pytest.mark.parametrize("channels,groups,k,extra_hw", GROUPED)
def test_grouped_and_extra_branches(channels, groups, k, extra_hw):
  rng = np.random.default_rng(channels * 10 + groups)
  cin = channels // groups
  shape = (k, k, cin, channels)
  vec = lambda: rng.uniform(-1.5, 1.5, channels)
  conv_s, pw = vec(), vec()
  extra = tuple((hw, vec()) for hw in extra_hw)
  s = CSLAScales(conv=conv_s, pointwise=pw, identity=True, extra=extra)
  ref_m = ref_grad_mult(shape, conv_s, pw, True, extra, groups=groups)
  np.testing.assert_allclose(np.asarray(grad_mult(s, shape)), ref_m, rtol=1e-5)
  # The identity taps: exactly `channels` entries got the +1 (one per output channel, at the centre).
  no_id = ref_grad_mult(shape, conv_s, pw, False, extra, groups=groups)
  assert np.sum(np.isclose(ref_m - no_id, 1.0)) == channels

  w, w1 = rng.normal(0, 1, shape), rng.normal(0, 1, (1, 1, cin, channels))
  wx = [rng.normal(0, 1, hw + (cin, channels)) for hw in extra_hw]
  gamma = rng.uniform(0.5, 1.5, channels)
  f32 = lambda a: np.asarray(a, np.float32)
  x = rng.normal(0, 1, (2, 6, 5, channels))
  wp, single = jax.jit(lambda *a: (lambda wp: (wp, conv(jnp.asarray(f32(x)), wp, groups)))(csla_init(s, *a)))(
      f32(w), f32(w1), f32(gamma), [f32(a) for a in wx])
  np.testing.assert_allclose(np.asarray(wp), ref_csla_init(conv_s, w, pw, w1, gamma, extra, wx, groups),
                             rtol=1e-5, atol=1e-6)
  y = conv_s * np_conv(x, w, groups) + pw * np_conv(x, w1, groups) + gamma * x
  for (_, s_k), k_ in zip(extra, wx):
    y += s_k * np_conv(x, k_, groups)
  np.testing.assert_allclose(np.asarray(single), y, rtol=1e-5, atol=1e-5 * np.abs(y).max())


def test_grad_mult_dtype_and_float64():
  s = CSLAScales(conv=np.array([0.3, -0.7]), pointwise=np.array([1.1, 0.9]), identity=True)
  with x64():
    m = grad_mult(s, (3, 3, 2, 2), dtype=jnp.float64)
    assert m.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(m), ref_grad_mult((3, 3, 2, 2), s.conv, s.pointwise, True), rtol=1e-15)
    g = jnp.ones((3, 3, 2, 2), jnp.float64)
    assert apply_grad_mult(s, g).dtype == jnp.float64
  assert apply_grad_mult(s, jnp.ones((3, 3, 2, 2), jnp.bfloat16)).dtype == jnp.bfloat16
