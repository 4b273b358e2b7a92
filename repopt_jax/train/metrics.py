"""Observability: a tqdm progress bar, TensorBoard event files and a JSON-lines log, written by process 0.

Files in the work directory: `metrics.jsonl` (one JSON object per record: `{"kind": "train"|"eval"|
"summary"|..., "step": ..., ...}`, appended across resumed runs) and `tensorboard/` (event files).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping, Optional

from repopt_jax.rundir import RunDir

__all__ = ["MetricsWriter", "Progress", "read_jsonl"]


def _plain(value: Any) -> Any:
  """A JSON-friendly Python value (numpy/jax scalars to float/int, non-finite floats to strings)."""
  if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


class MetricsWriter:
  """Appends metric records to `<workdir>/metrics.jsonl` and TensorBoard; does nothing when not enabled.

  Args:
    workdir: the run's directory (a path or a `RunDir`).
    enabled: False on every process but 0.
    tensorboard: also write TensorBoard event files under `<workdir>/tensorboard`.
    after_step: the step the run (re)starts from: records of later steps already in `metrics.jsonl` (written
      by a run killed after its last checkpoint, whose steps are trained again now) are dropped, so that the
      file holds each step once; 0 starts the file afresh. None keeps the file as it is.
  """

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True,
               after_step: Optional[int] = None):
    run_dir = RunDir(workdir)
    self.enabled = enabled
    self.path = run_dir.metrics_file
    self._file = None
    self._tb = None
    if enabled and after_step is not None and os.path.exists(self.path):
      _truncate_after(self.path, int(after_step))
    if enabled:
      self._file = open(self.path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
      if tensorboard:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(logdir=run_dir.tensorboard)

  def write(self, kind: str, step: int, metrics: Mapping[str, Any]) -> None:
    """One record: JSON line `{"kind", "step", "time", **metrics}`; numbers also as TensorBoard scalars."""
    if not self.enabled:
      return
    record = {"kind": kind, "step": int(step), "time": time.time(), **_plain(dict(metrics))}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key not in ("kind", "step", "time") and isinstance(value, (int, float)) \
            and not isinstance(value, bool):
          self._tb.add_scalar(f"{kind}/{key}", value, int(step))

  def write_text(self, kind: str, step: int, text: str, **fields) -> None:
    """A text record (e.g. the model summary): JSON line and a TensorBoard text entry."""
    if not self.enabled:
      return
    self.write(kind, step, dict(fields, text=text))
    if self._tb is not None:
      self._tb.add_text(kind, text.replace("\n", "  \n"), int(step))

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


class Progress:
  """A tqdm bar over optimizer steps showing loss, accuracy and images/s (disabled when not enabled)."""

  def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train"):
    self._bar = None
    self._args = dict(total=total, initial=initial, desc=desc) if enabled else None

  def start(self) -> None:
    """Shows the bar (else it appears with the first update): after the first step has compiled."""
    if self._bar is None and self._args is not None:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(**self._args, unit="step", dynamic_ncols=True, leave=True)

  def update(self, n: int, loss: Optional[float] = None, accuracy: Optional[float] = None,
             images_per_sec: Optional[float] = None) -> None:
    self.start()
    if self._bar is None:
      return
    post = {}
    if loss is not None:
      post["loss"] = f"{loss:.4f}"
    if accuracy is not None:
      post["acc"] = f"{accuracy:.3f}"
    if images_per_sec is not None:
      post["img/s"] = f"{images_per_sec:.0f}"
    if post:
      self._bar.set_postfix(post, refresh=False)
    self._bar.update(n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    self._args = None


def _truncate_after(path: str, step: int) -> None:
  """Keeps the records of `path` up to `step` (none when `step` is 0); written atomically."""
  keep = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut short by a kill
      if step and isinstance(record, dict) and int(record.get("step", 0)) <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


def read_jsonl(path: str) -> list[dict]:
  """The records of a `metrics.jsonl` file."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
