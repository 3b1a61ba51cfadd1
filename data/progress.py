"""Progress of long work (convert, inspect, evaluation, embedding) as log lines.

    data convert: 3/10 shards (30%), 30000 records, 12 skipped, 812 records/s, ETA 1m26s

A line at most every LOG_EVERY_S seconds while the work goes on, and one when it ends. The
ETA comes from the share of the total done so far; work of unknown size (a stream read to
its end) gets counts and a rate only. Lines go through `logging`, so they land in the
terminal and in a job's log file alike.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

LOG_EVERY_S = 5.0  # seconds between two progress lines


def duration(seconds: float) -> str:
  """'42s', '3m05s' or '2h07m'."""
  s = int(round(seconds))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
  """Logs how far some work is: done / total units, records, skipped, rate, ETA.

  Args:
    label: what is being done ("data convert", "eval folder:val").
    total: the units of work, or None when unknown (no share, no ETA).
    unit: what `done` counts ("records", "shards", "files").
    enabled: False logs nothing.
    logger: where the lines go (default: this module's).
  """

  def __init__(self, label: str, total: int | None, unit: str = "records", *,
               enabled: bool = True, logger: logging.Logger | None = None):
    self.label, self.total, self.unit, self.enabled = label, total, unit, enabled
    self._log = logger or log
    self.t0 = self._last = time.perf_counter()
    self.done = self.skipped = 0
    self.records: int | None = None

  def update(self, done: int, *, records: int | None = None, skipped: int = 0) -> None:
    """Sets the units done so far (and the records read and skipped, when `done` counts
    something else); logs a line when LOG_EVERY_S have passed since the last."""
    self.done, self.records, self.skipped = done, records, skipped
    now = time.perf_counter()
    if self.enabled and now - self._last >= LOG_EVERY_S:
      self._last = now
      self._log.info("%s: %s", self.label, self._line(now - self.t0, final=False))

  def close(self) -> None:
    """Logs the final line: what was done, in how long."""
    elapsed = time.perf_counter() - self.t0
    if self.enabled:
      self._log.info("%s: done, %s in %s", self.label, self._line(elapsed, final=True),
                     duration(elapsed))

  def _line(self, elapsed: float, final: bool) -> str:
    """"3/10 shards (30%), 3000 records, 12 skipped, 812.0 records/s, ETA 8s"."""
    parts = [f"{self.done}/{self.total} {self.unit}" if self.total is not None
             else f"{self.done} {self.unit}"]
    share = min(self.done / self.total, 1.0) if self.total and self.done else 0.0
    if share and not final:
      parts[0] += f" ({100 * share:.0f}%)"
    records = self.done if self.records is None else self.records
    if self.records is not None:
      parts.append(f"{records} records")
    if self.skipped:
      parts.append(f"{self.skipped} skipped")
    rate_unit = self.unit if self.records is None else "records"
    parts.append(f"{records / max(elapsed, 1e-9):.1f} {rate_unit}/s")
    if share and not final:
      parts.append(f"ETA {duration(elapsed * (1 - share) / share)}")
    return ", ".join(parts)
