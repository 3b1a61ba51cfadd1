"""Training metrics: one console line with an ETA, a JSONL file, and TensorBoard events.

`MetricsLogger.log(step, metrics)` takes host floats (call `jax.device_get` first, once per
log step, so logging never syncs the device more than that).

The workdir may be a URL (navit_clip.storage): metrics.jsonl is then put whole at most
every `upload_interval_s` seconds and on close, and TensorBoard events are written to a
local temporary folder and uploaded under workdir/tensorboard on the same schedule.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import uuid
from typing import Mapping

from navit_clip import storage

_CONSOLE_KEYS = ("loss", "lr", "t", "b", "images_per_s", "tokens_per_s", "padding",
                 "images_per_row", "data_wait_frac", "mfu")


def _fmt(v: float) -> str:
  if isinstance(v, int) or (abs(v) >= 100 and float(v).is_integer()):
    return f"{int(v)}"
  return f"{v:.4g}"


def _eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def drop_rows_after(path: str, step: int) -> int:
  """Rewrites JSONL `path` (atomically) keeping the rows with "step" <= `step`; a torn or
  unreadable row (a run killed mid-write) goes too. Returns how many rows were dropped."""
  if not storage.exists(path):
    return 0
  lines = storage.read_bytes(path).decode("utf-8", errors="replace").splitlines()
  kept = [line for line in lines if _row_step(line) is not None and _row_step(line) <= step]
  if len(kept) < len(lines):
    storage.write_atomic(path, "".join(f"{line}\n" for line in kept))
  return len(lines) - len(kept)


def _row_step(line: str) -> int | None:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


class MetricsLogger:
  """Writes metrics of a run to the console, `workdir/metrics.jsonl` and TensorBoard."""

  def __init__(self, workdir: str, total_steps: int, *, is_primary: bool = True,
               tensorboard: bool = True, stream=None, upload_interval_s: float = 30.0,
               resume_step: int | None = None):
    """`resume_step`: the step the run starts from (0 for a new one); the rows an earlier
    attempt logged after it are dropped first, so metrics.jsonl reads as one run. None
    keeps the file as it is."""
    self.total_steps = total_steps
    self.is_primary = is_primary
    self.stream = stream or sys.stdout
    self._start = time.time()
    self._first_step: int | None = None
    self._jsonl = None
    self._tb = None
    self._tb_remote, self._tb_local, self._tb_synced = None, None, time.time()
    self._upload_interval_s = upload_interval_s
    if is_primary:
      storage.makedirs(workdir)
      path = storage.join(workdir, "metrics.jsonl")
      if resume_step is not None:
        drop_rows_after(path, resume_step)
      self._jsonl = storage.AppendFile(path, min_interval_s=upload_interval_s)
      if tensorboard:
        self._open_tensorboard(storage.join(workdir, "tensorboard"))

  def _open_tensorboard(self, tb_dir: str) -> None:
    """Events go to `tb_dir`, or, for a URL, to a local folder uploaded to it."""
    from tensorboardX import SummaryWriter  # only the primary process writes events

    if storage.is_local(tb_dir):
      self._tb = SummaryWriter(tb_dir)
      return
    self._tb_remote, self._tb_local = tb_dir, tempfile.mkdtemp(prefix="navit_clip_tb_")
    # a unique suffix: a restart in the same second must not put over the earlier file
    self._tb = SummaryWriter(self._tb_local, filename_suffix=f".{uuid.uuid4().hex[:8]}")

  def _sync_tensorboard(self, *, force: bool = False) -> None:
    """Uploads the local event files of a remote workdir, at most every interval."""
    if self._tb_remote is None:
      return
    if force or time.time() - self._tb_synced >= self._upload_interval_s:
      self._tb.flush()
      storage.upload_dir(self._tb_local, self._tb_remote)
      self._tb_synced = time.time()

  def log(self, step: int, metrics: Mapping[str, float], *, prefix: str = "train") -> None:
    """Records `metrics` (name -> float) at `step` under `prefix` ("train", "eval", ...)."""
    if not self.is_primary:
      return
    metrics = {k: float(v) for k, v in metrics.items()}
    record = {"step": step, "time": time.time(), "split": prefix, **metrics}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f"{prefix}/{k}", v, step)
      self._sync_tensorboard()
    self.stream.write(self._console_line(step, metrics, prefix) + "\n")
    self.stream.flush()

  def _console_line(self, step: int, metrics: Mapping[str, float], prefix: str) -> str:
    if self._first_step is None:
      self._first_step, self._start = step, time.time()
    parts = [f"[{prefix}] step {step}/{self.total_steps}"]
    keys = [k for k in _CONSOLE_KEYS if k in metrics]
    keys += sorted(k for k in metrics if k not in _CONSOLE_KEYS)
    parts += [f"{k}={_fmt(metrics[k])}" for k in keys]
    done = step - self._first_step
    if prefix == "train" and done > 0:
      rate = (time.time() - self._start) / done
      parts.append(f"eta={_eta(rate * (self.total_steps - step))}")
    return " ".join(parts)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._sync_tensorboard(force=True)
      self._tb.close()
      if self._tb_local is not None:
        shutil.rmtree(self._tb_local, ignore_errors=True)
