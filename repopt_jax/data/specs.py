"""What each dataset is: classes, native image shape, splits, normalisation and augmentation.

A `DatasetSpec` is the small record the trainer needs before touching any data (the number of classes of the
classifier head, the default image size, the split names). The table below covers the datasets this project
benchmarks on; any other tfds image-classification dataset (one with `supervised_keys` naming an `Image` and a
`ClassLabel` feature) is accepted too, with a spec read off its tfds `DatasetInfo`.

Augmentation kinds (the training-time random part; evaluation only resizes / centre-crops):

* ``pad_crop``: zero-pad by `image_size // 8` pixels, random crop back to `image_size` (digits: flipping a digit
  changes its meaning).
* ``pad_crop_flip``: the same plus a random horizontal flip (the CIFAR recipe; Fashion-MNIST clothes are
  left/right symmetric classes).
* ``inception_crop_flip``: random-resized-crop (area 8%-100%, aspect 3/4-4/3) + flip for training; resize the
  shorter side to `image_size / 0.875` and centre-crop for evaluation (the ImageNet recipe of the paper).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional, Tuple

AUGMENT_KINDS = ("pad_crop", "pad_crop_flip", "inception_crop_flip")


class DatasetError(ValueError):
  """Raised for a dataset that cannot be used (unknown, not prepared, bad files, bad batch); names the culprit."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Static description of an image-classification dataset.

  Attributes:
    name: our name of the dataset (`available_datasets()`).
    tfds_name: the tfds dataset it is read from (`repopt_digits` for the locally built digits, ...).
    num_classes: number of classes.
    image_shape: native `(H, W, C)` of the stored images; `None` for a dimension that varies (ImageNet).
    image_size: default side of the square images the pipeline delivers.
    splits: split name -> number of examples (empty when unknown: a stock dataset not prepared yet).
    train_split: split used for training.
    eval_split: split used for evaluation.
    mean: per-channel mean of the pixel values in [0, 1].
    std: per-channel standard deviation of the pixel values in [0, 1].
    augment: augmentation kind, one of `AUGMENT_KINDS`.
    local: True when the dataset is built locally from files on this machine (no download, no TensorFlow).
  """

  name: str
  tfds_name: str
  num_classes: int
  image_shape: Tuple[Optional[int], Optional[int], int]
  image_size: int
  splits: Mapping[str, int]
  train_split: str
  eval_split: str
  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  augment: str
  local: bool = False

  @property
  def channels(self) -> int:
    return self.image_shape[-1]


_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_CIFAR100_MEAN, _CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Pixel statistics of the training splits, measured on the stored uint8 images (tests check digits/fashion).
_TABLE = {
    "digits": DatasetSpec(
        "digits", "repopt_digits", 10, (8, 8, 1), 32, {"train": 1437, "test": 360}, "train", "test",
        (0.3054,), (0.3760,), "pad_crop", local=True),
    "fashion_mnist": DatasetSpec(
        "fashion_mnist", "repopt_fashion_mnist", 10, (28, 28, 1), 32, {"train": 60000, "test": 10000},
        "train", "test", (0.2860,), (0.3530,), "pad_crop_flip", local=True),
    "cifar10": DatasetSpec(
        "cifar10", "cifar10", 10, (32, 32, 3), 32, {"train": 50000, "test": 10000}, "train", "test",
        _CIFAR10_MEAN, _CIFAR10_STD, "pad_crop_flip"),
    "cifar100": DatasetSpec(
        "cifar100", "cifar100", 100, (32, 32, 3), 32, {"train": 50000, "test": 10000}, "train", "test",
        _CIFAR100_MEAN, _CIFAR100_STD, "pad_crop_flip"),
    "imagenet2012": DatasetSpec(
        "imagenet2012", "imagenet2012", 1000, (None, None, 3), 224, {"train": 1281167, "validation": 50000},
        "train", "validation", _IMAGENET_MEAN, _IMAGENET_STD, "inception_crop_flip"),
}


def default_data_dir() -> str:
  """The data directory used when none is given: `$REPOPT_DATA_DIR`, else `$TFDS_DATA_DIR`, else tfds's default.

  Returns:
    An absolute path (not created).
  """
  for var in ("REPOPT_DATA_DIR", "TFDS_DATA_DIR"):
    if os.environ.get(var):
      return os.path.abspath(os.path.expanduser(os.environ[var]))
  return os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def resolve_data_dir(data_dir) -> str:
  return default_data_dir() if data_dir is None else os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


def available_datasets() -> list:
  """Names of the datasets with a built-in spec, local ones first.

  Any other tfds image-classification dataset name is accepted as well (see `dataset_info`).

  Returns:
    A list of names, e.g. `['digits', 'fashion_mnist', 'cifar10', 'cifar100', 'imagenet2012']`.
  """
  return list(_TABLE)


def _unknown(name: str) -> DatasetError:
  return DatasetError(
      f"unknown dataset {name!r}: known datasets are {', '.join(available_datasets())}, or the name of any "
      "tfds image-classification dataset (tfds.list_builders())")


def _generic_spec(name: str, data_dir: str) -> DatasetSpec:
  """Spec of a tfds dataset outside the table, read from its `DatasetInfo` (no download, no network)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  base = name.split("/")[0].split(":")[0]
  on_disk = os.path.isdir(os.path.join(data_dir, base))
  if base not in tfds.list_builders(with_community_datasets=False) and not on_disk:
    raise _unknown(name)
  try:
    info = tfds.builder(name, data_dir=data_dir).info
  except Exception as e:  # tfds raises many kinds here; the message is what matters
    raise DatasetError(f"dataset {name!r}: tfds cannot open it in {data_dir}: {str(e).splitlines()[0]}") from e
  keys = info.supervised_keys
  feats = info.features
  ok = (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)
        and isinstance(feats[keys[0]], tfds.features.Image) and isinstance(feats[keys[1]], tfds.features.ClassLabel))
  if not ok:
    raise DatasetError(f"dataset {name!r} is not an image-classification dataset: its supervised_keys are "
                       f"{keys!r}, need (Image, ClassLabel)")
  shape = tuple(feats[keys[0]].shape)
  splits = {k: int(v.num_examples) for k, v in info.splits.items()}
  fixed = None not in shape[:2]
  small = fixed and max(shape[:2]) <= 64
  c = shape[-1]
  return DatasetSpec(
      name=name, tfds_name=name, num_classes=int(feats[keys[1]].num_classes), image_shape=shape,
      image_size=int(shape[0]) if small else 224, splits=splits, train_split="train",
      eval_split="test" if ("test" in splits or not splits) else "validation",
      # Unknown statistics: map [0, 1] to [-1, 1].
      mean=(0.5,) * c, std=(0.5,) * c, augment="pad_crop_flip" if small else "inception_crop_flip")


def dataset_info(name: str, data_dir=None) -> DatasetSpec:
  """The `DatasetSpec` of a dataset, without reading or building any data.

  Args:
    name: a name from `available_datasets()`, or any tfds image-classification dataset name.
    data_dir: where prepared tfds datasets live (default `default_data_dir()`); only consulted for datasets
      outside the built-in table.

  Returns:
    The dataset's `DatasetSpec`.

  Raises:
    DatasetError: for an unknown name (the message lists the known ones).

  Example:
    >>> from repopt_jax import data
    >>> data.dataset_info('digits').num_classes
    10
  """
  if not isinstance(name, str) or not name:
    raise DatasetError(f"dataset name must be a non-empty string, got {name!r}")
  if name in _TABLE:
    return _TABLE[name]
  return _generic_spec(name, resolve_data_dir(data_dir))
