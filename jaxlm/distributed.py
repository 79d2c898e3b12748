"""Several hosts: initialise `jax.distributed` before anything touches the devices.

Every host runs the same `jaxlm train` command. How the hosts find each other:

  TPU pod slice   nothing to pass: detected from the TPU environment (TPU_WORKER_HOSTNAMES /
                  MEGASCALE_* variables set on every TPU VM worker) and initialised by jax's
                  own cluster detection.
  GPU cluster     --coordinator-address HOST:PORT --num-processes N --process-id I, or the
                  environment variables JAXLM_COORDINATOR_ADDRESS, JAXLM_NUM_PROCESSES,
                  JAXLM_PROCESS_ID (SLURM is detected by jax itself when srun starts the job).
  one machine     nothing: a single process.

CPU processes (tests, laptops) talk through gloo collectives.
"""

from __future__ import annotations

import os

from jaxlm.errors import ConfigError


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"{name} must be an integer, got {value!r}") from None


def detected_cluster() -> str | None:
  """'tpu' or 'slurm' when running as one of several hosts of a known cluster, else None."""
  hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  # (libtpu writes a "WARNING: could not determine ..." sentence there on non-TPU machines)
  if (len(hosts) > 1 and not any(" " in h for h in hosts)) or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  if (_env_int("SLURM_NTASKS") or 1) > 1 and os.environ.get("SLURM_JOB_ID"):
    return "slurm"
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Initialise jax.distributed if this is one of several processes; True if it did."""
  import jax

  address = coordinator_address or os.environ.get("JAXLM_COORDINATOR_ADDRESS")
  count = num_processes if num_processes is not None else _env_int("JAXLM_NUM_PROCESSES")
  index = process_id if process_id is not None else _env_int("JAXLM_PROCESS_ID")
  explicit = [x is not None for x in (address, count, index)]
  if any(explicit):
    if not all(explicit):
      raise ConfigError("several hosts need all three of --coordinator-address, --num-processes and --process-id")
    if not 0 <= index < count:
      raise ConfigError(f"--process-id must be in [0, {count}), got {index}")
    if count == 1:
      return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only affects CPU devices
    jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index)
    return True
  if detected_cluster():
    jax.distributed.initialize()  # jax reads the TPU / SLURM environment itself
    return True
  return False
