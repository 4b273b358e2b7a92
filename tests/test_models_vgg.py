"""RepOptVGG: layout and naming across modes, sizes (parameter counts, FLOPs), Hyper-Search init, bad input.

Big models are only ever built abstractly (`nnx.eval_shape`).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from repopt_jax import CSLAScales, ScalesError
from repopt_jax.models import (ARCHS, BranchScale, ModelError, RepOptVGG, VGGConfig, count_params, flops, get_arch,
                               hs_scale_init, reparam)
from test_models_helpers import abstract, paths as state_paths

# Paper (RepOptimizers, Table 1 / RepVGG, Table 2), millions of parameters at 1000 classes.
PAPER_TARGET = {"B1": 51.8, "B2": 80.3, "L1": 76.0, "L2": 118.1}
PAPER_REPVGG = {"B1": 57.4, "B2": 89.0, "L1": 84.3, "L2": 131.0,
                "A0": 9.11, "A1": 14.09, "A2": 28.21, "B0": 15.82, "B3": 123.09}
def paths(model, filt=nnx.Param):
  return set(state_paths(nnx.state(model, filt)))


def test_block_names_follow_the_official_code():
  model = abstract("B1", "target")
  names = model.block_names
  assert names[:3] == ["stage0", "stage1.0", "stage1.1"] and names[-1] == "stage4.0"
  assert len(names) == 1 + 4 + 6 + 16 + 1
  specs = {sp.name: sp for sp in model.block_specs}
  # Widths and strides of the paper: stage0 min(64, 64a); every stage opens with stride 2.
  widths = [specs[b].out_channels for b in ("stage0", "stage1.0", "stage2.0", "stage3.0", "stage4.0")]
  assert widths == [64, 128, 256, 512, 2048]
  assert [sp.stride for sp in model.block_specs if sp.index == 0] == [2, 2, 2, 2, 2]
  assert {sp.name for sp in model.block_specs if sp.has_identity} == {
      f"stage{s}.{i}" for s, n in zip(range(1, 5), (4, 6, 16, 1)) for i in range(1, n)}
  assert model.block("stage3.15") is model.stage3[15]
  with pytest.raises(ModelError, match="stage3.16"):
    model.block("stage3.16")
  assert "stage3/15/conv/kernel" in paths(model)


# Width multipliers (a, b) of the paper sizes: widths (64a, 128a, 256a, 512b), stem min(64, 64a).
MULTIPLIERS = {"A0": (0.75, 2.5), "A1": (1, 2.5), "A2": (1.5, 2.75), "B0": (1, 2.5), "B1": (2, 4), "B2": (2.5, 5),
               "B3": (3, 5), "L1": (2, 4), "L2": (2.5, 5)}
# The small sizes are not from multipliers: (num_blocks, widths, stem width).
SMALL = {"tiny": ((1, 2, 2, 1), (8, 16, 32, 64), 8), "cifar_tiny": ((2, 2, 2, 1), (16, 32, 64, 128), 16),
         "B1_eighth": ((4, 6, 16, 1), (16, 32, 64, 256), 8)}


def test_arch_table():
  widths = {"A0": (48, 96, 192, 1280), "A1": (64, 128, 256, 1280), "A2": (96, 192, 384, 1408),
            "B0": (64, 128, 256, 1280), "B1": (128, 256, 512, 2048), "B2": (160, 320, 640, 2560),
            "B3": (192, 384, 768, 2560), "L1": (128, 256, 512, 2048), "L2": (160, 320, 640, 2560)}
  # Every entry is accounted for: a paper size (the multiplier formula) or a listed small size.
  assert set(ARCHS) == set(MULTIPLIERS) | set(SMALL)
  for name, (a, b) in MULTIPLIERS.items():
    assert ARCHS[name].widths == widths[name] == (int(64 * a), int(128 * a), int(256 * a), int(512 * b)), name
    assert ARCHS[name].stem_width == min(64, int(64 * a)), name
  for name, (blocks, w, stem) in SMALL.items():
    assert (ARCHS[name].num_blocks, ARCHS[name].widths, ARCHS[name].stem_width) == (blocks, w, stem), name
  assert ARCHS["L2"].num_blocks == (8, 14, 24, 1) and ARCHS["A1"].num_blocks == (2, 4, 14, 1)
  assert get_arch(ARCHS["tiny"]) is ARCHS["tiny"]
  cfg = VGGConfig("mine", (1, 1, 1, 1), (4, 4, 8, 8), 4)
  assert abstract(cfg, "target", 3).block_names == ["stage0", "stage1.0", "stage2.0", "stage3.0", "stage4.0"]


def test_b1_eighth_is_b1s_layout_at_an_eighth_of_its_widths():
  """28 conv layers (stem + 4 + 6 + 16 + 1 blocks), 23 of them with an identity branch, as in B1."""
  eighth, b1 = get_arch("B1_eighth").block_specs(1), get_arch("B1").block_specs(1)
  assert len(eighth) == 28 and sum(sp.has_identity for sp in eighth) == 23
  assert [(sp.name, sp.stride, sp.has_identity) for sp in eighth] == [(sp.name, sp.stride, sp.has_identity)
                                                                      for sp in b1]
  assert [sp.out_channels * 8 for sp in eighth] == [sp.out_channels for sp in b1]
  model = abstract("B1_eighth", "target", 10)
  kernels = [p for p in paths(model) if p.endswith("conv/kernel")]
  assert len(kernels) == 28 and model.block_names == [sp.name for sp in eighth]


@pytest.mark.parametrize("arch", ["B1", "B2", "L1", "L2"])
def test_param_counts_match_the_paper(arch):
  target = count_params(abstract(arch, "target"))
  repvgg = count_params(abstract(arch, "repvgg"))
  print(f"\n[params {arch}] target={target} repvgg={repvgg}")
  assert abs(target / 1e6 - PAPER_TARGET[arch]) <= 0.1
  assert abs(repvgg / 1e6 - PAPER_REPVGG[arch]) <= 0.1


def test_param_counts_repvgg_sizes():
  for arch in ("A0", "A2", "B3"):
    assert abs(count_params(abstract(arch, "repvgg")) / 1e6 - PAPER_REPVGG[arch]) <= 0.01, arch


def test_what_counts_as_a_parameter():
  """Params: kernels, BN scale/bias, head, gamma, and hs's s, t; not BN statistics or csla's constants."""
  cfg = get_arch("tiny")
  specs = cfg.block_specs()
  conv3 = sum(9 * s.in_channels * s.out_channels for s in specs)
  conv1 = sum(s.in_channels * s.out_channels for s in specs)
  bn = sum(2 * s.out_channels for s in specs)
  ident = sum(s.out_channels for s in specs if s.has_identity)
  s_and_t = sum(2 * s.out_channels for s in specs)
  head = 64 * 10 + 10
  assert count_params(abstract("tiny", "target", 10)) == conv3 + bn + head
  # repvgg: three BatchNorms where the identity exists (2 params per channel each).
  assert count_params(abstract("tiny", "repvgg", 10)) == conv3 + conv1 + bn + bn + 2 * ident + head
  assert count_params(abstract("tiny", "hs", 10)) == conv3 + conv1 + bn + ident + s_and_t + head
  scales = {sp.name: CSLAScales(conv=np.ones(sp.out_channels), pointwise=np.ones(sp.out_channels),
                                identity=sp.has_identity) for sp in specs}
  csla = nnx.eval_shape(lambda: RepOptVGG("tiny", "csla", num_classes=10, scales=scales, rngs=nnx.Rngs(0)))
  assert count_params(csla) == conv3 + conv1 + ident + bn + head


def test_flops():
  assert abs(flops("B1", 224, 1000) / 1e9 - 11.9) <= 0.1
  # By hand for 'tiny' at 32x32: spatial 16, 8, 4, 2, 1 after the five stride-2 stages.
  macs = (16 * 16 * 9 * 3 * 8 + 8 * 8 * 9 * 8 * 8 + 4 * 4 * 9 * (8 * 16 + 16 * 16)
          + 2 * 2 * 9 * (16 * 32 + 32 * 32) + 1 * 1 * 9 * 32 * 64 + 64 * 10)
  assert flops("tiny", 32, 10) == macs
  assert flops("tiny", 32, 10, mode="repvgg") == macs + (16 * 16 * 3 * 8 + 8 * 8 * 8 * 8 + 4 * 4 * (8 * 16 + 16 * 16)
                                                         + 2 * 2 * (16 * 32 + 32 * 32) + 32 * 64)
  # Odd sizes round up like PyTorch's padding-1 stride-2 conv: 33 -> 17 -> 9 -> 5 -> 3 -> 2.
  assert flops("tiny", 33, 10) == (17 * 17 * 9 * 3 * 8 + 9 * 9 * 9 * 8 * 8 + 5 * 5 * 9 * (8 * 16 + 16 * 16)
                                   + 3 * 3 * 9 * (16 * 32 + 32 * 32) + 2 * 2 * 9 * 32 * 64 + 64 * 10)
  with pytest.raises(ModelError, match="too small"):
    flops("B1", 16)


def test_modes_share_layout_and_naming():
  t, h, r = abstract("tiny", "target", 10), abstract("tiny", "hs", 10), abstract("tiny", "repvgg", 10)
  scales = {sp.name: CSLAScales(conv=np.ones(sp.out_channels), pointwise=np.ones(sp.out_channels),
                                identity=sp.has_identity) for sp in get_arch("tiny").block_specs()}
  c = nnx.eval_shape(lambda: RepOptVGG("tiny", "csla", num_classes=10, scales=scales, rngs=nnx.Rngs(0)))
  pt, pc, ph, pr = paths(t), paths(c), paths(h), paths(r)
  assert pt < pc < ph and pt < pr
  assert "stage2/1/scale_identity" in pc and "stage2/0/scale_identity" not in pc
  assert pc ^ ph == {f"{b}/{k}" for b in ("stage0", "stage1/0", "stage2/0", "stage2/1", "stage3/0", "stage3/1",
                                          "stage4/0") for k in ("scale_conv", "scale_1x1")}
  # csla's s, t are constants: state, but not Params.
  assert "stage2/1/scale_conv" in paths(c, BranchScale) and "stage2/1/scale_conv" in paths(c, ...)
  assert "stage2/1/bn_identity/scale" in pr and "stage2/0/bn_identity/scale" not in pr
  assert paths(t, nnx.BatchStat) == paths(c, nnx.BatchStat)


def test_hs_init_official_and_paper():
  assert [hs_scale_init(i) for i in range(4)] == [1.0, math.sqrt(2), 1.0, math.sqrt(2 / 3)]
  assert [hs_scale_init(i, "paper") for i in range(3)] == [math.sqrt(2), 1.0, math.sqrt(2 / 3)]
  cfg = VGGConfig("hs4", (3, 1, 1, 1), (4, 4, 4, 4), 4)
  for rule in ("official", "paper"):
    hs = RepOptVGG(cfg, "hs", num_classes=2, hs_init=rule, rngs=nnx.Rngs(0))
    for spec, blk in hs.named_blocks():
      v = hs_scale_init(spec.index, rule)
      np.testing.assert_allclose(blk.scale_conv[...], v, rtol=1e-6)
      np.testing.assert_allclose(blk.scale_1x1[...], v, rtol=1e-6)
      if spec.has_identity:
        np.testing.assert_array_equal(blk.scale_identity[...], 1.0)
    assert isinstance(hs.stage1[1].scale_conv, nnx.Param)


def test_forward_shapes_and_dtypes():
  def run(mode, shape, dtype=jnp.float32, **kw):
    return jax.eval_shape(lambda x: RepOptVGG("tiny", mode, num_classes=7, dtype=dtype, rngs=nnx.Rngs(0), **kw)(x),
                          jax.ShapeDtypeStruct(shape, jnp.float32))
  for mode in ("target", "hs", "repvgg"):
    assert run(mode, (2, 32, 32, 3)).shape == (2, 7)
  assert run("target", (1, 33, 47, 3)).shape == (1, 7)  # odd and non-square sides
  for mode in ("target", "hs", "repvgg"):
    assert run(mode, (1, 32, 32, 3), jnp.bfloat16).dtype == jnp.bfloat16
  one = jax.eval_shape(lambda x: RepOptVGG("tiny", "target", in_channels=1, num_classes=3, rngs=nnx.Rngs(0))(x),
                       jax.ShapeDtypeStruct((4, 64, 64, 1), jnp.float32))
  assert one.shape == (4, 3)


def test_bad_input_errors():
  with pytest.raises(ModelError, match="unknown mode 'fused'.*target, csla, hs, repvgg"):
    RepOptVGG("tiny", "fused")
  with pytest.raises(ModelError, match="unknown architecture 'B9'.*B1"):
    RepOptVGG("B9", "target")
  with pytest.raises(ModelError, match="hs_init"):
    RepOptVGG("tiny", "hs", hs_init="pap")
  with pytest.raises(ModelError, match="'csla' needs scales"):
    RepOptVGG("tiny", "csla")
  with pytest.raises(ModelError, match="num_blocks"):
    VGGConfig("bad", (1, 2, 3), (4, 4, 4, 4), 4)
  model = abstract("tiny", "target", 10)
  with pytest.raises(ModelError, match="input has 1 channels.*in_channels=3"):
    model(jnp.zeros((2, 32, 32, 1)))
  with pytest.raises(ModelError, match="16x16 is too small.*at least 32x32"):
    model(jnp.zeros((2, 16, 16, 3)))
  with pytest.raises(ModelError, match="NHWC"):
    model(jnp.zeros((32, 32, 3)))
  # Scales of another architecture: the block is named.
  b1_like = {sp.name: CSLAScales(conv=np.ones(sp.out_channels), pointwise=np.ones(sp.out_channels),
                                 identity=sp.has_identity) for sp in get_arch("tiny").block_specs()}
  b1_like["stage2.0"] = CSLAScales(conv=np.ones(5), pointwise=np.ones(5))
  with pytest.raises(ScalesError, match=r"scales\['stage2.0'\]: 5 channels.*has 16"):
    nnx.eval_shape(lambda: RepOptVGG("tiny", "csla", scales=b1_like, rngs=nnx.Rngs(0)))


def test_weight_decay_masks():
  def decayed(model):
    flat = jax.tree_util.tree_flatten_with_path(reparam.weight_decay_mask(model))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in p) for p, v in flat if v}

  blocks = [b.replace(".", "/") for b in abstract("tiny", "target", 10).block_names]
  kernels = {f"{b}/conv/kernel" for b in blocks} | {"linear/kernel"}
  assert decayed(abstract("tiny", "target", 10)) == kernels
  assert decayed(abstract("tiny", "repvgg", 10)) == kernels | {f"{b}/conv_1x1/kernel" for b in blocks}
  hs_expected = kernels | {f"{b}/conv_1x1/kernel" for b in blocks} | {"stage2/1/scale_identity",
                                                                      "stage3/1/scale_identity"}
  assert decayed(abstract("tiny", "hs", 10)) == hs_expected  # not the trainable s, t (1-D) nor BN
  mask = reparam.weight_decay_mask(abstract("tiny", "hs", 10))
  assert jax.tree.structure(mask) == jax.tree.structure(nnx.as_pure(nnx.state(abstract("tiny", "hs", 10), nnx.Param)))
