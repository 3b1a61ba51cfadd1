"""The trainer's throughput window: what passed between two log steps, as rates and shares.

A window counts this process's host batches (images, real and total tokens, rows) and the
seconds the loop waited for them; time spent evaluating inside the window is left out
(`paused`). `report` turns the window into figures for the whole run: every process feeds
the same share of each global batch, so this process's counts are scaled by global rows /
this process's rows. Two counts run on across windows and across resumes: the images and
real tokens of the whole run (`seen()` is saved with each checkpoint and given back as
`seen=` when the run resumes), the compute a run has spent.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping

import numpy as np


class Throughput:
  """Images, tokens, rows and data wait of the steps since `start`, and their elapsed time.

  `report()` gives:
    images_per_s    images per second, whole run
    tokens_per_s    real (non-padding) patch tokens per second, whole run
    padding         share of padding tokens
    images_per_row  images per packed row
    data_wait_frac  share of the elapsed time spent waiting for batches
    step_time       seconds per step
    mfu             step_flops * steps / elapsed / peak_flops
    images_seen     images of the whole run, all processes (not reset by `start`)
    tokens_seen     real patch tokens of the whole run: the compute the run has spent
  """

  def __init__(self, global_rows: int, step_flops: float, peak_flops: float, *,
               seen: Mapping[str, float] | None = None,
               clock: Callable[[], float] = time.perf_counter):
    """A window that starts now.

    Args:
      global_rows: rows of a global batch (config.data.batch_size).
      step_flops: FLOPs of one compiled step on one process's devices.
      peak_flops: the devices' peak FLOP/s.
      seen: the `seen()` counts a resumed run was saved with; None or {} for a new run.
      clock: seconds, monotonic (time.perf_counter; a fake one in tests).
    """
    self._global_rows = global_rows
    self._step_flops = step_flops
    self._peak_flops = peak_flops
    self._clock = clock
    seen = seen or {}
    # Whole-run counts, all processes: this process's scaled by its share of each batch.
    self._images_seen = float(seen.get("images_seen", 0.0))
    self._tokens_seen = float(seen.get("tokens_seen", 0.0))
    self.start()

  def start(self) -> None:
    """Starts a new, empty window now."""
    self._images = self._real = self._tokens = self._rows = 0
    self._process_rows = 0
    self._wait = 0.0
    self._t0 = self._clock()

  def add(self, batch: Mapping[str, np.ndarray], wait: float) -> None:
    """Counts one step's host batch (segment_ids int32 [B, L], image_mask bool [B, M]).

    `wait`: the seconds the loop waited for it.
    """
    seg = batch["segment_ids"]
    self._images += int(batch["image_mask"].sum())
    self._real += int((seg > 0).sum())
    self._tokens += int(seg.size)
    self._rows += seg.shape[0]
    self._process_rows = seg.shape[0]  # this process's share of the global batch
    self._wait += wait
    share = self._global_rows / seg.shape[0]
    self._images_seen += int(batch["image_mask"].sum()) * share
    self._tokens_seen += int((seg > 0).sum()) * share

  def seen(self) -> dict[str, float]:
    """The whole run's images_seen and tokens_seen, to save with a checkpoint."""
    return {"images_seen": self._images_seen, "tokens_seen": self._tokens_seen}

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    """Leaves the time spent inside the `with` block (evaluation) out of the window."""
    t = self._clock()
    try:
      yield
    finally:
      self._t0 += self._clock() - t

  def report(self) -> dict[str, float]:
    """The window's figures (see the class docstring); needs at least one `add`."""
    elapsed = self._clock() - self._t0
    rows = self._process_rows
    n_steps, share = self._rows / rows, self._global_rows / rows
    return {
        "images_per_s": self._images * share / elapsed,
        "tokens_per_s": self._real * share / elapsed,
        "padding": 1.0 - self._real / max(self._tokens, 1),
        "images_per_row": self._images / max(self._rows, 1),
        "data_wait_frac": self._wait / elapsed,
        "step_time": elapsed / n_steps,
        "mfu": self._step_flops * n_steps / elapsed / self._peak_flops,
        **self.seen(),
    }
