"""Host batches -> global device arrays (multi-host: each process holds its own rows)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np


def to_global_batch(host_batch: Mapping[str, np.ndarray],
                    sharding: jax.sharding.Sharding | Mapping[str, jax.sharding.Sharding]
                    ) -> dict[str, jax.Array]:
  """Assembles this process's rows of a packed batch into global jax.Arrays.

  Args:
    host_batch: field -> NumPy array [B_local, ...], this process's share of the global
      batch (as `make_train_dataset` yields it on every process).
    sharding: the data sharding (e.g. NamedSharding(mesh, P(("data", "fsdp")))), one for
      all fields or one per field. Its leading axis is split over the processes.

  Returns:
    field -> jax.Array [B_local * process_count, ...] with `sharding`. Without
    jax_enable_x64, JAX stores int64 fields (example_id) as int32: stream ids above 2^31
    wrap, so keep host `example_id` for tracing and export.
  """
  out = {}
  for name, local in host_batch.items():
    s = sharding[name] if isinstance(sharding, Mapping) else sharding
    out[name] = jax.make_array_from_process_local_data(s, np.asarray(local))
  return out
