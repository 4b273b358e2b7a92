"""The locally built datasets: idx files, the digits split, the Fashion-MNIST builder (on small fake idx files)."""

import gzip
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from repopt_jax import data
from repopt_jax.data import local


def _write_idx(path, array, gz):
  """An idx file written independently of the reader: magic (0, 0, 0x08, ndim), big-endian int32 dims, data."""
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
  raw = header + array.tobytes()
  opener = gzip.open if gz else open
  with opener(str(path) + (".gz" if gz else ""), "wb") as f:
    f.write(raw)


def _fake_fashion(folder, n_train=24, n_test=10, gz=True, seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    _write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), images, gz)
    _write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), labels, gz)
    out["train" if prefix == "train" else "test"] = (images, labels)
  return out


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
  a = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
  _write_idx(tmp_path / "a", a, gz)
  got = local.read_idx(str(tmp_path / "a") + (".gz" if gz else ""))
  assert got.dtype == np.uint8 and got.shape == (2, 3, 5)
  np.testing.assert_array_equal(got, a)


def test_read_idx_rejects_bad_files(tmp_path):
  (tmp_path / "magic").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
  with pytest.raises(data.DatasetError, match="magic"):
    local.read_idx(tmp_path / "magic")
  a = np.zeros((4, 3), np.uint8)
  _write_idx(tmp_path / "short", a, gz=False)
  raw = (tmp_path / "short").read_bytes()
  (tmp_path / "short").write_bytes(raw[:-2])
  with pytest.raises(data.DatasetError, match=r"short: idx file has 22 bytes, its header \(4, 3\) needs 24"):
    local.read_idx(tmp_path / "short")
  (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
  with pytest.raises(data.DatasetError, match="bad.gz: cannot read"):
    local.read_idx(tmp_path / "bad.gz")


def test_fashion_source_dir_lookup(tmp_path, monkeypatch):
  _fake_fashion(tmp_path, gz=False)
  assert data.fashion_mnist_source_dir(tmp_path) == str(tmp_path)
  monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
  assert data.fashion_mnist_source_dir() == str(tmp_path)
  os.remove(tmp_path / "t10k-labels-idx1-ubyte")
  with pytest.raises(data.DatasetError, match="apt-get install dataset-fashion-mnist"):
    data.fashion_mnist_source_dir(tmp_path)
  # An explicit $FASHION_MNIST_DIR without the files is an error, not a silent fallback to another copy.
  with pytest.raises(data.DatasetError, match=r"are not in \$FASHION_MNIST_DIR="):
    data.fashion_mnist_source_dir()


def test_fashion_idx_inconsistent_labels(tmp_path):
  _fake_fashion(tmp_path, gz=False)
  _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, np.uint8), gz=False)
  with pytest.raises(data.DatasetError, match=r"train-labels-idx1-ubyte: \(5,\) labels for 24 images"):
    data.load_fashion_mnist_idx(str(tmp_path))


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_builder_from_fake_idx(tmp_path, gz, monkeypatch):
  src = tmp_path / "idx"
  src.mkdir()
  arrays = _fake_fashion(src, gz=gz, seed=int(gz))
  data_dir = tmp_path / "tfds"
  # Files of ~10 records: 3 per split here (the real one gets 60 of ~1,000); reading spans the files.
  monkeypatch.setattr(local.RepoptFashionMnist, "RECORDS_PER_SHARD", 10)
  path = data.prepare_local("fashion_mnist", data_dir=data_dir, source_dir=src)
  assert os.path.isfile(os.path.join(path, "dataset_info.json"))
  assert len([f for f in os.listdir(path) if "-train.array_record-" in f]) == 3
  for split, (images, labels) in arrays.items():
    ds = tfds.data_source("repopt_fashion_mnist", split=split, data_dir=str(data_dir), download=False)
    assert len(ds) == len(labels)
    # tfds shuffles the stored order by key hash: compare as sets of (label, pixels).
    got = sorted((int(ex["label"]), ex["image"].tobytes()) for ex in (ds[i] for i in range(len(ds))))
    want = sorted((int(l), im[..., None].tobytes()) for im, l in zip(images, labels))
    assert got == want
    assert ds[0]["image"].shape == (28, 28, 1) and ds[0]["image"].dtype == np.uint8
  # Built once: a second call neither needs the source files nor rebuilds.
  assert data.prepare_local("fashion_mnist", data_dir=data_dir, source_dir=tmp_path / "nowhere") == path


def test_digits_arrays_split_and_statistics():
  d = local.digits_arrays()
  (xtr, ytr), (xte, yte) = d["train"], d["test"]
  assert xtr.shape == (1437, 8, 8) and xte.shape == (360, 8, 8) and xtr.dtype == np.uint8
  assert xtr.max() == 255 and xtr.min() == 0
  # Stratified: every class has 20% +- 1 example of its images in the test split.
  counts_all = np.bincount(np.concatenate([ytr, yte]), minlength=10)
  counts_test = np.bincount(yte, minlength=10)
  assert np.all(np.abs(counts_test - 0.2 * counts_all) <= 1.0)
  # The split is a fixed function of the seed, and disjoint: the 1,797 images are all used once.
  again = local.digits_arrays()
  np.testing.assert_array_equal(again["test"][1], yte)
  assert len(ytr) + len(yte) == 1797
  # The spec's normalisation constants are the training split's pixel statistics.
  spec = data.dataset_info("digits")
  assert abs(xtr.mean() / 255 - spec.mean[0]) < 2e-3
  assert abs((xtr / 255).std() - spec.std[0]) < 2e-3


def test_prepare_local_rejects_other_names(tmp_path):
  with pytest.raises(data.DatasetError, match="'cifar10' is not a locally built dataset"):
    data.prepare_local("cifar10", data_dir=tmp_path)


def test_debian_fashion_mnist_statistics():
  """On a machine with Debian's dataset-fashion-mnist, the spec's statistics match the real training set."""
  if not os.path.isdir(local.DEBIAN_FASHION_MNIST_DIR):
    pytest.skip("dataset-fashion-mnist is not installed")
  arrays = data.load_fashion_mnist_idx(local.DEBIAN_FASHION_MNIST_DIR)
  images, labels = arrays["train"]
  assert images.shape == (60000, 28, 28) and arrays["test"][0].shape == (10000, 28, 28)
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 6000))
  spec = data.dataset_info("fashion_mnist")
  hist = np.bincount(images.ravel(), minlength=256) / images.size  # cheap exact moments
  v = np.arange(256) / 255.0
  mean = (hist * v).sum()
  std = np.sqrt((hist * (v - mean) ** 2).sum())
  assert abs(mean - spec.mean[0]) < 1e-3 and abs(std - spec.std[0]) < 1e-3


def test_concurrent_first_use_builds_once(tmp_path):
  """Two users of a fresh data_dir at once (e.g. pytest-xdist workers): one builds, the other waits."""
  import threading  # pylint: disable=g-import-not-at-top

  results, errors = [], []

  def use():
    try:
      results.append(data.prepare_local("digits", data_dir=tmp_path))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=use) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and len(results) == 2 and results[0] == results[1]
  ds = tfds.data_source("repopt_digits", split="test", data_dir=str(tmp_path), download=False)
  assert len(ds) == 360
  assert [d for d in os.listdir(os.path.join(tmp_path, "repopt_digits")) if d != "1.0.0"] == []
