"""TFRecord files of tf.train.Example (WebLI, JFT, TFDS) without TensorFlow.

A TFRecord file is a sequence of records: uint64 length, uint32 masked CRC of the length,
the data, uint32 masked CRC of the data (little-endian). Lengths are checked, CRCs are not
(they need CRC-32C, which the standard library lacks); a corrupt record is caught when its
Example or its image fails to parse. A truncated file ends with a "truncated_file" skip
marker instead of an error.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator

from navit_clip.data.counters import skip_marker
from navit_clip.data.sources.tf_example import ExampleKeys, example_to_record

_HEADER = 12  # uint64 length + uint32 CRC
_FOOTER = 4  # uint32 CRC
END = 1 << 62  # the offset after a file that could not be read: a resume reads nothing


def read_tfrecords(path: str, offset: int = 0) -> Iterator[tuple[bytes | None, int]]:
  """Yields (record bytes, offset after it); (None, end) once if the file is truncated."""
  with open(path, "rb") as f:
    f.seek(offset)
    while True:
      head = f.read(_HEADER)
      if not head:
        return
      if len(head) < _HEADER:
        yield None, f.tell()
        return
      (length,) = struct.unpack("<Q", head[:8])
      data = f.read(length) if length < (1 << 40) else b""
      footer = f.read(_FOOTER)
      if len(data) != length or len(footer) != _FOOTER:
        yield None, f.tell()
        return
      yield data, f.tell()


def write_tfrecords(path: str, records) -> None:
  """Writes byte strings as a TFRecord file (CRC fields zero: readers here skip them)."""
  with open(path, "wb") as f:
    for data in records:
      f.write(struct.pack("<QI", len(data), 0) + data + struct.pack("<I", 0))


@dataclasses.dataclass(frozen=True)
class TFRecordReader:
  """Reader of FileStream: TFRecord Examples -> records (see tf_example)."""

  keys: ExampleKeys = ExampleKeys()

  def read(self, path: str, offset: int) -> Iterator[tuple[dict, int]]:
    if offset >= END:
      return
    try:
      for data, next_offset in read_tfrecords(path, offset):
        if data is None:
          yield skip_marker("truncated_file", -1), next_offset
          return
        yield example_to_record(data, self.keys), next_offset
    except OSError:
      yield skip_marker("unreadable_file", -1), END
