"""ArrayRecord shards of serialized tf.train.Example: Grain's random-access format.

`navit-clip data convert` writes them; TFDS ArrayRecord builds hold the same Examples.
Random access lets the pipeline shuffle globally, with a new order each epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain

from navit_clip.data.counters import SKIP_KEY, skip_marker
from navit_clip.data.sources.tf_example import ExampleKeys, example_to_record


class ArrayRecordSource:
  """Random-access Grain source over ArrayRecord files of Examples.

  Record i is `example_to_record` of the i-th Example (over the files in order); its
  example id is the "example_id" feature if present, else i. A record that cannot be read
  becomes an "unreadable_record" skip marker.
  """

  def __init__(self, paths: Sequence[str], keys: ExampleKeys = ExampleKeys()):
    if not paths:
      raise ValueError("ArrayRecordSource needs at least one file")
    self.paths, self.keys = list(paths), keys
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"ArrayRecordSource index {index} out of range [0, {len(self)})")
    try:
      data = self._source[index]
    except (OSError, RuntimeError, ValueError):
      return skip_marker("unreadable_record", index)
    record = example_to_record(data, self.keys)
    if record.get(SKIP_KEY) or "example_id" not in record:
      record["example_id"] = index
    return record

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self.paths)} files: {self.paths[0]!r}..., keys={self.keys})"
