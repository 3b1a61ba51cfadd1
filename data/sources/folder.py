"""Images in folders: captioned (an index file) or in class folders.

CaptionFolderSource(path): `path` is a folder holding captions.jsonl or captions.csv, or
an index file itself (any name: *.jsonl is JSON lines, any other name CSV).
- JSON lines: one object a line; the image path under "file", "image", "filename", "path"
  or "filepath"; the caption under "caption", "text", or "captions" (a list, for several
  captions per image).
- CSV with a header row (open_clip's layout among others), read as its `CsvLayout` says:
  the separator (default ","; open_clip's is a tab), the image column (default: the first
  of file, image, filename, path, filepath) and the caption column (default: every column
  named caption*, text or title, each one caption of the image). A named column that the
  header lacks, or a header with no image or caption column, is an error listing the
  columns the file has.

Image paths are relative to the image root (`image_root`, default the index file's folder)
or absolute; either way an image must lie inside the image root once symbolic links are
resolved, and a path that leaves it ("../x.jpg", "/etc/passwd", a link pointing out) is
skipped as "unsafe_path". Absolute paths therefore need an image root that holds them: set
it to their common folder ("/" allows any path). An index whose first paths are all
absolute and outside the image root is an error saying so.

ClassFolderSource(root): ImageNet-style root/<class>/<image>; classes sorted by name are
labels 0..K-1. For classification and zero-shot evaluation (`classnames`).

Folders and images may be local or on an object store (s3://, gs://: see
navit_clip.storage); there a path is checked by its normalised name (no links). All are
random access. Files are read when a record is asked for, only regular files (a FIFO is
never opened) of at most `max_file_bytes`: a missing or non-regular file
("unreadable_file"), a larger one ("oversized_file"), a path that leaves the image root or
holds a null byte ("unsafe_path"), or a malformed index line or CSV row ("bad_index_line")
becomes a skip marker. Index files may start with a UTF-8 byte order mark.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import posixpath
from typing import Any

from navit_clip import storage
from navit_clip.choices import naming
from navit_clip.data.counters import skip_marker
from navit_clip.data.sources.paths import FileTooLarge, open_regular, read_regular
from navit_clip.errors import MissingInputError, UserError

INDEX_FILES = ("captions.jsonl", "captions.csv")
DEFAULT_MAX_FILE_BYTES = 32 << 20
_FILE_KEYS = ("file", "image", "filename", "path", "filepath")
_CAPTION_KEYS = ("caption", "text", "captions")
_TAB_NAMES = ("\\t", "tab")  # how a tab separator may be written in a config
_ABSOLUTE_SAMPLE = 100  # index entries looked at for absolute paths outside the image root


def parse_separator(text: str) -> str:
  """A CSV separator as written in a config -> its one character ("\\t" or "tab": a tab).

  Raises:
    ValueError: not one character.
  """
  sep = "\t" if text in _TAB_NAMES else text
  if len(sep) != 1 or sep in "\r\n\"":
    raise ValueError("a CSV separator is one character other than a quote or a line break "
                     "(write a tab as \\t)")
  return sep


@dataclasses.dataclass(frozen=True)
class CsvLayout:
  """How a CSV index is read; open_clip's is CsvLayout("\\t", "filepath", "title").

  Attributes:
    separator: the field separator, one character (or "\\t" / "tab").
    image_key: the column of image paths; "" = the first of file, image, filename, path,
      filepath in the header.
    caption_key: the caption column; "" = every column named caption*, text or title.
  """

  separator: str = ","
  image_key: str = ""
  caption_key: str = ""

  @classmethod
  def from_config(cls, d) -> CsvLayout:
    """The layout of config.data (csv_separator, csv_image_key, csv_caption_key)."""
    return cls(d.csv_separator, d.csv_image_key, d.csv_caption_key)


def check_config(d) -> None:
  """Checks the CSV keys of config.data.

  Raises:
    ValueError: config.data.csv_separator is not one character.
  """
  with naming("config.data.csv_separator", d.csv_separator):
    parse_separator(d.csv_separator)


def _is_absolute(name: str) -> bool:
  return os.path.isabs(name) or bool(storage.scheme(name))


def resolve_under_root(root: str, name: Any) -> str | None:
  """The path of image `name` (relative to `root`, or absolute) if it lies inside `root`
  (links resolved, for a local root); None if it leaves it or is not a usable name."""
  if not isinstance(name, str) or not name or "\x00" in name:
    return None
  if storage.is_local(root):
    if not storage.is_local(name):
      return None
    base = os.path.realpath(root)
    path = os.path.realpath(os.path.join(base, name))
    return path if path.startswith(os.path.join(base, "")) else None
  kind, _, base = root.partition("://")
  base = posixpath.normpath(base)
  if storage.scheme(name):
    name_kind, _, rest = name.partition("://")
    if name_kind.lower() != kind.lower():
      return None
    path = posixpath.normpath(rest)
  elif name.startswith("/"):
    return None
  else:
    path = posixpath.normpath(posixpath.join(base, name))
  return f"{kind}://{path}" if path.startswith(base + "/") else None


def read_under_root(root: str, rel: Any, example_id: int, max_bytes: int) -> dict[str, Any]:
  """Record {"image", "image_format", "example_id"} of image `rel` (relative to `root`, or
  absolute inside it), or a skip marker ("unsafe_path", "unreadable_file",
  "oversized_file"; see the module docstring)."""
  path = resolve_under_root(root, rel)
  if path is None:
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


def _header_hint(fields: list[str]) -> str:
  """A hint for a header that is one field holding another likely separator."""
  if len(fields) == 1:
    for sep, written in (("\t", "\\t"), (";", ";"), ("|", "|"), (",", ",")):
      if sep in fields[0]:
        return f" (it looks {written!r}-separated: set config.data.csv_separator={written})"
  return ""


def _csv_columns(path: str, fields: list[str], layout: CsvLayout) -> tuple[str, list[str]]:
  """(the image column, the caption columns) of a CSV header, as `layout` names them.

  Raises:
    UserError: a column is missing, naming the columns the header has.
  """
  has = f"its columns are {fields}{_header_hint(fields)}"
  if layout.image_key and layout.image_key not in fields:
    raise UserError(f"{path}: no image column {layout.image_key!r} "
                    f"(config.data.csv_image_key); {has}")
  if layout.caption_key and layout.caption_key not in fields:
    raise UserError(f"{path}: no caption column {layout.caption_key!r} "
                    f"(config.data.csv_caption_key); {has}")
  image = layout.image_key or next((k for k in _FILE_KEYS if k in fields), None)
  if image is None:
    raise UserError(f"{path}: no image column (one of {list(_FILE_KEYS)}, or name it with "
                    f"config.data.csv_image_key); {has}")
  captions = [layout.caption_key] if layout.caption_key else [
      k for k in fields if k != image and (k.startswith("caption") or k in ("text", "title"))]
  if not captions:
    raise UserError(f"{path}: no caption column (caption*, text or title, or name it with "
                    f"config.data.csv_caption_key); {has}")
  return image, captions


def _csv_entries(path: str, layout: CsvLayout) -> list[tuple[str, Any] | None]:
  with _open_index(path) as f:
    reader = csv.DictReader(f, delimiter=parse_separator(layout.separator))
    image, caption_cols = _csv_columns(path, list(reader.fieldnames or []), layout)
    entries = []
    for row in _csv_rows(reader):
      rel = row.get(image) if row else None
      captions = [row[c] for c in caption_cols if row.get(c) is not None] if rel else []
      entries.append((rel, captions[0] if len(captions) == 1 else captions) if rel else None)
  return entries


def find_index(path: str) -> str:
  """The index file of a caption folder: `path` itself if it is a file, else the first of
  INDEX_FILES in it.

  Raises:
    MissingInputError: neither.
  """
  if storage.isfile(path):
    return path
  index = next((storage.join(path, n) for n in INDEX_FILES
                if storage.exists(storage.join(path, n))), None)
  if index is None:
    raise MissingInputError(f"folder source {path!r}: no {' or '.join(INDEX_FILES)} there "
                            "(or give the index file itself)")
  return index


def _check_absolute_paths(index: str, root: str, entries: list) -> None:
  """Raises UserError when the first entries are all absolute paths outside `root`: an
  index of absolute paths read with the default image root."""
  names = [e[0] for e in entries[:_ABSOLUTE_SAMPLE] if e is not None]
  if not names or not all(_is_absolute(n) for n in names):
    return
  if any(resolve_under_root(root, n) is not None for n in names):
    return
  try:
    common = (os.path.commonpath([os.path.dirname(n) for n in names])
              if storage.is_local(root) else "")
  except ValueError:  # local and remote names mixed
    common = ""
  raise UserError(f"{index}: its image paths are absolute ({names[0]!r}, ...) and none lies "
                  f"inside the image root {root!r}; set config.data.image_root to the folder "
                  f"that holds the images{f' (e.g. {common!r})' if common else ''}")


class CaptionFolderSource:
  """Random-access source of a captions.jsonl / CSV index (see the module docstring).

  Args:
    path: the folder holding captions.jsonl or captions.csv, or an index file.
    max_file_bytes: larger image files are skipped unread ("oversized_file").
    csv_layout: how a CSV index is read.
    image_root: the folder image paths are relative to and must lie in ("" = the index
      file's folder).

  Raises:
    UserError: the index cannot be read, lists no images, or its CSV header lacks a column.
  """

  def __init__(self, path: str, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, *,
               csv_layout: CsvLayout = CsvLayout(), image_root: str = ""):
    self.index = find_index(storage.absolute(path))
    self.root = storage.absolute(image_root) if image_root else storage.parent(self.index)
    self.max_file_bytes = max_file_bytes
    try:
      self._entries = (_jsonl_entries(self.index) if self.index.endswith(".jsonl")
                       else _csv_entries(self.index, csv_layout))
    except OSError as e:
      raise UserError(f"folder source {path!r}: cannot read {self.index!r}: {e}") from None
    if not self._entries:
      raise UserError(f"folder source {path!r}: {self.index} lists no images")
    _check_absolute_paths(self.index, self.root, self._entries)

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
    return f"CaptionFolderSource({self.index!r}, {len(self)} images under {self.root!r})"


class ClassFolderSource:
  """Random-access source of root/<class>/<image>: records {"image", "label", "caption"}.

  "label" is the class index, "caption" the class name (folder name, "_" as space); files
  over `max_file_bytes` are skipped unread ("oversized_file").
  """

  def __init__(self, root: str, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
    self.root = storage.absolute(root)
    self.max_file_bytes = max_file_bytes
    if not storage.isdir(self.root):
      raise MissingInputError(f"class-folder source {root!r} is not a directory")
    self.classes = [d for d in storage.listdir(self.root)
                    if not d.startswith(".") and storage.isdir(storage.join(self.root, d))]
    if not self.classes:
      raise UserError(f"class-folder source {root!r} has no class sub-folders")
    self._files = [(f"{c}/{name}", k) for k, c in enumerate(self.classes)
                   for name in storage.listdir(storage.join(self.root, c))
                   if not name.startswith(".")]
    if not self._files:
      raise UserError(f"class-folder source {root!r}: the class folders hold no files")

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
    self.root, self.rels = storage.absolute(root), list(rels)
    self.max_file_bytes = max_file_bytes

  def __len__(self) -> int:
    return len(self.rels)

  def __getitem__(self, index) -> dict[str, Any]:
    index = int(index)
    return read_under_root(self.root, self.rels[index], index, self.max_file_bytes)

  def __repr__(self) -> str:
    return f"RootedFiles({self.root!r}, {len(self)} files)"
