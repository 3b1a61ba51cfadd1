"""Packing per-image patch sequences into fixed-shape rows ("Patch n' Pack", NaViT 2.3).

A per-image example is a dict:
  patches      uint8 [n, P*P*C]   1 <= n <= L (resize to fit upstream; longer raises)
  positions    int32 [n, 2]       (row, col) in the image's patch grid
  grid_hw      int32 [2]          the grid's (rows, cols)
  example_id   int
  text_tokens  int32 [T]          when the spec has text_len
  labels       int or float32 [K] when the spec has num_classes (multi-hot if multi_label)
Other keys are ignored. Packed batches follow `navit_clip.data.batch` exactly.

Row planners decide which images share a row; they see only integer keys (arrival order)
and token counts, so their state is a few lists of keys. Nothing is ever dropped or emitted
twice: an image that fits no row waits for a later one.
- first_fit / best_fit keep `bins` rows open; an image goes to the first / tightest open row
  with room (tokens and image slots). When it fits none, the fullest open row is closed and
  the image starts a new row. Rows that become full close at once.
- window_best_fit keeps `window` images pending and builds one row at a time: the oldest
  pending image first (so every image leaves within `window` rows), then repeatedly the
  largest pending image that fits the remaining room (best fit, decreasing). With a window
  of a few hundred images nearly every gap finds an image that fills it.
At the end of a finite stream all pending images are flushed into rows and the last batch
is padded with empty rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from navit_clip.data.batch import BatchSpec

ALGORITHMS = ("first_fit", "best_fit", "window_best_fit")
DEFAULT_WINDOW = 256  # images kept pending by window_best_fit
DEFAULT_BINS = 64  # rows kept open by first_fit / best_fit


def example_length(example: dict, spec: BatchSpec) -> int:
  """Validates a per-image example against `spec`; returns its token count n."""
  eid = example.get("example_id", "?")
  patches, positions = example["patches"], example["positions"]
  if patches.dtype != np.uint8 or patches.ndim != 2 or patches.shape[1] != spec.patch_dim:
    raise ValueError(f"example {eid}: patches must be uint8 [n, {spec.patch_dim}], got "
                     f"{patches.dtype}{list(patches.shape)}")
  n = patches.shape[0]
  if not 1 <= n <= spec.seq_len:
    raise ValueError(f"example {eid}: {n} patches, but a row holds 1..{spec.seq_len}; "
                     "resize images to fit the sequence length before packing")
  if positions.shape != (n, 2):
    raise ValueError(f"example {eid}: positions must be [{n}, 2], got {list(positions.shape)}")
  if np.shape(example["grid_hw"]) != (2,):
    raise ValueError(f"example {eid}: grid_hw must be [2], got {np.shape(example['grid_hw'])}")
  if spec.text_len is not None and np.shape(example.get("text_tokens")) != (spec.text_len,):
    raise ValueError(f"example {eid}: text_tokens must be [{spec.text_len}], got "
                     f"{np.shape(example.get('text_tokens'))}")
  if spec.num_classes is not None:
    want = (spec.num_classes,) if spec.multi_label else ()
    if "labels" not in example or np.shape(example["labels"]) != want:
      raise ValueError(f"example {eid}: labels must have shape {list(want)}, got "
                       f"{np.shape(example.get('labels'))}")
  return n


def assemble_batch(rows: Sequence[Sequence[dict]], spec: BatchSpec) -> dict[str, np.ndarray]:
  """Writes up to B rows of examples (each <= M images, <= L tokens) into a packed batch.

  Rows after the given ones are empty (all padding). Image k of a row gets segment id k+1
  and slot k; its tokens follow the previous image's.
  """
  if len(rows) > spec.batch_size:
    raise ValueError(f"{len(rows)} rows for a batch of {spec.batch_size}")
  batch = spec.zeros()
  for r, row in enumerate(rows):
    if len(row) > spec.max_images:
      raise ValueError(f"row {r} has {len(row)} images; at most {spec.max_images} allowed")
    start = 0
    for k, ex in enumerate(row):
      n = ex["patches"].shape[0]
      if start + n > spec.seq_len:
        raise ValueError(f"row {r} overflows {spec.seq_len} tokens at example "
                         f"{ex['example_id']}")
      sl = slice(start, start + n)
      batch["patches"][r, sl] = ex["patches"]
      batch["segment_ids"][r, sl] = k + 1
      batch["positions"][r, sl] = ex["positions"]
      batch["grid_hw"][r, sl] = ex["grid_hw"]
      batch["image_mask"][r, k] = True
      batch["example_id"][r, k] = ex["example_id"]
      if spec.text_len is not None:
        batch["text_tokens"][r, k] = ex["text_tokens"]
      if spec.num_classes is not None:
        batch["labels"][r, k] = ex["labels"]
      start += n
  return batch


class _Planner:
  """What every row planner keeps: the token count of each pending key.

  Keys are added in ascending order (see `Packer`); `_emit` hands a row out and forgets
  its keys.
  """

  def __init__(self, seq_len: int, max_images: int):
    self._seq_len, self._max_images = seq_len, max_images
    self._lengths: dict[int, int] = {}

  def add(self, key: int, length: int) -> None:
    self._lengths[key] = length

  def pending(self) -> list[int]:
    """Keys added but not yet emitted, ascending."""
    return sorted(self._lengths)

  def _emit(self, row: list[int]) -> list[int]:
    for k in row:
      del self._lengths[k]
    return row


class WindowPlanner(_Planner):
  """window_best_fit: rows built one at a time from a window of pending images."""

  def __init__(self, seq_len: int, max_images: int, window: int):
    if window < 1:
      raise ValueError(f"window must be >= 1, got {window}")
    super().__init__(seq_len, max_images)
    self._window = window
    self._keys: list[int] = []  # pending, in arrival order

  def wants_input(self) -> bool:
    return len(self._keys) < self._window

  def add(self, key: int, length: int) -> None:
    super().add(key, length)
    self._keys.append(key)

  def next_row(self, final: bool) -> list[int] | None:
    """The next row's keys, or None when nothing is pending. `final` is unused here."""
    del final
    if not self._keys:
      return None
    free = np.fromiter((self._lengths[k] for k in self._keys), np.int64, len(self._keys))
    taken = [0]
    room = self._seq_len - free[0]
    free[0] = -1
    while len(taken) < self._max_images:
      fitting = np.where(free <= room, free, -1)
      j = int(np.argmax(fitting))  # the largest that fits; the oldest among equals
      if fitting[j] < 1:
        break
      taken.append(j)
      room -= free[j]
      free[j] = -1
    row = [self._keys[j] for j in taken]
    self._keys = [k for k, f in zip(self._keys, free) if f >= 0]
    return self._emit(row)

  def get_state(self) -> dict[str, Any]:
    return {"waiting": list(self._keys)}

  def set_state(self, state: dict[str, Any], lengths: dict[int, int]) -> None:
    self._keys = [int(k) for k in state["waiting"]]
    self._lengths = {k: lengths[k] for k in self._keys}


class OpenRowsPlanner(_Planner):
  """first_fit / best_fit over `bins` open rows; the fullest row closes when none fits."""

  def __init__(self, seq_len: int, max_images: int, bins: int, best: bool):
    if bins < 1:
      raise ValueError(f"bins must be >= 1, got {bins}")
    super().__init__(seq_len, max_images)
    self._bins, self._best = bins, best
    self._open: list[list[int]] = []
    self._used: list[int] = []  # tokens used per open row
    self._ready: list[list[int]] = []  # closed rows, oldest first

  def wants_input(self) -> bool:
    return not self._ready

  def add(self, key: int, length: int) -> None:
    super().add(key, length)
    fits = [i for i, (row, used) in enumerate(zip(self._open, self._used))
            if used + length <= self._seq_len and len(row) < self._max_images]
    if fits:
      i = max(fits, key=lambda i: (self._used[i], -i)) if self._best else fits[0]
    else:
      if len(self._open) == self._bins:
        self._close(max(range(len(self._open)), key=lambda i: (self._used[i], -i)))
      self._open.append([])
      self._used.append(0)
      i = len(self._open) - 1
    self._open[i].append(key)
    self._used[i] += length
    if self._used[i] == self._seq_len or len(self._open[i]) == self._max_images:
      self._close(i)

  def _close(self, i: int) -> None:
    self._ready.append(self._open.pop(i))
    self._used.pop(i)

  def next_row(self, final: bool) -> list[int] | None:
    """The oldest closed row; at the end of the stream (`final`) the open rows in order."""
    if not self._ready and final and self._open:
      self._close(0)
    if not self._ready:
      return None
    return self._emit(self._ready.pop(0))

  def get_state(self) -> dict[str, Any]:
    return {"open": [list(r) for r in self._open], "ready": [list(r) for r in self._ready]}

  def set_state(self, state: dict[str, Any], lengths: dict[int, int]) -> None:
    self._open = [[int(k) for k in r] for r in state["open"]]
    self._ready = [[int(k) for k in r] for r in state["ready"]]
    self._lengths = {k: lengths[k] for r in self._open + self._ready for k in r}
    self._used = [sum(lengths[k] for k in r) for r in self._open]


def make_planner(algorithm: str, seq_len: int, max_images: int,
                 window: int = DEFAULT_WINDOW,
                 bins: int = DEFAULT_BINS) -> WindowPlanner | OpenRowsPlanner:
  """The row planner named `algorithm` (one of ALGORITHMS)."""
  if algorithm == "window_best_fit":
    return WindowPlanner(seq_len, max_images, window)
  if algorithm in ("first_fit", "best_fit"):
    return OpenRowsPlanner(seq_len, max_images, bins, best=algorithm == "best_fit")
  raise ValueError(f"packing algorithm {algorithm!r}; expected one of {list(ALGORITHMS)}")


class Packer:
  """Streams per-image examples into packed batches, with a checkpointable state.

  `next_batch(pull)` pulls examples (None = end of stream) until B rows are ready. The
  state (`get_state`) holds only integer keys: the i-th example pulled has key i, and the
  pending examples are named by key. `set_state` needs those examples back (the caller
  replays its source), see `navit_clip.data.pack_dataset`.
  """

  def __init__(self, spec: BatchSpec, algorithm: str = "window_best_fit",
               window: int = DEFAULT_WINDOW, bins: int = DEFAULT_BINS):
    self.spec = spec
    self._planner = make_planner(algorithm, spec.seq_len, spec.max_images, window, bins)
    self._examples: dict[int, dict] = {}
    self._next_key = 0
    self._exhausted = False

  @property
  def next_key(self) -> int:
    """The key the next pulled example gets (= examples pulled so far)."""
    return self._next_key

  def pending(self) -> list[int]:
    """Keys of the examples pulled but not yet emitted, ascending."""
    return self._planner.pending()

  def next_batch(self, pull: Callable[[], dict | None]) -> dict[str, np.ndarray] | None:
    """The next packed batch, or None once the stream is exhausted and flushed."""
    rows = []
    while len(rows) < self.spec.batch_size:
      if not self._exhausted and self._planner.wants_input():
        example = pull()
        if example is None:
          self._exhausted = True
        else:
          length = example_length(example, self.spec)
          self._examples[self._next_key] = example
          self._planner.add(self._next_key, length)
          self._next_key += 1
        continue
      row = self._planner.next_row(final=self._exhausted)
      if row is None:
        break
      rows.append([self._examples.pop(k) for k in row])
    return assemble_batch(rows, self.spec) if rows else None

  def get_state(self) -> dict[str, Any]:
    return {"planner": self._planner.get_state(), "next_key": self._next_key,
            "exhausted": self._exhausted}

  def set_state(self, state: dict[str, Any], examples: dict[int, dict]) -> None:
    """Restores `get_state()`; `examples` maps (at least) every pending key to its example."""
    lengths = {k: example_length(ex, self.spec) for k, ex in examples.items()}
    self._planner.set_state(state["planner"], lengths)
    self._examples = {k: examples[k] for k in self._planner.pending()}
    self._next_key = int(state["next_key"])
    self._exhausted = bool(state["exhausted"])


def pack(examples: Iterable[dict], spec: BatchSpec, algorithm: str = "window_best_fit",
         window: int = DEFAULT_WINDOW,
         bins: int = DEFAULT_BINS) -> Iterator[dict[str, np.ndarray]]:
  """Packs a stream of per-image examples into batches of `spec` (the last one padded)."""
  it = iter(examples)
  packer = Packer(spec, algorithm, window, bins)
  while (batch := packer.next_batch(lambda: next(it, None))) is not None:
    yield batch
