"""ArrayRecord shards of serialized tf.train.Example: Grain's random-access format.

`navit-clip data convert` writes them; TFDS ArrayRecord builds hold the same Examples.
Random access lets the pipeline shuffle globally, with a new order each epoch. Files on
object stores (s3://, gs://, ...) are copied to the local cache once (`storage.local_copy`,
each host the whole set: any record may be drawn) and read there.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from typing import Any

import grain

from navit_clip import storage
from navit_clip.data.counters import FAILED_FILES_KEY, SKIP_KEY, skip_marker
from navit_clip.data.sources.tf_example import ExampleKeys, example_to_record

log = logging.getLogger(__name__)


def _why_unreadable(path: str) -> str | None:
  """Why ArrayRecord file `path` cannot be opened, or None."""
  try:
    if not stat.S_ISREG(os.stat(path).st_mode):
      return "not a regular file"
    grain.sources.ArrayRecordDataSource([path])
  except Exception as e:  # the reader raises RuntimeError, or anything, on damaged files
    return f"{type(e).__name__}: {e}"[:200]
  return None


def _open_readable(paths: list[str]) -> tuple[Any, list[str]]:
  """(a Grain source over the readable files, the unreadable ones), all opened once when
  every file is fine. A URL is read from its local copy (`storage.local_copy`: the
  ArrayRecord reader opens local files only); one that cannot be copied is unreadable."""
  local, why = {}, {}
  for p in paths:
    try:
      local[p] = storage.local_copy(p)
    except OSError as e:
      why[p] = f"cannot be copied from its store: {type(e).__name__}: {e}"[:200]
  if not why and all(os.path.isfile(local[p]) for p in paths):
    try:
      return grain.sources.ArrayRecordDataSource([local[p] for p in paths]), []
    except Exception:  # some file is damaged: find which
      pass
  why.update({p: _why_unreadable(local[p]) for p in local})
  bad = [p for p in paths if why[p] is not None]
  for p in bad:
    log.warning("ArrayRecord file %s cannot be read (%s); counted as unreadable_file", p,
                why[p])
  good = [local[p] for p in paths if why[p] is None]
  if not good:
    raise ValueError(f"ArrayRecord files: none of the {len(paths)} can be read (first: "
                     f"{bad[0]!r}: {why[bad[0]]})")
  return grain.sources.ArrayRecordDataSource(good), bad


class ArrayRecordSource:
  """Random-access Grain source over ArrayRecord files of Examples.

  Record i is `example_to_record` of the i-th Example (over the readable files in order);
  its example id is the "example_id" feature if present, else i. A record that cannot be
  read becomes an "unreadable_record" skip marker; a file that cannot be opened (damaged,
  truncated, not a regular file) takes one index after the records, an "unreadable_file"
  marker carrying FAILED_FILES_KEY, so that the skip counter weighs it by its share of the
  files.

  Raises:
    ValueError: no file can be read, or the files hold no record.
  """

  def __init__(self, paths: Sequence[str], keys: ExampleKeys = ExampleKeys()):
    if not paths:
      raise ValueError("ArrayRecordSource needs at least one file")
    self.paths, self.keys = list(paths), keys
    self._source, self._unreadable = _open_readable(self.paths)
    self._records = len(self._source)
    if not self._records:
      raise ValueError(f"ArrayRecord files {self.paths[0]!r} ({len(self.paths)} files) hold "
                       "no records")

  def __len__(self) -> int:
    return self._records + len(self._unreadable)

  def _unreadable_file(self, index: int) -> dict[str, Any]:
    marker = skip_marker("unreadable_file", index)
    marker[FAILED_FILES_KEY] = (f"ArrayRecord files from {self.paths[0]!r}",
                                len(self._unreadable), len(self.paths))
    return marker

  def __getitem__(self, index) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"ArrayRecordSource index {index} out of range [0, {len(self)})")
    if index >= self._records:
      return self._unreadable_file(index)
    try:
      data = self._source[index]
    except Exception:  # a damaged record: the reader's errors are not documented
      return skip_marker("unreadable_record", index)
    record = example_to_record(data, self.keys)
    if record.get(SKIP_KEY) or "example_id" not in record:
      record["example_id"] = index
    return record

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self.paths)} files: {self.paths[0]!r}..., keys={self.keys})"
