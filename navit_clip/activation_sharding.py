"""Sharding constraints on activations inside the model: batch rows over ("data", "fsdp").

The towers and the chunked losses run under the mesh that `jax.set_mesh` set (see
navit_clip.sharding, which builds it and places parameters and batches); this module is all
they need of it, so the model layers never import the trainer's sharding code.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

BATCH_AXES = ("data", "fsdp")  # mesh axes that split the batch rows


def constrain_batch(x: jax.Array) -> jax.Array:
  """Constrains the leading (row) dimension of `x` to ("data", "fsdp") of the current mesh.

  For a tower's token activations [B, L, D]: the compiler keeps them split by rows instead
  of choosing a layout from the parameters' shardings. The mesh is the one set by
  `jax.set_mesh`, with AxisType.Auto axes as `navit_clip.sharding.make_mesh` makes them;
  without one, or on a mesh of one device, `x` is returned unchanged.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, PartitionSpec(BATCH_AXES))
