"""Scale files: the official torch releases (read without torch) and our portable `.npz` format.

Official files are used when present (../shared/official_scales, skipped otherwise); a torch-format zip
written here byte by byte tests the reader everywhere, independently of those files.
"""

import os
import pickletools
import struct
import zipfile

import numpy as np
import pytest

from conftest import official_scales_file
from repopt_jax import CSLAScales, ScalesError, load_scales, load_torch_scales, read_torch_state_dict, save_scales

# ---------------------------------------------------------------------------------------------------------
# A torch zip checkpoint written by hand (pickle protocol 2 opcodes), the layout `torch.save` produces.


def _str(s):
  b = s.encode()
  return b"X" + struct.pack("<I", len(b)) + b


def _int(i):
  return b"J" + struct.pack("<i", i)


def _tuple(items):
  return b"(" + b"".join(_int(i) for i in items) + b"t"


def write_torch_file(path, tensors, prefix="archive"):
  """Writes `{name: (storage_key, storage np.ndarray, offset, size, stride)}` as a torch zip state dict.

  Several names may share one storage (torch saves views that way); dtypes float32/float64 map to
  FloatStorage/DoubleStorage.
  """
  storage_type = {np.dtype(np.float32): b"FloatStorage", np.dtype(np.float64): b"DoubleStorage"}
  pkl = b"\x80\x02" + b"ccollections\nOrderedDict\n)R("
  storages = {}
  for name, (key, storage, offset, size, stride) in tensors.items():
    storages[key] = storage
    pkl += _str(name) + b"ctorch._utils\n_rebuild_tensor_v2\n("
    pkl += (b"(" + _str("storage") + b"ctorch\n" + storage_type[storage.dtype] + b"\n" + _str(str(key)) +
            _str("cpu") + _int(storage.size) + b"tQ")
    pkl += _int(offset) + _tuple(size) + _tuple(stride) + b"\x89" + b"ccollections\nOrderedDict\n)R" + b"tR"
  pkl += b"u."
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr(f"{prefix}/data.pkl", pkl)
    for key, storage in storages.items():
      z.writestr(f"{prefix}/data/{key}", np.ascontiguousarray(storage).astype(storage.dtype.newbyteorder("<"))
                 .tobytes())
    z.writestr(f"{prefix}/version", "3\n")


def official_like(path, blocks):
  """An official-style scale file: `{block: {'scale_conv': v, 'scale_1x1': v, 'scale_identity': v}}`."""
  tensors, k = {}, 0
  for block, entries in blocks.items():
    for suffix, v in entries.items():
      v = np.asarray(v, np.float32)
      tensors[f"{block}.{suffix}.weight"] = (k, v, 0, (v.size,), (1,))
      k += 1
  write_torch_file(path, tensors)
  return path


def test_reader_on_handwritten_torch_file(tmp_path):
  base = np.arange(12, dtype=np.float32) * 0.5
  tensors = {
      "a.weight": (0, base, 0, (12,), (1,)),
      "view.weight": (0, base, 2, (3,), (2,)),          # a strided view into the same storage, offset 2
      "matrix": (1, np.arange(6, dtype=np.float64), 0, (2, 3), (1, 2)),  # column-major 2x3, float64
  }
  path = str(tmp_path / "handmade.pth")
  write_torch_file(path, tensors, prefix="handmade")
  state = read_torch_state_dict(path)
  assert list(state) == ["a.weight", "view.weight", "matrix"]
  np.testing.assert_array_equal(state["a.weight"], base)
  np.testing.assert_array_equal(state["view.weight"], [1.0, 2.0, 3.0])
  assert state["matrix"].dtype == np.float64
  np.testing.assert_array_equal(state["matrix"], [[0, 2, 4], [1, 3, 5]])


def test_load_torch_scales_handwritten(tmp_path):
  rng = np.random.default_rng(0)
  v = lambda n: rng.uniform(0.1, 3, n).astype(np.float32)
  blocks = {"stage0": {"scale_1x1": v(4), "scale_conv": v(4)},
            "stage1.0": {"scale_1x1": v(6), "scale_conv": v(6)},
            "stage1.1": {"scale_1x1": v(6), "scale_conv": v(6), "scale_identity": v(6)}}
  path = official_like(str(tmp_path / "RepOpt-VGG-tiny-scales.pth"), blocks)
  scales = load_torch_scales(path)
  assert list(scales) == ["stage0", "stage1.0", "stage1.1"]
  for name, b in blocks.items():
    s = scales[name]
    np.testing.assert_array_equal(s.conv, b["scale_conv"])
    np.testing.assert_array_equal(s.pointwise, b["scale_1x1"])
    assert s.identity == ("scale_identity" in b)
    if s.identity:
      np.testing.assert_array_equal(s.identity_init, b["scale_identity"])
    else:
      assert s.identity_init is None
    assert s.extra == ()
  # load_scales dispatches a torch zip to the official reader.
  loaded, meta = load_scales(path)
  assert meta == {"source": "official", "file": "RepOpt-VGG-tiny-scales.pth"}
  for name in blocks:
    np.testing.assert_array_equal(loaded[name].conv, scales[name].conv)


# ---------------------------------------------------------------------------------------------------------
# The official release.

OFFICIAL = {
    # arch: (blocks per stage incl. stage0, widths)
    "B1": ((1, 4, 6, 16, 1), (64, 128, 256, 512, 2048)),
    "B2": ((1, 4, 6, 16, 1), (64, 160, 320, 640, 2560)),
    "L1": ((1, 8, 14, 24, 1), (64, 128, 256, 512, 2048)),
    "L2": ((1, 8, 14, 24, 1), (64, 160, 320, 640, 2560)),
}


def independent_read(path):
  """`{tensor name: float32 vector}` straight from the zip: names and storage keys from the pickle opcodes.

  In the official files each tensor's name is followed (after the 'storage' tag) by its storage key, a
  decimal string; every tensor is a whole float32 storage at offset 0.
  """
  with zipfile.ZipFile(path) as z:
    pkl_name = next(n for n in z.namelist() if n.endswith("data.pkl"))
    prefix = pkl_name[: -len("data.pkl")]
    strings = [arg for op, arg, _ in pickletools.genops(z.read(pkl_name)) if isinstance(arg, str)]
    out, pending = {}, None
    for s in strings:
      if s.endswith(".weight"):
        pending = s
      elif pending is not None and s.isdigit():
        out[pending] = np.frombuffer(z.read(f"{prefix}data/{s}"), "<f4")
        pending = None
  return out


@pytest.mark.parametrize("arch", list(OFFICIAL))
def test_official_vgg_scales(arch):
  path = official_scales_file(f"RepOpt-VGG-{arch}-scales.pth")
  scales = load_torch_scales(path)
  counts, widths = OFFICIAL[arch]
  expected = ["stage0"] + [f"stage{i}.{j}" for i in range(1, 5) for j in range(counts[i])]
  assert list(scales) == expected
  for name, s in scales.items():
    stage, j = (0, 0) if name == "stage0" else map(int, name[len("stage"):].split("."))
    assert isinstance(s, CSLAScales)
    assert s.num_channels == widths[stage], name
    assert s.pointwise is not None and np.shape(s.pointwise) == (widths[stage],), name
    has_identity = stage in (1, 2, 3) and j > 0
    assert s.identity == has_identity, name
    assert (s.identity_init is not None) == has_identity, name
    for v in (s.conv, s.pointwise) + ((s.identity_init,) if has_identity else ()):
      assert np.all(np.isfinite(v)), name
  raw = independent_read(path)
  assert len(raw) == sum(3 if s.identity else 2 for s in scales.values())
  for name, s in scales.items():
    np.testing.assert_array_equal(s.conv, raw[f"{name}.scale_conv.weight"])
    np.testing.assert_array_equal(s.pointwise, raw[f"{name}.scale_1x1.weight"])
    if s.identity:
      np.testing.assert_array_equal(s.identity_init, raw[f"{name}.scale_identity.weight"])
  # Hyper-Search moves the scales away from their initial values (1 and sqrt(2/i)).
  assert np.std(scales["stage3.5"].conv) > 1e-3
  loaded, meta = load_scales(path)
  assert meta["source"] == "official" and list(loaded) == expected
  np.testing.assert_array_equal(loaded["stage4.0"].conv, scales["stage4.0"].conv)


def test_official_ghostnet_file():
  """Other key names: the generic reader reads it; the RepOpt-VGG reader refuses it, naming the entry."""
  path = official_scales_file("RepOptGhostNet_0_5x_scales.pth")
  state = read_torch_state_dict(path)
  raw = independent_read(path)
  assert set(state) == set(raw) and len(state) == 64
  for k, v in state.items():
    assert v.ndim == 1 and v.dtype == np.float32 and np.all(np.isfinite(v)), k
    np.testing.assert_array_equal(v, raw[k])
  assert state["blocks.0.0.ghost1.fusion_scale.weight"].shape == (4,)
  with pytest.raises(ScalesError, match=r"RepOptGhostNet_0_5x_scales\.pth.*'blocks\.0\.0\.ghost1\.fusion_scale"):
    load_torch_scales(path)


# ---------------------------------------------------------------------------------------------------------
# Our portable format.


def test_npz_round_trip(tmp_path):
  rng = np.random.default_rng(1)
  v = lambda n: rng.normal(0, 1, n).astype(np.float32)
  scales = {
      "stage0": CSLAScales(conv=v(4), pointwise=v(4)),
      "stage1.1": CSLAScales(conv=v(6), pointwise=v(6), identity=True, identity_init=v(6)),
      "stage1.2": CSLAScales(conv=v(6), identity=True),  # identity without trained gamma, no 1x1
      "acnet": CSLAScales(conv=v(3), extra=(((1, 3), v(3)), ((3, 1), v(3)))),
      "big": CSLAScales(conv=v(5), pointwise=v(5), extra=(((3, 3), v(5)),)),
  }
  meta = {"arch": "tiny", "source": "hs", "epochs": 240, "lr": 0.1, "nested": {"seeds": [0, 1], "ok": True}}
  path = str(tmp_path / "sub" / "scales.npz")
  save_scales(path, scales, meta)
  save_scales(path, scales, meta)  # overwriting an existing file is fine
  assert sorted(os.listdir(tmp_path / "sub")) == ["scales.npz"]  # no temporary file left behind
  loaded, loaded_meta = load_scales(path)
  assert loaded_meta == meta
  assert list(loaded) == list(scales)
  for name, s in scales.items():
    t = loaded[name]
    np.testing.assert_array_equal(t.conv, s.conv)
    for attr in ("pointwise", "identity_init"):
      a, b = getattr(s, attr), getattr(t, attr)
      assert (a is None) == (b is None), (name, attr)
      if a is not None:
        np.testing.assert_array_equal(b, a)
    assert t.identity == s.identity
    assert [hw for hw, _ in t.extra] == [hw for hw, _ in s.extra]
    for (_, a), (_, b) in zip(s.extra, t.extra):
      np.testing.assert_array_equal(b, a)


def test_npz_round_trip_official(tmp_path):
  """An official file converted to npz reads back identical, with the metadata we attach."""
  scales = load_torch_scales(official_scales_file("RepOpt-VGG-B1-scales.pth"))
  path = str(tmp_path / "b1.npz")
  save_scales(path, scales, {"arch": "B1", "source": "official"})
  loaded, meta = load_scales(path)
  assert meta == {"arch": "B1", "source": "official"} and list(loaded) == list(scales)
  for name, s in scales.items():
    np.testing.assert_array_equal(loaded[name].conv, s.conv)
    np.testing.assert_array_equal(loaded[name].pointwise, s.pointwise)
    assert loaded[name].identity == s.identity
    if s.identity:
      np.testing.assert_array_equal(loaded[name].identity_init, s.identity_init)
