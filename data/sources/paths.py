"""File lists from patterns: "a/shard-{00000..00099}.tar,b/*.tfrecord,c/{x,y}.tar", and
opening untrusted files: only regular ones (a FIFO would block forever), reads bounded."""

from __future__ import annotations

import os
import re
import stat
from typing import BinaryIO

from navit_clip import storage

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_AS_WRITTEN = ("http", "https", "pipe")  # no listing, no cheap existence check


def _split_top(text: str, sep: str) -> list[str]:
  """Splits on `sep` outside braces."""
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    if ch == "{":
      depth += 1
    elif ch == "}":
      depth -= 1
      if depth < 0:
        raise ValueError(f"unbalanced '}}' in file pattern {text!r}")
    elif ch == sep and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  if depth:
    raise ValueError(f"unbalanced '{{' in file pattern {text!r}")
  parts.append(text[start:])
  return parts


def expand_braces(pattern: str) -> list[str]:
  """Brace expansion, in order: {00000..00099} (zero padding kept), {a,b,c}, nested."""
  start = pattern.find("{")
  if start < 0:
    return [pattern]
  depth = 0
  for end in range(start, len(pattern)):
    depth += {"{": 1, "}": -1}.get(pattern[end], 0)
    if depth == 0:
      break
  else:
    raise ValueError(f"unbalanced '{{' in file pattern {pattern!r}")
  head, body, tail = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
  m = _RANGE.match(body)
  if m:
    lo, hi = int(m.group(1)), int(m.group(2))
    width = len(m.group(1)) if m.group(1).startswith("0") else 0
    step = 1 if hi >= lo else -1
    options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
  else:
    options = [o for alt in _split_top(body, ",") for o in expand_braces(alt)]
  return [head + o + rest for o in options for rest in expand_braces(tail)]


def expand_paths(patterns: str, *, what: str = "files") -> list[str]:
  """Comma-separated patterns -> the existing files they name, in pattern order.

  Each pattern is brace-expanded, then globbed (sorted) if it has * ? or [. Patterns may
  be local paths or URLs (see navit_clip.storage); http(s):// URLs and pipe:CMD sources are
  taken as written (neither globbed nor checked: one that cannot be read is skipped and
  counted when it is read).

  Raises:
    FileNotFoundError: a pattern matches nothing, naming it and `what`.
  """
  if not patterns.strip():
    raise ValueError(f"no {what} given: the file pattern is empty")
  out = []
  for pattern in _split_top(patterns, ","):
    pattern = os.path.expanduser(pattern.strip())
    for path in expand_braces(pattern):
      if storage.scheme(path) in _AS_WRITTEN:
        out.append(path)
      elif any(ch in path for ch in "*?["):
        matches = storage.glob(path)
        if not matches:
          raise FileNotFoundError(f"{what}: no file matches {path!r}")
        out.extend(matches)
      elif storage.exists(path):
        out.append(path)
      else:
        raise FileNotFoundError(f"{what}: {path!r} does not exist (from pattern {pattern!r})")
  return out


class NotARegularFile(OSError):
  """A directory, FIFO, socket or device where a file was expected, or a path with a null byte."""


class FileTooLarge(OSError):
  """A file larger than the configured limit: it is not read."""


def open_regular(path: str) -> BinaryIO:
  """Opens `path` for binary reading if it is a regular file; never blocks on a FIFO.
  A URL or pipe:CMD (see navit_clip.storage) opens as a stream.

  Raises:
    OSError: it cannot be opened; NotARegularFile when it is not a regular file.
  """
  if not storage.is_local(path):
    return _open_remote(path)
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
  except ValueError as e:  # an embedded null byte
    raise NotARegularFile(f"{path!r}: {e}") from None
  try:
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
      raise NotARegularFile(f"{path!r} is not a regular file (mode {stat.filemode(mode)})")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")
  except BaseException:
    os.close(fd)
    raise


def _open_remote(path: str) -> BinaryIO:
  """`path` opened through navit_clip.storage; any failure of its client is an OSError."""
  try:
    return storage.open_stream(path)
  except OSError:
    raise
  except Exception as e:  # a client library's own error for a bad URL or a refused request
    raise OSError(f"{path!r}: {type(e).__name__}: {e}") from e


def read_regular(path: str, max_bytes: int) -> bytes:
  """The bytes of regular file `path`, refused before reading when over `max_bytes`.

  Raises:
    OSError: as `open_regular`; FileTooLarge when the file holds more than `max_bytes`.
  """
  with open_regular(path) as f:
    size = storage.stream_size(f) or 0  # 0 when a stream cannot tell: read to the limit
    data = f.read(max_bytes + 1) if size <= max_bytes else b""
    if size > max_bytes or len(data) > max_bytes:
      raise FileTooLarge(f"{path!r}: more than {max_bytes} bytes ({max(size, len(data))})")
    return data
