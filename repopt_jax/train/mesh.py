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


def _distributed_is_initialized() -> bool:
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    return distributed.global_state.client is not None
  except (ImportError, AttributeError):
    return False


def maybe_initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None,
                                 local_device_ids: Optional[Sequence[int]] = None,
                                 cpu_collectives: str = "gloo", auto: bool = False) -> tuple[int, int]:
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
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
  return jax.process_index(), jax.process_count()


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
