"""Bad input to the core: one clear `ScalesError` that names the culprit (parameter path, file, block)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import official_scales_file
from repopt_jax import (CSLAScales, ScalesError, csla_init, grad_mult, load_scales, load_torch_scales,
                        read_torch_state_dict, repopt_adamw, repopt_masks, repopt_sgd, save_scales)
from test_scales_files import official_like, write_torch_file


def params():
  return {"stem": {"conv": {"kernel": jnp.zeros((3, 3, 3, 8))}, "bn": {"scale": jnp.ones(8)}},
          "block1": {"conv": {"kernel": jnp.zeros((3, 3, 8, 8))}, "bn": {"scale": jnp.ones(8)}}}


def good_scales():
  v = lambda: np.full(8, 0.5, np.float32)
  return {"stem": {"conv": {"kernel": CSLAScales(conv=v(), pointwise=v())}, "bn": {"scale": None}},
          "block1": {"conv": {"kernel": CSLAScales(conv=v(), pointwise=v(), identity=True)}, "bn": {"scale": None}}}


OPTIMIZERS = {
    "repopt_sgd": lambda s: repopt_sgd(0.1, s),
    "repopt_adamw": lambda s: repopt_adamw(1e-3, s),
    "repopt_adamw_paper": lambda s: repopt_adamw(1e-3, s, exact=False),
    "repopt_masks": lambda s: repopt_masks(s),
}


@pytest.fixture(params=list(OPTIMIZERS))
def make_tx(request):
  return OPTIMIZERS[request.param]


def test_good_scales_accepted(make_tx):
  tx = make_tx(good_scales())
  p = params()
  state = tx.init(p)
  updates, _ = tx.update(p, state, p)
  assert set(updates) == {"stem", "block1"}


def test_missing_key_is_no_grad_mult(make_tx):
  """A parameter without an entry is one without Grad Mult: the same updates as with `None` there."""
  s = good_scales()
  del s["block1"]["bn"]
  p = params()
  g = jax.tree.map(lambda x: jnp.full_like(x, 0.5), p)
  tx, ref = make_tx(s), make_tx(good_scales())
  got, _ = tx.update(g, tx.init(p), p)
  want, _ = ref.update(g, ref.init(p), p)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_extra_key(make_tx):
  s = good_scales()
  s["block2"] = {"conv": {"kernel": None}}
  with pytest.raises(ScalesError, match=re.escape("'block2/conv/kernel' is not a parameter")):
    make_tx(s).init(params())
  s = good_scales()
  s["block1"]["conv"]["kernal"] = s["block1"]["conv"].pop("kernel")
  with pytest.raises(ScalesError, match=re.escape("'block1/conv/kernal' is not a parameter (nearest: "
                                                  "'block1/conv/kernel')")):
    make_tx(s).init(params())


def test_scales_on_a_non_kernel(make_tx):
  s = good_scales()
  s["block1"]["bn"]["scale"] = CSLAScales(conv=np.ones(8))
  with pytest.raises(ScalesError, match=r"^block1/bn/scale: .*shape \(8,\).*4-D"):
    make_tx(s).init(params())


def test_scale_vector_of_wrong_length(make_tx):
  s = good_scales()
  s["stem"]["conv"]["kernel"] = CSLAScales(conv=np.ones(8), pointwise=np.ones(8)).replace(
      conv=np.ones(6), pointwise=np.ones(6))
  with pytest.raises(ScalesError, match=r"^stem/conv/kernel: .*\(6,\).*\(8,\)"):
    make_tx(s).init(params())


@pytest.mark.parametrize("shape", [(3, 3, 3, 5), (3, 3, 8, 4)])
def test_identity_on_non_square_kernel(make_tx, shape):
  p = {"conv": {"kernel": jnp.zeros(shape)}}
  s = {"conv": {"kernel": CSLAScales(conv=np.ones(shape[-1]), identity=True)}}
  with pytest.raises(ScalesError, match=r"^conv/kernel: identity .*not square"):
    make_tx(s).init(p)


def test_leaf_of_wrong_type():
  s = good_scales()
  s["block1"]["bn"]["scale"] = 1.0
  with pytest.raises(ScalesError, match=re.escape("'block1/bn/scale' is a float")):
    repopt_sgd(0.1, s)


def test_grads_tree_checked_at_update():
  tx = repopt_sgd(0.1, good_scales())
  p = params()
  state = tx.init(p)
  g = params()
  g["block1"]["conv"]["kernel"] = jnp.zeros((3, 3, 8, 4))
  with pytest.raises(ScalesError, match=r"^block1/conv/kernel: "):
    tx.update(g, state, p)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("field", ["conv", "pointwise", "identity_init", "extra"])
def test_non_finite_scales(bad, field):
  v = np.ones(4, np.float32)
  w = v.copy()
  w[2] = bad
  kw = {"conv": v, "pointwise": v, "identity": True}
  if field == "extra":
    kw["extra"] = (((1, 3), w),)
  else:
    kw[field] = w
  with pytest.raises(ScalesError, match=rf"CSLAScales\.{field}.*NaN or Inf"):
    CSLAScales(**kw)


def test_other_bad_scales():
  with pytest.raises(ScalesError, match=r"CSLAScales\.conv: .*vector"):
    CSLAScales(conv=np.ones((2, 2)))
  with pytest.raises(ScalesError, match=r"CSLAScales\.pointwise: length 3 != 4"):
    CSLAScales(conv=np.ones(4), pointwise=np.ones(3))
  with pytest.raises(ScalesError, match=r"identity_init given for a block without identity"):
    CSLAScales(conv=np.ones(4), identity_init=np.ones(4))
  with pytest.raises(ScalesError, match=r"extra\[0\]: branch size \(2, 3\) must be odd"):
    CSLAScales(conv=np.ones(4), extra=(((2, 3), np.ones(4)),))
  with pytest.raises(ScalesError, match=r"3x3 branch does not fit a 1x3 kernel"):
    grad_mult(CSLAScales(conv=np.ones(4), extra=(((3, 3), np.ones(4)),)), (1, 3, 4, 4))
  with pytest.raises(ScalesError, match=r"csla_init: pointwise_kernel missing"):
    csla_init(CSLAScales(conv=np.ones(4), pointwise=np.ones(4)), np.zeros((3, 3, 4, 4)))
  with pytest.raises(ScalesError, match=r"csla_init: identity_scale has shape \(3,\)"):
    csla_init(CSLAScales(conv=np.ones(4), identity=True), np.zeros((3, 3, 4, 4)), identity_scale=np.ones(3))


def test_non_finite_scales_in_files_name_file_and_block(tmp_path):
  # Official-style torch file with an Inf.
  bad = np.ones(4, np.float32)
  bad[1] = np.inf
  path = official_like(str(tmp_path / "inf.pth"), {"stage0": {"scale_conv": np.ones(4), "scale_1x1": np.ones(4)},
                                                    "stage1.1": {"scale_conv": np.ones(4), "scale_1x1": bad}})
  with pytest.raises(ScalesError, match=r"inf\.pth: block 'stage1\.1': .*pointwise.*NaN or Inf"):
    load_torch_scales(path)
  # Our npz format with a NaN written into it behind save_scales' back.
  npz = str(tmp_path / "nan.npz")
  save_scales(npz, {"stage0": CSLAScales(conv=np.ones(4)), "stage1.0": CSLAScales(conv=np.ones(4))})
  with np.load(npz) as z:
    arrays = dict(z)
  arrays["b1.conv"][0] = np.nan
  with open(npz, "wb") as f:
    np.savez(f, **arrays)
  with pytest.raises(ScalesError, match=r"nan\.npz: block 'stage1\.0': .*conv.*NaN or Inf"):
    load_scales(npz)


@pytest.mark.parametrize("reader", [load_torch_scales, load_scales, read_torch_state_dict])
def test_missing_file(tmp_path, reader):
  path = str(tmp_path / "nowhere" / "RepOpt-VGG-B1-scales.pth")
  with pytest.raises(ScalesError, match=re.escape(path) + ": no such scales file"):
    reader(path)


def garbage(tmp_path):
  path = tmp_path / "garbage.pth"
  path.write_bytes(np.random.default_rng(0).bytes(3000))
  return str(path)


def truncated_handmade(tmp_path):
  full = official_like(str(tmp_path / "full.pth"), {"stage0": {"scale_conv": np.ones(64), "scale_1x1": np.ones(64)}})
  data = open(full, "rb").read()
  path = tmp_path / "truncated.pth"
  path.write_bytes(data[: len(data) * 2 // 3])
  return str(path)


def truncated_official(tmp_path):
  data = open(official_scales_file("RepOpt-VGG-B1-scales.pth"), "rb").read()
  path = tmp_path / "RepOpt-VGG-B1-truncated.pth"
  path.write_bytes(data[: len(data) // 2])
  return str(path)


def storage_too_short(tmp_path):
  """A well-formed zip whose tensor claims more elements than its storage holds (must not read past it)."""
  path = str(tmp_path / "short_storage.pth")
  write_torch_file(path, {"stage0.scale_conv.weight": (0, np.ones(4, np.float32), 0, (4096,), (1,))})
  return path


def flipped_byte(tmp_path):
  """A copy whose pickle is damaged (zip CRC mismatch)."""
  full = official_like(str(tmp_path / "full.pth"), {"stage0": {"scale_conv": np.ones(8), "scale_1x1": np.ones(8)}})
  data = bytearray(open(full, "rb").read())
  data[data.index(b"ccollections") + 3] ^= 0xFF
  path = tmp_path / "flipped.pth"
  path.write_bytes(bytes(data))
  return str(path)


def npz_truncated(tmp_path):
  full = str(tmp_path / "full.npz")
  save_scales(full, {"stage0": CSLAScales(conv=np.ones(64), pointwise=np.ones(64))}, {"arch": "x"})
  data = open(full, "rb").read()
  path = tmp_path / "truncated.npz"
  path.write_bytes(data[: len(data) - 40])
  return str(path)


CORRUPT = {"garbage": garbage, "truncated_handmade": truncated_handmade, "truncated_official": truncated_official,
           "storage_too_short": storage_too_short, "flipped_byte": flipped_byte, "npz_truncated": npz_truncated}


@pytest.mark.parametrize("kind,reader", [(k, r) for k in CORRUPT for r in (load_torch_scales, load_scales)
                                         if not (k == "npz_truncated" and r is load_torch_scales)])
def test_corrupt_files(tmp_path, kind, reader):
  path = CORRUPT[kind](tmp_path)
  with pytest.raises(ScalesError, match=re.escape(path) + ": (corrupt|unreadable|not a torch)"):
    reader(path)


def test_npz_is_not_a_torch_file(tmp_path):
  path = str(tmp_path / "ours.npz")
  save_scales(path, {"stage0": CSLAScales(conv=np.ones(4))})
  with pytest.raises(ScalesError, match=re.escape(path) + ": not a torch zip checkpoint"):
    load_torch_scales(path)


def test_save_rejects_non_scales(tmp_path):
  with pytest.raises(ScalesError, match=r"entry 'stage0' is a dict"):
    save_scales(str(tmp_path / "x.npz"), {"stage0": {"conv": np.ones(4)}})
  assert not list(tmp_path.iterdir())

