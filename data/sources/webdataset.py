"""webdataset tar shards as img2dataset writes them (LAION, DataComp, CC12M).

A shard is a tar of samples; a sample is the run of consecutive members sharing a key
(the member path up to the first dot of its file name): KEY.jpg | KEY.png | KEY.webp ...
with KEY.txt (caption) and/or KEY.json ({"caption": ...} or {"captions": [...]}), and
optionally KEY.cls (a class index).

Untrusted archives: a sample with a member whose path is absolute or contains "..", a
link, a device or fifo, or a member larger than `max_member_bytes` becomes a skip marker
("tar_unsafe_path", "tar_link", "tar_special", "tar_oversized"); nothing is ever written
to disk. A sample without an image becomes "no_image". No read is larger than
`max_member_bytes` (plus a block): a GNU long-name or PAX header claiming more ends the
shard with "tar_oversized_header" before anything is allocated. A truncated or corrupt
archive ends with "tar_truncated" / "tar_corrupt" (any error of the tar parser, or data
after the point where the parser saw the end: a damaged header), after the sample read
before the damage; a shard that is not a regular file, or cannot be opened, is
"unreadable_file". Every marker that ends a shard has the offset FAILED_FILE_END. A
zero-byte shard holds no samples.

Reading resumes at the byte offset of a sample's first member header (re-reading only the
headers before it).
"""

from __future__ import annotations

import dataclasses
import json
import tarfile
from collections.abc import Iterator
from typing import Any, BinaryIO

from navit_clip.data.counters import HELD_KEY, skip_marker
from navit_clip.data.sources.paths import open_regular
from navit_clip.data.sources.stream import FAILED_FILE_END, file_failure
from navit_clip.storage import stream_size

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
_JSON_CAPTION_KEYS = ("caption", "captions", "texts", "text")
_CHUNK = 1 << 16


class _OversizedRead(Exception):
  """tarfile asked for more bytes at once than any member may have."""


class _BoundedReads:
  """`f` for tarfile, refusing a read of more than `limit` bytes before it allocates them
  (tarfile reads what a GNU long-name or PAX header claims, up to terabytes)."""

  def __init__(self, f: BinaryIO, limit: int):
    self._f, self.limit = f, limit

  def read(self, size: int = -1) -> bytes:
    if size is None or size < 0 or size > self.limit:
      raise _OversizedRead(f"a read of {size} bytes (limit {self.limit})")
    return self._f.read(size)

  def seek(self, *args) -> int:
    return self._f.seek(*args)

  def tell(self) -> int:
    return self._f.tell()


def split_key(name: str) -> tuple[str, str]:
  """'a/b/0001.tar.jpg' style names -> ('a/b/0001', 'tar.jpg'); extension lowercased."""
  slash = name.rfind("/")
  dot = name.find(".", slash + 1)
  if dot < 0:
    return name, ""
  return name[:dot], name[dot + 1:].lower()


def refusal(member: tarfile.TarInfo, max_member_bytes: int) -> str | None:
  """Why a tar member must not be read, or None."""
  name = member.name
  if name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/"):
    return "tar_unsafe_path"
  if member.issym() or member.islnk():
    return "tar_link"
  if not member.isreg():
    return "tar_special"
  if member.size > max_member_bytes:
    return "tar_oversized"
  return None


def held_members(files: dict[str, bytes]) -> str:
  """What a sample without an image or caption member holds, for messages."""
  return (f"the tar members KEY.{{{','.join(sorted(files))}}} (images are read from "
          f"KEY.{{{','.join(IMAGE_EXTENSIONS)}}}, captions from KEY.txt or the "
          f"{'/'.join(_JSON_CAPTION_KEYS)} of KEY.json)")


def sample_to_record(files: dict[str, bytes]) -> dict[str, Any]:
  """{extension: bytes} of one sample -> a record, or a "no_image" skip marker; a marker
  or record without a caption says under HELD_KEY which members it had."""
  ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
  if ext is None:
    return skip_marker("no_image", -1, held_members(files))
  record: dict[str, Any] = {"image": files[ext], "image_format": ext}
  if "txt" in files:
    record["caption"] = files["txt"]
  elif "json" in files:
    try:
      meta = json.loads(files["json"])
    except (ValueError, UnicodeDecodeError, RecursionError):
      meta = None
    if isinstance(meta, dict):
      caption = next((meta[k] for k in _JSON_CAPTION_KEYS if k in meta), None)
      if isinstance(caption, (str, list)):
        record["caption"] = caption
  if "cls" in files:
    try:
      record["label"] = int(files["cls"].strip())
    except ValueError:
      pass
  if "caption" not in record:
    record[HELD_KEY] = held_members(files)
  return record


def _only_zeros_after(f: _BoundedReads, offset: int) -> bool:
  """Whether the archive holds only zero blocks after `offset`, where tarfile stopped:
  tarfile takes a damaged or truncated header after the first for the end of the archive."""
  f.seek(offset)
  while chunk := f.read(min(_CHUNK, f.limit)):
    if chunk.strip(b"\0"):
      return False
  return True


def _parser_failure(path: str, error: Exception) -> tuple[dict, int]:
  """The end of a shard at `error` from the tar parser (see stream.file_failure)."""
  oversized = isinstance(error, (_OversizedRead, MemoryError))
  return file_failure(path, "tar_oversized_header" if oversized else "tar_corrupt", error)


@dataclasses.dataclass(frozen=True)
class TarReader:
  """Reader of FileStream: webdataset samples of one tar shard."""

  max_member_bytes: int = 32 << 20

  def read(self, path: str, offset: int) -> Iterator[tuple[dict, int]]:
    if offset >= FAILED_FILE_END:
      return
    try:
      f = open_regular(path)
    except OSError as e:
      yield file_failure(path, "unreadable_file", e)
      return
    with f:
      if stream_size(f) != 0:  # None: a stream of unknown size
        yield from self._samples(path, _BoundedReads(f, self.max_member_bytes
                                                     + tarfile.BLOCKSIZE), offset)

  def _samples(self, path: str, f: _BoundedReads, offset: int
               ) -> Iterator[tuple[dict, int]]:
    """The samples of the archive `f` whose first member header is at `offset` or later."""
    try:
      tar = tarfile.open(fileobj=f, mode="r:")
    except Exception as e:  # any error of the parser on hostile bytes
      yield _parser_failure(path, e)
      return
    key, files, refused = None, {}, None
    while True:
      header_at = tar.offset
      try:
        member = tar.next()
      except Exception as e:
        if key is not None:  # the sample read before the damage
          yield (skip_marker(refused, -1) if refused else sample_to_record(files)), header_at
        yield _parser_failure(path, e)
        return
      tar.members.clear()  # headers already read; keep memory flat over big shards
      if member is None:
        break
      if member.offset < offset or member.isdir():
        continue
      name_key, ext = split_key(member.name)
      if key is not None and name_key != key:
        yield (skip_marker(refused, -1) if refused else sample_to_record(files)), member.offset
        files, refused = {}, None
      key = name_key
      reason = refusal(member, self.max_member_bytes)
      if reason is not None:
        refused = refused or reason
        continue
      try:
        files[ext] = tar.extractfile(member).read()
      except Exception as e:
        yield file_failure(path, "tar_truncated", e)
        return
    if key is not None:
      yield (skip_marker(refused, -1) if refused else sample_to_record(files)), tar.offset
    if not _only_zeros_after(f, tar.offset):
      yield file_failure(path, "tar_corrupt",
                         f"a damaged header at byte {tar.offset} ends the archive early")
