"""Images in folders: captioned (captions.jsonl / captions.csv) or in class folders.

CaptionFolderSource(root): root/captions.jsonl, one JSON object a line, or
root/captions.csv with a header row. The image path (relative to root) is under "file",
"image", "filename" or "path"; the caption under "caption", "text", or "captions" (a list,
for several captions per image; in CSV, every column named caption* is one caption).

ClassFolderSource(root): ImageNet-style root/<class>/<image>; classes sorted by name are
labels 0..K-1. For classification and zero-shot evaluation (`classnames`).

Both are random access. Files are read when a record is asked for, only regular files (a
FIFO is never opened) of at most `max_file_bytes`: a missing or non-regular file
("unreadable_file"), a larger one ("oversized_file"), a path that leaves the root or holds
a null byte ("unsafe_path"), or a malformed index line or CSV row ("bad_index_line")
becomes a skip marker. Index files may start with a UTF-8 byte order mark.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

from navit_clip.data.counters import skip_marker
from navit_clip.data.sources.paths import FileTooLarge, open_regular, read_regular

INDEX_FILES = ("captions.jsonl", "captions.csv")
DEFAULT_MAX_FILE_BYTES = 32 << 20
_FILE_KEYS = ("file", "image", "filename", "path")
_CAPTION_KEYS = ("caption", "text", "captions")


def read_under_root(root: str, rel: Any, example_id: int, max_bytes: int) -> dict[str, Any]:
  """Record {"image", "image_format", "example_id"} of file `rel` under `root`, or a skip
  marker ("unsafe_path", "unreadable_file", "oversized_file"; see the module docstring)."""
  if not isinstance(rel, str) or "\x00" in rel or os.path.isabs(rel):
    return skip_marker("unsafe_path", example_id)
  path = os.path.realpath(os.path.join(root, rel))
  if not path.startswith(os.path.realpath(root) + os.sep):
    return skip_marker("unsafe_path", example_id)
  try:
    return {"image": read_regular(path, max_bytes), "image_format": rel,
            "example_id": example_id}
  except FileTooLarge:
    return skip_marker("oversized_file", example_id)
  except OSError:
    return skip_marker("unreadable_file", example_id)


def _open_index(path: str) -> io.TextIOWrapper:
  """A regular index file as text: UTF-8 without a leading byte order mark; bytes that are
  not UTF-8 kept as surrogates (so that captions count as repaired, not lost)."""
  return io.TextIOWrapper(open_regular(path), encoding="utf-8-sig", errors="surrogateescape",
                          newline="")


def _jsonl_entry(line: str) -> tuple[str, Any] | None:
  try:
    obj = json.loads(line)
  except (ValueError, RecursionError):
    return None
  if not isinstance(obj, dict):
    return None
  rel = next((obj[k] for k in _FILE_KEYS if k in obj), None)
  caption = next((obj[k] for k in _CAPTION_KEYS if k in obj), None)
  return (rel, caption) if isinstance(rel, str) else None


def _jsonl_entries(path: str) -> list[tuple[str, Any] | None]:
  with _open_index(path) as f:
    return [_jsonl_entry(line) for line in f if line.strip()]


def _csv_rows(reader: csv.DictReader):
  """The rows of `reader`; None for a row the csv module refuses (a field over its limit)."""
  while True:
    try:
      yield next(reader)
    except StopIteration:
      return
    except csv.Error:
      yield None


def _csv_entries(path: str) -> list[tuple[str, Any] | None]:
  with _open_index(path) as f:
    reader = csv.DictReader(f)
    fields = reader.fieldnames or []
    file_col = next((k for k in _FILE_KEYS if k in fields), None)
    caption_cols = [k for k in fields if k.startswith("caption") or k == "text"]
    if file_col is None:
      raise ValueError(f"{path}: no image column; the header needs one of {_FILE_KEYS}")
    entries = []
    for row in _csv_rows(reader):
      rel = row.get(file_col) if row else None
      captions = [row[c] for c in caption_cols if row.get(c) is not None] if rel else []
      entries.append((rel, captions[0] if len(captions) == 1 else captions) if rel else None)
  return entries


class CaptionFolderSource:
  """Random-access source of root/captions.jsonl or root/captions.csv (see module doc).

  Args:
    root: the folder.
    max_file_bytes: larger image files are skipped unread ("oversized_file").
  """

  def __init__(self, root: str, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
    self.root = os.path.abspath(root)
    self.max_file_bytes = max_file_bytes
    index = next((os.path.join(self.root, n) for n in INDEX_FILES
                  if os.path.exists(os.path.join(self.root, n))), None)
    if index is None:
      raise FileNotFoundError(f"folder source {root!r}: no {' or '.join(INDEX_FILES)}")
    try:
      self._entries = _jsonl_entries(index) if index.endswith("l") else _csv_entries(index)
    except OSError as e:
      raise ValueError(f"folder source {root!r}: cannot read {index!r}: {e}") from None
    if not self._entries:
      raise ValueError(f"folder source {root!r}: {os.path.basename(index)} lists no images")

  def __len__(self) -> int:
    return len(self._entries)

  def __getitem__(self, index) -> dict[str, Any]:
    index = int(index)
    entry = self._entries[index]
    if entry is None:
      return skip_marker("bad_index_line", index)
    rel, caption = entry
    record = read_under_root(self.root, rel, index, self.max_file_bytes)
    if caption is not None and "image" in record:
      record["caption"] = caption
    return record

  def __repr__(self) -> str:
    return f"CaptionFolderSource({self.root!r}, {len(self)} images)"


class ClassFolderSource:
  """Random-access source of root/<class>/<image>: records {"image", "label", "caption"}.

  "label" is the class index, "caption" the class name (folder name, "_" as space); files
  over `max_file_bytes` are skipped unread ("oversized_file").
  """

  def __init__(self, root: str, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
    self.root = os.path.abspath(root)
    self.max_file_bytes = max_file_bytes
    if not os.path.isdir(self.root):
      raise FileNotFoundError(f"class-folder source {root!r} is not a directory")
    self.classes = sorted(d for d in os.listdir(self.root)
                          if os.path.isdir(os.path.join(self.root, d)) and not d.startswith("."))
    if not self.classes:
      raise ValueError(f"class-folder source {root!r} has no class sub-folders")
    self._files = [(os.path.join(c, name), k) for k, c in enumerate(self.classes)
                   for name in sorted(os.listdir(os.path.join(self.root, c)))
                   if not name.startswith(".")]
    if not self._files:
      raise ValueError(f"class-folder source {root!r}: the class folders hold no files")

  @property
  def classnames(self) -> tuple[str, ...]:
    return tuple(c.replace("_", " ") for c in self.classes)

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index) -> dict[str, Any]:
    index = int(index)
    rel, label = self._files[index]
    record = read_under_root(self.root, rel, index, self.max_file_bytes)
    if "image" in record:
      record.update(label=label, caption=self.classnames[label])
    return record

  def __repr__(self) -> str:
    return f"ClassFolderSource({self.root!r}, {len(self.classes)} classes, {len(self)} images)"


class RootedFiles:
  """Random-access source of files named relative to `root`: record i is file `rels[i]`
  ({"image", "image_format", "example_id": i}), or a skip marker for a path that leaves
  the root, an unreadable or an oversized file (see the module docstring). For annotation
  files (COCO, Karpathy splits) that name their images."""

  def __init__(self, root: str, rels: list, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
    self.root, self.rels, self.max_file_bytes = os.path.abspath(root), list(rels), max_file_bytes

  def __len__(self) -> int:
    return len(self.rels)

  def __getitem__(self, index) -> dict[str, Any]:
    index = int(index)
    return read_under_root(self.root, self.rels[index], index, self.max_file_bytes)

  def __repr__(self) -> str:
    return f"RootedFiles({self.root!r}, {len(self)} files)"
