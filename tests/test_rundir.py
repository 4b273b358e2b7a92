"""The run directory (`repopt_jax.rundir`): its paths, config, moving aside, and the lock two processes cannot
both hold (a live holder refuses the second in one line naming it; a dead holder's lock is taken over with a
notice); and the architecture family the training banner names. No training here (see test_faults.py)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from repopt_jax.config import WorkdirError, load_config
from repopt_jax.rundir import RunDir, RunLock, free_name
from repopt_jax.train.loop import _summary_text, family_name
from test_train_common import REPO, python_env

HOST = socket.gethostname()


def test_paths_are_normalised_once_and_config_round_trips(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  run = RunDir("runs/./a/../b")
  assert run.path == str(tmp_path / "runs" / "b") and RunDir(run) == run and os.fspath(run) == run.path
  assert (run.checkpoints, run.metrics_file, run.tensorboard, run.lock_file, run.config_file) == tuple(
      str(tmp_path / "runs" / "b" / n) for n in ("checkpoints", "metrics.jsonl", "tensorboard", "run.lock",
                                                 "config.json"))
  assert not os.path.exists(run.path)  # naming a run touches nothing
  with pytest.raises(WorkdirError, match="run directory runs/./a/../b does not exist"):
    run.check_exists()
  with pytest.raises(WorkdirError, match="holds no config.json"):
    run.read_config()

  config = load_config("digits_tiny", ["optim.lr=0.03"])
  run.create().write_config(config)
  assert run.has_config and run.read_config() == config
  assert run.read_config(["train.seed=3"]).train.seed == 3
  assert sorted(os.listdir(run.path)) == ["config.json"]  # written atomically: no .tmp left

  (tmp_path / "a_file").write_text("x")
  with pytest.raises(WorkdirError, match="is not a directory"):
    RunDir("a_file").check_not_a_file()
  with pytest.raises(WorkdirError, match="is not a directory"):
    RunDir("a_file").check_exists()


def test_move_aside_keeps_every_earlier_copy(tmp_path):
  run = RunDir(tmp_path)
  assert run.move_aside("metrics.jsonl") is None
  for i in range(3):
    (tmp_path / "metrics.jsonl").write_text(str(i))
    run.move_aside("metrics.jsonl")
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl.old", "metrics.jsonl.old1", "metrics.jsonl.old2"]
  assert (tmp_path / "metrics.jsonl.old2").read_text() == "2"
  assert free_name(str(tmp_path / "metrics.jsonl"), ".old") == str(tmp_path / "metrics.jsonl.old3")


_HOLD = r"""
import sys, time
from repopt_jax.rundir import RunLock
lock = RunLock(sys.argv[1])
print(lock.acquire(), flush=True)
time.sleep(600)
"""


def _holder(path):
  proc = subprocess.Popen([sys.executable, "-c", _HOLD, path], stdout=subprocess.PIPE, text=True,
                          env=python_env(1), cwd=REPO)
  assert proc.stdout.readline().strip() == "None"  # locked (nobody held it before)
  return proc


def test_a_live_holder_refuses_a_second_lock_and_a_dead_ones_is_taken_over(tmp_path):
  path = str(tmp_path / "run.lock")
  proc = _holder(path)
  try:
    with pytest.raises(WorkdirError) as e:
      RunLock(path).acquire()
    msg = str(e.value)
    assert f"another process (pid {proc.pid} on host {HOST}) holds the run {tmp_path}" in msg, msg
    assert "\n" not in msg and "--workdir" in msg
    with open(path) as f:
      assert json.load(f)["pid"] == proc.pid
  finally:
    proc.kill()  # SIGKILL: no handler runs; the kernel releases the flock, the file still names the holder
    proc.wait(timeout=30)
  lock = RunLock(path)
  notice = lock.acquire()
  assert notice and "took over the stale lock" in notice and f"pid {proc.pid} on host {HOST} is gone" in notice
  with open(path) as f:
    assert json.load(f)["pid"] == os.getpid()
  # In one process too, a second lock on the same file is refused (it names this process).
  with pytest.raises(WorkdirError, match=f"pid {os.getpid()} on host"):
    RunLock(path).acquire()
  lock.release()
  assert os.path.getsize(path) == 0  # released cleanly: the next holder sees no stale name
  with RunLock(path) as again:  # and takes it without a notice
    assert again.held
  assert not again.held and os.path.exists(path)  # cleared, never deleted


def test_a_lock_whose_holder_was_stopped_by_sigterm_is_free(tmp_path):
  """Whatever ends the holder, the lock goes with it (SIGTERM without a handler here)."""
  path = str(tmp_path / "run.lock")
  proc = _holder(path)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=30) == -signal.SIGTERM
  t0 = time.time()
  lock = RunLock(path)
  assert "took over the stale lock" in lock.acquire()
  assert time.time() - t0 < 1.0
  lock.release()


@pytest.mark.parametrize("arch,mode,optimizer,family", [
    ("B1", "target", "repopt_sgd", "RepOpt-VGG"),
    ("B1", "hs", "sgd", "RepOpt-VGG"),
    ("tiny", "csla", "sgd", "RepOpt-VGG"),
    ("B1", "repvgg", "sgd", "RepVGG"),
    ("B1", "target", "sgd", "VGG"),
    ("resnet18_cifar", "target", "sgd", "ResNet-18 (CIFAR)"),
    ("resnet18_cifar_tiny", "target", "repopt_sgd", "RepOpt-ResNet-18 (CIFAR)"),
    ("repopt_ghostnet_1_0x", "target", "repopt_sgd", "RepOpt-GhostNet"),
    ("repopt_ghostnet_0_5x", "target", "adamw", "GhostNet"),
])
def test_the_banner_names_the_architecture_family(arch, mode, optimizer, family):
  assert family_name(arch, mode, optimizer) == family
  summary = {"arch": arch, "family": family, "mode": mode, "params": 1e6, "macs_per_image": 1e9, "image_size": 32,
             "num_classes": 10, "dataset": "digits", "train_examples": 100, "optimizer": optimizer,
             "batch_size": 8, "devices": 1, "platform": "cpu", "processes": 1, "total_steps": 4,
             "steps_per_epoch": 2, "compute_dtype": "float32"}
  assert _summary_text(summary).startswith(f"{family} {arch} ({mode}), 1.000M params")
