"""Image files as a random-access source: a list, a glob, or a directory of images, local or
on an object store (s3://, gs://; http(s):// files named one by one: navit_clip.storage).

Records are {"image": encoded bytes, "image_format": the file extension, "example_id": i,
"path": str} (plus "label" when labels are given); decoding happens later, in the
Preprocessor, which turns bad bytes into skip markers. A file that cannot be read, or is
not a regular file (a FIFO, a socket, a device: never opened, so never waited on), becomes
a skip marker here ("unreadable"), and so does one larger than `max_file_bytes`
("oversized_file"): nothing is dropped silently.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

from navit_clip import storage
from navit_clip.data.counters import skip_marker
from navit_clip.data.sources.folder import DEFAULT_MAX_FILE_BYTES
from navit_clip.data.sources.paths import FileTooLarge, expand_braces, read_regular

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_UNLISTED = ("http", "https", "pipe")  # no listing: files taken as written


def _is_image(path: str) -> bool:
  return path.lower().endswith(IMAGE_EXTENSIONS)


def _listed(list_file: str, base: str) -> list[str]:
  """The paths of .txt file `list_file`, one a line; relative ones under folder `base`."""
  with storage.open(list_file, "r") as f:
    lines = [line.strip() for line in f if line.strip()]
  return [line if not storage.is_local(line) else storage.join(base, line) for line in lines]


def _list_local(spec: str) -> list[str]:
  if os.path.isdir(spec):
    return [p for p in storage.walk_files(spec) if _is_image(p)]
  if spec.endswith(".txt") and os.path.isfile(spec):
    return _listed(spec, storage.parent(spec))
  if os.path.isfile(spec):
    return [spec]
  return sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))


def _list_url(spec: str) -> list[str]:
  if spec.endswith(".txt") and (storage.scheme(spec) in _UNLISTED or storage.isfile(spec)):
    return _listed(spec, storage.parent(spec))
  if storage.scheme(spec) in _UNLISTED:
    return expand_braces(spec)
  if storage.isdir(spec):
    return [p for p in storage.walk_files(spec) if _is_image(p)]
  return [p for pattern in expand_braces(spec) for p in storage.glob(pattern, files_only=True)]


def list_images(spec: str) -> list[str]:
  """Image paths named by `spec`, in a stable order.

  `spec` is a directory (its image files, recursively, sorted: a folder's files, then each
  subfolder's), a glob pattern (sorted matches), a .txt file with one path per line (in
  file order; relative paths are relative to the file), or one image file. Each may be a
  local path or an s3:// or gs:// URL (see navit_clip.storage), where globs also take
  braces ({a,b}, {000..099}); http(s):// names a .txt list or files one by one (braces
  expanded, nothing listed or checked: one that cannot be read is skipped when read).

  Raises:
    FileNotFoundError: `spec` names no image.
  """
  paths = _list_local(spec) if storage.is_local(spec) else _list_url(spec)
  if not paths:
    raise FileNotFoundError(f"no images found for {spec!r} (a directory, glob, .txt list of "
                            "paths, or an image file)")
  return paths


class ImageFiles:
  """Random-access Grain source over image files, record i = file i (see module doc).

  Args:
    paths: image files, in the order that sets their example ids 0..N-1.
    labels: optional int class per file, stored as the record's "label".
    max_file_bytes: larger files are skipped unread ("oversized_file").
  """

  def __init__(self, paths: Sequence[str], labels: Sequence[int] | None = None,
               max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
    if labels is not None and len(labels) != len(paths):
      raise ValueError(f"ImageFiles got {len(paths)} paths but {len(labels)} labels")
    self.paths = list(paths)
    self.labels = None if labels is None else [int(x) for x in labels]
    self.max_file_bytes = max_file_bytes

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index) -> dict:
    index = int(index)
    path = self.paths[index]
    try:
      data = read_regular(path, self.max_file_bytes)
    except FileTooLarge:
      return skip_marker("oversized_file", index)
    except OSError:  # NotARegularFile among them
      return skip_marker("unreadable", index)
    record = {"image": data, "image_format": os.path.splitext(path)[1].lstrip("."),
              "example_id": index, "path": path}
    if self.labels is not None:
      record["label"] = self.labels[index]
    return record

  def __repr__(self) -> str:
    return f"ImageFiles({len(self.paths)} files, first={self.paths[0] if self.paths else None!r})"

