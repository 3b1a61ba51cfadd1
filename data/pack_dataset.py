"""Grain integration: a packing `IterDataset` that yields batches of the packed contract.

`PackedBatchDataset(parent, spec, packer=...)` takes a Grain `IterDataset` of per-image
examples (see `navit_clip.data.pack`) and yields packed batches (`navit_clip.data.batch`).

packer:
- first_fit, best_fit, window_best_fit: our planners (`navit_clip.data.pack`). An image that
  fits no row waits for a later row, so padding does not depend on how many rows are open.
- grain_first_fit, grain_best_fit: Grain's `FirstFitPackIterDataset` /
  `BestFitPackIterDataset`, wrapped: per-token features (patches, positions, grid) pack at
  length L, each caption at length M*T (its slot's T tokens line up with its patches'
  segment), scalars (example id, label) as length-1 items at length M, with
  `max_sequences_per_bin=M`; the rows are converted to the contract and batched. They serve,
  but when one image fits no open bin they emit every open bin, so their padding depends on
  the bin count (several percent at 16-64 bins). Hence the planners of our own.

Checkpoints. Our iterator's state is the parent's state at an anchor at or before the
oldest pending image, the number of images pulled since, and the planner's state (keys of
the pending images). `set_state` restores the parent to the anchor, pulls the same images
again, keeps the pending ones and drops the rest: a resumed stream yields exactly the
batches of the unbroken one. Anchors are taken once per batch, so the parent's `get_state`
costs nothing per image. Pack after `mp_prefetch`, so batches do not depend on workers.

Counters. Both iterators keep the parent iterator they pack and answer `counters()` from
it: the skip counters of the `SkipCountingDataset` below them (`navit_clip.data.counters`).

Transfer. Grain worker processes hand each element to the main process through a queue,
and each NumPy array in it through a shared-memory segment of its own. Per-image examples
paid that fixed cost (four segments, the queue, the iterator state) once per image, about
as much CPU time as the per-example work itself. So the workers send `TRANSFER_GROUP`
consecutive examples at once (`PreprocessGroup`, `to_transfer`): all their uint8 patches
written once, into one shared-memory block that the worker reuses once the main process
is done with it (navit_clip.data.shared_blocks: a new segment's pages cost the kernel
0.15 ms an image to allocate), and everything else (positions, grid, text tokens, labels,
ids, notes, skip markers) pickled into one bytes value. In the main process
`UngroupDataset` yields the examples again, in order, their patches views into the block:
the same examples and the same batches as without workers. Its state is the parent's
state before the current group and the examples taken from it.
"""

from __future__ import annotations

import collections
import copy
import functools
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from navit_clip.choices import check_choice
from navit_clip.data.batch import BatchSpec
from navit_clip.data.counters import data_counters
from navit_clip.data.pack import (ALGORITHMS, DEFAULT_BINS, DEFAULT_WINDOW, Packer,
                                  example_length)
from navit_clip.data.shared_blocks import BlockReader, WorkerBlocks

GRAIN_PACKERS = ("grain_first_fit", "grain_best_fit")
PACKERS = ALGORITHMS + GRAIN_PACKERS  # the choices of config.data.packer
TRANSFER_GROUP = 16  # examples a worker sends at once (see "Transfer" above)


def to_transfer(examples: Sequence[dict], shared: bool = False) -> dict[str, Any]:
  """Per-image examples (or skip markers) -> one transfer element.

  Args:
    examples: what `Preprocessor` returns.
    shared: (only in a worker) write the patches into one of this worker's reused
      shared-memory blocks (navit_clip.data.shared_blocks), or where none is free into a
      Grain shared-memory array, which Grain's worker then sends without copying it
      again (the receiving side frees it).

  Returns:
    {"patches": uint8 [N, D], the examples' patches one after the other (N their total
    token count; [0, 0] when none has patches or they lie in a block), "rest": bytes, the
    pickled (BlockRef of the patches or None, list of (token count, the example without
    its patches))}. Patches of unequal widths (bad input, refused by the packer) travel
    inside "rest" with their example.
  """
  blocks = [ex["patches"] for ex in examples if "patches" in ex]
  ref, patches = None, np.zeros((0, 0), np.uint8)
  if not blocks or len({b.shape[1:] for b in blocks}) > 1:
    rest = [(-1, ex) for ex in examples]
  else:
    rest = [(ex["patches"].shape[0] if "patches" in ex else -1,
             {k: v for k, v in ex.items() if k != "patches"}) for ex in examples]
    shape = (sum(len(b) for b in blocks), *blocks[0].shape[1:])
    ref = _worker_blocks().write(blocks, shape) if shared else None
    if ref is None:
      out = grain.multiprocessing.SharedMemoryArray(shape, np.uint8) if shared else None
      patches = np.concatenate(blocks, out=out)
  return {"patches": patches,
          "rest": pickle.dumps((ref, rest), protocol=pickle.HIGHEST_PROTOCOL)}


def from_transfer(transfer: dict[str, Any], reader: BlockReader | None = None) -> list[dict]:
  """The examples of `to_transfer`, in order; their patches are views into the block
  (`reader` maps workers' blocks)."""
  ref, items = pickle.loads(transfer["rest"])
  block = transfer["patches"] if ref is None else reader.array(ref)
  start, examples = 0, []
  for n, example in items:
    if n >= 0:
      example["patches"], start = block[start:start + n], start + n
    examples.append(example)
  return examples


_WORKER_BLOCKS: WorkerBlocks | None = None  # this worker process's blocks, made on first use


def _worker_blocks() -> WorkerBlocks:
  global _WORKER_BLOCKS
  if _WORKER_BLOCKS is None:
    _WORKER_BLOCKS = WorkerBlocks()
  return _WORKER_BLOCKS


class PreprocessGroup:
  """Per-example work on a group of records, as one transfer element (`to_transfer`),
  for Grain workers (its patches in shared memory).

  Group g of a random-access dataset holds records g * size ... g * size + size - 1;
  record i is preprocessed as `preprocess(i, record)`, as is each (i, record) pair of a
  stream's group (`on_pairs`), so the examples are those of the ungrouped stream.
  """

  def __init__(self, preprocess: Callable[[int, dict], dict], size: int = TRANSFER_GROUP):
    self._preprocess, self._size = preprocess, size

  def __call__(self, group: int, records: Sequence[dict]) -> dict[str, Any]:
    first = group * self._size
    return to_transfer([self._preprocess(first + k, r) for k, r in enumerate(records)],
                       shared=True)

  def on_pairs(self, pairs: Sequence[tuple[int, dict]]) -> dict[str, Any]:
    """The group of a stream that carries each record's position: (index, record) pairs."""
    return to_transfer([self._preprocess(k, r) for k, r in pairs], shared=True)


class _UngroupIterator(grain.DatasetIterator):
  """The examples of a parent iterator of transfer elements, one at a time."""

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self._group_state: Any = None  # the parent's state before the current group
    self._examples: list[dict] = []
    self._taken = 0
    self._reader = BlockReader()

  def _next_group(self) -> None:
    self._group_state = self._parent.get_state()
    self._examples, self._taken = from_transfer(next(self._parent), self._reader), 0

  def __next__(self) -> dict:
    while self._taken == len(self._examples):
      self._next_group()
    example = self._examples[self._taken]
    self._examples[self._taken] = None  # the packer holds it from here
    self._taken += 1
    return example

  def get_state(self) -> dict[str, Any]:
    if self._taken == len(self._examples):  # between groups
      return {"group": copy.deepcopy(self._parent.get_state()), "taken": 0}
    return {"group": copy.deepcopy(self._group_state), "taken": self._taken}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or set(state) != {"group", "taken"}:
      held = sorted(state) if isinstance(state, dict) else type(state).__name__
      raise ValueError("the data iterator state is not that of workers sending "
                       f"{TRANSFER_GROUP} examples at a time (it holds {held}); resume "
                       "with the pipeline and config.data.num_workers that saved it")
    self._parent.set_state(state["group"])
    self._examples, self._taken = [], 0
    if state["taken"]:
      self._next_group()
      self._taken = int(state["taken"])


class UngroupDataset(grain.IterDataset):
  """The examples of a dataset of transfer elements (`to_transfer`), one at a time."""

  def __iter__(self) -> _UngroupIterator:
    return _UngroupIterator(self._parent.__iter__())


class PackedBatchIterator(grain.DatasetIterator):
  """Iterator of `PackedBatchDataset` for our planners; checkpointable by replay."""

  def __init__(self, parent: grain.DatasetIterator, spec: BatchSpec, packer: str,
               window: int, bins: int):
    super().__init__(parent)
    self._packer = Packer(spec, packer, window, bins)
    # (key of the next image to be pulled, parent state before pulling it), oldest first.
    self._anchors: collections.deque[tuple[int, Any]] = collections.deque()

  def _pull(self) -> dict | None:
    try:
      return next(self._parent)
    except StopIteration:
      return None

  def __next__(self) -> dict[str, np.ndarray]:
    self._anchors.append((self._packer.next_key, copy.deepcopy(self._parent.get_state())))
    batch = self._packer.next_batch(self._pull)
    oldest = min(self._packer.pending(), default=self._packer.next_key)
    while len(self._anchors) > 1 and self._anchors[1][0] <= oldest:
      self._anchors.popleft()
    if batch is None:
      raise StopIteration
    return batch

  def get_state(self) -> dict[str, Any]:
    if self._anchors:
      key, parent_state = self._anchors[0]
    else:
      key, parent_state = self._packer.next_key, self._parent.get_state()
    return {"parent": copy.deepcopy(parent_state), "anchor_key": key,
            "packer": copy.deepcopy(self._packer.get_state())}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    key = int(state["anchor_key"])
    packer_state = state["packer"]
    examples = {}
    for k in range(key, int(packer_state["next_key"])):
      example = self._pull()
      if example is None:
        raise ValueError(f"cannot restore the packing state: the parent ended after "
                         f"{k - key} of the {packer_state['next_key'] - key} images to replay")
      examples[k] = example
    self._packer.set_state(packer_state, examples)
    self._anchors = collections.deque([(key, copy.deepcopy(state["parent"]))])

  def counters(self) -> dict[str, int]:
    """The counters of the parent iterator (see `navit_clip.data.counters`)."""
    return data_counters(self._parent)


class _Running(grain.IterDataset):
  """An IterDataset whose iterator is one already running: for Grain's packers to read."""

  def __init__(self, iterator: grain.DatasetIterator):
    super().__init__()
    self._iterator = iterator

  def __iter__(self) -> grain.DatasetIterator:
    return self._iterator


class GrainPackedIterator(grain.DatasetIterator):
  """Iterator of `PackedBatchDataset` for GRAIN_PACKERS: Grain's packing over `parent`.

  `pack` builds Grain's packing pipeline over a dataset; its iterator's state is this
  iterator's state. The parent is kept for its counters.
  """

  def __init__(self, parent: grain.DatasetIterator,
               pack: Callable[[grain.IterDataset], grain.IterDataset]):
    self._packed = pack(_Running(parent)).__iter__()
    super().__init__(self._packed)
    self._counted = parent

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._packed)

  def get_state(self) -> dict[str, Any]:
    return self._packed.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._packed.set_state(state)

  def counters(self) -> dict[str, int]:
    """The counters of the parent iterator (see `navit_clip.data.counters`)."""
    return data_counters(self._counted)


def _grain_example(example: dict, spec: BatchSpec) -> dict[str, np.ndarray]:
  """A per-image example in the layout Grain's packers take (see the module docstring)."""
  n = example_length(example, spec)
  out = {
      "patches": example["patches"],
      "positions": np.asarray(example["positions"], np.int32),
      "grid_hw": np.broadcast_to(np.asarray(example["grid_hw"], np.int32), (n, 2)).copy(),
      "example_id": np.array([example["example_id"]], np.int64),
  }
  if spec.text_len is not None:
    out["text_tokens"] = np.asarray(example["text_tokens"], np.int32)
  if spec.num_classes is not None:
    dtype = np.float32 if spec.multi_label else np.int32
    out["labels"] = np.asarray(example["labels"], dtype)[None]
  return out


def _contract_row(row: dict[str, np.ndarray], spec: BatchSpec) -> dict[str, np.ndarray]:
  """One row of Grain's packer output as one row of the packed-batch contract."""
  mask = row["example_id_segment_ids"] > 0
  out = {
      "patches": row["patches"],
      "segment_ids": row["patches_segment_ids"].astype(np.int32),
      "positions": row["positions"],
      "grid_hw": row["grid_hw"],
      "image_mask": mask,
      "example_id": np.where(mask, row["example_id"], -1).astype(np.int64),
  }
  if spec.text_len is not None:
    out["text_tokens"] = row["text_tokens"].reshape(spec.max_images, spec.text_len)
  if spec.num_classes is not None:
    out["labels"] = row["labels"]
  return out


def _stack_rows(rows: list[dict[str, np.ndarray]], spec: BatchSpec) -> dict[str, np.ndarray]:
  """Stacks up to B contract rows into a batch; missing rows are padding."""
  batch = spec.zeros()
  for name, arr in batch.items():
    arr[:len(rows)] = np.stack([row[name] for row in rows])
  return batch


class PackedBatchDataset(grain.IterDataset):
  """Packs a Grain `IterDataset` of per-image examples into batches of `spec`.

  Args:
    parent: yields per-image example dicts (see `navit_clip.data.pack`).
    spec: the batch shape (B, L, M, P, C, T, K).
    packer: one of PACKERS (see the module docstring).
    window: images kept pending by window_best_fit.
    bins: rows kept open by first_fit / best_fit, and Grain's `num_packing_bins`.
    seed, shuffle_bins: passed to Grain's packers (ignored by ours, which keep row order).
  """

  def __init__(self, parent: grain.IterDataset, spec: BatchSpec, *,
               packer: str = "window_best_fit", window: int = DEFAULT_WINDOW,
               bins: int = DEFAULT_BINS, seed: int = 0, shuffle_bins: bool = False):
    check_choice("packer", packer, PACKERS)
    super().__init__(parent)
    self._spec, self._packer, self._window, self._bins = spec, packer, window, bins
    self._seed, self._shuffle_bins = seed, shuffle_bins

  def _grain_packed(self, examples: grain.IterDataset) -> grain.IterDataset:
    """Grain's packer over per-image `examples`, as batches of the contract."""
    spec, m = self._spec, self._spec.max_images
    lengths = {"patches": spec.seq_len, "positions": spec.seq_len,
               "grid_hw": spec.seq_len, "example_id": m}
    if spec.text_len is not None:
      lengths["text_tokens"] = m * spec.text_len
    if spec.num_classes is not None:
      lengths["labels"] = m
    cls = (grain.experimental.FirstFitPackIterDataset if self._packer == "grain_first_fit"
           else grain.experimental.BestFitPackIterDataset)
    packed = cls(examples.map(functools.partial(_grain_example, spec=spec)),
                 length_struct=lengths, num_packing_bins=self._bins, seed=self._seed,
                 shuffle_bins=self._shuffle_bins, max_sequences_per_bin=m)
    return (packed.map(functools.partial(_contract_row, spec=spec))
            .batch(spec.batch_size, batch_fn=functools.partial(_stack_rows, spec=spec)))

  def __iter__(self) -> PackedBatchIterator | GrainPackedIterator:
    parent = self._parent.__iter__()
    if self._packer in GRAIN_PACKERS:
      return GrainPackedIterator(parent, self._grain_packed)
    return PackedBatchIterator(parent, self._spec, self._packer, self._window, self._bins)

  def __str__(self) -> str:
    return f"PackedBatchDataset(packer={self._packer})"
