"""Orbax checkpoints of the train state together with the Grain iterator state.

Each checkpoint step holds two items: "state" (the train-state pytree, restored onto
whatever shardings the abstract target carries) and "data" (the Grain iterator state, so a
resumed run sees exactly the batches the unbroken run would have). Saves are asynchronous
and atomic: Orbax writes to a temporary directory and renames it when complete, so an
interrupted save is never restored (a leftover temporary directory is ignored, and the
trainer's Checkpointer deletes it).

`restore_params` reads only the parameters (or a part of them) of a saved train state:
evaluation and initialising from another run use it, and never read optimizer state.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores (train state, data iterator) under `directory`."""

  def __init__(self, directory: str, *, max_to_keep: int | None = 3,
               keep_period: int | None = None, async_save: bool = True,
               cleanup_tmp: bool = False):
    """Opens (or creates) `directory`.

    Args:
      directory: the checkpoints' root; one subdirectory per step.
      max_to_keep: keep the last K checkpoints (None: all) ...
      keep_period: ... and every checkpoint whose step is a multiple of this, forever.
      async_save: write in a background thread; `save` blocks only to copy to the host.
      cleanup_tmp: delete the temporary directories of interrupted saves on opening. Only
        for the one writer of `directory` (a reader would delete a save in progress).
    """
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, keep_period=keep_period,
        enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=cleanup_tmp)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_iterator: grain.DatasetIterator | None = None) -> bool:
    """Starts saving `state` (and the iterator position) at `step`; True if a save began.

    The caller decides when to save; every call saves (Orbax's own interval is not used).
    """
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def save_and_wait(self, step: int, state,
                    data_iterator: grain.DatasetIterator | None = None) -> None:
    """Saves at `step` unless that step is already saved, and waits until it is on disk."""
    self.wait()
    if self.latest_step() != step:
      self.save(step, state, data_iterator)
      self.wait()

  def restore(self, step: int | None, abstract_state,
              data_iterator: grain.DatasetIterator | None = None):
    """Restores the state at `step` (latest if None) shaped and sharded like `abstract_state`.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct (with .sharding) or arrays.
    If `data_iterator` is given, its position is restored in place.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    items = {"state": ocp.args.StandardRestore(target)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def wait(self) -> None:
    """Blocks until any asynchronous save has finished."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_params(state_dir: str, abstract_params, shardings=None):
  """Restores the "params" subtree of a saved train state, or part of it; nothing else.

  Args:
    state_dir: a checkpoint step's "state" item directory.
    abstract_params: nested dict of jax.ShapeDtypeStruct: the parameters to read (any
      subset of the saved ones, named by the saved keys) and their shapes and dtypes.
    shardings: jax.sharding.Sharding for each leaf of `abstract_params`, or None for the
      default device.

  Returns:
    The parameters, with `abstract_params`' structure, as jax.Arrays placed by `shardings`.
  """
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract_params)
  target = {"params": jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_params,
      shardings)}
  args = ocp.args.PyTreeRestore(item=target,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)
  with ocp.PyTreeCheckpointer() as checkpointer:
    return checkpointer.restore(state_dir, args=args)["params"]
