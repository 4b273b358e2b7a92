"""Configs and the optimizer a config builds: schema errors, paper recipes, schedule, decay masks, clipping."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from repopt_jax import repopt_adamw, repopt_sgd
from repopt_jax.config import Config, ConfigError, available_configs, load_config
from repopt_jax.models import reparam
from repopt_jax.train import build_model, build_optimizer, make_schedule, split_model


def test_every_shipped_config_loads_and_paper_recipes():
  names = available_configs()
  for required in ("digits_tiny", "cifar100_hs", "imagenet_repopt_b1", "imagenet_repopt_b2", "imagenet_repopt_l1",
                   "imagenet_repopt_l2", "mock_cifar100_tiny"):
    assert required in names
  for name in names:
    load_config(name)
  hs = load_config("cifar100_hs")
  assert (hs.model.mode, hs.train.epochs, hs.train.batch_size, hs.optim.lr, hs.optim.weight_decay) == \
      ("hs", 240, 256, 0.1, 4e-5)
  assert (hs.optim.warmup_epochs, hs.optim.schedule, hs.optim.grad_clip, hs.data.dataset) == \
      (5, "cosine", 5.0, "cifar100")
  for arch in ("B1", "B2", "L1", "L2"):
    c = load_config(f"imagenet_repopt_{arch.lower()}")
    assert (c.model.arch, c.model.mode, c.optim.name, c.train.batch_size, c.train.epochs) == \
        (arch, "target", "repopt_sgd", 256, 120)
    assert (c.optim.lr, c.optim.weight_decay, c.optim.label_smoothing, c.optim.warmup_epochs) == \
        (0.1, 4e-5, 0.1, 5)
    assert (c.optim.momentum, c.optim.nesterov, c.optim.grad_clip) == (0.9, True, None)
    assert c.scales.endswith(f"RepOpt-VGG-{arch}-scales.pth") and c.data.dataset == "imagenet2012"


def test_overrides_are_json_values_and_strings(tmp_path):
  c = load_config("digits_tiny", ["optim.lr=0.05", "train.compute_dtype=bfloat16", "model.num_classes=null",
                                  "optim.nesterov=false", 'data.data_dir="/x y"', "train.steps=7",
                                  "train.epochs=null"])
  assert (c.optim.lr, c.train.compute_dtype, c.model.num_classes, c.optim.nesterov) == \
      (0.05, "bfloat16", None, False)
  assert (c.data.data_dir, c.train.steps, c.train.epochs) == ("/x y", 7, None)
  # A file path works the same, and replace() gives a new validated config.
  path = tmp_path / "mine.json"
  path.write_text(json.dumps(c.to_dict()))
  c2 = load_config(str(path))
  assert c2 == c and c2.replace("optim.lr=0.2").optim.lr == 0.2 and c.optim.lr == 0.05


@pytest.mark.parametrize("override, culprit", [
    (["optim.learning_rate=0.1"], "optim.learning_rate"),
    (["trainer.steps=3"], "trainer"),
    (["optim.lr.x=1"], "optim.lr"),
    (["optim.name=lamb"], "optim.name"),
    (["model.mode=fused"], "model.mode"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.batch_size=12.5"], "train.batch_size"),
    (["optim.label_smoothing=1.5"], "optim.label_smoothing"),
    (["train.steps=10"], "train.epochs"),   # both epochs and steps set
    (["optim.grad_clip=-1"], "optim.grad_clip"),
    (["nonsense"], "nonsense"),
])
def test_bad_keys_and_values_name_the_key(override, culprit):
  with pytest.raises(ConfigError) as e:
    load_config("digits_tiny", override)
  assert culprit in str(e.value) and "\n" not in str(e.value)


def test_missing_required_key_and_unknown_file_key(tmp_path):
  data = load_config("digits_tiny").to_dict()
  del data["optim"]["lr"]
  with pytest.raises(ConfigError, match="missing the required key 'optim.lr'"):
    load_config(data)
  data = load_config("digits_tiny").to_dict()
  data["train"]["epochz"] = 3
  (tmp_path / "bad.json").write_text(json.dumps(data))
  with pytest.raises(ConfigError, match="unknown config key 'train.epochz'"):
    load_config(str(tmp_path / "bad.json"))
  with pytest.raises(ConfigError, match="config has no key 'train.nope'"):
    load_config("digits_tiny").train.nope  # pylint: disable=expression-not-assigned
  with pytest.raises(ConfigError, match="neither a file nor a shipped config"):
    load_config("no_such_config")


def test_clipping_with_a_repoptimizer_is_refused_in_one_line():
  with pytest.raises(ConfigError) as e:
    load_config("imagenet_repopt_b1", ["optim.grad_clip=5.0"])
  msg = str(e.value)
  assert "optim.grad_clip" in msg and "repopt_sgd" in msg and "\n" not in msg
  with pytest.raises(ConfigError, match="optim.grad_clip"):
    load_config("digits_tiny_repopt", ["optim.name=repopt_adamw", "optim.grad_clip=1.0"])
  with pytest.raises(ConfigError, match="model.mode=target"):
    load_config("digits_tiny_repopt", ["model.mode=hs"])
  with pytest.raises(ConfigError, match="needs the constant scales"):
    load_config("digits_tiny_repopt", ["scales=null"])
  # Clipping stays allowed for Hyper-Search and the plain optimizers.
  assert load_config("cifar100_hs").optim.grad_clip == 5.0
  assert load_config("digits_tiny", ["optim.name=adamw", "optim.grad_clip=1.0"]).optim.grad_clip == 1.0


def test_schedule_linear_warmup_then_cosine_per_step():
  c = load_config("digits_tiny", ["optim.lr=0.4", "optim.warmup_epochs=2"])
  s = make_schedule(c, steps_per_epoch=5, total_steps=110)
  got = np.array([float(s(t)) for t in (0, 1, 5, 10, 60, 110)])
  w, total = 10, 110
  cosine = lambda t: 0.2 * (1 + np.cos(np.pi * (t - w) / (total - w)))
  np.testing.assert_allclose(got, [0.0, 0.04, 0.2, 0.4, cosine(60), 0.0], rtol=1e-5, atol=1e-7)
  flat = make_schedule(c.replace("optim.schedule=constant", "optim.warmup_epochs=0"), 5, 110)
  assert float(flat(0)) == float(flat(100)) == pytest.approx(0.4)


@pytest.fixture(scope="module")
def tiny():
  config = load_config("digits_tiny")
  target = build_model(config, num_classes=10, in_channels=1)
  hs = build_model(config.replace("model.mode=hs"), num_classes=10, in_channels=1, seed=1)
  return target, reparam.scales_from_hs(hs)


def _one_update(tx, params, grads):
  return jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)


def test_plain_sgd_decays_only_the_papers_mask(tiny):
  """Coupled L2 on conv/linear kernels, none on BatchNorm and biases (zero gradient isolates the decay)."""
  target, _ = tiny
  _, params, _, _ = split_model(target)
  c = load_config("digits_tiny", ["optim.weight_decay=0.5", "optim.momentum=0", "optim.lr=2.0"])
  grads = jax.tree.map(lambda p: np.zeros(p.shape, np.float32), params)
  upd = _one_update(build_optimizer(c, target, None), params, grads)
  k = params["stage1"][0]["conv"]["kernel"]
  np.testing.assert_allclose(upd["stage1"][0]["conv"]["kernel"], -2.0 * 0.5 * k, rtol=1e-6)
  np.testing.assert_allclose(upd["linear"]["kernel"], -2.0 * 0.5 * params["linear"]["kernel"], rtol=1e-6)
  for leaf in (upd["stage1"][0]["bn"]["scale"], upd["stage1"][0]["bn"]["bias"], upd["linear"]["bias"]):
    assert float(jnp.max(jnp.abs(leaf))) == 0.0


def test_repopt_sgd_from_config_is_the_papers_optimizer(tiny):
  """build_optimizer('repopt_sgd') = Grad Mult, masked coupled decay, Nesterov momentum, on the target."""
  target, scales = tiny
  _, params, _, _ = split_model(target)
  c = load_config("digits_tiny_repopt", ["optim.weight_decay=1e-3", "optim.lr=0.3"])
  tx = build_optimizer(c, target, scales)
  grads = jax.tree.map(lambda p: np.full(p.shape, 0.01, np.float32), params)
  ref = repopt_sgd(0.3, reparam.scales_tree(target, scales), momentum=0.9, nesterov=True, weight_decay=1e-3,
                   weight_decay_mask=reparam.weight_decay_mask(target))
  got, want = _one_update(tx, params, grads), _one_update(ref, params, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
  # The Grad Mult is there: the centre tap of a kernel moves more than a corner tap.
  k = got["stage2"][1]["conv"]["kernel"]
  assert float(jnp.mean(jnp.abs(k[1, 1]))) > 1.5 * float(jnp.mean(jnp.abs(k[0, 0])))
  # Clipping is refused here too, for configs assembled by hand.
  data = c.to_dict()
  data["optim"]["grad_clip"] = 1.0
  bad = Config(data)  # not validated
  with pytest.raises(ConfigError, match="optim.grad_clip"):
    build_optimizer(bad, target, scales)


def test_clipping_applies_to_plain_optimizers(tiny):
  target, _ = tiny
  _, params, _, _ = split_model(target)
  c = load_config("digits_tiny", ["optim.weight_decay=0", "optim.momentum=0", "optim.lr=1.0",
                                  "optim.grad_clip=0.5"])
  grads = jax.tree.map(lambda p: np.full(p.shape, 3.0, np.float32), params)
  upd = _one_update(build_optimizer(c, target, None), params, grads)
  norm = np.sqrt(sum(np.sum(np.square(np.asarray(u, np.float64))) for u in jax.tree.leaves(upd)))
  assert norm == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize("name", ["adamw", "repopt_adamw"])
def test_adamw_variants_from_config(tiny, name):
  """adamw: optax.adamw with the paper's mask; repopt_adamw: the exact GR AdamW with scales and mask."""
  target, scales = tiny
  _, params, _, _ = split_model(target)
  c = load_config("digits_tiny_repopt", [f"optim.name={name}", "optim.weight_decay=0.05", "optim.lr=0.01",
                                         "optim.b2=0.99", "optim.eps=1e-6"])
  grads = jax.tree.map(lambda p: np.random.default_rng(p.size).normal(size=p.shape).astype(np.float32), params)
  mask = reparam.weight_decay_mask(target)
  if name == "adamw":
    ref = optax.adamw(0.01, b1=0.9, b2=0.99, eps=1e-6, weight_decay=0.05, mask=mask)
  else:
    ref = repopt_adamw(0.01, reparam.scales_tree(target, scales), b1=0.9, b2=0.99, eps=1e-6, weight_decay=0.05,
                       weight_decay_mask=mask, exact=True)
  got = _one_update(build_optimizer(c, target, scales), params, grads)
  want = _one_update(ref, params, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), got, want)
  # BatchNorm scales are not decayed: with a zero gradient they do not move.
  zero = jax.tree.map(lambda p: np.zeros(p.shape, np.float32), params)
  upd = _one_update(build_optimizer(c, target, scales), params, zero)
  assert float(np.max(np.abs(upd["stage1"][0]["bn"]["scale"]))) == 0.0
  assert float(np.max(np.abs(upd["stage1"][0]["conv"]["kernel"]))) > 0.0
