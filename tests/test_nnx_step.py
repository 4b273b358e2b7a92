"""repopt_jax.nnx_train_step: the README's train step equals `nnx.Optimizer` + `nnx.value_and_grad` step for
step, carries BatchNorm statistics and RNG counters, compiles once, and leaves the model's arrays alone."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from repopt_jax import CSLAScales, NNXTrainState, nnx_train_step, repopt_masks


class Net(nnx.Module):

  def __init__(self, rngs, dropout=0.0):
    self.conv = nnx.Conv(4, 4, (3, 3), use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.drop(nnx.relu(self.bn(self.conv(x)))).mean(axis=(1, 2)))


def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _tx():
  s = CSLAScales(conv=np.full(4, 0.8), pointwise=np.full(4, 0.5), identity=True)
  tree = {"conv": {"kernel": s}, "bn": {"scale": None, "bias": None}, "head": {"kernel": None, "bias": None}}
  return optax.chain(repopt_masks(tree), optax.sgd(0.1, momentum=0.9, nesterov=True))


def _batch():
  x = jax.random.normal(jax.random.key(1), (6, 5, 5, 4))
  return x, jnp.arange(6) % 3


def test_equals_the_nnx_optimizer_step_and_compiles_once():
  x, y = _batch()
  ref = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(ref, _tx(), wrt=nnx.Param)
  model = Net(nnx.Rngs(0))
  step, state = nnx_train_step(model, _tx(), _loss)
  assert isinstance(state, NNXTrainState)

  @nnx.jit
  def ref_step(ref, optimizer, x, y):  # the README's step before issue 18
    loss, grads = nnx.value_and_grad(_loss)(ref, x, y)
    optimizer.update(ref, grads)
    return loss

  for _ in range(3):
    loss_ref = ref_step(ref, optimizer, x, y)
    state, loss = step(state, x, y)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  assert step._cache_size() == 1  # the new state has the structure of the old one: no retrace
  trained = nnx.merge(nnx.graphdef(model), state.params, state.rest)
  got, want = (nnx.state(m, nnx.Param, nnx.BatchStat) for m in (trained, ref))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), nnx.as_pure(got),
               nnx.as_pure(want))
  # The BatchNorm statistics moved, and the model's own arrays are intact (the step donated copies).
  assert not np.allclose(state.rest["bn"]["mean"], 0.0)
  np.testing.assert_array_equal(model.bn.mean[...], 0.0)
  nnx.update(model, state.params, state.rest)
  np.testing.assert_allclose(model.bn.mean[...], ref.bn.mean[...], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(model.conv.kernel[...], ref.conv.kernel[...], rtol=1e-5, atol=1e-6)


def test_wrt_has_aux_and_rng_counters():
  x, y = _batch()
  model = Net(nnx.Rngs(0, dropout=1), dropout=0.5)
  head_only = nnx.All(nnx.Param, nnx.PathContains("head"))

  def loss_with_logits(m, x, y):
    logits = m(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

  step, state = nnx_train_step(model, optax.sgd(0.5), loss_with_logits, wrt=head_only, has_aux=True)
  assert set(state.params) == {"head"}
  kernel0 = np.asarray(state.rest["conv"]["kernel"])
  count0 = int(state.rest["drop"]["rngs"]["count"])
  new, (loss, logits) = step(state, x, y)
  assert logits.shape == (6, 3) and np.isfinite(loss)
  np.testing.assert_array_equal(new.rest["conv"]["kernel"], kernel0)  # not in `wrt`: not trained
  assert not np.allclose(new.params["head"]["kernel"], model.head.kernel[...])
  assert int(new.rest["drop"]["rngs"]["count"]) == count0 + 1  # a fresh dropout mask per step


def test_without_donation_the_old_state_stays_usable():
  x, y = _batch()
  step, state = nnx_train_step(Net(nnx.Rngs(0)), optax.sgd(0.1), _loss, donate=False)
  new, _ = step(state, x, y)
  again, _ = step(state, x, y)  # the same old state, still alive
  jax.tree.map(np.testing.assert_array_equal, new.params, again.params)
  with pytest.raises((RuntimeError, ValueError), match="deleted or donated"):
    donating, state2 = nnx_train_step(Net(nnx.Rngs(0)), optax.sgd(0.1), _loss)
    donating(state2, x, y)
    donating(state2, x, y)
