"""Linen: `CSLAConv` as a drop-in for `nn.Conv` (Hyper-Search and CSLA modes), `scales_of` on its params,
`scales_tree` / `weight_decay_mask` / `csla_init_params` on a Linen params dict, and the training equivalence
(float64): the CSLA model trained with SGD equals its merged params trained with `repopt_sgd`."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from conftest import x64
from repopt_jax import CSLAScales, csla, repopt_sgd
from repopt_jax import linen as rl


class Net(nn.Module):
  conv: type = nn.Conv
  blocks: tuple = ()  # per conv: the CSLAConv keyword arguments (ignored by nn.Conv)

  @nn.compact
  def __call__(self, x):
    kw = lambda i: dict(self.blocks[i]) if self.blocks else {}
    x = nn.relu(self.conv(8, (3, 3), strides=2, padding="SAME", name="stem", **kw(0))(x))  # (0, 1) padding
    x = nn.relu(self.conv(8, (3, 3), padding=1, feature_group_count=2, name="body", **kw(1))(x))
    return nn.Dense(10, name="head")(x.mean((1, 2)))


def test_hs_scales_of_and_trees():
  x = jnp.ones((2, 8, 8, 3))
  hs = Net(conv=functools.partial(rl.CSLAConv, mode="hs"), blocks=({"init_scale": 1.0}, {"init_scale": 2.0}))
  params = hs.init(jax.random.key(0), x)["params"]
  assert set(params["body"]) == {"conv", "conv_1x1", "scale_conv", "scale_1x1", "scale_identity"}
  scales = csla.scales_of(params)
  assert list(scales) == ["stem/kernel", "body/kernel"] and scales["body/kernel"].identity
  assert not scales["stem/kernel"].identity and float(scales["body/kernel"].conv[0]) == 2.0
  plain = Net().init(jax.random.key(1), x)["params"]
  tree = csla.scales_tree(plain, scales)
  assert tree["body"]["kernel"] is scales["body/kernel"] and tree["stem"]["bias"] is scales["stem/kernel"]
  assert tree["head"]["kernel"] is None
  mask = csla.weight_decay_mask(params)
  assert mask["body"]["scale_identity"] and mask["body"]["conv"]["kernel"] and not mask["body"]["scale_conv"]
  new = rl.csla_init_params(plain, scales, jax.random.key(2), kernel_init=nn.initializers.zeros_init())
  expect = np.zeros((3, 3, 4, 8))
  expect[1, 1, np.arange(8) % 4, np.arange(8)] = 1.0  # zero branches: diag(gamma) per group
  np.testing.assert_array_equal(new["body"]["kernel"], expect)
  assert not np.all(np.asarray(plain["body"]["kernel"]) == expect)  # the argument was not modified


def test_linen_csla_sgd_equals_merged_repopt_sgd():
  with x64():
    rng = np.random.default_rng(0)
    scales = {"stem/kernel": CSLAScales(conv=rng.uniform(0.5, 1.5, 8), pointwise=rng.uniform(-1, 1, 8)),
              "body/kernel": CSLAScales(conv=rng.uniform(0.5, 1.5, 8), pointwise=rng.uniform(-1, 1, 8),
                                        identity=True, identity_init=rng.uniform(0.5, 1.5, 8))}
    blocks = tuple({"mode": "csla", "scales": scales[k], "param_dtype": jnp.float64}
                   for k in ("stem/kernel", "body/kernel"))
    cs = Net(conv=rl.CSLAConv, blocks=blocks)
    plain = Net()
    data = [(jnp.asarray(rng.normal(size=(8, 8, 8, 3))), jnp.asarray(rng.integers(0, 10, 8))) for _ in range(20)]
    p_c = jax.tree.map(lambda a: a.astype(jnp.float64), cs.init(jax.random.key(0), data[0][0])["params"])
    p_c["stem"]["conv"]["bias"] = jnp.linspace(-1.0, 1.0, 8)  # non-zero branch biases
    p_t = rl.merge_params(p_c, scales)
    wd = 5e-3

    def run(model, params, tx):
      state, logits = tx.init(params), []

      @jax.jit
      def step(params, state, x, y):
        def loss(p):
          out = model.apply({"params": p}, x)
          return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), out
        (_, out), g = jax.value_and_grad(loss, has_aux=True)(params)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state, out

      for x, y in data:
        params, state, out = step(params, state, x, y)
        logits.append(out)
      return params, logits

    sgd = optax.chain(optax.add_decayed_weights(wd), optax.sgd(0.05, momentum=0.9, nesterov=True))
    p_c, l_c = run(cs, p_c, sgd)
    p_t, l_t = run(plain, p_t, repopt_sgd(0.05, csla.scales_tree(p_t, scales), weight_decay=wd))
    assert float(jnp.abs(l_c[-1] - l_c[0]).max()) > 0.05
    err = max(float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in zip(l_t, l_c))
    merged = rl.merge_params(p_c, scales)
    perr = max(float(jnp.abs(a - b).max() / jnp.abs(b).max())
               for a, b in zip(jax.tree.leaves(p_t), jax.tree.leaves(merged)))
    print(f"\n[csla equivalence linen float64] logits={err:.2e} params={perr:.2e}")
    assert err < 1e-10 and perr < 1e-10
