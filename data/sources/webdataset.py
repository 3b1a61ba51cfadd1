"""webdataset tar shards as img2dataset writes them (LAION, DataComp, CC12M).

A shard is a tar of samples; a sample is the run of consecutive members sharing a key
(the member path up to the first dot of its file name): KEY.jpg | KEY.png | KEY.webp ...
with KEY.txt (caption) and/or KEY.json ({"caption": ...} or {"captions": [...]}), and
optionally KEY.cls (a class index).

Untrusted archives: a sample with a member whose path is absolute or contains "..", a
link, a device or fifo, or a member larger than `max_member_bytes` becomes a skip marker
("tar_unsafe_path", "tar_link", "tar_special", "tar_oversized"); nothing is ever written
to disk. A sample without an image becomes "no_image"; a truncated or corrupt archive ends
with "tar_truncated" / "tar_corrupt".

Reading resumes at the byte offset of a sample's first member header (re-reading only the
headers before it).
"""

from __future__ import annotations

import dataclasses
import json
import tarfile
from collections.abc import Iterator
from typing import Any

from navit_clip.data.counters import skip_marker

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
_JSON_CAPTION_KEYS = ("caption", "captions", "texts", "text")
END = 1 << 62  # the offset after a shard that ended in error: a resume reads nothing more


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


def sample_to_record(files: dict[str, bytes]) -> dict[str, Any]:
  """{extension: bytes} of one sample -> a record, or a "no_image" skip marker."""
  ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
  if ext is None:
    return skip_marker("no_image", -1)
  record: dict[str, Any] = {"image": files[ext], "image_format": ext}
  if "txt" in files:
    record["caption"] = files["txt"]
  elif "json" in files:
    try:
      meta = json.loads(files["json"])
    except (ValueError, UnicodeDecodeError):
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
  return record


@dataclasses.dataclass(frozen=True)
class TarReader:
  """Reader of FileStream: webdataset samples of one tar shard."""

  max_member_bytes: int = 32 << 20

  def read(self, path: str, offset: int) -> Iterator[tuple[dict, int]]:
    if offset >= END:
      return
    try:
      f = open(path, "rb")
    except OSError:
      yield skip_marker("unreadable_file", -1), END
      return
    with f:
      try:
        tar = tarfile.open(fileobj=f, mode="r:")
      except (tarfile.TarError, OSError):
        yield skip_marker("tar_corrupt", -1), END
        return
      key, files, refused = None, {}, None
      while True:
        try:
          member = tar.next()
        except (tarfile.TarError, OSError):
          yield skip_marker("tar_corrupt", -1), END
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
        except (tarfile.TarError, OSError):
          yield skip_marker("tar_truncated", -1), END
          return
      if key is not None:
        yield (skip_marker(refused, -1) if refused else sample_to_record(files)), tar.offset
