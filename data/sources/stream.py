"""Streamed sources as checkpointable Grain IterDatasets.

  FileStream        records of many files: a new file order each epoch (seeded), `cycle`
                    files open at once, read round-robin (file interleave)
  MixedStream       weighted mixture of streams, source chosen per position from (seed, k)
  WorkerStride      yields (k, record) with the record's position k in the stream; under
                    `mp_prefetch`, worker w of W keeps positions k = w (mod W)

Why WorkerStride: `mp_prefetch` gives each worker a slice of the dataset and reads the
workers round-robin. Slicing a stream by files would make the order depend on the worker
count; instead every worker reads the same (cheap, undecoded) records in the same order and
keeps its share, so worker w emits positions w, w + W, ... and the round-robin restores
k = 0, 1, 2, ... exactly: batches do not depend on the worker count. Decoding, the
expensive part, still happens once per record.

A reader is a picklable object with `read(path, offset) -> iterator of (record,
next_offset)`: records from the byte `offset` of the file, each with the offset at which
reading resumes after it. Records without an example id get `file_id << 32 | n` (n-th
record of the file, from 0), so ids are unique across files and hosts.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import grain
import numpy as np

ID_FILE_SHIFT = 32  # example_id = file_id << ID_FILE_SHIFT | record number in the file
ID_MIXTURE_SHIFT = 48  # mixtures add component << ID_MIXTURE_SHIFT


class Reader(Protocol):

  def read(self, path: str, offset: int) -> Iterator[tuple[dict, int]]:
    ...


class _FileStreamIterator(grain.DatasetIterator):
  """State: epoch, position in the epoch's file order, open files (pos, offset, n), turn."""

  def __init__(self, ds: FileStream):
    super().__init__()
    self._ds = ds
    self._epoch, self._next_file, self._turn = 0, 0, 0
    self._open: list[list[int]] = []  # [position in order, byte offset, records read]
    self._readers: list[Iterator[tuple[dict, int]] | None] = []
    self._order = ds.file_order(0)

  def _fill(self) -> None:
    while len(self._open) < self._ds.cycle and self._next_file < len(self._order):
      self._open.append([self._next_file, 0, 0])
      self._readers.append(None)
      self._next_file += 1

  def _reader(self, slot: int) -> Iterator[tuple[dict, int]]:
    if self._readers[slot] is None:
      pos, offset, _ = self._open[slot]
      path = self._ds.paths[self._order[pos]]
      self._readers[slot] = iter(self._ds.reader.read(path, offset))
    return self._readers[slot]

  def __next__(self) -> dict:
    while True:
      self._fill()
      if not self._open:
        if self._ds.num_epochs and self._epoch + 1 >= self._ds.num_epochs:
          raise StopIteration
        self._epoch += 1
        self._order, self._next_file, self._turn = self._ds.file_order(self._epoch), 0, 0
        continue
      slot = self._turn % len(self._open)
      try:
        record, offset = next(self._reader(slot))
      except StopIteration:
        del self._open[slot], self._readers[slot]
        self._turn = slot
        continue
      pos, _, n = self._open[slot]
      self._open[slot] = [pos, int(offset), n + 1]
      self._turn = slot + 1
      if record.get("example_id", -1) < 0:
        file_id = self._ds.file_ids[self._order[pos]]
        record["example_id"] = file_id << ID_FILE_SHIFT | n
      return record

  def get_state(self) -> dict[str, Any]:
    return {"epoch": self._epoch, "next_file": self._next_file, "turn": self._turn,
            "open": copy.deepcopy(self._open)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._epoch, self._next_file = int(state["epoch"]), int(state["next_file"])
    self._turn = int(state["turn"])
    self._order = self._ds.file_order(self._epoch)
    self._open = [list(map(int, o)) for o in state["open"]]
    self._readers = [None] * len(self._open)


class FileStream(grain.IterDataset):
  """Records of `paths`, interleaved, a new file order each epoch.

  Args:
    paths: the files (this process's share).
    reader: see the module docstring.
    file_ids: a globally unique id per path (its index in the unsharded list).
    seed: the file order of epoch e is a permutation drawn from (seed, e).
    cycle: files read at once, round-robin.
    num_epochs: passes over the files; 0 = endless.
    shuffle_files: False keeps the given order every epoch.
  """

  def __init__(self, paths: Sequence[str], reader: Reader, *, file_ids: Sequence[int],
               seed: int, cycle: int = 16, num_epochs: int = 0, shuffle_files: bool = True):
    super().__init__()
    if not paths:
      raise ValueError("FileStream needs at least one file")
    if len(file_ids) != len(paths) or cycle < 1 or num_epochs < 0:
      raise ValueError(f"FileStream: {len(paths)} paths, {len(file_ids)} file ids, cycle "
                       f"{cycle}, num_epochs {num_epochs}")
    self.paths, self.reader, self.file_ids = list(paths), reader, list(file_ids)
    self.seed, self.cycle, self.num_epochs = seed, cycle, num_epochs
    self.shuffle_files = shuffle_files

  def file_order(self, epoch: int) -> list[int]:
    if not self.shuffle_files:
      return list(range(len(self.paths)))
    return np.random.default_rng((self.seed, epoch)).permutation(len(self.paths)).tolist()

  def __iter__(self) -> _FileStreamIterator:
    return _FileStreamIterator(self)

  def __str__(self) -> str:
    return f"FileStream({len(self.paths)} files, {type(self.reader).__name__})"


class _MixedIterator(grain.DatasetIterator):

  def __init__(self, ds: MixedStream):
    super().__init__([p.__iter__() for p in ds.parents])
    self._ds, self._k = ds, 0

  def __next__(self) -> dict:
    u = np.random.default_rng((self._ds.seed, self._k)).random()
    c = min(int(np.searchsorted(self._ds.cumulative, u, side="right")),
            len(self._parents) - 1)
    record = next(self._parents[c])
    self._k += 1
    record["example_id"] = int(record["example_id"]) + (c << ID_MIXTURE_SHIFT)
    return record

  def get_state(self) -> dict[str, Any]:
    return {"k": self._k, "parents": [p.get_state() for p in self._parents]}

  def set_state(self, state: dict[str, Any]) -> None:
    self._k = int(state["k"])
    for p, s in zip(self._parents, state["parents"]):
      p.set_state(s)


class MixedStream(grain.IterDataset):
  """Position k comes from stream c with probability weights[c], drawn from (seed, k).

  Example ids get `c << ID_MIXTURE_SHIFT` added so they stay unique. Ends when the chosen
  stream ends.
  """

  def __init__(self, parents: Sequence[grain.IterDataset], weights: Sequence[float], *,
               seed: int):
    super().__init__(list(parents))
    w = np.asarray(weights, np.float64)
    if len(w) != len(parents) or len(w) == 0 or np.any(w < 0) or not w.sum() > 0:
      raise ValueError(f"MixedStream: weights {list(weights)} for {len(parents)} streams; "
                       "need one non-negative weight per stream, not all zero")
    self.cumulative = np.cumsum(w / w.sum())
    self.seed = seed

  def __iter__(self) -> _MixedIterator:
    return _MixedIterator(self)

  def __str__(self) -> str:
    return f"MixedStream({len(self.parents)} streams)"


class _StrideIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, start: int, step: int):
    super().__init__(parent)
    self._start, self._step, self._k = start, step, 0

  def __next__(self) -> tuple[int, dict]:
    while True:
      record = next(self._parent)
      k, self._k = self._k, self._k + 1
      if k % self._step == self._start:
        return k, record

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "k": self._k}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._k = int(state["k"])


class WorkerStride(grain.IterDataset):
  """(k, record) pairs: the record at stream position k; a worker's share when sliced."""

  def __init__(self, parent: grain.IterDataset):
    super().__init__(parent)
    self._start, self._step = 0, 1

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """Keeps positions start, start + step, ...: called by `mp_prefetch` in each worker."""
    if sequential_slice:
      raise ValueError("WorkerStride supports strided worker slices only; "
                       "use mp_prefetch(sequential_slice=False)")
    self._start, self._step = sl.start or 0, sl.step or 1

  def __iter__(self) -> _StrideIterator:
    return _StrideIterator(self._parent.__iter__(), self._start, self._step)

  def __str__(self) -> str:
    return f"WorkerStride({self._start}::{self._step})"
