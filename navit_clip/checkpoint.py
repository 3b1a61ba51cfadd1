"""Orbax checkpoints of the train state together with the Grain iterator state, verified.

Each checkpoint step holds two items: "state" (the train-state pytree, restored onto
whatever shardings the abstract target carries) and "data" (the Grain iterator state, so a
resumed run sees exactly the batches the unbroken run would have). Saves are asynchronous
and atomic: Orbax writes to a temporary directory, writes its commit marker
(commit_success.txt) last, and renames the directory when complete, so an interrupted
save is never restored (a leftover temporary directory is ignored, and the trainer's
Checkpointer deletes it).

Orbax itself checks no array bytes (a flipped bit restores silently) and takes any
directory named by a number for a checkpoint. So:
- every save records checksums in the step's own metadata (Orbax's _CHECKPOINT_METADATA,
  committed with the step): for each array of the state its name, shape, dtype and a
  64-bit checksum of its bytes, computed on the devices from the logical array
  (`state_checksums`: no host copy, and any mesh restores and checks it), and the SHA-256
  of each process's iterator state;
- a step directory without the commit marker is incomplete: never listed or restored,
  and the writer (the trainer) sets it aside as `<step>.incomplete` when it opens (on
  gs:// in `<directory>.set-aside/`, where Orbax does not delete it);
- `restore` of the latest step restores the newest step that passes every check, falling
  back past damaged ones (a file that cannot be read, a checksum that does not match)
  with a warning naming the step and the fault; once an older step restored, the writer
  renames the damaged ones to `<step>.damaged` (nothing is deleted). No intact step at all
  is a DamagedCheckpointError naming each step's fault;
- a step whose arrays are not the ones asked for (names, shapes, dtypes) is not damage but
  another run's state: CheckpointMismatchError, no fallback.
Checkpoints saved without checksums restore unverified, with a warning.

The directory is local or a URL. Orbax writes local and gs:// directories itself (on
GCS from every process of a multi-process run, as big_vision and MaxText runs do); another
object store (s3://, ...) is mirrored: Orbax writes and reads a local staging folder, and
navit_clip.checkpoint_mirror downloads the remote committed steps on opening and uploads
each finished save, its commit marker last (see that module), in a background thread:
training does not wait for the upload, the next save or `wait` does. Such a directory is
for single-process runs (one process uploads).

`restore_params` reads only the parameters (or a part of them) of a saved train state:
evaluation and initialising from another run use it, and never read optimizer state.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from navit_clip import storage
from navit_clip.checkpoint_mirror import (  # committed_steps: the readers' listing too
    CheckpointMirror, committed_steps)
from navit_clip.errors import MissingInputError, UserError

log = logging.getLogger(__name__)

# Orbax's own paths (etils.epath) go through fsspec (gcsfs for gs://), as navit_clip.storage
# does, not through TensorFlow's gfile: one GCS client, configured one way, for every file
# of a run. A value set by the user wins.
os.environ.setdefault("EPATH_USE_TF", "false")

COMMIT_MARKER = "commit_success.txt"  # Orbax writes it last, then renames the step in
STEP_METADATA = "_CHECKPOINT_METADATA"  # Orbax's per-step metadata file
_HASH_SEEDS = (np.uint32(0x9E3779B9), np.uint32(0x7F4A7C15))  # two 32-bit lanes
_INDEX_MULT = np.uint32(0x85EBCA77)


class DamagedCheckpointError(UserError):
  """A checkpoint step, or every step of a directory, fails its checks; says which, why.

  `fault` is the why alone ("checksum mismatch in ...").
  """

  def __init__(self, message: str, fault: str = ""):
    super().__init__(message)
    self.fault = fault or message


class CheckpointMismatchError(UserError):
  """A checkpoint holds other arrays than the state asked for (another model or optimizer)."""


@dataclasses.dataclass
class Restored:
  """A restored checkpoint: its step, the state, and the `run_metadata` it was saved with."""

  step: int
  state: Any
  run_metadata: dict


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 that mixes every bit."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The bytes of `x` as uint32 words: [*shape] (1, 2, 4-byte dtypes), [*shape, 2] (8)."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  if size >= 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """uint32 [*shape]: each element's row-major position (mod 2^32), built without reshape
  so that a sharded array stays sharded."""
  index, stride = jnp.zeros(shape, jnp.uint32), 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride % 2**32)
    stride *= shape[axis]
  return index


def _checksum(x: jax.Array) -> tuple[jax.Array, ...]:
  """Two uint32 [] lanes: sum over words w at position i of fmix32(w ^ fmix32(i * c + s)).

  Each term is a bijection of its word, so changing any one word changes the sum for sure;
  the position key catches moved words. Integer sums are exact in any order: the result
  does not depend on how the array is sharded.
  """
  words = _words(jnp.asarray(x))
  keys = _flat_index(words.shape) * _INDEX_MULT
  return tuple(jnp.sum(_fmix32(words ^ _fmix32(keys + seed)), dtype=jnp.uint32)
               for seed in _HASH_SEEDS)


_device_checksums = jax.jit(lambda leaves: [_checksum(x) for x in leaves])


def _names(tree) -> list[str]:
  """The "/"-joined path of every leaf of `tree`, in leaf order."""
  return [jax.tree_util.keystr(path, simple=True, separator="/")
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def state_checksums(state) -> dict[str, dict]:
  """{leaf name: {"shape", "dtype", "sum": 16 hex digits}} of a pytree of arrays.

  Computed on the devices the arrays live on (every process of a multi-process run calls
  it together, as it saves); only the 8-byte sums come to the host.
  """
  leaves = jax.tree.leaves(state)
  sums = jax.device_get(_device_checksums(leaves))
  return {name: {"shape": list(np.shape(x)), "dtype": str(jnp.asarray(x).dtype),
                 "sum": f"{int(a):08x}{int(b):08x}"}
          for name, x, (a, b) in zip(_names(state), leaves, sums)}


def _data_checksum(iterator_state) -> str:
  """SHA-256 of a Grain iterator state in canonical JSON (as it reads back from a file)."""
  canonical = json.dumps(json.loads(json.dumps(iterator_state)), sort_keys=True,
                         separators=(",", ":"))
  return hashlib.sha256(canonical.encode()).hexdigest()


def _per_process(digest: str) -> list[str]:
  """Every process's hex `digest` (all the same length), by process index."""
  if jax.process_count() == 1:
    return [digest]
  words = np.frombuffer(bytes.fromhex(digest), np.uint32)
  return [np.asarray(w, np.uint32).tobytes().hex()
          for w in multihost_utils.process_allgather(words)]


def _everywhere(ok: bool) -> bool:
  """Whether `ok` holds on every process (processes agree on which step they restore)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _brief(error: BaseException, limit: int = 240) -> str:
  """The type and text of `error` on one line, at most `limit` characters of text."""
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def orbax_writes(directory: str) -> bool:
  """Whether Orbax reads and writes `directory` itself: a local path, or gs:// (through
  TensorStore's GCS driver, from every process of a run); other URLs are mirrored."""
  return storage.scheme(directory) in ("", "gs")


class Checkpointer:
  """Saves and restores (train state, data iterator) under `directory`, verified."""

  def __init__(self, directory: str, *, max_to_keep: int | None = 3,
               keep_period: int | None = None, async_save: bool = True,
               writer: bool = False):
    """Opens (or creates) `directory`.

    Args:
      directory: the checkpoints' root; one subdirectory per step. A URL that Orbax
        cannot write (not gs://) is mirrored through a local staging folder
        (single-process runs only).
      max_to_keep: keep the last K checkpoints (None: all) ...
      keep_period: ... and every checkpoint whose step is a multiple of this, forever.
      async_save: write in a background thread; `save` blocks only to copy to the host.
      writer: this is the one writer of `directory` (the trainer): on opening it deletes
        the temporary directories of interrupted saves and sets incomplete steps aside,
        and `restore` sets damaged steps aside. A reader must not (it would delete a save
        in progress).
    """
    self.directory = storage.absolute(directory)
    self._mirror = None if orbax_writes(self.directory) else self._open_mirror()
    # A mirrored save is uploaded by one background thread once Orbax has finished it, so
    # neither training nor the next save waits for the upload, and a run killed between
    # saves has its last finished save on the remote.
    self._uploader = (None if self._mirror is None else concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix="checkpoint-upload"))
    self._upload: concurrent.futures.Future | None = None  # the save being uploaded
    self._writer = writer
    self._saved_here: set[int] = set()  # committed, or being written by this object
    if writer and jax.process_index() == 0 and storage.isdir(self.directory):
      for name in storage.listdir(self.directory):
        if name.isdigit() and not self._committed(name):
          self._set_aside(name, "incomplete", f"no {COMMIT_MARKER}")
    if writer:  # every process of the run opens it; a reader may be alone
      _sync("navit_clip_checkpoints_opened")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, keep_period=keep_period,
        enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=writer)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data"))

  def _open_mirror(self) -> CheckpointMirror:
    """The mirror of remote `self.directory`, pulled; Orbax then works in its staging."""
    if jax.process_count() > 1:
      raise UserError(f"checkpoint directory {self.directory!r}: a multi-process run keeps "
                      "its checkpoints where every process writes: gs:// or a shared local "
                      f"directory ({storage.scheme(self.directory)}:// is mirrored by one "
                      "process)")
    mirror = CheckpointMirror(self.directory)
    mirror.pull()
    log.info("checkpoints of %s are staged in %s", mirror.remote, mirror.staging)
    self.directory = mirror.staging
    return mirror

  def _upload_when_saved(self, step: int) -> None:
    """(The upload thread.) Waits for Orbax to finish saving `step`, uploads it to the
    mirror's remote and deletes there the steps Orbax dropped."""
    self._manager.wait_until_finished()
    kept = self._manager.all_steps()
    if step in kept:
      self._mirror.push(step)
    self._mirror.prune(kept)

  def _finish_upload(self) -> None:
    """Blocks until the upload in progress (if any) is done; raises its error."""
    upload, self._upload = self._upload, None
    if upload is not None:
      upload.result()

  def _committed(self, step: int | str) -> bool:
    return storage.isfile(storage.join(self.directory, str(step), COMMIT_MARKER))

  def all_steps(self) -> list[int]:
    """The complete (committed) steps and those this object is saving, ascending; damage
    shows only on restore."""
    return sorted(s for s in self._manager.all_steps()
                  if s in self._saved_here or self._committed(s))

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state, data_iterator: grain.DatasetIterator | None = None, *,
           run_metadata: dict | None = None) -> bool:
    """Starts saving `state` (and the iterator position) at `step`; True if a save began.

    The caller decides when to save; every call saves (Orbax's own interval is not used).
    `run_metadata` (JSON-able) comes back with the state from `restore`. Every process
    calls it together.
    """
    self._finish_upload()  # one save in flight, as Orbax: the manager is this thread's now
    items = {"state": ocp.args.StandardSave(state)}
    checksums = {"state": state_checksums(state)}  # before the next step donates `state`
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
      checksums["data"] = _per_process(_data_checksum(data_iterator.get_state()))
    began = self._manager.save(step, args=ocp.args.Composite(**items), force=True,
                               custom_metadata={"checksums": checksums,
                                                "run": dict(run_metadata or {})})
    if began:
      self._saved_here.add(step)
      if self._mirror is not None:
        self._upload = self._uploader.submit(self._upload_when_saved, step)
    return began

  def save_and_wait(self, step: int, state, data_iterator: grain.DatasetIterator | None = None,
                    *, run_metadata: dict | None = None) -> None:
    """Saves at `step` unless that step is already saved, and waits until it is on disk."""
    self.wait()
    if self.latest_step() != step:
      self.save(step, state, data_iterator, run_metadata=run_metadata)
      self.wait()

  def restore(self, step: int | None, abstract_state,
              data_iterator: grain.DatasetIterator | None = None) -> Restored:
    """Restores the checked state at `step`, or the newest intact one if None.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct (with .sharding) or arrays; the
    state comes back shaped and sharded like it. If `data_iterator` is given, its position
    is restored in place.

    Raises:
      MissingInputError: no complete checkpoint (at `step`).
      DamagedCheckpointError: `step` is damaged; with None, every step is.
      CheckpointMismatchError: the checkpoint holds other arrays than `abstract_state`.
    """
    self._finish_upload()
    steps = self.all_steps()
    if step is not None and step not in steps:
      raise MissingInputError(f"no complete checkpoint at step {step} in {self.directory}; "
                              f"steps: {steps}")
    if not steps:
      raise MissingInputError(f"no complete checkpoint in {self.directory}")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    damaged: list[tuple[int, DamagedCheckpointError]] = []
    for s in [step] if step is not None else reversed(steps):
      try:
        restored = self._restore_agreed(s, target, data_iterator)
      except DamagedCheckpointError as e:
        if step is not None:
          raise
        log.warning("%s; trying the step before", e)
        damaged.append((s, e))
        continue
      self._set_aside_damaged(damaged)
      return restored
    faults = "; ".join(f"step {s}: {e.fault}" for s, e in damaged)
    raise DamagedCheckpointError(f"no intact checkpoint in {self.directory}: {faults}")

  def _damaged(self, step: int, fault: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(
        f"checkpoint step {step} in {self.directory} is damaged: {fault}", fault)

  def _restore_agreed(self, step: int, target, data_iterator) -> Restored:
    """`_restore_checked`, as damaged when any process finds it damaged."""
    try:
      restored, fault = self._restore_checked(step, target, data_iterator), None
    except DamagedCheckpointError as e:
      restored, fault = None, e
    if not _everywhere(fault is None):
      raise fault or self._damaged(step, "another process found it damaged")
    return restored

  def _restore_checked(self, step: int, target, data_iterator) -> Restored:
    """Step `step` after every check: metadata, structure, array and iterator checksums."""
    checksums, run_metadata = self._step_metadata(step)
    if checksums is None:
      log.warning("checkpoint step %d in %s has no checksums (saved without them); "
                  "restoring it unverified", step, self.directory)
    else:
      self._check_structure(step, checksums, target, data_iterator is not None)
    state = self._read(step, "state", ocp.args.StandardRestore(target))
    if checksums is not None:
      got = state_checksums(state)
      bad = [name for name, saved in checksums["state"].items()
             if saved["sum"] != got[name]["sum"]]
      if bad:
        raise self._damaged(step, f"checksum mismatch in {len(bad)} array(s): "
                                  f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}")
    if data_iterator is not None:
      if checksums is not None:
        self._check_data_file(step, checksums["data"])
      self._read(step, "data", grain.checkpoint.CheckpointRestore(data_iterator))
    return Restored(step, state, run_metadata)

  def _step_metadata(self, step: int) -> tuple[dict | None, dict]:
    """(the checksums, the run metadata) a step was saved with; (None, {}) for neither."""
    path = storage.join(self.directory, str(step), STEP_METADATA)
    try:
      with storage.open(path, "r") as f:
        custom = json.load(f)["custom_metadata"] or {}
      checksums, run_metadata = custom.get("checksums"), dict(custom.get("run") or {})
      if checksums is not None and not all(
          isinstance(e, dict) and {"shape", "dtype", "sum"} <= e.keys()
          for e in checksums["state"].values()):
        raise ValueError("malformed checksums")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise self._damaged(step, f"{STEP_METADATA} cannot be read ({_brief(e)})") from e
    return checksums, run_metadata

  def _check_structure(self, step: int, checksums: dict, target, with_data: bool) -> None:
    """Raises CheckpointMismatchError unless `step` holds `target`'s arrays (and data)."""
    want = {name: (list(x.shape), str(x.dtype))
            for name, x in zip(_names(target), jax.tree.leaves(target))}
    have = {name: (list(e["shape"]), e["dtype"]) for name, e in checksums["state"].items()}
    problems = []
    for what, names in (("missing", want.keys() - have.keys()),
                        ("unexpected", have.keys() - want.keys()),
                        ("another shape or dtype", {n for n in want.keys() & have.keys()
                                                    if want[n] != have[n]})):
      if names:
        problems.append(f"{what}: {', '.join(sorted(names)[:3])}"
                        f"{', ...' if len(names) > 3 else ''} ({len(names)})")
    if with_data and "data" not in checksums:
      problems.append("no data iterator state")
    if problems:
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} does not hold this run's state "
          f"(another model, optimizer or config?): {'; '.join(problems)}")

  def _check_data_file(self, step: int, saved: list[str]) -> None:
    """Checks this process's iterator state file against its saved checksum."""
    index, count = jax.process_index(), jax.process_count()
    path = storage.join(self.directory, str(step), "data", f"process_{index}-of-{count}.json")
    try:
      with storage.open(path, "r") as f:
        got = _data_checksum(json.load(f))
    except (OSError, ValueError) as e:
      raise self._damaged(step, f"the data iterator state cannot be read "
                                f"({_brief(e)})") from e
    if len(saved) != count or saved[index] != got:
      raise self._damaged(step, "checksum mismatch in the data iterator state")

  def _read(self, step: int, item: str, args):
    """One item of step `step`; any error reading it means the files are damaged."""
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
    except Exception as e:  # Orbax, TensorStore and Grain raise by what broke, many types
      raise self._damaged(step, f"its {item} item cannot be read ({_brief(e)})") from e

  def _set_aside(self, name: str, why: str, fault: str) -> None:
    """Renames step directory `name` to `name.why` (or `name.why.K`), out of Orbax's sight.

    On gs:// Orbax takes every folder of the directory without a commit marker for an
    unfinished save of its own and deletes it, so there the step goes to the sibling
    folder `<directory>.set-aside/` (by a copy and a deletion). A mirror's Checkpointer
    works in its local staging folder.
    """
    base = storage.join(self.directory, name)
    aside = self.directory if storage.is_local(self.directory) else f"{self.directory}.set-aside"
    target, k = storage.join(aside, f"{name}.{why}"), 1
    while storage.exists(target):
      target, k = storage.join(aside, f"{name}.{why}.{k}"), k + 1
    storage.move(base, target)
    log.warning("checkpoint step %s in %s is %s (%s); set aside as %s", name, self.directory,
                why, fault, target)

  def _set_aside_damaged(self, damaged: list[tuple[int, DamagedCheckpointError]]) -> None:
    """The writer moves the damaged steps out of the way (a later save may need the name)."""
    if not (self._writer and damaged):
      return
    if jax.process_index() == 0:
      for step, error in damaged:
        self._set_aside(str(step), "damaged", error.fault)
    _sync("navit_clip_damaged_set_aside")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until any asynchronous save has finished (and, mirrored, is uploaded)."""
    self._finish_upload()  # first: that thread waits on the manager too
    self._manager.wait_until_finished()

  def close(self) -> None:
    self.wait()
    if self._uploader is not None:
      self._uploader.shutdown()
    self._manager.close()


def step_dir(directory: str, step: int) -> str:
  """A folder Orbax reads committed step `step` of checkpoint directory `directory` from:
  the step itself (local, gs://), or its copy in the mirror's staging folder (another URL;
  only that step is downloaded, and only if the copy there is not the same)."""
  if orbax_writes(directory):
    return storage.join(directory, str(step))
  return CheckpointMirror(directory).fetch(step)


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

  Raises:
    DamagedCheckpointError: a parameter does not match the checksum saved with the step.
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
    params = checkpointer.restore(state_dir, args=args)["params"]
  _check_params(state_dir, params)
  return params


def _check_params(state_dir: str, params) -> None:
  """Compares restored `params` with the checksums of their step (if it has them)."""
  path = storage.join(os.path.dirname(storage.absolute(state_dir).rstrip("/")), STEP_METADATA)
  try:
    with storage.open(path, "r") as f:
      saved = json.load(f)["custom_metadata"]["checksums"]["state"]
  except (OSError, ValueError, KeyError, TypeError):
    return  # a step saved without checksums, or not by a Checkpointer
  got = state_checksums({"params": params})
  bad = sorted(name for name in got if name in saved and saved[name]["sum"] != got[name]["sum"])
  if bad:
    raise DamagedCheckpointError(f"{state_dir} is damaged: checksum mismatch in {len(bad)} "
                                 f"parameter(s): {', '.join(bad[:3])}")
