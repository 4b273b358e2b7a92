"""Fault injection on the digits config (issue 10): every case that used to lose work or mislead.

One short run (6 steps, checkpoints at 2, 4, 6) is trained once; each test works on a copy of it. The faults:
bit flips and truncation in checkpoint files, every checkpoint corrupt, a saved data position that does not
fit (another worker count, another process count), another device count, a full disk (a file-size limit),
signals and their exit statuses, a second Ctrl-C during the save, resume messages, a changed scales file,
bad input that must leave nothing behind, and read-only commands on a read-only mount. And the run directory
two processes cannot corrupt (issue 18): a second `train` on a run being trained is refused in one line, a
dead holder's lock is taken over, `train --workdir` resumes the run's own config, unreadable checkpoints
leave no background read behind, and the quickstart stops on a signal like `train`.
"""

import dataclasses
import glob
import json
import os
import gc
import logging
import resource
import shutil
import signal
import socket
import subprocess
import threading
import sys
import time

import chex
import jax
import numpy as np
import pytest

from repopt_jax import runs, save_scales
from repopt_jax.cli import main
from repopt_jax.config import ConfigError, load_config
from repopt_jax.models import reparam
from repopt_jax.rundir import RunLock
from repopt_jax.train import Trainer, build_model, read_jsonl
from repopt_jax.train.checkpoint import CheckpointError, CheckpointWarning
from test_train_common import FAST, REPO, digits_dir, host_params, python_env, tree_snapshot

STEPS = 6
HOST = socket.gethostname()
BASE = ["train.epochs=null", f"train.steps={STEPS}", "train.batch_size=32", "train.checkpoint_every=2",
        "train.keep_checkpoints=3", "train.log_every=1", "optim.warmup_epochs=0"]


@pytest.fixture(scope="module")
def ddir(tmp_path_factory):
  return digits_dir(tmp_path_factory)


_CACHE = {}


@pytest.fixture(scope="module", autouse=True)
def _shared_compilation_cache(tmp_path_factory):
  """The child processes share one compilation cache: the first compiles the digits step, the others load it."""
  _CACHE["dir"] = str(tmp_path_factory.mktemp("jax_cache"))
  yield


def _child_env(device_count=1, **extra):
  return dict(python_env(device_count), REPOPT_JAX_CACHE_DIR=_CACHE["dir"], **extra)


def _overrides(ddir, *extra):
  return [f"data.data_dir={ddir}", *BASE, *extra]


@pytest.fixture(scope="module")
def base(ddir, tmp_path_factory):
  """A finished 6-step run (checkpoints 2, 4, 6 and config.json) and its final params."""
  work = str(tmp_path_factory.mktemp("faults") / "base")
  trainer = Trainer("digits_tiny", work, overrides=_overrides(ddir), progress=False, tensorboard=False,
                    compiler_options=FAST, write_config=True)
  trainer.fit(evaluate=False)
  return work, host_params(trainer.state)


def _written(work) -> dict:
  """`tree_snapshot` of a run but its `run.lock`: a command that writes into a run takes the lock (and writes
  its name in it) before it may refuse; everything else must stay as it was."""
  snap = tree_snapshot(work)
  snap.pop("run.lock", None)
  return snap


def _copy(base, tmp_path, name="run") -> str:
  dest = str(tmp_path / name)
  shutil.copytree(base[0], dest)
  return dest


def _steps(work):
  return sorted(os.listdir(os.path.join(work, "checkpoints")))


def _state_files(work, step):
  """The files of a checkpoint's `state` item, largest first (the array bytes are in the large ones; which
  file holds the params and which the optimizer state varies from one save to the next)."""
  files = [p for p in glob.glob(os.path.join(work, "checkpoints", str(step), "state", "**"), recursive=True)
           if os.path.isfile(p) and os.path.getsize(p) > 1024]
  return sorted(files, key=os.path.getsize, reverse=True)


def _raw_params(work, step):
  """The params of a checkpoint as orbax alone restores them (no checksum verification)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  m = ocp.CheckpointManager(os.path.join(work, "checkpoints"),
                            options=ocp.CheckpointManagerOptions(read_only=True, create=False),
                            item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  tree = m.item_metadata(step)["state"].tree
  target = {"params": jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), tree["params"])}
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  try:
    return m.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=args, partial_restore=True)))["state"]["params"]
  finally:
    m.close()


def _flip_silently(work, step):
  """Flips 8 bytes of a checkpoint's array data where orbax restores the params without any error (the
  silent corruption of the issue); returns `(file, offset)`."""
  clean = _raw_params(work, step)
  for path in _state_files(work, step):
    with open(path, "rb") as f:
      blob = f.read()
    for offset in range(512, len(blob) - 8, max(len(blob) // 40, 1)):
      bad = bytearray(blob)
      bad[offset:offset + 8] = bytes(b ^ 0xFF for b in blob[offset:offset + 8])
      with open(path, "wb") as f:
        f.write(bad)
      try:
        got = _raw_params(work, step)
      except Exception:  # pylint: disable=broad-except
        continue
      if any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(clean))):
        return path, offset
    with open(path, "wb") as f:  # this file holds no params (or none that flip silently): restore it
      f.write(blob)
  raise AssertionError("no offset flips a param silently")


def _model_params(model) -> dict:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _cli(capsys, argv):
  code = main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


# ------------------------------------------------------------------------------------------------ load_model
def test_load_model_restores_the_newest_checkpoint_read_only(base, tmp_path):
  work = _copy(base, tmp_path)
  assert os.path.getsize(os.path.join(work, "run.lock")) == 0  # the training run released its lock cleanly
  lock = RunLock(os.path.join(work, "run.lock"))
  lock.acquire()  # as if a trainer were writing the run right now: reading it takes no lock
  before = tree_snapshot(work)
  try:
    model, config = runs.load_model(work)
    after = tree_snapshot(work)
  finally:
    lock.release()
  assert config.data.dataset == "digits" and config.train.steps == STEPS
  assert after == before  # nothing created, renamed or deleted, not even temporarily
  expected = {k[len("params"):]: v for k, v in base[1].items() if k.startswith("params")}
  got = {jax.tree_util.keystr(p): np.asarray(v) for p, v in
         jax.tree_util.tree_flatten_with_path(_model_params(model))[0]}
  assert got.keys() == expected.keys()
  chex.assert_trees_all_equal(got, expected)
  # Eval mode: every BatchNorm uses its running statistics.
  from flax import nnx  # pylint: disable=g-import-not-at-top
  norms = [m for _, m in model.iter_modules() if isinstance(m, nnx.BatchNorm)]
  assert norms and all(m.use_running_average for m in norms)


# ------------------------------------------------------------------------------------------------ item 3
def test_flipped_bytes_fail_the_checksum_and_the_previous_checkpoint_is_used(base, tmp_path):
  work = _copy(base, tmp_path)
  _flip_silently(work, 6)
  step4, _ = runs.load_model(base[0], step=4)
  before = tree_snapshot(work)
  with pytest.warns(CheckpointWarning, match=r"6 is unreadable \(checksum mismatch in \['"):
    model, _ = runs.load_model(work)
  chex.assert_trees_all_equal(_model_params(model), _model_params(step4))
  assert tree_snapshot(work) == before  # read-only: the bad checkpoint is reported, not moved

  # Training (not read-only) moves it aside so that step 6 can be saved again, and resumes from step 4.
  trainer = Trainer(load_config(os.path.join(work, "config.json")), work, progress=False, tensorboard=False,
                    compiler_options=FAST)
  with pytest.warns(CheckpointWarning, match="checksum"):
    out = trainer.fit(evaluate=False)
  assert out["resumed_from"] == 4 and out["step"] == STEPS
  assert "6.corrupt" in _steps(work)
  chex.assert_trees_all_equal(host_params(trainer.state), base[1])


# ------------------------------------------------------------------------------------------------ item 2
def _truncate_every_checkpoint(work):
  for step in (2, 4, 6):
    path = _state_files(work, step)[0]  # the full restore reads every file of the item
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 3)


def test_all_checkpoints_unreadable_stops_in_one_line_then_fresh_is_a_clean_run(base, tmp_path, capsys):
  work = _copy(base, tmp_path)
  _truncate_every_checkpoint(work)
  before = _written(work)
  cfg = os.path.join(tmp_path, "config.json")
  shutil.copy(os.path.join(work, "config.json"), cfg)
  code, out, err = _cli(capsys, ["train", cfg, "--workdir", work, "--no-progress", "--fast-compile"])
  lines = [l for l in err.splitlines() if l.strip()]
  assert code == 2 and len(lines) == 1 and lines[0].startswith("error: no checkpoint in"), err
  assert all(f"step {s}:" in lines[0] for s in (6, 4, 2)) and "--fresh" in lines[0]
  assert _written(work) == before  # nothing renamed before asking

  code, out, err = _cli(capsys, ["train", cfg, "--workdir", work, "--no-progress", "--fast-compile", "--fresh"])
  assert code == 0, err
  assert os.path.isdir(os.path.join(work, "checkpoints.old", "6"))  # kept aside, not deleted
  trainer = Trainer(load_config(os.path.join(work, "config.json")), work, progress=False, tensorboard=False)
  assert trainer.restore() == STEPS
  chex.assert_trees_all_equal(host_params(trainer.state), base[1])  # exactly the clean run
  train = [r["step"] for r in read_jsonl(os.path.join(work, "metrics.jsonl")) if r["kind"] == "train"]
  assert train == list(range(1, STEPS + 1))


_FIVE_TRAINS = r"""
import sys
from repopt_jax.cli import main
codes = [main(["train", "--workdir", sys.argv[1], "--no-progress", "--fast-compile"]) for _ in range(5)]
print(codes)
"""


def test_unreadable_checkpoints_leave_no_background_read_behind(base, tmp_path):
  """orbax reads a checkpoint's arrays in one gather on an event loop it closes when the gather ends: the
  reads still running when the first one fails used to end later with an exception nobody retrieved ("Task
  exception was never retrieved" printed at some later garbage collection, about one CLI run in eight) or
  call back into the closed loop ("Event loop is closed", every time). Every read is awaited now."""
  from repopt_jax.train.build import build_run  # pylint: disable=g-import-not-at-top
  from repopt_jax.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top

  work = _copy(base, tmp_path)
  _truncate_every_checkpoint(work)
  like = build_run(load_config(os.path.join(work, "config.json"))).state
  stray = []
  hooks = sys.unraisablehook, threading.excepthook
  handler = logging.Handler()
  handler.emit = lambda record: stray.append(record.getMessage()[:200])
  logging.getLogger("asyncio").addHandler(handler)
  sys.unraisablehook = lambda info: stray.append(repr(info.exc_value)[:200])
  threading.excepthook = lambda args: stray.append(repr(args.exc_value)[:200])
  try:
    for _ in range(5):
      ckpt = Checkpointer(os.path.join(work, "checkpoints"), read_only=True)
      with pytest.raises(CheckpointError, match="no checkpoint in"):
        ckpt.restore(like)
      ckpt.close()
      time.sleep(0.05)  # a read left running would call back now
      gc.collect()      # and one that ended unretrieved is reported when collected
  finally:
    sys.unraisablehook, threading.excepthook = hooks
    logging.getLogger("asyncio").removeHandler(handler)
  assert not stray, stray[:3]

  # The command line, five times in one process (and its exit): exactly one line each.
  proc = subprocess.run([sys.executable, "-c", _FIVE_TRAINS, work], capture_output=True, text=True,
                        env=_child_env(), cwd=REPO, timeout=300, check=False)
  assert proc.returncode == 0 and proc.stdout.strip() == "[2, 2, 2, 2, 2]", proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 5 and all(l.startswith("error: no checkpoint in") for l in lines), proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ item 1
def test_resume_with_another_worker_count_or_process_count_is_bit_identical(base, ddir, tmp_path, caplog):
  for name, extra, fake_processes in (("workers", ["data.worker_count=1"], False), ("processes", [], True)):
    work = _copy(base, tmp_path, name)
    shutil.rmtree(os.path.join(work, "checkpoints", "6"))  # killed after step 6, before its checkpoint
    if fake_processes:  # as if written by 2 processes: no state file for a single process
      data = os.path.join(work, "checkpoints", "4", "data")
      os.rename(os.path.join(data, "process_0-of-1.json"), os.path.join(data, "process_0-of-2.json"))
      shutil.copy(os.path.join(data, "process_0-of-2.json"), os.path.join(data, "process_1-of-2.json"))
    caplog.clear()
    trainer = Trainer("digits_tiny", work, overrides=_overrides(ddir, *extra), progress=False, tensorboard=False,
                      compiler_options=FAST)
    out = trainer.fit(evaluate=False)
    assert out["resumed_from"] == 4, name
    assert "data position re-derived from step 4" in caplog.text, name
    assert not [s for s in _steps(work) if "corrupt" in s], name
    chex.assert_trees_all_equal(host_params(trainer.state), base[1])


def test_seek_gives_the_batches_of_an_iterator_that_read_up_to_there(ddir):
  from repopt_jax import data  # pylint: disable=g-import-not-at-top
  for workers in (0,):  # worker processes: test_resume_with_another_worker_count_...
    kw = dict(global_batch_size=32, train=True, seed=1, data_dir=ddir, worker_count=workers, process_index=1,
              process_count=2)
    ref = data.make_iterator("digits", **kw)
    expected = [next(ref) for _ in range(7)][5:]
    it = data.make_iterator("digits", **kw)
    data.seek(it, 5, process_index=1, process_count=2, worker_count=workers)
    chex.assert_trees_all_equal([next(it) for _ in range(2)], expected)


def test_resume_on_another_number_of_devices_continues(base, ddir, tmp_path):
  work = _copy(base, tmp_path)
  shutil.rmtree(os.path.join(work, "checkpoints", "6"))
  trainer = Trainer("digits_tiny", work, overrides=_overrides(ddir), devices=jax.devices()[:2], progress=False,
                    tensorboard=False, compiler_options=FAST)
  out = trainer.fit(evaluate=False)
  assert out["resumed_from"] == 4 and out["step"] == STEPS and trainer.run.mesh.size == 2
  chex.assert_trees_all_close(host_params(trainer.state), base[1], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare and root")
def test_eval_works_on_a_read_only_mount_and_writes_nothing(base, tmp_path):
  work = _copy(base, tmp_path)
  mnt = str(tmp_path / "ro")
  os.makedirs(mnt)
  before = tree_snapshot(work)
  script = (f"mount --bind {work} {mnt} && mount -o remount,bind,ro {mnt} && touch {mnt}/probe 2>/dev/null; "
            f"{sys.executable} -m repopt_jax eval --workdir {mnt} --json --fast-compile")
  env = _child_env()
  proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=env, cwd=REPO,
                        timeout=300, check=False)
  if "mount:" in proc.stderr and proc.returncode:
    pytest.skip(f"cannot bind-mount read-only here: {proc.stderr[-300:]}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == STEPS
  assert tree_snapshot(work) == before


# ------------------------------------------------------------------------------------------------ item 4
_DISK_FULL = r"""
import resource, signal, sys
from repopt_jax.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)           # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000))  # a 'full disk' for any file over 60 kB
sys.exit(main(sys.argv[1:]))
"""


def test_a_failed_save_stops_the_run_at_once_in_one_line(base, tmp_path):
  work = _copy(base, tmp_path)
  proc = subprocess.run([sys.executable, "-c", _DISK_FULL, "train", os.path.join(work, "config.json"), "--workdir", work, "--no-progress",
                         "--fast-compile", "train.steps=12"], capture_output=True, text=True,
                        env=_child_env(), cwd=REPO, timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "saving the checkpoint of step 8" in errors[0], proc.stderr[-2000:]
  assert "last good checkpoint (step 6)" in errors[0]
  train = [r["step"] for r in read_jsonl(os.path.join(work, "metrics.jsonl")) if r["kind"] == "train"]
  assert max(train) <= 10  # stopped at the first step boundary that saw the failure, not at the end (12)
  model, _ = runs.load_model(work)  # the last good checkpoint is intact
  assert "6" in _steps(work)


# ------------------------------------------------------------------------------------------------ item 5
def _spawn_cli(args, log):
  return subprocess.Popen([sys.executable, "-m", "repopt_jax", *map(str, args)], stdout=log,
                          stderr=subprocess.STDOUT, env=_child_env(), cwd=REPO)


def test_a_stopped_run_exits_with_128_plus_the_signal(base, tmp_path):
  cases = {signal.SIGTERM: 143, signal.SIGINT: 130}
  runs_ = {}
  for sig in cases:  # both at once: two processes
    work = _copy(base, tmp_path, sig.name)
    log = open(tmp_path / f"{sig.name}.log", "w")  # pylint: disable=consider-using-with
    proc = _spawn_cli(["train", os.path.join(work, "config.json"), "--workdir", work,  # with the progress bar
                       "--fast-compile", "train.steps=100000"], log)
    runs_[sig] = (work, log, proc, len(read_jsonl(os.path.join(work, "metrics.jsonl"))))
  try:
    deadline = time.time() + 240
    waiting = dict(runs_)
    while waiting:
      for sig, (work, log, proc, n0) in list(waiting.items()):
        if len(read_jsonl(os.path.join(work, "metrics.jsonl"))) >= n0 + 3:  # resumed and training
          proc.send_signal(sig)
          del waiting[sig]
        assert proc.poll() is None and time.time() < deadline, (tmp_path / f"{sig.name}.log").read_text()[-3000:]
      time.sleep(0.05)
    codes = {sig: proc.wait(timeout=120) for sig, (_, _, proc, _) in runs_.items()}
  finally:
    for work, log, proc, _ in runs_.values():
      if proc.poll() is None:
        proc.kill()
      log.close()
  for sig, status in cases.items():
    text = (tmp_path / f"{sig.name}.log").read_text()
    assert codes[sig] == status, text[-3000:]
    assert f"stopped by {sig.name}" in text and "Traceback" not in text
    assert "resumed from step 6" in text and "compiling the train step" in text  # a line, not a bar at 0%
    assert max(int(s) for s in _steps(runs_[sig][0]) if s.isdigit()) > STEPS  # saved where it stopped


def _lines(path) -> int:
  """Complete lines of a file another process is appending to."""
  try:
    with open(path, encoding="utf-8") as f:
      return sum(1 for line in f if line.endswith("\n"))
  except FileNotFoundError:
    return 0


def _wait_for_records(proc, path, n, log_path, timeout=240):
  deadline = time.time() + timeout
  while _lines(path) < n:
    assert proc.poll() is None and time.time() < deadline, open(log_path).read()[-3000:]
    time.sleep(0.05)


def test_a_second_train_on_a_run_being_trained_is_refused_in_one_line(base, tmp_path):
  work = _copy(base, tmp_path)
  metrics = os.path.join(work, "metrics.jsonl")
  argv = ["train", "--workdir", work, "--no-progress", "--fast-compile", "train.steps=100000"]
  log_path = tmp_path / "first.log"
  with open(log_path, "w") as log:
    first = _spawn_cli(argv, log)
    try:
      _wait_for_records(first, metrics, _lines(metrics) + 3, log_path)  # resumed and training
      second = subprocess.run([sys.executable, "-m", "repopt_jax", *argv], capture_output=True, text=True,
                              env=_child_env(), cwd=REPO, timeout=300, check=False)
      assert first.poll() is None, log_path.read_text()[-3000:]  # untouched: still training
      first.send_signal(signal.SIGTERM)
      code = first.wait(timeout=120)
    finally:
      if first.poll() is None:
        first.kill()
  lines = [l for l in second.stderr.splitlines() if l.strip()]
  assert second.returncode == 2 and len(lines) == 1 and not second.stdout.strip(), second.stderr[-3000:]
  assert lines[0] == (f"error: another process (pid {first.pid} on host {HOST}) holds the run {work} "
                      f"({work}/run.lock); wait for it to finish, stop it, or use another --workdir"), lines[0]
  text = log_path.read_text()
  assert code == 143 and "stopped by SIGTERM" in text and "error" not in text and "Traceback" not in text, text
  train = [r["step"] for r in read_jsonl(metrics) if r["kind"] == "train"]
  assert train == list(range(1, max(train) + 1)) and max(train) > STEPS  # each step once, none lost
  assert not [s for s in _steps(work) if not s.isdigit()]  # nothing moved aside as corrupt
  assert runs.load_model(work)[0] is not None
  assert os.path.getsize(os.path.join(work, "run.lock")) == 0  # released


def test_a_dead_holders_lock_is_taken_over_with_a_notice(base, tmp_path, capsys, caplog):
  work = _copy(base, tmp_path)
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  with open(os.path.join(work, "run.lock"), "w") as f:  # what a SIGKILLed trainer leaves: its name, no flock
    json.dump({"pid": dead.pid, "host": HOST, "since": "2024-01-01T00:00:00"}, f)
  caplog.clear()
  code, out, err = _cli(capsys, ["train", os.path.join(work, "config.json"), "--workdir", work, "--no-progress",
                                 "--fast-compile"])
  assert code == 0 and out.startswith(f"already finished at step {STEPS}"), out + err
  assert (f"took over the stale lock of {work} (pid {dead.pid} on host {HOST} is gone; it did not finish "
          "cleanly)") in caplog.text + err
  assert os.path.getsize(os.path.join(work, "run.lock")) == 0


def test_train_with_only_a_workdir_resumes_its_own_config(base, tmp_path, capsys, caplog):
  """Before: the digits_tiny defaults were applied and refused ("'train.batch_size' is 32 there and 64 here")."""
  work = _copy(base, tmp_path)
  caplog.clear()
  code, out, err = _cli(capsys, ["train", "--workdir", work, "--no-progress", "--fast-compile", "train.steps=8"])
  assert code == 0 and "step 8" in out, out + err
  assert "resumed from step 6 of 8" in caplog.text + err
  saved = load_config(os.path.join(work, "config.json"))
  assert saved.train.steps == 8 and saved.train.batch_size == 32  # the run's own config, the override on top
  # An override that makes it another run is refused by the same-run rule, naming the key.
  code, out, err = _cli(capsys, ["train", "--workdir", work, "--no-progress", "optim.lr=0.5"])
  assert code == 2 and "'optim.lr' is 0.1 there and 0.5 here" in err, err


_QUICK = ["train.epochs=null", "train.steps=100000", "train.log_every=1", "train.eval_every=0",
          "optim.warmup_epochs=0", "--fast-compile", "--no-progress"]


def test_the_quickstart_stopped_by_a_signal_exits_with_128_plus_the_signal(ddir, tmp_path):
  cases = {signal.SIGTERM: 143, signal.SIGINT: 130}
  procs = {}
  for sig in cases:  # both at once: two processes
    out = tmp_path / sig.name
    log = open(tmp_path / f"{sig.name}.log", "w")  # pylint: disable=consider-using-with
    procs[sig] = (out, log, _spawn_cli(["quickstart", "--out", out, f"data.data_dir={ddir}", *_QUICK], log))
  try:
    for sig, (out, log, proc) in procs.items():
      _wait_for_records(proc, out / "hs" / "metrics.jsonl", 3, tmp_path / f"{sig.name}.log")  # training
      proc.send_signal(sig)
    codes = {sig: proc.wait(timeout=120) for sig, (_, _, proc) in procs.items()}
  finally:
    for _, log, proc in procs.values():
      if proc.poll() is None:
        proc.kill()
      log.close()
  for sig, status in cases.items():
    text = (tmp_path / f"{sig.name}.log").read_text()
    assert codes[sig] == status, text[-3000:]
    assert f"stopped by {sig.name} during [1/4] Hyper-Search (exit status {status})" in text, text[-3000:]
    assert "Traceback" not in text and "[2/4]" not in text, text[-3000:]
    out = procs[sig][0]
    assert not os.path.exists(out / "repopt_vgg") and runs.load_model(out / "hs")[0] is not None


def test_a_second_ctrl_c_during_the_save_does_not_drop_it(base, ddir, tmp_path, monkeypatch):
  from repopt_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top

  work = _copy(base, tmp_path)
  save = ckpt_lib.Checkpointer.save

  def save_interrupted(self, *args, **kwargs):
    if trainer._stop_signal is not None:  # pylint: disable=protected-access
      signal.raise_signal(signal.SIGINT)  # the impatient second Ctrl-C, while the checkpoint is written
    return save(self, *args, **kwargs)

  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save_interrupted)
  trainer = Trainer("digits_tiny", work, overrides=_overrides(ddir, "train.steps=20"), progress=False,
                    tensorboard=False, compiler_options=FAST)
  out = trainer.fit(on_step=lambda s: signal.raise_signal(signal.SIGINT) if s == 9 else None, evaluate=False)
  assert out["preempted"] and out["signal"] == "SIGINT" and out["exit_status"] == 130 and out["step"] == 9
  monkeypatch.undo()
  assert "9" in _steps(work) and runs.load_model(work)[0] is not None


# ------------------------------------------------------------------------------------------------ item 6
def test_resume_says_so_and_metrics_hold_each_step_once(base, tmp_path, capsys, caplog):
  work = _copy(base, tmp_path)
  cfg = os.path.join(work, "config.json")
  code, out, err = _cli(capsys, ["train", cfg, "--workdir", work, "--no-progress", "--fast-compile"])
  assert code == 0 and out.startswith(f"already finished at step {STEPS}; nothing to train"), out + err
  assert "images/s" not in out

  shutil.rmtree(os.path.join(work, "checkpoints", "6"))  # killed after logging steps 5 and 6, before saving 6
  caplog.clear()
  code, out, err = _cli(capsys, ["train", cfg, "--workdir", work, "--no-progress", "--fast-compile",
                                 "train.steps=8"])
  assert code == 0, err
  assert "resumed from step 4" in caplog.text + err
  train = [r["step"] for r in read_jsonl(os.path.join(work, "metrics.jsonl")) if r["kind"] == "train"]
  assert train == list(range(1, 9))


def _scales_file(path, factor):
  hs = build_model(load_config("digits_tiny_hs"), num_classes=10, in_channels=1, seed=3)
  scales = {k: dataclasses.replace(s, conv=s.conv * factor) for k, s in reparam.scales_from_hs(hs).items()}
  save_scales(path, scales, {"arch": "tiny"})
  return scales


def test_resume_with_other_scales_is_refused(ddir, tmp_path, capsys):
  a, b = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
  _scales_file(a, 1.3)
  _scales_file(b, 0.7)
  work = str(tmp_path / "repopt")
  argv = ["train", "--workdir", work, "--no-progress", "--fast-compile", f"data.data_dir={ddir}",
          "train.epochs=null", "train.steps=2"]
  assert _cli(capsys, argv + ["--scales", a])[0] == 0
  shutil.copy(b, a)  # the same path, other values
  before = _written(work)
  code, out, err = _cli(capsys, argv + ["--scales", a, "train.steps=4"])
  assert code == 2 and "error:" in err and "scales" in err and "another run" in err, err
  assert _written(work) == before


# ------------------------------------------------------------------------------------------------ item 7
def test_bad_input_is_refused_in_one_line_and_leaves_nothing_behind(base, ddir, tmp_path, capsys):
  hs = build_model(load_config("digits_tiny_hs"), num_classes=10, in_channels=1, seed=3)
  scales = reparam.scales_from_hs(hs)
  name = sorted(scales)[1]
  s = scales[name]
  scales[name] = dataclasses.replace(s, conv=np.zeros_like(s.conv),
                                     pointwise=None if s.pointwise is None else np.zeros_like(s.pointwise))
  zero = str(tmp_path / "zero.npz")
  save_scales(zero, scales, {"arch": "tiny"})
  corrupt = tmp_path / "corrupt.npz"
  corrupt.write_bytes(os.urandom(4000))
  d = f"data.data_dir={ddir}"
  cases = [
      (["train", "--scales", zero, d], f"block {name!r} has every branch scale zero"),
      (["train", "--scales", str(corrupt), d], "neither a repopt_jax .npz scales file nor an official PyTorch"),
      (["train", d, "optim.lr=NaN"], "'optim.lr' = nan is not a finite number"),
      (["train", d, "optim.lr=Infinity"], "'optim.lr' = inf is not a finite number"),
      (["train", d, "train.batch_size=2000", "train.eval_batch_size=8"], "larger than the 1437 examples"),
  ]
  for i, (argv, message) in enumerate(cases):
    work = tmp_path / f"w{i}" / "run"
    code, out, err = _cli(capsys, [*argv, "--workdir", work, "--no-progress"])
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:") and message in err, (argv, err)
    assert not os.path.exists(tmp_path / f"w{i}"), argv  # not even the parent it would have created

  # fuse names the mode of a non-RepVGG run; eval on a plain file says it is not a directory.
  hs_run = _copy(base, tmp_path, "hs_run")
  cfg = json.loads(open(os.path.join(hs_run, "config.json")).read())
  cfg["model"]["mode"] = "hs"
  with open(os.path.join(hs_run, "config.json"), "w") as f:
    json.dump(cfg, f)
  code, _, err = _cli(capsys, ["fuse", "--workdir", hs_run, "--out", tmp_path / "deploy"])
  assert code == 2 and "'model.mode' = 'hs' (a Hyper-Search run" in err and "target-mode" not in err, err
  assert not os.path.exists(tmp_path / "deploy")
  code, _, err = _cli(capsys, ["eval", "--workdir", os.path.join(hs_run, "config.json")])
  assert code == 2 and "is not a directory" in err, err


# ------------------------------------------------------------------------------------------------ item 8
def _free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _process_env(port, pid, **extra):
  return _child_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
                    **extra)


def test_a_peer_that_never_shows_up_stops_the_run_in_one_line_within_the_timeout(ddir, tmp_path):
  work = tmp_path / "run"
  t0 = time.time()
  proc = subprocess.run([sys.executable, "-m", "repopt_jax", "train", f"data.data_dir={ddir}", "--workdir", work,
                         "--no-progress"], capture_output=True, text=True, cwd=REPO, timeout=200, check=False,
                        env=_process_env(_free_port(), 0, REPOPT_JAX_INIT_TIMEOUT="4"))
  assert proc.returncode == 2 and time.time() - t0 < 60, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines[-1].startswith("error: process 1 did not join the 2-process run at 127.0.0.1:"), proc.stderr[-3000:]
  assert "Check failure" not in proc.stderr and "Traceback" not in proc.stderr
  assert not os.path.exists(work)


def test_a_peer_that_dies_stops_the_survivor_in_one_line_and_checkpoints_stay_restorable(ddir, tmp_path):
  work = str(tmp_path / "run")
  port = _free_port()
  argv = [sys.executable, "-m", "repopt_jax", "train", f"data.data_dir={ddir}", "--workdir", work, "--no-progress",
          "--fast-compile", *BASE, "train.steps=100000"]
  logs = [open(tmp_path / f"p{i}.log", "w") for i in range(2)]  # pylint: disable=consider-using-with
  procs = [subprocess.Popen(argv, stdout=logs[i], stderr=subprocess.STDOUT, cwd=REPO, env=_process_env(port, i))
           for i in range(2)]
  try:
    deadline = time.time() + 240
    while not os.path.isdir(os.path.join(work, "checkpoints", "4")):
      assert all(p.poll() is None for p in procs) and time.time() < deadline, (tmp_path / "p0.log").read_text()
      time.sleep(0.1)
    with open(os.path.join(work, "run.lock")) as f:  # one run, two processes: process 0 holds it for both
      assert json.load(f)["pid"] == procs[0].pid
    procs[1].kill()
    t0 = time.time()
    code = procs[0].wait(timeout=120)
    elapsed = time.time() - t0
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for log in logs:
      log.close()
  text = (tmp_path / "p0.log").read_text()
  assert code == 2 and elapsed < 90, (elapsed, text[-3000:])
  errors = [l for l in text.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "lost contact with process 1 of the 2-process run" in errors[0], text[-3000:]
  assert "Check failure" not in text
  model, _ = runs.load_model(work)  # the checkpoints written by the two processes restore in one
  assert model is not None
