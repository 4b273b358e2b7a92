"""Run configuration: JSON files (paper recipes and CPU-sized ones) with `section.key=value` overrides.

A config is data, not code: a new dataset or model size is a new file in `repopt_jax/configs/`. Every file
is checked against one schema (`SCHEMA` below): a key the schema does not know, a required key left out, or a
value outside its allowed set raises `ConfigError` naming the key, before anything is built.
"""

from __future__ import annotations

import copy
import json
import math
import os
from importlib import resources
from typing import Any, Iterable, Mapping, Optional, Sequence

__all__ = ["Config", "ConfigError", "REQUIRED", "SCHEMA", "available_configs", "load_config", "validate_config",
           "default_cache_dir", "enable_compilation_cache", "disable_compilation_cache"]


class ConfigError(ValueError):
  """A configuration is unusable: unknown, missing or invalid key (the message names it)."""


class WorkdirError(OSError):
  """A work directory cannot be created or written, or is not a run (re-exported by `repopt_jax.train`;
  defined here so that checking a path does not import jax)."""


_REQUIRED = object()  # Marks schema entries that every config must set.

# Every key a config may hold, with its default (`_REQUIRED` for the ones without one).
SCHEMA: dict[str, Any] = {
    "description": "",
    "model": {
        "arch": _REQUIRED,          # a name in repopt_jax.models.ARCHS
        "mode": _REQUIRED,          # target | csla | hs | repvgg
        "num_classes": None,        # None: from the dataset
        "hs_init": "official",      # initial HS scales (see RepOptVGG)
        "reinit_identity": "trained",  # Rule of Initialization: identity from trained gamma | ones
        "reinit": True,             # apply the Rule of Initialization when scales are given (false: ablation)
        "conv_impl": "auto",        # convolution formulation (repopt_jax.ops): auto | lax | im2col
    },
    "data": {
        "dataset": _REQUIRED,       # a name in repopt_jax.data.available_datasets()
        "data_dir": None,
        "image_size": None,         # None: the dataset's own size
        "train_split": "train",
        "eval_split": "test",
        "worker_count": 0,          # grain worker processes per host (0: in the main process)
    },
    "optim": {
        "name": _REQUIRED,          # repopt_sgd | repopt_adamw | sgd | adamw
        "lr": _REQUIRED,            # peak learning rate, for the global batch
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 0.0,
        "warmup_epochs": 0.0,       # linear warm-up from 0, then cosine decay to 0, per step
        "schedule": "cosine",       # cosine | constant (after the warm-up)
        "label_smoothing": 0.0,
        "grad_clip": None,          # global-norm clipping; refused with a RepOptimizer
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1e-8,
        "exact": True,              # repopt_adamw: the exact form (False: the paper's code)
    },
    "train": {
        "epochs": None,             # exactly one of epochs / steps
        "steps": None,
        "batch_size": _REQUIRED,    # global batch, over all devices of all hosts
        "eval_batch_size": None,    # None: batch_size
        "seed": 0,
        "compute_dtype": "float32",  # float32 | bfloat16 (params stay float32)
        "eval_every": 0,            # steps between evaluations (0: at the end only)
        "checkpoint_every": 0,      # steps between checkpoints (0: at the end only)
        "keep_checkpoints": 3,
        "async_checkpointing": True,
        "log_every": 10,            # steps between metric records
    },
    "scales": None,                 # .npz (ours) or official .pth; required by the RepOptimizers
}

REQUIRED = tuple(f"{s}.{k}" for s, sec in SCHEMA.items() if isinstance(sec, dict)
                 for k, v in sec.items() if v is _REQUIRED)

_CHOICES = {
    "model.mode": ("target", "csla", "hs", "repvgg"),
    "model.reinit_identity": ("trained", "ones"),
    "model.conv_impl": ("auto", "lax", "im2col"),
    "optim.name": ("repopt_sgd", "repopt_adamw", "sgd", "adamw"),
    "optim.schedule": ("cosine", "constant"),
    "train.compute_dtype": ("float32", "bfloat16"),
}
_POSITIVE = ("optim.lr", "train.batch_size", "train.keep_checkpoints")
_NON_NEGATIVE = ("optim.weight_decay", "optim.warmup_epochs", "optim.momentum", "train.eval_every",
                 "train.checkpoint_every", "train.log_every", "data.worker_count")
_UNIT = ("optim.label_smoothing",)
REPOPT_OPTIMIZERS = ("repopt_sgd", "repopt_adamw")


class Config(Mapping):
  """A nested, read-only configuration with attribute access: `config.optim.lr`.

  Reading a key that does not exist raises `ConfigError` naming its full path. `to_dict()` gives plain
  nested dicts (JSON-serialisable); `replace('optim.lr=0.05', ...)` a new config with overrides applied.
  """

  def __init__(self, data: Mapping[str, Any], path: str = ""):
    object.__setattr__(self, "_data", dict(data))
    object.__setattr__(self, "_path", path)

  def _full(self, key: str) -> str:
    return f"{self._path}.{key}" if self._path else key

  def __getitem__(self, key: str) -> Any:
    if key not in self._data:
      raise ConfigError(f"config has no key {self._full(key)!r}")
    value = self._data[key]
    return Config(value, self._full(key)) if isinstance(value, dict) else value

  def __getattr__(self, key: str) -> Any:
    if key.startswith("__"):
      raise AttributeError(key)
    return self[key]

  def __setattr__(self, key, value):
    raise ConfigError(f"config is read-only (setting {self._full(key)!r}); use replace() or overrides")

  def __iter__(self):
    return iter(self._data)

  def __len__(self):
    return len(self._data)

  def __repr__(self):
    return f"Config({json.dumps(self.to_dict(), sort_keys=True)})"

  def __eq__(self, other):
    return isinstance(other, Config) and self.to_dict() == other.to_dict()

  def __hash__(self):
    return hash(json.dumps(self.to_dict(), sort_keys=True))

  def __reduce__(self):
    return (Config, (self.to_dict(), self._path))

  def to_dict(self) -> dict:
    """A deep copy as plain nested dicts."""
    return copy.deepcopy(self._data)

  def replace(self, *overrides: str) -> "Config":
    """A new validated config with `section.key=value` overrides applied."""
    return _finish(apply_overrides(self.to_dict(), overrides))


def _schema_for(path: Sequence[str]):
  node = SCHEMA
  for i, key in enumerate(path):
    if not isinstance(node, dict) or key not in node:
      raise ConfigError(f"unknown config key {'.'.join(path[:i + 1])!r}"
                        + _known_hint(node, path[:i]))
    node = node[key]
  return node


def _known_hint(node, parent: Sequence[str]) -> str:
  if not isinstance(node, dict):
    return f" ({'.'.join(parent)} is not a section)"
  return f" (known: {', '.join(sorted(node))})"


def _check_known(data: Mapping[str, Any], path: tuple = ()) -> None:
  if not isinstance(data, Mapping):
    raise ConfigError(f"config {'.'.join(path) or 'file'} must be a JSON object, got {type(data).__name__}")
  for key, value in data.items():
    node = _schema_for(path + (key,))
    if isinstance(node, dict):
      if not isinstance(value, Mapping):
        raise ConfigError(f"config key {'.'.join(path + (key,))!r} must be a section (JSON object)")
      _check_known(value, path + (key,))


def _merge_defaults(data: Mapping[str, Any], schema=SCHEMA, path: tuple = ()) -> dict:
  out = {}
  for key, default in schema.items():
    if isinstance(default, dict):
      out[key] = _merge_defaults(data.get(key, {}), default, path + (key,))
    elif key in data:
      out[key] = data[key]
    elif default is _REQUIRED:
      raise ConfigError(f"config is missing the required key {'.'.join(path + (key,))!r}")
    else:
      out[key] = copy.deepcopy(default)
  return out


def parse_override(override: str) -> tuple[list[str], Any]:
  """`'optim.lr=0.05'` -> `(['optim', 'lr'], 0.05)`: the value is JSON, or a plain string if not JSON."""
  if "=" not in override:
    raise ConfigError(f"override {override!r} is not of the form section.key=value")
  key, text = override.split("=", 1)
  key = key.strip()
  try:
    value = json.loads(text)
  except json.JSONDecodeError:
    value = text
  return key.split("."), value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
  """Applies `section.key=value` overrides to a nested dict in place (unknown keys raise) and returns it."""
  for override in overrides or ():
    keys, value = parse_override(override)
    node = _schema_for(keys)
    if isinstance(node, dict) and not isinstance(value, dict):
      raise ConfigError(f"override {override!r}: {'.'.join(keys)!r} is a section, not a value")
    target = data
    for k in keys[:-1]:
      target = target.setdefault(k, {})
    target[keys[-1]] = value
  return data


def _get(data: dict, key: str):
  node = data
  for k in key.split("."):
    node = node[k]
  return node


def _check_finite(data: Mapping[str, Any], path: tuple = ()) -> None:
  """NaN and +-Infinity (JSON `NaN`, `Infinity`) are refused for every key, at config time."""
  for key, value in data.items():
    if isinstance(value, Mapping):
      _check_finite(value, path + (key,))
    elif isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f"config key {'.'.join(path + (key,))!r} = {value!r} is not a finite number")


def validate_config(data: Mapping[str, Any]) -> None:
  """Checks values (choices, signs, epochs/steps, RepOptimizer constraints); `ConfigError` names the key."""
  _check_finite(data)
  if not isinstance(data["model"]["reinit"], bool):
    raise ConfigError(f"config key 'model.reinit' = {data['model']['reinit']!r} must be true or false")
  for key, choices in _CHOICES.items():
    if _get(data, key) not in choices:
      raise ConfigError(f"config key {key!r} = {_get(data, key)!r} is not one of {', '.join(choices)}")
  for key in _POSITIVE + _NON_NEGATIVE + _UNIT:
    value = _get(data, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
    if key in _POSITIVE and value <= 0 or value < 0 or key in _UNIT and value >= 1:
      raise ConfigError(f"config key {key!r} = {value!r} is out of range")
  train, optim = data["train"], data["optim"]
  if (train["epochs"] is None) == (train["steps"] is None):
    raise ConfigError("config must set exactly one of 'train.epochs' and 'train.steps'")
  for key in ("train.epochs", "train.steps"):
    v = _get(data, key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
      raise ConfigError(f"config key {key!r} = {v!r} must be a positive number")
  for key in ("train.batch_size", "train.seed", "train.keep_checkpoints", "train.eval_every",
              "train.checkpoint_every", "train.log_every", "data.worker_count"):
    if not isinstance(_get(data, key), int) or isinstance(_get(data, key), bool):
      raise ConfigError(f"config key {key!r} must be an integer, got {_get(data, key)!r}")
  if train["eval_batch_size"] is not None and (not isinstance(train["eval_batch_size"], int)
                                               or train["eval_batch_size"] <= 0):
    raise ConfigError(f"config key 'train.eval_batch_size' = {train['eval_batch_size']!r} must be a "
                      "positive integer or null")
  clip = optim["grad_clip"]
  if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip <= 0):
    raise ConfigError(f"config key 'optim.grad_clip' = {clip!r} must be a positive number or null")
  if optim["name"] in REPOPT_OPTIMIZERS:
    if clip is not None:
      raise ConfigError(f"'optim.grad_clip' = {clip} cannot be used with the RepOptimizer "
                        f"{optim['name']!r}: clipping breaks the gradient re-parameterization (allowed only "
                        "for Hyper-Search and plain optimizers); set optim.grad_clip=null")
    if data["model"]["mode"] != "target":
      raise ConfigError(f"'optim.name' = {optim['name']!r} trains the plain target model: set "
                        f"model.mode=target (got {data['model']['mode']!r})")
    if not data["scales"]:
      raise ConfigError(f"'optim.name' = {optim['name']!r} needs the constant scales: set 'scales' to a "
                        ".npz (from Hyper-Search) or an official .pth file")


def _finish(data: dict) -> Config:
  _check_known(data)
  merged = _merge_defaults(data)
  validate_config(merged)
  return Config(merged)


def available_configs() -> list[str]:
  """Names of the configs shipped in `repopt_jax/configs/` (without `.json`)."""
  folder = resources.files("repopt_jax") / "configs"
  return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def _read(name_or_path: str) -> dict:
  if os.path.exists(name_or_path):
    path = name_or_path
  else:
    stem = name_or_path[:-5] if name_or_path.endswith(".json") else name_or_path
    candidate = resources.files("repopt_jax") / "configs" / f"{stem}.json"
    if os.sep in name_or_path or not candidate.is_file():
      raise ConfigError(f"config {name_or_path!r} is neither a file nor a shipped config "
                        f"(shipped: {', '.join(available_configs())})")
    path = str(candidate)
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"config file {path}: invalid JSON ({e})") from None


def load_config(name_or_path: str | Mapping[str, Any], overrides: Optional[Iterable[str]] = None) -> Config:
  """Loads a config: a shipped name (`'digits_tiny'`), a JSON file path, or a dict; then overrides.

  Args:
    name_or_path: a name in `available_configs()`, a path to a JSON file, or a nested mapping.
    overrides: `section.key=value` strings; the value is parsed as JSON (`optim.lr=0.05`,
      `scales=null`, `train.compute_dtype="bfloat16"`), or taken as a string when it is not JSON.

  Returns:
    A validated `Config`, every schema key present (defaults filled in).

  Raises:
    ConfigError: naming the unknown, missing or invalid key, or the unreadable file.

  Example:
    >>> c = load_config('digits_tiny', ['optim.lr=0.05'])
    >>> c.optim.lr, c.data.dataset
    (0.05, 'digits')
  """
  if isinstance(name_or_path, Mapping):
    data = copy.deepcopy(dict(name_or_path.to_dict() if isinstance(name_or_path, Config) else name_or_path))
  else:
    data = _read(os.fspath(name_or_path))
  _check_known(data)
  return _finish(apply_overrides(data, overrides or ()))


# JAX's persistent compilation cache, as the command line turns it on (it decides the directory: `--cache-dir`,
# `$REPOPT_JAX_CACHE_DIR`, or `default_cache_dir()`); nothing here reads or writes the environment.
_CACHE_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                   "jax_persistent_cache_min_entry_size_bytes")


def default_cache_dir(xdg_cache_home: Optional[str] = None) -> str:
  """`XDG_CACHE_HOME/repopt_jax/jax` for a given `XDG_CACHE_HOME`, else `~/.cache/repopt_jax/jax`."""
  base = xdg_cache_home or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "repopt_jax", "jax")


def enable_compilation_cache(directory: str) -> Optional[str]:
  """Turns on JAX's persistent compilation cache in `directory`, so that a second run of the same config (a
  resume, an eval, the quickstart again) loads its compiled programs instead of compiling them.

  Every program is cached (jax's defaults skip those compiled in under a second: on CPU, most of them).
  Imports jax: call it right before the work that needs jax. `disable_compilation_cache` undoes it.

  Args:
    directory: the cache folder (created if needed).

  Returns:
    The directory, or None (cache left off) when it cannot be created or written.
  """
  directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError:
    return None
  if not os.access(directory, os.W_OK):
    return None
  import jax  # pylint: disable=g-import-not-at-top

  for key, value in zip(_CACHE_SETTINGS, (directory, 0.0, 0)):
    _CACHE_UNDO.append((key, getattr(jax.config, key)))
    jax.config.update(key, value)
  return directory


_CACHE_UNDO: list = []


def disable_compilation_cache() -> None:
  """Undoes `enable_compilation_cache` (the command line does when `main()` returns, so that calling it as a
  library function leaves jax's settings as they were)."""
  if not _CACHE_UNDO:
    return
  import jax  # pylint: disable=g-import-not-at-top

  while _CACHE_UNDO:
    key, value = _CACHE_UNDO.pop()
    jax.config.update(key, value)
