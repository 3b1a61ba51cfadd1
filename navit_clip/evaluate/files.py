"""Image files as a random-access source: a list, a glob, or a directory of images.

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

from navit_clip.data.counters import skip_marker
from navit_clip.data.sources.folder import DEFAULT_MAX_FILE_BYTES
from navit_clip.data.sources.paths import FileTooLarge, read_regular

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def _is_image(path: str) -> bool:
  return path.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(root: str) -> list[str]:
  """Image files under `root`, recursively, in sorted path order."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
  return out


def list_images(spec: str) -> list[str]:
  """Image paths named by `spec`, in a stable order.

  `spec` is a directory (its image files, recursively, sorted), a glob pattern (sorted
  matches), a .txt file with one path per line (in file order; relative paths are relative
  to the file), or one image file.
  """
  if os.path.isdir(spec):
    paths = _walk_images(spec)
  elif spec.endswith(".txt") and os.path.isfile(spec):
    base = os.path.dirname(os.path.abspath(spec))
    with open(spec, encoding="utf-8") as f:
      paths = [os.path.join(base, line.strip()) for line in f if line.strip()]
  elif os.path.isfile(spec):
    paths = [spec]
  else:
    paths = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
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

