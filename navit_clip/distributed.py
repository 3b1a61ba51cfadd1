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

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax

from navit_clip.choices import check_choice

log = logging.getLogger(__name__)

INITIALIZE_MODES = ("auto", "yes", "no")


def check_config(c: Mapping[str, Any]) -> None:
  """Checks `c` = config.distributed; raises ValueError naming the key."""
  check_choice("config.distributed.initialize", c["initialize"], INITIALIZE_MODES)
  if c["coordinator"] and not 0 <= c["process_id"] < c["num_processes"]:
    raise ValueError(f"config.distributed.coordinator = {c['coordinator']!r} needs "
                     "num_processes >= 1 and 0 <= process_id < num_processes, got "
                     f"{c['num_processes']}, {c['process_id']}")


def data_share(data: Mapping[str, Any]) -> dict[str, int]:
  """This process's share of the training records: {"process_index", "process_count"}.

  The JAX process among all when `data` = config.data has shard_by_process, else the whole
  (0 of 1): every process reads the same records. For `navit_clip.data.pipeline`.
  """
  if data["shard_by_process"]:
    return {"process_index": jax.process_index(), "process_count": jax.process_count()}
  return {"process_index": 0, "process_count": 1}


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
  check_config(c)
  mode = c["initialize"]
  if c["coordinator"]:
    kwargs = dict(coordinator_address=c["coordinator"], num_processes=c["num_processes"],
                  process_id=c["process_id"])
  elif mode == "yes" or (mode == "auto" and cluster_environment() is not None):
    kwargs = {}
  else:
    return False
  jax.config.update("jax_cpu_collectives_implementation", c["cpu_collectives"])
  jax.distributed.initialize(**kwargs)
  log.info("process %d of %d, %d of %d devices", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
  return True
