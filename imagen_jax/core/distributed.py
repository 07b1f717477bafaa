"""The multi-process runtime: when and how to call `jax.distributed.initialize()`.

Every subcommand that runs on a pod (train, encode) calls `maybe_initialize()` with its flags
(imagen_jax/commands/shared_flags.py) before it touches a device. The job is multi-process when

- `--coordinator_address`, `--num_processes`, `--process_id` say so, or the environment does
  (`IMAGEN_JAX_COORDINATOR_ADDRESS`, `IMAGEN_JAX_NUM_PROCESSES`, `IMAGEN_JAX_PROCESS_ID`, or
  JAX's own `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`); flags win; or
- a cluster is detected: a Cloud TPU VM (one process per worker of the slice), a SLURM step or
  an Open MPI job with more than one task. JAX then fills in every value itself.

Otherwise nothing is initialized and the job runs as one process.

A process that dies (killed, preempted, out of memory) stops sending heartbeats to the
coordination service; after `--distributed_heartbeat_timeout` seconds the service tells every
other process, which then exits with an error instead of waiting forever in a collective.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

# (flag, environment variables in the order they are read)
ENV_VARS = {
    "coordinator_address": ("IMAGEN_JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("IMAGEN_JAX_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("IMAGEN_JAX_PROCESS_ID", "JAX_PROCESS_ID"),
}


class DistributedError(RuntimeError):
  """The multi-process settings are incomplete or inconsistent: the message names what to set."""


def _from_env(name: str, environ: Mapping[str, str]) -> str | None:
  for var in ENV_VARS[name]:
    if environ.get(var):
      return environ[var]
  return None


def _env_int(name: str, environ: Mapping[str, str]) -> int | None:
  value = _from_env(name, environ)
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise DistributedError(f"{'/'.join(ENV_VARS[name])}={value!r} is not an integer") from None


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
  """'tpu', 'slurm' or 'ompi' where jax.distributed.initialize() finds everything itself.

  Matches JAX's own cluster detection (jax/_src/clusters), restricted to jobs of more than one
  process: a SLURM step or Open MPI job with one task stays an ordinary single-process run.
  """
  environ = os.environ if environ is None else environ
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
           "SLURM_LOCALID", "SLURM_STEP_NUM_NODES")
  if all(v in environ for v in slurm) and int(environ["SLURM_NTASKS"]) > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in environ and int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "ompi"
  if _on_cloud_tpu_vm(environ):
    return "tpu"
  return None


def _on_cloud_tpu_vm(environ: Mapping[str, str]) -> bool:
  # JAX decides this when it is imported (TPU chips on the PCI bus and libtpu installed); on a
  # TPU VM the worker list comes from the metadata server, or from TPU_WORKER_HOSTNAMES on GKE.
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top  # JAX internal: TPU VMs only
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False)) and (
      environ.get("TPU_SKIP_MDS_QUERY") is None or "TPU_WORKER_HOSTNAMES" in environ)


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, environ: Mapping[str, str] | None = None,
            force: bool = False) -> dict[str, Any] | None:
  """The keyword arguments for jax.distributed.initialize(), or None for a single process.

  Explicit values win over the environment; with none of them, a detected cluster (or `force`)
  gives {} (JAX detects everything). Raises DistributedError for an incomplete explicit setup.
  """
  environ = os.environ if environ is None else environ
  coordinator_address = coordinator_address or _from_env("coordinator_address", environ)
  num_processes = num_processes if num_processes is not None else _env_int("num_processes",
                                                                           environ)
  process_id = process_id if process_id is not None else _env_int("process_id", environ)
  explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes,
              "process_id": process_id}
  given = {k: v for k, v in explicit.items() if v is not None}
  if num_processes == 1 and not force:
    return None
  if given:
    cluster = detect_cluster(environ)
    missing = [k for k, v in explicit.items() if v is None]
    if missing and cluster is None:
      raise DistributedError(
          f"multi-process setup incomplete: {given} given but no "
          f"{', '.join('--' + m for m in missing)} (or "
          f"{', '.join(ENV_VARS[m][0] for m in missing)}), and no TPU/SLURM/Open MPI cluster "
          f"was detected to fill them in")
    if num_processes is not None and process_id is not None and not (
        0 <= process_id < num_processes):
      raise DistributedError(f"--process_id={process_id} must be in [0, {num_processes})")
    return given
  if force or detect_cluster(environ):
    return {}
  return None


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, *, force: bool = False,
                     heartbeat_timeout_s: int = 100, init_timeout_s: int = 300) -> bool:
  """Calls jax.distributed.initialize() when the job is multi-process; True if it is running.

  Safe to call more than once, and after someone else initialized (it then does nothing).
  Must run before anything touches a JAX device.
  """
  if jax.distributed.is_initialized():
    return True
  kwargs = resolve(coordinator_address, num_processes, process_id, force=force)
  if kwargs is None:
    return False
  # A dead peer is noticed after heartbeat_timeout_s; a process that is exiting waits as long
  # for the others at the shutdown barrier, not JAX's default five minutes.
  jax.distributed.initialize(**kwargs, initialization_timeout=init_timeout_s,
                             heartbeat_timeout_seconds=heartbeat_timeout_s,
                             shutdown_timeout_seconds=heartbeat_timeout_s)
  logging.info("jax.distributed: process %d of %d (%d local devices, %d in all)",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # process 0 speaks for the job
  return True


def barrier(name: str, timeout_s: int = 3600) -> None:
  """Waits until every process got here (the coordination service's barrier; no collective).

  Used after compiling: a process that compiled from the persistent cache must not start the
  first collective long before one still compiling (CPU collectives give up after 30 s).
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top  # JAX internal: multi-process only
  jax_distributed.global_state.client.wait_at_barrier(f"imagen_jax:{name}", timeout_s * 1000)


def allgather_json(value: Any) -> list[Any]:
  """Every process's JSON-able `value`, in process order (a collective: all must call it)."""
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)
  lengths = multihost_utils.process_allgather(np.asarray([data.size], np.int32))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:data.size] = data
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:int(n)]).decode("utf-8"))
          for row, n in zip(gathered, lengths.reshape(-1))]

