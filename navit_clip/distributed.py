"""Starting JAX across several processes (one per host, or several on one machine).

`initialize(config.distributed)` calls `jax.distributed.initialize()` when the config or
the environment asks for it, and must run before the first JAX computation:
  coordinator set   explicit: "host:port" of process 0, with num_processes and process_id
                    (any cluster, or several processes on one machine);
  initialize "yes"  JAX detects the cluster itself (Cloud TPU, Slurm, Open MPI, ...);
  initialize "auto" the same, but only where the environment shows a multi-process job: a
                    Slurm job with more than one task, a Cloud TPU slice with more than one
                    worker, or JAX_COORDINATOR_ADDRESS set;
  initialize "no"   a single process drives the local devices.
After it, every process runs the same program on the global mesh; each feeds its own rows
of every batch (navit_clip.sharding.global_batch).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax


def cluster_environment(env: Mapping[str, str] | None = None) -> str | None:
  """The multi-process environment this process runs in, or None for a single process."""
  env = os.environ if env is None else env
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
    return "cloud_tpu"
  return None


def initialize(c: Mapping[str, Any]) -> bool:
  """Joins the processes of a multi-process run as `c` = config.distributed says.

  Returns:
    True if this call started (or found) a multi-process run, False for a single process.
  """
  if jax.distributed.is_initialized():
    return True
  mode = c["initialize"]
  if mode not in ("auto", "yes", "no"):
    raise ValueError(f"config.distributed.initialize = {mode!r}; expected 'auto', 'yes' or "
                     "'no'")
  if c["coordinator"]:
    kwargs = dict(coordinator_address=c["coordinator"], num_processes=c["num_processes"],
                  process_id=c["process_id"])
  elif mode == "yes" or (mode == "auto" and cluster_environment() is not None):
    kwargs = {}
  else:
    return False
  jax.config.update("jax_cpu_collectives_implementation", c["cpu_collectives"])
  jax.distributed.initialize(**kwargs)
  print(f"process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} of {jax.device_count()} devices", flush=True)
  return True
