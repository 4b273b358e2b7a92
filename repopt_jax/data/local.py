"""Datasets built locally as tfds datasets, without TensorFlow and without any download.

* ``digits`` (tfds name ``repopt_digits``): the 1,797 real 8x8 handwritten digits that ship inside scikit-learn
  (`sklearn.datasets.load_digits`, values 0..16 rescaled to uint8 0..255), split once, stratified and seeded,
  into 1,437 training and 360 test images.
* ``fashion_mnist`` (tfds name ``repopt_fashion_mnist``): Fashion-MNIST from the four idx files of its
  release (gzipped or not), e.g. as installed by Debian's ``dataset-fashion-mnist`` package under
  ``/usr/share/datasets/fashion-mnist``, or any folder named by ``$FASHION_MNIST_DIR``.

Both are ordinary tfds `GeneratorBasedBuilder`s written in the ``array_record`` format (``image``: uint8
`tfds.features.Tensor` of shape (H, W, 1), ``label``: `ClassLabel`, supervised keys ``('image', 'label')``),
read by exactly the path used for cifar10/100 and imagenet2012: `tfds.data_source` + grain. The images are
stored as raw pixels rather than PNG: reading one is then a memory view instead of a ~50 us PIL decode, which
keeps the CPU input pipeline fast (`IMAGE_ENCODING = "png"` gives stock-like PNG `Image` features, encoded
with PIL: tfds stores given bytes as they are, so TensorFlow is never needed). Their tfds names carry the
``repopt_`` prefix so that they never collide with a stock tfds ``fashion_mnist`` prepared in the same data
directory.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
from typing import Optional, Tuple

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from repopt_jax.data.specs import DatasetError, resolve_data_dir

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Where Debian's `dataset-fashion-mnist` package puts the files.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot"]
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path) -> np.ndarray:
  """Reads an idx file (the MNIST / Fashion-MNIST array format), gzipped (``.gz``) or not.

  The header is two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions `n`, then `n`
  big-endian int32 sizes; the data follows in C order.

  Args:
    path: the file.

  Returns:
    The array, in native byte order.

  Raises:
    DatasetError: for a file that is not a valid idx file (bad magic, unknown type code, wrong length).
  """
  path = os.fspath(path)
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:  # gzip raises BadGzipFile (an OSError) or EOFError when truncated
    raise DatasetError(f"{path}: cannot read idx file: {e}") from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise DatasetError(f"{path}: not an idx file (bad magic number {raw[:4]!r})")
  dtype = np.dtype(_IDX_DTYPES[raw[2]])
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DatasetError(f"{path}: idx header truncated")
  shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
  expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(raw) != expected:
    raise DatasetError(f"{path}: idx file has {len(raw)} bytes, its header {shape} needs {expected}")
  return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(folder: str, stem: str) -> Optional[str]:
  for name in (stem, stem + ".gz"):
    p = os.path.join(folder, name)
    if os.path.isfile(p):
      return p
  return None


def fashion_mnist_source_dir(source_dir=None) -> str:
  """The folder holding the four Fashion-MNIST idx files.

  The first of `source_dir`, `$FASHION_MNIST_DIR`, Debian's `/usr/share/datasets/fashion-mnist` that is
  given (the Debian folder is the default) must hold the files.

  Args:
    source_dir: an explicit folder, or None.

  Returns:
    The folder.

  Raises:
    DatasetError: when that folder does not hold all four files (the message says how to get them).
  """
  env = os.environ.get("FASHION_MNIST_DIR")
  if source_dir is not None:
    folder, where = os.fspath(source_dir), os.fspath(source_dir)
  elif env:  # an explicit choice: no silent fallback to another copy
    folder, where = env, f"$FASHION_MNIST_DIR={env}"
  else:
    folder, where = DEBIAN_FASHION_MNIST_DIR, f"{DEBIAN_FASHION_MNIST_DIR} ($FASHION_MNIST_DIR is unset)"
  if all(_find_idx(folder, s) for s in FASHION_MNIST_FILES.values()):
    return folder
  raise DatasetError(
      f"fashion_mnist: the four idx files ({', '.join(FASHION_MNIST_FILES.values())}, optionally .gz) are not "
      f"in {where}; install them with `apt-get install dataset-fashion-mnist` or set FASHION_MNIST_DIR to a "
      "folder holding them")


def load_fashion_mnist_idx(folder) -> dict:
  """Reads the four Fashion-MNIST idx files of `folder` and checks they fit together.

  Args:
    folder: the folder (see `fashion_mnist_source_dir`).

  Returns:
    `{'train': (images uint8 (N, 28, 28), labels (N,)), 'test': (...)}`.

  Raises:
    DatasetError: for missing or inconsistent files (the message names the file).
  """
  out = {}
  for split, prefix in (("train", "train"), ("test", "test")):
    ipath = _find_idx(folder, FASHION_MNIST_FILES[prefix + "_images"])
    lpath = _find_idx(folder, FASHION_MNIST_FILES[prefix + "_labels"])
    if ipath is None or lpath is None:
      missing = FASHION_MNIST_FILES[prefix + ("_images" if ipath is None else "_labels")]
      raise DatasetError(f"fashion_mnist: {os.path.join(folder, missing)}(.gz) not found")
    images, labels = read_idx(ipath), read_idx(lpath)
    if images.ndim != 3 or images.dtype != np.uint8:
      raise DatasetError(f"{ipath}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
      raise DatasetError(f"{lpath}: {labels.shape} labels for {images.shape[0]} images in {ipath}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(_FASHION_CLASSES)):
      raise DatasetError(f"{lpath}: labels outside 0..{len(_FASHION_CLASSES) - 1}")
    out[split] = (images, labels.astype(np.int64))
  return out


def digits_arrays(test_size: int = 360, seed: int = 0) -> dict:
  """scikit-learn's handwritten digits as uint8 images with a fixed stratified train/test split.

  Args:
    test_size: number of test images (stratified by class).
    seed: seed of the split.

  Returns:
    `{'train': (images uint8 (1437, 8, 8), labels (1437,)), 'test': (images (360, 8, 8), labels (360,))}`.
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import StratifiedShuffleSplit  # pylint: disable=g-import-not-at-top

  d = load_digits()
  # Values are counts 0..16 of the 4x4 blocks of the original 32x32 bitmaps: rescale to the full uint8 range.
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
  labels = d.target.astype(np.int64)
  split = StratifiedShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
  train_idx, test_idx = next(split.split(np.zeros(len(labels)), labels))
  # Sorted so that the stored order depends on the split only.
  train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
  return {"train": (images[train_idx], labels[train_idx]), "test": (images[test_idx], labels[test_idx])}


def _png(image: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  buf = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
  return buf.getvalue()


class ArrayImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of tfds builders of in-memory `(uint8 images (N, H, W, C), int labels (N,))` arrays, no TensorFlow.

  A subclass sets `VERSION`, `IMAGE_SHAPE`, `CLASS_NAMES` (optionally `IMAGE_ENCODING`, `RECORDS_PER_SHARD`)
  and implements `_arrays(dl_manager) -> {split: (images, labels)}`; tfds registers it under the snake-case
  of its class name. `Builder(data_dir=..., file_format='array_record').prepare()` writes it for
  `tfds.data_source`. Features: ``image`` and ``label`` (`ClassLabel`), supervised keys ``('image', 'label')``.
  """

  # tfds derives the builder's source path through `importlib_resources` for classes inside a package, a
  # module tfds 4.9.10 does not install; the path only serves to look up download checksums (none here).
  code_path = epath.Path(__file__)
  IMAGE_SHAPE: Tuple[int, int, int] = (0, 0, 1)
  # None: raw uint8 pixels (a `Tensor` feature, decoded by a memory view); "png": a PNG `Image` feature
  # like stock tfds datasets (decoded by PIL or OpenCV, some 50 us per small image with PIL).
  IMAGE_ENCODING: Optional[str] = None
  # array_record 0.8 reads one record in a time that grows with the records in its file (~2 us per 1,000):
  # `prepare` writes each split in files of about this many records.
  RECORDS_PER_SHARD = 1000
  CLASS_NAMES: Tuple[str, ...] = ()
  DESCRIPTION = ""
  HOMEPAGE = ""

  def _info(self):
    if self.IMAGE_ENCODING == "png":
      image = tfds.features.Image(shape=self.IMAGE_SHAPE, encoding_format="png")
    else:
      image = tfds.features.Tensor(shape=self.IMAGE_SHAPE, dtype=np.uint8, encoding=tfds.features.Encoding.BYTES)
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, homepage=self.HOMEPAGE,
        features=tfds.features.FeaturesDict({
            "image": image, "label": tfds.features.ClassLabel(names=list(self.CLASS_NAMES))}),
        supervised_keys=("image", "label"))

  def _arrays(self, dl_manager) -> dict:
    """`{split: (uint8 images (N, H, W, C), labels (N,))}`; `dl_manager.manual_dir` is `prepare`'s folder."""
    raise NotImplementedError

  def _split_sizes(self, manual_dir) -> list:
    """Examples in each split (default: from `_arrays`; override where reading them twice is costly)."""
    return [len(labels) for _, labels in self._arrays(_ManualDir(manual_dir)).values()]

  def num_shards(self, manual_dir=None) -> int:
    """Files per split: about `RECORDS_PER_SHARD` records each, at least one record in every file."""
    sizes = self._split_sizes(manual_dir)
    return max(1, min(min(sizes), -(-max(sizes) // self.RECORDS_PER_SHARD)))

  def prepare(self, manual_dir=None):
    """`download_and_prepare` offline (no GCS look-up), in files of ~`RECORDS_PER_SHARD`, without printing."""
    config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False,
                                          num_shards=self.num_shards(manual_dir))
    with _quiet_tfds():
      self.download_and_prepare(download_config=config)

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(images, labels)
            for split, (images, labels) in self._arrays(dl_manager).items()}

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      # PNG bytes are made here with PIL: tfds stores given bytes as they are, so no TensorFlow encoder runs.
      yield i, {"image": _png(image) if self.IMAGE_ENCODING == "png" else image, "label": int(label)}


class RepoptDigits(ArrayImageBuilder):
  """scikit-learn's handwritten digits (UCI optdigits test set), 8x8 grey, 10 classes; split 1437/360."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "sklearn load_digits, uint8 = round(v * 255 / 16), stratified split seed 0."}
  IMAGE_SHAPE = (8, 8, 1)
  CLASS_NAMES = tuple(str(i) for i in range(10))
  DESCRIPTION = ("The 1,797 handwritten digits shipped with scikit-learn (sklearn.datasets.load_digits), "
                 "rescaled from 0..16 to 0..255; stratified split (seed 0) into 1,437 train / 360 test.")
  HOMEPAGE = "https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits"

  def _arrays(self, dl_manager):
    del dl_manager
    return {k: (im[..., None], lb) for k, (im, lb) in digits_arrays().items()}


class RepoptFashionMnist(ArrayImageBuilder):
  """Fashion-MNIST (Zalando) from local idx files: 28x28 grey, 10 classes, 60000/10000."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "From the four idx files of the release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "A folder holding train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
      "t10k-labels-idx1-ubyte (optionally .gz), e.g. /usr/share/datasets/fashion-mnist from Debian's "
      "dataset-fashion-mnist package.")
  IMAGE_SHAPE = (28, 28, 1)
  CLASS_NAMES = tuple(_FASHION_CLASSES)
  DESCRIPTION = "Fashion-MNIST: 70,000 28x28 grey images of 10 kinds of clothing, built from local idx files."
  HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"

  def _split_sizes(self, manual_dir):
    return [len(read_idx(_find_idx(os.fspath(manual_dir), FASHION_MNIST_FILES[k])))
            for k in ("train_labels", "test_labels")]

  def _arrays(self, dl_manager):
    data = load_fashion_mnist_idx(os.fspath(dl_manager.manual_dir))
    for split, (images, _) in data.items():
      if images.shape[1:] != self.IMAGE_SHAPE[:2]:
        raise DatasetError(f"fashion_mnist: {split} images are {images.shape[1:]}, expected {self.IMAGE_SHAPE[:2]}")
    return {k: (im[..., None], lb) for k, (im, lb) in data.items()}


_BUILDERS = {"repopt_digits": RepoptDigits, "repopt_fashion_mnist": RepoptFashionMnist}


class _ManualDir:
  """The one attribute of a tfds download manager that `ArrayImageBuilder._arrays` may use."""

  def __init__(self, manual_dir):
    self.manual_dir = manual_dir


def is_prepared(builder) -> bool:
  """Whether a tfds builder's data are on disk (`builder.is_prepared()` without its warning when not)."""
  path = os.fspath(builder.data_path)
  return all(os.path.isfile(os.path.join(path, f)) for f in ("dataset_info.json", "features.json"))


@contextlib.contextmanager
def _quiet_tfds():
  """Turns tfds's progress bars and its stdout notices off for the block: library code does not print."""
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top

  old = tqdm_utils._active  # pylint: disable=protected-access
  tqdm_utils.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tqdm_utils.display_progress_bar(old)


@contextlib.contextmanager
def _file_lock(path: str):
  """An exclusive lock on `path` (POSIX flock): concurrent processes build a dataset once."""
  try:
    import fcntl  # pylint: disable=g-import-not-at-top
  except ImportError:  # not POSIX: no concurrent-build protection
    yield
    return
  with open(path, "a+") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def local_builder(tfds_name: str, data_dir=None) -> tfds.core.DatasetBuilder:
  """The builder of a locally built dataset (`repopt_digits`, `repopt_fashion_mnist`) in `data_dir`."""
  return _BUILDERS[tfds_name](data_dir=resolve_data_dir(data_dir), file_format="array_record")


def prepare_local(name: str, data_dir=None, source_dir=None) -> str:
  """Builds a local dataset into `data_dir` unless it is there already; safe to call from several processes.

  Args:
    name: ``'digits'`` or ``'fashion_mnist'``.
    data_dir: the tfds data directory (default `default_data_dir()`).
    source_dir: for ``fashion_mnist``, the folder of the idx files (default: see `fashion_mnist_source_dir`).

  Returns:
    The folder of the prepared dataset version.

  Raises:
    DatasetError: for another name, missing source files, or a data_dir that cannot be written.
  """
  tfds_name = {"digits": "repopt_digits", "fashion_mnist": "repopt_fashion_mnist"}.get(name, name)
  if tfds_name not in _BUILDERS:
    raise DatasetError(f"{name!r} is not a locally built dataset; those are digits, fashion_mnist")
  data_dir = resolve_data_dir(data_dir)
  builder = local_builder(tfds_name, data_dir)
  if is_prepared(builder):
    return os.fspath(builder.data_dir)
  manual = fashion_mnist_source_dir(source_dir) if tfds_name == "repopt_fashion_mnist" else None
  try:
    os.makedirs(data_dir, exist_ok=True)
    lock = os.path.join(data_dir, f".{tfds_name}.lock")
    with _file_lock(lock):
      builder = local_builder(tfds_name, data_dir)  # re-read: another process may have built it meanwhile
      if not is_prepared(builder):
        builder.prepare(manual)
  except OSError as e:
    raise DatasetError(f"{name}: cannot build into data_dir {data_dir}: {e}") from e
  return os.fspath(builder.data_dir)
