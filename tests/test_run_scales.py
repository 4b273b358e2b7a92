"""A run's scales are parsed once at the boundary (`train.read_run_scales` -> `RunScales`) and checked once against
the model; the conv formulation and the compilation cache are explicit parameters, set by the command line."""

import collections
import functools
import os

import jax
import numpy as np
import pytest
from flax import nnx

from repopt_jax import CSLAScales, ScalesError, csla, ops, save_scales
from repopt_jax import scales as scales_lib
from repopt_jax.cli import _enable_compilation_cache, main, parse_args, train_config
from repopt_jax.config import ConfigError, disable_compilation_cache, enable_compilation_cache, load_config
from repopt_jax.models import ModelError, build, family, get_arch, registry
from repopt_jax.train import RunScales, build_model, build_run, read_run_scales
from repopt_jax.train import run_scales as run_scales_lib
from test_train_common import digits_dir


@pytest.fixture(scope="module")
def ddir(tmp_path_factory):
  return digits_dir(tmp_path_factory)


def _vgg_scales(arch="tiny", in_channels=1, value=1.0):
  return {sp.name: CSLAScales(conv=np.full(sp.out_channels, value), pointwise=np.full(sp.out_channels, 0.5),
                              identity=sp.has_identity) for sp in get_arch(arch).block_specs(in_channels)}


@functools.lru_cache(maxsize=None)
def _resnet_scales() -> dict:
  """Scales on every 3x3 kernel of the narrow CIFAR ResNet-18 (kernel paths, 1 input channel), no identity."""
  plain = nnx.eval_shape(lambda: build("resnet18_cifar_tiny", "target", num_classes=10, in_channels=1))
  rng = np.random.default_rng(0)
  return {"/".join(map(str, path)) + "/kernel": CSLAScales(conv=rng.uniform(0.5, 1.5, conv.out_features),
                                                           pointwise=rng.uniform(0.5, 1.5, conv.out_features))
          for path, conv in nnx.iter_graph(plain) if isinstance(conv, nnx.Conv) and conv.kernel_size == (3, 3)}


def _counting(monkeypatch, module, name, counts):
  orig = getattr(module, name)

  def counted(*a, **k):
    counts[name] += 1
    return orig(*a, **k)

  monkeypatch.setattr(module, name, counted)


def test_train_scales_reads_the_file_once_and_checks_it_once(ddir, tmp_path, monkeypatch, capsys):
  """`train --scales F` end to end (one step): F is decoded once, the VGG block check and the kernel-shape check
  run once, and the checkpoint records the fingerprint of those scales."""
  path = str(tmp_path / "s.npz")
  scales = _vgg_scales()
  save_scales(path, scales, {"arch": "tiny"})
  counts = collections.Counter()
  _counting(monkeypatch, scales_lib, "load_scales", counts)
  _counting(monkeypatch, registry, "check_scales_for", counts)   # RepOpt-VGG: block by block
  _counting(monkeypatch, csla, "scales_tree", counts)             # every model: kernel by kernel
  work = tmp_path / "run"
  code = main(["train", "digits_tiny", f"data.data_dir={ddir}", "--scales", path, "train.epochs=null",
               "train.steps=1", "--workdir", str(work), "--no-progress", "--fast-compile", "--cache-dir", "off"])
  assert code == 0, capsys.readouterr().err[-2000:]
  assert counts == {"load_scales": 1, "check_scales_for": 1, "scales_tree": 1}, counts
  # The run resumes (already finished) with the same file: read once more, in that second command only.
  counts.clear()
  assert main(["train", "digits_tiny", f"data.data_dir={ddir}", "--scales", path, "train.epochs=null",
               "train.steps=1", "--workdir", str(work), "--no-progress", "--cache-dir", "off"]) == 0
  assert counts["load_scales"] == 1 and "already finished" in capsys.readouterr().out


def test_build_run_passes_one_checked_object_to_model_optimizer_and_checkpoint(ddir, tmp_path, monkeypatch):
  """A generic model (the CIFAR ResNet-18): read once, checked once, the same tree in the optimizer."""
  scales = _resnet_scales()
  path = str(tmp_path / "r.npz")
  save_scales(path, scales, {})
  config = load_config("digits_tiny", ["model.arch=resnet18_cifar_tiny", "optim.name=repopt_sgd",
                                       f'scales="{path}"', f"data.data_dir={ddir}"])
  counts = collections.Counter()
  _counting(monkeypatch, scales_lib, "load_scales", counts)
  _counting(monkeypatch, csla, "scales_tree", counts)
  run = build_run(config, devices=jax.devices()[:1])
  assert counts == {"load_scales": 1, "scales_tree": 1}, counts
  rs = run.scales
  assert isinstance(rs, RunScales) and rs.family == "generic" and rs.path == path
  assert rs.fingerprint == run.scales_fingerprint == run_scales_lib.fingerprint(scales_lib.load_scales(path)[0])
  assert list(rs.by_kernel) == list(scales) and rs.dims == (10, 1)
  leaf = rs.tree["layer1"][0]["conv1"]["kernel"]
  assert leaf is rs.by_kernel["layer1/0/conv1/kernel"]


def test_vgg_scales_are_keyed_by_kernel_paths_in_model_order():
  scales = _vgg_scales()
  reordered = {k: scales[k] for k in reversed(list(scales))}
  rs = RunScales.of(reordered, "tiny").for_dims(10, 1)
  assert rs.family == "vgg" and list(rs.scales) == list(reordered)
  assert list(rs.by_kernel) == [f"{'/'.join(k.split('.'))}/conv/kernel" for k in scales]
  assert rs.for_dims(10, 1) is rs  # checked once per model
  assert rs.fingerprint == RunScales.of(scales, "tiny").fingerprint  # order does not matter


def test_errors_name_the_block_the_kernel_path_and_the_file(tmp_path):
  foreign = str(tmp_path / "foreign.npz")
  save_scales(foreign, _vgg_scales("cifar_tiny"), {})
  config = load_config("digits_tiny", [f'scales="{foreign}"', "optim.name=repopt_sgd"])
  rs = read_run_scales(config)
  with pytest.raises(ScalesError, match=r"scales\['stage0'\]: 16 channels, but block stage0 of tiny has 8.*"
                                        + "foreign.npz"):
    rs.for_dims(10, 1)
  # Any other architecture: the kernel path that fits no kernel, or the wrong width, named.
  good = _resnet_scales()
  typo = {k.replace("layer1/0/conv1", "layer1/0/conv9"): v for k, v in good.items()}
  with pytest.raises(ScalesError, match=r"scales\['layer1/0/conv9/kernel'\] names no conv kernel"):
    RunScales.of(typo, "resnet18_cifar_tiny").for_dims(10, 1)
  wide = dict(good, **{"layer2/0/conv1/kernel": CSLAScales(conv=np.ones(5), pointwise=np.ones(5))})
  with pytest.raises(ScalesError, match=r"layer2/0/conv1/kernel: .*\(5,\).*16 output channels"):
    RunScales.of(wide, "resnet18_cifar_tiny").for_dims(10, 1)
  with pytest.raises(ScalesError, match=r"scales\['stage0'\]: expected CSLAScales, got dict"):
    RunScales.of({"stage0": {}}, "tiny")
  with pytest.raises(ModelError, match=r"unknown architecture 'vgg17'.*tiny.*resnet18_cifar"):
    RunScales.of({}, "vgg17")
  # A missing file and an all-zero block, as before.
  with pytest.raises(ScalesError, match=r"nope\.npz does not exist \(config key 'scales'\)"):
    read_run_scales(load_config("digits_tiny", [f'scales="{tmp_path / "nope.npz"}"']))
  zero = _vgg_scales()
  zero["stage2.1"] = CSLAScales(conv=np.zeros(16), pointwise=np.zeros(16), identity=True)
  save_scales(str(tmp_path / "zero.npz"), zero, {})
  with pytest.raises(ScalesError, match=r"zero\.npz: block 'stage2\.1' has every branch scale zero.*identity"):
    read_run_scales(load_config("digits_tiny", [f'scales="{tmp_path / "zero.npz"}"']))


def test_the_fingerprint_of_resumed_runs_is_unchanged():
  """Checkpoints written before carry this value for these scales: a resume must find the same."""
  s = {"stage0": CSLAScales(conv=np.array([1., 2.]), pointwise=np.array([.5, .25])),
       "stage1.1": CSLAScales(conv=np.array([1., 3.]), pointwise=np.array([.5, .75]), identity=True,
                              identity_init=np.array([.9, 1.1])),
       "b/kernel": CSLAScales(conv=np.array([2., 2.]), extra=(((1, 3), np.array([.1, .2])),))}
  assert run_scales_lib.fingerprint(s) == "22e0c7a689b9493b9ba010fa09e248393c68a3b9571ac5f88009d8d9ede473fd"


def test_the_family_is_decided_by_the_registry():
  assert (family("B1"), family(get_arch("tiny")), family("resnet18_cifar"), family("repopt_ghostnet_0_5x")) == (
      "vgg", "vgg", "generic", "generic")
  with pytest.raises(ModelError, match="unknown architecture 'B9'"):
    family("B9")


# ------------------------------------------------------------------------------------- conv implementation
def _conv_functions(model):
  return {n.conv_general_dilated for _, n in nnx.iter_graph(model) if isinstance(n, nnx.Conv)}


@pytest.mark.parametrize("arch,mode", [("tiny", "target"), ("tiny", "repvgg"), ("resnet18_cifar_tiny", "target"),
                                       ("resnet18_cifar_tiny", "hs")])
def test_model_conv_impl_reaches_every_conv(arch, mode):
  """Every conv of a model (the csla surgery's 1x1 branches too) computes with the `conv_impl` it was built with."""
  for impl in ops.CONV_IMPLS:
    model = nnx.eval_shape(lambda: build(arch, mode, num_classes=10, in_channels=1, conv_impl=impl))
    assert _conv_functions(model) == {ops.conv_function(impl)}, (arch, impl, mode)


def test_config_key_model_conv_impl_builds_the_model_with_it():
  model = build_model(load_config("digits_tiny", ["model.conv_impl=lax"]), num_classes=10, in_channels=1)
  assert _conv_functions(model) == {ops.conv_function("lax")} != {ops.conv_function("auto")}
  assert model.conv_impl == "lax"
  with pytest.raises(ConfigError, match=r"'model.conv_impl' = 'fast' is not one of auto, lax, im2col"):
    load_config("digits_tiny", ["model.conv_impl=fast"])
  with pytest.raises(ValueError, match=r"conv_impl='fast' .*valid: auto, lax, im2col"):
    ops.conv_function("fast")


def test_conv_impl_changes_the_program_not_the_function():
  """lax: XLA's convolution for every conv; auto on CPU: im2col + dot for the small outputs; same logits."""
  x = jax.numpy.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 1)), jax.numpy.float32)
  model = build_model(load_config("digits_tiny", ["model.conv_impl=lax"]), num_classes=10, in_channels=1)
  model.eval()
  state = nnx.state(model)
  out, convs = {}, {}
  for impl in ("lax", "auto"):  # the same parameters, in a model built with each formulation
    abstract = nnx.eval_shape(lambda: build("tiny", "target", num_classes=10, in_channels=1, conv_impl=impl))
    abstract.eval()
    graphdef = nnx.graphdef(abstract)
    fn = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x), compiler_options={"xla_backend_optimization_level": 0})
    convs[impl] = fn.lower(state, x).as_text().count("stablehlo.convolution")
    out[impl] = np.asarray(fn(state, x))
  assert convs["lax"] == 7 and convs["auto"] < convs["lax"], convs
  np.testing.assert_allclose(out["auto"], out["lax"], rtol=1e-4, atol=1e-5)


def test_no_process_wide_switch_is_read_from_the_environment():
  """The library takes the formulation as an argument; nothing in ops or the models reads the environment."""
  import inspect  # pylint: disable=g-import-not-at-top
  from repopt_jax.models import blocks, resnet, vgg  # pylint: disable=g-import-not-at-top
  for mod in (ops, blocks, vgg, resnet, registry, run_scales_lib):
    assert "environ" not in inspect.getsource(mod), mod.__name__
  assert not hasattr(ops, "conv_mode")


# ------------------------------------------------------------------------------------- compilation cache
def test_compilation_cache_is_a_directory_argument_set_by_the_cli(tmp_path, monkeypatch):
  before = {k: os.environ.get(k) for k in os.environ if k.startswith("JAX_")}
  old = jax.config.jax_compilation_cache_dir
  try:
    assert enable_compilation_cache(str(tmp_path / "a")) == str(tmp_path / "a")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "a")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
  finally:
    disable_compilation_cache()
  assert jax.config.jax_compilation_cache_dir == old
  assert {k: os.environ.get(k) for k in os.environ if k.startswith("JAX_")} == before  # no environment writes

  # The command line: --cache-dir, else $REPOPT_JAX_CACHE_DIR, else the XDG folder; 'off' leaves it off.
  monkeypatch.setenv("REPOPT_JAX_CACHE_DIR", str(tmp_path / "env"))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  try:
    assert _enable_compilation_cache(parse_args(["train", "--cache-dir", str(tmp_path / "flag")])) == str(
        tmp_path / "flag")
    disable_compilation_cache()
    assert _enable_compilation_cache(parse_args(["train"])) == str(tmp_path / "env")
    disable_compilation_cache()
    monkeypatch.delenv("REPOPT_JAX_CACHE_DIR")
    assert _enable_compilation_cache(parse_args(["eval", "-w", "x"])) == str(tmp_path / "xdg" / "repopt_jax" / "jax")
    disable_compilation_cache()
    assert _enable_compilation_cache(parse_args(["train", "--cache-dir", "off"])) is None
    assert jax.config.jax_compilation_cache_dir == old
  finally:
    disable_compilation_cache()


def test_cli_conv_flag_is_the_config_key():
  args = parse_args(["train", "digits_tiny", "model.conv_impl=im2col", "--conv", "lax"])
  assert args.sets[-1] == "model.conv_impl=lax"
  config, _ = train_config(args.items[0], args.items[1:] + args.sets)
  assert config.model.conv_impl == "lax"
  assert parse_args(["train"]).sets == [] and load_config("digits_tiny").model.conv_impl == "auto"
