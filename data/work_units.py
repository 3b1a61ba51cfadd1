"""A whole source, in order, split into independent units of work (for convert / inspect).

A unit is one input file of a streamed source, or a contiguous index range of a
random-access one; units are picklable, so worker processes can each take some.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import ml_collections

from navit_clip.data import pipeline
from navit_clip.data.sources.paths import expand_paths
from navit_clip.data.sources.stream import ID_FILE_SHIFT
from navit_clip.data.sources.tfrecord import TFRecordReader
from navit_clip.data.sources.webdataset import TarReader


@dataclasses.dataclass(frozen=True)
class Unit:
  """Records [start, stop) of a random-access `source`, or all records of file `path`."""

  index: int
  source: Any = None
  start: int = 0
  stop: int = 0
  reader: Any = None
  path: str = ""

  def records(self) -> Iterator[dict]:
    """The unit's records (and skip markers), each with its example id."""
    if self.reader is None:
      for i in range(self.start, self.stop):
        yield self.source[i]
      return
    for n, (record, _) in enumerate(self.reader.read(self.path, 0)):
      if record.get("example_id", -1) < 0:
        record["example_id"] = self.index << ID_FILE_SHIFT | n
      yield record


def work_units(config: ml_collections.ConfigDict, *, records_per_unit: int = 10_000
               ) -> list[Unit]:
  """The units of config.data.source over config.data.train_files, in source order."""
  d = config.data
  if d.source in pipeline.STREAMS:
    reader = (TarReader(d.max_member_bytes) if d.source == "webdataset"
              else TFRecordReader(pipeline.example_keys(config), d.max_member_bytes))
    paths = expand_paths(d.train_files, what=f"{d.source} files")
    return [Unit(i, reader=reader, path=p) for i, p in enumerate(paths)]
  source = pipeline.make_source(config, "train")
  n = len(source)
  count = max(1, math.ceil(n / records_per_unit))
  bounds = [round(i * n / count) for i in range(count + 1)]
  return [Unit(i, source=source, start=bounds[i], stop=bounds[i + 1]) for i in range(count)]
