"""Image operations of the input pipeline (numpy + PIL, no TensorFlow), and its counter-based randomness.

Fixed-size datasets are transformed a batch at a time: bilinear resize as two matrix products, pad-crop and
flip by slicing, normalisation and cast vectorised. ImageNet-like images of varying sizes are cropped and
resized one at a time with PIL.

Randomness is a function of `(seed, global stream position, draw)` only (`uniform`, `example_rng`): the
augmentation of an example is then the same on any number of hosts or worker processes, and after restoring
an iterator state, without any generator state to save.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple

import numpy as np

EVAL_CROP_FRACTION = 0.875  # ImageNet evaluation: resize the shorter side to size / 0.875, centre-crop size.


@functools.lru_cache(maxsize=64)
def _interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
  """`(n_out, n_in)` weights of PIL's bilinear filter (a triangle, widened by the factor when shrinking)."""
  scale = n_in / n_out
  support = max(scale, 1.0)
  centres = (np.arange(n_out) + 0.5) * scale
  w = np.maximum(0.0, 1.0 - np.abs((np.arange(n_in) + 0.5)[None, :] - centres[:, None]) / support)
  return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_batch(images: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
  """Bilinear (antialiased when shrinking) resize of a uint8 `(B, H, W, C)` batch, as two matrix products.

  Matches PIL's `Image.resize(..., BILINEAR)` to within 1 grey level, about 50x faster per image on small
  images because the whole batch is one batched product.

  Args:
    images: uint8 `(B, H, W, C)`.
    size: output `(height, width)`.

  Returns:
    uint8 `(B, height, width, C)`.
  """
  h, w = size
  if images.shape[1:3] == (h, w):
    return images
  ry = _interpolation_matrix(images.shape[1], h)
  rx = _interpolation_matrix(images.shape[2], w)
  x = np.moveaxis(images, -1, 1).astype(np.float32)  # (B, C, H, W)
  out = ry @ x @ rx.T  # (B, C, h, w): convex combinations, so already within [0, 255]
  return np.moveaxis((out + 0.5).astype(np.uint8), 1, -1)


def resize(image: np.ndarray, size: Tuple[int, int], box: Optional[Sequence[float]] = None) -> np.ndarray:
  """Bilinear (antialiased when shrinking) resize of a uint8 HWC image, optionally of a crop box of it (PIL).

  Args:
    image: uint8 `(H, W, C)`.
    size: output `(height, width)`.
    box: optional `(left, upper, right, lower)` region of `image` in pixels (floats allowed).

  Returns:
    uint8 `(height, width, C)`.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  h, w = size
  if box is None and image.shape[:2] == (h, w):
    return image
  box = None if box is None else tuple(float(b) for b in box)
  c = image.shape[-1]
  if c in (1, 3):
    pil = Image.fromarray(image[..., 0] if c == 1 else image)
    out = np.asarray(pil.resize((w, h), resample=Image.BILINEAR, box=box))
    return out[..., None] if c == 1 else out
  return np.stack([resize(image[..., k:k + 1], size, box)[..., 0] for k in range(c)], axis=-1)


def centre_crop_box(height: int, width: int, size: int) -> Tuple[float, float, float, float]:
  """Box of the evaluation crop: the centre `size` square after resizing the shorter side to `size / 0.875`."""
  scale = round(size / EVAL_CROP_FRACTION) / min(height, width)
  side = size / scale
  top, left = (height - side) / 2, (width - side) / 2
  return (left, top, left + side, top + side)


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3), attempts: int = 10) -> Tuple[int, int, int, int]:
  """Box `(left, upper, right, lower)` of an Inception-style random crop (torchvision's RandomResizedCrop)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(attempts):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return (left, top, left + w, top + h)
  # Fallback: the largest centred crop with the aspect ratio clamped into `ratio`.
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif aspect > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  top, left = (height - h) // 2, (width - w) // 2
  return (left, top, left + w, top + h)


def pad_size(image_size: int) -> int:
  """Zero padding of the pad-crop augmentation: 4 pixels at 32 (the CIFAR recipe), 1/8 of the side."""
  return max(1, int(image_size) // 8)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijective avalanche of uint64 values (wrapping arithmetic)."""
  x = x ^ (x >> np.uint64(30))
  x = x * np.uint64(0xBF58476D1CE4E5B9)
  x = x ^ (x >> np.uint64(27))
  x = x * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def uniform(seed: int, positions: np.ndarray, draw: int) -> np.ndarray:
  """Counter-based uniform numbers in [0, 1): one per position, independent across `seed` and `draw`.

  `u = mix(mix(mix(seed) + position) + draw) / 2**64` with splitmix64's mixer `mix`: no state, vectorised, the
  same value for the same `(seed, position, draw)` wherever and whenever it is computed.

  Args:
    seed: the pipeline seed (< 2**32).
    positions: int array of global stream positions.
    draw: which random number of the example (0, 1, ...).

  Returns:
    float64 array shaped as `positions`.
  """
  with np.errstate(over="ignore"):
    key = _mix64(np.uint64(seed) * _GOLDEN + np.uint64(1))
    x = _mix64(np.asarray(positions).astype(np.uint64) + key)
    x = _mix64(x + np.uint64(draw + 1) * _GOLDEN)
  return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def example_rng(seed: int, position: int) -> np.random.Generator:
  """A numpy generator of its own for one example (Philox keyed by `(seed, position)`), for per-example ops."""
  return np.random.Generator(np.random.Philox(key=(int(seed) << 64) | int(position)))


def pad_crop_flip(images: np.ndarray, tops: np.ndarray, lefts: np.ndarray, flips: np.ndarray) -> np.ndarray:
  """Zero-pads a uint8 `(B, S, S, C)` batch by `pad_size(S)` and crops each image back at its offsets.

  Args:
    images: uint8 `(B, S, S, C)`.
    tops, lefts: `(B,)` crop offsets in the padded image, in `[0, 2 * pad]` (`pad` = no shift).
    flips: `(B,)` bools, flip that image left-right.

  Returns:
    uint8 `(B, S, S, C)`.
  """
  b, size = images.shape[0], images.shape[1]
  p = pad_size(size)
  padded = np.zeros((b, size + 2 * p, size + 2 * p, images.shape[-1]), np.uint8)
  padded[:, p:p + size, p:p + size] = images
  out = np.empty_like(images)
  for i in range(b):
    crop = padded[i, tops[i]:tops[i] + size, lefts[i]:lefts[i] + size]
    out[i] = crop[:, ::-1] if flips[i] else crop
  return out
