"""The grain pipeline on the embedded digits dataset: batches, determinism, augmentation, resume, sharding."""

import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from repopt_jax import data

G = 32  # global batch of most tests


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  data.prepare_local("digits", data_dir=d)
  return str(d)


def _it(data_dir, **kw):
  args = dict(global_batch_size=G, train=True, seed=0, data_dir=data_dir, process_index=0, process_count=1)
  args.update(kw)
  return data.make_iterator("digits", **args)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in ("image", "label", "mask"))


def _stored(data_dir, split):
  """The stored images/labels of a split, read straight from tfds (no grain)."""
  ds = tfds.data_source("repopt_digits", split=split, data_dir=data_dir, download=False)
  examples = [ds[i] for i in range(len(ds))]
  return np.stack([e["image"] for e in examples]), np.array([e["label"] for e in examples])


def test_spec_and_available():
  names = data.available_datasets()
  assert names[:2] == ["digits", "fashion_mnist"] and {"cifar10", "cifar100", "imagenet2012"} <= set(names)
  spec = data.dataset_info("digits")
  assert (spec.num_classes, spec.image_shape, spec.image_size) == (10, (8, 8, 1), 32)
  assert dict(spec.splits) == {"train": 1437, "test": 360} and spec.augment == "pad_crop"
  assert data.dataset_info("cifar100").num_classes == 100
  assert data.dataset_info("imagenet2012").augment == "inception_crop_flip"


def test_train_batches_shapes_dtypes_labels(data_dir):
  batches = _take(_it(data_dir), 3)
  for b in batches:
    assert set(b) == {"image", "label", "mask"}
    assert b["image"].shape == (G, 32, 32, 1) and b["image"].dtype == np.float32
    assert b["label"].shape == (G,) and b["label"].dtype == np.int32
    assert b["mask"].all()
    assert b["label"].min() >= 0 and b["label"].max() <= 9
  labels = np.concatenate([b["label"] for b in batches])
  assert len(np.unique(labels)) >= 8  # shuffled: not one class at a time
  bf = next(_it(data_dir, dtype="bfloat16"))
  assert bf["image"].dtype.name == "bfloat16"
  small = next(_it(data_dir, image_size=16))
  assert small["image"].shape == (G, 16, 16, 1)


def test_eval_pass_is_exact_and_matches_stored_images(data_dir):
  spec = data.dataset_info("digits")
  batches = list(_it(data_dir, train=False, global_batch_size=64))
  assert len(batches) == 6  # ceil(360 / 64)
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 360 and not mask[360:].any() and mask[:360].all()
  images = np.concatenate([b["image"] for b in batches])[:360]
  labels = np.concatenate([b["label"] for b in batches])[:360]
  stored, stored_labels = _stored(data_dir, "test")
  np.testing.assert_array_equal(labels, stored_labels)  # evaluation keeps the stored order
  # Independent reference: PIL's bilinear resize of the stored 8x8 images, then (x/255 - mean) / std.
  ref = np.stack([np.asarray(Image.fromarray(im[..., 0]).resize((32, 32), Image.BILINEAR)) for im in stored])
  ref = (ref[..., None] / 255.0 - spec.mean[0]) / spec.std[0]
  np.testing.assert_allclose(images, ref, atol=1.01 / 255 / spec.std[0])
  # Normalisation: the stored pixels' statistics map to ~0 mean (resizing keeps the mean).
  assert abs(images.mean()) < 0.1
  # A tfds split expression works too.
  half = list(_it(data_dir, split="test[:50%]", train=False, global_batch_size=64))
  assert sum(int(b["mask"].sum()) for b in half) == 180


def test_reader_parses_records_like_tfds(data_dir):
  reader = data.ExampleReader(data.dataset_info("digits"), "train", data_dir)
  assert reader.parses_records and len(reader) == 1437
  stored, labels = _stored(data_dir, "train")
  for k in (0, 1, 700, 1436):
    image, label = reader[k]
    assert image.dtype == np.uint8 and image.shape == (8, 8, 1) and label == labels[k]
    np.testing.assert_array_equal(image, stored[k])


def test_same_seed_same_batches_different_seed_differs(data_dir):
  a, b = _take(_it(data_dir, seed=7), 3), _take(_it(data_dir, seed=7), 3)
  assert _equal(a, b)
  c = _take(_it(data_dir, seed=8), 3)
  assert not np.array_equal(a[0]["label"], c[0]["label"])
  assert not np.allclose(a[0]["image"], c[0]["image"])


def test_augmentation_is_a_pad_crop_of_the_eval_image(data_dir):
  """Same order (no shuffle): each augmented image is the eval image shifted by <= 4 px, zero-filled."""
  spec = data.dataset_info("digits")
  aug = next(_it(data_dir, shuffle=False, global_batch_size=64))
  plain = next(_it(data_dir, shuffle=False, augment=False, global_batch_size=64))
  again = next(_it(data_dir, shuffle=False, augment=False, global_batch_size=64, seed=5))
  np.testing.assert_array_equal(plain["image"], again["image"])  # no randomness without augmentation
  np.testing.assert_array_equal(aug["label"], plain["label"])
  fill = -spec.mean[0] / spec.std[0]
  shifts = []
  for x, y in zip(aug["image"], plain["image"]):
    padded = np.pad(y, ((4, 4), (4, 4), (0, 0)), constant_values=fill)
    found = [(dy, dx) for dy in range(9) for dx in range(9)
             if np.allclose(padded[dy:dy + 32, dx:dx + 32], x, atol=1e-5)]
    assert found, "augmented image is no unflipped pad-crop of the original"  # digits are never flipped
    shifts.append(found[0])
  assert len(set(shifts)) > 10  # offsets vary across examples
  assert not np.allclose(aug["image"], plain["image"])


def test_checkpoint_state_resumes_exactly(data_dir):
  # 1437 / 32: the restored stream crosses the epoch boundary (after batch 44), with a new permutation.
  it = _it(data_dir, seed=3)
  _take(it, 42)
  state = it.get_state()
  assert isinstance(state, bytes) and json.loads(state)["last_seen_indices"]
  following = _take(it, 6)
  fresh = _it(data_dir, seed=3)
  fresh.set_state(state)
  assert _equal(_take(fresh, 6), following)
  # A state of another stream (other seed) is refused rather than silently misapplied.
  with pytest.raises(ValueError, match="Sampler"):
    _it(data_dir, seed=4).set_state(state)


def test_two_hosts_read_disjoint_slices_of_the_same_global_batches(data_dir):
  full = _take(_it(data_dir, seed=1), 4)
  h0 = _take(_it(data_dir, seed=1, process_index=0, process_count=2), 4)
  h1 = _take(_it(data_dir, seed=1, process_index=1, process_count=2), 4)
  for f, a, b in zip(full, h0, h1):
    assert a["image"].shape[0] == G // 2
    np.testing.assert_array_equal(np.concatenate([a["image"], b["image"]]), f["image"])
    np.testing.assert_array_equal(np.concatenate([a["label"], b["label"]]), f["label"])
  # One epoch of record keys, split over 2 hosts: disjoint and covering.
  stream = data.Stream(1437, G, shuffle=True, seed=1, num_epochs=None, pad=False)
  steps = 1437 // G
  keys = {h: np.concatenate([stream.record_keys(stream.batch_positions(b, h, 2)) for b in range(steps)])
          for h in (0, 1)}
  assert not set(keys[0]) & set(keys[1])
  assert len(set(keys[0]) | set(keys[1])) == steps * G
  epoch1, epoch2 = stream.record_keys(np.arange(1437)), stream.record_keys(np.arange(1437, 2 * 1437))
  assert sorted(epoch2) == list(range(1437)) and not np.array_equal(epoch1, epoch2)  # a new order each epoch
  # A host resumes its own part from its own state.
  it = _it(data_dir, seed=1, process_index=1, process_count=2)
  _take(it, 3)
  state = it.get_state()
  nxt = _take(it, 2)
  again = _it(data_dir, seed=1, process_index=1, process_count=2)
  again.set_state(state)
  assert _equal(_take(again, 2), nxt)


def test_two_hosts_evaluate_every_example_once(data_dir):
  parts = [list(_it(data_dir, train=False, global_batch_size=48, process_index=h, process_count=2))
           for h in (0, 1)]
  assert len(parts[0]) == len(parts[1]) == 8  # ceil(360 / 48): same step count on every host
  got = sorted((int(l), im.tobytes()) for p in parts for b in p
               for im, l, m in zip(b["image"], b["label"], b["mask"]) if m)
  single = list(_it(data_dir, train=False, global_batch_size=48))
  want = sorted((int(l), im.tobytes()) for b in single for im, l, m in zip(b["image"], b["label"], b["mask"]) if m)
  assert len(got) == 360 and got == want


def test_finite_epochs_end(data_dir):
  batches = list(_it(data_dir, num_epochs=1, global_batch_size=100))
  assert len(batches) == 14  # floor(1437 / 100): an incomplete global batch is dropped


def test_global_batch_on_8_device_mesh(data_dir):
  assert jax.device_count() == 8
  b = next(_it(data_dir))
  mesh = jax.make_mesh((8,), ("data",))
  g = data.global_batch(b, mesh)
  assert g["image"].shape == (G, 32, 32, 1) and g["label"].shape == (G,)
  assert g["image"].sharding == NamedSharding(mesh, PartitionSpec("data"))
  shards = g["image"].addressable_shards
  assert len(shards) == 8 and all(s.data.shape == (G // 8, 32, 32, 1) for s in shards)
  np.testing.assert_array_equal(np.asarray(g["image"]), b["image"])
  np.testing.assert_array_equal(np.asarray(g["label"]), b["label"])
  mesh2 = jax.make_mesh((4, 2), ("data", "model"))
  g2 = data.global_batch(b, mesh2, axis=("data", "model"))
  assert all(s.data.shape[0] == G // 8 for s in g2["label"].addressable_shards)
  with pytest.raises(data.DatasetError, match="global batch 12 is not divisible by the 8 devices"):
    data.global_batch({"x": np.zeros((12, 2))}, mesh)
  with pytest.raises(data.DatasetError, match="mesh has no axis 'batch'"):
    data.global_batch(b, mesh, axis="batch")


def test_bad_arguments(data_dir):
  with pytest.raises(data.DatasetError, match="global_batch_size 30 is not divisible by the process count 4"):
    _it(data_dir, global_batch_size=30, process_index=0, process_count=4)
  with pytest.raises(data.DatasetError, match="process_index 2 must be < process_count 2"):
    _it(data_dir, process_index=2, process_count=2)
  with pytest.raises(data.DatasetError, match="seed must be an integer >= 0"):
    _it(data_dir, seed=-1)
  with pytest.raises(data.DatasetError, match="dtype must be one of"):
    _it(data_dir, dtype="int8")
  with pytest.raises(data.DatasetError, match="global_batch_size must be an integer >= 1"):
    _it(data_dir, global_batch_size=0)
  with pytest.raises(data.DatasetError, match="has no split 'validation'; its splits are test, train"):
    data.make_iterator("digits", "validation", global_batch_size=8, train=False, data_dir=data_dir,
                       process_index=0, process_count=1)
  with pytest.raises(data.DatasetError, match="make no full global batch of 2000"):
    _it(data_dir, num_epochs=1, global_batch_size=2000)


def test_worker_processes_give_the_same_batches(data_dir):
  a = _take(_it(data_dir, seed=2), 2)
  it = _it(data_dir, seed=2, worker_count=1)
  b = _take(it, 2)
  assert _equal(a, b)


@pytest.mark.parametrize("src,dst,c", [(28, 32, 1), (64, 24, 3), (32, 32, 3), (17, 40, 1)])
def test_resize_batch_matches_pil_bilinear(src, dst, c):
  from repopt_jax.data.transforms import resize_batch  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(src).integers(0, 256, (3, src, src, c), dtype=np.uint8)
  got = resize_batch(x, (dst, dst))
  assert got.shape == (3, dst, dst, c) and got.dtype == np.uint8
  for g, im in zip(got, x):
    ref = np.asarray(Image.fromarray(im[..., 0] if c == 1 else im).resize((dst, dst), Image.BILINEAR))
    diff = np.abs(g.reshape(ref.shape).astype(int) - ref)
    assert diff.max() <= 1 and diff.mean() < 0.3  # PIL rounds in fixed point


def test_counter_based_uniform_numbers():
  from repopt_jax.data.transforms import uniform  # pylint: disable=g-import-not-at-top
  pos = np.arange(200_000)
  u = uniform(3, pos, 0)
  assert u.min() >= 0 and u.max() < 1
  assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
  np.testing.assert_array_equal(np.histogram(u, 10)[0] > 19_000, True)  # flat to 5%
  for other in (uniform(3, pos, 1), uniform(4, pos, 0), uniform(3, pos + 1, 0)):
    assert abs(np.corrcoef(u, other)[0, 1]) < 0.01  # draws, seeds and neighbours are independent
  np.testing.assert_array_equal(uniform(3, pos[::7], 0), u[::7])  # a function of (seed, position, draw) only
