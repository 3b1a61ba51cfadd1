"""Starting a run from another run's parameters (config.init), e.g. LiT.

config.init names a checkpoint and which of its parameters to copy:
  checkpoint  a training workdir, its "checkpoints" directory, or one step's directory
  step        the step to read (-1: the latest complete one; ignored for a step directory)
  params      "src->dst;src->dst": every parameter named dst/... in this model is read from
              src/... in the checkpoint ("/"-joined names, see navit_clip.param_rules.flatten_names);
              a bare "image" means "image->image". "" or "src" may name the whole tree.
Only the parameters are read (a partial restore; no optimizer state), straight onto this
run's shardings. Every copied parameter must exist on both sides with the same shape;
otherwise a ValueError names the parameter (and both shapes).

With config.optim.lr_mults = "image/.*=0" the copied image tower stays frozen: a
classification run's tower under a newly trained text tower is LiT (arXiv 2111.07991).
The trainer applies config.init only when it starts a run, never when it resumes one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from navit_clip import storage
from navit_clip.checkpoint import committed_steps, restore_params, step_dir
from navit_clip.choices import check_range
from navit_clip.param_rules import flatten_names


def parse_mapping(spec: str) -> list[tuple[str, str]]:
  """"image" or "a->b;c->d" -> [(src prefix, dst prefix)]; an empty prefix is the root."""
  rules = []
  for rule in filter(None, (r.strip() for r in spec.split(";"))):
    src, arrow, dst = rule.partition("->")
    rules.append((src.strip().strip("/"), (dst if arrow else src).strip().strip("/")))
  if not rules:
    raise ValueError(f"config.init.params = {spec!r} names no parameters; e.g. 'image' or "
                     "'image->image'")
  return rules


def check_config(init: ml_collections.ConfigDict) -> None:
  """Checks config.init (its params only when a checkpoint is named); ValueError names the key."""
  check_range("config.init.step", init.step, -1)
  if init.checkpoint:
    parse_mapping(init.params)


def _under(name: str, prefix: str) -> str | None:
  """The rest of `name` after `prefix` ("" for the prefix itself), or None if not under it."""
  if not prefix:
    return "/" + name
  if name == prefix:
    return ""
  return name[len(prefix):] if name.startswith(prefix + "/") else None


def resolve_state_dir(checkpoint: str, step: int) -> tuple[str, int]:
  """(the "state" directory Orbax reads, its step) of config.init.checkpoint and .step.

  The checkpoint may be local or a URL; on an object store Orbax cannot read (not gs://)
  the step is downloaded (only that step, see navit_clip.checkpoint.step_dir)."""
  path = storage.absolute(checkpoint).rstrip("/")
  if not storage.isdir(path):
    raise FileNotFoundError(f"config.init.checkpoint = {checkpoint!r} is not a directory")
  if storage.isdir(storage.join(path, "state")):
    name = os.path.basename(path)
    if not name.isdigit():
      raise ValueError(f"config.init.checkpoint = {checkpoint!r} holds a 'state' item but is "
                       "not a step directory (named by its step)")
    return storage.join(step_dir(storage.parent(path), int(name)), "state"), int(name)
  if storage.isdir(storage.join(path, "checkpoints")):
    path = storage.join(path, "checkpoints")
  steps = committed_steps(path)
  if not steps:
    raise FileNotFoundError(f"config.init.checkpoint = {checkpoint!r}: no complete "
                            f"checkpoint in {path}")
  step = steps[-1] if step < 0 else step
  if step not in steps:
    raise ValueError(f"config.init.step = {step}: no such checkpoint in {path}; steps: {steps}")
  return storage.join(step_dir(path, step), "state"), step


def _saved_shapes(state_dir: str) -> dict[str, tuple[int, ...]]:
  """"/"-joined name -> shape of every saved parameter."""
  tree = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
  if "params" not in tree:
    raise ValueError(f"checkpoint {state_dir} holds no 'params'")
  names = flatten_names(tree["params"])
  return {n: tuple(m.shape) for n, m in zip(jax.tree.leaves(names),
                                            jax.tree.leaves(tree["params"]))}


def _nest(flat: dict[str, Any]) -> dict:
  """{"a/b": x} -> {"a": {"b": x}}."""
  out: dict = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = out
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return out


def load_params(c: ml_collections.ConfigDict, params: Any, shardings: Any) -> Any:
  """`params` with the parameters that `c` = config.init names read from its checkpoint.

  Args:
    c: config.init (checkpoint, step, params).
    params: this model's parameters, a pure dict of arrays or jax.ShapeDtypeStruct.
    shardings: jax.sharding.Sharding per leaf of `params` (where the read values go).

  Returns:
    A pytree like `params`: the named parameters replaced by the checkpoint's (placed by
    `shardings`), the others unchanged.
  """
  state_dir, step = resolve_state_dir(c.checkpoint, c.step)
  where = f"checkpoint {c.checkpoint} (step {step})"
  saved = _saved_shapes(state_dir)
  names = jax.tree.leaves(flatten_names(params))
  leaves = dict(zip(names, jax.tree.leaves(params)))
  placement = dict(zip(names, jax.tree.leaves(shardings)))
  source: dict[str, str] = {}  # this model's name -> the checkpoint's name
  for src, dst in parse_mapping(c.params):
    matched = {n: rest for n in names if (rest := _under(n, dst)) is not None}
    if not matched:
      raise ValueError(f"config.init.params: no parameter of this model is under {dst!r}; "
                       f"names look like {names[:3]}")
    wanted = {(src + rest).lstrip("/"): n for n, rest in matched.items()}
    missing = sorted(set(wanted) - set(saved))
    if missing:
      raise ValueError(f"config.init.params: {where} has no parameter {missing[0]!r} for this "
                       f"model's {wanted[missing[0]]!r} ({len(missing)} missing)")
    extra = sorted(n for n in saved if _under(n, src) is not None and n not in wanted)
    if extra:
      raise ValueError(f"config.init.params: {where} has {extra[0]!r} under {src!r}, which "
                       f"this model lacks under {dst!r} ({len(extra)} such)")
    for name, mine in wanted.items():
      if saved[name] != tuple(leaves[mine].shape):
        raise ValueError(f"config.init.params: {name!r} is {list(saved[name])} in {where} "
                         f"but this model's {mine!r} is {list(leaves[mine].shape)}")
      source[mine] = name
  abstract = _nest({source[n]: jax.ShapeDtypeStruct(leaves[n].shape, leaves[n].dtype)
                    for n in source})
  restored = restore_params(state_dir, abstract,
                            _nest({source[n]: placement[n] for n in source}))
  restored_names = jax.tree.leaves(flatten_names(restored))
  values = {name: value for name, value in zip(restored_names, jax.tree.leaves(restored))}
  return jax.tree.map(lambda n, x: values[source[n]] if n in source else x,
                      flatten_names(params), params)
