"""Data parallelism: 8 devices train like 1 (BatchNorm over the global batch), and two processes joined by
jax.distributed (gloo CPU collectives, 2 devices each) train like one process with 4 devices."""

import json
import os
import socket

import jax
import numpy as np
import pytest

from repopt_jax.train import Trainer
from test_train_common import FAST, digits_dir, host_params, spawn, tail


@pytest.fixture(scope="module")
def ddir(tmp_path_factory):
  return digits_dir(tmp_path_factory)


def _overrides(ddir, steps=4):
  return [f"data.data_dir={ddir}", "train.epochs=null", f"train.steps={steps}", "train.batch_size=32",
          "train.checkpoint_every=0", "train.log_every=1", "optim.lr=0.2"]


def _assert_same(a: dict, b: dict, initial: dict, rtol):
  """Equal up to float32 summation order: |a - b| <= rtol * (|b| + max|b| of the tensor)."""
  assert a.keys() == b.keys() == initial.keys()
  ratios = {k: float(np.max(np.abs(a[k] - b[k]) / (rtol * (np.abs(b[k]) + np.max(np.abs(b[k])) + 1e-12))))
            for k in a}
  worst = max(ratios, key=ratios.get)
  assert ratios[worst] <= 1.0, f"{worst} differs by {ratios[worst]:.3g} x the tolerance"
  moved = max(float(np.max(np.abs(a[k] - initial[k]))) for k in a)
  assert moved > 1e-2, moved  # training did move the params, far more than the tolerance


def test_eight_devices_match_one_device(ddir, tmp_path):
  results, initial = {}, {}
  for n in (8, 1):
    trainer = Trainer("digits_tiny", str(tmp_path / f"dev{n}"), overrides=_overrides(ddir),
                      devices=jax.devices()[:n], progress=False, compiler_options=FAST)
    assert trainer.run.mesh.size == n
    initial = initial or host_params(trainer.state)
    metrics = trainer.fit(evaluate=False)
    results[n] = (host_params(trainer.state), metrics)
  # Same global batch, same BatchNorm statistics, same updates: equal up to float summation order.
  _assert_same(results[8][0], results[1][0], initial, rtol=1e-4)
  assert results[8][1]["train_loss"] == pytest.approx(results[1][1]["train_loss"], rel=1e-5)


_WORKER = r"""
import json, sys
import numpy as np
import os
port, pid, work, ddir, out = sys.argv[1:]
from repopt_jax.train import maybe_initialize_distributed
if pid == "0":  # explicit arguments ...
  assert maybe_initialize_distributed(f"localhost:{port}", num_processes=2, process_id=0) == (0, 2)
else:  # ... or the standard environment variables
  os.environ.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=pid)
  assert maybe_initialize_distributed() == (int(pid), 2)
import jax
from repopt_jax.train import Trainer
from test_train_common import FAST, host_params
from test_train_sharding import _overrides
assert jax.device_count() == 4 and jax.local_device_count() == 2
trainer = Trainer("digits_tiny", work, overrides=_overrides(ddir), progress=False, compiler_options=FAST)
metrics = trainer.fit(evaluate=True)
if jax.process_index() == 0:
  np.savez(out, **host_params(trainer.state))
  with open(out + ".json", "w") as f:
    json.dump(metrics, f)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process_with_four_devices(ddir, tmp_path):
  out = str(tmp_path / "multi.npz")
  port = _free_port()
  script = _WORKER
  logs = [str(tmp_path / f"proc{i}.log") for i in range(2)]
  procs = [spawn(script, [port, i, tmp_path / "multi", ddir, out], 2, logs[i]) for i in range(2)]
  try:
    # Meanwhile, the single-process reference on 4 of this process's devices.
    trainer = Trainer("digits_tiny", str(tmp_path / "single"), overrides=_overrides(ddir),
                      devices=jax.devices()[:4], progress=False, compiler_options=FAST)
    initial = host_params(trainer.state)
    single = trainer.fit(evaluate=True)
    for p, log in zip(procs, logs):
      assert p.wait(timeout=240) == 0, tail(log)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  multi = dict(np.load(out))
  _assert_same(multi, host_params(trainer.state), initial, rtol=1e-4)
  with open(out + ".json") as f:
    multi_metrics = json.load(f)
  assert multi_metrics["train_loss"] == pytest.approx(single["train_loss"], rel=1e-5)
  # Evaluation over both hosts counts every test image once, like one process.
  assert multi_metrics["eval_examples"] == single["eval_examples"] == 360
  assert multi_metrics["eval_top1"] == pytest.approx(single["eval_top1"], abs=1 / 360 + 1e-9)
  # Both processes checkpointed the same step; only process 0 wrote metrics.
  assert os.path.isdir(tmp_path / "multi" / "checkpoints" / "4")
  data_files = set(os.listdir(tmp_path / "multi" / "checkpoints" / "4" / "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= data_files, data_files
  with open(tmp_path / "multi" / "metrics.jsonl") as f:
    kinds = [json.loads(line)["kind"] for line in f]
  assert kinds.count("summary") == 1 and kinds.count("train") == 4 and kinds.count("eval") == 1
