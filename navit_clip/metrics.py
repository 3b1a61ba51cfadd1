"""Training metrics: one console line with an ETA, a JSONL file, and TensorBoard events.

`MetricsLogger.log(step, metrics)` takes host floats (call `jax.device_get` first, once per
log step, so logging never syncs the device more than that).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping

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


class MetricsLogger:
  """Writes metrics of a run to the console, `workdir/metrics.jsonl` and TensorBoard."""

  def __init__(self, workdir: str, total_steps: int, *, is_primary: bool = True,
               tensorboard: bool = True, stream=None):
    self.total_steps = total_steps
    self.is_primary = is_primary
    self.stream = stream or sys.stdout
    self._start = time.time()
    self._first_step: int | None = None
    self._jsonl = None
    self._tb = None
    if is_primary:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      if tensorboard:
        from tensorboardX import SummaryWriter  # only the primary process writes events
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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
      self._tb.close()
