"""Stock tfds datasets through the same pipeline: mocked CIFAR-100, a PNG-encoded dataset, and what can go wrong."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from repopt_jax import data

_RNG = np.random.default_rng(0)
_PNG_IMAGES = {"train": _RNG.integers(0, 256, (20, 6, 6, 3), dtype=np.uint8),
               "test": _RNG.integers(0, 256, (7, 6, 6, 3), dtype=np.uint8)}
_PNG_LABELS = {"train": np.arange(20) % 3, "test": np.arange(7) % 3}


class RepoptTestPngShapes(data.ArrayImageBuilder):
  """A small stock-like dataset: PNG-encoded RGB `Image` features, as cifar/imagenet store them."""

  VERSION = tfds.core.Version("1.0.0")
  IMAGE_SHAPE = (6, 6, 3)
  IMAGE_ENCODING = "png"
  CLASS_NAMES = ("a", "b", "c")

  def _arrays(self, dl_manager):
    return {s: (_PNG_IMAGES[s], _PNG_LABELS[s]) for s in _PNG_IMAGES}


@pytest.fixture(scope="module")
def png_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds_png")
  builder = RepoptTestPngShapes(data_dir=str(d), file_format="array_record")
  assert builder.num_shards() == 1  # 20 and 7 examples: one file per split
  builder.prepare()
  return str(d)


def _iter(name, **kw):
  args = dict(global_batch_size=8, train=True, seed=0, process_index=0, process_count=1)
  args.update(kw)
  return data.make_iterator(name, **args)


def test_mock_cifar100_pipeline(tmp_path):
  spec = data.dataset_info("cifar100")
  with tfds.testing.mock_data(num_examples=40):
    source = tfds.data_source("cifar100", split="train", data_dir=str(tmp_path), download=False)
    stored = np.stack([source[i]["image"] for i in range(8)])
    stored_labels = np.array([source[i]["label"] for i in range(8)])
    it = _iter("cifar100", data_dir=tmp_path, global_batch_size=16, seed=1)
    batches = [next(it) for _ in range(3)]
    plain = next(_iter("cifar100", data_dir=tmp_path, shuffle=False, augment=False))
    ev = list(_iter("cifar100", data_dir=tmp_path, train=False, global_batch_size=16))
    # Mock sources hand out decoded examples only: the reader falls back to them.
    assert not data.ExampleReader(spec, "train", tmp_path).parses_records
  for b in batches:
    assert b["image"].shape == (16, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["label"].min() >= 0 and b["label"].max() < 100
  # Without shuffling and augmentation the images are the stored ones, normalised per channel.
  ref = (stored / 255.0 - np.asarray(spec.mean)) / np.asarray(spec.std)
  np.testing.assert_allclose(plain["image"], ref, atol=1e-5)
  np.testing.assert_array_equal(plain["label"], stored_labels)
  assert len(ev) == 3 and sum(int(b["mask"].sum()) for b in ev) == 40


def test_png_dataset_decoded_without_tensorflow(png_dir):
  """Any prepared tfds image-classification dataset: PNG decoded by tfds's numpy path, generic spec."""
  spec = data.dataset_info("repopt_test_png_shapes", data_dir=png_dir)
  assert (spec.num_classes, spec.image_shape, spec.image_size) == (3, (6, 6, 3), 6)
  assert dict(spec.splits) == {"train": 20, "test": 7} and spec.augment == "pad_crop_flip"
  reader = data.ExampleReader(spec, "test", png_dir)
  assert reader.parses_records  # serialized records parsed, PNG decoded by tfds's numpy decoder
  batches = list(_iter("repopt_test_png_shapes", data_dir=png_dir, train=False, global_batch_size=4))
  mask = np.concatenate([b["mask"] for b in batches])
  images = np.concatenate([b["image"] for b in batches])[mask]
  labels = np.concatenate([b["label"] for b in batches])[mask]
  pixels = np.rint((images * 0.5 + 0.5) * 255).astype(np.uint8)  # mean = std = 0.5 for unknown datasets
  got = sorted((int(l), p.tobytes()) for p, l in zip(pixels, labels))
  want = sorted((int(l), p.tobytes()) for p, l in zip(_PNG_IMAGES["test"], _PNG_LABELS["test"]))
  assert got == want  # PNG is lossless: exactly the original pixels
  assert "tensorflow" not in __import__("sys").modules
  train = next(_iter("repopt_test_png_shapes", data_dir=png_dir, image_size=12))
  assert train["image"].shape == (8, 12, 12, 3)


def test_unknown_dataset_lists_known_ones(tmp_path):
  with pytest.raises(data.DatasetError) as e:
    data.dataset_info("cifar1000", data_dir=tmp_path)
  msg = str(e.value)
  assert "unknown dataset 'cifar1000'" in msg and "digits, fashion_mnist, cifar10, cifar100, imagenet2012" in msg
  assert "\n" not in msg
  with pytest.raises(data.DatasetError, match="unknown dataset 'nope'"):
    _iter("nope", data_dir=tmp_path)
  with pytest.raises(data.DatasetError, match="not an image-classification dataset"):
    data.dataset_info("imdb_reviews", data_dir=tmp_path)


def test_stock_dataset_not_prepared_says_how(tmp_path):
  with pytest.raises(data.DatasetError) as e:
    _iter("cifar100", data_dir=tmp_path)
  msg = str(e.value)
  assert "'cifar100' is not prepared in" in msg and str(tmp_path) in msg and "\n" not in msg
  assert "repopt_jax[prepare]" in msg and "file_format='array_record'" in msg and "download_and_prepare" in msg
  assert not os.path.exists(os.path.join(tmp_path, "cifar100"))  # nothing downloaded or created
  with pytest.raises(data.DatasetError) as e:
    _iter("imagenet2012", data_dir=tmp_path, train=False)
  assert "ILSVRC2012_img_train.tar" in str(e.value) and os.path.join("downloads", "manual") in str(e.value)


def test_dataset_prepared_without_random_access(png_dir, tmp_path):
  """A dataset prepared as tfrecord (tfds's default) cannot be read by index: say to re-prepare it."""
  shutil.copytree(os.path.join(png_dir, "repopt_test_png_shapes"), tmp_path / "repopt_test_png_shapes")
  info_path = tmp_path / "repopt_test_png_shapes" / "1.0.0" / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(info))
  with pytest.raises(data.DatasetError, match="as tfrecord, which has no random access: prepare it again"):
    _iter("repopt_test_png_shapes", data_dir=tmp_path)


def _smooth(h, w, k):
  """A smooth colour image (sub-pixel differences between resampling methods stay small)."""
  y, x = np.mgrid[0:h, 0:w] / max(h, w)
  chans = [np.sin(2 * np.pi * (x * (k + 1) + y * c)) for c in (0.5, 1.0, 1.5)]
  return np.rint(127.5 + 100 * np.stack(chans, -1)).astype(np.uint8)


# Sizes whose evaluation crop falls on whole pixels of the resized image (shorter side 36, 54, 72 -> 18).
_VAR_IMAGES = [_smooth(h, w, k) for k, (h, w) in enumerate(((36, 52), (90, 54), (72, 72), (54, 90)))]


class RepoptTestVariableSizes(data.ArrayImageBuilder):
  """Images of different sizes, as ImageNet: Inception crop for training, centre crop for evaluation."""

  VERSION = tfds.core.Version("1.0.0")
  IMAGE_SHAPE = (None, None, 3)
  IMAGE_ENCODING = "png"
  CLASS_NAMES = ("a", "b")

  def _arrays(self, dl_manager):
    return {"train": (_VAR_IMAGES, [0, 1, 0, 1]), "test": (_VAR_IMAGES, [0, 1, 0, 1])}


def test_imagenet_style_crops(tmp_path):
  RepoptTestVariableSizes(data_dir=str(tmp_path), file_format="array_record").prepare()
  spec = data.dataset_info("repopt_test_variable_sizes", data_dir=tmp_path)
  assert spec.augment == "inception_crop_flip" and spec.image_size == 224
  ev = next(_iter("repopt_test_variable_sizes", data_dir=tmp_path, train=False, global_batch_size=4,
                  image_size=16))
  got = np.rint((ev["image"] * 0.5 + 0.5) * 255).reshape(4, -1)
  # Independent reference: resize the shorter side to round(16 / 0.875) = 18 with PIL, centre-crop 16.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  want = []
  for im in _VAR_IMAGES:
    h, w = im.shape[:2]
    s = 18 / min(h, w)
    r = np.asarray(Image.fromarray(im).resize((round(w * s), round(h * s)), Image.BILINEAR))
    top, left = (r.shape[0] - 16) // 2, (r.shape[1] - 16) // 2
    want.append(r[top:top + 16, left:left + 16].reshape(-1).astype(float))
  # Stored order is tfds's: match each output to its closest reference, one to one.
  dist = np.array([[np.abs(g - w).mean() for w in want] for g in got])
  assert sorted(dist.argmin(axis=1).tolist()) == [0, 1, 2, 3]
  assert dist.min(axis=1).max() < 0.5  # grey levels: one resample of the box = resize-then-crop here
  assert np.sort(dist, axis=1)[:, 1].min() > 10.0  # and far from the other images
  tr = [next(_iter("repopt_test_variable_sizes", data_dir=tmp_path, global_batch_size=4, image_size=16, seed=s))
        for s in (0, 1)]
  assert tr[0]["image"].shape == (4, 16, 16, 3)
  assert not np.allclose(tr[0]["image"], tr[1]["image"])


def test_random_resized_crop_box_bounds():
  from repopt_jax.data.transforms import random_resized_crop_box  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  areas, ratios = [], []
  for h, w in ((100, 100), (50, 200), (300, 30)):
    for _ in range(200):
      left, top, right, bottom = random_resized_crop_box(h, w, rng)
      assert 0 <= left < right <= w and 0 <= top < bottom <= h
      areas.append((right - left) * (bottom - top) / (h * w))
      ratios.append((right - left) / (bottom - top))
  areas, ratios = np.array(areas), np.array(ratios)
  assert areas.min() >= 0.08 - 0.02 and areas.max() <= 1.0
  # Square image: area ~ U(0.08, 1), so P(area < 0.3) ~ 0.24; aspect ratios within [3/4, 4/3] (+ rounding).
  assert 0.12 < np.mean(areas[:200] < 0.3) < 0.36
  assert ratios[:200].min() >= 0.75 * 0.95 and ratios[:200].max() <= 4 / 3 * 1.05
  # Very elongated images mostly fall back to the centred crop with the ratio clamped into [3/4, 4/3].
  assert np.all((ratios >= 0.75 * 0.95) & (ratios <= 4 / 3 * 1.05))
