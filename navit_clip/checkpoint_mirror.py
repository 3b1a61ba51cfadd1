"""Checkpoints on an object store Orbax cannot write (s3://, ...), mirrored through a local
folder.

Orbax 0.12 writes local folders and gs:// (TensorStore's GCS driver) itself; for other
object stores (s3://, ...) the Checkpointer lets Orbax write into a local staging folder
and this module keeps the remote copy:
- `pull` (a writer, on opening) makes the staging folder hold exactly the remote committed
  steps: a step is downloaded unless the staging folder already holds it with the same
  _CHECKPOINT_METADATA (which carries the step's checksums); local steps the remote does
  not hold committed are deleted. The restore then runs on the local copy, checked as
  any local checkpoint (checksums, fallback past damaged steps). `fetch` (a reader:
  evaluation, initialising from a run) downloads one step the same way.
- `push` (once a save has finished) uploads a step's files, its commit marker last: an
  interrupted upload leaves a step without the marker, which is never listed or
  restored, and which the next upload of that step replaces whole.
- `prune` deletes the remote steps Orbax no longer keeps locally (max_to_keep and
  keep_period apply to both copies).

The staging folder is $NAVIT_CLIP_CACHE/checkpoints/<sha256 of the URL> (default cache
~/.cache/navit_clip). One process writes: Orbax's multi-process saves need one directory
that every process sees, so a multi-process run keeps its checkpoints on gs:// or in a
shared local (or network-mounted) directory. `navit_clip.checkpoint` uploads each step
from a background thread.
"""

from __future__ import annotations

import logging
import os
import shutil

from navit_clip import storage

log = logging.getLogger(__name__)

COMMIT_MARKER = "commit_success.txt"  # as checkpoint.COMMIT_MARKER (a lower layer here)
STEP_METADATA = "_CHECKPOINT_METADATA"


def staging_dir(remote: str) -> str:
  """The local folder that mirrors checkpoint directory URL `remote`."""
  return os.path.join(storage.cache_root(), "checkpoints", storage.url_digest(remote))


def committed_steps(directory: str) -> list[int]:
  """The steps of checkpoint directory `directory` (local or a URL) that hold their commit
  marker, ascending; [] for a directory that does not exist."""
  if not storage.isdir(directory):
    return []
  return sorted(int(name) for name in storage.listdir(directory) if name.isdigit()
                and storage.isfile(storage.join(directory, name, COMMIT_MARKER)))


def _remote_files(remote_dir: str) -> list[str]:
  """The paths (relative, "/"-separated) of the files under prefix `remote_dir`.

  A listed path that is the prefix of another is a folder, not a file."""
  prefix = remote_dir.rstrip("/") + "/"
  paths = [p for p in storage.glob(prefix + "**") if p.startswith(prefix)]
  folders = {p.rsplit("/", 1)[0] for p in paths}
  return sorted(p[len(prefix):] for p in paths if p not in folders)


class CheckpointMirror:
  """Keeps remote checkpoint directory `remote` in step with local folder `staging`."""

  def __init__(self, remote: str, staging: str | None = None):
    self.remote = remote.rstrip("/")
    self.staging = staging or staging_dir(self.remote)
    os.makedirs(self.staging, exist_ok=True)

  def remote_steps(self) -> list[int]:
    """The steps of the remote directory that hold their commit marker, ascending."""
    return committed_steps(self.remote)

  def _local_matches(self, step: int) -> bool:
    local = os.path.join(self.staging, str(step))
    if not os.path.isfile(os.path.join(local, COMMIT_MARKER)):
      return False
    try:
      with open(os.path.join(local, STEP_METADATA), "rb") as f:
        mine = f.read()
    except OSError:
      return False
    return mine == storage.read_bytes(storage.join(self.remote, str(step), STEP_METADATA))

  def pull(self) -> list[int]:
    """Makes the staging folder hold the remote committed steps; returns them."""
    steps = self.remote_steps()
    for name in os.listdir(self.staging):
      if name.split(".")[0].isdigit() and (not name.isdigit() or int(name) not in steps):
        shutil.rmtree(os.path.join(self.staging, name), ignore_errors=True)
    for step in steps:
      self.fetch(step)
    return steps

  def fetch(self, step: int) -> str:
    """The local copy of remote committed step `step` (downloaded unless the staging
    folder already holds it); returns its folder."""
    if not self._local_matches(step):
      self._download(step)
    return os.path.join(self.staging, str(step))

  def _download(self, step: int) -> None:
    """Step `step` into the staging folder, its commit marker last."""
    local = os.path.join(self.staging, str(step))
    shutil.rmtree(local, ignore_errors=True)
    remote = storage.join(self.remote, str(step))
    files = sorted(_remote_files(remote), key=lambda p: p == COMMIT_MARKER)
    for rel in files:
      target = os.path.join(local, *rel.split("/"))
      os.makedirs(os.path.dirname(target), exist_ok=True)
      with storage.open(storage.join(remote, rel), "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    log.info("downloaded checkpoint step %d from %s (%d files)", step, remote, len(files))

  def push(self, step: int) -> None:
    """Uploads finished local step `step` (replacing any remote copy), marker last."""
    local = os.path.join(self.staging, str(step))
    if not os.path.isfile(os.path.join(local, COMMIT_MARKER)):
      raise FileNotFoundError(f"checkpoint step {step} in {self.staging} is not committed")
    remote = storage.join(self.remote, str(step))
    storage.remove_tree(remote)
    files = []
    for root, _, names in os.walk(local):
      files += [os.path.relpath(os.path.join(root, n), local).replace(os.sep, "/")
                for n in names]
    for rel in sorted(files, key=lambda p: p == COMMIT_MARKER):
      storage.put_file(os.path.join(local, *rel.split("/")), storage.join(remote, rel))
    log.info("uploaded checkpoint step %d to %s (%d files)", step, remote, len(files))

  def prune(self, kept: list[int]) -> None:
    """Deletes the remote step folders (committed or not) whose step is not in `kept`."""
    if not storage.isdir(self.remote):
      return
    for name in storage.listdir(self.remote):
      if name.isdigit() and int(name) not in kept:
        storage.remove_tree(storage.join(self.remote, name))
        log.info("deleted checkpoint step %s from %s", name, self.remote)
