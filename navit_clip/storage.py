"""One path layer for every file the framework reads or writes: local paths, object stores
(gs://, s3://, any fsspec protocol), http(s):// URLs (read) and webdataset's `pipe:CMD`
(read: the standard output of a shell command).

Local paths go through the os module (so regular-file checks and atomic renames keep
their local meaning); every other scheme goes through fsspec (s3fs, gcsfs, its HTTP
filesystem). Object stores have no folders and no append: `makedirs` is a no-op there,
`write_atomic` is a direct put (an object appears whole or not at all), and `AppendFile`
re-uploads the whole file on each flush.

Credentials and endpoints come from the usual environment: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for s3://; GOOGLE_APPLICATION_CREDENTIALS or
STORAGE_EMULATOR_HOST for gs://.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import logging
import os
import shlex
import shutil
import subprocess
import time
from typing import IO, BinaryIO

log = logging.getLogger(__name__)

PIPE_PREFIX = "pipe:"
_STREAMED = ("http", "https")  # read front to back: servers need not honour Range requests
_LOOKBACK = 1 << 20  # bytes a forward-only stream can seek back (headers re-read)


def scheme(path: str) -> str:
  """"" for a local path, "pipe" for pipe:CMD, else the URL scheme ("s3", "gs", "https")."""
  path = os.fspath(path)
  if path.startswith(PIPE_PREFIX):
    return "pipe"
  head, sep, _ = path.partition("://")
  return head.lower() if sep and head.isidentifier() else ""


def is_local(path: str) -> bool:
  return scheme(path) == ""


def _fs(path: str):
  """(the fsspec filesystem of remote `path`, the path as that filesystem names it)."""
  import fsspec  # imported on first remote use only

  if scheme(path) == "pipe":
    raise ValueError(f"{path!r}: a pipe: source can only be read as a stream")
  return fsspec.core.url_to_fs(path)


def _fresh_fs(path: str):
  """`_fs(path)` with the filesystem's cached listings dropped: other writers (Orbax's
  TensorStore, the other processes of a run, other hosts) change the store behind fsspec's
  back, so every question about what exists asks the store."""
  fs, p = _fs(path)
  fs.invalidate_cache()
  return fs, p


def join(base: str, *parts: str) -> str:
  """`base`/parts: os.path.join locally, "/"-joined for URLs."""
  if is_local(base):
    return os.path.join(base, *parts)
  return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def absolute(path: str) -> str:
  """An absolute local path (user folder expanded); URLs unchanged."""
  return os.path.abspath(os.path.expanduser(path)) if is_local(path) else path


def parent(path: str) -> str:
  """The folder holding file `path`: absolute locally, the URL up to its last "/"."""
  if is_local(path):
    return os.path.dirname(absolute(path))
  return path.rstrip("/").rsplit("/", 1)[0]


def exists(path: str) -> bool:
  if is_local(path):
    return os.path.exists(path)
  if scheme(path) == "pipe":
    return True  # known only once the command runs
  fs, p = _fresh_fs(path)
  return fs.exists(p)


def isfile(path: str) -> bool:
  """Whether `path` is a file (locally: a regular file; a FIFO or device is not)."""
  if is_local(path):
    return os.path.isfile(path)
  if scheme(path) == "pipe":
    return True
  fs, p = _fresh_fs(path)
  return fs.isfile(p)


def isdir(path: str) -> bool:
  """Whether `path` is a folder (on an object store: a prefix holding objects)."""
  if is_local(path):
    return os.path.isdir(path)
  fs, p = _fresh_fs(path)
  return fs.isdir(p)


def size(path: str) -> int:
  """The size of file `path` in bytes."""
  if is_local(path):
    return os.path.getsize(path)
  fs, p = _fresh_fs(path)
  return int(fs.size(p))


def listdir(path: str) -> list[str]:
  """The names (not paths) of the entries of folder `path`, sorted."""
  if is_local(path):
    return sorted(os.listdir(path))
  fs, p = _fresh_fs(path)
  return sorted(os.path.basename(e.rstrip("/")) for e in fs.ls(p, detail=False))


def glob(pattern: str, *, files_only: bool = False) -> list[str]:
  """The paths matching `pattern` (* ? [..]; ** on object stores), sorted, with the
  pattern's scheme; only the files among them with `files_only`."""
  if is_local(pattern):
    import glob as glob_lib

    return sorted(p for p in glob_lib.glob(pattern) if not files_only or os.path.isfile(p))
  if scheme(pattern) in _STREAMED + ("pipe",):
    raise ValueError(f"{pattern!r}: {scheme(pattern)} paths cannot be globbed; list the "
                     "files or use braces ({00000..00099})")
  fs, p = _fresh_fs(pattern)
  matches = fs.glob(p, detail=True)
  return sorted(fs.unstrip_protocol(m) for m, info in matches.items()
                if not files_only or info.get("type") == "file")


def walk_files(path: str) -> list[str]:
  """The files under folder `path`, recursively, in os.walk order with names sorted (a
  folder's files, then each subfolder's); URLs keep `path`'s scheme. Locally symlinked
  folders are not entered."""
  if is_local(path):
    out = []
    for root, dirnames, filenames in os.walk(path):
      dirnames.sort()
      out.extend(os.path.join(root, name) for name in sorted(filenames))
    return out
  fs, p = _fresh_fs(path)
  root = p.rstrip("/")

  def walk_order(found: str) -> tuple:
    *folders, name = found[len(root):].strip("/").split("/")
    return (*((1, f) for f in folders), (0, name))

  return [join(path, m[len(root):]) for m in sorted(fs.find(root), key=walk_order)]


def makedirs(path: str) -> None:
  """Creates folder `path` and its parents locally; object stores need no folders."""
  if is_local(path):
    os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
  """Deletes file `path`."""
  if is_local(path):
    os.remove(path)
    return
  fs, p = _fs(path)
  fs.rm_file(p)


def move(src: str, dst: str) -> None:
  """Renames file or folder `src` to `dst` (same store): os.rename locally; on an object
  store, a copy of each object under the prefix (server-side), then the deletion of the
  originals once every copy is made (not the stores' newer atomic move of single objects,
  which not every S3 or GCS API server implements)."""
  if is_local(src):
    os.rename(src, dst)
    return
  fs, p = _fresh_fs(src)
  target = _fs(dst)[1].rstrip("/")
  root = p.rstrip("/")
  for found in fs.find(root):
    fs.copy(found, target + found[len(root):])
  fs.rm(root, recursive=True)


def open(path: str, mode: str = "rb", *, encoding: str | None = None) -> IO:
  """Opens `path` for reading ("r", "rb") or writing ("w", "wb"); text modes take
  `encoding` (UTF-8 by default). Remote writes become visible when the file is closed."""
  if mode not in ("r", "rb", "w", "wb"):
    raise ValueError(f"storage.open mode {mode!r}; expected r, rb, w or wb")
  text = "b" not in mode
  encoding = (encoding or "utf-8") if text else None
  if is_local(path):
    return builtins.open(path, mode, encoding=encoding)
  if mode.startswith("w"):
    fs, p = _fs(path)
    f = fs.open(p, "wb")
  else:
    f = open_stream(path)
  return io.TextIOWrapper(f, encoding=encoding) if text else f


def open_stream(path: str) -> BinaryIO:
  """`path` opened for binary reading: seekable for local files and object stores;
  http(s) and pipe: streams read front to back (seeking forward reads on, seeking back
  works within the last MiB read).

  Raises:
    OSError: it cannot be opened (FileNotFoundError if it does not exist).
  """
  kind = scheme(path)
  if kind == "":
    return builtins.open(path, "rb")
  if kind == "pipe":
    return io.BufferedReader(_ForwardReader(_PipeStream(path[len(PIPE_PREFIX):]), path))
  fs, p = _fs(path)
  if kind in _STREAMED:
    return io.BufferedReader(_ForwardReader(fs.open(p, "rb", block_size=0), path))
  return fs.open(p, "rb")


def stream_size(f: BinaryIO) -> int | None:
  """The size of the file behind open stream `f`, or None when a stream cannot tell."""
  try:
    return os.fstat(f.fileno()).st_size
  except (AttributeError, OSError, io.UnsupportedOperation):
    value = getattr(f, "size", None)
    return int(value) if isinstance(value, int) else None


def read_bytes(path: str) -> bytes:
  with open_stream(path) as f:
    return f.read()


def write_atomic(path: str, data: bytes | str) -> None:
  """Writes `data` (str as UTF-8) to `path` whole: locally into `path.tmp` then renamed,
  so a reader never sees half a file; on object stores a single put."""
  data = data.encode("utf-8") if isinstance(data, str) else data
  if not is_local(path):
    fs, p = _fs(path)
    fs.pipe_file(p, data)
    return
  tmp = f"{path}.tmp"
  with builtins.open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def copy(src: str, dst: str) -> None:
  """Copies file `src` to `dst`, each local or remote."""
  write_atomic(dst, read_bytes(src))


def put_file(local_path: str, path: str) -> None:
  """Copies local file `local_path` to `path` without reading it into memory (an object
  store upload in parts, or a local copy)."""
  if is_local(path):
    shutil.copyfile(local_path, path)
    return
  fs, p = _fs(path)
  fs.put_file(local_path, p)


def cache_root() -> str:
  """The local folder for copies of remote files: $NAVIT_CLIP_CACHE, default
  ~/.cache/navit_clip (absolute)."""
  cache = os.environ.get("NAVIT_CLIP_CACHE") or os.path.join("~", ".cache", "navit_clip")
  return os.path.abspath(os.path.expanduser(cache))


def url_digest(path: str) -> str:
  """A short stable name for URL `path` (32 hex digits of its SHA-256)."""
  return hashlib.sha256(path.rstrip("/").encode()).hexdigest()[:32]


def _version(info: dict) -> str:
  """What changes when an object is rewritten: its ETag, generation or modification time."""
  for key in ("ETag", "etag", "generation", "md5Hash", "LastModified", "updated", "mtime"):
    if info.get(key):
      return f"{key}={info[key]}"
  return ""


def local_copy(path: str) -> str:
  """A local file holding the bytes of `path`: `path` itself when it is local; for a URL, a
  copy at cache_root()/files/<url_digest>/<name>, downloaded (to a temporary name, then
  renamed) unless the cache already holds one of the same size and version.

  Raises:
    OSError (FileNotFoundError for a missing object): the object cannot be read.
  """
  if is_local(path):
    return path
  fs, p = _fs(path)
  info = fs.info(p)
  size, version = int(info["size"]), _version(info)
  folder = os.path.join(cache_root(), "files", url_digest(path))
  target = os.path.join(folder, p.rstrip("/").rsplit("/", 1)[-1])
  stamp = f"{target}.version"
  if os.path.isfile(target) and os.path.getsize(target) == size:
    try:
      with builtins.open(stamp, encoding="utf-8") as f:
        if f.read() == version:
          return target
    except OSError:
      pass
  os.makedirs(folder, exist_ok=True)
  tmp = f"{target}.part-{os.getpid()}"
  start = time.monotonic()
  try:
    fs.get_file(p, tmp)
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  write_atomic(stamp, version)
  log.info("copied %s (%.1f MB) to %s in %.1f s", path, size / 1e6, target,
           time.monotonic() - start)
  return target


def upload_dir(local_dir: str, remote_dir: str) -> None:
  """Copies the files of local folder `local_dir` (recursively) under `remote_dir`."""
  for root, _, names in os.walk(local_dir):
    for name in names:
      src = os.path.join(root, name)
      put_file(src, join(remote_dir, os.path.relpath(src, local_dir).replace(os.sep, "/")))


def remove_tree(path: str) -> None:
  """Deletes folder `path` and everything under it (on an object store: every object under
  the prefix); a missing folder is no error."""
  if is_local(path):
    if os.path.exists(path):
      shutil.rmtree(path)
    return
  fs, p = _fresh_fs(path)
  if fs.exists(p):
    fs.rm(p, recursive=True)


class AppendFile:
  """A text file opened for appending: locally the file itself; on object stores (no
  append) its earlier text kept in memory and the whole file put again on each flush, at
  most every `min_interval_s` seconds (and always on close)."""

  def __init__(self, path: str, *, min_interval_s: float = 10.0):
    self.path, self._min_interval_s = path, min_interval_s
    self._local = builtins.open(path, "a", encoding="utf-8") if is_local(path) else None
    self._text = io.StringIO()
    if self._local is None and exists(path):
      self._text.write(read_bytes(path).decode("utf-8"))
    self._dirty, self._last_put = False, 0.0

  def write(self, text: str) -> None:
    if self._local is not None:
      self._local.write(text)
    else:
      self._text.write(text)
      self._dirty = True

  def flush(self, *, force: bool = False) -> None:
    if self._local is not None:
      self._local.flush()
    elif self._dirty and (force or time.time() - self._last_put >= self._min_interval_s):
      write_atomic(self.path, self._text.getvalue())
      self._dirty, self._last_put = False, time.time()

  def close(self) -> None:
    self.flush(force=True)
    if self._local is not None:
      self._local.close()


class _PipeStream(io.RawIOBase):
  """The standard output of shell command `cmd`; closing it early ends the command.

  Raises OSError on reading the end of the output of a command that failed.
  """

  def __init__(self, cmd: str):
    super().__init__()
    self._cmd = cmd
    self._proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE)

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    n = self._proc.stdout.readinto(buffer)
    if not n and self._proc.wait() != 0:
      raise OSError(f"pipe:{shlex.quote(self._cmd)} exited with status {self._proc.returncode}")
    return n

  def close(self) -> None:
    if not self.closed:
      if self._proc.poll() is None:
        self._proc.kill()
      self._proc.stdout.close()
      self._proc.wait()
    super().close()


class _ForwardReader(io.RawIOBase):
  """A seekable view of a forward-only stream: seeking on reads and drops bytes, seeking
  back works within the last `_LOOKBACK` bytes read (enough for archive headers)."""

  def __init__(self, raw: BinaryIO, name: str):
    super().__init__()
    self._raw, self.name = raw, name
    self._pos, self._end = 0, 0  # position; bytes read from the stream so far
    self._tail = bytearray()  # the last bytes read, ending at self._end

  def readable(self) -> bool:
    return True

  def seekable(self) -> bool:
    return True

  def tell(self) -> int:
    return self._pos

  def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
    if whence == io.SEEK_END:
      raise io.UnsupportedOperation(f"{self.name}: a stream has no known end to seek from")
    target = offset + (self._pos if whence == io.SEEK_CUR else 0)
    if target < self._end - len(self._tail):
      raise io.UnsupportedOperation(f"{self.name}: cannot seek back to byte {target} of a "
                                    f"stream at byte {self._end}")
    while self._end < target and self._fill(min(target - self._end, _LOOKBACK)):
      pass
    self._pos = target
    return target

  def readinto(self, buffer) -> int:
    if self._pos >= self._end and not self._fill(len(buffer)):
      return 0
    start = len(self._tail) - (self._end - self._pos)
    n = min(len(buffer), self._end - self._pos)
    buffer[:n] = self._tail[start:start + n]
    self._pos += n
    return n

  def _fill(self, n: int) -> bool:
    """Reads up to `n` more bytes of the stream into the tail; False at its end."""
    data = self._raw.read(max(n, 1 << 16))
    if not data:
      return False
    self._tail += data
    self._end += len(data)
    del self._tail[:max(len(self._tail) - _LOOKBACK - len(data), 0)]
    return True

  def close(self) -> None:
    if not self.closed:
      self._raw.close()
    super().close()
