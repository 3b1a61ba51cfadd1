"""Grain worker processes that leave stopping to the main process and die with it.

A preemption (Slurm's scancel, a TPU maintenance event) or a Ctrl-C in a terminal signals
the whole process group, the Grain workers with it. The main process turns SIGTERM and
SIGINT into "save and stop after this step" (navit_clip.preemption); a worker killed by
the same signal would end the run first ("Worker process was terminated unexpectedly").
So the workers ignore both, and leave when the main process is gone, however it ended,
instead of lingering as orphans with their decoded images and shared-memory blocks:

- `WorkerStartShield` wraps the prefetching dataset. The calls that may start workers
  (the first `next`, `set_state`, `start_prefetch`) run with SIGINT and SIGTERM blocked in
  the calling thread; Grain starts each worker from a thread created inside such a call,
  and a new process inherits the blocked mask, so neither signal can reach a worker before
  it has set them aside (multiprocessing's resource tracker starts the same way). The main
  process still receives them (a blocked thread does not take a process signal; another
  thread does, or it waits until the mask is restored).
- `init_worker` (Grain's `worker_init_fn`) sets both signals to SIG_IGN and unblocks them,
  then starts a daemon thread that waits on multiprocessing's parent sentinel (a pipe the
  parent holds open until it exits) and ends the worker when it closes.
  prctl(PR_SET_PDEATHSIG) is not used: it fires when the *thread* that started the worker
  ends, and Grain's prefetch threads, which start the workers, end on every `set_state`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
from multiprocessing import resource_tracker
import os
import signal
import threading
from collections.abc import Iterator

import grain
from absl import flags

log = logging.getLogger(__name__)

STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
PARENT_GONE_EXIT = 3  # a worker's exit status after its parent process ended


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
  """Blocks SIGINT and SIGTERM in the calling thread inside the block (see module doc)."""
  previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
  try:
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _exit_when_parent_ends(sentinel: int) -> None:
  multiprocessing.connection.wait([sentinel])
  os._exit(PARENT_GONE_EXIT)  # no cleanup to run: the parent owns every shared resource


def init_worker(worker_index: int, num_workers: int) -> None:
  """Grain's `worker_init_fn`: ignore SIGINT / SIGTERM, exit when the parent has ended."""
  del worker_index, num_workers
  for sig in STOP_SIGNALS:
    signal.signal(sig, signal.SIG_IGN)
  signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # pending ones are discarded
  parent = multiprocessing.parent_process()
  if parent is None or parent.sentinel is None:  # not started by multiprocessing
    return
  threading.Thread(target=_exit_when_parent_ends, args=(parent.sentinel,), daemon=True,
                   name="exit-with-parent").start()


class _ShieldedIterator(grain.DatasetIterator):
  """`parent`'s elements and state; worker starts run with the stop signals blocked."""

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self._started = False

  def __next__(self):
    if self._started:
      return next(self._parent)
    with stop_signals_blocked():
      element = next(self._parent)
    self._started = True
    return element

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state) -> None:
    with stop_signals_blocked():
      self._parent.set_state(state)

  def start_prefetch(self) -> None:
    with stop_signals_blocked():
      self._parent.start_prefetch()


class WorkerStartShield(grain.IterDataset):
  """`parent` (an `mp_prefetch` dataset) unchanged, its iterator state included, with
  its workers started while SIGINT and SIGTERM are blocked (see the module docstring).

  Grain reads absl flags as it starts workers; where the application has not parsed them
  (a library caller, not the navit-clip command), they are marked parsed, at defaults.
  """

  def __iter__(self) -> grain.DatasetIterator:
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    # multiprocessing's resource tracker unblocks both signals in the thread that first
    # starts it: start it now, before they are blocked.
    resource_tracker.ensure_running()
    with stop_signals_blocked():
      return _ShieldedIterator(iter(self._parent))
