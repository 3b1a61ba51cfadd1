"""Device mesh, parameter sharding rules and batch placement (JAX SPMD, GSPMD propagation).

The mesh always has the axes ("data", "fsdp", "model"), in that order (the model axis
innermost, so tensor-parallel peers are neighbours); the config names their sizes, e.g.
"data:-1,fsdp:1,model:1" (-1: whatever the devices leave; a missing axis has size 1).

The batch is split over ("data", "fsdp"): every device holds B / (data * fsdp) rows.
Every leaf of the train state (parameters and optimizer state alike) is partitioned by name
and shape, in two passes:
  1. tensor parallelism: the first regex rule whose pattern fully matches the leaf's
     "/"-joined name (see navit_clip.param_rules.flatten_names; e.g.
     "params/image/encoder/blocks/0/mlp/fc1/kernel") gives the mesh axes of its trailing
     dimensions. A rule with more dimensions than the leaf does not apply (factored
     optimizer statistics), leading dimensions the rule does not name (the depth axis of
     scanned layers) stay unsharded.
  2. FSDP: a leaf with at least `fsdp_min_size` elements is split over "fsdp" along its
     largest dimension that pass 1 left free and that the fsdp size divides; if none does,
     the leaf stays replicated over "fsdp".
A mesh axis of size 1 shards nothing, so the same rules serve every mesh.

Rules are written "regex=axes;regex=axes", axes comma-separated per trailing dimension with
"_" for an unsharded one: ".*/mlp/fc1/kernel=_,model" splits the MLP hidden dimension over
"model".
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from navit_clip.activation_sharding import BATCH_AXES
from navit_clip.choices import check_range, naming
from navit_clip.param_rules import flatten_names, split_rules

MESH_AXES = ("data", "fsdp", "model")
UNSHARDED = "_"

# Megatron-style tensor parallelism: column-parallel q/k/v and fc1 (heads and MLP hidden
# units split over "model"), row-parallel out and fc2.
DEFAULT_RULES = (".*/attn/(query|key|value)/kernel=_,model;"
                 ".*/attn/out/kernel=model,_;"
                 ".*/mlp/fc1/kernel=_,model;"
                 ".*/mlp/fc2/kernel=model,_")

Rule = tuple[str, tuple[str | None, ...]]


def parse_mesh(spec: str) -> dict[str, int]:
  """"data:-1,fsdp:2" -> {"data": -1, "fsdp": 2, "model": 1}: every axis, in MESH_AXES order.

  At most one size may be -1. Raises ValueError naming the bad entry.
  """
  sizes = dict.fromkeys(MESH_AXES, 1)
  seen = set()
  for entry in filter(None, (e.strip() for e in spec.split(","))):
    name, sep, size = entry.partition(":")
    name = name.strip()
    if not sep or name not in MESH_AXES:
      raise ValueError(f"mesh entry {entry!r} in {spec!r} is not 'axis:size' with axis one "
                       f"of {list(MESH_AXES)}")
    if name in seen:
      raise ValueError(f"mesh axis {name!r} appears twice in {spec!r}")
    try:
      value = int(size)
    except ValueError as e:
      raise ValueError(f"mesh entry {entry!r} in {spec!r}: size must be an integer") from e
    if value < 1 and value != -1:
      raise ValueError(f"mesh entry {entry!r} in {spec!r}: size must be >= 1 or -1")
    seen.add(name)
    sizes[name] = value
  if list(sizes.values()).count(-1) > 1:
    raise ValueError(f"mesh {spec!r}: at most one axis may have size -1")
  return sizes


def make_mesh(spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ("data", "fsdp", "model") mesh of `spec` over `devices` (default: all devices).

  Axes are AxisType.Auto: the compiler propagates shardings from the inputs, the outputs
  and the constraints. Raises ValueError if the sizes do not multiply to the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh(spec)
  known = math.prod(s for s in sizes.values() if s != -1)
  for name, size in sizes.items():
    if size == -1:
      if len(devices) % known:
        raise ValueError(f"mesh {spec!r}: {len(devices)} devices are not divisible by the "
                         f"other axes' product {known}")
      sizes[name] = len(devices) // known
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"mesh {spec!r} has {math.prod(sizes.values())} devices "
                     f"({sizes}), but there are {len(devices)}")
  return jax.make_mesh(tuple(sizes.values()), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def parse_rules(spec: str) -> list[Rule]:
  """"regex=axes;regex=axes" -> [(regex, (axis or None, ...))]; "" gives [].

  The axes follow the last "=" of each rule, so regexes may contain "=".
  """
  rules = []
  for pattern, axes in split_rules(spec, "sharding", "axes"):
    rule = f"{pattern}={axes}"
    names = tuple(a.strip() for a in axes.split(","))
    for a in names:
      if a != UNSHARDED and a not in MESH_AXES:
        raise ValueError(f"sharding rule {rule!r}: axis {a!r} is not one of "
                         f"{list(MESH_AXES)} or {UNSHARDED!r}")
    if len([a for a in names if a != UNSHARDED]) != len({a for a in names if a != UNSHARDED}):
      raise ValueError(f"sharding rule {rule!r} uses a mesh axis twice")
    rules.append((pattern, tuple(None if a == UNSHARDED else a for a in names)))
  return rules


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks config.mesh and config.sharding (the whole config: the mesh is a top-level key).

  Raises:
    ValueError: naming the key ("config.mesh = ...: <what is wrong>").
  """
  with naming("config.mesh", config.mesh):
    parse_mesh(config.mesh)
  with naming("config.sharding.rules", config.sharding.rules):
    parse_rules(config.sharding.rules)
  check_range("config.sharding.fsdp_min_size", config.sharding.fsdp_min_size, 0)


def partition_spec(name: str, shape: Sequence[int], mesh: Mesh, rules: Sequence[Rule],
                   fsdp_min_size: int) -> PartitionSpec:
  """The PartitionSpec of one leaf called `name` of `shape` (see the module docstring).

  Raises ValueError naming the leaf if a matching rule's mesh axis does not divide the
  dimension it shards.
  """
  axes: list[str | None] = [None] * len(shape)
  for pattern, rule_axes in rules:
    if re.fullmatch(pattern, name):
      if len(rule_axes) <= len(shape):
        offset = len(shape) - len(rule_axes)
        for i, axis in enumerate(rule_axes):
          if axis is None or mesh.shape[axis] == 1:
            continue
          if shape[offset + i] % mesh.shape[axis]:
            raise ValueError(f"sharding rule {pattern!r} splits dimension {offset + i} of "
                             f"{name} {list(shape)} over {axis!r} of size "
                             f"{mesh.shape[axis]}, which does not divide it")
          axes[offset + i] = axis
      break
  fsdp = mesh.shape["fsdp"]
  if fsdp > 1 and math.prod(shape) >= fsdp_min_size:
    free = [i for i in range(len(shape)) if axes[i] is None and shape[i] % fsdp == 0]
    if free:
      axes[max(free, key=lambda i: (shape[i], -i))] = "fsdp"
  return PartitionSpec(*axes)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[Rule] | str,
                   fsdp_min_size: int) -> Any:
  """NamedShardings for every leaf of `tree` (arrays or jax.ShapeDtypeStructs)."""
  if isinstance(rules, str):
    rules = parse_rules(rules)
  return jax.tree.map(
      lambda n, x: NamedSharding(mesh, partition_spec(n, np.shape(x), mesh, rules,
                                                      fsdp_min_size)),
      flatten_names(tree), tree)


def state_shardings(abstract_state: Any, mesh: Mesh,
                    c: Mapping[str, Any]) -> Any:
  """Shardings of a train state by `c` = config.sharding (keys "rules", "fsdp_min_size")."""
  return tree_shardings(abstract_state, mesh, c["rules"], c["fsdp_min_size"])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (row) dimension split over ("data", "fsdp"); other dimensions whole."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
  """How many ways the batch rows are split: data * fsdp."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def process_rows(mesh: Mesh, global_rows: int) -> slice:
  """The contiguous rows of a global batch that this process's devices hold."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_rows,))
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [global_rows if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
  rows = slice(min(starts), max(stops))
  if rows.stop - rows.start != global_rows * len(index_map) // mesh.size:
    raise ValueError(f"this process's devices do not hold one contiguous block of the "
                     f"{global_rows} batch rows on mesh {dict(mesh.shape)}")
  return rows


def global_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh,
                 global_rows: int) -> dict[str, jax.Array]:
  """Places a host batch on the mesh, rows split over ("data", "fsdp").

  Args:
    host_batch: NumPy arrays, each with `global_rows` rows (every process read the same
      global batch; this process keeps its own rows) or `global_rows / process_count`
      rows (the pipeline already gave this process its rows).
    mesh: the training mesh.
    global_rows: B, the rows of the global batch.

  Returns:
    Global jax.Arrays of leading dimension B, sharded by `batch_sharding(mesh)`.
  """
  sharding = batch_sharding(mesh)
  rows = process_rows(mesh, global_rows)
  out = {}
  for key, x in host_batch.items():
    if x.shape[0] == global_rows:
      x = x[rows]
    elif x.shape[0] != rows.stop - rows.start:
      raise ValueError(f"batch field {key!r} has {x.shape[0]} rows; expected the global "
                       f"{global_rows} or this process's {rows.stop - rows.start}")
    out[key] = jax.make_array_from_process_local_data(sharding, x,
                                                      (global_rows, *x.shape[1:]))
  return out
