"""Streamed sources as checkpointable Grain IterDatasets.

  FileStream        records of many files: a new file order each epoch (seeded), `cycle`
                    files open at once, read round-robin (file interleave)
  MixedStream       weighted mixture of streams, source chosen per position from (seed, k)
  WorkerStride      yields (k, record) with the record's position k in the stream, or
                    lists of `group` consecutive such pairs; under `mp_prefetch`, worker
                    w of W keeps the groups g = w (mod W)

Why WorkerStride: `mp_prefetch` gives each worker a slice of the dataset and reads the
workers round-robin. WorkerStride turns that slice into a share of the stream, in one of
two ways (SPLITS). "files": worker w of W reads only files w, w + W, ... of each epoch's
order, so each record is read (and downloaded) once; the order depends on W. "records":
every worker reads the same (undecoded) records in the same order and keeps its groups,
so worker w emits groups w, w + W, ... and the round-robin restores groups 0, 1, 2, ...,
hence positions k = 0, 1, 2, ..., exactly: batches do not depend on the worker count, at
W reads of every file. Either way decoding, the expensive part, happens once per record.
Groups of several records let a worker send their examples as one element
(navit_clip.data.pack_dataset, "Transfer").

A reader is a picklable object with `read(path, offset) -> iterator of (record,
next_offset)`: records from the byte `offset` of the file, each with the offset at which
reading resumes after it; a reader that cannot read the rest of a file yields a skip
marker with the offset FAILED_FILE_END. Records without an example id get
`file_id << 32 | n` (n-th record of the file, from 0), so ids are unique across files and
hosts.

One bad file never ends a run: an exception from a reader becomes a "read_error" skip
marker that ends that file, and a marker that ends a file carries (stream name, files
failed so far in this pass, files) under FAILED_FILES_KEY, so that the skip counter can stop
a run whose files are mostly unreadable. A pass over all files that yields no usable record
(every shard empty or unreadable) raises EmptyPassError naming the files, instead of
looping over them forever.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import grain
import numpy as np

from navit_clip.data.counters import FAILED_FILES_KEY, SKIP_KEY, is_skip, skip_marker

log = logging.getLogger(__name__)

ID_FILE_SHIFT = 32  # example_id = file_id << ID_FILE_SHIFT | record number in the file
ID_MIXTURE_SHIFT = 48  # mixture ids: component << ID_MIXTURE_SHIFT | id (see mixture_id)
MAX_MIXTURE_COMPONENTS = 1 << 14  # components in bits 48..61: exact ids stay below 2**62
FAILED_FILE_END = 1 << 62  # the offset after a file that ended in error: nothing more is read
SPLITS = ("records", "files")  # how workers share a stream (WorkerStride)
_HASHED_ID = 1 << 62  # mixture ids of hashed ids are in [2**62, 2**63)


class EmptyPassError(ValueError):
  """A whole pass over a stream's files yielded no usable record."""


def file_failure(path: str, reason: str, error: Exception | str) -> tuple[dict, int]:
  """(skip marker, FAILED_FILE_END): what a reader yields when the rest of `path` cannot
  be read, because of `reason` (the skip counter's name) and `error`; logged once here."""
  detail = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
  log.warning("%s: %s (%s); skipping the rest of the file", path, reason, detail)
  return skip_marker(reason, -1), FAILED_FILE_END


def mixture_id(component: int, example_id: int) -> int:
  """The example id of component `component`'s record `example_id` in a mixture.

  Unique across components, deterministic, and within int64 for any id: an id in
  [0, 2**48) (every id the readers derive, most datasets' own) becomes
  `component << 48 | id`, exact and readable back; any other id (negative, or a 64-bit
  hash id) becomes 2**62 | a 62-bit hash of (component, id), a range the exact ids never
  reach (two of n such ids meet with probability about n**2 / 2**63).
  """
  if not 0 <= component < MAX_MIXTURE_COMPONENTS:
    raise ValueError(f"mixture component {component}: at most {MAX_MIXTURE_COMPONENTS} "
                     "components")
  example_id = int(example_id)
  if 0 <= example_id < 1 << ID_MIXTURE_SHIFT:
    return component << ID_MIXTURE_SHIFT | example_id
  digest = hashlib.blake2b(f"{component}:{example_id}".encode(), digest_size=8).digest()
  return _HASHED_ID | int.from_bytes(digest, "little") & (_HASHED_ID - 1)


class Reader(Protocol):

  def read(self, path: str, offset: int) -> Iterator[tuple[dict, int]]:
    ...


class _FileStreamIterator(grain.DatasetIterator):
  """State: epoch, position in the epoch's file order, open files (pos, offset, n), turn,
  and this pass's usable records and failed files."""

  def __init__(self, ds: FileStream):
    super().__init__()
    self._ds = ds
    self._epoch, self._next_file, self._turn = 0, 0, 0
    self._open: list[list[int]] = []  # [position in order, byte offset, records read]
    self._readers: list[Iterator[tuple[dict, int]] | None] = []
    self._order = ds.file_order(0)
    self._usable, self._failed = 0, 0  # in this pass
    self._reasons: collections.Counter[str] = collections.Counter()  # for messages only

  def _fill(self) -> None:
    while len(self._open) < self._ds.cycle and self._next_file < len(self._order):
      self._open.append([self._next_file, 0, 0])
      self._readers.append(None)
      self._next_file += 1

  def _path(self, slot: int) -> str:
    return self._ds.paths[self._order[self._open[slot][0]]]

  def _next_of(self, slot: int) -> tuple[dict, int] | None:
    """The next (record, offset) of the file in `slot`, None at its end. A reader's error
    becomes a "read_error" marker that ends the file."""
    try:
      if self._readers[slot] is None:
        offset = self._open[slot][1]
        self._readers[slot] = (iter(()) if offset >= FAILED_FILE_END
                               else iter(self._ds.reader.read(self._path(slot), offset)))
      return next(self._readers[slot])
    except StopIteration:
      return None
    except Exception as e:  # one bad file must not end the run
      self._readers[slot] = iter(())
      return file_failure(self._path(slot), "read_error", e)

  def _count(self, record: dict, offset: int) -> None:
    if not is_skip(record):
      self._usable += 1
      return
    self._reasons[record[SKIP_KEY]] += 1
    if offset >= FAILED_FILE_END:
      self._failed += 1
      record[FAILED_FILES_KEY] = (self._ds.name, self._failed, len(self._order))

  def _next_pass(self) -> None:
    """Starts the next epoch; raises EmptyPassError after a pass without a usable record."""
    if not self._usable:
      raise EmptyPassError(self._ds.empty_pass_message(self._reasons))
    if self._ds.num_epochs and self._epoch + 1 >= self._ds.num_epochs:
      raise StopIteration
    self._epoch += 1
    self._order, self._next_file, self._turn = self._ds.file_order(self._epoch), 0, 0
    self._usable, self._failed = 0, 0
    self._reasons.clear()

  def __next__(self) -> dict:
    while True:
      self._fill()
      if not self._open:
        self._next_pass()
        continue
      slot = self._turn % len(self._open)
      item = self._next_of(slot)
      if item is None:
        del self._open[slot], self._readers[slot]
        self._turn = slot
        continue
      record, offset = item
      pos, _, n = self._open[slot]
      self._open[slot] = [pos, int(offset), n + 1]
      self._turn = slot + 1
      if record.get("example_id", -1) < 0:
        file_id = self._ds.file_ids[self._order[pos]]
        record["example_id"] = file_id << ID_FILE_SHIFT | n
      self._count(record, offset)
      return record

  def get_state(self) -> dict[str, Any]:
    return {"epoch": self._epoch, "next_file": self._next_file, "turn": self._turn,
            "open": copy.deepcopy(self._open), "usable": self._usable,
            "failed": self._failed}

  def set_state(self, state: dict[str, Any]) -> None:
    self._epoch, self._next_file = int(state["epoch"]), int(state["next_file"])
    self._turn = int(state["turn"])
    self._order = self._ds.file_order(self._epoch)
    self._open = [list(map(int, o)) for o in state["open"]]
    self._readers = [None] * len(self._open)
    # States saved before these counts existed resume as if the pass had been usable.
    self._usable, self._failed = int(state.get("usable", 1)), int(state.get("failed", 0))
    self._reasons.clear()


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
    name: names the stream in messages and in FAILED_FILES_KEY (default: from the paths).
  """

  def __init__(self, paths: Sequence[str], reader: Reader, *, file_ids: Sequence[int],
               seed: int, cycle: int = 16, num_epochs: int = 0, shuffle_files: bool = True,
               name: str = ""):
    super().__init__()
    if not paths:
      raise ValueError("FileStream needs at least one file")
    if len(file_ids) != len(paths) or cycle < 1 or num_epochs < 0:
      raise ValueError(f"FileStream: {len(paths)} paths, {len(file_ids)} file ids, cycle "
                       f"{cycle}, num_epochs {num_epochs}")
    self.paths, self.reader, self.file_ids = list(paths), reader, list(file_ids)
    self.seed, self.cycle, self.num_epochs = seed, cycle, num_epochs
    self.shuffle_files = shuffle_files
    self.name = name or f"{len(self.paths)} files from {self.paths[0]!r}"
    self.share = (0, 1)  # (worker index, worker count): this reader's files of each order

  def set_worker_share(self, index: int, count: int) -> None:
    """Reads only files index, index + count, ... of each epoch's order (a worker's)."""
    if not 0 <= index < count <= len(self.paths):
      raise ValueError(f"FileStream of {len(self.paths)} files: no share {index} of {count}")
    self.share = (index, count)

  def empty_pass_message(self, reasons: collections.Counter[str]) -> str:
    """Why a pass over the files gave nothing to train on, naming the first files."""
    shown = ", ".join(repr(p) for p in self.paths[:3])
    more = f" and {len(self.paths) - 3} more" if len(self.paths) > 3 else ""
    found = (", ".join(f"{k}: {v}" for k, v in reasons.most_common()) if reasons
             else "every file is empty")
    return (f"data source {self.name}: a whole pass over its {len(self.paths)} files "
            f"({shown}{more}) yielded no usable record ({found}). Check that the shards "
            "hold samples (a shard whose downloads all failed is an empty tar) and match "
            "the source kind.")

  def file_order(self, epoch: int) -> list[int]:
    """The files (indices into `paths`) epoch `epoch` reads, in order: this share's."""
    index, count = self.share
    if not self.shuffle_files:
      return list(range(len(self.paths)))[index::count]
    order = np.random.default_rng((self.seed, epoch)).permutation(len(self.paths)).tolist()
    return order[index::count]

  def __iter__(self) -> _FileStreamIterator:
    return _FileStreamIterator(self)

  def __str__(self) -> str:
    return f"FileStream({len(self.paths)} files, {type(self.reader).__name__})"


class _MixedIterator(grain.DatasetIterator):

  def __init__(self, ds: MixedStream):
    self._streams = [p.__iter__() for p in ds.parents]  # one iterator per component
    super().__init__(self._streams)
    self._ds, self._k = ds, 0

  def __next__(self) -> dict:
    u = np.random.default_rng((self._ds.seed, self._k)).random()
    c = min(int(np.searchsorted(self._ds.cumulative, u, side="right")),
            len(self._streams) - 1)
    record = next(self._streams[c])
    self._k += 1
    record["example_id"] = mixture_id(c, record["example_id"])
    return record

  def get_state(self) -> dict[str, Any]:
    return {"k": self._k, "parents": [p.get_state() for p in self._streams]}

  def set_state(self, state: dict[str, Any]) -> None:
    self._k = int(state["k"])
    for p, s in zip(self._streams, state["parents"]):
      p.set_state(s)


class MixedStream(grain.IterDataset):
  """Position k comes from stream c with probability weights[c], drawn from (seed, k).

  Example ids become `mixture_id(c, id)` so they stay unique. Ends when the chosen stream
  ends.
  """

  def __init__(self, parents: Sequence[grain.IterDataset], weights: Sequence[float], *,
               seed: int):
    super().__init__(list(parents))
    w = np.asarray(weights, np.float64)
    if len(w) != len(parents) or len(w) == 0 or np.any(w < 0) or not w.sum() > 0:
      raise ValueError(f"MixedStream: weights {list(weights)} for {len(parents)} streams; "
                       "need one non-negative weight per stream, not all zero")
    if len(parents) > MAX_MIXTURE_COMPONENTS:
      raise ValueError(f"MixedStream: {len(parents)} streams; at most "
                       f"{MAX_MIXTURE_COMPONENTS}")
    self.cumulative = np.cumsum(w / w.sum())
    self.seed = seed

  def __iter__(self) -> _MixedIterator:
    return _MixedIterator(self)

  def __str__(self) -> str:
    return f"MixedStream({len(self.parents)} streams)"


class _StrideIterator(grain.DatasetIterator):
  """Positions k of the stream (split "records": every record read, those of this worker's
  groups kept) or of this worker's files (split "files": each record read is this
  worker's; its local number becomes the position it takes in the workers' round-robin)."""

  def __init__(self, parent: grain.DatasetIterator, start: int, step: int, group: int,
               split: str):
    super().__init__(parent)
    self._start, self._step, self._group, self._k = start, step, group, 0
    self._split = split

  def _next_kept(self) -> tuple[int, dict]:
    while True:
      record = next(self._parent)
      k, self._k = self._k, self._k + 1
      if self._split == "files":
        g, j = divmod(k, self._group)
        return (g * self._step + self._start) * self._group + j, record
      if (k // self._group) % self._step == self._start:
        return k, record

  def __next__(self) -> tuple[int, dict] | list[tuple[int, dict]]:
    if self._group == 1:
      return self._next_kept()
    pairs = [self._next_kept()]  # the first of a group: ends the iterator at the end
    while self._k % self._group:  # the rest of its group, fewer where the stream ends
      try:
        pairs.append(self._next_kept())
      except StopIteration:
        break
    return pairs

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "k": self._k}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._k = int(state["k"])


class WorkerStride(grain.IterDataset):
  """(k, record) pairs: the record at stream position k; a worker's share when sliced.

  With `group` > 1 it yields lists of the pairs of positions g * group ... g * group +
  group - 1 (group g; the last one shorter where the stream ends), and a worker keeps
  whole groups. `split` says how workers share the stream (SPLITS): "records", every
  worker reads every record and keeps its groups (the batches do not depend on the worker
  count); "files", worker w of W reads only files w, w + W, ... of each epoch's order of
  every FileStream below (no record is read twice: one worker's reads, not W), and its
  groups take the positions of the workers' round-robin (the batches depend on W, as a
  resume's fixed num_workers already requires).
  """

  def __init__(self, parent: grain.IterDataset, group: int = 1, split: str = "records"):
    super().__init__(parent)
    if group < 1:
      raise ValueError(f"WorkerStride: group {group} is not a positive record count")
    if split not in SPLITS:
      raise ValueError(f"WorkerStride: split {split!r}; expected one of {list(SPLITS)}")
    if split == "files" and not self.file_streams():
      raise ValueError("WorkerStride: split 'files' needs FileStreams below it")
    self._start, self._step, self._group, self._split = 0, 1, group, split

  def file_streams(self) -> list[FileStream] | None:
    """The FileStreams below, or None if some record comes from anything else."""
    streams, todo = [], [self._parent]
    while todo:
      ds = todo.pop()
      if isinstance(ds, FileStream):
        streams.append(ds)
      elif ds.parents:
        todo.extend(ds.parents)
      else:
        return None
    return streams

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """Keeps groups start, start + step, ...: called by `mp_prefetch` in each worker."""
    if sequential_slice:
      raise ValueError("WorkerStride supports strided worker slices only; "
                       "use mp_prefetch(sequential_slice=False)")
    self._start, self._step = sl.start or 0, sl.step or 1
    if self._split == "files":
      for stream in self.file_streams():
        stream.set_worker_share(self._start, self._step)

  def in_groups(self, size: int, split: str = "records") -> WorkerStride:
    """The same stream as lists of `size` consecutive pairs (unsliced), shared by `split`."""
    return WorkerStride(self._parent, group=size, split=split)

  def __iter__(self) -> _StrideIterator:
    return _StrideIterator(self._parent.__iter__(), self._start, self._step, self._group,
                           self._split)

  def __str__(self) -> str:
    return (f"WorkerStride({self._start}::{self._step}, group={self._group}, "
            f"split={self._split})")
