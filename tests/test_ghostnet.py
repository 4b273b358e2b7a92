"""RepOpt-GhostNet: parameter counts equal to the official PyTorch model's, the official scale file read onto
our kernel paths (depthwise CSLA blocks: `s^2` everywhere + 1 on the centre tap), the official Hyper-Search
model through the generic surgery, and the full-network training equivalence in float64."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import official_scales_file, x64
from repopt_jax import CSLAScales, csla, grad_mult, repopt_sgd
from repopt_jax.models import count_params, ghostnet
from test_csla_equivalence import train
from test_models_helpers import rel_err

OFFICIAL_FILE = "RepOptGhostNet_0_5x_scales.pth"


def official_param_count(width: float, num_classes: int = 1000) -> int:
  """`sum(p.numel() for p in repoptghostnet(width=w, mode='target').parameters())`, transcribed layer by layer
  from the official `repoptghostnet_model.py` with PyTorch's parameter rules (conv `O*I/g*k*k` [+ O bias],
  BatchNorm `2C`, Linear `I*O + O`), independently of our model code."""
  md = ghostnet.make_divisible
  conv = lambda i, o, k, g=1, b=False: o * (i // g) * k * k + (o if b else 0)
  bn = lambda c: 2 * c
  ghost = lambda i, o: conv(i, o, 1) + bn(o) + conv(o, o, 3, o) + bn(o)  # primary, cheap (dw 3x3), final_bn
  c = md(16 * width, 4)
  n = conv(3, c, 3) + bn(c)
  for cfg in ghostnet.CFGS:
    for k, e, o, se, s in cfg:
      out, mid = md(o * width, 4), md(e * width, 4)
      n += ghost(c, mid) + ghost(mid, out)
      if s > 1:
        n += conv(mid, mid, k, mid) + bn(mid)
      if se:
        r = md(mid * se, 4)
        n += conv(mid, r, 1, b=True) + conv(r, mid, 1, b=True)
      if not (c == out and s == 1):
        n += conv(c, c, k, c) + bn(c) + conv(c, out, 1) + bn(out)
      c = out
  last = md(e * width * 2, 4)
  return n + conv(c, last, 1) + bn(last) + conv(last, 1280, 1, b=True) + 1280 * num_classes + num_classes


@pytest.mark.parametrize("name", list(ghostnet.WIDTHS))
def test_param_counts_equal_the_official_model(name):
  model = nnx.eval_shape(lambda: ghostnet.RepOptGhostNet(name, rngs=nnx.Rngs(0)))
  assert count_params(model) == official_param_count(ghostnet.WIDTHS[name])
  if name == "0_5x":
    assert count_params(model) == 2_309_008  # the RepGhostNet paper: 2.3M


def test_official_scales_file_on_our_paths(capsys):
  scales = ghostnet.load_official_scales(official_scales_file(OFFICIAL_FILE))
  assert len(scales) == 32 and list(scales)[0] == "blocks/0/0/ghost1/cheap_conv/kernel"
  model = nnx.eval_shape(lambda: ghostnet.RepOptGhostNet(0.5, rngs=nnx.Rngs(0)))
  tree = csla.scales_tree(model, scales)  # every module's channel count matches
  assert tree["blocks"][6][2]["ghost1"]["cheap_conv"]["kernel"] is scales["blocks/6/2/ghost1/cheap_conv/kernel"]
  assert tree["blocks"][6][2]["ghost1"]["primary_conv"]["kernel"] is None
  s = scales["blocks/6/2/ghost1/cheap_conv/kernel"]
  m = np.asarray(grad_mult(s, (3, 3, 1, 60)))
  np.testing.assert_allclose(m[0, 0, 0], np.asarray(s.conv) ** 2, rtol=1e-6)  # s^2 everywhere
  np.testing.assert_allclose(m[1, 1, 0], np.asarray(s.conv) ** 2 + 1, rtol=1e-6)  # + 1: the identity
  with capsys.disabled():
    print("\n[RepOpt-GhostNet 0.5x official scales] block: mean s^2 (off-centre Grad Mult), mean gamma")
    for k, v in scales.items():
      print(f"  {k[:-len('/cheap_conv/kernel')]}: {np.mean(np.square(v.conv)):.3f}, {np.mean(v.identity_init):.3f}")


def test_hyper_search_model_is_the_official_one():
  model = ghostnet.RepOptGhostNet(0.5, num_classes=10, rngs=nnx.Rngs(0))
  hs = ghostnet.hyper_search(model, rngs=nnx.Rngs(1))
  scales = csla.scales_of(hs)
  assert len(scales) == 32 and all(s.pointwise is None and s.identity for s in scales.values())
  # s starts at sqrt(2 / (num_stage_modules + 1)), num_stage_modules = 2b - 1 (ghost1), 2b (ghost2) with b the
  # official num_stage_blocks: it counts on across the official config's lists while the stride is 1 and the
  # width stays (stage 6's third block: b = 4, after stage 5's stride-2 block with b = 1).
  assert math.isclose(float(scales["blocks/0/0/ghost1/cheap_conv/kernel"].conv[0]), 1.0, rel_tol=1e-6)
  assert math.isclose(float(scales["blocks/6/2/ghost1/cheap_conv/kernel"].conv[0]), math.sqrt(2 / 8), rel_tol=1e-6)
  assert math.isclose(float(scales["blocks/6/2/ghost2/cheap_conv/kernel"].conv[0]), math.sqrt(2 / 9), rel_tol=1e-6)
  # Cross-check with the official file: its last stage still holds (to 1%) the initial values of its
  # Hyper-Search, s^2 = 2/4, 2/5, ..., gamma = 1, which are exactly what our init gives.
  try:
    official = ghostnet.load_official_scales(official_scales_file(OFFICIAL_FILE))
  except pytest.skip.Exception:
    return
  for k in [k for k in scales if k.startswith("blocks/8/")]:
    np.testing.assert_allclose(np.mean(np.square(official[k].conv)), float(scales[k].conv[0]) ** 2, rtol=1e-2)


def test_ghostnet_csla_sgd_equals_merged_repopt_sgd(capsys):
  """Float64, 32x32 inputs, 4 steps. Only 4: at this size GhostNet's trajectory amplifies any difference about
  100x per step (measured: logits 5e-14, 1e-11, 5e-9, 6e-7, 4e-5 ... at lr 0.005 with 32x32 inputs, 1e-13 ...
  3e-6 over 13 steps with 64x64, then O(1)): the final stages see 1x1 or 2x2 maps, whose BatchNorms normalise
  over a handful of values, and several BN biases feed straight into another BN, so their gradients are pure
  rounding noise. The equivalence itself is exact, as the first steps show; the ResNet and the custom model
  check 20 steps (test_csla_equivalence.py)."""
  with x64():
    model = ghostnet.RepOptGhostNet(0.5, num_classes=10, dtype=jnp.float64, param_dtype=jnp.float64,
                                    rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    scales = {ghostnet.kernel_path(n): CSLAScales(conv=rng.uniform(0.5, 1.5, m.cheap_conv.out_features), identity=True,
                                                  identity_init=rng.uniform(0.5, 1.5, m.cheap_conv.out_features))
              for n, m in model.ghost_modules().items()}
    cs = csla.csla_model(model, scales, rngs=nnx.Rngs(1))
    target = csla.merge(cs)
    data = [(jnp.asarray(rng.normal(size=(8, 32, 32, 3))), jnp.asarray(rng.integers(0, 10, 8))) for _ in range(4)]
    wd, lr = 5e-3, 0.005
    l_c = train(cs, optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=0.9, nesterov=True)), data)
    l_t = train(target, repopt_sgd(lr, csla.scales_tree(target, scales), weight_decay=wd), data)
    err = max(rel_err(a, b) for a, b in zip(l_t, l_c))
    # Parameters: error relative to the largest parameter (per-leaf relative errors of the BN biases whose
    # gradients are rounding noise, ~1e-17, mean nothing).
    pm = jax.tree.leaves(nnx.as_pure(nnx.state(csla.merge(cs), nnx.Param)))
    pt = jax.tree.leaves(nnx.as_pure(nnx.state(target, nnx.Param)))
    scale = max(float(np.max(np.abs(b))) for b in pm)
    perr = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(pt, pm)) / scale
    with capsys.disabled():
      print(f"\n[csla equivalence repopt_ghostnet_0_5x float64, 4 steps] train_logits={err:.2e}, params={perr:.2e}")
    assert err <= 1e-5 and perr <= 1e-6
