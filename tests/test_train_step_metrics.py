"""The train step's finite check: one norm pass per tree, and still exact about inf and NaN anywhere."""

import jax.numpy as jnp
import numpy as np
import pytest

from repopt_jax.train.step import _all_finite


def _tree():
  return {"a": jnp.ones((3, 3, 4, 8)), "b": [jnp.arange(5.0), jnp.zeros((2, 1000))], "c": jnp.float32(2.0)}


def test_finite_tree():
  assert bool(_all_finite(_tree()))
  assert bool(_all_finite({}))  # no leaves


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["a", "b1", "c"])
def test_one_bad_element_anywhere_is_caught(bad, where):
  t = _tree()
  if where == "a":
    t["a"] = t["a"].at[2, 1, 3, 7].set(bad)
  elif where == "b1":
    t["b"][1] = t["b"][1].at[1, 999].set(bad)
  else:
    t["c"] = jnp.float32(bad)
  assert not bool(_all_finite(t))


def test_large_finite_values_are_finite():
  # A tree of norm ~3e18 (sum of squares 1e37, below float32's max 3.4e38): no false alarm for any
  # realistic parameters or gradients; only a norm above ~1.8e19 would count as not finite.
  assert bool(_all_finite({"w": jnp.full((1000,), 1e17, jnp.float32)}))
