"""Stopping a run cleanly on SIGTERM or SIGINT: the trainer saves, waits, and returns.

Schedulers announce preemption with SIGTERM (Slurm, Kubernetes, Cloud TPU maintenance) and
a person stops a run with Ctrl-C (SIGINT). `PreemptionGuard` turns either into a flag: the
signal handler only records it, and the training loop asks `stop_requested(step, ...)`
after each step, then saves the state and the data iterator synchronously and returns.

A single process answers from its own flag at every step, with no device sync. Several
processes must stop at the same step (or the others would wait in a collective forever),
so they agree on it with a host all-gather, only at steps where the host syncs anyway
(log and checkpoint steps): a signal is acted on within `log_every` steps.
"""

from __future__ import annotations

import signal
import threading
import types

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionGuard:
  """Records SIGTERM / SIGINT between `install()` and `uninstall()` instead of dying.

  Handlers are installed only in the main thread (where Python delivers signals);
  `uninstall()` puts back the handlers that were there before.
  """

  def __init__(self):
    self.signal_name: str | None = None
    self._previous: dict[int, object] = {}

  def _handle(self, signum: int, frame: types.FrameType | None) -> None:
    del frame
    self.signal_name = signal.Signals(signum).name

  def install(self) -> PreemptionGuard:
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def uninstall(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def stop_requested(self, sync_point: bool) -> bool:
    """True when the run should save and stop after the current step.

    Args:
      sync_point: whether the host syncs with the devices at this step anyway (a log or
        checkpoint step); several processes only agree on stopping at such steps.
    """
    if jax.process_count() == 1:
      return self.signal_name is not None
    if not sync_point:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.signal_name is not None))
    if self.signal_name is None and np.any(flags):
      self.signal_name = "a signal to another process"
    return bool(np.any(flags))
