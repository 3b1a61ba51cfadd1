"""Images in folders: captioned (captions.jsonl / captions.csv) or in class folders.

CaptionFolderSource(root): root/captions.jsonl, one JSON object a line, or
root/captions.csv with a header row. The image path (relative to root) is under "file",
"image", "filename" or "path"; the caption under "caption", "text", or "captions" (a list,
for several captions per image; in CSV, every column named caption* is one caption).

ClassFolderSource(root): ImageNet-style root/<class>/<image>; classes sorted by name are
labels 0..K-1. For classification and zero-shot evaluation (`classnames`).

Both are random access. Files are read when a record is asked for; a missing file, a path
that leaves the root, or a malformed index line becomes a skip marker.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

from navit_clip.data.counters import skip_marker

INDEX_FILES = ("captions.jsonl", "captions.csv")
_FILE_KEYS = ("file", "image", "filename", "path")
_CAPTION_KEYS = ("caption", "text", "captions")


def _read_file(root: str, rel: str, example_id: int) -> dict[str, Any]:
  path = os.path.realpath(os.path.join(root, rel))
  if os.path.isabs(rel) or not path.startswith(os.path.realpath(root) + os.sep):
    return skip_marker("unsafe_path", example_id)
  try:
    with open(path, "rb") as f:
      return {"image": f.read(), "image_format": rel, "example_id": example_id}
  except OSError:
    return skip_marker("unreadable_file", example_id)


def _jsonl_entries(path: str) -> list[tuple[str, Any] | None]:
  entries = []
  with open(path, encoding="utf-8", errors="surrogateescape") as f:
    for line in f:
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except ValueError:
        entries.append(None)
        continue
      rel = next((obj[k] for k in _FILE_KEYS if k in obj), None) if isinstance(obj, dict) else None
      caption = next((obj[k] for k in _CAPTION_KEYS if k in obj), None) if rel else None
      entries.append((rel, caption) if isinstance(rel, str) else None)
  return entries


def _csv_entries(path: str) -> list[tuple[str, Any] | None]:
  with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
    reader = csv.DictReader(f)
    fields = reader.fieldnames or []
    file_col = next((k for k in _FILE_KEYS if k in fields), None)
    caption_cols = [k for k in fields if k.startswith("caption") or k == "text"]
    if file_col is None:
      raise ValueError(f"{path}: no image column; the header needs one of {_FILE_KEYS}")
    entries = []
    for row in reader:
      rel = row.get(file_col)
      captions = [row[c] for c in caption_cols if row.get(c) is not None]
      entries.append((rel, captions[0] if len(captions) == 1 else captions) if rel else None)
  return entries


class CaptionFolderSource:
  """Random-access source of root/captions.jsonl or root/captions.csv (see module doc)."""

  def __init__(self, root: str):
    self.root = os.path.abspath(root)
    index = next((os.path.join(self.root, n) for n in INDEX_FILES
                  if os.path.exists(os.path.join(self.root, n))), None)
    if index is None:
      raise FileNotFoundError(f"folder source {root!r}: no {' or '.join(INDEX_FILES)}")
    self._entries = _jsonl_entries(index) if index.endswith("l") else _csv_entries(index)
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
    record = _read_file(self.root, rel, index)
    if caption is not None and "image" in record:
      record["caption"] = caption
    return record

  def __repr__(self) -> str:
    return f"CaptionFolderSource({self.root!r}, {len(self)} images)"


class ClassFolderSource:
  """Random-access source of root/<class>/<image>: records {"image", "label", "caption"}.

  "label" is the class index, "caption" the class name (folder name, "_" as space).
  """

  def __init__(self, root: str):
    self.root = os.path.abspath(root)
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
    record = _read_file(self.root, rel, index)
    if "image" in record:
      record.update(label=label, caption=self.classnames[label])
    return record

  def __repr__(self) -> str:
    return f"ClassFolderSource({self.root!r}, {len(self.classes)} classes, {len(self)} images)"
