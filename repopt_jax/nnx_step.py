"""A compiled train step for any NNX model and any Optax transform: one `jax.jit` over the model's state.

`@nnx.jit` with `nnx.Optimizer` walks the model's and the optimizer's object graphs in Python on every call
(split them into state, call the compiled function, merge the results back), which on a small CNN on a CPU
costs most of the step's own time again (cifar_tiny, batch 32, 2 cores: 1.6 to 1.8 times as long per step;
experiments/results/bench_vs_torch.md). `nnx_train_step` splits
the model once, into its graph definition and pure arrays, and compiles a function of arrays only:

.. math::
  (\\theta, \\rho, s), b \\;\\mapsto\\; (\\theta + u, \\rho', s'), \\ell
  \\quad\\text{with}\\quad (u, s') = \\mathrm{tx.update}(\\nabla_\\theta \\ell, s, \\theta),
  \\quad (\\ell, \\rho') = \\mathrm{loss\\_fn}(\\mathrm{merge}(\\theta, \\rho), b)

where `theta` are the `wrt` variables (default `nnx.Param`), `rho` every other variable (BatchNorm
statistics, RNG counters: what the forward pass updates, carried from step to step), `s` the optimizer
state. The state is donated, so XLA updates it in place. The merge happens at trace time only.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Tuple

import jax
import optax
from flax import nnx

__all__ = ["NNXTrainState", "nnx_train_step"]


class NNXTrainState(NamedTuple):
  """What a step changes, as pure arrays (`nnx.State`s without `Variable` objects, and the optax state)."""
  params: Any     # the `wrt` variables (what the optimizer trains)
  rest: Any       # every other variable of the model (BatchNorm statistics, RNG counters, ...)
  opt_state: Any  # `tx.init(params)`


def nnx_train_step(model: nnx.Module, tx: optax.GradientTransformation, loss_fn: Callable[..., Any], *,
                   wrt: Any = nnx.Param, has_aux: bool = False,
                   donate: bool = True) -> Tuple[Callable[..., Tuple[NNXTrainState, Any]], NNXTrainState]:
  """A jitted `step(state, *batch) -> (state, loss)` for `model` trained by `tx`, and its first state.

  The model is split once (`nnx.split(model, wrt, ...)`); each step rebuilds it from the state inside the
  compiled function, calls `loss_fn(model, *batch)` and applies `tx` to the gradient with respect to the
  `wrt` variables. The model keeps its own arrays (the first state is a copy, since the step donates its
  state): write the trained values back with `nnx.update(model, state.params, state.rest)`. The model is
  run in the mode it is in when passed (call `model.train()` first for BatchNorm's batch statistics).

  Args:
    model: an NNX module.
    tx: any Optax transform, e.g. `optax.chain(repopt_masks(scales_tree), optax.sgd(...))`.
    loss_fn: `loss_fn(model, *batch) -> loss`, a scalar (`-> (loss, aux)` with `has_aux`).
    wrt: the filter of the trained variables (as in `nnx.Optimizer`).
    has_aux: `loss_fn` returns `(loss, aux)`; the step then returns `(state, (loss, aux))`.
    donate: donate the state to the step (XLA reuses its buffers in place: one copy of the params and the
      optimizer state in memory instead of two); a donated state must not be used again. On XLA's CPU
      backend donation costs time: XLA copies each donated conv kernel before updating it in place (its
      other readers, such as the transposed kernel of the input gradient, are not ordered before the
      update), and a RepOpt-VGG step without it was 4% (cifar_tiny, batch 32) to 11% (B1 at 64 px, batch
      8) faster on 2 cores. `donate=False` is the faster choice there when memory is not tight.

  Returns:
    `(step, state)`: `step(state, *batch) -> (new_state, loss_fn's output)`, compiled once per batch
    shape; `state`, an `NNXTrainState`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> mse = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
    >>> step, state = nnx_train_step(model, optax.sgd(0.1), mse)
    >>> x, y = jnp.ones((4, 2)), jnp.full((4, 1), 3.0)
    >>> losses = []
    >>> for _ in range(50):
    ...   state, loss = step(state, x, y)
    ...   losses.append(float(loss))
    >>> losses[-1] < 1e-3 < losses[0]
    True
    >>> nnx.update(model, state.params, state.rest)
    >>> round(float(model(x)[0, 0]), 2)
    3.0
  """
  graphdef, params, rest = nnx.split(model, wrt, ...)
  # Fresh buffers: the step donates its state, and the model's own arrays must stay valid.
  params, rest = jax.tree.map(lambda a: jax.device_put(a, may_alias=False), nnx.as_pure((params, rest)))
  state = NNXTrainState(params, rest, jax.jit(tx.init)(params))
  not_wrt = nnx.Not(wrt)

  def step(state: NNXTrainState, *batch):
    def loss_of(params):
      # Pure arrays in, fresh Variables at this trace level: the forward pass may update them (BatchNorm).
      m = nnx.merge(graphdef, params, state.rest)
      out = loss_fn(m, *batch)
      return (out[0] if has_aux else out), (out, nnx.as_pure(nnx.state(m, not_wrt)))

    (_, (out, rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return NNXTrainState(optax.apply_updates(state.params, updates), rest, opt_state), out

  return jax.jit(step, donate_argnums=(0,) if donate else ()), state
