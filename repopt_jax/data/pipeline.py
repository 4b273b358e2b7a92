"""grain input pipelines over tfds data sources, and the placement of per-host batches on a device mesh.

The stream of examples is defined globally, independently of the number of hosts: position `g` of the stream
holds record `perm_e[g mod N]` of epoch `e = g // N` (a seeded permutation per epoch when shuffling), and its
augmentation is drawn from `(seed, g)`. Global batch `b` is positions `[b*G, (b+1)*G)`; host `h` of `P` reads
the slice `[b*G + h*L, b*G + (h+1)*L)` of it (`L = G / P`). So the global batches, and thus training, are the
same on 1 host or on 8 (what a data-parallel run across processes needs to match a single-process one), and
the hosts read disjoint examples.

grain runs it: one grain record is one host's slice of one global batch (`BatchSource`), so grain's
per-record machinery runs once per batch, not once per image. The `DataLoader`'s
`ShardOptions(shard_index=process_index, shard_count=process_count)` hands host `h` the records `b*P + h`;
its reader threads (or worker processes) read them ahead; its iterator state (`get_state` / `set_state`, JSON
bytes) is what the trainer checkpoints, and restoring it reproduces the following batches exactly.

Evaluation streams are not shuffled nor augmented and are padded to whole global batches with examples whose
`mask` is False, so every example counts exactly once on any number of hosts.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any, Optional, Sequence, Union

import grain as grain_lib
import grain.python as grain
import numpy as np

from repopt_jax.data import sources
from repopt_jax.data import transforms as T
from repopt_jax.data.specs import AUGMENT_KINDS, DatasetError, DatasetSpec, dataset_info

_DTYPES = ("float32", "bfloat16", "float16")


class Stream:
  """Which record sits at each global stream position (see the module docstring).

  Args:
    num_records: number of examples `N` of the split (key `N` is the padding example of evaluation).
    global_batch_size: `G`.
    shuffle: a new seeded permutation each epoch (training) or the stored order (evaluation).
    seed: seed of the permutations (and of the augmentation, elsewhere).
    num_epochs: epochs in the stream, or None for an endless stream.
    pad: pad each epoch to whole global batches with the padding example (evaluation); otherwise epochs follow
      each other without a break and only a last incomplete global batch is dropped.
  """

  def __init__(self, num_records: int, global_batch_size: int, *, shuffle: bool, seed: int,
               num_epochs: Optional[int], pad: bool):
    self.num_records, self.global_batch_size = int(num_records), int(global_batch_size)
    self.shuffle, self.seed, self.num_epochs, self.pad = bool(shuffle), int(seed), num_epochs, bool(pad)
    n, g = self.num_records, self.global_batch_size
    self.epoch_length = -(-n // g) * g if pad else n
    if num_epochs is None:
      self.num_batches = sys.maxsize // (64 * g)  # endless, for all practical purposes
    else:
      self.num_batches = num_epochs * self.epoch_length // g
    self._lock = threading.Lock()
    self._permutations = {}  # epoch -> permutation; the current and the previous epoch are kept

  def __getstate__(self):
    # grain pickles the pipeline into its worker processes: locks do not pickle, caches need not travel.
    state = dict(self.__dict__)
    state.pop("_lock")
    state["_permutations"] = {}
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return (f"Stream(num_records={self.num_records}, global_batch_size={self.global_batch_size}, "
            f"shuffle={self.shuffle}, seed={self.seed}, num_epochs={self.num_epochs}, pad={self.pad})")

  def permutation(self, epoch: int) -> np.ndarray:
    """The order of the records in `epoch` (seeded by `(seed, epoch)`; cached)."""
    with self._lock:
      perm = self._permutations.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(self.num_records)
      with self._lock:
        for old in [e for e in self._permutations if e < epoch - 1]:
          del self._permutations[old]
        self._permutations[epoch] = perm
    return perm

  def record_keys(self, positions: np.ndarray) -> np.ndarray:
    """The records at global stream positions (`num_records` for padding examples)."""
    positions = np.asarray(positions, np.int64)
    epochs, p = np.divmod(positions, self.epoch_length)
    keys = np.where(p < self.num_records, p, self.num_records)
    if self.shuffle:
      for e in np.unique(epochs):
        sel = (epochs == e) & (p < self.num_records)
        keys[sel] = self.permutation(int(e))[p[sel]]
    return keys

  def batch_positions(self, batch: int, process_index: int, process_count: int) -> np.ndarray:
    """Global stream positions of host `process_index`'s slice of global batch `batch`."""
    local = self.global_batch_size // process_count
    start = batch * self.global_batch_size + process_index * local
    return np.arange(start, start + local, dtype=np.int64)


class BatchSampler:
  """grain sampler over the records `b * P + h` (host `h`'s slice of global batch `b`) of a `Stream`."""

  def __init__(self, stream: Stream, process_count: int):
    self.stream, self.process_count = stream, int(process_count)

  def __len__(self) -> int:
    return self.stream.num_batches * self.process_count

  def __repr__(self) -> str:
    # grain compares `repr(sampler)` with the one saved in an iterator state before restoring it.
    return f"BatchSampler({self.stream!r}, process_count={self.process_count})"

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} is past the end of the stream ({len(self)} records)")
    return grain.RecordMetadata(index=index, record_key=index, rng=None)


class BatchSource:
  """grain data source whose record `b * P + h` is host `h`'s slice of global batch `b`, unnormalised.

  A record is `{'image': uint8 (L, H, W, C), 'label': int32 (L,), 'mask': bool (L,), 'position': int64 (L,)}`:
  images at their native size for fixed-size datasets (`PrepareBatch` resizes and augments the whole batch),
  already cropped to `image_size` for ImageNet-like ones (one example at a time).
  """

  def __init__(self, reader: sources.ExampleReader, stream: Stream, process_count: int, spec: DatasetSpec,
               image_size: int, augment: bool):
    self.reader, self.stream, self.process_count = reader, stream, int(process_count)
    self.kind, self.size, self.augment = spec.augment, int(image_size), bool(augment)
    channels = int(spec.image_shape[-1])
    if self.kind == "inception_crop_flip":
      self._shape = (self.size, self.size, channels)
    else:
      if None in spec.image_shape[:2]:
        raise DatasetError(f"dataset {spec.name!r}: augmentation {self.kind!r} needs a fixed image shape, got "
                           f"{spec.image_shape}")
      self._shape = tuple(int(d) for d in spec.image_shape)

  def __len__(self) -> int:
    return self.stream.num_batches * self.process_count

  def __repr__(self) -> str:
    return (f"BatchSource({self.reader!r}, kind={self.kind}, image_size={self.size}, augment={self.augment}, "
            f"process_count={self.process_count})")

  def _example(self, key: int, position: int):
    image, label = self.reader[key]
    if self.kind == "inception_crop_flip":
      size, (h, w) = self.size, image.shape[:2]
      if self.augment:
        rng = T.example_rng(self.stream.seed, position)
        image = T.resize(image, (size, size), box=T.random_resized_crop_box(h, w, rng))
        if rng.random() < 0.5:
          image = image[:, ::-1]
      else:
        image = T.resize(image, (size, size), box=T.centre_crop_box(h, w, size))
    elif image.shape != self._shape:
      raise DatasetError(f"{self.reader!r} record {key}: image shape {image.shape} != {self._shape}")
    return image, label

  def __getitem__(self, record: int) -> dict:
    batch, host = divmod(int(record), self.process_count)
    positions = self.stream.batch_positions(batch, host, self.process_count)
    keys = self.stream.record_keys(positions)
    images = np.zeros((len(keys),) + self._shape, np.uint8)
    labels = np.zeros(len(keys), np.int32)
    mask = keys < self.stream.num_records  # the rest are padding examples: zero image, label 0
    for i in np.flatnonzero(mask):
      images[i], labels[i] = self._example(int(keys[i]), int(positions[i]))
    return {"image": images, "label": labels, "mask": mask, "position": positions}


class PrepareBatch(grain.MapTransform):
  """Per batch: resize to the output size, pad-crop/flip (training), `(x / 255 - mean) / std`, cast.

  The crop offsets and flips are drawn from `(seed, position)` (`transforms.uniform`): reproducible and
  independent of the host and worker layout.
  """

  def __init__(self, kind: str, image_size: int, mean: Sequence[float], std: Sequence[float], dtype, seed: int,
               augment: bool):
    self.kind, self.size, self.seed, self.augment = kind, int(image_size), int(seed), bool(augment)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    self.scale = (1.0 / (255.0 * std)).astype(np.float32)
    self.offset = (-mean / std).astype(np.float32)
    self.dtype = np.dtype(dtype)

  def map(self, element: Any):
    images, positions = element["image"], element["position"]
    size = self.size
    if self.kind != "inception_crop_flip":
      images = T.resize_batch(images, (size, size))
      if self.augment:
        span = 2 * T.pad_size(size) + 1
        tops = (T.uniform(self.seed, positions, 0) * span).astype(np.int64)
        lefts = (T.uniform(self.seed, positions, 1) * span).astype(np.int64)
        flips = (T.uniform(self.seed, positions, 2) < 0.5) & (self.kind == "pad_crop_flip")
        images = T.pad_crop_flip(images, tops, lefts, flips)
    image = images.astype(np.float32) * self.scale + self.offset
    return {"image": image.astype(self.dtype, copy=False), "label": element["label"], "mask": element["mask"]}


def _check_int(name: str, value, minimum: int):
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise DatasetError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def make_loader(name: str, split: Optional[str] = None, *, global_batch_size: int, train: bool, seed: int = 0,
                image_size: Optional[int] = None, data_dir=None, num_epochs: Optional[int] = None,
                worker_count: int = 0, process_index: Optional[int] = None, process_count: Optional[int] = None,
                dtype: str = "float32", shuffle: Optional[bool] = None, augment: Optional[bool] = None,
                read_threads: int = 2, prefetch: int = 4, worker_buffer_size: int = 2) -> grain.DataLoader:
  """The grain `DataLoader` behind `make_iterator` (same arguments); `iter()` of it is the iterator."""
  spec = dataset_info(name, data_dir)
  split = split if split is not None else (spec.train_split if train else spec.eval_split)
  global_batch_size = _check_int("global_batch_size", global_batch_size, 1)
  seed = _check_int("seed", seed, 0)
  if seed >= 2 ** 32:
    raise DatasetError(f"seed must be < 2**32, got {seed}")
  worker_count = _check_int("worker_count", worker_count, 0)
  read_threads = _check_int("read_threads", read_threads, 1)
  prefetch = _check_int("prefetch", prefetch, 1)
  if num_epochs is not None:
    num_epochs = _check_int("num_epochs", num_epochs, 1)
  elif not train:
    num_epochs = 1  # an evaluation pass; pass num_epochs explicitly for more
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  process_count = _check_int("process_count", process_count, 1)
  process_index = _check_int("process_index", process_index, 0)
  if process_index >= process_count:
    raise DatasetError(f"process_index {process_index} must be < process_count {process_count}")
  if global_batch_size % process_count:
    raise DatasetError(f"global_batch_size {global_batch_size} is not divisible by the process count "
                       f"{process_count}: each host must get the same number of examples")
  image_size = spec.image_size if image_size is None else _check_int("image_size", image_size, 1)
  dtype = _dtype_name(dtype)
  if dtype not in _DTYPES:
    raise DatasetError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
  if spec.augment not in AUGMENT_KINDS:
    raise DatasetError(f"dataset {name!r}: unknown augmentation kind {spec.augment!r}")
  shuffle = train if shuffle is None else bool(shuffle)
  augment = train if augment is None else bool(augment)

  reader = sources.ExampleReader(spec, split, data_dir)
  if len(reader) == 0:
    raise DatasetError(f"dataset {name!r} split {split!r} is empty")
  stream = Stream(len(reader), global_batch_size, shuffle=shuffle, seed=seed, num_epochs=num_epochs,
                  pad=not train)
  if stream.num_batches == 0:
    raise DatasetError(f"dataset {name!r} split {split!r}: {num_epochs} epoch(s) of {len(reader)} examples "
                       f"make no full global batch of {global_batch_size}")
  if worker_count:
    _absl_flags_parsed()
  return grain.DataLoader(
      data_source=BatchSource(reader, stream, process_count, spec, image_size, augment),
      sampler=BatchSampler(stream, process_count),
      operations=[PrepareBatch(spec.augment, image_size, spec.mean, spec.std, _np_dtype(dtype), seed, augment)],
      worker_count=worker_count, worker_buffer_size=worker_buffer_size,
      shard_options=grain.ShardOptions(shard_index=process_index, shard_count=process_count,
                                       drop_remainder=True),
      read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))


def _absl_flags_parsed():
  """grain's worker processes read absl flags (their defaults suffice); outside `absl.app.run` they are not
  parsed and reading them raises, so mark them parsed with their current values."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _dtype_name(dtype) -> str:
  """'float32' for 'float32', np.float32, jnp.float32, ...; the string itself when numpy does not know it."""
  try:
    return np.dtype(_np_dtype(dtype) if isinstance(dtype, str) else dtype).name
  except TypeError:
    return str(dtype)


def _np_dtype(dtype: str):
  if dtype == "bfloat16":
    import ml_dtypes  # pylint: disable=g-import-not-at-top  # ships with jax

    return ml_dtypes.bfloat16
  return np.dtype(dtype)


def make_iterator(name: str, split: Optional[str] = None, *, global_batch_size: int, train: bool, seed: int = 0,
                  image_size: Optional[int] = None, data_dir=None, num_epochs: Optional[int] = None,
                  worker_count: int = 0, process_index: Optional[int] = None,
                  process_count: Optional[int] = None, dtype: str = "float32", shuffle: Optional[bool] = None,
                  augment: Optional[bool] = None, read_threads: int = 2, prefetch: int = 4,
                  worker_buffer_size: int = 2) -> "grain_lib.DataLoaderIterator":
  """A checkpointable iterator of this host's part of each global batch of a dataset split.

  Each batch is `{'image': dtype[L, S, S, C] normalised, 'label': int32[L], 'mask': bool[L]}` with
  `L = global_batch_size / process_count` and `S = image_size`; `mask` is False only on the padding examples
  that complete the last evaluation batch. The global batches do not depend on the number of processes
  (see the module docstring), and the same seed gives the same batches, augmentation included.

  Args:
    name: dataset name (`available_datasets()`, or any tfds image-classification dataset).
    split: split name or tfds split expression; default the spec's `train_split` if `train` else `eval_split`.
    global_batch_size: examples per step over all processes; must be divisible by `process_count`.
    train: training stream (shuffled every epoch, augmented, endless by default) or evaluation pass (stored
      order, no augmentation, one padded epoch by default).
    seed: seed of the shuffles and augmentation, in [0, 2**32).
    image_size: side of the output images (default the spec's, 32 for digits / fashion_mnist / cifar).
    data_dir: tfds data directory (default `default_data_dir()`); local datasets are built there on first use.
    num_epochs: epochs in the stream; None: endless for training, 1 for evaluation.
    worker_count: grain worker processes (0: read and decode in reader threads, transform in this process;
      ImageNet-size images need workers: their decoding and cropping cost milliseconds each).
    process_index: this host's index (default `jax.process_index()`).
    process_count: number of hosts (default `jax.process_count()`).
    dtype: image dtype, ``'float32'``, ``'bfloat16'`` or ``'float16'`` (or the numpy / jax dtype).
    shuffle: override of the shuffling (default `train`).
    augment: override of the random augmentation (default `train`).
    read_threads: grain reader threads per process: each reads and decodes whole batches.
    prefetch: batches each process reads ahead.
    worker_buffer_size: batches each worker process prepares ahead.

  Returns:
    A grain `DataLoaderIterator`: `next()` gives a batch; `get_state()` / `set_state(state)` save and restore
    the position (JSON bytes), e.g. in an orbax checkpoint.

  Raises:
    DatasetError: unknown dataset, dataset not prepared, bad split, batch size not divisible by the process
      count, and other bad arguments (the message names the culprit).

  Example:
    >>> from repopt_jax import data
    >>> it = data.make_iterator('digits', global_batch_size=8, train=True, seed=0,
    ...                         process_index=0, process_count=1)  # doctest: +SKIP
    >>> next(it)['image'].shape  # doctest: +SKIP
    (8, 32, 32, 1)
  """
  return iter(make_loader(
      name, split, global_batch_size=global_batch_size, train=train, seed=seed, image_size=image_size,
      data_dir=data_dir, num_epochs=num_epochs, worker_count=worker_count, process_index=process_index,
      process_count=process_count, dtype=dtype, shuffle=shuffle, augment=augment, read_threads=read_threads,
      prefetch=prefetch, worker_buffer_size=worker_buffer_size))


def seek(iterator, batch: int, *, process_index: int, process_count: int, worker_count: int) -> None:
  """Sets an iterator of `make_iterator` to the position after `batch` global batches.

  The global batch order does not depend on the number of processes or grain workers (module docstring), so
  a run's data position follows from its step alone: this is how a checkpoint whose saved iterator state does
  not fit (written by another number of processes, or another `worker_count`) is resumed. The arguments are
  the ones the iterator was made with.
  """
  batch, p, h, w = int(batch), int(process_count), int(process_index), int(worker_count)
  if batch < 0:
    raise DatasetError(f"seek: batch must be >= 0, got {batch}")
  state = json.loads(iterator.get_state())
  if w == 0:
    state["last_seen_indices"] = {"0": batch * p + h - p}
    state["last_worker_index"] = -1
  else:
    # grain hands the host's records round-robin to its workers: worker i has read ceil((batch - i) / w).
    seen = [max(-(-(batch - i) // w), 0) for i in range(w)]
    state["last_seen_indices"] = {str(i): h + i * p + (seen[i] - 1) * p * w for i in range(w)}
    state["last_worker_index"] = (batch - 1) % w if batch else -1
  iterator.set_state(json.dumps(state).encode())


def global_batch(batch, mesh, axis: Union[str, Sequence[str]] = "data"):
  """Places a per-host batch on `mesh` as global `jax.Array`s sharded along their first dimension.

  Every process passes its own part (from `make_iterator`); the result has global leading dimension
  `local * process_count`, split over the mesh axis (or axes) `axis` with `NamedSharding(mesh, P(axis))`.

  Args:
    batch: a dict (any pytree) of numpy arrays with the same leading per-host batch dimension.
    mesh: a `jax.sharding.Mesh` covering the devices of all processes.
    axis: the mesh axis name, or a tuple of names, that the batch dimension is split over.

  Returns:
    The same structure of `jax.Array`s.

  Raises:
    DatasetError: an axis not in the mesh, or a global batch not divisible by the devices along `axis`.

  Example:
    >>> import jax
    >>> mesh = jax.make_mesh((jax.device_count(),), ('data',))
    >>> b = global_batch({'x': np.zeros((jax.device_count() * 2, 3))}, mesh)
    >>> b['x'].shape[0] == 2 * jax.device_count()
    True
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top

  axes = (axis,) if isinstance(axis, str) else tuple(axis)
  for a in axes:
    if a not in mesh.shape:
      raise DatasetError(f"mesh has no axis {a!r}; its axes are {tuple(mesh.shape)}")
  devices = int(np.prod([mesh.shape[a] for a in axes]))
  sharding = NamedSharding(mesh, PartitionSpec(axis if isinstance(axis, str) else axes))
  count = jax.process_count()

  def place(path, x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise DatasetError(f"batch entry {jax.tree_util.keystr(path)} is a scalar; it needs a batch dimension")
    global_size = x.shape[0] * count
    if global_size % devices:
      raise DatasetError(
          f"batch entry {jax.tree_util.keystr(path)}: global batch {global_size} is not divisible by the "
          f"{devices} devices along mesh axis {axis!r}")
    return jax.make_array_from_process_local_data(sharding, x, (global_size,) + x.shape[1:])

  return jax.tree_util.tree_map_with_path(place, batch)
