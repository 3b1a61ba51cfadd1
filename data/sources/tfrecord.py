"""TFRecord files of tf.train.Example (WebLI, JFT, TFDS) without TensorFlow.

A TFRecord file is a sequence of records: uint64 length, uint32 masked CRC-32C of the
length, the data, uint32 masked CRC-32C of the data (little-endian). A file may be GZIP or
ZLIB compressed (found by its first bytes, as tf.data's compression_type would name it);
it is then decompressed as a stream. As tf.data does, both CRCs are checked; what cannot
be used becomes a skip marker:

  corrupt_record    a data CRC fails: reading goes on with the next record; or a length
                    CRC fails: the next record cannot be found, the rest of the file is
                    skipped (one marker)
  oversized_record  a length over `max_record_bytes`: the record is passed over unread
  truncated_file    the file ends inside a record
  corrupt_file      the compressed stream is corrupt
  unreadable_file   the file cannot be opened, or is not a regular file

A marker that ends a file has the offset FAILED_FILE_END. No read allocates more than
`max_record_bytes`.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from typing import BinaryIO

import google_crc32c

from navit_clip.data.counters import skip_marker
from navit_clip.data.sources.paths import open_regular
from navit_clip.data.sources.stream import FAILED_FILE_END, file_failure
from navit_clip.data.sources.tf_example import ExampleKeys, example_to_record
from navit_clip.storage import stream_size

log = logging.getLogger(__name__)

_HEADER = 12  # uint64 length + uint32 CRC
_FOOTER = 4  # uint32 CRC
_MASK_DELTA = 0xA282EAD8
_GZIP_MAGIC = b"\x1f\x8b"
_ZLIB_SECOND_BYTES = (0x01, 0x5E, 0x9C, 0xDA)  # after 0x78: the four compression levels
_CHUNK = 1 << 16
DEFAULT_MAX_RECORD_BYTES = 32 << 20


def masked_crc(data: bytes) -> int:
  """TFRecord's masked CRC-32C of `data` (uint32)."""
  crc = google_crc32c.value(bytes(data))
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


class _ZlibStream(io.RawIOBase):
  """The decompressed bytes of a ZLIB stream in `f`, read in bounded pieces."""

  def __init__(self, f: BinaryIO):
    super().__init__()
    self._f, self._z = f, zlib.decompressobj()

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    while not self._z.eof:
      data = self._z.unconsumed_tail or self._f.read(_CHUNK)
      if not data:
        raise EOFError("the ZLIB stream ends before its end marker")
      out = self._z.decompress(data, len(buffer))
      if out:
        buffer[:len(out)] = out
        return len(out)
    return 0


def _records_stream(f: BinaryIO) -> tuple[BinaryIO, bool]:
  """(the record bytes of raw file `f`, whether they are decompressed)."""
  head = f.read(_HEADER)
  f.seek(0)
  if len(head) == _HEADER and masked_crc(head[:8]) == struct.unpack("<I", head[8:])[0]:
    return f, False
  if head[:2] == _GZIP_MAGIC:
    return gzip.GzipFile(fileobj=f, mode="rb"), True
  if len(head) >= 2 and head[0] == 0x78 and head[1] in _ZLIB_SECOND_BYTES:
    return io.BufferedReader(_ZlibStream(f)), True
  return f, False


def _skip(f: BinaryIO, n: int, seekable: bool) -> bool:
  """Moves `n` bytes on; False if the stream ends first."""
  if seekable:
    f.seek(n, os.SEEK_CUR)
    return True
  while n > 0:
    got = len(f.read(min(n, _CHUNK)))
    if not got:
      return False
    n -= got
  return True


def read_tfrecords(path: str, offset: int = 0,
                   max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
                   ) -> Iterator[tuple[bytes | None, str, int]]:
  """Yields (data, "", offset after it) per good record, (None, reason, offset after it)
  per unusable one (see the module docstring); offsets count decompressed bytes.

  Raises:
    OSError: the file cannot be opened; EOFError, zlib.error, gzip.BadGzipFile: its
      compressed stream is truncated or corrupt.
  """
  with open_regular(path) as raw:
    f, compressed = _records_stream(raw)
    size = None if compressed else stream_size(raw)
    if offset and not _skip(f, offset, not compressed):
      return
    pos = offset
    while True:
      head = f.read(_HEADER)
      if not head:
        return
      if len(head) < _HEADER:
        yield None, "truncated_file", FAILED_FILE_END
        return
      if masked_crc(head[:8]) != struct.unpack("<I", head[8:])[0]:
        yield None, "corrupt_record", FAILED_FILE_END
        return
      (length,) = struct.unpack("<Q", head[:8])
      end = pos + _HEADER + length + _FOOTER
      if size is not None and end > size:
        yield None, "truncated_file", FAILED_FILE_END
        return
      if length > max_record_bytes:
        if not _skip(f, length + _FOOTER, not compressed):
          yield None, "truncated_file", FAILED_FILE_END
          return
        pos = end
        yield None, "oversized_record", pos
        continue
      data, footer = f.read(length), f.read(_FOOTER)
      if len(data) != length or len(footer) != _FOOTER:
        yield None, "truncated_file", FAILED_FILE_END
        return
      pos = end
      good = masked_crc(data) == struct.unpack("<I", footer)[0]
      yield (data, "", pos) if good else (None, "corrupt_record", pos)


def _failure_reason(error: Exception) -> str:
  """The skip reason of a TFRecord file that ends at `error`."""
  return ("truncated_file" if isinstance(error, EOFError)
          else "corrupt_file" if isinstance(error, (zlib.error, gzip.BadGzipFile))
          else "unreadable_file")


@dataclasses.dataclass(frozen=True)
class TFRecordReader:
  """Reader of FileStream: TFRecord Examples -> records (see tf_example)."""

  keys: ExampleKeys = ExampleKeys()
  max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES

  def read(self, path: str, offset: int) -> Iterator[tuple[dict, int]]:
    if offset >= FAILED_FILE_END:
      return
    try:
      for data, reason, next_offset in read_tfrecords(path, offset, self.max_record_bytes):
        if data is None:
          log.log(logging.WARNING if next_offset >= FAILED_FILE_END else logging.DEBUG,
                  "%s: %s", path, reason)
          yield skip_marker(reason, -1), next_offset
        else:
          yield example_to_record(data, self.keys), next_offset
    except (OSError, EOFError, zlib.error) as e:
      yield file_failure(path, _failure_reason(e), e)
