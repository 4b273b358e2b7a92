"""The command line: `python -m repopt_jax COMMAND ...` (or the `repopt-jax` console script).

Commands: `quickstart`, `search`, `train`, `eval`, `fuse`, `export` (see `repopt-jax --help`). Every command takes a
config (a shipped name such as `digits_tiny` or a JSON path) and `section.key=value` overrides, either
positional or with `--set`. A user error (bad config key, missing or foreign scales file, unprepared dataset,
unwritable directory, NaN loss, ...) is reported as one line `error: ...` on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import signal
import sys
import textwrap
from typing import Optional, Sequence

__all__ = ["main", "build_parser", "parse_args", "train_config", "COMMANDS"]

COMMANDS = ("quickstart", "search", "train", "eval", "fuse", "export")
FAST_COMPILE = {"xla_backend_optimization_level": 0}
CONV_IMPLS = ("auto", "lax", "im2col")  # repopt_jax.ops.CONV_IMPLS (not imported: it imports jax)
# The compilation cache's folder, when --cache-dir does not name one (read here, nowhere else).
ENV_CACHE_DIR = "REPOPT_JAX_CACHE_DIR"

_EPILOG = """\
examples (run from anywhere; configs are shipped names or JSON files):
  python -m repopt_jax quickstart
      the whole method on the embedded digits dataset, CPU, a few minutes; writes ./quickstart_out
  python -m repopt_jax search digits_tiny_hs --workdir runs/hs
      Hyper-Search: trains the hs model, writes runs/hs/scales.npz and plots of the scales
  python -m repopt_jax train digits_tiny --scales runs/hs/scales.npz --workdir runs/repopt
      RepOpt-VGG: the plain model trained by RepOpt-SGD with those scales (Rule of Initialization included)
  python -m repopt_jax eval --workdir runs/repopt
  python -m repopt_jax train digits_tiny model.mode=repvgg --workdir runs/repvgg
  python -m repopt_jax fuse --workdir runs/repvgg --out runs/repvgg_deploy
      RepVGG baseline, then its branches fused into one 3x3 conv per block
  python -m repopt_jax export --workdir runs/repopt --out deploy/repopt_int8.onnx --int8
  python -m repopt_jax eval --onnx deploy/repopt_int8.onnx --workdir runs/repopt
      deployment: ONNX (fp32, or INT8 by onnxruntime) or --format stablehlo; the ONNX file evaluated
  python -m repopt_jax train imagenet_repopt_b1 --scales RepOpt-VGG-B1-scales.pth data.data_dir=/data/tfds
      the paper's ImageNet run with the official scales (GPU/TPU; several hosts: set JAX_COORDINATOR_ADDRESS,
      JAX_NUM_PROCESSES, JAX_PROCESS_ID and start the same command on every host)

overrides: section.key=value (JSON values: optim.lr=0.05 train.steps=100 train.epochs=null
  train.compute_dtype=bfloat16), positional or with --set; every key is checked.
shipped configs: {configs}
"""


class _Parser(argparse.ArgumentParser):
  """argparse, with errors on one line and a pointer to --help."""

  def error(self, message):
    self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _wrap(text: str) -> str:
  return textwrap.fill(text, 100)


def _add(sub, name: str, *, description: str, **kw) -> argparse.ArgumentParser:
  """A command's parser: description wrapped, epilog (examples) kept as written."""
  return sub.add_parser(name, description=_wrap(description), formatter_class=argparse.RawDescriptionHelpFormatter,
                        **kw)


def _common(p: argparse.ArgumentParser, default_config: Optional[str], *, workdir: Optional[str] = "optional",
            config_help: str = "") -> None:
  p.add_argument("items", nargs="*", metavar="CONFIG|KEY=VALUE",
                 help=config_help or (f"a shipped config name or a JSON file (default: {default_config}), "
                                      "then overrides such as optim.lr=0.05"))
  p.add_argument("--set", "-s", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                 help="a config override (repeatable), same as a positional KEY=VALUE")
  if workdir == "required":
    p.add_argument("--workdir", "-w", required=True, metavar="DIR", help="the run directory")
  elif workdir == "optional":
    p.add_argument("--workdir", "-w", metavar="DIR",
                   help="run directory: checkpoints, metrics.jsonl, config.json; resumed if it holds a "
                        "checkpoint (default: runs/<config name>)")
  p.add_argument("--fast-compile", action="store_true",
                 help="compile without LLVM optimisation: starts several times faster, runs slower "
                      "(short CPU runs, smoke tests)")
  p.add_argument("--conv", choices=CONV_IMPLS, metavar="{" + ",".join(CONV_IMPLS) + "}",
                 help="convolution formulation, the same as model.conv_impl=...: auto (im2col + matrix "
                      "product for small CPU outputs, the default), lax (XLA's own everywhere), im2col")
  p.add_argument("--cache-dir", metavar="DIR|off",
                 help=f"JAX's persistent compilation cache (default: ${ENV_CACHE_DIR}, else "
                      "$XDG_CACHE_HOME/repopt_jax/jax or ~/.cache/repopt_jax/jax; off: no cache)")


def build_parser() -> argparse.ArgumentParser:
  """The `repopt-jax` argument parser."""
  from repopt_jax import __version__  # pylint: disable=g-import-not-at-top
  from repopt_jax.config import available_configs  # pylint: disable=g-import-not-at-top

  parser = _Parser(
      prog="repopt-jax", formatter_class=argparse.RawDescriptionHelpFormatter,
      description=_wrap("RepOptimizer (Ding et al., ICLR 2023) in JAX: find the constant branch scales by "
                        "Hyper-Search, then train a plain VGG-style model whose optimizer multiplies the "
                        "gradients by them (RepOpt-VGG), next to the RepVGG and plain VGG baselines."),
      epilog=_EPILOG.format(configs=", ".join(available_configs())))
  parser.add_argument("--version", action="version", version=f"repopt_jax {__version__}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

  p = _add(sub, "quickstart",
                     help="the main job on the embedded digits: Hyper-Search -> RepOpt-VGG, vs RepVGG and VGG",
                     description="Hyper-Search on the digits, RepOpt-VGG trained with the searched scales, a "
                                 "RepVGG and a plain VGG with plain SGD (same architecture, steps, seed); prints "
                                 "a table and writes it (results.md/json) with training curves and scale plots "
                                 "into --out. A couple of minutes on 2 CPU cores.",
                     epilog="example: python -m repopt_jax quickstart --out /tmp/qs train.epochs=6")
  _common(p, "quickstart", workdir=None,
          config_help="the base config (default: quickstart, the plain VGG run; the other runs derive from it), "
                      "then overrides such as train.epochs=6")
  p.add_argument("--out", "-o", default="quickstart_out", metavar="DIR",
                 help="output folder (default: ./quickstart_out); its run folders are replaced")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")

  p = _add(sub, "search", help="Hyper-Search: train the hs model, write its scales",
                     description="Trains the Hyper-Search (hs) model, whose branch scales are trainable, and "
                                 "writes the trained scales with the architecture to a .npz file (for train "
                                 "--scales), plus PNG plots of their distribution per block and of the identity "
                                 "variance ratio per depth.",
                     epilog="examples:\n  python -m repopt_jax search digits_tiny_hs --workdir runs/hs\n"
                            "  python -m repopt_jax search cifar100_hs data.data_dir=/data/tfds --workdir runs/hs")
  _common(p, "digits_tiny_hs")
  p.add_argument("--out", "-o", metavar="FILE", help="the scales file (default: WORKDIR/scales.npz)")
  p.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")

  p = _add(sub, "train", help="train a model from a config (--scales: RepOpt-VGG)",
                     description="Trains the model a config describes, then evaluates it. With --scales FILE "
                                 "(a .npz from search or an official RepOpt-VGG .pth) the plain target model is "
                                 "trained by the RepOptimizer: kernels initialised by the Rule of Initialization, "
                                 "gradients multiplied by the Grad Mult (sgd becomes repopt_sgd, adamw "
                                 "repopt_adamw).",
                     epilog="examples:\n  python -m repopt_jax train digits_tiny --scales runs/hs/scales.npz "
                            "--workdir runs/repopt\n  python -m repopt_jax train digits_tiny model.mode=repvgg "
                            "--workdir runs/repvgg\n  python -m repopt_jax train imagenet_repopt_b1 --scales "
                            "RepOpt-VGG-B1-scales.pth data.data_dir=/data/tfds")
  _common(p, "digits_tiny")
  p.add_argument("--scales", metavar="FILE", help="train RepOpt-VGG with these scales (.npz or official .pth)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--fresh", action="store_true",
                 help="start over from step 0 even if WORKDIR holds checkpoints (e.g. when none can be read); "
                      "the old checkpoints/, metrics.jsonl and tensorboard/ are moved aside to *.old")

  p = _add(sub, "eval", help="evaluate a run directory's newest checkpoint",
                     description="Evaluates the newest checkpoint of a run on its config's eval split.",
                     epilog="examples:\n  python -m repopt_jax eval --workdir runs/repopt\n"
                            "  python -m repopt_jax eval --workdir runs/repopt data.eval_split=train")
  _common(p, None, workdir="required",
          config_help="the run's config (default: WORKDIR/config.json), then overrides such as "
                      "data.eval_split=train")
  p.add_argument("--json", action="store_true", help="print the metrics as JSON")
  p.add_argument("--onnx", metavar="FILE",
                 help="evaluate this exported ONNX file (fp32 or INT8) with onnxruntime on the run's test split "
                      "instead of the checkpoint")

  p = _add(sub, "fuse", help="fuse a trained RepVGG run into a plain model run",
                     description="Structural re-parameterization of a trained RepVGG run: every block's "
                                 "branches become one 3x3 conv; the result is written as a checkpoint with a "
                                 "target-mode config in --out, ready for eval (same accuracy).",
                     epilog="example: python -m repopt_jax fuse --workdir runs/repvgg --out runs/repvgg_deploy")
  _common(p, None, workdir="required",
          config_help="the run's config (default: WORKDIR/config.json), then overrides")
  p.add_argument("--out", "-o", metavar="DIR", help="the deployment run directory (default: WORKDIR_deploy)")
  _add_export(sub)
  return parser


def _add_export(sub) -> None:
  p = _add(sub, "export", help="export a trained run to ONNX (fp32 or INT8) or StableHLO",
           description="Exports the eval-mode network of a trained run (RepOpt-VGG or plain VGG in target mode, "
                       "a RepVGG run fused first) with BatchNorm folded into the convs: one conv + bias + ReLU "
                       "per block, global average pooling, a dense head. ONNX (opset 17) is read by "
                       "onnxruntime, TensorRT and OpenVINO; --int8 quantizes it with onnxruntime's static "
                       "quantization (QDQ, symmetric int8 weights, MinMax calibration on training images). "
                       "StableHLO is a serialized jax.export module. The run directory is only read.",
           epilog="examples:\n  python -m repopt_jax export --workdir runs/repopt --out deploy/repopt.onnx\n"
                  "  python -m repopt_jax export --workdir runs/repopt --out deploy/repopt_int8.onnx --int8\n"
                  "  python -m repopt_jax eval --onnx deploy/repopt_int8.onnx --workdir runs/repopt\n"
                  "  python -m repopt_jax export --workdir runs/repvgg --out deploy/repvgg.stablehlo "
                  "--format stablehlo")
  p.add_argument("--workdir", "-w", required=True, metavar="DIR", help="the trained run directory (read-only)")
  p.add_argument("--out", "-o", required=True, metavar="FILE", help="the file to write (its folder is created)")
  p.add_argument("--format", "-f", default="onnx", choices=("onnx", "stablehlo"), help="default: onnx")
  p.add_argument("--int8", action="store_true", help="ONNX only: static INT8 quantization with onnxruntime")
  p.add_argument("--per-channel", action="store_true", help="INT8 weights per output channel (default: per tensor)")
  p.add_argument("--calibration-images", type=int, default=256, metavar="N",
                 help="training images for the INT8 calibration (default: 256)")
  p.add_argument("--batch-size", default="dynamic", metavar="B|dynamic", help="the input batch (default: dynamic)")
  p.add_argument("--layout", default="nhwc", choices=("nhwc", "nchw"), help="input layout (default: nhwc)")
  p.add_argument("--platforms", metavar="LIST",
                 help="StableHLO only: comma-separated jax.export platforms, e.g. cpu,cuda (default: this machine's)")
  p.add_argument("--json", action="store_true", help="print the result as JSON")


def _split_items(items: Sequence[str], sets: Sequence[str], default: Optional[str]):
  """`(config, overrides)` from the positional items (`[CONFIG] [KEY=VALUE ...]`) and `--set` values."""
  from repopt_jax.config import ConfigError  # pylint: disable=g-import-not-at-top

  items = list(items)
  config = default
  if items and ("=" not in items[0] or os.path.exists(items[0])):
    config = items.pop(0)
  for item in items:
    if "=" not in item:
      raise ConfigError(f"{item!r}: expected an override KEY=VALUE (e.g. optim.lr=0.05); the config, if any, "
                        "comes first")
  return config, items + list(sets)


def train_config(config, overrides: Sequence[str] = (), scales: Optional[str] = None):
  """The config of `train`: with `scales`, a RepOpt-VGG run (target model, RepOptimizer, these scales).

  Args:
    config: a shipped config name, a JSON path, a dict or a `Config`.
    overrides: `section.key=value` strings.
    scales: a scales file (.npz from Hyper-Search or an official .pth), or None for the config as it is.

  Returns:
    `(Config, notes)`: notes are one-line messages on what `scales` changed.

  Raises:
    ScalesError: no such scales file. ConfigError: invalid config, or one that cannot take scales.

  The file is only named here: the run reads it once and checks it against the model before building
  anything (`train.read_run_scales`, `RunScales.for_dims`), so scales of another architecture are refused
  there, naming the block or kernel path.
  """
  from repopt_jax.config import ConfigError, load_config  # pylint: disable=g-import-not-at-top
  from repopt_jax.scales import ScalesError  # pylint: disable=g-import-not-at-top

  if scales is None:
    return load_config(config, overrides), []
  path = os.path.abspath(os.path.expanduser(scales))
  if not os.path.isfile(path):
    raise ScalesError(f"{scales}: no such scales file (--scales)")
  cfg = load_config(config, list(overrides) + [f"scales={json.dumps(path)}"])
  notes = []
  mode, name = cfg.model.mode, cfg.optim.name
  if mode == "csla":
    return cfg, [f"training the csla model with the constant scales of {path}"]
  if mode != "target":
    raise ConfigError(f"--scales trains the plain target model with a RepOptimizer, but 'model.mode' = {mode!r}; "
                      "set model.mode=target (or leave --scales out)")
  if name in ("sgd", "adamw"):
    cfg = cfg.replace(f"optim.name=repopt_{name}")
    notes.append(f"--scales: optimizer {name} -> repopt_{name} (Grad Mult from {os.path.basename(path)})")
  return cfg, notes


def _run_config_items(args, default: str):
  """`(config, overrides)` of a command that trains into `--workdir`: the config named on the command line;
  else, when the workdir is a run, its own `config.json` (the run is resumed as it was started, the
  overrides on top); else `default`."""
  from repopt_jax.rundir import RunDir  # pylint: disable=g-import-not-at-top

  config, overrides = _split_items(args.items, args.sets, None)
  if config is None:
    run_dir = RunDir(args.workdir) if args.workdir else None
    config = run_dir.config_file if run_dir is not None and run_dir.has_config else default
  return config, overrides


def _workdir(args, config) -> str:
  if args.workdir:
    return args.workdir
  stem = os.path.splitext(os.path.basename(str(config)))[0] if isinstance(config, str) else "run"
  return os.path.join("runs", stem)


def _user_errors() -> tuple:
  """The library's error classes: reported in one line, without a traceback."""
  from repopt_jax import ScalesError  # pylint: disable=g-import-not-at-top
  from repopt_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  from repopt_jax.data import DatasetError  # pylint: disable=g-import-not-at-top
  from repopt_jax.models import ModelError  # pylint: disable=g-import-not-at-top
  from repopt_jax.train import NonFiniteLossError, WorkdirError  # pylint: disable=g-import-not-at-top
  from repopt_jax.export import ExportError  # pylint: disable=g-import-not-at-top
  from repopt_jax.train.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  return (ConfigError, ScalesError, DatasetError, ModelError, WorkdirError, NonFiniteLossError, ExportError,
          CheckpointError)


def _is_user_error(error: BaseException) -> bool:
  """One of `_user_errors()`, told by class name so that a one-line error does not import the modules that
  define them all (seconds of jax, orbax, tfds) just to compare."""
  names = ("ConfigError", "ScalesError", "DatasetError", "ModelError", "WorkdirError", "NonFiniteLossError",
           "ExportError", "CheckpointError")
  return any(c.__name__ in names and c.__module__.startswith("repopt_jax") for c in type(error).__mro__)


def _say(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


# The extras of pyproject.toml a command needs, and the packages that tell whether each is installed.
_EXTRAS = {"train": ("training", ("tensorflow_datasets", "grain", "tensorboardX", "tqdm", "sklearn", "matplotlib")),
           "deploy": ("deployment", ("onnx", "onnxruntime"))}


def _missing_extras(args) -> Optional[str]:
  """One line naming the extras `args.command` needs that this install lacks, or None.

  `pip install repopt_jax` is the library alone; every command reads data and runs, hence needs [train];
  ONNX export and `eval --onnx` need [deploy] too. Checked with `find_spec` (nothing is imported), before
  the command's modules are, so a core install fails in one line instead of a traceback.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  onnx = (args.command == "export" and args.format == "onnx") or (args.command == "eval" and args.onnx)
  missing, modules = [], []
  for extra in ("train", "deploy") if onnx else ("train",):
    absent = [m for m in _EXTRAS[extra][1] if importlib.util.find_spec(m) is None]
    if absent:
      missing.append(extra)
      modules += absent
  if not missing:
    return None
  command = "eval --onnx" if args.command == "eval" and args.onnx else args.command
  names = " and ".join(_EXTRAS[e][0] for e in missing) + (" extras" if len(missing) > 1 else " extra")
  return (f"error: {command!r} needs the {names}: pip install \"repopt_jax[{','.join(missing)}]\" "
          f"({', '.join(modules)} not installed)")


def _metrics_line(m: dict) -> str:
  parts = [f"step {m.get('step')}"]
  if "eval_top1" in m:
    parts.append(f"test top-1 {100 * m['eval_top1']:.2f}%, top-5 {100 * m['eval_top5']:.2f}%, "
                 f"loss {m['eval_loss']:.4f} ({m['eval_examples']} images)")
  if m.get("train_loss") is not None:
    parts.append(f"train loss {m['train_loss']:.4f}")
  if m.get("images_per_sec") is not None:
    parts.append(f"{m['images_per_sec']:.0f} images/s")
  return ", ".join(parts)


# ------------------------------------------------------------------------------------------------ commands
def _cmd_quickstart(args) -> int:
  from repopt_jax import quickstart as qs  # pylint: disable=g-import-not-at-top

  config, overrides = _split_items(args.items, args.sets, qs.DEFAULT_CONFIG)
  _enable_compilation_cache(args)
  result = qs.quickstart(args.out, config=config, overrides=overrides, progress=not args.no_progress,
                         tensorboard=True,
                         compiler_options=FAST_COMPILE if args.fast_compile else None, log=_say)
  if result.stopped:
    status = int(result.stopped["exit_status"])
    print(f"stopped by {result.stopped['signal']} during {result.stopped['stage']} (exit status {status}); "
          "the quickstart starts over on its next run")
    return status
  print(result.table)
  print(f"\nwall time {result.seconds:.0f} s; table: {result.files['markdown']} and {result.files['json']}; "
        f"curves: {result.files['curves']}; scales: {result.files['scales']} (plots "
        f"{result.files['scales_distribution']}, {result.files['identity_variance_ratio']})")
  return 0


def _cmd_search(args) -> int:
  from repopt_jax.config import load_config  # pylint: disable=g-import-not-at-top
  from repopt_jax.search import search  # pylint: disable=g-import-not-at-top

  name, overrides = _run_config_items(args, "digits_tiny_hs")
  config = load_config(name, overrides)
  workdir = _workdir(args, name)  # search() validates everything, then writes config.json with the run
  _enable_compilation_cache(args)
  result = search(config, workdir, scales_path=args.out, plots=not args.no_plots, progress=not args.no_progress,
                  compiler_options=FAST_COMPILE if args.fast_compile else None)
  if result.metrics.get("preempted"):
    status = int(result.metrics.get("exit_status", 143))
    print(f"stopped by {result.metrics.get('signal')} at step {result.metrics['step']}; checkpoint saved in "
          f"{workdir}: run the same command again to resume (exit status {status})")
    return status
  meta = result.metadata
  print(f"Hyper-Search {meta['arch']} on {meta['dataset']}: {_metrics_line(result.metrics)}")
  print(f"scales: {result.scales_path} ({len(result.scales)} blocks)")
  for path in result.plots:
    print(f"plot: {path}")
  target = {"B1": "imagenet_repopt_b1", "B2": "imagenet_repopt_b2", "L1": "imagenet_repopt_l1",
            "L2": "imagenet_repopt_l2"}.get(meta["arch"], "digits_tiny" if meta["arch"] == "tiny" else "CONFIG")
  print(f"next: python -m repopt_jax train {target} --scales {result.scales_path}  (the plain model, RepOpt-SGD)")
  return 0


def _cmd_train(args) -> int:
  name, overrides = _run_config_items(args, "digits_tiny")
  config, notes = train_config(name, overrides, args.scales)
  from repopt_jax.train import Trainer  # pylint: disable=g-import-not-at-top
  workdir = _workdir(args, name)
  _enable_compilation_cache(args)
  trainer = Trainer(config, workdir, progress=not args.no_progress,
                    compiler_options=FAST_COMPILE if args.fast_compile else None, fresh=args.fresh,
                    write_config=True)
  for note in notes:
    _say(note)
  metrics = trainer.fit()
  if metrics.get("preempted"):
    status = int(metrics.get("exit_status", 143))
    print(f"stopped by {metrics.get('signal')} at step {metrics['step']}; checkpoint saved in {trainer.workdir}: "
          f"run the same command again to resume (exit status {status})")
    return status
  if metrics.get("already_finished"):
    print(f"already finished at step {metrics['step']}; nothing to train ({trainer.workdir}; "
          f"python -m repopt_jax eval --workdir {trainer.workdir} evaluates it)")
    return 0
  print(f"{trainer.summary['arch']} ({config.model.mode}, {config.optim.name}): {_metrics_line(metrics)}")
  print(f"run directory: {trainer.workdir}")
  return 0


def _enable_compilation_cache(args) -> Optional[str]:
  """Turns on JAX's persistent compilation cache in the folder the user chose (`--cache-dir`, else
  `$REPOPT_JAX_CACHE_DIR`, else the XDG default); 'off' leaves it off. Imports jax: called right before a
  command's work, after its arguments and config are checked. Returns the folder, or None."""
  from repopt_jax.config import default_cache_dir, enable_compilation_cache  # pylint: disable=g-import-not-at-top

  directory = (getattr(args, "cache_dir", None) or os.environ.get(ENV_CACHE_DIR)
               or default_cache_dir(os.environ.get("XDG_CACHE_HOME")))
  if directory.strip().lower() in ("off", "none", "0"):
    return None
  return enable_compilation_cache(directory)


def _cmd_eval(args) -> int:
  from repopt_jax.runs import evaluate_run  # pylint: disable=g-import-not-at-top

  if args.onnx:
    return _cmd_eval_onnx(args)
  config, overrides = _split_items(args.items, args.sets, None)
  _enable_compilation_cache(args)
  m = evaluate_run(args.workdir, config, overrides=overrides,
                   compiler_options=FAST_COMPILE if args.fast_compile else None)
  if args.json:
    print(json.dumps(m))
  else:
    print(f"{args.workdir}: {m['arch']} ({m['mode']}, {m['params']} params): {_metrics_line(m)}")
  return 0


def _cmd_fuse(args) -> int:
  from repopt_jax.runs import fuse_run  # pylint: disable=g-import-not-at-top

  config, overrides = _split_items(args.items, args.sets, None)
  _enable_compilation_cache(args)
  out = args.out or os.path.normpath(args.workdir) + "_deploy"
  r = fuse_run(args.workdir, out, config, overrides=overrides,
               compiler_options=FAST_COMPILE if args.fast_compile else None)
  print(f"fused {args.workdir} (RepVGG, {r['params_train']} params) -> {r['out_dir']} (plain, "
        f"{r['params_deploy']} params) at step {r['step']}; largest logit difference on a test batch "
        f"{r['max_abs_logit_diff']:.2e} (logits up to {r['max_abs_logit']:.2f})")
  print(f"next: python -m repopt_jax eval --workdir {r['out_dir']}")
  return 0


def _cmd_eval_onnx(args) -> int:
  from repopt_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  from repopt_jax.export import evaluate_onnx  # pylint: disable=g-import-not-at-top

  if args.items or args.sets:
    raise ConfigError("eval --onnx takes no config or overrides: the file is evaluated on the run's own "
                      "config.json")
  _enable_compilation_cache(args)
  m = evaluate_onnx(args.onnx, args.workdir)
  if args.json:
    print(json.dumps(m))
  else:
    print(f"{args.onnx} ({m['bytes'] / 1e6:.2f} MB, onnxruntime CPU) on the test split of {args.workdir}: "
          f"top-1 {100 * m['eval_top1']:.2f}%, top-5 {100 * m['eval_top5']:.2f}%, loss {m['eval_loss']:.4f} "
          f"({m['eval_examples']} images, {m['images_per_sec']:.0f} images/s)")
  return 0


def _cmd_export(args) -> int:
  from repopt_jax.export import export_run  # pylint: disable=g-import-not-at-top

  r = export_run(args.workdir, args.out, format=args.format, int8=args.int8,
                 calibration_images_count=args.calibration_images, batch_size=args.batch_size,
                 layout=args.layout, per_channel=args.per_channel,
                 platforms=[x.strip() for x in args.platforms.split(",") if x.strip()] if args.platforms else None)
  if args.json:
    print(json.dumps(r))
    return 0
  kind = "ONNX opset 17" if r["format"] == "onnx" else "StableHLO (jax.export)"
  if r["int8"]:
    kind += f", INT8 QDQ ({'per-channel' if r['per_channel'] else 'per-tensor'} weights; "
    kind += f"{r['bytes'] / r['fp32_bytes']:.2f}x the fp32 file's {r['fp32_bytes'] / 1e6:.2f} MB)"
  print(f"exported {args.workdir} ({r['arch']}, {r['mode']}; {r['convs']} conv + bias + ReLU layers, "
        f"{r['params']} params) -> {r['out']} ({kind}, {r['bytes'] / 1e6:.2f} MB, batch {r['batch_size']}, "
        f"{r['layout'].upper()} {r['image_size']}x{r['image_size']})")
  print(f"max |logit difference| to the JAX model on {r['compared_images']} test images: "
        f"{r['max_abs_logit_diff']:.2e} (logits up to {r['max_abs_logit']:.2f})")
  if r["format"] == "onnx":
    print(f"next: python -m repopt_jax eval --onnx {r['out']} --workdir {args.workdir}")
  return 0


_HANDLERS = {"quickstart": _cmd_quickstart, "search": _cmd_search, "train": _cmd_train, "eval": _cmd_eval,
             "fuse": _cmd_fuse, "export": _cmd_export}


def _unknown_command(argv: Sequence[str]) -> Optional[str]:
  """One line for a mistyped command (`serch` -> did you mean 'search'?), or None."""
  if not argv or argv[0].startswith("-") or argv[0] in COMMANDS:
    return None
  close = difflib.get_close_matches(argv[0], COMMANDS, n=1, cutoff=0.5)
  hint = f"; did you mean {close[0]!r}?" if close else ""
  return f"error: unknown command {argv[0]!r}{hint} (commands: {', '.join(COMMANDS)}; see repopt-jax --help)"


def parse_args(argv: Sequence[str], parser: Optional[argparse.ArgumentParser] = None) -> argparse.Namespace:
  """Parses a command line; overrides (`KEY=VALUE`) may come before or after the options.

  Raises:
    SystemExit: for --help, --version and usage errors (printed on one line).
  """
  parser = parser or build_parser()
  # argparse leaves positionals that follow an option unparsed (`train CONFIG --scales F key=value`); they
  # are overrides when they look like one.
  args, extra = parser.parse_known_args(list(argv))
  unknown = [a for a in extra if a.startswith("-") or "=" not in a]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  if extra:
    args.items = list(getattr(args, "items", [])) + extra
  if getattr(args, "conv", None):  # last, so that it wins over a model.conv_impl=... among the overrides
    args.sets = list(args.sets) + [f"model.conv_impl={args.conv}"]
  return args


def _quiet_closed_event_loops() -> None:
  """orbax's background threads of a failed save may still post to their closed asyncio loop when the process
  stops: `RuntimeError('Event loop is closed')` then prints tracebacks that bury the one-line error. Those
  (and only those) are dropped."""
  import threading  # pylint: disable=g-import-not-at-top

  def closed_loop(exc) -> bool:
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)

  previous_unraisable, previous_thread = sys.unraisablehook, threading.excepthook

  def unraisable(info):
    if not closed_loop(info.exc_value):
      previous_unraisable(info)

  def thread_hook(args):
    if not closed_loop(args.exc_value):
      previous_thread(args)

  sys.unraisablehook, threading.excepthook = unraisable, thread_hook


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the command line; returns the exit status (0 ok, 2 for a user error, 128 + N for a run stopped by
  signal N after saving: 143 SIGTERM, 130 SIGINT)."""
  from repopt_jax.config import disable_compilation_cache  # pylint: disable=g-import-not-at-top
  try:
    return _main(argv)
  finally:
    disable_compilation_cache()  # jax's settings as they were (main() may be called as a library function)


def _main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  message = _unknown_command(argv)
  if message:
    print(message, file=sys.stderr)
    return 2
  parser = build_parser()
  try:
    args = parse_args(argv, parser)
  except SystemExit as e:  # --help, --version, or a usage error already printed on one line
    return int(e.code or 0)
  if args.command is None:
    parser.print_help()
    return 2
  missing = _missing_extras(args)
  if missing:
    print(missing, file=sys.stderr)
    return 2
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  logging.getLogger("repopt_jax").setLevel(logging.INFO)
  # tfds and orbax log routine notices through absl ("Variant folder ... has no dataset_info.json" while
  # probing an unprepared dataset); the library reports what matters itself.
  # orbax logs a failed background save with tracebacks from several threads: the trainer reports it in one
  # line (CheckpointError), so absl's own records are kept to the critical ones.
  logging.getLogger("absl").setLevel(logging.CRITICAL)
  _quiet_closed_event_loops()
  # The library's warnings (e.g. a checkpoint skipped for a checksum mismatch) in one line each.
  import warnings  # pylint: disable=g-import-not-at-top
  warnings.formatwarning = lambda message, category, *_: f"warning: {message} ({category.__name__})\n"
  previous = _terminate_on_sigterm()
  try:
    return _HANDLERS[args.command](args)
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130
  except _Terminated:
    print("error: terminated (SIGTERM)", file=sys.stderr)
    return 143
  except Exception as e:  # pylint: disable=broad-except
    if _is_user_error(e):
      text = " ".join(str(e).split()) or type(e).__name__
      print(f"error: {text}", file=sys.stderr)
      return 2
    if type(e).__name__ != "PeerError":
      raise
    from repopt_jax.train.mesh import _exit_now  # pylint: disable=g-import-not-at-top
    _exit_now(" ".join(str(e).split()))  # at once: jax's exit handlers would wait for the lost process
    return 2
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
  """SIGTERM outside a training loop (which saves and stops on its own): the command stops like on Ctrl-C."""


def _terminate_on_sigterm():
  """SIGTERM raises `_Terminated` (exit status 143, as the shell reports a process it killed), so that every
  command ends with one line whenever the signal comes (building a run, between the quickstart's runs, ...);
  the trainer installs its own handler while it trains. Returns the previous handler (None off the main
  thread, where signals cannot be handled)."""
  import threading  # pylint: disable=g-import-not-at-top
  if threading.current_thread() is not threading.main_thread():
    return None

  def handler(signum, frame):
    del signum, frame
    raise _Terminated()

  return signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
  sys.exit(main())
