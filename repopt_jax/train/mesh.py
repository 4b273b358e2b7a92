"""The data-parallel device mesh, and joining several processes (hosts) into one JAX program.

One mesh axis, 'data', over every device of every process: params are replicated, batches sharded on
'data'. Under `jax.jit` with a global batch array, a mean over the batch (the loss, BatchNorm's statistics)
is over the global batch, so 1 device, 8 devices and 2 hosts x 4 devices train the same model.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# Standard variables read by `maybe_initialize_distributed` (the names jax itself documents).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
# How long a multi-process run waits for every process to join, and for a silent peer before it is declared
# dead (seconds). jax's own defaults are 300 s and 100 s, and they end in a C++ abort.
ENV_INIT_TIMEOUT = "REPOPT_JAX_INIT_TIMEOUT"
ENV_HEARTBEAT_TIMEOUT = "REPOPT_JAX_HEARTBEAT_TIMEOUT"
DEFAULT_INIT_TIMEOUT = 60
DEFAULT_HEARTBEAT_TIMEOUT = 30


class PeerError(RuntimeError):
  """A process of a multi-process run did not join it, or stopped answering (the message names it)."""


def _timeout(name: str, default: int) -> int:
  text = os.environ.get(name)
  if not text:
    return default
  try:
    value = int(float(text))
  except ValueError:
    value = 0
  if value <= 0:
    from repopt_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(f"environment variable {name}={text!r} must be a positive number of seconds")
  return value


def _others(process_id: Optional[int], num_processes: Optional[int]) -> str:
  """Who a process is waiting for, in words."""
  n = int(num_processes or 0)
  if process_id is None or n < 2:
    return "a process"
  if process_id != 0:
    return "process 0 (the coordinator)" if n == 2 else "process 0 (the coordinator) or another process"
  return "process 1" if n == 2 else f"one of processes 1-{n - 1}"


def _exit_now(message: str, status: int = 2) -> None:
  """Prints one line and leaves at once: jax's exit handlers would wait for the missing peer (and abort)."""
  import sys  # pylint: disable=g-import-not-at-top
  print(f"error: {message}", file=sys.stderr, flush=True)
  os._exit(status)  # pylint: disable=protected-access


def _distributed_is_initialized() -> bool:
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    return distributed.global_state.client is not None
  except (ImportError, AttributeError):
    return False


def maybe_initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None,
                                 local_device_ids: Optional[Sequence[int]] = None,
                                 cpu_collectives: str = "gloo", auto: bool = False,
                                 initialization_timeout: Optional[int] = None,
                                 heartbeat_timeout: Optional[int] = None) -> tuple[int, int]:
  """Joins a multi-process JAX run when one is asked for; a no-op for a single process.

  A run is multi-process when `coordinator_address` is given, or when the environment sets
  `JAX_COORDINATOR_ADDRESS` (with `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`). Explicit arguments win over the
  environment. On CPU, cross-process collectives need an implementation (`cpu_collectives`, gloo by default).
  Must run before anything touches a JAX device; calling it again is harmless.

  Args:
    coordinator_address: 'host:port' of process 0's coordinator.
    num_processes: how many processes take part.
    process_id: this process's index, 0 ... num_processes - 1.
    local_device_ids: the local devices this process uses (None: all).
    cpu_collectives: 'gloo' or 'mpi', for CPU-only runs.
    auto: without a coordinator address, let `jax.distributed.initialize()` detect the cluster itself
      (TPU pods, SLURM, Open MPI, ...).
    initialization_timeout: seconds to wait for every process to join (default `$REPOPT_JAX_INIT_TIMEOUT`,
      else 60). Past it, the process prints one line naming the process it waited for and exits with
      status 2 (instead of jax's C++ abort after 300 s).
    heartbeat_timeout: seconds without a heartbeat after which a peer counts as dead (default
      `$REPOPT_JAX_HEARTBEAT_TIMEOUT`, else 30).

  Returns:
    `(jax.process_index(), jax.process_count())`.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get(ENV_COORDINATOR)
  if auto and not coordinator_address and not _distributed_is_initialized():
    jax.distributed.initialize()
  elif coordinator_address and not _distributed_is_initialized():
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
      num_processes = int(env[ENV_NUM_PROCESSES])
    if process_id is None and env.get(ENV_PROCESS_ID):
      process_id = int(env[ENV_PROCESS_ID])
    platforms = (env.get("JAX_PLATFORMS") or jax.config.jax_platforms or "").lower()
    if cpu_collectives and (platforms in ("", "cpu") or platforms.startswith("cpu")):
      # CPU devices of different processes only talk through an explicit collectives library.
      jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    import threading  # pylint: disable=g-import-not-at-top

    init_timeout = int(initialization_timeout or _timeout(ENV_INIT_TIMEOUT, DEFAULT_INIT_TIMEOUT))
    heartbeat = int(heartbeat_timeout or _timeout(ENV_HEARTBEAT_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT))
    joined = threading.Event()

    def watchdog():  # jax.distributed.initialize blocks in C++ (GIL released) and aborts on its own timeout
      if not joined.wait(init_timeout):
        _exit_now(f"{_others(process_id, num_processes)} did not join the {num_processes}-process run at "
                  f"{coordinator_address} within {init_timeout} s (this is process {process_id}; "
                  f"{ENV_INIT_TIMEOUT} sets the wait); stopped")

    threading.Thread(target=watchdog, name="repopt_jax_join_watchdog", daemon=True).start()
    try:
      jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                 process_id=process_id, local_device_ids=local_device_ids,
                                 initialization_timeout=init_timeout + 30, heartbeat_timeout_seconds=heartbeat)
    finally:
      joined.set()
  return jax.process_index(), jax.process_count()


def peer_error(error: BaseException, step: Optional[int] = None) -> Optional[PeerError]:
  """A `PeerError` naming the lost process when `error` is a failed cross-process exchange, else None."""
  if jax.process_count() < 2:
    return None
  text = " ".join(str(error).split())
  markers = ("Gloo", "gloo", "Connection reset", "Connection refused", "UNAVAILABLE", "coordination service",
             "DEADLINE_EXCEEDED", "Socket closed", "peer")
  if not any(m in text for m in markers):
    return None
  who = _others(jax.process_index(), jax.process_count())
  at = f" at step {step}" if step is not None else ""
  return PeerError(f"lost contact with {who} of the {jax.process_count()}-process run{at} ({text[:200]}); "
                   "the checkpoints are intact: start every process again to resume")


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D data-parallel mesh named 'data' over `devices` (default: every device of every process).

  Example:
    >>> make_mesh(jax.devices()[:1]).shape['data']
    1
  """
  devices = list(jax.devices() if devices is None else devices)
  # Auto axes: shardings are given at the jit boundary and propagated by the compiler inside.
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def put_replicated(tree, mesh: Mesh):
  """Places host values that are identical on every process as global arrays replicated over `mesh`."""
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  return jax.tree.map(put, tree)


def to_host(tree):
  """NumPy copies of replicated global arrays (this process's replica; no cross-process traffic)."""
  def get(x):
    if isinstance(x, jax.Array):
      if not x.sharding.is_fully_replicated:
        raise ValueError(f"to_host: expected a replicated array, got sharding {x.sharding}")
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)

  return jax.tree.map(get, tree)


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of params, optimizer state and scalars: a full copy on every device."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """The sharding of a batch: the leading axis split over 'data'."""
  return NamedSharding(mesh, P(DATA_AXIS))

