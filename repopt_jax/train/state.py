"""The train state, and building the model and optimizer a config asks for.

`TrainState` is a plain pytree of arrays (params, BatchNorm statistics, optimizer state, step, RNG key); the
model's structure lives apart in its `nnx.GraphDef`, so the train step is a pure function of arrays.

A RepOptimizer run (`optim.name` repopt_sgd / repopt_adamw) trains the plain target model: its kernels are
initialised by the Rule of Initialization from the constant scales (`csla.reinit`) and their
gradients multiplied by the Grad Mult (Rule of Iteration) inside the optimizer.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from repopt_jax import csla
from repopt_jax import optim as repopt_optim
from repopt_jax.config import REPOPT_OPTIMIZERS, Config, ConfigError
from repopt_jax.models import blocks, registry
from repopt_jax.train.run_scales import RunScales

__all__ = ["TrainState", "build_model", "build_optimizer", "make_schedule", "split_model", "init_state",
           "compute_dtype", "steps_per_epoch", "total_steps"]


class TrainState(NamedTuple):
  """Everything that changes during training; a pytree of arrays (checkpointed as a whole)."""
  step: jax.Array          # int32 scalar: optimizer steps taken
  params: Any              # nnx.State of the model's nnx.Param variables
  batch_stats: Any         # nnx.State of its nnx.BatchStat variables (BatchNorm running statistics)
  opt_state: Any           # the optax state
  rng: jax.Array           # uint32[2] raw PRNG key, folded with the step inside the train step


def compute_dtype(config: Config):
  """The activation dtype of the model: float32 or bfloat16 (params are float32 either way)."""
  return jnp.bfloat16 if config.train.compute_dtype == "bfloat16" else jnp.float32


def build_model(config: Config, scales=None, *, num_classes: Optional[int] = None,
                in_channels: Optional[int] = None, seed: Optional[int] = None):
  """The model a config describes, initialised (Rule of Initialization for a RepOptimizer run).

  Any `model.arch` (`models.available_archs()`: the RepOpt-VGG sizes, 'resnet18_cifar', ...) in
  `model.mode`, built by `models.build` with the convolution formulation `model.conv_impl`. A target model
  with scales is re-initialised from them by the Rule of Initialization (`csla.reinit`, the same for every
  architecture): fresh branch kernels, identity from the trained gamma unless `model.reinit_identity` is
  'ones'.

  Args:
    config: a `Config` (sections model, data, train).
    scales: a `RunScales` (`read_run_scales`), or `{block_name: CSLAScales}` (RepOpt-VGG) /
      `{kernel_path: CSLAScales}` (any other model); required for mode 'csla' and for a target model trained
      by a RepOptimizer. Checked against the model unless the `RunScales` already was (`build_run`).
    num_classes: overrides `model.num_classes`; one of the two must be set (the trainer takes it from the
      dataset).
    in_channels: image channels (default 3).
    seed: initialisation seed (default `train.seed`).

  Returns:
    An `nnx.Module` in train mode with float32 params and `train.compute_dtype` activations.
  """
  num_classes = num_classes or config.model.num_classes
  if not num_classes:
    raise ConfigError("'model.num_classes' is null and no dataset gave it: set model.num_classes")
  mode = config.model.mode
  if mode == "csla" and scales is None:
    raise ConfigError("'model.mode' = 'csla' needs the constant scales: set 'scales' to a scales file")
  seed = config.train.seed if seed is None else seed
  in_channels = int(in_channels or 3)
  kwargs = dict(num_classes=int(num_classes), in_channels=in_channels, dtype=compute_dtype(config),
                param_dtype=jnp.float32, hs_init=config.model.hs_init, conv_impl=config.model.conv_impl, seed=seed)
  run_scales = None
  if scales is not None and mode in ("target", "csla"):  # checked once (build_run checks them before)
    run_scales = RunScales.of(scales, config.model.arch).for_dims(num_classes, in_channels)
  reinit = run_scales is not None and mode == "target" and config.model.reinit

  def create(reinit: bool):
    model = registry.build(config.model.arch, mode, scales=run_scales.scales if mode == "csla" else None,
                           **kwargs)
    if reinit:
      # Rule of Initialization: W'(0) = s*W_k(0) + t*pad(W_1(0)) + diag(gamma), fresh branch kernels drawn
      # as the models draw theirs.
      csla.reinit(model, run_scales.by_kernel, rngs=nnx.Rngs(seed + 1), kernel_init=blocks.conv_kernel_init,
                  identity=config.model.reinit_identity)
    return model

  # One compiled program for all initialisers (eagerly, each op would compile on its own), built without
  # LLVM optimisation: it runs once, and XLA:CPU otherwise spends tens of seconds on the unrolled
  # threefry hashes of every initialiser. Integer hashing is exact either way. The structure comes from an
  # abstract build without the Rule of Initialization, which changes values only.
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: create(False)))
  values = jax.jit(lambda: nnx.as_pure(nnx.state(create(reinit))),
                   compiler_options={"xla_backend_optimization_level": 0})()
  model = nnx.merge(graphdef, values)
  model.train()
  return model


def make_schedule(config: Config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """Per-step learning rate: linear warm-up from 0 over `optim.warmup_epochs`, then cosine to 0 (or flat).

  .. math::
    \\eta_t = \\eta\\,t/w \\;(t < w), \\qquad \\eta_t = \\tfrac{\\eta}{2}\\big(1 + \\cos(\\pi (t-w)/(T-w))\\big)

  Example:
    >>> from repopt_jax.config import load_config
    >>> s = make_schedule(load_config('digits_tiny', ['optim.warmup_epochs=1']), 10, 100)
    >>> [round(float(s(t)), 4) for t in (0, 5, 10, 55, 100)]
    [0.0, 0.05, 0.1, 0.05, 0.0]
  """
  lr = float(config.optim.lr)
  warmup = int(round(float(config.optim.warmup_epochs) * steps_per_epoch))
  warmup = min(warmup, max(total_steps - 1, 0))
  if config.optim.schedule == "constant":
    if warmup == 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), end_value=0.0)


def split_model(model):
  """`(graphdef, params, batch_stats, rest)` of an NNX model: the functional pieces the step works on.

  params and batch_stats are pure `nnx.State`s (arrays, no `Variable` objects), so that `nnx.merge` inside a
  traced function builds fresh Variables at that trace level.
  """
  graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  return graphdef, nnx.as_pure(params), nnx.as_pure(batch_stats), rest


def build_optimizer(config: Config, model, scales: Optional[dict] = None, *,
                    schedule: Optional[optax.ScalarOrSchedule] = None) -> optax.GradientTransformation:
  """The optax optimizer a config names, with the paper's weight-decay mask.

  - `repopt_sgd` / `repopt_adamw`: gradient re-parameterization from `scales` (`RunScales.tree`);
    gradient clipping is refused (it breaks the equivalence with the multi-branch model).
  - `sgd`: coupled L2 decay (masked) then momentum/Nesterov, as RepOpt-SGD without the Grad Mult.
  - `adamw`: decoupled masked decay.
  Clipping (`optim.grad_clip`, global norm) comes first when set (Hyper-Search and plain optimizers).

  Args:
    config: a `Config`.
    model: the `nnx.Module` being trained (its params' structure and decay mask).
    scales: a `RunScales` (its tree is used as it is when it was checked for this model, as `build_run`
      does), or the dict `build_model` takes; required by the RepOptimizers.
    schedule: learning rate or schedule (default: the constant `optim.lr`).

  Returns:
    An `optax.GradientTransformation`.

  Raises:
    ConfigError: clipping with a RepOptimizer, a RepOptimizer without scales or on a non-target model.
  """
  def tree(model, scales):  # the tree build_run checked, unless these scales were never checked for it
    return RunScales.of(scales, config.model.arch).checked(model).tree

  o = config.optim
  lr = float(o.lr) if schedule is None else schedule
  if o.name in REPOPT_OPTIMIZERS:
    if o.grad_clip is not None:
      raise ConfigError(f"'optim.grad_clip' = {o.grad_clip} cannot be used with the RepOptimizer {o.name!r}: "
                        "clipping breaks the gradient re-parameterization; set optim.grad_clip=null")
    if scales is None:
      raise ConfigError(f"'optim.name' = {o.name!r} needs the constant scales: set 'scales' to a scales file")
    if config.model.mode != "target":
      raise ConfigError(f"'optim.name' = {o.name!r} trains the target model; got model.mode={config.model.mode!r}")
  mask = csla.weight_decay_mask(model)  # one rule for every model (kernels and identity weights decay)
  wd = float(o.weight_decay)
  if o.name == "repopt_sgd":
    tx = repopt_optim.repopt_sgd(lr, tree(model, scales), momentum=o.momentum,
                                 nesterov=o.nesterov, weight_decay=wd, weight_decay_mask=mask)
  elif o.name == "repopt_adamw":
    tx = repopt_optim.repopt_adamw(lr, tree(model, scales), b1=o.b1, b2=o.b2, eps=o.eps,
                                   weight_decay=wd, weight_decay_mask=mask, exact=o.exact)
  elif o.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(wd, mask) if wd else optax.identity(),
                     optax.sgd(lr, momentum=o.momentum or None, nesterov=o.nesterov))
  elif o.name == "adamw":
    tx = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=wd, mask=mask)
  else:  # validate_config already refuses it; kept for configs built by hand.
    raise ConfigError(f"'optim.name' = {o.name!r} is not one of repopt_sgd, repopt_adamw, sgd, adamw")
  if o.grad_clip is not None:
    tx = optax.chain(optax.clip_by_global_norm(float(o.grad_clip)), tx)
  return tx


def init_state(model, tx: optax.GradientTransformation, seed: int) -> tuple[Any, TrainState]:
  """`(graphdef, TrainState)` at step 0 for a model and optimizer."""
  graphdef, params, batch_stats, rest = split_model(model)
  del rest
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     opt_state=jax.jit(tx.init)(params), rng=jax.random.key_data(jax.random.key(seed)))
  return graphdef, state


def steps_per_epoch(train_size: int, batch_size: int) -> int:
  """Full global batches per epoch (the remainder is dropped, as the data pipeline does)."""
  return max(train_size // batch_size, 1)


def total_steps(config: Config, per_epoch: int) -> int:
  """`train.steps`, or `train.epochs` x steps per epoch (fractional epochs round up)."""
  if config.train.steps is not None:
    return int(config.train.steps)
  return int(math.ceil(float(config.train.epochs) * per_epoch))
