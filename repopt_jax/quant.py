"""Simple symmetric INT8 post-training quantization (PTQ) of NNX models, evaluated by fake quantization.

The recipe of the paper's quantization experiment (Sec. 5.3): no quantization-aware training, no
fine-tuning, the same simple scheme for every model.

* Weights of every `nnx.Conv` and `nnx.Linear`: symmetric, `scale = max|w| / 127`, per tensor or per output
  channel (the last axis of Flax's HWIO / (in, out) kernels), round to nearest, clip to [-127, 127].
* Activations, i.e. the input of every such layer: one symmetric per-tensor scale `max|x| / 127`, the
  maximum over a few calibration batches (`calibrate`).
* Evaluation by fake quantization: each quantized tensor is dequantized (`q * scale`) and the network runs
  in floating point, which gives the accuracy of an integer kernel with float32 accumulation and a float
  bias (BatchNorm of a deployed model folds into that bias).

Apply it to a *deployed* model: a fused RepVGG (`reparam.fuse_repvgg`) or a RepOpt-VGG target model, with
BatchNorm folded into the kernels first (`reparam.fold_batchnorm`), since a deployed conv carries its BN.

Qwix (Google's JAX quantization library) was considered: its convolution weights are always quantized per
output channel (no per-tensor mode), and its static activation ranges are running averages of per-batch
ranges, not the calibration maximum; the scheme here is small enough to write out and check by hand.

Example:
  >>> import jax.numpy as jnp
  >>> w = jnp.array([[0.5, -1.0], [0.25, 0.1]])
  >>> s = absmax_scale(w)                  # per tensor: 1.0 / 127
  >>> quantize(w, s).tolist()
  [[64, -127], [32, 13]]
"""

from __future__ import annotations

import functools
from typing import Iterable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["QuantError", "ActRange", "QuantizedInput", "absmax_scale", "quantize", "dequantize", "fake_quant",
           "quantizable_layers", "calibrate", "quantize_model", "layer_name"]

QUANTIZABLE = (nnx.Conv, nnx.Linear)


class QuantError(ValueError):
  """A quantization request that cannot be carried out; the message names the layer or argument."""


class ActRange(nnx.Variable):
  """The calibrated maximum `|x|` of a layer's input (a scalar); not a parameter, not a BatchNorm statistic."""


def _qmax(num_bits: int) -> int:
  if not isinstance(num_bits, (int, np.integer)) or not 2 <= num_bits <= 16:
    raise QuantError(f"num_bits must be an integer in [2, 16], got {num_bits!r}")
  return 2 ** (int(num_bits) - 1) - 1


def absmax_scale(x: jax.Array, per_channel: bool = False, num_bits: int = 8) -> jax.Array:
  """The symmetric quantization scale `max|x| / (2^(b-1) - 1)`, per tensor or per channel (last axis).

  A channel (or tensor) that is all zeros gets scale 1, so it quantizes to zeros without dividing by 0.

  Args:
    x: the tensor (a kernel: HWIO conv or (in, out) dense; the channel axis is the last one).
    per_channel: one scale per entry of the last axis (shape `(x.shape[-1],)`) instead of one scalar.
    num_bits: integer width (8: the range is [-127, 127]).

  Returns:
    The scale, float32: a scalar, or `(C,)` for `per_channel`.

  Example:
    >>> absmax_scale(jnp.array([[1.27, -0.5], [0.3, 2.54]]), per_channel=True).tolist()
    [0.009999999776482582, 0.019999999552965164]
  """
  q = _qmax(num_bits)
  x = jnp.asarray(x, jnp.float32)
  if per_channel:
    if x.ndim < 1:
      raise QuantError("per_channel quantization needs a tensor with a channel axis, got a scalar")
    amax = jnp.max(jnp.abs(x), axis=tuple(range(x.ndim - 1)))
  else:
    amax = jnp.max(jnp.abs(x))
  return jnp.where(amax > 0, amax / q, 1.0).astype(jnp.float32)


def quantize(x: jax.Array, scale: jax.Array, num_bits: int = 8) -> jax.Array:
  """Integers `clip(round(x / scale), -(2^(b-1)-1), 2^(b-1)-1)` (round half to even), int8 for 8 bits.

  `scale` broadcasts against `x` (a scalar, or `(C,)` on the last axis).
  """
  q = _qmax(num_bits)
  out = jnp.clip(jnp.round(jnp.asarray(x, jnp.float32) / scale), -q, q)
  return out.astype(jnp.int8 if num_bits <= 8 else jnp.int16)


def dequantize(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
  """`q * scale` in `dtype`."""
  return (q.astype(jnp.float32) * scale).astype(dtype)


def fake_quant(x: jax.Array, scale: jax.Array, num_bits: int = 8) -> jax.Array:
  """`dequantize(quantize(x, scale), scale)` in `x`'s dtype: the value an INT8 kernel would see.

  .. math::
    \\tilde x = s\\,\\mathrm{clip}(\\mathrm{round}(x/s), -127, 127)

  Example:
    >>> fake_quant(jnp.array([0.5, -1.0, 3.0]), jnp.float32(1.0 / 127)).tolist()  # 3.0 clips to 1.0
    [0.5039370059967041, -1.0, 1.0]
  """
  return dequantize(quantize(x, scale, num_bits), scale, jnp.asarray(x).dtype)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _fake_quant_kernel(w, per_channel: bool, num_bits: int):
  # One compiled program per kernel shape instead of a dozen eager ops per layer.
  return fake_quant(w, absmax_scale(w, per_channel, num_bits), num_bits)


class QuantizedInput(nnx.Module):
  """Wraps a conv/linear layer; its input is observed (`'observe'`) or fake-quantized (`'quantize'`).

  Attributes:
    layer: the wrapped `nnx.Conv` / `nnx.Linear`.
    amax: `ActRange`, the running maximum of `|input|` while observing; the calibrated range afterwards.
    mode: 'observe' (record `max|x|`, pass `x` through) or 'quantize' (fake-quantize `x` with
      `amax / (2^(b-1) - 1)`).
    num_bits: integer width of the activations.
  """

  def __init__(self, layer: nnx.Module, mode: str = "observe", amax: float = 0.0, num_bits: int = 8):
    if mode not in ("observe", "quantize"):
      raise QuantError(f"QuantizedInput: unknown mode {mode!r}; valid: 'observe', 'quantize'")
    _qmax(num_bits)
    self.layer = layer
    self.amax = ActRange(jnp.asarray(amax, jnp.float32))
    self.mode = mode
    self.num_bits = int(num_bits)

  def __call__(self, x):
    if self.mode == "observe":
      self.amax[...] = jnp.maximum(self.amax[...], jnp.max(jnp.abs(x)).astype(jnp.float32))
      return self.layer(x)
    amax = self.amax[...]
    scale = jnp.where(amax > 0, amax / _qmax(self.num_bits), 1.0)
    return self.layer(fake_quant(x, scale, self.num_bits))


def layer_name(path: Tuple) -> str:
  """`'stage1/0/conv'` for an `nnx.iter_modules` path (the package's one path naming, `paths.path_str`)."""
  from repopt_jax.paths import path_str  # pylint: disable=g-import-not-at-top
  return path_str(path)


def quantizable_layers(model: nnx.Module) -> dict:
  """`{name: layer}` for every `nnx.Conv` / `nnx.Linear` of `model` (names like `'stage1/0/conv'`).

  Raises:
    QuantError: the model has none (or is already wrapped for quantization).
  """
  out = {}
  for path, module in nnx.iter_modules(model):
    if isinstance(module, QuantizedInput):
      raise QuantError(f"layer {layer_name(path)!r} is already wrapped for quantization; pass the float model")
    if isinstance(module, QUANTIZABLE):
      out[layer_name(path)] = module
  if not out:
    raise QuantError(f"{type(model).__name__} has no nnx.Conv or nnx.Linear layer to quantize")
  return out


def _replace(model: nnx.Module, name: str, new: nnx.Module) -> None:
  *parents, last = name.split("/")
  node = model
  for p in parents:
    node = node[int(p)] if isinstance(node, (nnx.List, list)) else getattr(node, p)
  if isinstance(node, (nnx.List, list)):
    node[int(last)] = new
  else:
    setattr(node, last, new)


def _wrap(model: nnx.Module, mode: str, amax: Mapping[str, float], num_bits: int) -> nnx.Module:
  """A clone of `model` with each quantizable layer wrapped in `QuantizedInput(mode)`, in eval mode."""
  copy = nnx.clone(model)
  for name, layer in quantizable_layers(copy).items():
    _replace(copy, name, QuantizedInput(layer, mode, amax.get(name, 0.0), num_bits))
  copy.eval()
  return copy


@functools.partial(jax.jit, static_argnums=0)
def _observe(graphdef, state, x):
  # The graph is a static argument: models of the same structure share one compiled function.
  m = nnx.merge(graphdef, state)
  m(x)
  return nnx.state(m, ActRange)


def calibrate(model: nnx.Module, batches: Iterable, num_bits: int = 8) -> dict:
  """Per-tensor activation ranges: the maximum `|input|` of every conv/linear layer over `batches`.

  The model runs in eval mode (BatchNorm with its running statistics), under `jax.jit`; `model` itself is
  not changed.

  Args:
    model: a float NNX model.
    batches: an iterable of input arrays, or of dicts with an `'image'` entry (as the data pipeline gives).
    num_bits: unused by the maximum itself; checked for consistency with `quantize_model`.

  Returns:
    `{layer_name: max|x|}` (Python floats), keyed as `quantizable_layers`.

  Raises:
    QuantError: `batches` is empty, or the model has no conv/linear layer.
  """
  _qmax(num_bits)
  observed = _wrap(model, "observe", {}, num_bits)
  graphdef = nnx.graphdef(observed)
  seen = 0
  for batch in batches:
    x = batch["image"] if isinstance(batch, Mapping) else batch
    nnx.update(observed, _observe(graphdef, nnx.state(observed), jnp.asarray(x)))
    seen += 1
  if not seen:
    raise QuantError("calibrate: no calibration batch given")
  # Each wrapper sits where its layer was, so its path is the layer's name.
  return {layer_name(p): float(m.amax[...]) for p, m in nnx.iter_modules(observed)
          if isinstance(m, QuantizedInput)}


def quantize_model(model: nnx.Module, act_ranges: Optional[Mapping[str, float]] = None, *,
                   per_channel: bool = False, num_bits: int = 8) -> nnx.Module:
  """A fake-quantized copy of `model`: INT8 weights of every conv/linear and (optionally) INT8 inputs.

  Kernels are replaced by `fake_quant(w, absmax_scale(w, per_channel))`; biases stay in float (an integer
  kernel adds its bias in the int32 accumulator's scale, i.e. essentially exactly). With `act_ranges`, each
  layer's input `x` is fake-quantized with the per-tensor scale `act_ranges[name] / 127` first.

  Args:
    model: a float NNX model (BatchNorm folded, for a deployment-faithful result).
    act_ranges: `{layer_name: max|x|}` from `calibrate`, covering every layer; None quantizes weights only.
    per_channel: per-output-channel weight scales instead of one per tensor.
    num_bits: integer width (8).

  Returns:
    A new model in eval mode (the input is not changed); call it like the original.

  Raises:
    QuantError: `act_ranges` misses a layer or names one the model lacks, or has a negative/non-finite range.
  """
  _qmax(num_bits)
  layers = quantizable_layers(model)
  if act_ranges is not None:
    missing = [n for n in layers if n not in act_ranges]
    extra = [n for n in act_ranges if n not in layers]
    if missing:
      raise QuantError(f"act_ranges has no range for layer {missing[0]!r} ({len(missing)} missing); "
                       "calibrate the same model")
    if extra:
      raise QuantError(f"act_ranges names {extra[0]!r}, not a conv/linear layer of the model")
    bad = [n for n, v in act_ranges.items() if not np.isfinite(v) or v < 0]
    if bad:
      raise QuantError(f"act_ranges[{bad[0]!r}] = {act_ranges[bad[0]]!r} is not a finite range >= 0")
  out = nnx.clone(model)
  for name, layer in quantizable_layers(out).items():
    w = layer.kernel[...]
    layer.kernel[...] = _fake_quant_kernel(w, per_channel, int(num_bits)).astype(w.dtype)
    if act_ranges is not None:
      _replace(out, name, QuantizedInput(layer, "quantize", act_ranges[name], num_bits))
  out.eval()
  return out
