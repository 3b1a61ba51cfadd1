"""Counting and removing skipped records, exactly, in the main process.

Anything upstream that cannot use a record (a source that refuses a tar member, the
Preprocessor that cannot decode an image or finds no caption) does not drop it: it emits a
skip marker `{"skip": reason, "example_id": id}` in its place. Good examples may carry
"notes" (tuple of names: a repaired caption, a mislabelled but decodable image).
`SkipCountingDataset` runs after the worker processes and before packing; it counts
markers and notes, drops the markers, and strips the notes. So:
- the counts are exact whatever the worker count (workers never filter, which would also
  make the order depend on the worker count);
- they are part of the iterator state, so they checkpoint and survive a resume;
- a source that is mostly bad (more than `max_bad_fraction` of at least `min_records`
  records) stops the run with a message naming the source and the reasons: that is a
  wrong path or format, not noise;
- files that could not be read (to the end) count by their share of the files: a marker
  that ended a file carries (stream, files failed so far in this pass, files) under
  FAILED_FILES_KEY (the source keeps that count in its own state), and more than
  `max_bad_fraction` of a stream's files failing stops the run, however few records that
  is;
- a source with no usable record at all stops the run (even at max_bad_fraction = 1) once
  `min_records` records are seen, or when the records end.

`data_counters(iterator)` returns the counters for the training metrics: an iterator that
has them answers `counters()` (a `CounterSource`): the `SkipCountingIterator` itself, and
the packing iterators of `navit_clip.data.pack_dataset`, which keep the iterator they pack
and ask it in turn. No iterator tree is searched.
"""

from __future__ import annotations

import collections
from typing import Any, Protocol, runtime_checkable

import grain

from navit_clip.errors import UserError

SKIP_KEY = "skip"
NOTES_KEY = "notes"
FAILED_FILES_KEY = "failed_files"  # on a marker that ended a file: (stream, failed, files)
# On a record, or its marker, whose source fields lack the configured image or caption:
# what the source record holds instead (its feature names, its tar members' extensions)
HELD_KEY = "held_fields"


class BadSourceError(UserError):
  """Most records of a source are unusable: a wrong path or format (the input's fault:
  the command line prints it as one line)."""


def skip_marker(reason: str, example_id: int, held: str | None = None) -> dict[str, Any]:
  """The element that stands in for a record that cannot be used, with its reason (and,
  under HELD_KEY, what the record held when it lacked the configured fields)."""
  marker = {SKIP_KEY: reason, "example_id": int(example_id)}
  if held:
    marker[HELD_KEY] = held
  return marker


def is_skip(element: dict) -> bool:
  return SKIP_KEY in element


@runtime_checkable
class CounterSource(Protocol):
  """An iterator that reports skip counters (see `SkipCountingIterator.counters`)."""

  def counters(self) -> dict[str, int]:
    ...


class SkipCountingIterator(grain.DatasetIterator):
  """Drops skip markers, counts them by reason, counts notes; checkpointable."""

  def __init__(self, parent: grain.DatasetIterator, *, source: str, max_bad_fraction: float,
               min_records: int):
    super().__init__(parent)
    self._source = source
    self._max_bad, self._min_records = max_bad_fraction, min_records
    self._records = 0
    self._skipped: collections.Counter[str] = collections.Counter()
    self._notes: collections.Counter[str] = collections.Counter()
    self._held = ""  # HELD_KEY of the latest marker with one: named in the errors

  def __next__(self) -> dict:
    while True:
      try:
        element = next(self._parent)
      except StopIteration:
        self._check_usable()
        raise
      self._records += 1
      if is_skip(element):
        self._skipped[element[SKIP_KEY]] += 1
        self._held = element.get(HELD_KEY, self._held)
        if FAILED_FILES_KEY in element:
          self._check_files(*element[FAILED_FILES_KEY])
        self._check()
        continue
      for note in element.pop(NOTES_KEY, ()):
        self._notes[note] += 1
      self._check()
      return element

  def _reasons(self) -> str:
    return ", ".join(f"{k}: {v}" for k, v in self._skipped.most_common())

  def _held_note(self) -> str:
    return f" The unusable records hold {self._held}." if self._held else ""

  def _check_files(self, stream: str, failed: int, files: int) -> None:
    """`failed` of the `files` of `stream` have failed in this pass (the source counts)."""
    if self._max_bad < 1.0 and failed > self._max_bad * files:
      raise BadSourceError(
          f"data source {self._source}: {failed} of the {files} files of {stream} "
          f"could not be read to the end ({self._reasons()}): more than "
          f"config.data.max_bad_fraction = {self._max_bad} of the files (unreadable files "
          "count by their share of the files, not as one record each). Check the path and "
          "the file format.")

  def _check(self) -> None:
    bad = sum(self._skipped.values())
    if self._records < self._min_records:
      return
    if self._max_bad < 1.0 and bad > self._max_bad * self._records:
      raise BadSourceError(
          f"data source {self._source}: {bad} of the first {self._records} records were "
          f"unusable ({self._reasons()}), more than config.data.max_bad_fraction = "
          f"{self._max_bad}. Check the path, the file format and the feature keys."
          f"{self._held_note()}")
    if bad == self._records:
      self._check_usable()

  def _check_usable(self) -> None:
    if self._records and sum(self._skipped.values()) == self._records:
      raise BadSourceError(
          f"data source {self._source}: none of the {self._records} records read was "
          f"usable ({self._reasons()}). Check the path, the file format and the feature "
          f"keys.{self._held_note()}")

  def counters(self) -> dict[str, int]:
    """{"records": seen, "skipped": total, "skipped/<reason>": n, "noted/<note>": n}."""
    out = {"records": self._records, "skipped": sum(self._skipped.values())}
    out.update({f"skipped/{k}": v for k, v in sorted(self._skipped.items())})
    out.update({f"noted/{k}": v for k, v in sorted(self._notes.items())})
    return out

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "records": self._records,
            "skipped": dict(self._skipped), "notes": dict(self._notes)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._records = int(state["records"])
    self._skipped = collections.Counter({k: int(v) for k, v in state["skipped"].items()})
    self._notes = collections.Counter({k: int(v) for k, v in state["notes"].items()})


class SkipCountingDataset(grain.IterDataset):
  """See the module docstring.

  Args:
    parent: yields examples and skip markers.
    source: names the source in the error for a mostly bad one.
    max_bad_fraction: stop when more than this share of records was skipped, or of a
      stream's files could not be read (1 = only when no record is usable).
    min_records: ... and at least this many records have been seen (not for files).
  """

  def __init__(self, parent: grain.IterDataset, *, source: str = "?",
               max_bad_fraction: float = 0.5, min_records: int = 1000):
    super().__init__(parent)
    self._kwargs = dict(source=source, max_bad_fraction=max_bad_fraction,
                        min_records=min_records)

  def __iter__(self) -> SkipCountingIterator:
    return SkipCountingIterator(self._parent.__iter__(), **self._kwargs)

  def __str__(self) -> str:
    return f"SkipCountingDataset(source={self._kwargs['source']})"


def data_counters(iterator: grain.DatasetIterator) -> dict[str, int]:
  """The skip counters that `iterator` reports (a `CounterSource`); {} for any other."""
  return iterator.counters() if isinstance(iterator, CounterSource) else {}

