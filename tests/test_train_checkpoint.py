"""Checkpoints: a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one; SIGTERM saves
at the next step boundary; a corrupt latest checkpoint falls back to the previous one; the last N are kept."""

import os
import signal
import time

import numpy as np
import pytest

from repopt_jax.train import CheckpointWarning, Trainer
from test_train_common import FAST, digits_dir, host_params, spawn, tail

STEPS, EVERY = 20, 5


@pytest.fixture(scope="module")
def ddir(tmp_path_factory):
  return digits_dir(tmp_path_factory)


def _overrides(ddir):
  return [f"data.data_dir={ddir}", "train.epochs=null", f"train.steps={STEPS}", "train.batch_size=32",
          f"train.checkpoint_every={EVERY}", "train.keep_checkpoints=3", "train.log_every=1",
          "optim.warmup_epochs=0.2"]


def _trainer(ddir, work):
  return Trainer("digits_tiny", str(work), overrides=_overrides(ddir), progress=False, compiler_options=FAST)


_SLOW_RUN = r"""
import sys, time
from repopt_jax.train import Trainer
from test_train_checkpoint import _overrides
from test_train_common import FAST
work, ddir = sys.argv[1:]
trainer = Trainer("digits_tiny", work, overrides=_overrides(ddir), progress=False, compiler_options=FAST)
trainer.fit(on_step=lambda step: time.sleep(0.25), evaluate=False)  # slow enough to be killed mid-run
print("FINISHED")
"""


def _saved_steps(work):
  root = os.path.join(work, "checkpoints")
  return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


def test_sigkill_then_sigterm_then_resume_is_bit_identical(ddir, tmp_path):
  killed = str(tmp_path / "killed")
  log = str(tmp_path / "killed.log")
  proc = spawn(_SLOW_RUN, [killed, ddir], 8, log)
  try:
    deadline = time.time() + 240
    while not [s for s in _saved_steps(killed) if s >= 2 * EVERY]:
      assert proc.poll() is None, tail(log)
      assert time.time() < deadline, "no checkpoint written in time: " + tail(log)
      time.sleep(0.05)
    proc.kill()  # SIGKILL: no handler runs, whatever was being written is left as it is
    assert proc.wait(timeout=60) == -signal.SIGKILL
  finally:
    if proc.poll() is None:
      proc.kill()
  assert "FINISHED" not in tail(log)
  at_kill = max(_saved_steps(killed))
  assert 2 * EVERY <= at_kill < STEPS

  # The uninterrupted reference.
  reference = _trainer(ddir, tmp_path / "reference")
  snapshots = {}
  reference.fit(on_step=lambda s: snapshots.update({s: host_params(reference.state)} if s == 15 else {}),
                evaluate=False)
  want = host_params(reference.state)

  # Resume the killed run; SIGTERM it 3 steps later: it saves at that step boundary and returns.
  resumed = _trainer(ddir, killed)
  stop_at = at_kill + 3
  previous = signal.getsignal(signal.SIGTERM)
  out = resumed.fit(on_step=lambda s: signal.raise_signal(signal.SIGTERM) if s == stop_at else None,
                    evaluate=False)
  assert out["preempted"] and out["signal"] == "SIGTERM" and out["step"] == stop_at
  assert signal.getsignal(signal.SIGTERM) is previous  # the handler is only installed during fit()
  assert stop_at in _saved_steps(killed)
  # Resume again (from the SIGTERM checkpoint) to the end: exactly the uninterrupted parameters.
  out = resumed.fit(evaluate=False)
  assert out["step"] == STEPS and not out["preempted"]
  got = host_params(resumed.state)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert _saved_steps(killed)[-1] == STEPS and len(_saved_steps(killed)) == 3  # keep the last 3

  # Corrupt (truncate) every file of the reference's latest checkpoint: the previous one is restored.
  assert _saved_steps(reference.workdir) == [10, 15, 20]
  latest = os.path.join(reference.workdir, "checkpoints", "20")
  for root, _, files in os.walk(latest):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  with pytest.warns(CheckpointWarning, match="checkpoints/20 is unreadable"):
    assert reference.restore() == 15
  assert os.path.isdir(latest + ".corrupt")  # moved aside, not deleted
  for k, v in snapshots[15].items():
    np.testing.assert_array_equal(host_params(reference.state)[k], v, err_msg=k)
  # ... and training on from it reproduces step 20 (saved again under its own name).
  reference.fit(evaluate=False)
  for k in want:
    np.testing.assert_array_equal(host_params(reference.state)[k], want[k], err_msg=k)
  assert _saved_steps(reference.workdir)[-1] == 20
