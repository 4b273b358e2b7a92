"""Dataset splits through `tfds.data_source`: one-line errors for what goes wrong, and fast record reading."""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from repopt_jax.data import local
from repopt_jax.data.specs import DatasetError, DatasetSpec, resolve_data_dir


def prepare_command(spec: DatasetSpec, data_dir: str) -> str:
  """The shell line that prepares a stock tfds dataset once, in the random-access array_record format.

  It asks for about 1,000 records per file: array_record 0.8 reads one record in a time that grows with the
  records in its file (~2 us per 1,000), which would otherwise dominate reading small images.
  """
  size = max(spec.splits.values(), default=0)
  shards = ""
  if size:
    shards = f"download_config=tfds.download.DownloadConfig(num_shards={min(1024, -(-size // 1000))})"
  return (f"pip install 'repopt_jax[prepare]' && python -c \"import tensorflow_datasets as tfds; "
          f"tfds.builder('{spec.tfds_name}', data_dir='{data_dir}', file_format='array_record')"
          f".download_and_prepare({shards})\"")


def _diagnose(spec: DatasetSpec, split: str, data_dir: str, error: Exception) -> DatasetError:
  """Turns a failure of `tfds.data_source` into a one-line `DatasetError` saying what to do."""
  first = (str(error).strip().splitlines() or [type(error).__name__])[0]
  try:
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  except Exception:  # pylint: disable=broad-except
    return DatasetError(f"dataset {spec.name!r} ({spec.tfds_name}) cannot be opened in {data_dir}: {first}")
  path = os.fspath(builder.data_path)
  if not local.is_prepared(builder):
    manual = ""
    if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
      manual = (f" after putting its manually downloaded files in {os.path.join(data_dir, 'downloads', 'manual')}"
                f" ({' '.join(str(builder.MANUAL_DOWNLOAD_INSTRUCTIONS).split())[:200]})")
    return DatasetError(
        f"dataset {spec.name!r} is not prepared in {data_dir} (nothing is downloaded at run time): prepare it "
        f"once{manual} with: {prepare_command(spec, data_dir)}")
  formats = [f.value for f in builder.info.available_file_formats()] or ["unknown"]
  if "array_record" not in formats and "parquet" not in formats:
    return DatasetError(
        f"dataset {spec.name!r} is prepared in {path} as {'/'.join(formats)}, which has no random access: "
        f"prepare it again in the array_record format with: {prepare_command(spec, data_dir)}")
  splits = sorted(builder.info.splits)
  if str(split).split("[")[0] not in splits:  # 'train[:90%]' names split 'train'
    return DatasetError(f"dataset {spec.name!r} has no split {split!r}; its splits are {', '.join(splits)}")
  return DatasetError(f"dataset {spec.name!r} split {split!r} in {path} cannot be read: {first}")


def open_source(spec: DatasetSpec, split: str, data_dir=None):
  """Opens `split` of a dataset as a tfds random-access data source (decoded numpy examples).

  Local datasets (digits, fashion_mnist) are built into `data_dir` on first use; stock tfds datasets must have
  been prepared there in the array_record format (nothing is downloaded at run time).

  Args:
    spec: the dataset's spec (`dataset_info(name)`).
    split: a split name or tfds split expression (``'train'``, ``'train[:90%]'``, ...).
    data_dir: the tfds data directory (default `default_data_dir()`).

  Returns:
    The `tfds.data_source` of the split.

  Raises:
    DatasetError: dataset not prepared (says how to prepare it), in a format without random access, unknown
      split, or a local dataset whose source files are missing.
  """
  data_dir = resolve_data_dir(data_dir)
  if spec.local:
    local.prepare_local(spec.name, data_dir)
  try:
    return tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except  # tfds raises many kinds; diagnose from the disk
    raise _diagnose(spec, split, data_dir, e) from e


class ExampleReader:
  """Reads `(uint8 image HWC, int label)` records of a split through `tfds.data_source`.

  The records are fetched as serialized `tf.Example` bytes (`DeserializeMethod.RAW_BYTES`) and only the two
  supervised features are parsed (the protobuf parse is C code) and decoded with tfds's own feature decoders
  (numpy / PIL / OpenCV): about ten times less Python per example than tfds's generic decoding of every
  feature. Sources that do not hand out serialized examples (`tfds.testing.mock_data`) are read decoded.

  Args:
    spec: the dataset's spec.
    split: split name or tfds split expression.
    data_dir: the tfds data directory.
  """

  def __init__(self, spec: DatasetSpec, split: str, data_dir=None):
    self._name, self._split = spec.tfds_name, split
    decoded = open_source(spec, split, data_dir)
    info = getattr(decoded, "dataset_info", None)
    keys = getattr(info, "supervised_keys", None)
    self.image_key, self.label_key = keys if isinstance(keys, tuple) and len(keys) == 2 else ("image", "label")
    self._len = len(decoded)
    self._decoded = decoded
    self._raw = None
    if self._len:
      try:
        raw = tfds.data_source(spec.tfds_name, split=split, data_dir=resolve_data_dir(data_dir), download=False,
                               deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        self._image_feature = info.features[self.image_key]
        self._raw = raw
        self._parse(raw[0])
      except Exception:  # pylint: disable=broad-except  # e.g. mock data: fall back to decoded examples
        self._raw = None

  def __len__(self) -> int:
    return self._len

  @property
  def parses_records(self) -> bool:
    """True when records are parsed from their serialized bytes (the fast path), False when read decoded."""
    return self._raw is not None

  def __repr__(self) -> str:
    # Part of grain's check of a restored iterator state: the dataset and split, not where they are stored.
    return f"ExampleReader({self._name}, split={self._split!r})"

  def _parse(self, record: bytes):
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top

    feature = tf_example_pb2.Example.FromString(record).features.feature
    image = feature[self.image_key]
    if image.HasField("bytes_list"):  # encoded image (PNG/JPEG) or raw-bytes tensor
      pixels = self._image_feature.decode_example_np(image.bytes_list.value[0])
    else:  # a tensor stored as an int64 list
      pixels = np.asarray(image.int64_list.value, np.uint8).reshape(self._image_feature.shape)
    return pixels, int(feature[self.label_key].int64_list.value[0])

  def __getitem__(self, key: int):
    """`(image uint8 (H, W, C), label int)` of record `key`."""
    if self._raw is not None:
      image, label = self._parse(self._raw[key])
    else:
      example = self._decoded[key]
      image, label = example[self.image_key], int(example[self.label_key])
    image = np.asarray(image)
    return (image[..., None] if image.ndim == 2 else image), label
