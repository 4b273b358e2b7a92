"""A run directory: the one place that knows its layout, reads and writes its config, and locks it.

A run (`train`, `search`, a quickstart run, a fused deployment run) lives in one folder:

    <workdir>/config.json       the resolved config (`eval`, `fuse`, `export` and `train --workdir` need only it)
    <workdir>/metrics.jsonl     one JSON record per line (train windows, evaluations, the summary, ...)
    <workdir>/tensorboard/      event files
    <workdir>/checkpoints/      one folder per saved step (`repopt_jax.train.checkpoint`)
    <workdir>/run.lock          who is writing the run: `{"pid": ..., "host": ..., "since": ...}`

Writing into a run (training it, fusing into it) happens under its lock (`RunDir.lock`), so two processes
never write one run at once; reading a run (`eval`, `load_model`, `export`, `fuse`'s source) takes no lock
and writes nothing, so it works on a read-only mount. This module imports neither jax nor orbax: a wrong path
fails in one line before any of them loads.

    >>> run = RunDir('~/runs/../runs/repopt')
    >>> run.path == os.path.abspath(os.path.expanduser('~/runs/repopt'))
    True
    >>> os.path.relpath(run.checkpoints, run.path), os.path.basename(run.config_file)
    ('checkpoints', 'config.json')
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from typing import Optional, Sequence

from repopt_jax.config import Config, WorkdirError, load_config

__all__ = ["RunDir", "RunLock", "resolve", "free_name", "CONFIG_FILE", "METRICS_FILE", "CHECKPOINTS", "TENSORBOARD",
           "LOCK_FILE"]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
LOCK_FILE = "run.lock"

log = logging.getLogger(__name__)


def resolve(path) -> str:
  """The absolute form of a user's path (`~` expanded): how every run directory is named inside the package."""
  return os.path.abspath(os.path.expanduser(os.fspath(path)))


def free_name(path: str, suffix: str) -> str:
  """`path + suffix`, or `path + suffix + '1'`, `'2'`, ...: the first name not taken (to move `path` aside)."""
  dest, n = path + suffix, 1
  while os.path.exists(dest):
    dest, n = f"{path}{suffix}{n}", n + 1
  return dest


class RunDir:
  """A run's folder: its paths, its `config.json`, moving its outputs aside, and its lock.

  Nothing is touched on disk until a method says so (`create`, `write_config`, `move_aside`, `lock`).

  Args:
    path: the folder (relative, with `~`, or a `RunDir`); normalised once, here.
  """

  def __init__(self, path):
    if isinstance(path, RunDir):
      self.given, self.path = path.given, path.path
    else:
      self.given, self.path = os.fspath(path), resolve(path)

  def __fspath__(self) -> str:
    return self.path

  def __str__(self) -> str:
    return self.path

  def __repr__(self) -> str:
    return f"RunDir({self.path!r})"

  def __eq__(self, other) -> bool:
    return isinstance(other, RunDir) and other.path == self.path

  def __hash__(self) -> int:
    return hash(self.path)

  def join(self, *names: str) -> str:
    return os.path.join(self.path, *names)

  @property
  def config_file(self) -> str:
    return self.join(CONFIG_FILE)

  @property
  def metrics_file(self) -> str:
    return self.join(METRICS_FILE)

  @property
  def checkpoints(self) -> str:
    return self.join(CHECKPOINTS)

  @property
  def tensorboard(self) -> str:
    return self.join(TENSORBOARD)

  @property
  def lock_file(self) -> str:
    return self.join(LOCK_FILE)

  @property
  def has_config(self) -> bool:
    """Whether the folder holds a `config.json` (a run started by repopt_jax)."""
    return os.path.isfile(self.config_file)

  # ----------------------------------------------------------------------------------------------- reading
  def check_exists(self) -> "RunDir":
    """Raises `WorkdirError` unless the folder exists and is a directory (for the commands that read a run)."""
    if not os.path.exists(self.path):
      raise WorkdirError(f"run directory {self.given} does not exist")
    if not os.path.isdir(self.path):
      raise WorkdirError(f"run directory {self.given} is not a directory (give the folder a run was trained in)")
    return self

  def read_config(self, overrides: Sequence[str] = ()) -> Config:
    """The config the run was started with, with `section.key=value` overrides applied.

    Raises:
      WorkdirError: the folder holds no `config.json` (not a run directory written by repopt_jax).
    """
    if not self.has_config:
      raise WorkdirError(f"{self.given} holds no {CONFIG_FILE} (not a run directory written by repopt_jax); "
                         "give the run's config explicitly")
    return load_config(self.config_file, overrides)

  # ----------------------------------------------------------------------------------------------- writing
  def check_not_a_file(self) -> "RunDir":
    """Raises `WorkdirError` when the path names a file (checked before a run is built, so nothing starts)."""
    if os.path.exists(self.path) and not os.path.isdir(self.path):
      raise WorkdirError(f"work directory {self.path} is not a directory")
    return self

  def create(self) -> "RunDir":
    """Creates the folder (and its parents) and proves it writable, or raises one clear `WorkdirError`.

    The probe is an `os.access` check, not a file: nothing but the directory itself is created.
    """
    try:
      os.makedirs(self.path, exist_ok=True)
    except OSError as e:
      raise WorkdirError(f"work directory {self.path} cannot be written: {e.strerror or e}") from None
    self.check_not_a_file()
    if not os.access(self.path, os.W_OK | os.X_OK):
      raise WorkdirError(f"work directory {self.path} cannot be written: permission denied")
    return self

  def write_config(self, config: Config) -> str:
    """Writes `config.json` atomically (a reader never sees half a file); returns its path."""
    path = self.config_file
    try:
      os.makedirs(self.path, exist_ok=True)
      with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(config.to_dict(), f, indent=2)
      os.replace(path + ".tmp", path)
    except OSError as e:
      raise WorkdirError(f"work directory {self.path} cannot be written: {e.strerror or e}") from None
    return path

  def move_aside(self, name: str) -> Optional[str]:
    """Renames `<workdir>/<name>` to `<name>.old` (`.old1`, ...): a fresh start that deletes nothing.

    Returns the new path, or None when there was nothing to move.
    """
    src = self.join(name)
    if not os.path.exists(src):
      return None
    dest = free_name(src, ".old")
    os.rename(src, dest)
    return dest

  def lock(self) -> "RunLock":
    """The run's lock (not yet taken): `with run_dir.lock(): ...` or `acquire()` / `release()`."""
    return RunLock(self.lock_file)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


class RunLock:
  """An exclusive lock on a run directory: `fcntl.flock` on its `run.lock`, which names the holder.

  The kernel releases a `flock` when its holder exits, however it exits (SIGKILL included), so a lock is never
  left held by a process that is gone; the pid and host written in the file are for the message. A file that
  still names a holder but is not locked is stale (its holder died without clearing it): it is taken over,
  and `acquire` returns a notice saying so. The file is cleared on release, never deleted (deleting it would
  let a process that opened it before the deletion and one that creates a new one both hold "the" lock).

  Args:
    path: the lock file (its folder must exist).
  """

  def __init__(self, path: str):
    self.path = path
    self._fd: Optional[int] = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def _holder(self, fd: int) -> Optional[dict]:
    try:
      text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    except OSError:
      return None
    if not text:
      return None
    try:
      info = json.loads(text)
    except json.JSONDecodeError:
      return {"text": text[:200]}
    return info if isinstance(info, dict) else {"text": text[:200]}

  @staticmethod
  def _describe(info: Optional[dict]) -> str:
    if not info:
      return "another process"
    if "pid" not in info:
      return f"another process ({info.get('text', '?')})"
    return f"another process (pid {info.get('pid')} on host {info.get('host', '?')})"

  def acquire(self) -> Optional[str]:
    """Takes the lock without waiting.

    Returns:
      None, or a one-line notice when a stale lock (its holder is gone) was taken over.

    Raises:
      WorkdirError: another live process holds the run (the message names its pid and host).
    """
    import fcntl  # pylint: disable=g-import-not-at-top

    if self._fd is not None:
      return None
    folder = os.path.dirname(self.path)
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise WorkdirError(f"work directory {folder} cannot be written: cannot create its lock file "
                         f"{LOCK_FILE}: {e.strerror or e}") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        os.close(fd)
        raise WorkdirError(f"work directory {folder} cannot be locked ({LOCK_FILE}: {e.strerror or e})") from None
      info = None
      for _ in range(20):  # the holder writes its name right after taking the lock: give it a moment
        info = self._holder(fd)
        if info:
          break
        time.sleep(0.01)
      os.close(fd)
      raise WorkdirError(f"{self._describe(info)} holds the run {folder} ({self.path}); wait for it to finish, "
                         "stop it, or use another --workdir") from None
    previous = self._holder(fd)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    except OSError as e:
      os.close(fd)
      raise WorkdirError(f"work directory {folder} cannot be written: {e.strerror or e}") from None
    self._fd = fd
    if not previous:
      return None
    pid, host = previous.get("pid"), previous.get("host", "?")
    if isinstance(pid, int) and host == me["host"] and pid != me["pid"] and _pid_alive(pid):
      why = f"pid {pid} exists but does not hold the lock"  # a reused pid, or a holder that closed the file
    elif isinstance(pid, int):
      why = f"pid {pid} on host {host} is gone" if host == me["host"] else f"pid {pid} on host {host} released it"
    else:
      why = "its holder is gone"
    return f"took over the stale lock of {folder} ({why}; it did not finish cleanly)"

  def release(self) -> None:
    """Clears the holder's name and releases the lock (idempotent)."""
    import fcntl  # pylint: disable=g-import-not-at-top

    fd, self._fd = self._fd, None
    if fd is None:
      return
    try:
      os.ftruncate(fd, 0)
    except OSError:
      pass  # a full or read-only disk: the next holder reports the name as stale, nothing worse
    try:
      fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
      os.close(fd)

  def __enter__(self) -> "RunLock":
    notice = self.acquire()
    if notice:
      log.warning("%s", notice)
    return self

  def __exit__(self, *exc) -> None:
    self.release()
