"""The train state, and building the model and optimizer a config asks for.

`TrainState` is a plain pytree of arrays (params, BatchNorm statistics, optimizer state, step, RNG key); the
model's structure lives apart in its `nnx.GraphDef`, so the train step is a pure function of arrays.

A RepOptimizer run (`optim.name` repopt_sgd / repopt_adamw) trains the plain target model: its kernels are
initialised by the Rule of Initialization from the constant scales (`reparam.reinit_target`) and their
gradients multiplied by the Grad Mult (Rule of Iteration) inside the optimizer.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from repopt_jax import optim as repopt_optim
from repopt_jax.config import REPOPT_OPTIMIZERS, Config, ConfigError

__all__ = ["TrainState", "build_model", "build_optimizer", "make_schedule", "split_model", "init_state",
           "compute_dtype"]


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


def build_model(config: Config, scales: Optional[dict] = None, *, num_classes: Optional[int] = None,
                in_channels: Optional[int] = None, seed: Optional[int] = None):
  """The model a config describes, initialised (Rule of Initialization for a RepOptimizer run).

  A RepOpt-VGG size is a `RepOptVGG` in `model.mode`; any other `model.arch` (`models.available_archs()`,
  e.g. 'resnet18_cifar') is its plain NNX model, or its `csla.hyper_search_model` / `csla.csla_model`.

  Args:
    config: a `Config` (sections model, data, train).
    scales: `{block_name: CSLAScales}` (RepOpt-VGG) or `{kernel_path: CSLAScales}` (any other model);
      required for mode 'csla' and for a target model trained by a
      RepOptimizer (then the kernels are re-initialised from them, identity from the trained gamma unless
      `model.reinit_identity` is 'ones').
    num_classes: overrides `model.num_classes`; one of the two must be set (the trainer takes it from the
      dataset).
    in_channels: image channels (default 3).
    seed: initialisation seed (default `train.seed`).

  Returns:
    An `nnx.Module` in train mode with float32 params and `train.compute_dtype` activations.
  """
  from repopt_jax.models import RepOptVGG, build_generic, get_arch, is_vgg, reparam  # pylint: disable=g-import-not-at-top
  from repopt_jax.models.vgg import check_scales_for  # pylint: disable=g-import-not-at-top

  num_classes = num_classes or config.model.num_classes
  if not num_classes:
    raise ConfigError("'model.num_classes' is null and no dataset gave it: set model.num_classes")
  mode = config.model.mode
  if mode == "csla" and scales is None:
    raise ConfigError("'model.mode' = 'csla' needs the constant scales: set 'scales' to a scales file")
  seed = config.train.seed if seed is None else seed
  kwargs = dict(num_classes=int(num_classes), in_channels=int(in_channels or 3), dtype=compute_dtype(config),
                param_dtype=jnp.float32)
  if mode == "csla":
    kwargs["scales"] = scales
  if mode == "hs":
    kwargs["hs_init"] = config.model.hs_init
  reinit = scales is not None and mode == "target" and config.model.reinit
  vgg = is_vgg(config.model.arch)
  if scales is not None and mode in ("target", "csla") and vgg:
    check_scales_for(get_arch(config.model.arch), scales, int(in_channels or 3))  # ScalesError naming the block

  def create():
    if not vgg:  # any other architecture: the generic CSLA machinery (scales keyed by kernel paths)
      return build_generic(config.model.arch, mode, scales=scales if mode in ("target", "csla") else None,
                           hs_init=config.model.hs_init, reinit=reinit,
                           reinit_identity=config.model.reinit_identity, seed=seed,
                           **{k: kwargs[k] for k in ("num_classes", "in_channels", "dtype", "param_dtype")})
    model = RepOptVGG(config.model.arch, mode, rngs=nnx.Rngs(seed), **kwargs)
    if reinit:
      # Rule of Initialization: W'(0) = s*W3(0) + t*pad(W1(0)) + diag(gamma), fresh branch kernels.
      reparam.reinit_target(model, scales, nnx.Rngs(seed + 1), identity=config.model.reinit_identity)
    return model

  # One compiled program for all initialisers (eagerly, each op would compile on its own), built without
  # LLVM optimisation: it runs once, and XLA:CPU otherwise spends tens of seconds on the unrolled
  # threefry hashes of every initialiser. Integer hashing is exact either way.
  graphdef = nnx.graphdef(nnx.eval_shape(create))
  values = jax.jit(lambda: nnx.as_pure(nnx.state(create())),
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

  - `repopt_sgd` / `repopt_adamw`: gradient re-parameterization from `scales` (`reparam.scales_tree`);
    gradient clipping is refused (it breaks the equivalence with the multi-branch model).
  - `sgd`: coupled L2 decay (masked) then momentum/Nesterov, as RepOpt-SGD without the Grad Mult.
  - `adamw`: decoupled masked decay.
  Clipping (`optim.grad_clip`, global norm) comes first when set (Hyper-Search and plain optimizers).

  Args:
    config: a `Config`.
    model: the `nnx.Module` being trained (its params' structure and decay mask).
    scales: `{block_name: CSLAScales}`, required by the RepOptimizers.
    schedule: learning rate or schedule (default: the constant `optim.lr`).

  Returns:
    An `optax.GradientTransformation`.

  Raises:
    ConfigError: clipping with a RepOptimizer, a RepOptimizer without scales or on a non-target model.
  """
  from repopt_jax import csla  # pylint: disable=g-import-not-at-top
  from repopt_jax.models import RepOptVGG, reparam  # pylint: disable=g-import-not-at-top

  def tree(model, scales):  # official block names for RepOpt-VGG, kernel paths for any other model
    return reparam.scales_tree(model, scales) if isinstance(model, RepOptVGG) else csla.scales_tree(model, scales)

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


def load_run_scales(config: Config) -> Optional[dict]:
  """The scales file a config names (`scales`), read once and checked: `{block: CSLAScales}` or None.

  The one place a run's scales are read: the file must be a repopt_jax `.npz` or an official `.pth`, and
  no block may have all its branch scales zero (its kernel could never move, or only its identity
  diagonal could).

  Raises:
    ScalesError: no such file, a file of neither format, or a block whose scales are all zero (named).
  """
  import os  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from repopt_jax.scales import ScalesError, load_scales  # pylint: disable=g-import-not-at-top

  if not config.scales:
    return None
  path = os.path.abspath(os.path.expanduser(config.scales))
  if not os.path.isfile(path):
    raise ScalesError(f"scales file {config.scales} does not exist (config key 'scales')")
  scales, _ = load_scales(path)  # a file it cannot decode: "neither a repopt_jax .npz ... nor ... .pth"
  for name, s in scales.items():
    parts = [s.conv, s.pointwise] + [w for _, w in (s.extra or ())]
    if all(p is None or not np.any(np.asarray(p)) for p in parts):
      what = "only its identity diagonal can move" if s.identity else "its kernel can never move"
      raise ScalesError(f"{path}: block {name!r} has every branch scale zero (s and t are 0 for every "
                        f"channel): {what} under the Grad Mult; use scales from Hyper-Search")
  return scales


def scales_fingerprint(scales: Optional[dict]) -> Optional[str]:
  """A SHA-256 of the scales' values (block names and arrays): what a resumed run must share."""
  import hashlib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  if scales is None:
    return None
  h = hashlib.sha256()
  for name in sorted(scales):
    s = scales[name]
    h.update(name.encode())
    for part in (s.conv, s.pointwise, s.identity_init, *(w for _, w in (s.extra or ()))):
      h.update(b"-" if part is None else np.ascontiguousarray(np.asarray(part, np.float64)).tobytes())
    h.update(b"I" if s.identity else b"i")
  return h.hexdigest()
